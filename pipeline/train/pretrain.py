"""The MoCo v2 pretraining loop: checkpoints every epoch and on preemption, resume, dvclive curves, NaN guard."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.analysis import (
    alignment,
    class_distance_ratio,
    class_similarity_by_rank,
    false_negatives_by_rank,
    hardness,
    same_class_sources,
    uniformity,
)
from pipeline.cli import provenance
from pipeline.config import Params, PretrainParams
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.launch import PreemptionFlag, init_distributed
from pipeline.losses import contrastive_loss, drop_hardest
from pipeline.models.moco import MoCo
from pipeline.models.negatives import mochi, synco, synthetic_logits
from pipeline.wordnet import WordNet, is_wnid

TRAIN_CURVES = ("loss", "proxy_acc", "proxy_acc_with_synthetic", "lr")
SYNCO_TYPES = ("interpolated", "extrapolated", "mixup", "noise", "perturbed", "adversarial")


def lr_at(base_lr: float, epoch: int, epochs: int, schedule: str, steps: list) -> float:
    """Per-epoch lr as in MoCo's main_moco.py: half-cosine to 0, or x0.1 at each step fraction."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= round(s * epochs) for s in steps)
    return base_lr


def synthetic_negatives(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, pt: PretrainParams,
                        query_index: torch.Tensor, return_info: bool = False):
    """Each query's synthetic hard negatives [B, M, D] (detached) from its own top N of the queue.

    Draws are keyed by the global query index, so 1 and N processes make the same points for the same
    global batch; under DDP the queue is the same global queue on every rank. return_info: as in mochi/synco."""
    if pt.method == "mochi":
        c = pt.mochi
        return mochi(q, queue, c.n_hard, c.s, c.s_prime, logits=l_neg, query_index=query_index, seed=pt.seed,
                     return_info=return_info)
    c = pt.synco
    return synco(q, queue, c.n_hard, tuple(c.counts), c.sigma, c.delta, c.eta, logits=l_neg,
                 query_index=query_index, seed=pt.seed, return_info=return_info)


def synthetic_sources(info: dict, pt: PretrainParams) -> dict[str, list[torch.Tensor]]:
    """The queue indices each type of synthetic point was made from: {type: [indices [B, m] per source]}."""
    if pt.method == "mochi":
        s = pt.mochi.s
        types = {"MoCHi h (n_i+n_j)": [info["j"][:, :s], info["i"]], "MoCHi h' (q+n_j)": [info["j"][:, s:]]}
    else:
        parts = info["n"].split(tuple(pt.synco.counts), dim=1)  # [B, n_t] per type
        types = {f"SynCo {t + 1} {name}": [n, info["i"]] if name == "mixup" else [n]
                 for t, (name, n) in enumerate(zip(SYNCO_TYPES, parts, strict=True))}
    return {name: src for name, src in types.items() if src[0].shape[1] > 0}


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
def analyze(model: MoCo, val_loader: TwoViewLoader, pt: PretrainParams, wup: torch.Tensor | None = None) -> dict:
    """The paper analyses on the validation set, in eval mode: alignment and uniformity of the two views'
    query features, class-distance ratios, sorted top-1024 queue probabilities, val proxy accuracy, the
    share of same-class (false) negatives by hardness rank among the queue's labelled keys, with `wup`
    [C, C] the negatives' mean WordNet similarity to the query's class by rank, and for MoCHi/SynCo the
    share of each type of synthetic point made from same-class negatives."""
    model.eval()
    T = pt.temperature
    qs, ks, labels, hard_sum, hits, same, seen, wup_sum, sources = [], [], [], 0.0, 0, 0, 0, 0, {}
    for x1, x2, y in val_loader:
        q = F.normalize(model.encoder_q(x1), dim=1)  # [B, D]
        k = F.normalize(model.encoder_k(x2), dim=1)  # [B, D]
        l_pos, l_neg = (q * k).sum(dim=1), q @ model.queue.T  # [B], [B, K]
        hard_sum = hard_sum + hardness(l_pos, l_neg, T) * len(y)  # [1024]
        hits += int((l_pos > l_neg.max(dim=1).values).sum())
        s, n = false_negatives_by_rank(l_neg, y, model.queue_labels, top=1024)  # [top], [top]
        same, seen = same + s, seen + n
        if wup is not None:
            wup_sum = wup_sum + class_similarity_by_rank(l_neg, y, model.queue_labels, wup, top=1024)[0]  # [top]
        if pt.method != "moco":  # val images keyed by their index, so the draws leave the training RNG alone
            index = sum(len(t) for t in labels) + torch.arange(len(y), device=q.device)  # [B]
            _, info = synthetic_negatives(q, model.queue, l_neg, pt, index, return_info=True)
            for name, src in synthetic_sources(info, pt).items():
                counts = same_class_sources(src, y, model.queue_labels)  # (all same, any same, seen)
                sources[name] = [a + b for a, b in zip(sources.get(name, (0, 0, 0)), counts, strict=True)]
        qs.append(q), ks.append(F.normalize(model.encoder_q(x2), dim=1)), labels.append(y)
    q, q2, y = torch.cat(qs), torch.cat(ks), torch.cat(labels)  # [N, D], [N, D], [N]
    ratio = class_distance_ratio(q, y)  # [N']
    return {"alignment": alignment(q, q2), "uniformity": uniformity(q), "class_distance_ratio": ratio.mean().item(),
            "val_proxy_acc": hits / len(y), "hardness": (hard_sum / len(y)).tolist(), "ratios": ratio.tolist(),
            "false_negatives": (same / seen.clamp(min=1)).tolist(),
            "false_negatives_top10": (same[:10].sum() / seen[:10].sum().clamp(min=1)).item(),
            **({"wup": (wup_sum / seen.clamp(min=1)).tolist(),
                "wup_top10": (wup_sum[:10].sum() / seen[:10].sum().clamp(min=1)).item()} if wup is not None else {}),
            **({"synthetic_sources": {name: (a / max(n, 1), b / max(n, 1)) for name, (a, b, n) in sources.items()},
                "synthetic_from_false_negatives": sum(b for _, b, _ in sources.values())
                / max(1, sum(n for _, _, n in sources.values()))} if sources else {})}


def write_analysis_tables(a: dict, epoch: int, out_dir: Path) -> None:
    """Append this epoch's hardness curve, class-ratio histogram and false-negative shares by rank as
    long-format CSVs (DVC plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (
        ("hardness.csv", "rank,probability,epoch", [f"{r + 1},{v:.6g},{epoch}" for r, v in enumerate(a["hardness"])]),
        ("class_distance_ratio.csv", "ratio,count,epoch", _histogram_rows(a["ratios"], epoch)),
        ("false_negatives.csv", "rank,same_class_share,epoch",
         [f"{r + 1},{v:.4f},{epoch}" for r, v in enumerate(a["false_negatives"])]),
        ("wordnet.csv", "rank,wup_similarity,epoch",
         [f"{r + 1},{v:.4f},{epoch}" for r, v in enumerate(a.get("wup", []))]),
        ("synthetic_sources.csv", "type,same_class_all,same_class_any,epoch",
         [f"{name},{every:.4f},{some:.4f},{epoch}" for name, (every, some) in a.get("synthetic_sources", {}).items()]),
    ):
        if not rows:
            continue
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


@torch.no_grad()
def fill_queue(model: MoCo, loader: TwoViewLoader, device: torch.device) -> None:
    """Fill the queue with real keys (key encoder, augmented views) before the first step.

    A queue of random unit vectors is easy to beat by mapping every image to one point (the positive then
    scores ~1, random negatives ~0); at the toy scale that collapse happens in the few steps before the
    queue is refilled and is never undone. Starting from real keys removes the incentive."""
    model.train()
    loader.set_epoch(1 << 20)  # draws of their own: an epoch no run reaches
    filled = 0
    while filled < model.K:
        for _, im_k, y in loader:
            model.dequeue_and_enqueue(model.encode_keys(im_k.to(device)), y)
            filled += im_k.shape[0] * (dist.get_world_size() if dist.is_initialized() else 1)
            if filled >= model.K:
                break


def build_model(p: Params) -> MoCo:
    pt = p.pretrain
    return MoCo(p.model.arch, pt.dim, pt.queue_size, pt.key_momentum, pt.temperature, pt.mlp, pt.bn_splits)


def run_identity(p: Params) -> dict:
    """What makes two pretraining runs the same run: resume only continues a checkpoint with this identity."""
    return {"model": asdict(p.model), "pretrain": asdict(p.pretrain), "world_size": p.world_size}


def fast_paths(pt: PretrainParams, device: torch.device) -> tuple[bool, torch.memory_format]:
    """(bf16 autocast on?, memory format of the model and batches) for pretrain.precision / memory_format.

    "auto" turns both on for CUDA only: tensor cores want bf16 and NHWC; on CPU fp32 keeps the toy run
    bit-reproducible, and bf16 there depends on the CPU's instruction set."""
    gpu = device.type == "cuda"
    bf16 = pt.precision == "bf16" or (pt.precision == "auto" and gpu)
    nhwc = pt.memory_format == "channels_last" or (pt.memory_format == "auto" and gpu)
    return bf16, torch.channels_last if nhwc else torch.contiguous_format


def stage_to_scratch(betons: list[Path], scratch: str, local_rank: int) -> list[Path]:
    """Copy the .beton files to node-local scratch once per node (launch.local_scratch); their paths there."""
    if not scratch:
        return betons
    folder = Path(os.path.expandvars(scratch))
    out = [folder / f"{b.stem}-{b.stat().st_size}{b.suffix}" for b in betons]
    if local_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(betons, out, strict=True):
            if not dst.exists():
                tmp = dst.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
    if dist.is_initialized():
        dist.barrier()
    return out


def class_similarity(pt: PretrainParams, class_names: list[str] | None) -> torch.Tensor | None:
    """[C, C] Wu-Palmer similarity of the classes when they are named by WordNet ids (ImageNet, IN-100) and
    pretrain.wordnet is set; None otherwise (the toy's classes are textures, not WordNet nouns)."""
    if not pt.wordnet or not class_names or not all(is_wnid(c) for c in class_names):
        return None
    return WordNet(pt.wordnet).wup_matrix(class_names)


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
    local_rank = int(os.environ.get("SLURM_LOCALID", 0))
    train_beton, val_beton = stage_to_scratch([train_beton, val_beton], p.launch.local_scratch, local_rank)
    torch.manual_seed(pt.seed)
    bf16, memory_format = fast_paths(pt, device)
    model = build_model(p).to(device, memory_format=memory_format)
    if rank == 0:  # an unwritable or full disk fails now, not at the first checkpoint
        need = 3 * sum(t.nbytes for t in model.state_dict().values())  # model + SGD momentum + final copy
        for path in (state_path, out_path):
            checkpoint.require_writable(path, need)
    wup = class_similarity(pt, class_names) if rank == 0 else None  # a missing WordNet fails before training
    moco = DistributedDataParallel(model) if world > 1 else model
    global_batch = pt.batch_size * world
    base_lr = pt.lr * global_batch / 256
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=pt.momentum,
                                weight_decay=pt.weight_decay)
    identity = identity or checkpoint.params_hash(run_identity(p))
    produced_by = provenance(p, pt.seed)
    # progress: the epoch in progress, batches of it done, global step, that epoch's running sums
    epoch0, batch0, step, sums, last = 0, 0, 0, [0.0, 0, 0, 0], {}
    if state_path.is_file():
        state = checkpoint.load(state_path)
        if state.get("identity") == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            checkpoint.set_rng_state(state["rng"])
            epoch0, batch0, step, sums, last = (state["epoch"], state["batch"], state["step"], state["sums"],
                                                state["metrics"])
            if rank == 0:
                print(f"pretrain: resuming {state_path} at epoch {epoch0 + 1} batch {batch0} (step {step})", flush=True)
        elif rank == 0:
            print(f"pretrain: {state_path} belongs to other params, code or data; starting from scratch", flush=True)

    def save_state(epoch: int, batch: int) -> None:
        if rank == 0:
            checkpoint.save_atomic({
                "identity": identity, "provenance": produced_by, "arch": p.model.arch, "method": pt.method,
                "epoch": epoch, "batch": batch, "step": step, "sums": sums, "metrics": last,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
            }, state_path)
        if dist.is_initialized():
            dist.barrier()

    aug = AugParams(crop_scale=tuple(pt.crop_scale), blur_sigma=tuple(pt.blur_sigma))
    loader = TwoViewLoader(train_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed,
                           distributed=world > 1)
    if len(loader) == 0:
        raise ValueError(f"{train_beton}: fewer images than one global batch ({global_batch})")
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
    val_loader = TwoViewLoader(val_beton, pt.batch_size, pt.res, aug, p.data.num_workers, seed=pt.seed,
                               drop_last=False) if rank == 0 else None
    fresh = epoch0 == 0 and batch0 == 0
    if fresh and pt.queue_init == "keys":
        fill_queue(model, loader, device)
    if rank == 0 and fresh:
        shutil.rmtree(analysis_dir, ignore_errors=True)
    live = Live(str(live_dir), resume=not fresh, save_dvc_exp=False, dvcyaml=None, report=None) if rank == 0 else None
    preempt = PreemptionFlag()
    t_start, images = time.time(), 0
    for epoch in range(epoch0, pt.epochs):
        lr = lr_at(base_lr, epoch, pt.epochs, pt.schedule, pt.lr_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader.set_epoch(epoch)
        moco.train()
        skip = batch0 if epoch == epoch0 else 0
        if epoch != epoch0:
            sums = [0.0, 0, 0, 0]  # loss sum, proxy hits, proxy hits with synthetic, samples
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{pt.epochs}", leave=False, dynamic_ncols=True,
                   disable=rank != 0, initial=skip)
        for batch, (im_q, im_k, y) in enumerate(bar):
            if batch < skip:  # resumed mid-epoch: these batches were trained before the interruption
                continue
            im_q = im_q.to(device, memory_format=memory_format, non_blocking=True)  # [B, 3, res, res]
            im_k = im_k.to(device, memory_format=memory_format, non_blocking=True)  # [B, 3, res, res]
            B = im_q.shape[0]
            query_index = step * global_batch + rank * B + torch.arange(B, device=device)  # [B] global query ids
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # backward and SGD outside
                out = moco(im_q, im_k)
                loss, hits, hits_all = step_loss(out, model.queue, pt, epoch, query_index)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} (epoch {epoch + 1}); last good checkpoint: "
                    f"{state_path if not fresh or epoch > epoch0 else 'none'}"  # not another run's last.pt
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.dequeue_and_enqueue(out["k"], y)
            step += 1
            sums = [sums[0] + loss.item() * B, sums[1] + int(hits.sum()), sums[2] + int(hits_all.sum()), sums[3] + B]
            images += B * world
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
            if preempt.is_set():
                save_state(epoch, batch + 1)
                if rank == 0:
                    print(f"pretrain: preempted; saved epoch {epoch + 1} batch {batch + 1} (step {step}), "
                          "requeueing", flush=True)
                preempt.requeue()
        totals = torch.tensor(sums, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, hit, hit_all, seen = totals.tolist()
        last = {"loss": loss_sum / seen, "proxy_acc": hit / seen, "proxy_acc_with_synthetic": hit_all / seen, "lr": lr}
        if rank == 0:
            if (epoch + 1) % pt.analysis_every == 0 or epoch + 1 == pt.epochs:
                a = analyze(model, val_loader, pt, wup)
                write_analysis_tables(a, epoch + 1, analysis_dir)
                last |= {k: a[k] for k in ("alignment", "uniformity", "class_distance_ratio", "val_proxy_acc",
                                         "false_negatives_top10", "wup_top10", "synthetic_from_false_negatives")
                         if k in a}
            for name, value in last.items():
                live.log_metric(f"{'train' if name in TRAIN_CURVES else 'analysis'}/{name}", value)
            live.next_step()
            print(f"pretrain: epoch {epoch + 1}/{pt.epochs} loss {last['loss']:.4f} "
                  f"proxy acc {last['proxy_acc']:.3f} lr {lr:.4f}", flush=True)
        save_state(epoch + 1, 0)
        if rank == 0 and pt.keep_every and (epoch + 1) % pt.keep_every == 0:  # evaluate this epoch later
            shutil.copyfile(state_path, state_path.with_name(f"epoch_{epoch + 1:04d}.pt"))
    if rank != 0:
        return None
    live.end()
    final = checkpoint.load(state_path)
    checkpoint.save_atomic({k: v for k, v in final.items() if k not in ("optimizer", "rng", "sums")}, out_path)
    seconds = time.time() - t_start
    return {"method": pt.method, "epochs": pt.epochs, "steps": step, "world_size": world, **last,
            "images_per_s": round(images / seconds, 1) if images else None, "seconds": round(seconds, 1)}
