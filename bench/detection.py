"""Detectron2 fine-tuning images/s with the paper's ROI batch (512 ROIs per image) against the toy default
(detection.voc.roi_batch_size), and evaluation seconds per image with the paper's test top-k (1000
proposals kept per image) against the toy default (detection.voc.test_topk); the same toy VOC set, image
size, batch and schedule on both sides.

    python -m bench.detection [--max-iter 10] [--train-images 32] [--test-images 8] [--size 128]
        [--roi 512 32] [--topk 1000 100]          (from the repo root; ends with a RESULT {json} line)

Training: pipeline/detection/train.finetune on the toy detection set (pipeline/data/toy_detection.py,
written to a temp dir) from a randomly initialised ResNet-18 converted as the convert stage does;
images/s is finetune's own figure (trials[0]["timing"]: the seconds inside training steps, so evaluation,
precise BN and checkpointing are left out; wall_s has everything). A 2-iteration run first warms the
process up. Evaluation: the toy run's final weights, one model per top-k, detectron2's test loop and VOC
evaluator (DefaultTrainer.test) over the test split, after one untimed pass. At 128 px the RPN has only
8 x 8 x 15 = 960 anchors, so top-k 1000 keeps every proposal that survives NMS: the mean number kept is
printed. Detectron2's log goes to bench/out/detection.log. On a 2-core CPU the ROI-512 side takes ~1 min
per iteration (4 images x 512 ROIs through res5, forward and backward): use --max-iter 3 for a quick check.
"""

import argparse
import contextlib
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer

from bench.common import OUT, result
from pipeline.config import Params
from pipeline.data.toy_detection import make_toy_detection
from pipeline.detection.convert import convert_moco_to_d2, save_d2_weights
from pipeline.detection.datasets import register_voc, voc_classes
from pipeline.detection.train import Trainer, detection_cfg, finetune
from pipeline.models.backbone import resnet

ARCH = "resnet18"


def train(p: Params, weights: Path, out: Path, log, **run) -> dict:
    """finetune() on VOC with detection.voc fields `run` changed; its timing of trial 0."""
    p.detection.voc = replace(p.detection.voc, **run)
    with contextlib.redirect_stdout(log):
        return finetune(p, "voc", weights, out)["trials"][0]["timing"]


def evaluate(p: Params, weights: Path, out: Path, topk: int, device: str, log) -> tuple[float, float, dict]:
    """(seconds, mean proposals kept per image, VOC metrics) of one evaluation of the test split."""
    voc = p.detection.voc
    root = Path(voc.root)
    classes = voc_classes(root, voc.train_splits)
    *train_names, test_name = register_voc(root, [*voc.train_splits, voc.test_split], classes)  # finetune's names
    cfg = detection_cfg(ARCH, "voc", len(classes), replace(voc, test_topk=topk), train=train_names,
                        test=test_name, weights=str(weights), output_dir=out, seed=0,
                        num_workers=p.detection.num_workers, device=device)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    kept = []
    model.proposal_generator.register_forward_hook(lambda m, i, o: kept.extend(len(x) for x in o[0]))
    with contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        metrics = Trainer.test(cfg, model)
        seconds = time.perf_counter() - t0
    return seconds, sum(kept) / max(len(kept), 1), metrics["bbox"]


def main() -> None:
    toy = Params().detection
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-iter", type=int, default=10, help="training iterations per ROI batch")
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--test-images", type=int, default=8)
    parser.add_argument("--classes", type=int, default=toy.toy.classes)
    parser.add_argument("--size", type=int, default=toy.toy.size, help="image side (train and test)")
    parser.add_argument("--roi", type=int, nargs=2, default=[512, toy.voc.roi_batch_size], metavar=("PAPER", "TOY"))
    parser.add_argument("--topk", type=int, nargs=2, default=[1000, toy.voc.test_topk], metavar=("PAPER", "TOY"))
    parser.add_argument("--workers", type=int, default=toy.num_workers, help="detectron2 loader workers")
    args = parser.parse_args()

    OUT.mkdir(exist_ok=True)
    p = Params()
    p.detection.num_workers = args.workers
    p.detection.toy = replace(p.detection.toy, classes=args.classes, train_images=args.train_images,
                              test_images=args.test_images, size=args.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU figures (no GPU lent)"
    print(f"{ARCH} Faster R-CNN C4, {args.train_images} train / {args.test_images} test toy images of "
          f"{args.size} px, {args.classes} classes, batch {p.detection.voc.ims_per_batch}, {args.max_iter} "
          f"iterations per ROI batch; {where}. Detectron2's log: {OUT / 'detection.log'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_detection_") as tmp, open(OUT / "detection.log", "w") as log:
        fvcore = logging.getLogger("fvcore")  # the checkpointer's list of the new head's weights: to the log too
        fvcore.addHandler(logging.StreamHandler(log))
        fvcore.propagate = False
        root = Path(tmp)
        make_toy_detection(root / "toy_det", args.classes, args.train_images, args.test_images, args.size, seed=0)
        p.detection.voc = replace(p.detection.voc, root=str(root / "toy_det/VOCdevkit"), min_size_train=[args.size],
                                  max_size_train=args.size, min_size_test=args.size, max_size_test=args.size,
                                  checkpoint_period=args.max_iter)
        torch.manual_seed(0)
        weights = root / "backbone.pkl"
        save_d2_weights(convert_moco_to_d2(resnet(ARCH).state_dict(), ARCH), weights)

        train(p, weights, root / "warmup", log, max_iter=2, roi_batch_size=args.roi[1])
        timing = {roi: train(p, weights, root / f"roi{roi}", log, max_iter=args.max_iter, roi_batch_size=roi)
                  for roi in args.roi}
        final = root / f"roi{args.roi[1]}/trial0/model_final.pth"
        evaluate(p, final, root / "eval", args.topk[1], device, log)  # warm-up
        evals = {k: evaluate(p, final, root / "eval", k, device, log) for k in args.topk}

    paper, small = args.roi
    speedup = timing[small]["train_images_per_s"] / timing[paper]["train_images_per_s"]
    for roi in args.roi:
        t = timing[roi]
        print(f"train, ROI batch {roi:4d}/image: {t['train_images_per_s']:7.2f} img/s ({t['train_s']:.1f} s in "
              f"steps, {t['wall_s']:.1f} s wall with evaluation)")
    print(f"ratio ROI {small} / ROI {paper}: {speedup:.2f}x images/s")
    per_image = {k: s / args.test_images for k, (s, _, _) in evals.items()}
    for k, (s, kept, bbox) in evals.items():
        print(f"eval, test top-k {k:4d}: {per_image[k]:6.3f} s/image ({s:.1f} s for {args.test_images}), "
              f"{kept:.0f} proposals kept per image, AP50 {bbox['AP50']:.1f}")
    eval_ratio = per_image[args.topk[0]] / per_image[args.topk[1]]
    print(f"ratio top-k {args.topk[0]} / top-k {args.topk[1]}: {eval_ratio:.2f}x seconds per image")
    if device == "cpu":
        print("note: CPU figures (no GPU lent); the ROI head's share of the time is not the same on a GPU")
    result("detection", device=device, train={str(roi): timing[roi] for roi in args.roi},
           train_speedup_toy_over_paper_roi=round(speedup, 3),
           eval_s_per_image={str(k): round(v, 4) for k, v in per_image.items()},
           proposals_kept={str(k): round(e[1], 1) for k, e in evals.items()},
           eval_ratio_paper_over_toy_topk=round(eval_ratio, 3), max_iter=args.max_iter, size=args.size,
           train_images=args.train_images, test_images=args.test_images)


if __name__ == "__main__":
    main()
