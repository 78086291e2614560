"""The MoCo v2 pretraining loop: one epoch per checkpoint, resumable, dvclive curves, NaN guard."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import Params
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.losses import infonce
from pipeline.models.moco import MoCo


def lr_at(base_lr: float, epoch: int, epochs: int, schedule: str, steps: list) -> float:
    """Per-epoch lr as in MoCo's main_moco.py: half-cosine to 0, or x0.1 at each step fraction."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= round(s * epochs) for s in steps)
    return base_lr


def build_model(p: Params) -> MoCo:
    pt = p.pretrain
    return MoCo(p.model.arch, pt.dim, pt.queue_size, pt.key_momentum, pt.temperature, pt.mlp, pt.bn_splits)


def run_identity(p: Params) -> dict:
    """What makes two pretraining runs the same run: resume only continues a checkpoint with this identity."""
    return {"model": asdict(p.model), "pretrain": asdict(p.pretrain), "world_size": p.world_size}


def pretrain(p: Params, train_beton: Path, out_path: Path, state_path: Path, live_dir: Path) -> dict:
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

    live = Live(str(live_dir), resume=start_epoch > 0, save_dvc_exp=False, dvcyaml=None, report=None)
    t_start, images = time.time(), 0
    for epoch in range(start_epoch, pt.epochs):
        lr = lr_at(base_lr, epoch, pt.epochs, pt.schedule, pt.lr_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{pt.epochs}", leave=False, dynamic_ncols=True)
        for im_q, im_k, _ in bar:
            out = model(im_q, im_k)
            loss = infonce(out["l_pos"], out["l_neg"], pt.temperature)
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
            B = im_q.shape[0]
            loss_sum += loss.item() * B
            correct += int((out["l_pos"] > out["l_neg"].max(dim=1).values).sum())  # proxy task: k+ ranked first
            seen += B
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        images += seen
        last = {"loss": loss_sum / seen, "proxy_acc": correct / seen, "lr": lr}
        for name, value in last.items():
            live.log_metric(f"train/{name}", value)
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
    return {
        "epochs": pt.epochs, "steps": step, "final_loss": last.get("loss"), "final_proxy_acc": last.get("proxy_acc"),
        "images_per_s": images / seconds if images else None, "seconds": round(seconds, 1),
    }
