"""Where a two-view loader's time goes: milliseconds per image of each part of MoCo v2 aug+ (decode, crop +
resize, each colour op, collation), in the FFCV loader's code and in torchvision's, on one thread, over the
same JPEGs; then what the parts cost inside the real TwoViewLoader with its threads.

    python -m bench.loader_parts [--data DIR | --image-size 96] [--res 64] [--batch-size 128] [--workers 2]
    (from the repo root; ends with a RESULT {json} line)

Parts, one thread, each timed over every image in CPU time of that thread (after one untimed pass of the
same work; ffcv's parts: the least of 3 passes):
- ffcv: decode = libjpeg-turbo on the JPEG bytes stored in the .beton (ffcv's imdecode), once per image
  for both views as the loader's decoder does; crop + resize = the keyed RandomResizedCrop draw and
  OpenCV's resize (ffcv's resize_crop) for each view; both in compiled numba loops. Colour ops =
  MocoV2Augment's CPU path on batches of --batch-size crops: the keyed draws (torch), then one numba
  function per batch and view (pipeline/data/colour_cpu.py); each op's row is that function run with the
  drawn flags of that op only, less the run with none (to float + normalize); "other" is the whole
  MocoV2Augment less the rows. Collation: none, the decoder writes into the batch array.
- torchvision: decode = ImageFolder's PIL loader, then each aug+ transform of bench/loader.py on PIL images
  / tensors as in main_moco.py, for each view; collation = DataLoader's default_collate of --batch-size
  samples.
In the loader, a batch is decoded (numba, --workers threads) and then colour-augmented (the batch split over
--workers Python threads, each running the numba function without the GIL), one after the other: the last
line times the loader with and without the colour ops (without: to float + normalize in torch, the
baseline since the first version of this bench) to show that split with the threads in play.
"""

import argparse
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import replace
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


def per_image_ms(fn, n: int, repeats: int = 3) -> float:
    """CPU ms per image of fn() over n images on this thread (the least of `repeats` runs, after one untimed
    call: numba compiles, caches warm). CPU time, not wall time: on 2 cores shared with other jobs a
    preempted thread would otherwise be charged for the time it waited."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3 / n


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
    transforms = [MocoV2Augment(aug, seed=0, view=v) for v in (0, 1)]
    k = augment.blur_kernel_size(res)
    starts = range(0, n - batch_size + 1, batch_size)
    images = len(starts) * batch_size
    draws = [[transforms[v].draws(torch.arange(s, s + batch_size), epoch=0) for v in (0, 1)] for s in starts]
    off = torch.zeros(batch_size, dtype=torch.bool)

    def kernel_ms(**only) -> float:
        """ms per image of MocoV2Augment's CPU kernel (both views) with the drawn flags, those not in `only`
        (names of AugDraws flags) switched off: the cost of the ops kept, plus to float + normalize."""
        kept = [[replace(d, **{f: d.__dict__[f] if f in only else off for f in ("jitter", "gray", "blur", "flip")})
                 for d in pair] for pair in draws]

        def run() -> None:
            for start, pair in zip(starts, kept, strict=True):
                for v in (0, 1):
                    augment.apply_cpu(views[v][start: start + batch_size], pair[v], k)
        return per_image_ms(run, images)

    def draws_ms() -> float:
        def run() -> None:
            for start in starts:
                for v in (0, 1):
                    d = transforms[v].draws(torch.arange(start, start + batch_size), epoch=0)
                    augment.gaussian_kernel1d(d.sigma, k)
        return per_image_ms(run, images)

    base = kernel_ms()
    parts["random draws"] = draws_ms()
    parts["to float + normalize"] = base
    for label, flag in (("colour jitter", "jitter"), ("grayscale", "gray"), ("blur", "blur"), ("flip", "flip")):
        parts[label] = kernel_ms(**{flag: True}) - base
    whole = per_image_ms(lambda: [transforms[v](views[v][s: s + batch_size], torch.arange(s, s + batch_size), 0)
                                  for s in starts for v in (0, 1)], images)
    parts["other"] = whole - sum(parts[r] for r in ("random draws", "to float + normalize", "colour jitter",
                                                      "grayscale", "blur", "flip"))
    parts["collate"] = 0.0
    return parts


def torchvision_parts(data: Path, res: int, batch_size: int, aug: AugParams) -> dict[str, float]:
    samples = ImageFolder(str(data)).samples
    steps = aug_plus_steps(res, aug)
    seconds = defaultdict(float)

    def one_pass(timed: bool) -> list:
        out = []
        for path, label in samples:
            t0 = time.thread_time()
            image = pil_loader(path)
            t1 = time.thread_time()
            seconds["decode"] += (t1 - t0) * timed
            views = []
            for _ in range(2):
                x = image
                for name, step in steps.items():
                    t0 = time.thread_time()
                    x = step(x)
                    seconds[name] += (time.thread_time() - t0) * timed
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
