"""One MoCo v2 training step, and the state it changes. Imports torch and the project's models only (no
ffcv, dvclive or SLURM), so the step runs wherever torch does (bench.gpu_smoke).

The step takes the loader's CPU batch and does everything on the training device: the copy (from pinned
memory, asynchronously), the memory format, the encoders under bf16 autocast where enabled, and in fp32
the similarities, the synthetic negatives and the loss; then backward, SGD and the enqueue. Keep its input
a CPU batch plus the samples' indices: augmentation on the device builds on that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.config import Params, PretrainParams
from pipeline.data.batch import TwoViewBatch
from pipeline.losses import contrastive_loss, drop_hardest
from pipeline.models.moco import MoCo
from pipeline.models.negatives import synthesize as synthetic_negatives
from pipeline.models.negatives import synthetic_logits


def step_loss(out: dict, queue: Tensor, pt: PretrainParams, epoch: int, query_index: Tensor) -> tuple:
    """The loss of one MoCo step for the configured method and loss variant, and its proxy-task hits.

    `epoch` is the epoch in progress counted from 1, as in logs, file names and pretrain.hard_start_epoch.

    The negatives dropped as presumed false negatives (pretrain.drop_hardest) are gone for the synthesis
    too: each query mixes its top N of what is left. Returns (loss, hits_real [B] bool: k+ above every
    real negative, hits_all [B] bool: also above the synthetic ones)."""
    q, l_pos, l_neg = out["q"], out["l_pos"], out["l_neg"]  # [B, D], [B], [B, K]
    if pt.drop_hardest > 0:
        l_neg = drop_hardest(l_neg, pt.drop_hardest)  # [B, K], presumed false negatives at -inf
    hits_real = l_pos > l_neg.max(dim=1).values  # [B]
    neg = l_neg
    if pt.method != "moco" and epoch >= pt.hard_start_epoch:
        h = synthetic_negatives(q.detach(), queue, l_neg.detach(), pt, query_index)  # [B, M, D]
        neg = torch.cat([l_neg, synthetic_logits(q, h)], dim=1)  # [B, K + M]
    hits_all = l_pos > neg.max(dim=1).values  # [B]
    loss = contrastive_loss(pt.loss, l_pos, neg, pt.temperature, pt.tau_plus, pt.beta)
    return loss, hits_real, hits_all


@dataclass
class EpochSums:
    """Running sums over the samples of the epoch in progress (this rank's)."""

    loss: float = 0.0
    hits: int = 0  # k+ ranked above every real negative (the proxy task)
    hits_all: int = 0  # ... and above every synthetic one
    samples: int = 0

    def add(self, f: dict) -> None:
        """Count one step's figures (train_step's)."""
        self.loss += f["loss"] * f["samples"]
        self.hits += f["hits"]
        self.hits_all += f["hits_all"]
        self.samples += f["samples"]


@dataclass
class TrainState:
    """What training changes, and where the run stands: everything a checkpoint must hold to resume."""

    model: MoCo
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs finished (the one in progress is epoch + 1: epochs count from 1)
    batch: int = 0  # batches of it already trained
    step: int = 0  # optimizer steps since the start of the run
    sums: EpochSums = field(default_factory=EpochSums)
    last: dict = field(default_factory=dict)  # figures of the last finished epoch


@dataclass(frozen=True)
class StepSetup:
    """How this process runs its steps; fixed for a run."""

    device: torch.device
    bf16: bool = False  # encoders under bf16 autocast
    memory_format: torch.memory_format = torch.contiguous_format
    rank: int = 0
    world: int = 1
    net: nn.Module | None = None  # what the forward pass calls: the DDP wrapper, or None for the model itself
    # colour ops on this device (data.augment_device): (uint8 views [B, 2, res, res, 3], indices [B], loader
    # epoch, device) -> two float views, the loader's colour_augment; None: the loader made the views
    augment: Callable[[Tensor, Tensor, int, torch.device], tuple[Tensor, Tensor]] | None = None


def fast_paths(pt: PretrainParams, device: torch.device) -> tuple[bool, torch.memory_format]:
    """(bf16 autocast on?, memory format of the model and batches) for pretrain.precision / memory_format.

    "auto" turns both on for CUDA only: tensor cores want bf16 and NHWC; on CPU fp32 keeps the toy run
    bit-reproducible, and bf16 there depends on the CPU's instruction set."""
    gpu = device.type == "cuda"
    bf16 = pt.precision == "bf16" or (pt.precision == "auto" and gpu)
    nhwc = pt.memory_format == "channels_last" or (pt.memory_format == "auto" and gpu)
    return bf16, torch.channels_last if nhwc else torch.contiguous_format


def views_on_device(batch: TwoViewBatch, setup: StepSetup, loader_epoch: int) -> tuple[Tensor, Tensor]:
    """The batch's two views on the training device in its memory format: copied (asynchronously from pinned
    memory), or, when the colour ops run there (setup.augment), made from the uint8 crops, keyed by the
    samples' dataset indices and the loader's epoch as the loader would have made them."""
    dev, fmt = setup.device, setup.memory_format
    if setup.augment is None:
        return (batch.im_q.to(dev, memory_format=fmt, non_blocking=True),  # [B, 3, res, res]
                batch.im_k.to(dev, memory_format=fmt, non_blocking=True))  # [B, 3, res, res]
    views = torch.stack([batch.im_q.to(dev, non_blocking=True), batch.im_k.to(dev, non_blocking=True)], 1)  # uint8
    im_q, im_k = setup.augment(views, batch.index.to(dev, non_blocking=True), loader_epoch, dev)  # [B, 3, res, res]
    return im_q.contiguous(memory_format=fmt), im_k.contiguous(memory_format=fmt)


def forward_loss(state: TrainState, batch: TwoViewBatch, setup: StepSetup, pt: PretrainParams) -> tuple:
    """The forward half of train_step: the CPU batch to the device, MoCo forward, the loss.

    Returns (loss [] fp32 with its graph, keys k [B, D], figures {"loss", "hits", "hits_all", "samples"}
    as tensors on the device)."""
    dev = setup.device
    im_q, im_k = views_on_device(batch, setup, state.epoch)  # [B, 3, res, res] x2; the loader's epoch = epochs done
    B = im_q.shape[0]
    query_index = (state.step * setup.world + setup.rank) * B + torch.arange(B, device=dev)  # [B] global ids
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=setup.bf16):  # similarities come out fp32
        out = (setup.net or state.model)(im_q, im_k)
    loss, hits, hits_all = step_loss(out, state.model.queue, pt, state.epoch + 1, query_index)  # fp32
    figures = {"loss": loss.detach(), "hits": hits.sum(), "hits_all": hits_all.sum(), "samples": B}
    return loss, out["k"], figures


def train_step(state: TrainState, batch: TwoViewBatch, setup: StepSetup, pt: PretrainParams) -> dict:
    """One MoCo step on a loader batch (CPU tensors): forward, NaN guard, backward, SGD, enqueue.
    Returns the step's figures as Python numbers."""
    loss, k, figures = forward_loss(state, batch, setup, pt)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {state.step} (epoch {state.epoch + 1})")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.model.dequeue_and_enqueue(k, batch.label.to(setup.device, non_blocking=True))
    state.step += 1
    return {"loss": value, "hits": int(figures["hits"]), "hits_all": int(figures["hits_all"]),
            "samples": figures["samples"]}


def build_model(p: Params) -> MoCo:
    pt = p.pretrain
    return MoCo(p.model.arch, pt.dim, pt.queue_size, pt.key_momentum, pt.temperature, pt.mlp, pt.bn_splits)


def new_state(p: Params, model: MoCo, setup: StepSetup) -> TrainState:
    """The model on the training device and its SGD (lr per 256 images of global batch, as MoCo)."""
    pt = p.pretrain
    model = model.to(setup.device, memory_format=setup.memory_format)
    base_lr = pt.lr * pt.batch_size * setup.world / 256
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=pt.momentum,
                                weight_decay=pt.weight_decay)
    return TrainState(model, optimizer)
