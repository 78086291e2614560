"""The analyses of the hard-negative papers, as pure functions on L2-normalised features.

alignment / uniformity: Wang & Isola (2020). hardness: the MoCHi/SynCo figure of the sorted top matching
probabilities of the queue. class_distance_ratio: inter- over intra-class distance (MoCHi, SynCo).
"""

from __future__ import annotations

import torch


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||x - y||^alpha over positive pairs x [N, D], y [N, D] (lower = views closer)."""
    return (x - y).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t ||x_i - x_j||^2) over all pairs i < j of x [N, D] (lower = more uniform)."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log().item()


def hardness(l_pos: torch.Tensor, l_neg: torch.Tensor, T: float, top: int = 1024) -> torch.Tensor:
    """Mean over queries of the sorted top-`top` matching probabilities of the negatives [top].

    p = softmax([q.k+, q.queue] / T); the negatives' probabilities are sorted per query (largest first)
    and averaged per rank: mass in the first ranks means a few very hard negatives."""
    p = torch.softmax(torch.cat([l_pos[:, None], l_neg], dim=1) / T, dim=1)[:, 1:]  # [B, K]
    return p.topk(min(top, p.shape[1]), dim=1).values.mean(dim=0)  # [top]


def class_distance_ratio(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: mean distance to other classes / mean distance to its own class (self excluded) [N].

    Larger = classes better separated. Samples alone in their class are left out."""
    d = torch.cdist(x, x)  # [N, N]
    same = labels[:, None] == labels[None, :]  # [N, N]
    same.fill_diagonal_(False)
    diff = labels[:, None] != labels[None, :]  # [N, N]
    keep = same.any(dim=1) & diff.any(dim=1)  # [N]
    intra = (d * same).sum(1) / same.sum(1).clamp(min=1)  # [N]
    inter = (d * diff).sum(1) / diff.sum(1).clamp(min=1)  # [N]
    return (inter / intra)[keep]  # [N']


def class_similarity_by_rank(l_neg: torch.Tensor, labels: torch.Tensor, queue_labels: torch.Tensor,
                             sim: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class similarity between each query and its r-th hardest queue negative, summed by rank.

    l_neg [B, K] = q.queue, labels [B], queue_labels [K] (-1 = slot without a label yet), sim [C, C] a
    similarity between classes. Returns (total [top], seen [top]): per rank r (0 = hardest), the sum of
    sim[query class, negative class] and the count of labelled negatives over the batch; summed over an
    epoch, total / seen is the mean similarity by rank."""
    idx = l_neg.topk(min(top, l_neg.shape[1]), dim=1).indices  # [B, top]
    neg_labels = queue_labels[idx]  # [B, top]
    seen = neg_labels >= 0  # [B, top]
    s = sim.to(l_neg.device)[labels[:, None], neg_labels.clamp(min=0)] * seen  # [B, top]
    return s.sum(0), seen.sum(0)  # [top], [top]


def false_negatives_by_rank(l_neg: torch.Tensor, labels: torch.Tensor, queue_labels: torch.Tensor,
                            top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each query's r-th hardest queue negative is of the query's own class (a false negative):
    class_similarity_by_rank with the identity as similarity. Summed over an epoch, same / seen is the
    false-negative share by rank that "drop the hardest" and the hard-negative methods bet on."""
    C = int(max(labels.max(), queue_labels.max())) + 1
    return class_similarity_by_rank(l_neg, labels, queue_labels, torch.eye(C), top)


def same_class_sources(sources: list[torch.Tensor], labels: torch.Tensor,
                       queue_labels: torch.Tensor) -> tuple[int, int, int]:
    """How many synthetic points were made from negatives of the query's own class.

    sources: the queue indices [B, m] each point was made from, one tensor per role (MoCHi's mix of two
    negatives: [n_j, n_i]; a point from one negative: [n]). Returns (all_same, any_same, seen): points whose
    every source, or at least one, is of the query's class, out of the points whose sources are labelled."""
    src = torch.stack([queue_labels[s] for s in sources])  # [roles, B, m]
    seen = (src >= 0).all(0)  # [B, m]
    same = src == labels[None, :, None]  # [roles, B, m]
    return int((same.all(0) & seen).sum()), int((same.any(0) & seen).sum()), int(seen.sum())
