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


# ---- the CPU path (numba, colour_cpu.py) and the device path against torchvision and each other ---------


def _uint8_images(B: int = 12, H: int = 20, W: int = 24) -> torch.Tensor:
    """uint8 [B, H, W, 3] crops as the decoder gives them, with _images' corner cases (grey, black, white,
    ties) and a red-ish sample whose hue sits at the 0/1 wrap-around."""
    x = (_images(B, H, W) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    x[6, 0], x[6, 1], x[6, 2] = 250, 10, x[6, 2] % 20  # hue just above and below 0 (b > g on some pixels)
    return x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]


def _identity_draws(B: int, **changes) -> A.AugDraws:
    """Draws that leave an image as it is (jitter on with identity factors, unless changed)."""
    d = A.AugDraws(jitter=torch.ones(B, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * B),
                   order=torch.tensor([[0, 1, 2, 3]] * B), gray=torch.zeros(B, dtype=torch.bool),
                   blur=torch.zeros(B, dtype=torch.bool), sigma=torch.ones(B), flip=torch.zeros(B, dtype=torch.bool))
    for k, v in changes.items():
        setattr(d, k, v)
    return d


def _levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, H, W] -> 0..255 scale."""
    mean = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    return (normalised * std + mean) * 255


_TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.mark.parametrize("op_id, lo, hi, levels", [(0, 0.3, 1.7, 1), (1, 0.3, 1.7, 1), (2, 0.0, 1.7, 1),
                                                    (3, -0.5, 0.5, 2)])
def test_cpu_jitter_op_matches_torchvision(op_id, lo, hi, levels):
    """Each ColorJitter op of the numba path alone (the other factors are identities) vs torchvision's functional
    op at the same factor: within the issue's bound in levels of 255, and in fact within float rounding."""
    images = _uint8_images()
    B = len(images)
    f = torch.linspace(lo, hi, B)[torch.randperm(B, generator=torch.Generator().manual_seed(1))]  # [B]
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * B)
    factors[:, op_id] = f
    order = torch.tensor([[op_id] + [o for o in range(4) if o != op_id]] * B)  # the op first
    out = _levels(A.apply_cpu(images, _identity_draws(B, factors=factors, order=order), 3))
    x = images.permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W]
    ref = _per_image(_TV_JITTER[op_id], x, f) * 255
    assert (out - ref).abs().max() <= levels
    torch.testing.assert_close(out, ref, atol=255 * 2e-5, rtol=0)
    assert (out - x * 255).abs().max() > 10  # the op did something


def test_cpu_hue_wraps_around():
    """Hue rotations of +-0.5 turn and across red (hue 0 = 1) land where torchvision's do."""
    images = _uint8_images()
    B = len(images)
    x = images.permute(0, 3, 1, 2).float() / 255
    hue_first = torch.tensor([[3, 0, 1, 2]] * B)
    for shift in (-0.5, -0.49, -0.1, 0.1, 0.49, 0.5):
        factors = torch.tensor([[1.0, 1.0, 1.0, shift]] * B)
        out = _levels(A.apply_cpu(images, _identity_draws(B, factors=factors, order=hue_first), 3))
        ref = _per_image(TF.adjust_hue, x, torch.full((B,), shift)) * 255
        assert (out - ref).abs().max() <= 2, shift


def test_cpu_grayscale_and_flip_match_torchvision():
    images = _uint8_images()
    B = len(images)
    x = images.permute(0, 3, 1, 2).float() / 255
    gray = _levels(A.apply_cpu(images, _identity_draws(B, gray=torch.ones(B, dtype=torch.bool)), 3))
    assert (gray - TF.rgb_to_grayscale(x, num_output_channels=3) * 255).abs().max() <= 1
    flip = _levels(A.apply_cpu(images, _identity_draws(B, flip=torch.ones(B, dtype=torch.bool)), 3))
    assert (flip - TF.hflip(x) * 255).abs().max() <= 1
    assert (flip - x * 255).abs().max() > 10


@pytest.mark.parametrize("res", [24, 64, 224])
def test_cpu_blur_matches_torchvision_with_the_kernel_size_rule(res):
    """MocoV2Augment's blur at crop side res uses blur_kernel_size(res) taps; vs torchvision's gaussian_blur
    over the whole sigma range (skipped negligible taps included)."""
    images = _uint8_images(B=8, H=res, W=res)
    B, K = len(images), A.blur_kernel_size(res)
    sigma = torch.linspace(0.1, 2.0, B)
    out = _levels(A.apply_cpu(images, _identity_draws(B, blur=torch.ones(B, dtype=torch.bool), sigma=sigma), K))
    x = images.permute(0, 3, 1, 2).float() / 255
    ref = torch.stack([TF.gaussian_blur(x[i], [K, K], [sigma[i].item()] * 2) for i in range(B)]) * 255
    assert (out - ref).abs().max() <= 2
    torch.testing.assert_close(out, ref, atol=255 * 2e-5, rtol=0)


@pytest.mark.parametrize("res", [16, 40])
def test_cpu_path_equals_per_image_torchvision_reference(res):
    """The whole chain as the loader runs it (MocoV2Augment on uint8 crops, drawn parameters) vs torchvision's
    ops one image at a time in aug+'s order."""
    B = 48
    images = torch.randint(0, 256, (B, res, res, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    index = torch.arange(100, 100 + B)
    aug = A.MocoV2Augment(A.AugParams(), seed=5, view=1)
    d = aug.draws(index, epoch=2)
    ref = _reference_apply(images.permute(0, 3, 1, 2).float() / 255, d, A.blur_kernel_size(res))
    torch.testing.assert_close(_levels(aug(images, index, epoch=2)), ref * 255, atol=255 * 3e-5, rtol=0)


def test_device_path_run_on_cpu_matches_cpu_path():
    """colour_augment (the torch ops the training step runs on its GPU) with device cpu vs the loader's numba
    path: the same draws, so float rounding apart the same views."""
    B, res, aug = 64, 32, A.AugParams()
    views = torch.randint(0, 256, (B, 2, res, res, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(4))[:B]
    device = A.colour_augment(views, index, 7, "cpu", aug, seed=11)
    cpu = [A.MocoV2Augment(aug, seed=11, view=v)(views[:, v], index, 7) for v in (0, 1)]
    assert len(device) == 2
    for a, b in zip(device, cpu, strict=True):
        assert a.shape == (B, 3, res, res) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (device[0] - device[1]).abs().max() > 0.5  # two views, two draws


def test_device_path_places_everything_on_the_gpu_fake_cuda():
    """Under FakeTensorMode (no GPU needed) a uint8 CPU batch goes to 'cuda' and every op stays there: a CPU
    tensor meeting a cuda one would raise; nothing depends on data (no host sync)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    views = torch.randint(0, 256, (8, 2, 32, 32, 3), dtype=torch.uint8)  # as the loader yields them
    index = torch.arange(8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x1, x2 = A.colour_augment(views, index, 3, "cuda", A.AugParams(), seed=0)
    for x in (x1, x2):
        assert x.device.type == "cuda" and x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_resolve_augment_device():
    assert A.resolve_augment_device("auto", torch.device("cpu")) == torch.device("cpu")
    assert A.resolve_augment_device("auto", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert A.resolve_augment_device("cpu", torch.device("cuda", 0)) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="data.augment_device"):
            A.resolve_augment_device("cuda", torch.device("cpu"))


# ---- goodness of fit of the drawn parameters to aug+ --------------------------------------------------


def _chi2_p(observed: torch.Tensor, expected: torch.Tensor, dof: int) -> float:
    """p-value of Pearson's chi-square statistic (upper regularised incomplete gamma)."""
    chi2 = ((observed.double() - expected.double()) ** 2 / expected.double()).sum()
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()


def _uniform_p(u: torch.Tensor, lo: float, hi: float, bins: int = 20) -> float:
    counts = torch.histc(u.double(), bins=bins, min=lo, max=hi)
    assert counts.sum() == len(u)  # nothing outside [lo, hi]
    return _chi2_p(counts, torch.full((bins,), len(u) / bins), bins - 1)


def _bernoulli_p(flags: torch.Tensor, p: float) -> float:
    hits = flags.sum()
    return _chi2_p(torch.stack([hits, len(flags) - hits]), torch.tensor([p, 1 - p]) * len(flags), 1)


def test_drawn_parameters_fit_aug_plus():
    """Chi-square goodness of fit over 40000 draws (view 0 and 1) to MoCo v2's aug+: jitter p 0.8 with factors
    U(0.6, 1.4) x3 and hue U(-0.1, 0.1), its 24 orders equally likely, grayscale p 0.2, blur p 0.5 with
    sigma U(0.1, 2), flip p 0.5, the four coins independent. The draws are a fixed hash, so the test is
    deterministic; a 1e-3 level still has the power to reject rates 0.01 off (checked below)."""
    n, aug = 40000, A.AugParams()
    for view in (0, 1):
        d = A.draw(A.sample_keys(0, 3, view, torch.arange(n)), aug)
        p = {"jitter": _bernoulli_p(d.jitter, 0.8), "gray": _bernoulli_p(d.gray, 0.2),
             "blur": _bernoulli_p(d.blur, 0.5), "flip": _bernoulli_p(d.flip, 0.5),
             "sigma": _uniform_p(d.sigma, 0.1, 2.0), "hue": _uniform_p(d.factors[:, 3], -0.1, 0.1)}
        for i, name in enumerate(("brightness", "contrast", "saturation")):
            p[name] = _uniform_p(d.factors[:, i], 0.6, 1.4)
        order_ix = (d.order * torch.tensor([1, 4, 16, 64])).sum(1)  # one id per permutation
        counts = torch.stack([(order_ix == v).sum() for v in order_ix.unique()])
        assert len(counts) == 24
        p["order"] = _chi2_p(counts, torch.full((24,), n / 24), 23)
        coins = torch.stack([d.jitter, d.gray, d.blur, d.flip], 1).long() @ torch.tensor([1, 2, 4, 8])  # [n]
        probs = torch.tensor([[0.2, 0.8], [0.8, 0.2], [0.5, 0.5], [0.5, 0.5]])
        joint = torch.tensor([probs[0, c & 1] * probs[1, c >> 1 & 1] * probs[2, c >> 2 & 1] * probs[3, c >> 3 & 1]
                              for c in range(16)])
        p["independence"] = _chi2_p(torch.bincount(coins, minlength=16), joint * n, 15)
        assert min(p.values()) > 1e-3, p
    # the test can fail: the same draws against rates 0.01 off, a range 2% too wide
    assert _bernoulli_p(d.gray, 0.21) < 1e-3 and _bernoulli_p(d.jitter, 0.79) < 1e-3
    assert _uniform_p(d.sigma, 0.1, 2.04) < 1e-3
