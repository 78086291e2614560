"""ImageFolder -> .beton conversion and the two FFCV loaders (pairing, reproducibility, eval crops)."""

import re
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from torchvision import datasets

from pipeline.data import augment as A
from pipeline.data import ffcv_io
from pipeline.data.ffcv_io import CorruptImageError, EvalLoader, TwoViewLoader, write_beton

NO_COLOUR = A.AugParams(p_jitter=0.0, p_gray=0.0, p_blur=0.0)


def _to_uint8_scale(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: [B, 3, H, W] -> values in 0..255."""
    mean = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def _sources(folder: Path) -> tuple[list[np.ndarray], list[int]]:
    """The source images in torchvision ImageFolder order (the order the .beton must have)."""
    ds = datasets.ImageFolder(str(folder))
    return [np.asarray(im) for im, _ in ds], [y for _, y in ds]


def _identify(views: torch.Tensor, source_means: np.ndarray) -> np.ndarray:
    """Index of the source image whose mean colour is nearest to each view's mean colour."""
    means = _to_uint8_scale(views).mean(dim=(2, 3)).numpy()  # [B, 3]
    return np.linalg.norm(means[:, None] - source_means[None], axis=2).argmin(axis=1)


@pytest.fixture
def train_beton(tiny_imagefolder: Path) -> Path:
    out = tiny_imagefolder / "betons" / "train.beton"
    write_beton(tiny_imagefolder / "train", out, max_resolution=64, num_workers=2)
    return out


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [t.clone() for batch in loader for t in batch]


# ---- write_beton -------------------------------------------------------------------------------------


def test_round_trip_equals_sources_up_to_jpeg(tiny_imagefolder: Path):
    out = tiny_imagefolder / "train.beton"
    info = write_beton(tiny_imagefolder / "train", out, max_resolution=64, num_workers=2)
    samples = [(f"{c}/{i}.jpg", label) for label, c in enumerate(("ant", "bee", "cat")) for i in range(4)]
    assert info == {"images": 12, "classes": ["ant", "bee", "cat"], "skipped": [], "samples": samples}
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
    loader = Loader(str(out), batch_size=5, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    images = torch.cat([im for im, _ in loader]).numpy().astype(np.float64)  # [12, 40, 48, 3]
    labels = torch.cat([y for _, y in loader]).view(-1).tolist()
    sources, source_labels = _sources(tiny_imagefolder / "train")
    assert labels == source_labels == [0] * 4 + [1] * 4 + [2] * 4
    assert images.shape == (12, 40, 48, 3)
    assert np.abs(images - np.stack(sources)).mean() < 2.0


def test_max_resolution_downscales_longest_side(tiny_imagefolder: Path):
    out = tiny_imagefolder / "small.beton"
    write_beton(tiny_imagefolder / "val", out, max_resolution=24)
    meta = Reader(str(out)).metadata["f0"]
    assert (meta["width"] == 24).all() and (meta["height"] == 20).all()


def test_corrupt_images_fail_with_path_or_are_skipped(tiny_imagefolder: Path):
    train = tiny_imagefolder / "train"
    truncated, garbage = train / "bee" / "1.jpg", train / "cat" / "9.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"this is not an image" * 10)
    out = tiny_imagefolder / "train.beton"
    with pytest.raises(CorruptImageError, match=re.escape(str(truncated))):
        write_beton(train, out, max_resolution=64)
    assert not out.exists() and list(tiny_imagefolder.glob(".*.tmp")) == []
    info = write_beton(train, out, max_resolution=64, on_corrupt="skip")
    assert info["images"] == 11 and sorted(info["skipped"]) == sorted([str(truncated), str(garbage)])
    assert Reader(str(out)).num_samples == 11
    with pytest.raises(ValueError, match="on_corrupt"):
        write_beton(train, out, max_resolution=64, on_corrupt="ignore")


def test_bad_folders_raise_value_error_naming_the_path(tiny_imagefolder: Path, tmp_path: Path):
    out = tmp_path / "x.beton"
    with pytest.raises(ValueError, match="not found.*nowhere"):
        write_beton(tmp_path / "nowhere", out, max_resolution=32)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes((tiny_imagefolder / "val" / "ant" / "0.jpg").read_bytes())
    with pytest.raises(ValueError, match="no class folders.*flat"):
        write_beton(tmp_path / "flat", out, max_resolution=32)
    (tiny_imagefolder / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match="without images.*dog"):
        write_beton(tiny_imagefolder / "val", out, max_resolution=32)
    (tmp_path / "broken" / "x").mkdir(parents=True)
    (tmp_path / "broken" / "x" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no decodable images.*broken"):
        write_beton(tmp_path / "broken", out, max_resolution=32, on_corrupt="skip")
    assert not out.exists()


def test_failed_write_leaves_previous_file_and_no_temp(tiny_imagefolder: Path, monkeypatch):
    out = tiny_imagefolder / "val.beton"
    out.write_bytes(b"previous")

    def crash(self, dataset):
        Path(self.fname).write_bytes(b"half a beton")
        raise KeyboardInterrupt

    monkeypatch.setattr(ffcv_io.DatasetWriter, "from_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        write_beton(tiny_imagefolder / "val", out, max_resolution=32)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tiny_imagefolder.iterdir() if p.name.endswith(".tmp")] == []


# ---- keyed draws in numba ------------------------------------------------------------------------------


def test_numba_hash_matches_torch_hash():
    keys = [0, 1, 2**63, 2**64 - 1, 123456789]
    assert [int(ffcv_io.mix64_nb(np.uint64(k))) for k in keys] == [A.mix64_int(k) for k in keys]
    t = A.sample_keys(7, 3, 1, torch.arange(50))
    assert [ffcv_io.uniform_nb(np.uint64(k & (2**64 - 1)), A.HUE) for k in t.tolist()] == \
        A.uniform(t, A.HUE).tolist()


def _reference_crop(height: int, width: int, scale, ratio, key: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params in plain Python, on the hash draws."""
    def u(stream: int) -> float:
        return (A.mix64_int((key + stream) % 2**64) >> 11) * 2.0**-53

    area = height * width
    for attempt in range(10):
        s = A.CROP_STREAM + 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u(s))
        aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u(s + 1))
        w, h = round(np.sqrt(target_area * aspect)), round(np.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u(s + 2) * (height - h + 1)), int(u(s + 3) * (width - w + 1)), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width, scale, distinct", [(40, 48, (0.2, 1.0), 100), (300, 200, (0.08, 1.0), 250),
                                                            (10, 400, (0.9, 1.0), 1)])  # 10 x 400: centre
def test_keyed_crop_equals_reference(height, width, scale, distinct):
    scale, ratio = np.array(scale), np.array([3 / 4, 4 / 3])
    crops = []
    for key in A.sample_keys(0, 0, 0, torch.arange(300)).tolist():
        key %= 2**64
        crop = ffcv_io.keyed_random_crop(height, width, scale, ratio, np.uint64(key))
        assert tuple(crop) == _reference_crop(height, width, scale, ratio, key)
        i, j, h, w = crop
        assert 0 <= i and i + h <= height and 0 <= j and j + w <= width
        crops.append(crop)
    assert len(set(crops)) >= distinct


# ---- loaders ------------------------------------------------------------------------------------------


def test_two_views_are_two_crops_of_the_same_image(tiny_imagefolder: Path, train_beton: Path):
    sources, source_labels = _sources(tiny_imagefolder / "train")
    source_means = np.stack([s.reshape(-1, 3).mean(0) for s in sources])  # [12, 3]
    loader = TwoViewLoader(train_beton, batch_size=4, res=24, aug=NO_COLOUR, num_workers=1, seed=0)
    assert len(loader) == 3
    seen = []
    for x1, x2, y, index in loader:
        assert x1.shape == x2.shape == (4, 3, 24, 24) and x1.dtype == torch.float32 and y.dtype == torch.int64
        ids = _identify(x1, source_means)
        assert (ids == _identify(x2, source_means)).all()
        assert y.tolist() == [source_labels[i] for i in ids]
        assert index.tolist() == ids.tolist()  # each sample's position in the .beton travels with it
        assert not torch.equal(x1, x2)  # different crops / flips
        seen += ids.tolist()
    assert sorted(seen) == list(range(12))  # one epoch = every image once, shuffled


def test_views_have_independent_colour_augmentation(train_beton: Path):
    loader = TwoViewLoader(train_beton, batch_size=12, res=16, aug=A.AugParams(), num_workers=1, seed=0)
    x1, x2, _, _ = next(iter(loader))
    colour1, colour2 = x1.mean(dim=(2, 3)), x2.mean(dim=(2, 3))  # [12, 3]
    assert (colour1 - colour2).abs().max() > 0.3


def test_reproducible_across_workers_epochs_and_resume(train_beton: Path):
    one = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=1, seed=3)
    two = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=2, seed=3)
    e2 = _epoch(one, 2)
    assert len(e2) == 2 * 4  # 12 images, batch 5, drop_last: 2 batches of (x1, x2, labels, indices)
    assert all(torch.equal(a, b) for a, b in zip(e2, _epoch(two, 2), strict=True))  # workers
    assert all(torch.equal(a, b) for a, b in zip(e2, _epoch(one, 2), strict=True))  # iterating again
    e3 = _epoch(two, 3)
    assert not torch.equal(e2[0], e3[0])
    fresh = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(e3, _epoch(fresh, 3), strict=True))  # resume at epoch 3
    other_seed = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=1, seed=4)
    assert not torch.equal(e2[0], _epoch(other_seed, 2)[0])


def test_leaving_an_epoch_early_then_next_epoch(train_beton: Path):
    loader = TwoViewLoader(train_beton, batch_size=4, res=16, aug=A.AugParams(), num_workers=1, seed=0)
    reference = _epoch(loader, 1)
    loader.set_epoch(0)
    next(iter(loader))  # abandoned after one batch
    assert all(torch.equal(a, b) for a, b in zip(reference, _epoch(loader, 1), strict=True))


def test_loaders_leave_the_training_thread_count_alone(train_beton: Path):
    """ffcv sets torch's process-wide thread count to num_workers on creating a Loader and on starting an
    epoch: training on 2 cores would run on one thread with num_workers 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        loader = TwoViewLoader(train_beton, batch_size=4, res=16, aug=A.AugParams(), num_workers=1, seed=0)
        assert torch.get_num_threads() == 3
        for _ in loader:  # (inside the epoch, the loading thread's transform runs on 1 thread for a while)
            pass
        assert torch.get_num_threads() == 3
        EvalLoader(train_beton, batch_size=4, res=16, num_workers=1, train_aug=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_colour_ops_run_on_num_workers_threads_of_one_torch_thread(train_beton: Path, monkeypatch):
    """The batch transform splits each batch over num_workers threads (results equal for any split: see
    test_reproducible_across_workers_epochs_and_resume), each on one torch thread."""
    seen = set()
    call = A.MocoV2Augment.__call__

    def spy(self, images, index, epoch):
        seen.add((threading.current_thread().name.split("_")[0], torch.get_num_threads(), len(index)))
        return call(self, images, index, epoch)

    monkeypatch.setattr(A.MocoV2Augment, "__call__", spy)
    loader = TwoViewLoader(train_beton, batch_size=6, res=16, aug=A.AugParams(), num_workers=2, seed=0)
    for _ in loader:
        pass
    assert seen == {("batch-transform", 1, 3)}  # 12 images, batches of 6 in halves of 3, torch on 1 thread


def test_leaving_with_a_full_prefetch_queue_does_not_hang(train_beton: Path):
    """12 batches of 1; leaving after 9 leaves exactly ffcv's 3 prefetched batches unread, the case in which
    its end-of-epoch marker used to block for ever (fill_queue leaves its epoch early)."""
    loader = TwoViewLoader(train_beton, batch_size=1, res=16, aug=A.AugParams(), num_workers=1, seed=0)
    done = threading.Event()

    def leave_early() -> None:
        for i, _ in enumerate(loader):
            if i == 8:
                break
        done.set()

    threading.Thread(target=leave_early, daemon=True).start()
    assert done.wait(timeout=60), "leaving the epoch with 3 batches unread hung"


def test_single_image_dataset_gets_new_crops_every_epoch(tiny_imagefolder: Path):
    folder = tiny_imagefolder / "one"
    (folder / "ant").mkdir(parents=True)
    (folder / "ant" / "0.jpg").write_bytes((tiny_imagefolder / "train" / "ant" / "0.jpg").read_bytes())
    beton = tiny_imagefolder / "one.beton"
    write_beton(folder, beton, max_resolution=64)
    loader = TwoViewLoader(beton, batch_size=8, res=16, aug=NO_COLOUR, num_workers=1, seed=0, drop_last=False)
    epochs = [_epoch(loader, e) for e in range(4)]
    assert all(len(e) == 4 and e[0].shape[0] == 1 for e in epochs)
    assert all(not torch.equal(epochs[0][0], e[0]) for e in epochs[1:])


def test_distributed_ranks_are_disjoint(tiny_imagefolder: Path, train_beton: Path, monkeypatch):
    sources, _ = _sources(tiny_imagefolder / "train")
    source_means = np.stack([s.reshape(-1, 3).mean(0) for s in sources])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, r=rank: r)
        loader = TwoViewLoader(train_beton, batch_size=3, res=16, aug=NO_COLOUR, num_workers=1, seed=0,
                               distributed=True)
        loader.set_epoch(1)
        ids = [i for x1, *_ in loader for i in _identify(x1, source_means).tolist()]
        assert len(ids) == len(loader) * 3 == 6
        seen.append(set(ids))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(12))


def test_eval_loader_center_crop_in_order_keeps_every_image(tiny_imagefolder: Path, train_beton: Path):
    loader = EvalLoader(train_beton, batch_size=5, res=24, num_workers=1, train_aug=False)
    assert len(loader) == 3  # 5 + 5 + 2: nothing dropped
    x = torch.cat([b[0] for b in loader])
    labels = torch.cat([b[1] for b in loader])
    sources, source_labels = _sources(tiny_imagefolder / "train")
    assert labels.tolist() == source_labels
    c = int(224 / 256 * 40)  # centre square of the shorter side, resized to res
    dh, dw = (40 - c) // 2, (48 - c) // 2
    ref = np.stack([cv2.resize(s[dh:dh + c, dw:dw + c], (24, 24), interpolation=cv2.INTER_AREA) for s in sources])
    assert np.abs(_to_uint8_scale(x).permute(0, 2, 3, 1).numpy() - ref).mean() < 3.0
    assert all(torch.equal(a, b) for a, b in zip(_epoch(loader, 0), _epoch(loader, 5), strict=True))


def test_eval_loader_train_aug(tiny_imagefolder: Path, train_beton: Path):
    one = EvalLoader(train_beton, batch_size=4, res=16, num_workers=1, train_aug=True, seed=1)
    two = EvalLoader(train_beton, batch_size=4, res=16, num_workers=2, train_aug=True, seed=1)
    assert len(one) == 3
    e0 = _epoch(one, 0)
    assert all(torch.equal(a, b) for a, b in zip(e0, _epoch(two, 0), strict=True))
    e1 = _epoch(one, 1)
    assert not torch.equal(e0[0], e1[0])
    labels = torch.cat(e0[1::2])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 and labels.tolist() != sorted(labels.tolist())


def test_error_in_loading_thread_reaches_the_consumer(train_beton: Path, monkeypatch):
    def boom(self, images, index, epoch):
        raise RuntimeError("augmentation failed")

    monkeypatch.setattr(A.MocoV2Augment, "__call__", boom)
    loader = TwoViewLoader(train_beton, batch_size=4, res=16, aug=A.AugParams(), num_workers=1, seed=0)
    with pytest.raises(RuntimeError, match="augmentation failed"):
        next(iter(loader))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
def test_death_of_ffcv_loading_thread_fails_instead_of_hanging(train_beton: Path, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def broken(self, *args):
        raise KeyError("numba could not compile the pipeline")

    monkeypatch.setattr(EpochIterator, "run_pipeline", broken)
    loader = EvalLoader(train_beton, batch_size=4, res=16, num_workers=1, train_aug=False)
    outcome = []

    def consume() -> None:
        try:
            next(iter(loader))
        except RuntimeError as e:
            outcome.append(str(e))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    assert outcome == ["ffcv's loading thread ended before its epoch did (its traceback is above)"]


def test_batches_kept_by_the_caller_stay_valid(train_beton: Path):
    """ffcv reuses its output buffers after batches_ahead + 2 batches; what we yield must not alias them."""
    loader = EvalLoader(train_beton, batch_size=2, res=16, num_workers=1, train_aug=False)
    kept = list(loader)  # 6 batches, more than ffcv's 5 buffer slots
    assert torch.cat([y for _, y in kept]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    copied = [(x.clone(), y.clone()) for x, y in loader]
    assert all(torch.equal(a, b) for k, c in zip(kept, copied, strict=True) for a, b in zip(k, c, strict=True))
    two_view = list(TwoViewLoader(train_beton, batch_size=2, res=16, aug=A.AugParams(), num_workers=1, seed=0))
    assert sorted(torch.cat([b.label for b in two_view]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_more_workers_than_numba_threads_runs_on_numba_threads(train_beton: Path, capsys):
    """A preset's data.num_workers (8, for a cluster node) on a machine with fewer CPUs: the loader uses
    numba's NUMBA_NUM_THREADS and says so, instead of ffcv failing inside its Loader; the batches are the
    same as with that many workers."""
    from numba import config
    many = config.NUMBA_NUM_THREADS + 6
    wide = EvalLoader(train_beton, batch_size=4, res=16, num_workers=many, train_aug=True, seed=1)
    assert f"data.num_workers = {many} but numba may start only {config.NUMBA_NUM_THREADS}" in capsys.readouterr().err
    fits = EvalLoader(train_beton, batch_size=4, res=16, num_workers=config.NUMBA_NUM_THREADS, train_aug=True, seed=1)
    for (x, y), (x2, y2) in zip(wide, fits, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_uint8_mode_plus_colour_augment_equals_the_cpu_loader(train_beton: Path):
    """augment_device not cpu: the loader yields uint8 crops and dataset indices, and colour_augment on them
    (here on the CPU, as the training step would on its GPU) gives the CPU loader's views up to float
    rounding, for any number of workers."""
    cpu = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=1, seed=3)
    deferred = TwoViewLoader(train_beton, batch_size=5, res=16, aug=A.AugParams(), num_workers=2, seed=3,
                             augment_device="cuda")
    assert cpu.colour_on_loader and not deferred.colour_on_loader
    for epoch in (2, 3):
        cpu.set_epoch(epoch)
        deferred.set_epoch(epoch)
        batches = 0
        for (x1, x2, y, _), (v1, v2, y_d, index) in zip(cpu, deferred, strict=True):
            views = torch.stack([v1, v2], 1)  # [5, 2, 16, 16, 3]
            assert views.dtype == torch.uint8 and views.shape == (5, 2, 16, 16, 3)
            assert index.dtype == torch.int64 and index.shape == (5,) and len(set(index.tolist())) == 5
            assert torch.equal(y, y_d)
            d1, d2 = deferred.colour_augment(views, index, epoch, "cpu")
            torch.testing.assert_close(d1, x1, atol=1e-4, rtol=0)
            torch.testing.assert_close(d2, x2, atol=1e-4, rtol=0)
            batches += 1
        assert batches == 2
