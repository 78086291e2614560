"""The ffcv_convert stage's cost (every image decoded once to find corrupt files, then ffcv's writer) against
ffcv's plain writer alone, on the same ImageNet-sized JPEGs (500x375 and 375x500, as most of ImageNet),
the same fields (JPEG at data.max_resolution, the in1k preset's 256) and the same number of workers.

    python -m bench.convert [--images 600] [--max-resolution 256] [--workers 2] [--rounds 2]
    (from the repo root; ends with a RESULT {json} line)

The plain writer is `DatasetWriter(...).from_indexed_dataset` over the same (RGB array, label) dataset
write_beton hands it, without the check; the stage is pipeline.data.ffcv_io.write_beton (listing, check,
write, atomic rename). One untimed round of each warms the page cache, then the two alternate for
--rounds rounds (fair when other jobs share the CPU); reported: images/s of each over all rounds and the
ratio of their total times (the issue's bound: 1.3x).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image

from bench.common import result
from pipeline.data.ffcv_io import _ImageList, _list_image_folder, write_beton


def make_photos(root: Path, images: int, classes: int = 10) -> Path:
    """Smooth random colour fields with texture and noise, 500x375 or 375x500, JPEG quality 90: about the
    bytes per pixel of an ImageNet photo, and not trivially compressible."""
    rng = np.random.default_rng(0)
    for i in range(images):
        w, h = (500, 375) if i % 4 else (375, 500)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        texture = 30 * np.sin(xx / rng.uniform(3, 12)) * np.cos(yy / rng.uniform(3, 12))
        noise = rng.normal(0, 10, (h, w, 3))
        image = np.clip(base + texture[..., None] + noise, 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def plain_writer(data: Path, out: Path, max_resolution: int, workers: int) -> int:
    """ffcv's writer alone, over the dataset write_beton gives it (same fields and quality)."""
    _, samples = _list_image_folder(data)
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=90),
              "label": IntField()}
    DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(_ImageList(samples))
    return len(samples)


def stage(data: Path, out: Path, max_resolution: int, workers: int) -> int:
    return write_beton(data, out, max_resolution, jpeg_quality=90, on_corrupt="fail", num_workers=workers)["images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--max-resolution", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        data = make_photos(Path(tmp) / "images", args.images)
        runs = {"plain writer": plain_writer, "ffcv_convert (check + write)": stage}
        totals = {name: [0, 0.0] for name in runs}
        for fn in runs.values():  # warm-up: page cache, first-use costs
            fn(data, Path(tmp) / "warm.beton", args.max_resolution, args.workers)
        for r in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                n = fn(data, Path(tmp) / f"{r}.beton", args.max_resolution, args.workers)
                s = time.perf_counter() - t0
                totals[name][0] += n
                totals[name][1] += s
                print(f"  round {r + 1} {name:30s} {n / s:7.1f} images/s")
    rate = {name: n / s for name, (n, s) in totals.items()}
    ratio = totals["ffcv_convert (check + write)"][1] / totals["plain writer"][1]
    for name, v in rate.items():
        print(f"{name:32s} {v:7.1f} images/s")
    print(f"ffcv_convert / plain writer time: {ratio:.2f}x ({args.images} JPEGs of 500x375, max_resolution "
          f"{args.max_resolution}, {args.workers} workers)")
    result("convert", images_per_s={k: round(v, 1) for k, v in rate.items()}, time_ratio=round(ratio, 3),
           images=args.images, max_resolution=args.max_resolution, workers=args.workers, rounds=args.rounds)


if __name__ == "__main__":
    main()
