"""MoCo v2 (He et al. 2020; Chen et al. 2020): query encoder, momentum key encoder, queue of keys.

Follows the reference builder.py, with two differences that matter for the rest of the project:
the queue is stored as [K, dim] (rows are negatives, the layout of pipeline/models/negatives.py), and
forward returns similarities (not yet divided by T) so that the loss variants and the hard-negative
methods can share them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbone import FEATURE_DIM, resnet


def projection_head(in_dim: int, dim: int, mlp: bool) -> nn.Module:
    """v2: fc-ReLU-fc (no BN); v1: one fc."""
    if not mlp:
        return nn.Linear(in_dim, dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, dim))


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Leave autocast (if it is on) so that fp32 inputs give fp32 results."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x concatenated in rank order (no gradient)."""
    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class MoCo(nn.Module):
    def __init__(self, arch: str = "resnet50", dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.2, mlp: bool = True, bn_splits: int = 1):
        """arch: torchvision ResNet; dim: feature size; K: queue size; m: key momentum; T: temperature;
        mlp: v2 projection head; bn_splits: BN groups emulating shuffle BN in one process (1 = plain BN)."""
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = resnet(arch, bn_splits)
        self.encoder_q.fc = projection_head(FEATURE_DIM[arch], dim, mlp)
        self.encoder_k = resnet(arch, bn_splits)
        self.encoder_k.fc = projection_head(FEATURE_DIM[arch], dim, mlp)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))  # [K, dim]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # class of each queued key where labels are known (-1: none): for the false-negative analysis only,
        # never seen by the loss
        self.register_buffer("queue_labels", torch.full((K,), -1, dtype=torch.long))  # [K]

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q."""
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Replace the oldest keys by this step's keys from all ranks; K is a multiple of the global batch.
        labels [B] (optional): the keys' classes, kept beside the queue for the analyses. The pointer stays
        on the device (slots by index arithmetic): no host sync per step."""
        k = concat_all_gather(k)  # [B_global, dim]
        B = k.shape[0]
        if self.K % B:
            raise ValueError(f"queue size K={self.K} must be a multiple of the global batch {B}")
        slots = self.queue_ptr + torch.arange(B, device=k.device)  # [B_global], ptr..ptr+B-1 (never past K)
        self.queue[slots] = k
        self.queue_labels[slots] = -1 if labels is None else concat_all_gather(labels.to(k.device))  # [B_global]
        self.queue_ptr.add_(B).remainder_(self.K)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys through the key encoder with shuffled BN batches, returned in the input order.

        DDP: gather all ranks' images, apply one global permutation (same on every rank: broadcast from
        rank 0), run this rank's slice, and gather/unshuffle back. One process: permute the batch, so
        that the SplitBatchNorm groups of the keys differ from those of the queries.
        """
        if _distributed():
            x = concat_all_gather(im_k)  # [B_global, 3, H, W]
            B = im_k.shape[0]
            perm = torch.randperm(x.shape[0], device=x.device)  # [B_global]
            dist.broadcast(perm, src=0)
            rank = dist.get_rank()
            k = self.encoder_k(x[perm[rank * B:(rank + 1) * B]])  # [B, dim]
            k = concat_all_gather(F.normalize(k.float(), dim=1))  # [B_global, dim] fp32, in permuted order
            unperm = torch.argsort(perm)  # [B_global]
            return k[unperm][rank * B:(rank + 1) * B]  # [B, dim]
        perm = torch.randperm(im_k.shape[0], device=im_k.device)  # [B]
        k = F.normalize(self.encoder_k(im_k[perm]).float(), dim=1)  # [B, dim] fp32, permuted order
        return k[torch.argsort(perm)]  # [B, dim]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict:
        """One MoCo step's similarities. Returns q [B, dim], k [B, dim], l_pos [B] = q.k+,
        l_neg [B, K] = q.queue (before this step's keys are enqueued; divide by T for logits).

        The encoders may run under autocast; features and similarities are fp32 whatever they ran in: in
        bf16 a logit at T 0.2 would move in steps of ~0.02, too coarse for the top-N selection of the hard
        negatives, drop_hardest and the DCL/HCL subtractions downstream."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)  # [B, dim] fp32
        with torch.no_grad():
            self.momentum_update_key_encoder()
            k = self.encode_keys(im_k)  # [B, dim] fp32
        with full_precision(q.device.type):
            l_pos = torch.einsum("bd,bd->b", q, k)  # [B]
            l_neg = q @ self.queue.clone().detach().T  # [B, K]
        return {"q": q, "k": k, "l_pos": l_pos, "l_neg": l_neg}
