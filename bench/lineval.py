"""Wall time of linear evaluation with the backbone's features computed once (lineval.augment false, the
toy default) against the reference protocol that runs the frozen backbone over augmented crops every
epoch (lineval.augment true, MoCo's main_lincls.py); the same epochs, data, batch size and resolution.

    python -m bench.lineval [--epochs 5] [--images 512] [--res 64] [--batch-size 256] [--workers 2]
        [--checkpoint models/pretrain/checkpoint.pt]     (from the repo root; ends with a RESULT {json} line)

Both sides are pipeline/train/evaluate.linear_eval itself, with only lineval.augment changed: every
cost it has is on both sides (loaders, val features, per-epoch validation, the frozen-backbone check).
Each side is first run once for one epoch (warm-up: numba's JIT of the loaders, first-call costs), then
both are timed, the cheap side first, each to the end of linear_eval. The backbone is randomly
initialised unless --checkpoint is given (the time does not depend on the weights; the accuracy does).
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import result, toy_betons, where
from pipeline.config import LinevalParams
from pipeline.models.backbone import load_backbone, resnet
from pipeline.train.evaluate import linear_eval

CLASSES = 8


def timed(backbone, arch: str, betons: dict, lp: LinevalParams, workers: int, live_dir: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    metrics = linear_eval(backbone, arch, betons["train"], betons["val"], CLASSES, lp, workers, live_dir,
                          torch.device("cpu"))
    return time.perf_counter() - t0, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="classifier epochs (toy default 30)")
    parser.add_argument("--images", type=int, default=512, help="toy training images (8 classes; val: 1/4 of it)")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=LinevalParams().batch_size)
    parser.add_argument("--workers", type=int, default=2, help="ffcv loader threads")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--checkpoint", type=Path, help="a pretrain checkpoint (default: random init)")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = load_backbone(args.checkpoint, args.arch) if args.checkpoint else resnet(args.arch)
    lp = LinevalParams(epochs=args.epochs, batch_size=args.batch_size, res=args.res)
    with tempfile.TemporaryDirectory(prefix="bench_lineval_") as tmp:
        betons = toy_betons(Path(tmp), CLASSES, args.images // CLASSES, args.images // CLASSES // 4, args.res,
                            args.workers)
        print(f"{args.arch} ({'random init' if args.checkpoint is None else args.checkpoint}) at {args.res} px, "
              f"{args.images} train / {args.images // 4} val toy images, batch {args.batch_size}, "
              f"{args.epochs} epochs, {args.workers} loader threads, torch {torch.get_num_threads()} threads, "
              f"on {where(torch.device('cpu'))}")
        for augment in (False, True):
            timed(backbone, args.arch, betons, replace(lp, epochs=1, augment=augment), args.workers,
                  Path(tmp) / "warmup")
        once, m_once = timed(backbone, args.arch, betons, replace(lp, augment=False), args.workers, Path(tmp) / "a")
        each, m_each = timed(backbone, args.arch, betons, replace(lp, augment=True), args.workers, Path(tmp) / "b")

    print(f"features once (augment false)          {once:7.1f} s   top-1 {m_once['top1']:.2f}")
    print(f"backbone every epoch (augment true)    {each:7.1f} s   top-1 {m_each['top1']:.2f}")
    print(f"saving ratio (every epoch / once)      {each / once:7.2f}x")
    result("lineval", seconds_features_once=round(once, 2), seconds_backbone_every_epoch=round(each, 2),
           ratio=round(each / once, 3), epochs=args.epochs, images=args.images, res=args.res,
           batch_size=args.batch_size, arch=args.arch, top1_once=m_once["top1"], top1_every_epoch=m_each["top1"])


if __name__ == "__main__":
    main()
