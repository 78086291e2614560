"""MoCo v2 pretraining: the driver around the training step (pipeline/train/step.py): resume, preemption,
a checkpoint every epoch, dvclive curves, the analyses, the NaN guard's pointer to the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from dvclive import Live
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.analysis import analyze, class_similarity, write_analysis_tables
from pipeline.cli import provenance
from pipeline.config import Params, PretrainParams
from pipeline.data.augment import AugParams, resolve_augment_device
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.launch import Interrupted, InterruptFlag, PreemptionFlag, init_distributed, node_name
from pipeline.models.moco import MoCo
from pipeline.train.step import (
    EpochSums,
    StepSetup,
    TrainState,
    build_model,
    fast_paths,
    new_state,
    train_step,
    views_on_device,
)

TRAIN_CURVES = ("loss", "proxy_acc", "proxy_acc_with_synthetic", "lr")
ANALYSIS_CURVES = ("alignment", "uniformity", "class_distance_ratio", "val_proxy_acc", "false_negatives_top10",
                   "wup_top10", "synthetic_from_false_negatives")


def lr_at(base_lr: float, epoch: int, epochs: int, schedule: str, steps: list) -> float:
    """Per-epoch lr as in MoCo's main_moco.py: half-cosine to 0, or x0.1 at each step fraction."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= round(s * epochs) for s in steps)
    return base_lr


@torch.no_grad()
def fill_queue(model: MoCo, loader: TwoViewLoader, setup: StepSetup) -> None:
    """Fill the queue with real keys (key encoder, augmented views) before the first step.

    A queue of random unit vectors is easy to beat by mapping every image to one point (the positive then
    scores ~1, random negatives ~0); at the toy scale that collapse happens in the few steps before the
    queue is refilled and is never undone. Starting from real keys removes the incentive."""
    model.train()
    epoch = 1 << 20  # draws of their own: an epoch no run reaches
    loader.set_epoch(epoch)
    filled = 0
    while filled < model.K:
        for batch in loader:
            im_k = views_on_device(batch, setup, epoch)[1]  # [B, 3, res, res]
            model.dequeue_and_enqueue(model.encode_keys(im_k), batch.label.to(setup.device, non_blocking=True))
            filled += im_k.shape[0] * (dist.get_world_size() if dist.is_initialized() else 1)
            if filled >= model.K:
                break


def run_identity(p: Params) -> dict:
    """What makes two pretraining runs the same run: resume only continues a checkpoint with this identity."""
    return {"model": asdict(p.model), "pretrain": asdict(p.pretrain), "world_size": p.world_size}


def stage_to_scratch(betons: list[Path], scratch: str, local_rank: int, rank: int = 0) -> list[Path]:
    """Copy the .beton files to node-local scratch once per node (launch.local_scratch); their paths there.

    The first task of each node (SLURM_LOCALID 0) copies, the others wait at a barrier: several tasks of a
    node then share one copy, and ranks on other nodes read their own node's. Each copy and each rank's
    choice is logged with the node name (SLURMD_NODENAME), since nodes may share a hostname."""
    if not scratch:
        return betons
    expanded = os.path.expandvars(scratch)
    if "$" in expanded:
        raise ValueError(f"launch.local_scratch = {scratch!r}: an environment variable in it is not set on node "
                         f"{node_name()}")
    folder = Path(expanded)
    # named by size and mtime: a rewritten .beton is copied again, not read stale from an earlier job's copy
    out = [folder / f"{b.stem}-{b.stat().st_size}-{b.stat().st_mtime_ns}{b.suffix}" for b in betons]
    if local_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(betons, out, strict=True):
            if not dst.exists():
                tmp = dst.with_suffix(f".tmp{os.getpid()}")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
                print(f"pretrain: staged {src} to {dst} on node {node_name()}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    print(f"pretrain: rank {rank} on node {node_name()} (SLURM_NODEID {os.environ.get('SLURM_NODEID', '-')}) "
          f"reads {', '.join(map(str, out))}", flush=True)
    return out


def check_sizes(loader: TwoViewLoader, pt: PretrainParams, global_batch: int, beton: Path, rank: int) -> None:
    """The queue against the data: refuse a queue that holds keys of each query's own image, warn near it."""
    if len(loader) == 0:
        raise ValueError(f"{beton}: fewer images than one global batch ({global_batch})")
    n_train = len(loader) * global_batch
    if pt.queue_size > n_train - global_batch:
        raise ValueError(
            f"pretrain.queue_size = {pt.queue_size} must be at most the {n_train} training images minus one global "
            f"batch ({global_batch}): a larger queue holds older keys of each query's own image as negatives"
        )
    if pt.queue_size > n_train // 8 and rank == 0:
        print(f"pretrain: warning: queue_size {pt.queue_size} is more than 1/8 of the {n_train} training images; "
              "many queries will meet an older key of their own image among the negatives, which makes the loss "
              "rise as training converges", flush=True)


def _trim_rows(table: Path, sep: str, column: str, limit: int) -> None:
    """Keep the rows of a table with a header whose `column` is below `limit` (atomically, only if any go)."""
    header, *rows = table.read_text().splitlines(keepends=True)
    col = header.rstrip("\n").split(sep).index(column)
    keep = [r for r in rows if int(float(r.rstrip("\n").split(sep)[col])) < limit]
    if len(keep) != len(rows):
        text = "".join([header, *keep]).encode()
        checkpoint.atomic_write(table, lambda f: f.write(text))


def trim_curves(live_dir: Path, analysis_dir: Path, epochs_done: int) -> None:
    """Drop what was logged after the checkpoint a run resumes from: dvclive rows at step >= epochs_done
    (step = epoch - 1) and analysis rows of epochs > epochs_done.

    Both are appended to; an epoch logged but not yet checkpointed when the run stopped is trained and
    logged again, and without this it would appear twice."""
    for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        _trim_rows(tsv, "\t", "step", epochs_done)
    for table in sorted(analysis_dir.glob("*.csv")):
        _trim_rows(table, ",", "epoch", epochs_done + 1)


def save_state(state: TrainState, path: Path, extra: dict, rank: int) -> None:
    """The resumable checkpoint, a plain dict (rank 0 writes it atomically; all ranks wait for it)."""
    if rank == 0:
        checkpoint.save_atomic(extra | {
            "epoch": state.epoch, "batch": state.batch, "step": state.step, "sums": asdict(state.sums),
            "metrics": state.last, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "rng": checkpoint.rng_state(),
        }, path)
    if dist.is_initialized():
        dist.barrier()


def load_state(state: TrainState, saved: dict) -> None:
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    checkpoint.set_rng_state(saved["rng"])
    state.epoch, state.batch, state.step = saved["epoch"], saved["batch"], saved["step"]
    state.sums, state.last = EpochSums(**saved["sums"]), saved["metrics"]


def pretrain(p: Params, train_beton: Path, val_beton: Path, out_path: Path, state_path: Path, live_dir: Path,
             analysis_dir: Path, class_names: list[str] | None = None, identity: str | None = None) -> dict | None:
    """Train MoCo v2 on `train_beton`; rank 0 writes the final checkpoint to `out_path` and returns metrics.

    `state_path` holds the last checkpoint: every epoch end, and mid-epoch when SLURM signals a preemption
    or the time limit (then the job requeues itself). A run with the same params that finds it continues
    from its exact step, if it has the same `identity` (default: a hash of run_identity; the stage adds its
    code and data, cli.stage_identity). `class_names` (label order) enable the WordNet analysis.
    """
    pt = p.pretrain
    rank, world, device = init_distributed()
    if world != p.world_size:
        raise ValueError(f"the job has {world} processes but launch.nodes x launch.tasks_per_node = {p.world_size}")
    train_beton, val_beton = stage_to_scratch([train_beton, val_beton], p.launch.local_scratch,
                                              int(os.environ.get("SLURM_LOCALID", 0)), rank)
    torch.manual_seed(pt.seed)
    bf16, memory_format = fast_paths(pt, device)
    setup = StepSetup(device, bf16, memory_format, rank, world)
    state = new_state(p, build_model(p), setup)
    if world > 1:
        setup = StepSetup(device, bf16, memory_format, rank, world, DistributedDataParallel(state.model))
    if rank == 0:  # an unwritable or full disk fails now, not at the first checkpoint
        need = 3 * sum(t.nbytes for t in state.model.state_dict().values())  # model + SGD momentum + final copy
        for path in (state_path, out_path):
            checkpoint.require_writable(path, need)
    wup = class_similarity(pt, class_names) if rank == 0 else None  # a missing WordNet fails before training
    identity = identity or checkpoint.params_hash(run_identity(p))
    extra = {"identity": identity, "provenance": provenance(p, pt.seed), "arch": p.model.arch, "method": pt.method}
    if state_path.is_file():
        saved = checkpoint.load(state_path)
        if saved.get("identity") == identity:
            load_state(state, saved)
            where = "" if world == 1 else f" (rank {rank} on node {node_name()})"  # every rank: each log shows it
            print(f"pretrain: resuming{where} {state_path} at epoch {state.epoch + 1} batch {state.batch} "
                  f"(step {state.step})", flush=True)
        elif rank == 0:
            print(f"pretrain: {state_path} belongs to other params, code or data; starting from scratch", flush=True)
    fresh = state.step == 0

    aug = AugParams(crop_scale=tuple(pt.crop_scale), blur_sigma=tuple(pt.blur_sigma))
    pin = device.type == "cuda" and torch.cuda.is_available()
    loader = TwoViewLoader(train_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed,
                           distributed=world > 1, pin_memory=pin,
                           augment_device=resolve_augment_device(p.data.augment_device, device))
    if not loader.colour_on_loader:  # the colour ops run in the training step, on its device
        setup = replace(setup, augment=loader.colour_augment)
    check_sizes(loader, pt, pt.batch_size * world, train_beton, rank)
    val_loader = TwoViewLoader(val_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed,
                               drop_last=False, pin_memory=pin) if rank == 0 else None
    if fresh and pt.queue_init == "keys":
        fill_queue(state.model, loader, setup)
    if rank == 0 and fresh:
        shutil.rmtree(analysis_dir, ignore_errors=True)
    if rank == 0 and not fresh:
        trim_curves(live_dir, analysis_dir, state.epoch)  # keep the epochs the checkpoint holds
    live = Live(str(live_dir), resume=not fresh, save_dvc_exp=False, dvcyaml=None, report=None) if rank == 0 else None
    preempt, interrupt = PreemptionFlag(), InterruptFlag()
    t_start = time.time()
    try:
        images = _train(state, setup, p, loader, val_loader, device, wup, analysis_dir, live, state_path, extra,
                        preempt, interrupt, fresh)
    finally:
        interrupt.close()
    if rank != 0:
        return None
    live.end()
    final = checkpoint.load(state_path)
    checkpoint.save_atomic({k: v for k, v in final.items() if k not in ("optimizer", "rng", "sums")}, out_path)
    seconds = time.time() - t_start
    return {"method": pt.method, "epochs": pt.epochs, "steps": state.step, "world_size": world, **state.last,
            "images_per_s": round(images / seconds, 1) if images else None, "seconds": round(seconds, 1)}


def _train(state: TrainState, setup: StepSetup, p: Params, loader: TwoViewLoader, val_loader: TwoViewLoader | None,
           device: torch.device, wup: Tensor | None, analysis_dir: Path, live: Live | None, state_path: Path,
           extra: dict, preempt: PreemptionFlag, interrupt: InterruptFlag, fresh: bool) -> int:
    """The epochs left: steps, checkpoints, and the stops a preemption or a Ctrl-C asks for. Returns the
    number of images trained on (all ranks)."""
    pt, rank, world = p.pretrain, setup.rank, setup.world
    base_lr = state.optimizer.defaults["lr"]  # pretrain.lr scaled to the global batch (new_state)
    images = 0
    if not fresh:
        keep_epoch(state, state_path, pt, rank, resumed=True)
    while state.epoch < pt.epochs:
        lr = lr_at(base_lr, state.epoch, pt.epochs, pt.schedule, pt.lr_steps)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        loader.set_epoch(state.epoch)
        (setup.net or state.model).train()
        bar = tqdm(loader, desc=f"pretrain epoch {state.epoch + 1}/{pt.epochs}", leave=False, dynamic_ncols=True,
                   disable=rank != 0, initial=state.batch)
        for batch_index, batch in enumerate(bar):
            if batch_index < state.batch:  # resumed mid-epoch: these batches were trained before the interruption
                continue
            try:
                f = train_step(state, batch, setup, pt)
            except FloatingPointError as e:  # name the checkpoint to go back to (never another run's last.pt)
                raise FloatingPointError(f"{e}; last good checkpoint: {state_path if not fresh else 'none'}") from None
            state.batch += 1
            state.sums.add(f)
            images += f["samples"] * world
            bar.set_postfix(loss=f"{f['loss']:.3f}", lr=f"{lr:.4f}")
            if preempt.is_set():
                save_state(state, state_path, extra, rank)
                if rank == 0:
                    print(f"pretrain: preempted; saved epoch {state.epoch + 1} batch {state.batch} "
                          f"(step {state.step}), requeueing", flush=True)
                preempt.requeue()
            if interrupt.set:  # Ctrl-C: keep the steps done, say where a re-run goes on
                save_state(state, state_path, extra, rank)
                raise Interrupted(f"saved epoch {state.epoch + 1} batch {state.batch} (step {state.step}) to "
                                  f"{state_path}; `dvc repro` resumes there")
        end_epoch(state, lr, rank, pt, val_loader, device, wup, analysis_dir, live)
        fresh = False
        save_state(state, state_path, extra, rank)
        keep_epoch(state, state_path, pt, rank)
    return images


def keep_epoch(state: TrainState, state_path: Path, pt: PretrainParams, rank: int, resumed: bool = False) -> None:
    """Copy the checkpoint of a finished epoch that pretrain.keep_every keeps (to evaluate it later) to
    epoch_NNNN.pt, atomically. On resume (`resumed`) a missing one is written: a kill between the save and
    the copy loses no kept epoch."""
    kept = state_path.with_name(f"epoch_{state.epoch:04d}.pt")
    due = pt.keep_every and state.epoch and state.batch == 0 and state.epoch % pt.keep_every == 0
    if rank == 0 and due and not (resumed and kept.exists()):
        checkpoint.copy_atomic(state_path, kept)


def end_epoch(state: TrainState, lr: float, rank: int, pt: PretrainParams, val_loader: TwoViewLoader | None,
              device: torch.device, wup: Tensor | None, analysis_dir: Path, live: Live | None) -> None:
    """Reduce the epoch's sums over ranks, run the analyses when due, log the curves, start the next epoch."""
    s = state.sums
    totals = torch.tensor([s.loss, s.hits, s.hits_all, s.samples], dtype=torch.float64, device=device)  # [4]
    if dist.is_initialized():
        dist.all_reduce(totals)  # on the device: NCCL reduces CUDA tensors only
    loss_sum, hit, hit_all, seen = totals.tolist()
    state.last = {"loss": loss_sum / seen, "proxy_acc": hit / seen, "proxy_acc_with_synthetic": hit_all / seen,
                  "lr": lr}
    epoch = state.epoch + 1  # finished, counted from 1
    if rank == 0:
        if epoch % pt.analysis_every == 0 or epoch == pt.epochs:
            a = analyze(state.model, val_loader, pt, device, wup)
            write_analysis_tables(a, epoch, analysis_dir)
            state.last |= {k: a[k] for k in ANALYSIS_CURVES if k in a}
        live.step = state.epoch  # epoch - 1, whatever dvclive read back on resume: curves as an uninterrupted run's
        for name, value in state.last.items():
            live.log_metric(f"{'train' if name in TRAIN_CURVES else 'analysis'}/{name}", value)
        live.next_step()
        print(f"pretrain: epoch {epoch}/{pt.epochs} loss {state.last['loss']:.4f} "
              f"proxy acc {state.last['proxy_acc']:.3f} lr {lr:.4f}", flush=True)
    state.epoch, state.batch, state.sums = epoch, 0, EpochSums()
