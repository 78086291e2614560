"""InfoNCE as MoCo computes it (van den Oord et al. 2018; He et al. 2020)."""

import torch
import torch.nn.functional as F
from torch import Tensor


def infonce(pos: Tensor, neg: Tensor, T: float) -> Tensor:
    """-log( e^{pos/T} / (e^{pos/T} + sum_i e^{neg_i/T}) ), averaged over the batch.

    pos [B] and neg [B, M] are similarities, not yet divided by T. This is MoCo's cross-entropy over the
    logits [pos, neg] / T with the positive at index 0. -inf entries of neg are absent negatives (their
    exp is 0), which is how drop_hardest removes presumed false negatives.
    """
    logits = torch.cat([pos[:, None], neg], dim=1) / T  # [B, 1 + M]
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # [B]
    return F.cross_entropy(logits, labels)
