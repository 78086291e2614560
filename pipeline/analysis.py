"""The analyses of the hard-negative papers: pure functions on L2-normalised features, and the pass over
the validation set that pretraining runs every `pretrain.analysis_every` epochs.

alignment / uniformity: Wang & Isola (2020). hardness: the MoCHi/SynCo figure of the sorted top matching
probabilities of the queue. class_distance_ratio: inter- over intra-class distance (MoCHi, SynCo).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import PretrainParams
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.models.moco import MoCo
from pipeline.models.negatives import synthesize
from pipeline.wordnet import WordNet, is_wnid

SYNCO_TYPES = ("interpolated", "extrapolated", "mixup", "noise", "perturbed", "adversarial")
PAIRWISE_SAMPLES = 10_000  # uniformity and class distances on the first val images: 50,000 would need 10 GB


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
    false-negative share by rank that "drop the hardest" and the hard-negative methods bet on.
    Returns (same [top], seen [top])."""
    idx = l_neg.topk(min(top, l_neg.shape[1]), dim=1).indices  # [B, top]
    neg_labels = queue_labels[idx]  # [B, top]
    seen = neg_labels >= 0  # [B, top]
    same = (neg_labels == labels[:, None]) & seen  # [B, top]
    return same.sum(0), seen.sum(0)  # [top], [top]


def same_class_sources(sources: list[torch.Tensor], labels: torch.Tensor,
                       queue_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How many synthetic points were made from negatives of the query's own class.

    sources: the queue indices [B, m] each point was made from, one tensor per role (MoCHi's mix of two
    negatives: [n_j, n_i]; a point from one negative: [n]). Returns (all_same, any_same, seen): points whose
    every source, or at least one, is of the query's class, out of the points whose sources are labelled."""
    src = torch.stack([queue_labels[s] for s in sources])  # [roles, B, m]
    seen = (src >= 0).all(0)  # [B, m]
    same = src == labels[None, :, None]  # [roles, B, m]
    return (same.all(0) & seen).sum(), (same.any(0) & seen).sum(), seen.sum()  # [], [], [] on the device


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


def class_similarity(pt: PretrainParams, class_names: list[str] | None) -> torch.Tensor | None:
    """[C, C] Wu-Palmer similarity of the classes when they are named by WordNet ids (ImageNet, IN-100) and
    pretrain.wordnet is set; None otherwise (the toy's classes are textures, not WordNet nouns)."""
    if not pt.wordnet or not class_names or not all(is_wnid(c) for c in class_names):
        return None
    return WordNet(pt.wordnet).wup_matrix(class_names)


@torch.no_grad()
def collect(model: MoCo, val_loader: TwoViewLoader, pt: PretrainParams, device: torch.device,
            wup: torch.Tensor | None = None) -> dict:
    """One pass over the validation set in eval mode; every sum stays a tensor on `device` (no host sync
    per batch). Returns the features and per-rank sums that `summarize` turns into the figures."""
    model.eval()
    T, top = pt.temperature, 1024
    wup = wup.to(device) if wup is not None else None
    qs, q2s, labels, sources = [], [], [], {}
    hard_sum = hits = same = seen = wup_sum = 0
    for batch in val_loader:
        x1 = batch.im_q.to(device, non_blocking=True)  # [B, 3, res, res]
        x2 = batch.im_k.to(device, non_blocking=True)  # [B, 3, res, res]
        y = batch.label.to(device, non_blocking=True)  # [B]
        q = F.normalize(model.encoder_q(x1).float(), dim=1)  # [B, D]
        k = F.normalize(model.encoder_k(x2).float(), dim=1)  # [B, D]
        l_pos, l_neg = (q * k).sum(dim=1), q @ model.queue.T  # [B], [B, K]
        hard_sum = hard_sum + hardness(l_pos, l_neg, T, top) * len(y)  # [top]
        hits = hits + (l_pos > l_neg.max(dim=1).values).sum()  # []
        s, n = false_negatives_by_rank(l_neg, y, model.queue_labels, top)  # [top], [top]
        same, seen = same + s, seen + n
        if wup is not None:
            wup_sum = wup_sum + class_similarity_by_rank(l_neg, y, model.queue_labels, wup, top)[0]  # [top]
        if pt.method != "moco":  # val images keyed by their index, so the draws leave the training RNG alone
            index = sum(len(t) for t in labels) + torch.arange(len(y), device=device)  # [B]
            _, info = synthesize(q, model.queue, l_neg, pt, index, return_info=True)
            for name, src in synthetic_sources(info, pt).items():
                counts = same_class_sources(src, y, model.queue_labels)  # (all same, any same, seen)
                sources[name] = [a + b for a, b in zip(sources.get(name, (0, 0, 0)), counts, strict=True)]
        qs.append(q), q2s.append(F.normalize(model.encoder_q(x2).float(), dim=1)), labels.append(y)
    return {"q": torch.cat(qs), "q2": torch.cat(q2s), "labels": torch.cat(labels), "hardness_sum": hard_sum,
            "hits": hits, "same": same, "seen": seen, "wup_sum": wup_sum if wup is not None else None,
            "sources": sources}


def summarize(c: dict) -> dict:
    """The figures of one analysis pass (collect): alignment and uniformity of the two views' query
    features, class-distance ratios, sorted top-1024 queue probabilities, val proxy accuracy, the share of
    same-class (false) negatives by hardness rank among the queue's labelled keys, the negatives' mean
    WordNet similarity to the query's class by rank, and for MoCHi/SynCo the share of each type of synthetic
    point made from same-class negatives."""
    q, q2, y = c["q"], c["q2"], c["labels"]  # [N, D], [N, D], [N]
    n, same, seen = len(y), c["same"], c["seen"]  # [top], [top]
    head = slice(0, PAIRWISE_SAMPLES)
    ratio = class_distance_ratio(q[head], y[head])  # [N']
    out = {"alignment": alignment(q, q2), "uniformity": uniformity(q[head]),
           "class_distance_ratio": ratio.mean().item(), "val_proxy_acc": int(c["hits"]) / n,
           "hardness": (c["hardness_sum"] / n).tolist(), "ratios": ratio.tolist(),
           "false_negatives": (same / seen.clamp(min=1)).tolist(),
           "false_negatives_top10": (same[:10].sum() / seen[:10].sum().clamp(min=1)).item()}
    if c["wup_sum"] is not None:
        w = c["wup_sum"]  # [top]
        out |= {"wup": (w / seen.clamp(min=1)).tolist(),
                "wup_top10": (w[:10].sum() / seen[:10].sum().clamp(min=1)).item()}
    if c["sources"]:
        totals = {name: [int(v) for v in counts] for name, counts in c["sources"].items()}
        out |= {"synthetic_sources": {name: (a / max(m, 1), b / max(m, 1)) for name, (a, b, m) in totals.items()},
                "synthetic_from_false_negatives": sum(b for _, b, _ in totals.values())
                / max(1, sum(m for _, _, m in totals.values()))}
    return out


def analyze(model: MoCo, val_loader: TwoViewLoader, pt: PretrainParams, device: torch.device,
            wup: torch.Tensor | None = None) -> dict:
    """The paper analyses on the validation set (collect, then summarize); `wup` [C, C]: class_similarity."""
    return summarize(collect(model, val_loader, pt, device, wup))


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
