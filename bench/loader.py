"""Throughput of TwoViewLoader (FFCV + batched torch aug+) vs torchvision ImageFolder + DataLoader with the
same MoCo v2 aug+, the same JPEGs, resolution and number of workers.

Both loaders are warmed up by one full epoch, then timed epochs alternate between them (fair when other
jobs share the CPU); an epoch is timed until both augmented views of every batch exist.

Peak memory: each loader then runs alone in a fresh process (spawned, so neither inherits the other's
memory): build, one warm-up epoch, one epoch, while this process samples the RSS summed over that
process and its workers every 10 ms. Reported: the high-water mark over the whole run (numba's JIT of the
ffcv pipeline included) and over the epoch after the warm-up, and the tree's PSS at the end of that
epoch (RSS sums count the pages forked DataLoader workers share with their parent once per worker).

    python -m bench.loader [--data DIR | --image-size 96] [--res 64] [--batch-size 128] [--workers 2] [--epochs 3]
    (or python bench/loader.py; ends with a RESULT {json} line)
"""

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/loader.py` from the repo root
from bench.common import TreeRSS, result  # noqa: E402
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugParams, blur_kernel_size  # noqa: E402
from pipeline.data.ffcv_io import TwoViewLoader, write_beton  # noqa: E402


def make_image_folder(root: Path, classes: int = 10, per_class: int = 100, size: int = 96) -> Path:
    """Smooth random colour fields plus noise, saved as JPEG: cheap, and not trivially compressible."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size),
                                                                                             Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"class{c:02d}/{i:04d}.jpg",
                                                                       quality=90)
    return root


class TwoCrops:
    """MoCo's TwoCropsTransform."""

    def __init__(self, transform: T.Compose):
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


def aug_plus_steps(res: int, aug: AugParams) -> dict[str, Callable]:
    """MoCo v2's aug+ in torchvision (main_moco.py), step by step, named."""
    return {
        "crop + resize": T.RandomResizedCrop(res, scale=aug.crop_scale),
        "colour jitter": T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.p_jitter),
        "grayscale": T.RandomGrayscale(p=aug.p_gray),
        "blur": T.RandomApply([T.GaussianBlur(blur_kernel_size(res), sigma=aug.blur_sigma)], p=aug.p_blur),
        "flip": T.RandomHorizontalFlip(p=aug.p_flip),
        "to tensor": T.ToTensor(),
        "normalize": T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    }


def torchvision_loader(data: Path, res: int, batch_size: int, workers: int, aug: AugParams
                       ) -> torch.utils.data.DataLoader:
    transform = T.Compose(list(aug_plus_steps(res, aug).values()))
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(data), TwoCrops(transform)), batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def timed_epoch(loader, epoch: int) -> tuple[int, float]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    n, t0 = 0, time.perf_counter()
    for batch in loader:  # ffcv: (x1, x2, labels); torchvision: ((x1, x2), labels)
        n += len(batch[-1])
    return n, time.perf_counter() - t0


def build(name: str, data: Path, beton: Path, res: int, batch_size: int, workers: int, aug: AugParams):
    """The loader `name` ("ffcv" or "torchvision"), the same way for the timing and the memory probes."""
    if name == "ffcv":
        return TwoViewLoader(beton, batch_size, res, aug, workers, seed=0)
    return torchvision_loader(data, res, batch_size, workers, aug)


def memory_probe(name: str, data: Path, beton: Path, res: int, batch_size: int, workers: int, conn) -> None:
    """Runs in its own process: one loader built, warmed up, and run for an epoch, telling the parent
    (which samples this process tree) when each step ends."""
    mp.set_start_method("fork", force=True)  # a spawned process defaults to spawn: fork workers, as above
    conn.send("imported")
    loader = build(name, data, beton, res, batch_size, workers, AugParams())
    timed_epoch(loader, 0)
    conn.send("warm")
    timed_epoch(loader, 1)
    conn.send("done")
    conn.recv()  # the parent has read the PSS: the workers may go


def peak_memory(name: str, data: Path, beton: Path, args: argparse.Namespace) -> dict:
    """Peak RSS (MiB) of `name`'s loader process tree: imports only, whole run, steady epoch; PSS at the end."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=memory_probe, args=(name, data, beton, args.res, args.batch_size, args.workers,
                                                  there))
    proc.start()
    with TreeRSS(proc.pid) as rss:
        rss.phase = "imports"
        for phase in ("warm-up", "epoch", "end"):  # what the probe does until its next message
            here.recv()
            rss.phase = phase
        pss = rss.pss_mib()
    here.send("exit")
    proc.join()
    peak = rss.peak_mib
    return {"baseline_rss_mib": round(peak["imports"]), "peak_rss_mib": round(max(peak["warm-up"], peak["epoch"])),
            "epoch_peak_rss_mib": round(peak["epoch"]), "end_pss_mib": round(pss)}


def image_options(p: argparse.ArgumentParser) -> None:
    """The options on the images and views, shared with bench.loader_parts."""
    p.add_argument("--data", type=Path, help="ImageFolder dir (default: ~1000 generated JPEGs)")
    p.add_argument("--image-size", type=int, default=96, help="side of the generated JPEGs (without --data)")
    p.add_argument("--res", type=int, default=64, help="side of the augmented views")
    p.add_argument("--batch-size", type=int, default=128)


def images_and_beton(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, dict]:
    """The ImageFolder (--data, else generated under tmp), its .beton in tmp with the images stored as they
    are, and write_beton's summary."""
    data = args.data or make_image_folder(tmp / "images", size=args.image_size)
    beton = tmp / "train.beton"
    return data, beton, write_beton(data, beton, max_resolution=65535, num_workers=args.workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    image_options(p)
    p.add_argument("--workers", type=int, default=2, help="ffcv threads = DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader, after one warm-up epoch")
    args = p.parse_args()
    aug = AugParams()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data, beton, info = images_and_beton(args, Path(tmp))
        print(f"{info['images']} images from {data}, res {args.res}, batch {args.batch_size}, "
              f"{args.workers} workers, {args.epochs} timed epochs each")

        tv = build("torchvision", data, beton, args.res, args.batch_size, args.workers, aug)
        timed_epoch(tv, 0)  # warm-up: worker start (fork before numba starts its threads), page cache
        ffcv = build("ffcv", data, beton, args.res, args.batch_size, args.workers, aug)
        timed_epoch(ffcv, 0)  # warm-up: numba JIT, page cache
        totals = {"ffcv": [0, 0.0], "torchvision": [0, 0.0]}
        for epoch in range(1, args.epochs + 1):
            for name, loader in (("ffcv", ffcv), ("torchvision", tv)):
                n, s = timed_epoch(loader, epoch)
                totals[name][0] += n
                totals[name][1] += s
                print(f"  epoch {epoch} {name:12s} {n / s:8.0f} images/s")

        del tv, ffcv  # the DataLoader's workers exit before the memory probes run
        memory = {name: peak_memory(name, data, beton, args) for name in ("ffcv", "torchvision")}

    rate = {name: n / s for name, (n, s) in totals.items()}
    print(f"TwoViewLoader (ffcv)        {rate['ffcv']:8.0f} images/s (2 views each)")
    print(f"torchvision DataLoader      {rate['torchvision']:8.0f} images/s (2 views each)")
    print(f"ratio                       {rate['ffcv'] / rate['torchvision']:8.2f}x")
    print("memory, MiB, the loader's process + its workers, each loader alone in a fresh process "
          "(imports alone: baseline):")
    print(f"  {'loader':12s} {'baseline RSS':>12s} {'peak RSS':>9s} {'epoch peak RSS':>15s} {'PSS at end':>11s}")
    for name, m in memory.items():
        print(f"  {name:12s} {m['baseline_rss_mib']:12d} {m['peak_rss_mib']:9d} {m['epoch_peak_rss_mib']:15d} "
              f"{m['end_pss_mib']:11d}")
    peak_ratio = memory["ffcv"]["peak_rss_mib"] / memory["torchvision"]["peak_rss_mib"]
    pss_ratio = memory["ffcv"]["end_pss_mib"] / memory["torchvision"]["end_pss_mib"]
    print(f"memory ratio ffcv / torchvision: peak RSS {peak_ratio:.2f}x, PSS at end {pss_ratio:.2f}x")
    result("loader", images_per_s={k: round(v, 1) for k, v in rate.items()},
           ratio=round(rate["ffcv"] / rate["torchvision"], 3), memory=memory, peak_rss_ratio=round(peak_ratio, 3),
           pss_ratio=round(pss_ratio, 3), res=args.res, batch_size=args.batch_size, workers=args.workers,
           epochs=args.epochs)


if __name__ == "__main__":
    main()
