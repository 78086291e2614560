"""Throughput of TwoViewLoader (FFCV + batched torch aug+) vs torchvision ImageFolder + DataLoader with the
same MoCo v2 aug+, the same JPEGs, resolution and number of workers.

Both loaders are warmed up by one full epoch, then timed epochs alternate between them (fair when other
jobs share the CPU); an epoch is timed until both augmented views of every batch exist.

    python bench/loader.py [--data DIR] [--res 64] [--batch-size 128] [--workers 2] [--epochs 3]
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/loader.py` from the repo root
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


def torchvision_loader(data: Path, res: int, batch_size: int, workers: int, aug: AugParams
                       ) -> torch.utils.data.DataLoader:
    k = blur_kernel_size(res)
    transform = T.Compose([
        T.RandomResizedCrop(res, scale=aug.crop_scale),
        T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.p_jitter),
        T.RandomGrayscale(p=aug.p_gray),
        T.RandomApply([T.GaussianBlur(k, sigma=aug.blur_sigma)], p=aug.p_blur),
        T.RandomHorizontalFlip(p=aug.p_flip),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="ImageFolder dir (default: ~1000 generated 96x96 JPEGs)")
    p.add_argument("--res", type=int, default=64, help="side of the augmented views")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="ffcv threads = DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader, after one warm-up epoch")
    args = p.parse_args()
    aug = AugParams()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data = args.data or make_image_folder(Path(tmp) / "images")
        beton = Path(tmp) / "train.beton"
        info = write_beton(data, beton, max_resolution=65535, num_workers=args.workers)  # stored as is
        print(f"{info['images']} images from {data}, res {args.res}, batch {args.batch_size}, "
              f"{args.workers} workers, {args.epochs} timed epochs each")

        tv = torchvision_loader(data, args.res, args.batch_size, args.workers, aug)
        timed_epoch(tv, 0)  # warm-up: worker start (fork before numba starts its threads), page cache
        ffcv = TwoViewLoader(beton, args.batch_size, args.res, aug, args.workers, seed=0)
        timed_epoch(ffcv, 0)  # warm-up: numba JIT, page cache
        totals = {"ffcv": [0, 0.0], "torchvision": [0, 0.0]}
        for epoch in range(1, args.epochs + 1):
            for name, loader in (("ffcv", ffcv), ("torchvision", tv)):
                n, s = timed_epoch(loader, epoch)
                totals[name][0] += n
                totals[name][1] += s
                print(f"  epoch {epoch} {name:12s} {n / s:8.0f} images/s")

        workers_uss = [c.memory_full_info().uss / 2**20 for c in psutil.Process().children()
                       if "resource_tracker" not in " ".join(c.cmdline())]  # private memory of the workers

    rate = {name: n / s for name, (n, s) in totals.items()}
    print(f"TwoViewLoader (ffcv)        {rate['ffcv']:8.0f} images/s (2 views each)")
    print(f"torchvision DataLoader      {rate['torchvision']:8.0f} images/s (2 views each)")
    print(f"ratio                       {rate['ffcv'] / rate['torchvision']:8.2f}x")
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"memory: main process peak RSS {main_rss:.0f} MiB (torch, the ffcv loader, the DataLoader's consumer); "
          f"DataLoader workers {' + '.join(f'{m:.0f}' for m in workers_uss)} MiB private (USS)")


if __name__ == "__main__":
    main()
