"""Evaluation of a frozen backbone: linear classification (MoCo's main_lincls.py protocol) and weighted kNN."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from dvclive import Live
from torch import nn
from tqdm import tqdm

from pipeline.config import LinevalParams
from pipeline.data.ffcv_io import EvalLoader
from pipeline.models.backbone import FEATURE_DIM
from pipeline.train.knn import knn_predict, topk_correct


def weights_digest(net: nn.Module) -> str:
    """Hash of every parameter and buffer (BN running stats included): proves the backbone stayed frozen."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, desc: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features [N, C] (fp32) and labels [N] of one pass over `loader`, in eval mode, both left on
    `device` (the backbone's): the classifier and the kNN search then run there too."""
    backbone.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        feats.append(extract_batch(backbone, x, device))  # [B, C]
        labels.append(y.to(device, non_blocking=True))  # [B]
    return torch.cat(feats), torch.cat(labels)


def knn_features(backbone: nn.Module, train_beton: Path, val_beton: Path, res: int, batch_size: int, workers: int,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, val features, val labels), centre-cropped, eval mode, on `device`."""
    backbone.to(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    train = EvalLoader(train_beton, batch_size, res, workers, train_aug=False, pin_memory=pin)
    val = EvalLoader(val_beton, batch_size, res, workers, train_aug=False, pin_memory=pin)
    return (*extract_features(backbone, train, "knn: train features", device),
            *extract_features(backbone, val, "knn: val features", device))


def knn_top1(backbone: nn.Module, train_beton: Path, val_beton: Path, res: int, batch_size: int, workers: int,
             k: int, T: float, num_classes: int, device: torch.device) -> float:
    """kNN top-1 (%) of the val set against the train set's features, both center-cropped, eval mode."""
    train_f, train_y, val_f, val_y = knn_features(backbone, train_beton, val_beton, res, batch_size, workers, device)
    scores = knn_predict(train_f, train_y, val_f, num_classes, k, T)
    return 100.0 * topk_correct(scores, val_y, (1,))[0] / len(val_y)


def linear_eval(backbone: nn.Module, arch: str, train_beton: Path, val_beton: Path, num_classes: int,
                lp: LinevalParams, workers: int, live_dir: Path, device: torch.device) -> dict:
    """Train a linear classifier on the frozen backbone, on `device`; top-1/top-5 (%) on val after the last
    epoch and at the best epoch (main_lincls.py reports the best, i.e. selected on val; the last is the
    unselected figure). Fails if the backbone changed."""
    torch.manual_seed(lp.seed)
    for p in backbone.parameters():
        p.requires_grad = False
    backbone.to(device).eval()
    before = weights_digest(backbone)

    fc = nn.Linear(FEATURE_DIM[arch], num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    fc.to(device)
    base_lr = lp.lr * lp.batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=base_lr, momentum=lp.momentum, weight_decay=lp.weight_decay)
    milestones = [round(s * lp.epochs) for s in lp.lr_steps]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)

    pin = device.type == "cuda" and torch.cuda.is_available()
    val_loader = EvalLoader(val_beton, lp.batch_size, lp.res, workers, train_aug=False, pin_memory=pin)
    val_f, val_y = extract_features(backbone, val_loader, "lineval: val features", device)  # [N_val, C], [N_val]
    if lp.augment:
        train_loader = EvalLoader(train_beton, lp.batch_size, lp.res, workers, train_aug=True, seed=lp.seed,
                                  pin_memory=pin)
    else:  # features computed once; the classifier then trains on shuffled mini-batches of them
        plain = EvalLoader(train_beton, lp.batch_size, lp.res, workers, train_aug=False, pin_memory=pin)
        train_f, train_y = extract_features(backbone, plain, "lineval: train features", device)  # [N, C], [N]

    live = Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    best = {"top1": -1.0}
    for epoch in tqdm(range(lp.epochs), desc="lineval epochs", leave=False, dynamic_ncols=True):
        fc.train()
        if lp.augment:
            train_loader.set_epoch(epoch)
            batches = ((extract_batch(backbone, x, device), y.to(device, non_blocking=True)) for x, y in train_loader)
        else:
            perm = torch.randperm(len(train_y)).to(device)  # [N], drawn on the CPU: the same order on any device
            batches = ((train_f[i], train_y[i]) for i in perm.split(lp.batch_size))
        loss_sum, n = 0.0, 0
        for f, y in batches:
            loss = F.cross_entropy(fc(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, n = loss_sum + loss.item() * len(y), n + len(y)
        sched.step()
        with torch.no_grad():
            top1, top5 = (100.0 * c / len(val_y) for c in topk_correct(fc(val_f), val_y, (1, 5)))
        if top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
        live.log_metric("lineval/train_loss", loss_sum / max(n, 1))
        live.log_metric("lineval/val_top1", top1)
        live.next_step()
    live.end()

    if weights_digest(backbone) != before:
        raise RuntimeError("lineval: the backbone weights or BN statistics changed during linear evaluation")
    return {"top1": top1, "top5": top5, "top1_best": best["top1"], "top5_best": best["top5"],
            "best_epoch": best["epoch"], "epochs": lp.epochs, "backbone_unchanged": True}


@torch.no_grad()
def extract_batch(backbone: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Frozen-backbone features [B, C] of one CPU batch [B, 3, H, W], on `device`."""
    return backbone(x.to(device, non_blocking=True)).float()
