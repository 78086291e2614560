"""Semi-supervised evaluation: fine-tune the whole backbone plus a new linear classifier on a labelled subset.

The protocol of SynCo's main_semisup.py (itself Barlow Twins' evaluate.py with --weights finetune): fc ~ N(0,
0.01) with zero bias, SGD with momentum over two parameter groups (backbone and classifier, each with its own
absolute lr), cosine annealing stepped once per epoch, RandomResizedCrop + flip for training, BN in train mode;
val top-1/top-5 on centre crops after the last epoch. Each (fraction, trial) fine-tunes the pretrained backbone
and the random-init control on the same subset and batch order, and a finished run is recorded at once, so an
interrupted stage resumes at the first run not done.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.checkpoint import atomic_write
from pipeline.config import SemisupParams
from pipeline.data.ffcv_io import EvalLoader
from pipeline.models.backbone import FEATURE_DIM
from pipeline.train.evaluate import extract_features
from pipeline.train.knn import topk_correct

INITS = ("pretrained", "random_init")


def classifier(backbone: nn.Module, arch: str, num_classes: int) -> nn.Sequential:
    """backbone -> a new linear layer, initialised as the reference: weight ~ N(0, 0.01), bias 0."""
    fc = nn.Linear(FEATURE_DIM[arch], num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(backbone, fc)


def optimizer(model: nn.Sequential, sp: SemisupParams,
              epochs: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with the backbone at lr_backbone and the classifier at lr_classifier; cosine to 0 over `epochs`."""
    groups = [{"params": model[1].parameters(), "lr": sp.lr_classifier},
              {"params": model[0].parameters(), "lr": sp.lr_backbone}]
    opt = torch.optim.SGD(groups, lr=0.0, momentum=sp.momentum, weight_decay=sp.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)


def finetune(backbone: nn.Module, arch: str, num_classes: int, train_loader: EvalLoader, val_loader: EvalLoader,
             sp: SemisupParams, epochs: int, seed: int, device: torch.device, desc: str) -> dict:
    """One fine-tuning run; returns val top-1/top-5 (%) after the last epoch and the last epoch's train loss."""
    torch.manual_seed(seed)  # the classifier's init
    model = classifier(backbone, arch, num_classes).to(device)
    opt, sched = optimizer(model, sp, epochs)
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True)
    loss_sum, n = 0.0, 0
    for epoch in bar:
        model.train()
        train_loader.set_epoch(epoch)
        loss_sum, n = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # [B, 3, res, res], [B]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, n = loss_sum + loss.item() * len(y), n + len(y)
        sched.step()
        bar.set_postfix(loss=f"{loss_sum / max(n, 1):.3f}")
        if not torch.isfinite(torch.tensor(loss_sum)):  # diverged: say so now, not after the remaining epochs
            raise FloatingPointError(f"{desc}: fine-tuning loss {loss_sum} at epoch {epoch + 1} (lower "
                                     f"semisup.lr_backbone / lr_classifier)")
    logits, y = extract_features(model, val_loader, f"{desc}: val", device)  # [N, C], [N] on the device
    top1, top5 = topk_correct(logits, y, (1, 5))
    return {"top1": 100.0 * top1 / len(y), "top5": 100.0 * top5 / len(y), "train_loss": loss_sum / max(n, 1)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value), as the detection stages report trials."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: dict[str, dict], fractions: list[float], trials: int, control: bool) -> dict:
    """Per fraction: mean and std over trials of top-1/top-5, of the control's, and of the paired gain."""
    out = {}
    for f in fractions:
        key = fraction_key(f)
        per_trial = [runs[run_key(f, t, "pretrained")] for t in range(trials)]
        m: dict = {"fraction": f, "trials": trials}
        for metric in ("top1", "top5"):
            m[metric], m[f"{metric}_std"] = _mean_std([r[metric] for r in per_trial])
        if control:
            ctrl = [runs[run_key(f, t, "random_init")] for t in range(trials)]
            m["random_init_top1"], m["random_init_top1_std"] = _mean_std([r["top1"] for r in ctrl])
            m["gain"], m["gain_std"] = _mean_std([a["top1"] - b["top1"] for a, b in zip(per_trial, ctrl, strict=True)])
        out[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    return out


def fraction_key(fraction: float) -> str:
    """0.01 -> '1pct': a metrics key without a dot, so `dvc metrics show` keeps it one column."""
    return f"{100 * fraction:g}pct".replace(".", "_")


def run_key(fraction: float, trial: int, init: str) -> str:
    return f"{fraction_key(fraction)}/trial{trial}/{init}"


class RunLog:
    """Finished runs of one stage identity, in a JSON file rewritten atomically after each run: the resume point.
    A file written for another identity (params, code or data changed) is ignored and replaced."""

    def __init__(self, path: Path, identity: str):
        self.path, self.identity, self.runs = Path(path), identity, {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("identity") == identity:
                self.runs = saved["runs"]

    def record(self, key: str, result: dict) -> None:
        self.runs[key] = result
        text = json.dumps({"identity": self.identity, "runs": self.runs}, indent=1, sort_keys=True) + "\n"
        atomic_write(self.path, lambda f: f.write(text.encode()))


def semisup(backbones: dict[str, Callable[[], nn.Module]], arch: str, train_beton: Path, val_beton: Path,
            subsets: dict[tuple[float, int], torch.Tensor], num_classes: int, sp: SemisupParams, workers: int,
            device: torch.device, log: RunLog) -> dict:
    """Every (fraction, trial, init) run not yet in `log`, then the summary per fraction.

    backbones: {init: a function building that backbone afresh}; subsets[(fraction, trial)]: sample indices [M]."""
    val_loader = EvalLoader(val_beton, 256, sp.res, workers, train_aug=False)
    epochs = dict(zip(sp.fractions, sp.epochs * len(sp.fractions) if len(sp.epochs) == 1 else sp.epochs,
                      strict=True))
    for f in sp.fractions:
        for t in range(sp.trials):
            todo = [init for init in backbones if run_key(f, t, init) not in log.runs]
            if not todo:
                continue
            indices = subsets[(f, t)]
            batch = min(sp.batch_size, len(indices))
            train_loader = EvalLoader(train_beton, batch, sp.res, workers, train_aug=True, seed=sp.seed + t,
                                      indices=indices.tolist())  # shared by both inits: the same batches
            for init in todo:
                desc = f"semisup {fraction_key(f)} trial {t + 1}/{sp.trials} {init}"
                result = finetune(backbones[init](), arch, num_classes, train_loader, val_loader, sp, epochs[f],
                                  sp.seed + t, device, desc)
                log.record(run_key(f, t, init), result | {"images": len(indices), "batch_size": batch,
                                                          "epochs": epochs[f]})
                print(f"{desc}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}", flush=True)
    summary = summarize(log.runs, sp.fractions, sp.trials, "random_init" in backbones)
    for f in sp.fractions:
        first = log.runs[run_key(f, 0, "pretrained")]
        summary[fraction_key(f)] |= {"images": first["images"], "epochs": epochs[f]}
    return summary
