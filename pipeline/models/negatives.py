"""Synthetic hard negatives for MoCo: MoCHi (Kalantidis et al. 2020) and SynCo (Giakoumoglou & Stathaki 2024).

Pure functions on L2-normalised features: q [B, D] queries, queue [K, D] with one negative key per row.
Every query mixes its own N hardest queue entries (largest q.n; a set shared by the batch is a known bug
of public code). The synthetic points are unit vectors, detached (the gradient reaches q only through
the logits q.h), never enqueued, and share the temperature of the real logits.

Random draws come from `generator` (or the global RNG). For DDP pass instead `query_index` [B], each
query's position in the global batch, and a `seed` that changes every step: every draw is then a hash of
(seed, query index, draw id), so a query gets the same points whichever rank and batch split computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import PretrainParams

_M32 = 0xFFFFFFFF
Synthesis = Tensor | tuple[Tensor, dict[str, Tensor]]  # the points, with the draws when return_info


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so that int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """A well-mixing bijection of [0, 2**32) (xorshift-multiply, the 'lowbias32' constants)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


class _Draws:
    """U[0, 1) float32 draws [B, *shape] for one synthesis: from `generator` (or the global RNG), or,
    when `query_index` is given, hashed from (seed, query index, draw id) with draw ids counting up
    across calls, so that a query's draws do not depend on the rest of the batch.
    """

    def __init__(self, q: Tensor, generator: torch.Generator | None, query_index: Tensor | None, seed: int):
        if query_index is not None and generator is not None:
            raise ValueError("pass either a generator or query_index and seed, not both")
        self.B, self.device, self.generator = q.shape[0], q.device, generator
        self.key, self.next_id = None, 0
        if query_index is not None:
            if query_index.shape != (self.B,):
                raise ValueError(f"query_index must have shape [{self.B}], got {list(query_index.shape)}")
            seed_key = _hash32(torch.tensor(seed & _M32, device=q.device))  # []
            self.key = _hash32(seed_key ^ (query_index.to(q.device, torch.int64) & _M32))  # [B]

    def __call__(self, *shape: int) -> Tensor:
        n = math.prod(shape)
        if self.key is None:
            device = self.generator.device if self.generator is not None else self.device
            u = torch.rand(self.B, n, generator=self.generator, device=device).to(self.device)  # [B, n]
        else:
            ids = torch.arange(self.next_id, self.next_id + n, device=self.device)  # [n]
            h = _hash32(self.key[:, None] ^ _hash32(ids))  # [B, n] 32 random bits
            u = (h >> 8).float() * 2.0**-24  # [B, n] exact multiples of 2^-24 in [0, 1)
        self.next_id += n
        return u.view(self.B, *shape)

    def normal(self, *shape: int) -> Tensor:
        """N(0, 1) draws [B, *shape] (Box-Muller)."""
        u1, u2 = self(*shape), self(*shape)
        return torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)


def _position(u: Tensor, n: int) -> Tensor:
    """Uniform integers in [0, n) from U[0, 1) draws u (same shape)."""
    return (u * n).long().clamp_(max=n - 1)


def _hardest(q: Tensor, queue: Tensor, n_hard: int, logits: Tensor | None, pairs: bool) -> Tensor:
    """Queue indices [B, N] of each query's N = min(n_hard, K) most similar entries, most similar first."""
    if q.ndim != 2 or queue.ndim != 2 or q.shape[1] != queue.shape[1]:
        raise ValueError(f"expected q [B, D] and queue [K, D], got {list(q.shape)} and {list(queue.shape)}")
    B, K = q.shape[0], queue.shape[0]
    N = min(n_hard, K)
    if N < (2 if pairs else 1):
        raise ValueError(f"n_hard={n_hard} with a queue of {K}: mixing two distinct negatives needs N >= 2")
    if logits is None:
        logits = q @ queue.T  # [B, K]
    elif logits.shape != (B, K):
        raise ValueError(f"logits must be q @ queue.T of shape [{B}, {K}], got {list(logits.shape)}")
    return logits.topk(N, dim=1).indices  # [B, N]


def _partner(pos_j: Tensor, u: Tensor, N: int) -> Tensor:
    """A position i != j in [0, N) for each position j in pos_j, uniform over the other N - 1."""
    pos_i = _position(u, N - 1)  # [B, m]
    return pos_i + (pos_i >= pos_j).long()  # [B, m] skips j


@torch.no_grad()
def mochi(q: Tensor, queue: Tensor, n_hard: int, s: int, s_prime: int,
          generator: torch.Generator | None = None, *, logits: Tensor | None = None,
          query_index: Tensor | None = None, seed: int = 0, return_info: bool = False) -> Synthesis:
    """MoCHi(N, s, s') synthetic negatives [B, s + s', D], the s type-1 points first:

        h  = normalize(a n_i + (1 - a) n_j),  a ~ U(0, 1),    n_i != n_j both in the query's top N,
        h' = normalize(b q + (1 - b) n_j),    b ~ U(0, 0.5),  n_j in the query's top N.

    logits: q @ queue.T [B, K] if already computed (any positive scale; only its order is used).
    query_index, seed: keyed draws (module docstring). return_info: also return {"top": [B, N],
    "j": [B, s + s'] and "i": [B, s] queue indices of n_j and n_i, "a": [B, s], "b": [B, s']}.
    """
    q = q.to(queue.dtype)
    top = _hardest(q, queue, n_hard, logits, pairs=s > 0)  # [B, N]
    N = top.shape[1]
    draw = _Draws(q, generator, query_index, seed)
    pos_j = _position(draw(s + s_prime), N)  # [B, s + s'] positions in the top N
    pos_i = _partner(pos_j[:, :s], draw(s), N)  # [B, s]
    j, i = top.gather(1, pos_j), top.gather(1, pos_i)  # [B, s + s'], [B, s] queue indices
    a, b = draw(s), 0.5 * draw(s_prime)  # [B, s], [B, s']

    h = queue[j]  # [B, s + s', D] n_j
    h[:, :s].lerp_(queue[i], a[..., None].to(h.dtype))  # a n_i + (1 - a) n_j
    h[:, s:].lerp_(q[:, None], b[..., None].to(h.dtype))  # b q + (1 - b) n_j
    h = F.normalize(h, dim=-1, out=h)  # [B, s + s', D]
    return (h, {"top": top, "j": j, "i": i, "a": a, "b": b}) if return_info else h


@torch.no_grad()
def synco(q: Tensor, queue: Tensor, n_hard: int, counts: tuple[int, int, int, int, int, int],
          sigma: float = 0.01, delta: float = 0.01, eta: float = 0.01,
          generator: torch.Generator | None = None, *, logits: Tensor | None = None,
          query_index: Tensor | None = None, seed: int = 0, return_info: bool = False) -> Synthesis:
    """SynCo synthetic negatives [B, n1 + ... + n6, D], the six types in order, each n from the query's top N:

        1 interpolated  normalize(a q + (1 - a) n),        a ~ U(0, 0.5)
        2 extrapolated  normalize(q + b (n - q)),          b ~ U(1, 1.5)
        3 mixup         normalize(g n_i + (1 - g) n_j),    g ~ U(0, 1), n_i != n_j
        4 noise         normalize(n + e),                  e ~ N(0, sigma^2 I)
        5 perturbed     normalize(n + delta q)             (delta times the gradient of q.n w.r.t. n)
        6 adversarial   normalize(n + eta sign(q))

    counts = (n1, ..., n6), any of them 0. logits, query_index, seed: as in mochi. return_info: also
    return {"top": [B, N], "n": [B, M] queue index of each point's n (n_j for type 3), "i": [B, n3],
    "a": [B, n1], "b": [B, n2], "g": [B, n3], "e": [B, n4, D]}.
    """
    if len(counts) != 6 or min(counts) < 0:
        raise ValueError(f"counts must be six non-negative integers, got {counts}")
    n1, n2, n3, n4, _, _ = counts
    q = q.to(queue.dtype)
    top = _hardest(q, queue, n_hard, logits, pairs=n3 > 0)  # [B, N]
    N = top.shape[1]
    draw = _Draws(q, generator, query_index, seed)
    pos_n = _position(draw(sum(counts)), N)  # [B, M] positions in the top N
    pos_i = _partner(pos_n[:, n1 + n2:n1 + n2 + n3], draw(n3), N)  # [B, n3]
    n, i = top.gather(1, pos_n), top.gather(1, pos_i)  # [B, M], [B, n3] queue indices
    a, b, g = 0.5 * draw(n1), 1 + 0.5 * draw(n2), draw(n3)  # [B, n1], [B, n2], [B, n3]
    e = sigma * draw.normal(n4, q.shape[1])  # [B, n4, D]

    h = queue[n]  # [B, M, D] n
    h1, h2, h3, h4, h5, h6 = h.split(counts, dim=1)  # views into h
    qq = q[:, None]  # [B, 1, D]
    h1.lerp_(qq, a[..., None].to(h.dtype))  # a q + (1 - a) n
    h2.sub_(qq).mul_(b[..., None].to(h.dtype)).add_(qq)  # q + b (n - q)
    h3.lerp_(queue[i], g[..., None].to(h.dtype))  # g n_i + (1 - g) n_j
    h4.add_(e.to(h.dtype))  # n + e
    h5.add_(qq, alpha=delta)  # n + delta q
    h6.add_(qq.sign(), alpha=eta)  # n + eta sign(q)
    h = F.normalize(h, dim=-1, out=h)  # [B, M, D]
    return (h, {"top": top, "n": n, "i": i, "a": a, "b": b, "g": g, "e": e}) if return_info else h


def synthetic_logits(q: Tensor, h: Tensor) -> Tensor:
    """q.h [B, M] of each query with its own synthetic points h [B, M, D] (not divided by T)."""
    return torch.einsum("bd,bmd->bm", q, h)


def synthesize(q: Tensor, queue: Tensor, l_neg: Tensor, pt: PretrainParams, query_index: Tensor,
               return_info: bool = False) -> Synthesis:
    """The configured method's (pretrain.method: mochi | synco) synthetic negatives [B, M, D] for each query
    from its own top N of `l_neg` [B, K] (q @ queue.T, any entries dropped as presumed false negatives at
    -inf). Draws are keyed by the global query index, so 1 and N processes make the same points for the
    same global batch; under DDP the queue is the same global queue on every rank."""
    if pt.method == "mochi":
        c = pt.mochi
        return mochi(q, queue, c.n_hard, c.s, c.s_prime, logits=l_neg, query_index=query_index, seed=pt.seed,
                     return_info=return_info)
    c = pt.synco
    return synco(q, queue, c.n_hard, tuple(c.counts), c.sigma, c.delta, c.eta, logits=l_neg,
                 query_index=query_index, seed=pt.seed, return_info=return_info)
