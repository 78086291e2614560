"""MoCHi and SynCo synthesis against slow per-query, per-point loop references of the papers' formulas."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.negatives import mochi, synco, synthetic_logits

B, K, D, N = 5, 40, 16, 6
ATOL = 1e-6


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def make(seed: int = 0, B: int = B, K: int = K, D: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit queries q [B, D] and a queue [K, D] whose rows (not columns) are unit vectors."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(K, D, generator=g), dim=1)
    return q, queue


def top_ref(q: torch.Tensor, queue: torch.Tensor, n: int) -> list[set[int]]:
    """Each query's n hardest negatives: the queue rows with the largest dot product, by a Python sort."""
    out = []
    for b in range(q.shape[0]):
        sims = [float(q[b] @ queue[k]) for k in range(queue.shape[0])]
        out.append(set(sorted(range(len(sims)), key=lambda k: -sims[k])[:n]))
    return out


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.allclose(x, y, atol=ATOL, rtol=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- MoCHi


def test_mochi_points_are_where_their_formula_says():
    q, queue = make()
    s, s_prime = 7, 4
    h, info = mochi(q, queue, N, s, s_prime, gen(0), return_info=True)
    tops = top_ref(q, queue, N)
    assert h.shape == (B, s + s_prime, D)
    for b in range(B):
        assert set(info["top"][b].tolist()) == tops[b]
        for p in range(s):  # type 1: two distinct hard negatives of this query
            i, j, a = int(info["i"][b, p]), int(info["j"][b, p]), float(info["a"][b, p])
            assert i in tops[b] and j in tops[b] and i != j and 0 <= a < 1
            assert close(h[b, p], unit(a * queue[i] + (1 - a) * queue[j]))
        for p in range(s_prime):  # type 2: the query mixed with one hard negative
            j, beta = int(info["j"][b, s + p]), float(info["b"][b, p])
            assert j in tops[b] and 0 <= beta < 0.5
            assert close(h[b, s + p], unit(beta * q[b] + (1 - beta) * queue[j]))


def on_arc(h: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """w in [0, 1] with h = normalize(w x + (1 - w) y), or None: least squares of h on the span of x, y."""
    A = torch.stack([x, y], dim=1).double()  # [D, 2]
    c = torch.linalg.lstsq(A, h.double()[:, None]).solution[:, 0]  # [2]
    if (A @ c - h.double()).norm() > 1e-5 or (c < -1e-6).any():
        return None
    return float(c[0] / c.sum())


def test_mochi_points_found_by_search_over_the_top_n_without_info():
    """Independent of return_info: every type-1 point lies on the arc between two distinct members of its
    query's top N, every type-2 point on the arc from one of them towards q with b <= 0.5."""
    q, queue = make(1)
    s, s_prime = 5, 5
    h = mochi(q, queue, N, s, s_prime, gen(1))
    tops = top_ref(q, queue, N)
    for b in range(B):
        for p in range(s):
            found = [on_arc(h[b, p], queue[i], queue[j]) for i, j in itertools.permutations(tops[b], 2)]
            assert any(w is not None for w in found)
            # and it is on no arc of negatives outside this query's top N
            others = [k for k in range(K) if k not in tops[b]][:8]
            outside = itertools.combinations(others, 2)
            assert all(on_arc(h[b, p], queue[i], queue[j]) is None for i, j in outside)
        for p in range(s_prime):
            found = [on_arc(h[b, s + p], q[b], queue[j]) for j in tops[b]]
            assert any(w is not None and w <= 0.5 + 1e-6 for w in found)


def test_each_query_mixes_its_own_hardest_negatives():
    """Two queries at opposite poles with the queue split between the two: a hard set shared by the batch
    (a known bug) would hand one of them the other's negatives."""
    g = torch.Generator().manual_seed(2)
    e1 = torch.zeros(D)
    e1[0] = 1
    near = F.normalize(e1 + 0.3 * torch.randn(20, D, generator=g), dim=1)  # [20, D]
    queue = torch.cat([near, -near])  # [40, D]
    q = torch.stack([e1, -e1])  # [2, D]
    h = mochi(q, queue, 10, 16, 8, gen(2))
    assert (h[0] @ e1 > 0.5).all() and (h[1] @ e1 < -0.5).all()
    h = synco(q, queue, 10, (3, 3, 3, 3, 3, 3), generator=gen(2))
    assert (h[0] @ e1 > 0.5).all() and (h[1] @ e1 < -0.5).all()


def test_mochi_pairs_are_always_distinct_and_cover_all_pairs():
    q, queue = make(3)
    _, info = mochi(q, queue, 2, 64, 0, gen(3), return_info=True)  # N = 2: i, j must be the two
    assert (info["i"] != info["j"]).all()
    assert all(set(info["i"][b].tolist()) | set(info["j"][b].tolist()) == set(info["top"][b].tolist())
               for b in range(B))
    _, info = mochi(q, queue, 3, 200, 0, gen(4), return_info=True)  # all 6 ordered pairs occur
    pos = {int(t): n for n, t in enumerate(info["top"][0])}
    pairs = {(pos[int(i)], pos[int(j)]) for i, j in zip(info["i"][0], info["j"][0], strict=True)}
    assert pairs == set(itertools.permutations(range(3), 2))


def test_mochi_one_sided_configurations_and_shapes():
    q, queue = make(4)
    for s, s_prime in ((0, 3), (3, 0), (0, 0)):
        h = mochi(q, queue, N, s, s_prime, gen(0))
        assert h.shape == (B, s + s_prime, D)
    assert mochi(q, queue, 1, 0, 3, gen(0)).shape == (B, 3, D)  # N = 1 is fine without pairs
    with pytest.raises(ValueError, match="distinct"):
        mochi(q, queue, 1, 3, 0, gen(0))


def test_n_hard_larger_than_the_queue_is_clipped():
    q, queue = make(5, K=6)
    h, info = mochi(q, queue, 1024, 4, 4, gen(5), return_info=True)
    assert info["top"].shape == (B, 6) and h.shape == (B, 8, D)
    h, info = synco(q, queue, 1024, (2, 2, 2, 2, 2, 2), generator=gen(5), return_info=True)
    assert info["top"].shape == (B, 6) and h.shape == (B, 12, D)


# ---------------------------------------------------------------- SynCo


def test_synco_points_are_where_their_formula_says():
    q, queue = make(6)
    counts = (3, 4, 5, 6, 2, 3)
    sigma, delta, eta = 0.05, 0.02, 0.03
    h, info = synco(q, queue, N, counts, sigma, delta, eta, gen(6), return_info=True)
    tops = top_ref(q, queue, N)
    assert h.shape == (B, sum(counts), D)
    start = [sum(counts[:t]) for t in range(6)]
    for b in range(B):
        assert set(info["top"][b].tolist()) == tops[b]
        assert set(info["n"][b].tolist()) <= tops[b] and set(info["i"][b].tolist()) <= tops[b]
        qb = q[b]
        for p in range(counts[0]):  # 1 interpolated
            n, a = queue[info["n"][b, start[0] + p]], float(info["a"][b, p])
            assert 0 <= a < 0.5 and close(h[b, start[0] + p], unit(a * qb + (1 - a) * n))
        for p in range(counts[1]):  # 2 extrapolated
            n, beta = queue[info["n"][b, start[1] + p]], float(info["b"][b, p])
            assert 1 <= beta < 1.5 and close(h[b, start[1] + p], unit(qb + beta * (n - qb)))
        for p in range(counts[2]):  # 3 mixup of two distinct hard negatives
            j, i, g = int(info["n"][b, start[2] + p]), int(info["i"][b, p]), float(info["g"][b, p])
            assert i != j and 0 <= g < 1
            assert close(h[b, start[2] + p], unit(g * queue[i] + (1 - g) * queue[j]))
        for p in range(counts[3]):  # 4 noise
            n, e = queue[info["n"][b, start[3] + p]], info["e"][b, p]
            assert close(h[b, start[3] + p], unit(n + e))
        for p in range(counts[4]):  # 5 perturbed: towards q by exactly delta q
            n = queue[info["n"][b, start[4] + p]]
            assert close(h[b, start[4] + p], unit(n + delta * qb))
        for p in range(counts[5]):  # 6 adversarial
            n = queue[info["n"][b, start[5] + p]]
            assert close(h[b, start[5] + p], unit(n + eta * torch.sign(qb)))


def test_synco_deterministic_types_found_by_search_and_types_4_5_not_swapped():
    """Without info: type 5 is normalize(n + delta q) and type 6 normalize(n + eta sign q) for some n in the
    query's top N; type 4 is random noise, so it matches neither n nor n + delta q."""
    q, queue = make(7)
    delta, eta = 0.01, 0.01
    counts = (0, 0, 0, 8, 8, 8)
    h = synco(q, queue, N, counts, 0.01, delta, eta, gen(7))
    tops = top_ref(q, queue, N)
    for b in range(B):
        perturbed = [unit(queue[k] + delta * q[b]) for k in tops[b]]
        adversarial = [unit(queue[k] + eta * torch.sign(q[b])) for k in tops[b]]
        plain = [queue[k] for k in tops[b]]
        for p in range(8):
            noisy, h5, h6 = h[b, p], h[b, 8 + p], h[b, 16 + p]
            assert any(close(h5, x) for x in perturbed) and not any(close(h5, x) for x in plain)
            assert any(close(h6, x) for x in adversarial)
            assert not any(close(noisy, x) for x in perturbed + plain)
    # with sigma = 0 the noise type returns the hard negative itself; with delta = 0 so does type 5
    h = synco(q, queue, N, (0, 0, 0, 4, 4, 0), 0.0, 0.0, 0.0, gen(7))
    for b in range(B):
        assert all(any(close(h[b, p], queue[k]) for k in tops[b]) for p in range(8))


def test_synco_noise_has_the_requested_scale():
    q, queue = make(8)
    sigma = 0.01
    _, info = synco(q, queue, N, (0, 0, 0, 64, 0, 0), sigma=sigma, generator=gen(8), return_info=True)
    e = info["e"]  # [B, 64, D]: 5120 draws
    assert abs(e.mean().item()) < 0.1 * sigma
    assert e.std().item() == pytest.approx(sigma, rel=0.05)


def test_synco_any_type_can_be_zero():
    q, queue = make(9)
    for t in range(6):
        counts = [0] * 6
        counts[t] = 3
        h = synco(q, queue, N, tuple(counts), generator=gen(9))
        assert h.shape == (B, 3, D) and close(h.norm(dim=-1), torch.ones(B, 3))
    assert synco(q, queue, N, (0,) * 6, generator=gen(9)).shape == (B, 0, D)
    assert synco(q, queue, 1, (2, 2, 0, 2, 2, 2), generator=gen(9)).shape == (B, 10, D)
    with pytest.raises(ValueError):
        synco(q, queue, 1, (0, 0, 2, 0, 0, 0), generator=gen(9))
    with pytest.raises(ValueError):
        synco(q, queue, N, (1, 2, 3), generator=gen(9))


# ---------------------------------------------------------------- common properties


def both(q, queue, **kw) -> list[torch.Tensor]:
    return [mochi(q, queue, N, 6, 3, **kw), synco(q, queue, N, (2, 2, 2, 2, 2, 2), **kw)]


def test_unit_norm_detached_and_gradient_reaches_q_only_through_the_logits():
    q, queue = make(10)
    q.requires_grad_()
    for h in both(q, queue, generator=gen(10)):
        assert not h.requires_grad and h.grad_fn is None
        assert close(h.norm(dim=-1), torch.ones(h.shape[:2]))
        l_syn = synthetic_logits(q, h)  # [B, M]
        for b in range(B):
            for m in range(h.shape[1]):
                assert abs(l_syn[b, m].item() - (q[b] @ h[b, m]).item()) < ATOL
        q.grad = None
        l_syn.sum().backward()
        assert torch.allclose(q.grad, h.sum(1), atol=ATOL)  # d/dq sum_m q.h_m with h constant


def test_seeded_generator_is_deterministic_and_seeds_differ():
    q, queue = make(11)
    for x, y, z in zip(both(q, queue, generator=gen(1)), both(q, queue, generator=gen(1)),
                       both(q, queue, generator=gen(2)), strict=True):
        assert torch.equal(x, y) and not torch.equal(x, z)
    torch.manual_seed(3)
    x = both(q, queue)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(x, both(q, queue), strict=True))


def test_precomputed_logits_give_the_same_points():
    q, queue = make(12)
    logits = q @ queue.T / 0.2  # [B, K] as the MoCo forward has them (any positive scale)
    plain, given = both(q, queue, generator=gen(5)), both(q, queue, generator=gen(5), logits=logits)
    assert all(torch.equal(x, y) for x, y in zip(plain, given, strict=True))
    with pytest.raises(ValueError):
        mochi(q, queue, N, 2, 2, gen(5), logits=logits[:, :-1])


def test_queue_rows_are_the_negatives():
    """The queue is [K, D] with unit rows; normalising it along dim 0 (a known bug) would move every point."""
    q, queue = make(13)
    assert not torch.allclose(queue.norm(dim=0), torch.ones(D), atol=0.1)  # columns are not unit
    h, info = synco(q, queue, N, (0, 0, 0, 0, 4, 0), generator=gen(13), return_info=True)
    assert close(h, F.normalize(queue[info["n"]] + 0.01 * q[:, None], dim=-1))
    wrong = F.normalize(queue, dim=0)
    assert not torch.allclose(h, F.normalize(wrong[info["n"]] + 0.01 * q[:, None], dim=-1), atol=1e-3)


def test_per_query_selection_differs_across_queries():
    q, queue = make(14)
    h, info = mochi(q, queue, N, 4, 4, gen(14), return_info=True)
    tops = [frozenset(t.tolist()) for t in info["top"]]
    assert len(set(tops)) == B
    assert all(set(info["j"][b].tolist()) <= tops[b] for b in range(B))


# ---------------------------------------------------------------- keyed draws (DDP equivalence)


def keyed(q, queue, index, seed, **kw):
    return [mochi(q, queue, N, 6, 3, query_index=index, seed=seed, **kw),
            synco(q, queue, N, (2, 2, 2, 2, 2, 2), query_index=index, seed=seed, **kw)]


def test_keyed_draws_do_not_depend_on_the_batch_split():
    """1 process with the global batch of 8, or 2 processes with 4 each: every query gets the same points."""
    q, queue = make(15, B=8)
    index = torch.arange(8)
    whole = keyed(q, queue, index, 1234)
    halves = [keyed(q[r * 4:(r + 1) * 4], queue, index[r * 4:(r + 1) * 4], 1234) for r in range(2)]
    for t in range(2):
        assert torch.equal(whole[t], torch.cat([halves[0][t], halves[1][t]]))
    # the batch order does not matter either, and precomputed logits change nothing
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = keyed(q[perm], queue, index[perm], 1234, logits=q[perm] @ queue.T)
    for t in range(2):
        assert torch.equal(whole[t][perm], shuffled[t])


def test_keyed_draws_change_with_seed_and_query_and_are_uniform():
    q, queue = make(16, B=2)
    q = q[[0, 0]]  # the same query twice, as two different global indices
    a = keyed(q, queue, torch.tensor([0, 1]), 1)
    b = keyed(q, queue, torch.tensor([0, 1]), 2)
    for x, y in zip(a, b, strict=True):
        assert not torch.equal(x[0], x[1]) and not torch.equal(x, y)
    _, info = mochi(q, queue, N, 600, 600, query_index=torch.tensor([0, 1]), seed=3, return_info=True)
    assert 0.45 < info["a"].mean() < 0.55 and 0.2 < info["b"].mean() < 0.3
    counts = torch.bincount(info["j"].flatten(), minlength=K)[info["top"][0]]  # uses of each hard negative
    assert counts.min() > 0.7 * counts.float().mean()
    with pytest.raises(ValueError, match="either"):
        mochi(q, queue, N, 2, 2, gen(0), query_index=torch.tensor([0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q, queue = make(17)
    index = torch.arange(B)
    for x, y in zip(keyed(q, queue, index, 7), keyed(q.cuda(), queue.cuda(), index.cuda(), 7), strict=True):
        assert y.is_cuda and torch.allclose(x, y.cpu(), atol=1e-5)
    on_cpu, on_cuda = both(q, queue, generator=gen(7)), both(q.cuda(), queue.cuda(), generator=gen(7))
    for x, y in zip(on_cpu, on_cuda, strict=True):  # a CPU generator drives CUDA tensors too
        assert y.is_cuda and torch.allclose(x, y.cpu(), atol=1e-5)
    cuda_gen = torch.Generator(device="cuda").manual_seed(7)
    assert both(q.cuda(), queue.cuda(), generator=cuda_gen)[1].is_cuda
