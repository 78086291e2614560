"""The evaluation math as pure tensor functions: top-k hits and the weighted kNN classifier (torch only, so
bench.gpu_smoke can time it without ffcv)."""

import torch
import torch.nn.functional as F


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, kmax]
    hit = top == y[:, None]  # [N, kmax]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                k: int, T: float, chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T).
    Returns class scores [N_test, C], on the features' device.

    Test features go through in chunks whose similarity rows and votes fit in `chunk_bytes` (fp32): the
    1.28M x 50k search of ImageNet would be 256 GB at once, ~1 GB per chunk of 200 queries."""
    train_f = F.normalize(train_f, dim=1)  # [N, C]
    k = min(k, train_f.shape[0])
    chunk = max(1, chunk_bytes // (4 * (train_f.shape[0] + k * num_classes)))
    scores = []
    for test_chunk in F.normalize(test_f, dim=1).split(chunk):
        sim = test_chunk @ train_f.T  # [n, N]
        w, idx = sim.topk(k, dim=1)  # [n, k]
        votes = F.one_hot(train_y[idx], num_classes).float() * (w / T).exp()[..., None]  # [n, k, C]
        scores.append(votes.sum(dim=1))  # [n, C]
    return torch.cat(scores)  # [N_test, C]
