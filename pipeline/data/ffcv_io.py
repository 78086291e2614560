"""ImageFolder -> FFCV .beton, and the loaders that read it: two MoCo v2 views for pretraining, one view
for linear evaluation / kNN / validation.

Reproducibility scheme: every random draw is hash(seed, epoch, view, sample index, stream) with splitmix64
(augment.py), so a batch is the same whatever the number of workers and whether or not earlier epochs ran
in this process. The order comes from ffcv's seeded RANDOM traversal (a function of seed + epoch). The crop
is drawn inside the numba decoder; numba freezes closure variables as constants, so the decoder reads the
current epoch through the address of a one-element array it owns (the address is the frozen constant,
the content is set by set_epoch). Each image is decoded once and cut into both views' crops. Colour ops,
grayscale, blur and flip run after loading, keyed by the dataset index of each sample, which a small ffcv
operation hands over: on the CPU per sample in one numba function (colour_cpu.py), the batch split over
num_workers threads; or, with TwoViewLoader's augment_device not cpu, in the training step on its device
(augment.colour_augment), the loader then yielding the uint8 crops and the indices.
"""

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToTensor
from ffcv.writer import DatasetWriter
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic
from PIL import Image
from torch import Tensor

from pipeline.compat import ffcv as ffcv_compat
from pipeline.data.augment import (
    CROP_STREAM,
    FLIP,
    AugParams,
    MocoV2Augment,
    apply_where,
    colour_augment,
    hflip,
    mix64_int,
    normalize,
    sample_keys,
    to_float,
    uniform,
)
from pipeline.data.batch import TwoViewBatch

# ffcv sets torch's process-wide intra-op thread count to 1 when imported (pipeline.compat.ffcv puts a default
# back), and to num_workers on creating a Loader and on starting an epoch: the loaders below keep whatever count
# the caller has when they are created (LoaderState).

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio range
EVAL_CROP_RATIO = 224 / 256  # centre crop side / shorter side


class CorruptImageError(ValueError):
    """A source image that PIL cannot fully decode."""


# ---- writing ------------------------------------------------------------------------------------------


def class_folders(image_dir: Path) -> list[str]:
    """The class folder names, sorted as torchvision's ImageFolder: their order is the label order."""
    if not image_dir.is_dir():
        raise ValueError(f"image folder not found: {image_dir}")
    classes = sorted(d.name for d in image_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {image_dir} (expected {image_dir}/<class>/<image>)")
    return classes


def _list_image_folder(image_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes sorted by name and (path, label) pairs, as torchvision's ImageFolder."""
    classes = class_folders(image_dir)
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (image_dir / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder without images: {image_dir / name}")
        samples += [(p, label) for p in files]
    return classes, samples


def _decode_error(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the damage
        return f"{type(e).__name__}: {e}"
    return None


class _ImageList:
    """Indexable (RGB uint8 array, label) dataset for ffcv's DatasetWriter."""

    def __init__(self, samples: list[tuple[Path, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), label


def write_beton(image_dir: Path, out_path: Path, max_resolution: int, jpeg_quality: int = 90,
                on_corrupt: str = "fail", num_workers: int = 2) -> dict:
    """Convert an ImageFolder to a .beton with fields image (jpg, longest side <= max_resolution), label.

    Every file is decoded once beforehand: ffcv's writer processes hang on an undecodable image, and the
    user needs the path. The file appears atomically (temp file + os.replace).
    """
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    image_dir, out_path = Path(image_dir), Path(out_path)
    classes, samples = _list_image_folder(image_dir)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL decodes without the GIL
        errors = list(pool.map(_decode_error, [p for p, _ in samples]))
    bad = [(str(p), e) for (p, _), e in zip(samples, errors, strict=True) if e is not None]
    if bad and on_corrupt == "fail":
        raise CorruptImageError(f"cannot decode {bad[0][0]} ({bad[0][1]})"
                                + (f" and {len(bad) - 1} other file(s)" if len(bad) > 1 else ""))
    samples = [s for s, e in zip(samples, errors, strict=True) if e is None]
    if not samples:
        raise ValueError(f"no decodable images in {image_dir}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers)).from_indexed_dataset(
            _ImageList(samples))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"images": len(samples), "classes": classes, "skipped": [p for p, _ in bad],
            "samples": [(p.relative_to(image_dir).as_posix(), label) for p, label in samples]}  # sample i = line i


# ---- keyed random draws inside numba ---------------------------------------------------------------


@intrinsic
def _load_int64(typingctx, address):
    """Read the int64 at a raw address (for the epoch, which numba cannot take from a closure)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
        return builder.load(ptr)
    return types.int64(types.intp), codegen


@njit
def mix64_nb(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser, same bits as augment.mix64 / mix64_int."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit
def uniform_nb(key: np.uint64, stream: int) -> float:
    """U[0, 1) from hash(key, stream), same as augment.uniform."""
    return float(mix64_nb(key + np.uint64(stream)) >> np.uint64(11)) * 2.0**-53


@njit
def keyed_random_crop(height: int, width: int, scale: np.ndarray, ratio: np.ndarray, key: np.uint64
                      ) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop), draws from the key."""
    area = height * width
    log_r0, log_r1 = np.log(ratio[0]), np.log(ratio[1])
    for attempt in range(10):
        s = CROP_STREAM + 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform_nb(key, s))
        aspect = np.exp(log_r0 + (log_r1 - log_r0) * uniform_nb(key, s + 1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform_nb(key, s + 2) * (height - h + 1))
            j = int(uniform_nb(key, s + 3) * (width - w + 1))
            return i, j, h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


@njit
def center_crop(height: int, width: int, scale: np.ndarray, ratio: np.ndarray, key: np.uint64
                ) -> tuple[int, int, int, int]:
    """The evaluation crop: centred square of side ratio[0] * shorter side (scale and key unused)."""
    c = int(ratio[0] * min(height, width))
    return (height - c) // 2, (width - c) // 2, c, c


_imdecode, _resize_crop = Compiler.compile(imdecode), Compiler.compile(resize_crop)  # compiled once


class KeyedResizedCrops(ResizedCropRGBImageDecoder):
    """Decode each image once, then cut `views` crops of it, each resized to output_size: [B, V, H, W, 3].

    Crop v of sample i is drawn from key = hash(seed, epoch, v, i), so it depends neither on np.random nor
    on the thread that decodes it. Decoding once for both MoCo views halves the JPEG work of ffcv's usual
    one-pipeline-per-view setup. `epoch` is a one-element int64 array owned by the loader; the compiled
    decoder reads it by address.
    """

    def __init__(self, output_size: tuple[int, int], crop: Callable, scale: tuple[float, float],
                 ratio: tuple[float, float], seed: int, views: int, epoch: np.ndarray):
        super().__init__(output_size)
        self.crop, self.scale, self.ratio = crop, np.array(scale), np.array(ratio)
        self.seed, self.views, self.epoch = seed, views, epoch

    @property
    def get_crop_generator(self):
        return self.crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (_, decoded) = super().declare_state_and_memory(previous_state)
        shape = (self.views, *state.shape)  # [V, H, W, 3] per sample
        return replace(state, shape=shape), (AllocationQuery(shape, state.dtype), decoded)

    def generate_code(self):
        mem_read, loop = self.memory_read, Compiler.get_iterator()
        crop, scale, ratio, jpg = self.get_crop_generator, self.scale, self.ratio, IMAGE_MODES["jpg"]
        seed_key, views = np.uint64(mix64_int(self.seed)), self.views
        epoch_address = self.epoch.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch_key = mix64_nb(seed_key + np.uint64(_load_int64(epoch_address)))
            view_keys = np.empty(views, dtype=np.uint64)
            for v in range(views):
                view_keys[v] = mix64_nb(epoch_key + np.uint64(v))  # = augment.view_key(seed, epoch, v)
            for dst_ix in loop(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = int(field["height"]), int(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix][: height * width * 3].reshape(height, width, 3)
                    _imdecode(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = data.reshape(height, width, 3)
                for v in range(views):
                    i, j, h, w = crop(height, width, scale, ratio, mix64_nb(view_keys[v] + np.uint64(source_ix)))
                    _resize_crop(image, i, i + h, j, j + w, destination[dst_ix, v])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


_warned_threads: set[int] = set()


def loader_threads(num_workers: int) -> int:
    """The loader threads to use for data.num_workers: at most numba's NUMBA_NUM_THREADS (this machine's
    CPU count unless set). ffcv decodes on numba's thread pool, which cannot grow past it, and fails deep
    inside its Loader ("The number of threads must be between 1 and 2") when asked for more: a preset's 8
    workers, written for a cluster node, would stop a run on a laptop. The batches do not depend on the
    thread count (keyed draws), so fewer threads only change the speed; said once per count."""
    limit = numba_config.NUMBA_NUM_THREADS
    workers = min(max(1, num_workers), limit)
    if workers < num_workers and num_workers not in _warned_threads:
        _warned_threads.add(num_workers)
        print(f"ffcv_io: warning: data.num_workers = {num_workers} but numba may start only {limit} threads here "
              f"(NUMBA_NUM_THREADS); the loaders use {limit}", file=sys.stderr, flush=True)
    return workers


class LoaderState:
    """What a loader shares with its ffcv operations: the epoch, which the compiled decoder reads by address,
    errors raised in ffcv's loading thread, which would otherwise leave the consumer waiting forever, the
    caller's torch thread count, restored after ffcv changes it (see the top of this module), and the
    threads that run the batch transform."""

    def __init__(self, num_workers: int, pin_memory: bool = False):
        self.epoch = np.zeros(1, dtype=np.int64)
        self.pin_memory = pin_memory  # batches in page-locked memory: asynchronous copies to a GPU
        self.errors: list[BaseException] = []
        self.torch_threads = torch.get_num_threads()
        self.workers = loader_threads(num_workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batch-transform",
                                       initializer=torch.set_num_threads, initargs=(1,))


class BatchTransform(Operation):
    """Runs fn(uint8 crops [b, V, H, W, 3], dataset indices [b], epoch) -> V float32 [b, 3, H, W] for the
    whole batch in ffcv's loading thread, so that it is prefetched like the decoding; output [V, B, 3, H, W].

    The batch is split into num_workers slices run by as many threads, each with one torch thread (torch's
    thread count is per thread): the colour ops are per sample, so the result is the same for any split,
    and they no longer run on one core while the others wait (an OpenMP team per op instead spin-waits
    next to numba's decoder threads: 5-10x slower on 2 shared cores, measured).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, int], list[Tensor]], state: LoaderState):
        super().__init__()
        self.fn, self.state = fn, state

    def generate_code(self):
        fn, state = self.fn, self.state

        def transform(images, _, batch_indices):
            B, V, H, W, _ = images.shape
            index, epoch = torch.from_numpy(batch_indices.astype(np.int64)), int(state.epoch[0])
            out = torch.empty(V, B, 3, H, W, pin_memory=state.pin_memory)

            def run(a: int, b: int) -> None:
                for v, x in enumerate(fn(images[a:b], index[a:b], epoch)):
                    out[v, a:b] = x

            bounds = np.linspace(0, B, min(state.workers, B) + 1).astype(int)
            try:
                for job in [state.pool.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]:
                    job.result()
            except Exception as e:  # handed to the consumer (see _epoch_batches)
                state.errors.append(e)
            return out

        transform.with_indices = True
        return transform

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        V, H, W, C = previous_state.shape
        return replace(previous_state, jit_mode=False, shape=(V, C, H, W), dtype=torch.float32), None


class LabelAndIndex(Operation):
    """labels [b, 1] -> [b, 2] (label, dataset index): each sample's index travels with its batch, for the
    draws keyed by image (augmentation on the training device) and the analyses."""

    def generate_code(self):
        def label_and_index(labels, _, batch_indices):
            return np.stack([labels[:, 0], batch_indices.astype(np.int64)], axis=1)  # [b, 2]

        label_and_index.with_indices = True
        return label_and_index

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=False, shape=(2,), dtype=np.dtype(np.int64)), None


class Uint8Views(Operation):
    """The decoder's uint8 crops [B, V, H, W, 3], copied out of ffcv's reused buffer (into pinned memory when
    CUDA is there, for a non-blocking copy): the colour ops then run in the training step, on its device."""

    def __init__(self, state: LoaderState):
        super().__init__()
        self.state = state

    def generate_code(self):
        pin = self.state.pin_memory

        def copy(images, _):
            out = torch.empty(images.shape, dtype=images.dtype, pin_memory=pin)  # [B, V, H, W, 3]
            return out.copy_(images)

        return copy

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=False), None


# ---- loaders ------------------------------------------------------------------------------------------


def _ffcv_loader(beton: Path, batch_size: int, num_workers: int, random_order: bool, seed: int,
                 distributed: bool, drop_last: bool, decoder: Operation, fn: Callable | None, state: LoaderState,
                 indices: list[int] | None = None) -> Loader:
    """One ffcv Loader with pipelines 'image' = (decoder, batch transform; with fn None, the uint8 crops) and
    'label' (label and dataset index), over the samples `indices` (None: all)."""
    last = Uint8Views(state) if fn is None else BatchTransform(fn, state)
    pipelines = {"image": PipelineSpec("image", decoder=decoder, transforms=[ToTensor(), last])}
    pipelines["label"] = PipelineSpec("label", decoder=IntDecoder(), transforms=[LabelAndIndex(), ToTensor()])
    order = OrderOption.RANDOM if random_order else OrderOption.SEQUENTIAL
    try:
        return Loader(str(beton), batch_size=batch_size, num_workers=state.workers, order=order, seed=seed,
                      distributed=distributed, drop_last=drop_last, pipelines=pipelines, indices=indices)
    finally:
        torch.set_num_threads(state.torch_threads)  # see LoaderState


def _wait_for_batch(it: EpochIterator) -> None:
    """Block until ffcv's loading thread has put its next batch (or end marker) in the queue; fail if that
    thread died instead (a numba compile error, a bad record): ffcv's own next() would wait for ever."""
    queue = ffcv_compat.output_queue(it)
    with queue.not_empty:
        while not ffcv_compat.batch_ready(it):
            if not it.is_alive():
                raise RuntimeError("ffcv's loading thread ended before its epoch did (its traceback is above)")
            queue.not_empty.wait(timeout=0.5)


def _epoch_batches(loader: Loader, state: LoaderState, epoch: int) -> Iterator[dict[str, Tensor]]:
    """One epoch of named batches; waits for ffcv's prefetch thread if the consumer leaves early.

    ffcv's own outputs (here the labels) live in buffers it reuses a few batches later: callers copy them.
    """
    state.epoch[0] = epoch
    state.errors.clear()
    ffcv_compat.set_next_epoch(loader, epoch)  # ffcv's RANDOM order of this epoch: permutation seeded by seed + epoch
    it = iter(loader)
    try:
        while True:
            _wait_for_batch(it)
            try:
                batch = next(it)
            except StopIteration:
                break
            if state.errors:
                raise state.errors[0]
            torch.set_num_threads(state.torch_threads)  # ffcv's epoch thread set num_workers (see LoaderState)
            yield dict(zip(loader.pipeline_specs, batch, strict=True))
    finally:
        it.close()
        while it.is_alive():  # nothing of this epoch may still run once the next one has set its epoch
            it.join(timeout=1.0)
            # ffcv's end-of-epoch marker is put without a timeout: if the consumer left with the prefetch
            # queue full, that put would block for ever; free one slot for it
            if it.is_alive() and ffcv_compat.output_queue(it).full():
                ffcv_compat.output_queue(it).get_nowait()


class TwoViewLoader:
    """Two independently augmented MoCo v2 aug+ views of each image, one epoch per iteration.

    augment_device cpu (default): im_q, im_k are normalised float32 [B, 3, res, res]. Any other device: the
    colour ops are left to the training step on that device; im_q, im_k are the uint8 crops [B, res, res, 3]
    and `loader.colour_augment(views, indices, epoch, device)` gives the float views there, the same up to
    float rounding. Iterating twice without set_epoch repeats the same epoch (like DistributedSampler).
    pin_memory: batches in page-locked memory, for asynchronous copies to a GPU (needs CUDA).
    """

    def __init__(self, beton: Path, batch_size: int, res: int, aug: AugParams, num_workers: int, seed: int,
                 distributed: bool = False, drop_last: bool = True, pin_memory: bool = False,
                 augment_device: torch.device | str = "cpu"):
        self.epoch, self._state = 0, LoaderState(num_workers, pin_memory)
        self.aug, self.seed = aug, seed
        self.colour_on_loader = torch.device(augment_device).type == "cpu"
        decoder = KeyedResizedCrops((res, res), keyed_random_crop, aug.crop_scale, RATIO, seed, 2, self._state.epoch)
        augment = [MocoV2Augment(aug, seed, v) for v in (0, 1)]

        def transform(images: Tensor, index: Tensor, epoch: int) -> list[Tensor]:
            return [augment[v](images[:, v], index, epoch) for v in (0, 1)]  # [b, 3, res, res] x2

        self.loader = _ffcv_loader(beton, batch_size, num_workers, True, seed, distributed, drop_last, decoder,
                                   transform if self.colour_on_loader else None, self._state)

    def colour_augment(self, views: Tensor, indices: Tensor, epoch: int, device: torch.device | str
                       ) -> tuple[Tensor, Tensor]:
        """(x1, x2) normalised float32 [B, 3, res, res] on device from a batch's uint8 views [B, 2, res, res, 3]
        and dataset indices [B] (see augment.colour_augment)."""
        x1, x2 = colour_augment(views, indices, epoch, device, self.aug, self.seed)
        return x1, x2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for b in _epoch_batches(self.loader, self._state, self.epoch):
            label, index = b["label"].clone().unbind(1)  # [B], [B]
            yield TwoViewBatch(b["image"][:, 0], b["image"][:, 1], label, index) if not self.colour_on_loader \
                else TwoViewBatch(b["image"][0], b["image"][1], label, index)


class EvalLoader:
    """One view per image: RandomResizedCrop(0.08-1) + flip for linear-eval training (main_lincls.py), else
    a 224/256 centre crop in dataset order keeping every image (features, kNN, validation). `indices`: only
    those samples (a labelled subset), still keyed by their index in the .beton."""

    def __init__(self, beton: Path, batch_size: int, res: int, num_workers: int, train_aug: bool,
                 seed: int = 0, distributed: bool = False, pin_memory: bool = False,
                 indices: list[int] | None = None):
        self.epoch, self._state = 0, LoaderState(num_workers, pin_memory)
        if train_aug:
            decoder = KeyedResizedCrops((res, res), keyed_random_crop, (0.08, 1.0), RATIO, seed, 1, self._state.epoch)
        else:
            decoder = KeyedResizedCrops((res, res), center_crop, (1.0, 1.0), (EVAL_CROP_RATIO,) * 2, seed, 1,
                                        self._state.epoch)

        def transform(images: Tensor, index: Tensor, epoch: int) -> list[Tensor]:
            x = to_float(images[:, 0])  # [b, 3, res, res]
            if train_aug:
                flip = uniform(sample_keys(seed, epoch, 0, index), FLIP) < 0.5  # [b]
                x = apply_where(x, flip, hflip)  # [b, 3, res, res]
            return [normalize(x)]

        self.loader = _ffcv_loader(beton, batch_size, num_workers, train_aug, seed, distributed,
                                   drop_last=train_aug, decoder=decoder, fn=transform, state=self._state,
                                   indices=indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in _epoch_batches(self.loader, self._state, self.epoch):
            yield b["image"][0], b["label"][:, 0].clone()  # [B, 3, res, res], [B]
