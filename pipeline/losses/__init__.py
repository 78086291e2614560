"""Contrastive losses on similarities (not yet divided by T): InfoNCE, DCL, HCL, and the removal of
presumed false negatives (the hardest ones) that any of them can be combined with."""

import math

from torch import Tensor

from pipeline.losses.dcl import dcl
from pipeline.losses.hcl import hcl
from pipeline.losses.infonce import infonce

__all__ = ["LOSSES", "contrastive_loss", "dcl", "drop_hardest", "hcl", "infonce"]

LOSSES = ("infonce", "dcl", "hcl")


def contrastive_loss(name: str, pos: Tensor, neg: Tensor, T: float, tau_plus: float, beta: float) -> Tensor:
    """The loss `name` of pos [B] and neg [B, M]; tau_plus is used by dcl and hcl, beta by hcl."""
    if name == "infonce":
        return infonce(pos, neg, T)
    if name == "dcl":
        return dcl(pos, neg, T, tau_plus)
    if name == "hcl":
        return hcl(pos, neg, T, tau_plus, beta)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def drop_hardest(neg: Tensor, fraction: float) -> Tensor:
    """neg [B, M] with each query's ceil(fraction * M) most similar negatives set to -inf.

    The hardest negatives are the likeliest to be false negatives (same class as the query); -inf makes
    every loss here treat them as absent. ceil, so any fraction > 0 drops at least one: 0.1% of 65536 is
    66, of 16384 is 17. Ties at the cut are broken by topk, so exactly that many are dropped.
    """
    M = neg.shape[1]
    k = math.ceil(round(fraction * M, 9))  # round first: 0.07 * 100 = 7.000000000000001 must give 7
    if not 0 <= k < M:
        raise ValueError(f"drop_hardest: fraction {fraction} of {M} negatives must leave at least one")
    hardest = neg.topk(k, dim=1).indices  # [B, k]
    return neg.scatter(1, hardest, float("-inf"))  # [B, M]
