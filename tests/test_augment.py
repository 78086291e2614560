"""Batched aug+ ops against torchvision's per-image functional ops, and the keyed random draws."""

import itertools

import pytest
import torch
import torchvision.transforms.functional as TF

from pipeline.data import augment as A


def _images(B: int = 12, H: int = 20, W: int = 24) -> torch.Tensor:
    """Random images plus the corner cases of the HSV code: grey, black, white, ties between channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, H, W, generator=g)  # [B, 3, H, W]
    x[0] = x[0, :1]  # grey: chroma 0
    x[1, :, :4] = 0.0
    x[1, :, 4:8] = 1.0
    x[2, 0] = x[2, 1]  # r == g
    x[3, 1] = x[3, 2]  # g == b
    x[4, 0] = x[4, 2]  # r == b
    x[5] = (x[5] * 8).round() / 8  # many exact ties
    return x


def _per_image(op, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    return torch.stack([op(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


@pytest.mark.parametrize("ours, reference, lo, hi", [
    (A.adjust_brightness, TF.adjust_brightness, 0.3, 1.7),
    (A.adjust_contrast, TF.adjust_contrast, 0.3, 1.7),
    (A.adjust_saturation, TF.adjust_saturation, 0.0, 1.7),
    (A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_ops_match_torchvision(ours, reference, lo, hi):
    x = _images()
    f = torch.linspace(lo, hi, len(x))[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))]
    out = ours(x.clone(), f)
    torch.testing.assert_close(out, _per_image(reference, x, f), atol=1e-5, rtol=0)
    assert not torch.equal(out, x)


def test_hue_identity_and_full_turn():
    x = _images()
    torch.testing.assert_close(A.adjust_hue(x, torch.zeros(len(x))), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.adjust_hue(A.adjust_hue(x, torch.full((len(x),), 0.3)),
                                            torch.full((len(x),), -0.3)), x, atol=1e-5, rtol=0)


def test_grayscale_and_flip_match_torchvision():
    x = _images()
    torch.testing.assert_close(A.to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    assert torch.equal(A.hflip(x), TF.hflip(x))


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = _images(H=30, W=28)
    sigma = torch.linspace(0.1, 2.0, len(x))
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel_size, kernel_size], [sigma[i].item()] * 2)
                       for i in range(len(x))])
    torch.testing.assert_close(A.gaussian_blur(x, sigma, kernel_size), ref, atol=1e-5, rtol=0)


def test_blur_kernel_size():
    assert [A.blur_kernel_size(r) for r in (32, 64, 96, 224)] == [3, 7, 9, 23]


def test_to_float_and_normalize_match_to_tensor_and_normalize():
    images = torch.randint(0, 256, (4, 10, 12, 3), dtype=torch.uint8)  # [B, H, W, 3] as ffcv gives them
    ref = torch.stack([TF.normalize(TF.to_tensor(im.numpy()), A.IMAGENET_MEAN, A.IMAGENET_STD) for im in images])
    torch.testing.assert_close(A.normalize(A.to_float(images)), ref, atol=1e-6, rtol=0)


def _reference_apply(x: torch.Tensor, d: A.AugDraws, kernel_size: int) -> torch.Tensor:
    """aug+ one image at a time with torchvision ops, in torchvision's order (jitter in the drawn order)."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i, img in enumerate(x):
        if d.jitter[i]:
            for op_id in d.order[i].tolist():
                img = ops[op_id](img, d.factors[i, op_id].item())
        if d.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if d.blur[i]:
            img = TF.gaussian_blur(img, [kernel_size] * 2, [d.sigma[i].item()] * 2)
        if d.flip[i]:
            img = TF.hflip(img)
        out.append(img)
    return torch.stack(out)


def test_apply_equals_per_image_reference():
    x = _images(B=48, H=16, W=16)
    d = A.draw(A.sample_keys(seed=5, epoch=2, view=1, index=torch.arange(48)), A.AugParams())
    assert 0 < d.jitter.sum() < 48 and 0 < d.gray.sum() < 48 and 0 < d.blur.sum() < 48 and 0 < d.flip.sum() < 48
    assert len({tuple(o) for o in d.order[d.jitter].tolist()}) > 4  # several jitter orders in one batch
    torch.testing.assert_close(A.apply(x.clone(), d, 5), _reference_apply(x, d, 5), atol=2e-5, rtol=0)


def test_mix64_matches_python_splitmix64():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randint(-2**63, 2**63 - 1, (200,), generator=g), torch.tensor([0, 1, -1, 2**63 - 1])])
    ref = [A._signed(A.mix64_int(v & (2**64 - 1))) for v in z.tolist()]
    assert A.mix64(z).tolist() == ref
    assert A.mix64_int(0) == 0xE220A8397B1DCDAF  # splitmix64's first output from state 0


def test_keys_depend_on_every_part():
    index = torch.arange(100)
    base = A.sample_keys(1, 2, 0, index)
    assert torch.equal(base, A.sample_keys(1, 2, 0, index))
    assert len(set(base.tolist())) == 100
    for other in (A.sample_keys(2, 2, 0, index), A.sample_keys(1, 3, 0, index), A.sample_keys(1, 2, 1, index)):
        assert (other != base).all()
    u = A.uniform(base, A.JITTER)
    assert ((u >= 0) & (u < 1)).all() and not torch.equal(u, A.uniform(base, A.GRAY))


def _within(rate_hits: torch.Tensor, p: float, sigmas: float = 5.0) -> bool:
    n = rate_hits.numel()
    return abs(rate_hits.float().mean().item() - p) < sigmas * (p * (1 - p) / n) ** 0.5


def test_draw_rates_and_ranges():
    n, aug = 4000, A.AugParams()
    d = A.draw(A.sample_keys(0, 0, 0, torch.arange(n)), aug)
    assert _within(d.jitter, 0.8) and _within(d.gray, 0.2) and _within(d.blur, 0.5) and _within(d.flip, 0.5)
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert ((d.factors >= lo) & (d.factors <= hi)).all()
    assert (d.factors.mean(0) - (lo + hi) / 2).abs().max() < 0.02
    assert (d.sigma >= 0.1).all() and (d.sigma <= 2.0).all() and abs(d.sigma.mean() - 1.05) < 0.05
    orders = [tuple(o) for o in d.order.tolist()]
    sd = (1 / 24 * 23 / 24 / n) ** 0.5
    assert all(abs(orders.count(p) / n - 1 / 24) < 5 * sd for p in itertools.permutations(range(4)))


def test_two_views_draw_independently():
    n, aug = 4000, A.AugParams()
    d0 = A.draw(A.sample_keys(0, 0, 0, torch.arange(n)), aug)
    d1 = A.draw(A.sample_keys(0, 0, 1, torch.arange(n)), aug)
    both_gray = (d0.gray & d1.gray).float().mean().item()
    assert abs(both_gray - 0.04) < 5 * (0.04 * 0.96 / n) ** 0.5  # P(gray in both) = 0.2^2
    r = torch.corrcoef(torch.stack([d0.factors[:, 3], d1.factors[:, 3]]))[0, 1]
    assert abs(r) < 0.1


def test_moco_v2_augment_shapes_and_determinism():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    index = torch.tensor([4, 8, 15, 16, 23, 42])
    aug = A.MocoV2Augment(A.AugParams(), seed=0, view=0)
    x = aug(images, index, epoch=3)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, aug(images, index, epoch=3))
    assert not torch.equal(x, aug(images, index, epoch=4))
    # a sample's view depends on its dataset index, not on its position in the batch
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert torch.equal(aug(images[perm], index[perm], epoch=3), x[perm])
