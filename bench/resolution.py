"""What `data.max_resolution` (the longest side stored in the .beton) costs and what it loses, for
ImageNet-sized photos (~500x375) read at 224 px: the figures behind the in1k / in100 presets' choice.

For each max_resolution, the same JPEGs go through the project's writer (pipeline.data.ffcv_io.write_beton,
JPEG quality 90) and then through the project's loaders at 224 px:
  - bytes per image in the .beton (the source JPEGs' own size is printed beside it);
  - images/s of EvalLoader with train_aug (decode + RandomResizedCrop(0.08-1) + flip, linear eval's
    training loader), EvalLoader without (decode + 224/256 centre crop: evaluation, kNN, features) and
    TwoViewLoader (decode + two aug+ views: pretraining);
  - how much of each crop is made up by upsampling: the eval centre crop's zoom (224 / its side in stored
    pixels; > 1 means the 224 px crop is interpolated from fewer pixels), and the share of pretraining's
    RandomResizedCrop(0.2-1) boxes and linear eval's (0.08-1) boxes that are upsampled to 224 px,
    computed with the loader's own crop function (ffcv_io.keyed_random_crop) on the stored sizes.
Every ratio is against the smallest max_resolution of the run (256 by default), measured in the same run;
loaders are built and warmed up by one epoch first, then timed epochs go round-robin over the settings so
that other jobs on the machine slow each about equally.

The generated photos are 1/f ("pink") noise in colour, 500x375 landscape and 375x500 portrait (3:1), saved
at JPEG quality 90: natural images have about this spectrum, so JPEG sizes and decode costs are of the
right order; accuracy is not measured here (that needs real ImageNet and GPU days).

    python -m bench.resolution [--images 256] [--max-res 256 320 384 448 512] [--workers 2] [--rounds 3]
    (ends with a RESULT {json} line)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ffcv.reader import Reader
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/resolution.py` from the repo root
from bench.common import result  # noqa: E402
from pipeline.data.augment import AugParams  # noqa: E402
from pipeline.data.ffcv_io import EVAL_CROP_RATIO, RATIO, EvalLoader, TwoViewLoader, keyed_random_crop, write_beton  # noqa: E402

RES = 224
LOADERS = ("rrc", "centre", "two_view")


def pink_noise_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 with a 1/f amplitude spectrum per channel (channels correlated, as in photos)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))  # [H, W//2+1]
    shared = rng.standard_normal((height, width // 2 + 1)) + 1j * rng.standard_normal((height, width // 2 + 1))
    channels = []
    for _ in range(3):
        own = rng.standard_normal(shared.shape) + 1j * rng.standard_normal(shared.shape)
        field = np.fft.irfft2(amplitude * (shared + 0.5 * own), s=(height, width))  # [H, W]
        channels.append((field - field.mean()) / field.std())
    img = np.stack(channels, axis=-1) * 48 + rng.uniform(80, 176, size=3)  # [H, W, 3]
    return img.clip(0, 255).astype(np.uint8)


def make_photos(root: Path, n: int, classes: int = 4) -> int:
    """n JPEGs (quality 90) in `classes` class folders; returns their total bytes."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        h, w = (500, 375) if i % 4 == 3 else (375, 500)
        path = root / f"c{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pink_noise_photo(rng, h, w)).save(path, quality=90)
        total += path.stat().st_size
    return total


def stored(beton: Path) -> tuple[list[tuple[int, int]], int]:
    """([(h, w)] of every stored image, bytes of all stored JPEGs) from the .beton's own tables (the file
    itself is allocated in pages of MiBs, so its size says little for a small set)."""
    reader = Reader(str(beton))
    image = reader.metadata["f0"]  # the first field: image (mode, width, height, data_ptr)
    return [(int(h), int(w)) for h, w in zip(image["height"], image["width"], strict=True)], \
        int(reader.alloc_table["size"].sum())


def upsampled_share(sizes: list[tuple[int, int]], scale: tuple[float, float], draws: int = 20) -> float:
    """Share of RandomResizedCrop boxes (the loader's crop function) whose shorter side is below 224 px."""
    small = total = 0
    key = 0
    for h, w in sizes:
        for _ in range(draws):
            key += 1
            _, _, ch, cw = keyed_random_crop(h, w, np.array(scale), np.array(RATIO), np.uint64(key * 0x9E3779B9))
            small += min(ch, cw) < RES
            total += 1
    return small / total


def timed_epoch(loader, epoch: int) -> tuple[int, float]:
    loader.set_epoch(epoch)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch[-1])
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--max-res", type=int, nargs="+", default=[256, 320, 384, 448, 512])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per loader and setting, after a warm-up")
    args = p.parse_args()
    settings = sorted(args.max_res)
    base = settings[0]

    with tempfile.TemporaryDirectory(prefix="bench_resolution_") as tmp:
        data = Path(tmp) / "images"
        source_bytes = make_photos(data, args.images)
        print(f"{args.images} generated photos (1/f noise, 500x375 and 375x500, JPEG q90): "
              f"{source_bytes / args.images / 1024:.1f} KiB each as source JPEGs; {RES} px crops, batch "
              f"{args.batch_size}, {args.workers} workers, {args.rounds} timed epochs each")
        rows, loaders = {}, {}
        for mr in settings:
            beton = Path(tmp) / f"r{mr}.beton"
            write_beton(data, beton, max_resolution=mr, jpeg_quality=90, num_workers=args.workers)
            sizes, nbytes = stored(beton)
            short = np.array([min(s) for s in sizes])
            rows[mr] = {
                "kib_per_image": nbytes / args.images / 1024,
                "stored_short_side": float(np.median(short)),
                "eval_crop_zoom": float(np.median(RES / (EVAL_CROP_RATIO * short))),  # > 1: upsampled
                "pretrain_crops_upsampled": upsampled_share(sizes, (0.2, 1.0)),
                "lineval_crops_upsampled": upsampled_share(sizes, (0.08, 1.0)),
            }
            loaders[mr] = {
                "rrc": EvalLoader(beton, args.batch_size, RES, args.workers, train_aug=True),
                "centre": EvalLoader(beton, args.batch_size, RES, args.workers, train_aug=False),
                "two_view": TwoViewLoader(beton, args.batch_size, RES, AugParams(), args.workers, seed=0),
            }
            for loader in loaders[mr].values():
                timed_epoch(loader, 0)  # warm-up: numba JIT, page cache
        seconds = {mr: dict.fromkeys(LOADERS, 0.0) for mr in settings}
        counts = {mr: dict.fromkeys(LOADERS, 0) for mr in settings}
        for epoch in range(1, args.rounds + 1):
            for mr in settings:
                for name in LOADERS:
                    n, s = timed_epoch(loaders[mr][name], epoch)
                    seconds[mr][name] += s
                    counts[mr][name] += n
    for mr in settings:
        for name in LOADERS:
            rows[mr][f"{name}_images_per_s"] = counts[mr][name] / seconds[mr][name]

    print(f"\n{'max_res':>7s} {'KiB/img':>8s} {'x' + str(base):>6s} {'short':>6s} {'eval zoom':>9s} "
          f"{'pre up%':>7s} {'lin up%':>7s} | images/s (x{base}): {'rrc':>13s} {'centre':>13s} {'two views':>13s}")
    b = rows[base]
    for mr in settings:
        r = rows[mr]
        rates = "".join(f" {r[f'{n}_images_per_s']:7.0f} ({r[f'{n}_images_per_s'] / b[f'{n}_images_per_s']:.2f})"
                        for n in LOADERS)
        print(f"{mr:7d} {r['kib_per_image']:8.1f} {r['kib_per_image'] / b['kib_per_image']:6.2f} "
              f"{r['stored_short_side']:6.0f} {r['eval_crop_zoom']:9.2f} {100 * r['pretrain_crops_upsampled']:7.1f} "
              f"{100 * r['lineval_crops_upsampled']:7.1f} |                    {rates}")
    print("short: median stored shorter side (px); eval zoom: 224 / centre-crop side in stored px (>1 = upsampled);"
          " pre/lin up%: RandomResizedCrop boxes (scale 0.2-1 / 0.08-1) with a side under 224 stored px")
    result("resolution", images=args.images, source_kib_per_image=round(source_bytes / args.images / 1024, 2),
           baseline_max_res=base, rows={str(mr): {k: round(v, 4) for k, v in r.items()} for mr, r in rows.items()},
           ratios_vs_baseline={str(mr): {"bytes": round(r["kib_per_image"] / b["kib_per_image"], 3),
                                         **{n: round(r[f"{n}_images_per_s"] / b[f"{n}_images_per_s"], 3)
                                            for n in LOADERS}} for mr, r in rows.items()},
           batch_size=args.batch_size, workers=args.workers, rounds=args.rounds)


if __name__ == "__main__":
    main()
