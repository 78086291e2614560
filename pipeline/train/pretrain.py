"""The MoCo v2 pretraining loop: one epoch per checkpoint, resumable, dvclive curves, NaN guard."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import shutil

import torch
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.analysis import alignment, class_distance_ratio, hardness, uniformity
from pipeline.config import Params
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.config import PretrainParams
from pipeline.losses import contrastive_loss, drop_hardest
from pipeline.models.moco import MoCo
from pipeline.models.negatives import mochi, synco, synthetic_logits


def lr_at(base_lr: float, epoch: int, epochs: int, schedule: str, steps: list) -> float:
    """Per-epoch lr as in MoCo's main_moco.py: half-cosine to 0, or x0.1 at each step fraction."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= round(s * epochs) for s in steps)
    return base_lr


def synthetic_negatives(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, pt: PretrainParams,
                        query_index: torch.Tensor) -> torch.Tensor:
    """Each query's synthetic hard negatives [B, M, D] (detached) from its own top N of the queue.

    Draws are keyed by the global query index, so 1 and N processes make the same points for the same
    global batch; under DDP the queue is the same global queue on every rank."""
    if pt.method == "mochi":
        c = pt.mochi
        return mochi(q, queue, c.n_hard, c.s, c.s_prime, logits=l_neg, query_index=query_index, seed=pt.seed)
    c = pt.synco
    return synco(q, queue, c.n_hard, tuple(c.counts), c.sigma, c.delta, c.eta, logits=l_neg,
                 query_index=query_index, seed=pt.seed)


def step_loss(out: dict, queue: torch.Tensor, pt: PretrainParams, epoch: int, query_index: torch.Tensor) -> tuple:
    """The loss of one MoCo step for the configured method and loss variant, and its proxy-task hits.

    Returns (loss, hits_real [B] bool: k+ above every real negative, hits_all [B] bool: also above the
    synthetic ones)."""
    q, l_pos, l_neg = out["q"], out["l_pos"], out["l_neg"]  # [B, D], [B], [B, K]
    if pt.drop_hardest > 0:
        l_neg = drop_hardest(l_neg, pt.drop_hardest)  # [B, K], presumed false negatives at -inf
    hits_real = l_pos > l_neg.max(dim=1).values  # [B]
    neg = l_neg
    if pt.method != "moco" and epoch >= pt.hard_start_epoch:
        h = synthetic_negatives(q.detach(), queue, out["l_neg"].detach(), pt, query_index)  # [B, M, D]
        neg = torch.cat([l_neg, synthetic_logits(q, h)], dim=1)  # [B, K + M]
    hits_all = l_pos > neg.max(dim=1).values  # [B]
    loss = contrastive_loss(pt.loss, l_pos, neg, pt.temperature, pt.tau_plus, pt.beta)
    return loss, hits_real, hits_all


@torch.no_grad()
def analyze(model: MoCo, val_loader: TwoViewLoader, T: float) -> dict:
    """The paper analyses on the validation set, in eval mode: alignment and uniformity of the two views'
    query features, class-distance ratios, sorted top-1024 queue probabilities, val proxy accuracy."""
    model.eval()
    qs, ks, labels, hard_sum, hits = [], [], [], 0.0, 0
    for x1, x2, y in val_loader:
        q = F.normalize(model.encoder_q(x1), dim=1)  # [B, D]
        k = F.normalize(model.encoder_k(x2), dim=1)  # [B, D]
        l_pos, l_neg = (q * k).sum(dim=1), q @ model.queue.T  # [B], [B, K]
        hard_sum = hard_sum + hardness(l_pos, l_neg, T) * len(y)  # [1024]
        hits += int((l_pos > l_neg.max(dim=1).values).sum())
        qs.append(q), ks.append(F.normalize(model.encoder_q(x2), dim=1)), labels.append(y)
    q, q2, y = torch.cat(qs), torch.cat(ks), torch.cat(labels)  # [N, D], [N, D], [N]
    ratio = class_distance_ratio(q, y)  # [N']
    return {"alignment": alignment(q, q2), "uniformity": uniformity(q), "class_distance_ratio": ratio.mean().item(),
            "val_proxy_acc": hits / len(y), "hardness": (hard_sum / len(y)).tolist(), "ratios": ratio.tolist()}


def write_analysis_tables(a: dict, epoch: int, out_dir: Path) -> None:
    """Append this epoch's hardness curve and class-ratio histogram as long-format CSVs (DVC plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (
        ("hardness.csv", "rank,probability,epoch", [f"{r + 1},{v:.6g},{epoch}" for r, v in enumerate(a["hardness"])]),
        ("class_distance_ratio.csv", "ratio,count,epoch", _histogram_rows(a["ratios"], epoch)),
    ):
        path = out_dir / name
        new = not path.exists()
        with path.open("a") as f:
            if new:
                f.write(header + "\n")
            f.write("\n".join(rows) + "\n")


def _histogram_rows(values: list, epoch: int, bins: int = 30) -> list:
    t = torch.tensor(values)
    lo, hi = float(t.min()), float(t.max()) + 1e-6
    counts = torch.histc(t, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [f"{lo + (i + 0.5) * width:.4f},{int(c)},{epoch}" for i, c in enumerate(counts)]


def build_model(p: Params) -> MoCo:
    pt = p.pretrain
    return MoCo(p.model.arch, pt.dim, pt.queue_size, pt.key_momentum, pt.temperature, pt.mlp, pt.bn_splits)


def run_identity(p: Params) -> dict:
    """What makes two pretraining runs the same run: resume only continues a checkpoint with this identity."""
    return {"model": asdict(p.model), "pretrain": asdict(p.pretrain), "world_size": p.world_size}


def pretrain(p: Params, train_beton: Path, val_beton: Path, out_path: Path, state_path: Path, live_dir: Path,
             analysis_dir: Path) -> dict:
    """Train MoCo v2 on `train_beton`; write the final checkpoint to `out_path`, return summary metrics.

    `state_path` holds the last complete epoch (model, queue, optimizer, RNG, step); a run with the same
    params that finds it continues from there.
    """
    pt = p.pretrain
    torch.manual_seed(pt.seed)
    model = build_model(p)
    global_batch = pt.batch_size * p.world_size
    base_lr = pt.lr * global_batch / 256
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=pt.momentum,
                                weight_decay=pt.weight_decay)
    identity = checkpoint.params_hash(run_identity(p))
    start_epoch, step, last = 0, 0, {}
    if state_path.is_file():
        state = checkpoint.load(state_path)
        if state.get("identity") == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            checkpoint.set_rng_state(state["rng"])
            start_epoch, step, last = state["epoch"] + 1, state["step"], state["metrics"]
            print(f"pretrain: resuming {state_path} after epoch {state['epoch']} (step {step})", flush=True)
        else:
            print(f"pretrain: {state_path} belongs to other params; starting from scratch", flush=True)

    aug = AugParams(crop_scale=tuple(pt.crop_scale), blur_sigma=tuple(pt.blur_sigma))
    loader = TwoViewLoader(train_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed)
    if len(loader) == 0:
        raise ValueError(f"{train_beton}: fewer images than one batch (pretrain.batch_size = {pt.batch_size})")

    val_loader = TwoViewLoader(val_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed, drop_last=False)
    if start_epoch == 0:
        shutil.rmtree(analysis_dir, ignore_errors=True)
    live = Live(str(live_dir), resume=start_epoch > 0, save_dvc_exp=False, dvcyaml=None, report=None)
    t_start, images = time.time(), 0
    for epoch in range(start_epoch, pt.epochs):
        lr = lr_at(base_lr, epoch, pt.epochs, pt.schedule, pt.lr_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader.set_epoch(epoch)
        model.train()
        loss_sum, correct, correct_all, seen = 0.0, 0, 0, 0
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{pt.epochs}", leave=False, dynamic_ncols=True)
        for im_q, im_k, _ in bar:
            B = im_q.shape[0]
            out = model(im_q, im_k)
            query_index = step * global_batch + torch.arange(B)  # [B] global index of each query (rank 0 layout)
            loss, hits, hits_all = step_loss(out, model.queue, pt, epoch, query_index)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"pretrain: loss is {loss.item()} at step {step} (epoch {epoch}); last good checkpoint: "
                    f"{state_path if state_path.is_file() else 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.dequeue_and_enqueue(out["k"])
            step += 1
            loss_sum += loss.item() * B
            correct += int(hits.sum())  # proxy task: k+ ranked above every real negative
            correct_all += int(hits_all.sum())  # ... and above every synthetic one
            seen += B
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        images += seen
        last = {"loss": loss_sum / seen, "proxy_acc": correct / seen, "proxy_acc_with_synthetic": correct_all / seen,
                "lr": lr}
        for name, value in last.items():
            live.log_metric(f"train/{name}", value)
        if (epoch + 1) % pt.analysis_every == 0 or epoch + 1 == pt.epochs:
            a = analyze(model, val_loader, pt.temperature)
            write_analysis_tables(a, epoch + 1, analysis_dir)
            for name in ("alignment", "uniformity", "class_distance_ratio", "val_proxy_acc"):
                last[name] = a[name]
                live.log_metric(f"analysis/{name}", a[name])
        live.next_step()
        print(f"pretrain: epoch {epoch + 1}/{pt.epochs} loss {last['loss']:.4f} "
              f"proxy acc {last['proxy_acc']:.3f} lr {lr:.4f}", flush=True)
        checkpoint.save_atomic({
            "identity": identity, "arch": p.model.arch, "method": pt.method, "epoch": epoch, "step": step,
            "metrics": last, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
        }, state_path)
    live.end()

    final = checkpoint.load(state_path)
    checkpoint.save_atomic({k: v for k, v in final.items() if k not in ("optimizer", "rng")}, out_path)
    seconds = time.time() - t_start
    return {"method": pt.method, "epochs": pt.epochs, "steps": step, **last,
            "images_per_s": round(images / seconds, 1) if images else None, "seconds": round(seconds, 1)}
