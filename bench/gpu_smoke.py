"""A GPU smoke test at paper shapes, for a user's cluster: does the training path run on the device, how fast,
and do bf16 + channels_last agree with fp32? At most ~4 minutes on one GPU; synthetic tensors, plain torch
(no ffcv, dvc or detectron2 needed: a section whose package is missing is skipped with a line saying so).

    python -m bench.gpu_smoke                  # on a GPU node, from the repo root (e.g. srun --gpus=1 ...)
    python -m bench.gpu_smoke --device cpu --tiny   # the same code at toy shapes (what the test suite runs)

Sections (one table at the end, then RESULT {json}):
- pretrain: pipeline/train/step.train_step itself, ResNet-50 at 224 px with the in1k preset's shapes (batch 32
  per GPU as 8 x 32 = 256, K 65536, m 0.999, T 0.2, MLP head, plain BN as under DDP), MoCo v2 and MoCHi
  (1024, 1024, 512) from the first step (hard_start_epoch 1); fp32 vs bf16 autocast + channels_last from the
  same weights, queue and batches: images/s, peak memory, and the first step's loss in both (they should
  agree to ~1e-2 relative: the similarities and loss are fp32 in both, only the encoders differ).
- features: linear-eval / kNN feature extraction (frozen ResNet-50, eval mode, batch 256, 224 px) in
  images/s, and the chunked kNN search of pipeline/train/evaluate.knn_predict on 100k x 2048 train
  features against 10k queries (k 200, 1000 classes) in queries/s.
- detection (if detectron2 imports): one training iteration of the Faster R-CNN R50-C4 of
  pipeline/detection/c4.py at 800 px (one 800 x 1067 image, 512 ROIs per image, 3 boxes), seconds and peak
  memory.
"""

import argparse
import importlib.util
import json
import time
from dataclasses import replace

import torch

from pipeline.config import Params
from pipeline.data.batch import TwoViewBatch
from pipeline.models.backbone import resnet
from pipeline.train.knn import knn_predict
from pipeline.train.step import StepSetup, build_model, forward_loss, new_state, train_step

ROWS: list[dict] = []


def row(section: str, setting: str, figure: str, **values) -> None:
    ROWS.append({"section": section, "setting": setting, "figure": figure, **values})
    print(f"{section:10s} {setting:40s} {figure}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def peak(device: torch.device) -> str:
    return f", peak {peak_gb(device)} GB" if device.type == "cuda" else ""


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def batches(n: int, batch_size: int, res: int, classes: int, pin: bool) -> list[TwoViewBatch]:
    """Synthetic loader batches: normalised-image-like CPU tensors, pinned as the real loader's are on a GPU."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        views = [torch.randn(batch_size, 3, res, res, generator=g) for _ in range(2)]  # [B, 3, res, res] x2
        if pin:
            views = [v.pin_memory() for v in views]
        out.append(TwoViewBatch(*views, torch.randint(0, classes, (batch_size,), generator=g),
                                torch.arange(i * batch_size, (i + 1) * batch_size)))
    return out


def pretrain_section(p: Params, device: torch.device, steps: int) -> None:
    data = batches(steps + 1, p.pretrain.batch_size, p.pretrain.res, 1000, device.type == "cuda")
    for method in ("moco", "mochi"):
        p.pretrain.method = method
        torch.manual_seed(0)
        init = build_model(p).state_dict()
        first_loss = {}
        for name, bf16, fmt in (("fp32", False, torch.contiguous_format), ("bf16+channels_last", True,
                                                                             torch.channels_last)):
            model = build_model(p)
            model.load_state_dict(init)
            setup = StepSetup(device, bf16, fmt)
            state = new_state(p, model, setup)
            state.model.train()
            with torch.no_grad():
                first_loss[name] = forward_loss(state, data[0], setup, p.pretrain)[0].item()
            reset_peak(device)
            train_step(state, data[0], setup, p.pretrain)  # warm-up (cuDNN autotuning, allocator)
            sync(device)
            t0 = time.perf_counter()
            for batch in data[1:]:
                train_step(state, batch, setup, p.pretrain)
            sync(device)
            rate = p.pretrain.batch_size * steps / (time.perf_counter() - t0)
            row("pretrain", f"{method} {name}", f"{rate:.1f} img/s{peak(device)}, "
                f"first loss {first_loss[name]:.4f}", images_per_s=round(rate, 1), peak_gb=peak_gb(device),
                first_loss=first_loss[name])
            del state, model
        rel = abs(first_loss["bf16+channels_last"] - first_loss["fp32"]) / abs(first_loss["fp32"])
        row("pretrain", f"{method} loss bf16 vs fp32", f"relative difference {rel:.2e}", relative_difference=rel)


def features_section(arch: str, res: int, batch_size: int, n_batches: int, knn_shape: tuple[int, int, int, int],
                     device: torch.device) -> None:
    backbone = resnet(arch).to(device).eval()
    x = torch.randn(batch_size, 3, res, res)  # [B, 3, res, res]
    x = x.pin_memory() if device.type == "cuda" else x
    with torch.no_grad():
        backbone(x.to(device))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            f = backbone(x.to(device, non_blocking=True)).float()  # [B, C]
        sync(device)
    rate = batch_size * n_batches / (time.perf_counter() - t0)
    row("features", f"{arch} {res} px eval, batch {batch_size}", f"{rate:.1f} img/s", images_per_s=round(rate, 1),
        dim=f.shape[1])
    n_train, n_test, dim, classes = knn_shape
    train_f = torch.randn(n_train, dim, device=device)  # [N, C]
    train_y = torch.randint(0, classes, (n_train,), device=device)  # [N]
    test_f = torch.randn(n_test, dim, device=device)  # [n, C]
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    knn_predict(train_f, train_y, test_f, classes, k=200, T=0.07)
    sync(device)
    rate = n_test / (time.perf_counter() - t0)
    row("features", f"kNN {n_train} x {dim} train, {n_test} queries",
        f"{rate:.1f} queries/s{peak(device)}", queries_per_s=round(rate, 1), peak_gb=peak_gb(device))


def detection_section(arch: str, size: tuple[int, int], rois: int, device: torch.device) -> None:
    if importlib.util.find_spec("detectron2") is None:
        row("detection", "skipped", "detectron2 is not installed here")
        return
    from detectron2.modeling import build_model as build_detector
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from pipeline.detection.c4 import build_c4_cfg

    cfg = build_c4_cfg(arch, "voc", num_classes=20, max_iter=1, roi_batch_size=rois, device=device.type,
                    min_size_train=(size[0],), min_size_test=size[0], precise_bn_iters=0)
    model = build_detector(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    h, w = size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)  # [3, H, W] as detectron2's mapper gives it
    gt = Instances((h, w), gt_boxes=Boxes(torch.tensor([[10.0, 20, 200, 300], [300, 100, 600, 500],
                                                         [50, 400, 250, 700]]).clamp(max=min(h, w) - 1)),
                   gt_classes=torch.tensor([1, 5, 7]))
    inputs = [{"image": image, "instances": gt, "height": h, "width": w}]
    for i in range(2):  # the second iteration is timed
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        with EventStorage(i):  # detectron2's losses log into it
            losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        sync(device)
        seconds = time.perf_counter() - t0
    row("detection", f"{arch}-C4 {h}x{w}, {rois} ROIs, 1 image", f"{seconds:.3f} s/iter{peak(device)}, "
        f"loss {float(total):.3f}", seconds=round(seconds, 3), peak_gb=peak_gb(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy shapes (ResNet-18, 32 px, K 256): a CPU dry run")
    parser.add_argument("--steps", type=int, default=10, help="timed pretraining steps per row")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible here (run it on a GPU node, or --device cpu --tiny)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    p = Params()
    if args.tiny:
        p.model.arch, det_size, rois, knn_shape, feat = "resnet18", (160, 213), 32, (2000, 200, 512, 10), (32, 32, 2)
        p.pretrain = replace(p.pretrain, res=32, batch_size=16, queue_size=256, bn_splits=1)
        p.pretrain.mochi = replace(p.pretrain.mochi, n_hard=64, s=64, s_prime=32)
    else:
        p.model.arch, det_size, rois, knn_shape, feat = "resnet50", (800, 1067), 512, (100_000, 10_000, 2048, 1000), (
            224, 256, 8)
        p.pretrain = replace(p.pretrain, res=224, batch_size=32, queue_size=65536, key_momentum=0.999, bn_splits=1)
        p.pretrain.mochi = replace(p.pretrain.mochi, n_hard=1024, s=1024, s_prime=512)
    p.pretrain = replace(p.pretrain, hard_start_epoch=1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_smoke on {where}, torch {torch.__version__}; {p.model.arch}, pretrain {p.pretrain.res} px batch "
          f"{p.pretrain.batch_size} K {p.pretrain.queue_size}", flush=True)
    t0 = time.perf_counter()
    pretrain_section(p, device, args.steps)
    features_section(p.model.arch, feat[0], feat[1], feat[2], knn_shape, device)
    detection_section(p.model.arch, det_size, rois, device)
    print("\n| section | setting | figure |\n|---|---|---|")
    for r in ROWS:
        print(f"| {r['section']} | {r['setting']} | {r['figure']} |")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print("RESULT " + json.dumps({"bench": "gpu_smoke", "device": where, "tiny": args.tiny, "rows": ROWS}))


if __name__ == "__main__":
    main()
