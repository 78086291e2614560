"""Where a two-view loader's time goes: milliseconds per image of each part of MoCo v2 aug+ (decode, crop +
resize, each colour op, collation), in the FFCV loader's code and in torchvision's, on one thread, over the
same JPEGs; then what the parts cost inside the real TwoViewLoader with its threads.

    python -m bench.loader_parts [--data DIR | --image-size 96] [--res 64] [--batch-size 128] [--workers 2]
    (from the repo root; ends with a RESULT {json} line)

Parts, one thread, each timed over every image (after one untimed pass of the same work):
- ffcv: decode = libjpeg-turbo on the JPEG bytes stored in the .beton (ffcv's imdecode), once per image
  for both views as the loader's decoder does; crop + resize = the keyed RandomResizedCrop draw and
  OpenCV's resize (ffcv's resize_crop) for each view; both in compiled numba loops. Colour ops =
  pipeline/data/augment.py on batches of --batch-size crops, each op timed inside MocoV2Augment (the rest
  of its time, mostly gathering the samples an op applies to and scattering them back, is
  "gather/scatter"). Collation: none, the decoder writes into the batch array.
- torchvision: decode = ImageFolder's PIL loader, then each aug+ transform of bench/loader.py on PIL images
  / tensors as in main_moco.py, for each view; collation = DataLoader's default_collate of --batch-size
  samples.
In the loader, a batch is decoded (numba, --workers threads) and then colour-augmented (torch, the batch
split over --workers threads of one torch thread each), one after the other: the last line times the
loader with and without the colour ops to show that split with the threads in play.
"""

import argparse
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from numba import njit
from torch.utils.data import default_collate
from torchvision.datasets.folder import ImageFolder, pil_loader

import pipeline.data.augment as augment
import pipeline.data.ffcv_io as ffcv_io
from bench.common import result
from bench.loader import aug_plus_steps, image_options, images_and_beton, timed_epoch
from pipeline.data.augment import AugParams, MocoV2Augment, to_float
from pipeline.data.ffcv_io import RATIO, TwoViewLoader, keyed_random_crop, mix64_nb

# dispatchers of their own: numba fails (KeyError) when the loader's compiled decoder calls the one these loops
# were compiled with
_imdecode, _resize_crop = Compiler.compile(imdecode), Compiler.compile(resize_crop)


@njit
def decode_all(file, ptrs, sizes, heights, widths, out):
    """Decode every stored JPEG into out[i] (flat [N, max H * max W * 3]) as KeyedResizedCrop does."""
    for i in range(len(ptrs)):
        h, w = heights[i], widths[i]
        image = out[i, : h * w * 3].reshape(h, w, 3)
        _imdecode(file[ptrs[i]: ptrs[i] + sizes[i]], image, h, w, h, w, 0, 0, 1, 1, False, False)


@njit
def crop_all(decoded, heights, widths, scale, ratio, view_keys, out):
    """Both views' keyed RandomResizedCrop + resize of every decoded image into out [N, 2, res, res, 3]."""
    for i in range(len(heights)):
        h, w = heights[i], widths[i]
        image = decoded[i, : h * w * 3].reshape(h, w, 3)
        for v in range(2):
            top, left, ch, cw = keyed_random_crop(h, w, scale, ratio, mix64_nb(view_keys[v] + np.uint64(i)))
            _resize_crop(image, top, top + ch, left, left + cw, out[i, v])


def stored_jpegs(beton: Path) -> tuple[np.ndarray, ...]:
    """The .beton's bytes and, per sample, where its JPEG starts, its length, height and width."""
    reader = Reader(str(beton))
    image = reader.metadata["f0"]  # field 0 = "image" (write_beton's order)
    table = reader.alloc_table[np.argsort(reader.alloc_table["ptr"])]
    at = np.searchsorted(table["ptr"], image["data_ptr"])  # [N] row of each sample's allocation
    assert (table["ptr"][at] == image["data_ptr"]).all(), "a sample without its allocation"
    assert (image["mode"] == IMAGE_MODES["jpg"]).all(), "expected JPEG images (write_beton's write_mode)"
    file = np.fromfile(beton, dtype=np.uint8)
    return (file, image["data_ptr"].astype(np.int64), table["size"][at].astype(np.int64),
            image["height"].astype(np.int64), image["width"].astype(np.int64))


def per_image_ms(fn, n: int) -> float:
    """ms per image of fn() over n images, after one untimed call (numba compiles, caches warm)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3 / n


class OpTimer:
    """Patches the named functions of a module with wrappers that add their wall time to `seconds`."""

    def __init__(self, module, names: dict[str, str]):
        self.module, self.names, self.seconds = module, names, defaultdict(float)

    def patches(self) -> list:
        return [mock.patch.object(self.module, attr, self.timed(label, getattr(self.module, attr)))
                for attr, label in self.names.items()]

    def timed(self, label: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[label] += time.perf_counter() - t0
            return out
        return wrapper


def ffcv_parts(beton: Path, res: int, batch_size: int, aug: AugParams) -> dict[str, float]:
    file, ptrs, sizes, heights, widths = stored_jpegs(beton)
    n = len(ptrs)
    decoded = np.zeros((n, int(heights.max() * widths.max() * 3)), dtype=np.uint8)
    crops = np.zeros((n, 2, res, res, 3), dtype=np.uint8)
    view_keys = np.array([augment.view_key(0, 0, v) for v in (0, 1)], dtype=np.uint64)
    parts = {"decode": per_image_ms(lambda: decode_all(file, ptrs, sizes, heights, widths, decoded), n),
             "crop + resize": per_image_ms(lambda: crop_all(decoded, heights, widths, np.array(aug.crop_scale),
                                                           np.array(RATIO), view_keys, crops), n)}

    views = [torch.from_numpy(np.ascontiguousarray(crops[:, v])) for v in (0, 1)]  # [N, res, res, 3] each
    ops = {"sample_keys": "random draws", "draw": "random draws", "to_float": "to float",
           "_JITTER_OPS": None, "to_grayscale": "grayscale", "gaussian_blur": "blur", "hflip": "flip",
           "normalize": "normalize"}
    jitter = dict(zip(("brightness", "contrast", "saturation", "hue"), augment._JITTER_OPS, strict=True))
    timer = OpTimer(augment, {k: v for k, v in ops.items() if v})
    transforms = [MocoV2Augment(aug, seed=0, view=v) for v in (0, 1)]

    def colour_ops() -> float:
        t0 = time.perf_counter()
        for start in range(0, n - batch_size + 1, batch_size):
            index = torch.arange(start, start + batch_size)
            for v in (0, 1):
                transforms[v](views[v][start: start + batch_size], index, epoch=0)
        return time.perf_counter() - t0

    colour_ops()  # warm-up
    with ExitStack() as stack:
        for p in timer.patches():
            stack.enter_context(p)
        stack.enter_context(mock.patch.object(augment, "_JITTER_OPS", tuple(
            timer.timed(name, op) for name, op in jitter.items())))
        total = colour_ops()
    images = (n // batch_size) * batch_size
    for label, s in timer.seconds.items():
        parts[label] = s * 1e3 / images
    parts["gather/scatter"] = (total - sum(timer.seconds.values())) * 1e3 / images
    parts["collate"] = 0.0
    return parts


def torchvision_parts(data: Path, res: int, batch_size: int, aug: AugParams) -> dict[str, float]:
    samples = ImageFolder(str(data)).samples
    steps = aug_plus_steps(res, aug)
    seconds = defaultdict(float)

    def one_pass(timed: bool) -> list:
        out = []
        for path, label in samples:
            t0 = time.perf_counter()
            image = pil_loader(path)
            t1 = time.perf_counter()
            seconds["decode"] += (t1 - t0) * timed
            views = []
            for _ in range(2):
                x = image
                for name, step in steps.items():
                    t0 = time.perf_counter()
                    x = step(x)
                    seconds[name] += (time.perf_counter() - t0) * timed
                views.append(x)
            out.append((tuple(views), label))
        return out

    one_pass(timed=False)
    samples_out = one_pass(timed=True)
    n = len(samples)
    parts = {name: s * 1e3 / n for name, s in seconds.items()}
    batches = [samples_out[i: i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    parts["collate"] = per_image_ms(lambda: [default_collate(b) for b in batches], len(batches) * batch_size)
    return parts


def loader_rate(beton: Path, res: int, batch_size: int, workers: int, aug: AugParams, colour: bool,
                epochs: int = 3) -> float:
    """Images/s of the TwoViewLoader, with aug+'s colour ops or with to float + normalize only."""
    def plain(aug, seed, view):
        return lambda images, index, epoch: augment.normalize(to_float(images))

    with ExitStack() as stack:
        if not colour:
            stack.enter_context(mock.patch.object(ffcv_io, "MocoV2Augment", plain))
        loader = TwoViewLoader(beton, batch_size, res, aug, workers, seed=0)
        timed_epoch(loader, 0)  # warm-up: numba JIT
        images, seconds = 0, 0.0
        for epoch in range(1, epochs + 1):
            n, s = timed_epoch(loader, epoch)
            images, seconds = images + n, seconds + s
    return images / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    image_options(p)
    p.add_argument("--workers", type=int, default=2, help="ffcv threads, for the loader part")
    args = p.parse_args()
    aug = AugParams()

    with tempfile.TemporaryDirectory(prefix="bench_loader_parts_") as tmp:
        data, beton, info = images_and_beton(args, Path(tmp))
        print(f"{info['images']} images from {data}, res {args.res}, batch {args.batch_size}; "
              "parts on one thread, ms per image (both views)")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        ffcv = ffcv_parts(beton, args.res, args.batch_size, aug)
        tv = torchvision_parts(data, args.res, args.batch_size, aug)
        torch.set_num_threads(threads)
        rates = {colour: loader_rate(beton, args.res, args.batch_size, args.workers, aug, colour)
                 for colour in (True, False)}

    groups = {  # the four parts, each the sum of the rows listed
        "decode": (["decode"], ["decode"]),
        "crop + resize": (["crop + resize"], ["crop + resize"]),
        "colour ops": ([k for k in ffcv if k not in ("decode", "crop + resize", "collate")],
                       [k for k in tv if k not in ("decode", "crop + resize", "collate")]),
        "collate": (["collate"], ["collate"]),
    }
    print(f"  {'part':28s} {'ffcv':>8s} {'torchvision':>12s}")
    summary = {}
    for group, (f_rows, t_rows) in groups.items():
        rows = sorted(set(f_rows) | set(t_rows), key=lambda r: (r not in ffcv, r))
        if len(rows) > 1:
            for r in rows:
                print(f"    {r:26s} {ffcv.get(r, float('nan')):8.3f} {tv.get(r, float('nan')):12.3f}")
        f, t = sum(ffcv[r] for r in f_rows), sum(tv[r] for r in t_rows)
        summary[group] = {"ffcv_ms": round(f, 4), "torchvision_ms": round(t, 4)}
        print(f"  {group:28s} {f:8.3f} {t:12.3f}   torchvision / ffcv {t / f if f else float('inf'):6.2f}x")
    f_total, t_total = sum(ffcv.values()), sum(tv.values())
    print(f"  {'total (one thread)':28s} {f_total:8.3f} {t_total:12.3f}   torchvision / ffcv "
          f"{t_total / f_total:6.2f}x")
    for s in summary.values():
        s["ffcv_share"] = round(s["ffcv_ms"] / f_total, 3)
    share = ", ".join(f"{g} {s['ffcv_share']:.0%}" for g, s in summary.items())
    print(f"ffcv one-thread time: {share}")
    print(f"TwoViewLoader, {args.workers} threads: {rates[True]:.0f} images/s with aug+, {rates[False]:.0f} "
          f"without the colour ops ({rates[False] / rates[True]:.2f}x); colour ops = "
          f"{1 - rates[True] / rates[False]:.0%} of the loader's wall time")
    result("loader_parts", parts_ms={"ffcv": {k: round(v, 4) for k, v in ffcv.items()},
                                     "torchvision": {k: round(v, 4) for k, v in tv.items()}},
           summary=summary, one_thread_ratio=round(t_total / f_total, 3),
           loader_images_per_s={"aug+": round(rates[True], 1), "no colour ops": round(rates[False], 1)},
           res=args.res, batch_size=args.batch_size, workers=args.workers, images=info["images"])


if __name__ == "__main__":
    main()
