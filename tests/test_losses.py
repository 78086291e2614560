"""InfoNCE, DCL, HCL and drop_hardest against slow, obvious references written from the papers' formulas."""

import math

import pytest
import torch

from pipeline.losses import LOSSES, contrastive_loss, dcl, drop_hardest, hcl, infonce


def sims(B: int, M: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of random unit vectors: pos [B], neg [B, M]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, 2 + M, 8, generator=g, dtype=dtype), dim=-1)
    s = torch.einsum("bd,bmd->bm", x[:, 0], x[:, 1:])  # [B, 1 + M]
    return s[:, 0] + 0.3, s[:, 1:]  # the positive a bit closer, as after some training


def present(row: torch.Tensor) -> list[float]:
    return [v for v in row.tolist() if v != -math.inf]


def infonce_ref(pos, neg, T):
    out = []
    for p, row in zip(pos.tolist(), neg, strict=True):
        denominator = math.exp(p / T) + sum(math.exp(n / T) for n in present(row))
        out.append(-math.log(math.exp(p / T) / denominator))
    return sum(out) / len(out)


def debiased_ref(pos, neg, T, tau_plus, beta=None):
    """Chuang et al.: -log e^{p/T} / (e^{p/T} + N g), g = max((E[e^{n/T}] - tau+ e^{p/T}) / (1 - tau+),
    e^{-1/T}), E the plain mean (DCL) or the mean under weights e^{beta n/T} (HCL, Robinson et al.)."""
    out, clamped = [], []
    for p, row in zip(pos.tolist(), neg, strict=True):
        ns = present(row)
        N = len(ns)
        w = [1.0] * N if beta is None else [math.exp(beta * n / T) for n in ns]
        mean = sum(wi * math.exp(n / T) for wi, n in zip(w, ns, strict=True)) / sum(w)
        g_raw = (mean - tau_plus * math.exp(p / T)) / (1 - tau_plus)
        g = max(g_raw, math.exp(-1 / T))
        clamped.append(g_raw < math.exp(-1 / T))
        out.append(-math.log(math.exp(p / T) / (math.exp(p / T) + N * g)))
    return sum(out) / len(out), clamped


def reference_code_form(pos, neg, T, tau_plus, beta):
    """HCL's released estimator on exp'd similarities: imp = neg^beta, N sum(imp neg) / sum(imp)."""
    e_pos, e_neg = torch.exp(pos / T), torch.exp(neg / T)
    N = neg.shape[1]
    imp = e_neg**beta
    reweight = (imp * e_neg).sum(-1) / imp.mean(-1)
    Ng = torch.clamp((-tau_plus * N * e_pos + reweight) / (1 - tau_plus), min=N * math.exp(-1 / T))
    return (-torch.log(e_pos / (e_pos + Ng))).mean()


def test_infonce_is_moco_cross_entropy():
    pos, neg = sims(6, 20)
    assert infonce(pos, neg, 0.2).item() == pytest.approx(infonce_ref(pos, neg, 0.2), rel=1e-12)


@pytest.mark.parametrize("T", [0.07, 0.2, 0.5])
@pytest.mark.parametrize("tau_plus", [0.0, 0.01, 0.1, 0.5])
def test_dcl_matches_published_formula(T, tau_plus):
    pos, neg = sims(16, 30, seed=1)
    ref, _ = debiased_ref(pos, neg, T, tau_plus)
    assert dcl(pos, neg, T, tau_plus).item() == pytest.approx(ref, rel=1e-10)


def test_dcl_clamp_branch_is_exercised_and_correct():
    # a large class prior makes the debiased mean negative for queries whose positive is very close
    pos, neg = sims(32, 10, seed=2)
    pos = pos.clone()
    pos[:16] = 0.99
    ref, clamped = debiased_ref(pos, neg, 0.5, 0.6)
    assert any(clamped) and not all(clamped)
    assert dcl(pos, neg, 0.5, 0.6).item() == pytest.approx(ref, rel=1e-10)
    ref, clamped = debiased_ref(pos, neg, 0.5, 0.6, 1.0)
    assert any(clamped) and not all(clamped)
    assert hcl(pos, neg, 0.5, 0.6, 1.0).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("tau_plus", [0.0, 0.1])
def test_hcl_matches_published_formula_and_reference_code(beta, tau_plus):
    pos, neg = sims(16, 30, seed=3)
    ref, _ = debiased_ref(pos, neg, 0.2, tau_plus, beta)
    assert hcl(pos, neg, 0.2, tau_plus, beta).item() == pytest.approx(ref, rel=1e-10)
    assert hcl(pos, neg, 0.2, tau_plus, beta).item() == pytest.approx(
        reference_code_form(pos, neg, 0.2, tau_plus, beta).item(), rel=1e-10)


def test_hcl_gradient_flows_through_the_weights_as_in_the_reference_code():
    pos, neg = sims(8, 12, seed=4)
    grads = []
    for f in (lambda p, n: hcl(p, n, 0.2, 0.1, 1.0), lambda p, n: reference_code_form(p, n, 0.2, 0.1, 1.0)):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        f(p, n).backward()
        grads.append((p.grad, n.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def test_hcl_with_beta_zero_is_dcl():
    pos, neg = sims(16, 30, seed=5)
    for tau_plus in (0.0, 0.1, 0.3):
        assert torch.allclose(hcl(pos, neg, 0.2, tau_plus, 0.0), dcl(pos, neg, 0.2, tau_plus), rtol=1e-12)
    dropped = drop_hardest(neg, 0.1)  # and with absent negatives (beta * -inf must not become nan)
    assert torch.allclose(hcl(pos, dropped, 0.2, 0.1, 0.0), dcl(pos, dropped, 0.2, 0.1), rtol=1e-12)


def test_dcl_with_tau_plus_zero_is_infonce_exactly_when_the_clamp_is_inactive():
    # tau+ = 0: g = max(mean_i e^{n_i/T}, e^{-1/T}), so N g = sum_i e^{n_i/T}, InfoNCE's denominator, unless
    # the mean falls below e^{-1/T}; for cosine similarities (all >= -1) it never does.
    pos, neg = sims(16, 30, seed=6)
    assert dcl(pos, neg, 0.2, 0.0).item() == pytest.approx(infonce(pos, neg, 0.2).item(), rel=1e-12)
    # similarities below -1 (not unit vectors): the clamp replaces the sum by N e^{-1/T}
    far = torch.full_like(neg, -3.0)
    expected = -torch.log(torch.exp(pos / 0.2) / (torch.exp(pos / 0.2) + 30 * math.exp(-1 / 0.2))).mean()
    assert dcl(pos, far, 0.2, 0.0).item() == pytest.approx(expected.item(), rel=1e-12)
    assert dcl(pos, far, 0.2, 0.0).item() > infonce(pos, far, 0.2).item() + 1e-3


@pytest.mark.parametrize("fraction, M, k", [(0.1, 30, 3), (0.25, 10, 3), (0.07, 100, 7), (0.001, 65536, 66),
                                            (0.001, 16384, 17), (0.0, 30, 0)])
def test_drop_hardest_removes_exactly_the_hardest_per_query(fraction, M, k):
    pos, neg = sims(3, M, seed=7)
    out = drop_hardest(neg, fraction)
    for b in range(neg.shape[0]):
        order = sorted(range(M), key=lambda m: -neg[b, m].item())
        dropped = {m for m in range(M) if out[b, m] == -math.inf}
        assert dropped == set(order[:k])
        kept = [m for m in range(M) if m not in dropped]
        assert torch.equal(out[b, kept], neg[b, kept])


def test_drop_hardest_rejects_dropping_everything():
    with pytest.raises(ValueError):
        drop_hardest(torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize("name", LOSSES)
def test_dropped_negatives_are_absent_for_every_loss(name):
    """A loss on neg with -inf entries equals the loss on the kept entries only (N counts the kept ones)."""
    pos, neg = sims(8, 20, seed=8)
    dropped = drop_hardest(neg, 0.2)  # 4 per row
    kept = dropped[dropped.isfinite()].view(8, 16)  # [B, 16]
    full = contrastive_loss(name, pos, dropped, 0.2, 0.1, 1.0)
    assert full.item() == pytest.approx(contrastive_loss(name, pos, kept, 0.2, 0.1, 1.0).item(), rel=1e-12)
    p, n = pos.clone().requires_grad_(), dropped.clone().requires_grad_()
    contrastive_loss(name, p, n, 0.2, 0.1, 1.0).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(n.grad).all()
    assert (n.grad[~dropped.isfinite()] == 0).all()


def test_losses_with_ragged_drops_match_the_reference():
    pos, neg = sims(6, 12, seed=9)
    neg = neg.clone()
    neg[0, :5] = -math.inf  # rows with different numbers of absent negatives
    neg[3, 7] = -math.inf
    assert infonce(pos, neg, 0.2).item() == pytest.approx(infonce_ref(pos, neg, 0.2), rel=1e-12)
    assert dcl(pos, neg, 0.2, 0.1).item() == pytest.approx(debiased_ref(pos, neg, 0.2, 0.1)[0], rel=1e-10)
    ref, _ = debiased_ref(pos, neg, 0.2, 0.1, 2.0)
    assert hcl(pos, neg, 0.2, 0.1, 2.0).item() == pytest.approx(ref, rel=1e-10)


def test_small_temperature_does_not_overflow_in_float32():
    pos, neg = sims(8, 50, seed=10)
    T = 0.01  # e^{1/T} = e^100 overflows float32
    for loss, ref in ((dcl(pos.float(), neg.float(), T, 0.1), debiased_ref(pos, neg, T, 0.1)[0]),
                      (hcl(pos.float(), neg.float(), T, 0.1, 1.0), debiased_ref(pos, neg, T, 0.1, 1.0)[0])):
        assert torch.isfinite(loss)
        assert loss.item() == pytest.approx(ref, rel=1e-4)


def test_dispatcher_and_argument_checks():
    pos, neg = sims(4, 10, seed=11)
    assert contrastive_loss("infonce", pos, neg, 0.2, 0.1, 1.0) == infonce(pos, neg, 0.2)
    assert contrastive_loss("dcl", pos, neg, 0.2, 0.1, 1.0) == dcl(pos, neg, 0.2, 0.1)
    assert contrastive_loss("hcl", pos, neg, 0.2, 0.1, 2.0) == hcl(pos, neg, 0.2, 0.1, 2.0)
    with pytest.raises(ValueError, match="unknown loss"):
        contrastive_loss("nce", pos, neg, 0.2, 0.1, 1.0)
    with pytest.raises(ValueError, match="tau_plus"):
        dcl(pos, neg, 0.2, 1.0)
