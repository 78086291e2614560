"""Debiased contrastive loss, DCL (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020).

Reference code: github.com/chingyaoc/DCL main.py (the estimator g and its clamp).
"""

import torch
from torch import Tensor


def dcl(pos: Tensor, neg: Tensor, T: float, tau_plus: float) -> Tensor:
    """The debiased objective L^{N,M}_Debiased of Chuang et al. (Sec. 3) with M = 1 positive per query:

        L = -log( e^{pos/T} / (e^{pos/T} + N g) ),
        g = max( (1/N sum_i e^{neg_i/T} - tau_plus e^{pos/T}) / (1 - tau_plus),  e^{-1/T} ).

    pos [B], neg [B, M] are similarities not yet divided by T; the paper's N is the number of present
    negatives per query (finite entries of neg: drop_hardest marks removed ones -inf). tau_plus is the
    class prior: g removes the expected share of same-class points from the mean over negatives, and the
    clamp at e^{-1/T} (the smallest e^{s/T} of unit vectors) keeps it positive.
    With tau_plus = 0, g is the plain mean and the loss is InfoNCE exactly whenever the clamp is inactive,
    i.e. whenever mean_i e^{neg_i/T} >= e^{-1/T}, which always holds for cosine similarities (neg >= -1).
    """
    return debiased(pos, neg, T, tau_plus)


def debiased(pos: Tensor, neg: Tensor, T: float, tau_plus: float, weight: Tensor | None = None) -> Tensor:
    """The debiased loss with the mean of e^{neg/T} over the present negatives taken under `weight`
    [B, M] (rows summing to 1 over them; HCL's hardness weights), or uniform when None (DCL)."""
    if not 0 <= tau_plus < 1:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    N = neg.isfinite().sum(1)  # [B] present negatives
    m = torch.maximum(pos, neg.amax(1)).detach() / T  # [B] shift so every exponent is <= 0
    e_pos = torch.exp(pos / T - m)  # [B] e^{pos/T - m}
    e = torch.exp(neg / T - m[:, None])  # [B, M] e^{neg/T - m}, 0 where absent
    e_neg = e.sum(1) / N if weight is None else (weight * e).sum(1)  # [B] mean of e^{neg/T - m}
    g = torch.maximum((e_neg - tau_plus * e_pos) / (1 - tau_plus), torch.exp(-1 / T - m))  # [B] g e^{-m}
    return (torch.log(e_pos + N * g) - (pos / T - m)).mean()
