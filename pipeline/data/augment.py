"""MoCo v2 aug+ colour ops, batched in torch with per-sample parameters.

The crop happens in the FFCV decoder (see ffcv_io.py); everything after it runs here on whole batches.
Every random draw is a counter-based hash of (seed, epoch, view, sample index, stream), never a shared
stateful generator, so a batch does not depend on the number of loader workers or on which epochs ran
before it (resume).
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.colour_cpu import augment_views

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One stream id per random quantity of a sample; the crop uses 4 per attempt, 10 attempts (ffcv_io.py).
CROP_STREAM = 0
FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, BLUR, SIGMA = range(40, 50)

# the 24 orders in which ColorJitter may apply brightness (0), contrast (1), saturation (2), hue (3)
JITTER_ORDERS = torch.tensor(list(itertools.permutations(range(4))))  # [24, 4]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class AugParams:
    """MoCo v2 aug+ (Chen et al. 2020, main_moco.py) parameters."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_blur: float = 0.5
    p_flip: float = 0.5


@dataclass
class AugDraws:
    """Per-sample parameters of one view; the flags let tests check the rates."""

    jitter: Tensor  # [B] bool
    factors: Tensor  # [B, 4] brightness, contrast, saturation, hue
    order: Tensor  # [B, 4] position k -> op id applied k-th
    gray: Tensor  # [B] bool
    blur: Tensor  # [B] bool
    sigma: Tensor  # [B]
    flip: Tensor  # [B] bool


def blur_kernel_size(res: int) -> int:
    """Odd kernel of ~10% of the side, as SimCLR/BYOL (23 at 224)."""
    return 2 * int(0.05 * res) + 1


# ---- counter-based random numbers -------------------------------------------------------------------


def mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (mod 2**64): the reference for the tensor and numba versions."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _signed(z: int) -> int:
    return z - (1 << 64) if z >= 1 << 63 else z


def _shr(z: Tensor, s: int) -> Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift on int64


def mix64(z: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (two's complement wrap-around = arithmetic mod 2**64)."""
    z = z + _signed(0x9E3779B97F4A7C15)  # [N]
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)  # [N]
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)  # [N]
    return z ^ _shr(z, 31)  # [N]


def view_key(seed: int, epoch: int, view: int) -> int:
    """Key of one (seed, epoch, view); the decoder computes the same from the epoch at run time."""
    return mix64_int((mix64_int((mix64_int(seed & _MASK64) + epoch) & _MASK64) + view) & _MASK64)


def sample_keys(seed: int, epoch: int, view: int, index: Tensor) -> Tensor:
    """Key of each sample [B] int64 from its dataset index [B]."""
    return mix64(index.long() + _signed(view_key(seed, epoch, view)))  # [B]


def uniform(keys: Tensor, stream: int) -> Tensor:
    """U[0, 1) float64 from the top 53 bits of hash(key, stream)."""
    return _shr(mix64(keys + stream), 11).double() * 2.0**-53  # [B]


# ---- batched ops (x: float [B, 3, H, W] in [0, 1], one parameter per sample) -------------------------


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma as torchvision: [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.unbind(1)  # [B, H, W] each
    return (r * 0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)  # [B, 1, H, W]


def _blend(x: Tensor, y: Tensor, f: Tensor) -> Tensor:
    """torchvision's f x + (1 - f) y, clamped to [0, 1]; y broadcasts over channels."""
    f = f.view(-1, 1, 1, 1).to(x.dtype)  # [B, 1, 1, 1]
    return torch.addcmul((1.0 - f) * y, x, f).clamp_(0.0, 1.0)  # [B, 3, H, W]


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)  # [B, 3, H, W]


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    w = torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype, device=x.device)  # [3]
    mean = (x.mean(dim=(2, 3)) @ w).view(-1, 1, 1, 1)  # [B, 1, 1, 1] mean of the grayscale image
    return _blend(x, mean, f)  # [B, 3, H, W]


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, rgb_to_grayscale(x), f)  # [B, 3, H, W]


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the HSV hue by f [B] in [-0.5, 0.5] turns; same result as torchvision's rgb->hsv->rgb.

    Closed form of hsv->rgb: channel_n = V - C clamp(2 - |k_n - 2|, 0, 1), k_n = (6 H + n) mod 6 with
    n = 5, 3, 1 for R, G, B; it needs neither S nor a six-way select (torch.where and remainder are
    slow on CPU).
    """
    r, g, b = x.unbind(1)  # [B, H, W] each
    maxc = x.amax(dim=1)  # [B, H, W] = V
    chroma = maxc - x.amin(dim=1)  # [B, H, W] = C
    is_r = (r == maxc).to(x.dtype)  # [B, H, W]; ties pick r, then g, as torchvision (float: bool math is slow)
    is_g = (g == maxc).to(x.dtype) * (1.0 - is_r)  # [B, H, W]
    is_b = 1.0 - is_r - is_g  # [B, H, W]
    hc = (g - b) * is_r + (b - r + 2 * chroma) * is_g + (r - g + 4 * chroma) * is_b  # [B, H, W] = 6 H C
    turns = hc.div_(chroma.clamp_min(1e-12).mul_(6.0)).add_(f.view(-1, 1, 1).to(x.dtype))  # [B, H, W] H + f
    n = torch.tensor([17 / 6, 15 / 6, 13 / 6], dtype=x.dtype, device=x.device)  # (n + 12) / 6 keeps k > 0
    k = (turns.unsqueeze(1) + n.view(1, 3, 1, 1)).frac_().mul_(6.0)  # [B, 3, H, W] in [0, 6)
    t = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # [B, 3, H, W]
    return t.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))  # [B, 3, H, W]


def to_grayscale(x: Tensor) -> Tensor:
    return rgb_to_grayscale(x).expand_as(x)  # [B, 3, H, W]


def gaussian_kernel1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised Gaussian taps per sample, as torchvision's: sigma [B] -> [B, kernel_size]."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=sigma.device)  # [K]
    pdf = torch.exp(-0.5 * (t / sigma.float().view(-1, 1)).pow(2))  # [B, K]
    return pdf / pdf.sum(dim=1, keepdim=True)  # [B, K]


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable blur with reflect padding, one sigma per sample, as shifted multiply-adds (a grouped conv
    would need a new oneDNN primitive for every count of blurred samples)."""
    B, C, H, W = x.shape
    p = kernel_size // 2
    k = gaussian_kernel1d(sigma, kernel_size).to(x.dtype).view(B, 1, 1, kernel_size)  # [B, 1, 1, K]
    x = F.pad(x, (p, p, p, p), mode="reflect")  # [B, C, H + 2p, W + 2p]
    rows = x[..., :W] * k[..., :1]  # [B, C, H + 2p, W]
    for j in range(1, kernel_size):
        rows.addcmul_(x[..., j:j + W], k[..., j:j + 1])
    out = rows[:, :, :H] * k[..., :1]  # [B, C, H, W]
    for j in range(1, kernel_size):
        out.addcmul_(rows[:, :, j:j + H], k[..., j:j + 1])
    return out


def hflip(x: Tensor) -> Tensor:
    return x.flip(-1)  # [B, 3, H, W]


def apply_where(x: Tensor, flag: Tensor, op: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """Apply op to the flagged samples only (gather, op, scatter back in place)."""
    idx = flag.nonzero().squeeze(1)  # [n]
    if idx.numel():
        x.index_copy_(0, idx, op(x.index_select(0, idx), *(p[idx] for p in params)))  # [n, 3, H, W] in x
    return x


# ---- aug+ ---------------------------------------------------------------------------------------------


def draw(keys: Tensor, aug: AugParams) -> AugDraws:
    """All per-sample parameters of aug+ after the crop, each from its own stream."""
    b, c, s, h = aug.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], dtype=torch.float64)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
    u = torch.stack([uniform(keys, st) for st in (BRIGHTNESS, CONTRAST, SATURATION, HUE)], dim=1)  # [B, 4]
    order_ix = (uniform(keys, ORDER) * len(JITTER_ORDERS)).long()  # [B]
    s0, s1 = aug.blur_sigma
    return AugDraws(
        jitter=uniform(keys, JITTER) < aug.p_jitter,
        factors=(lo.to(keys.device) + (hi - lo).to(keys.device) * u).float(),  # [B, 4]
        order=JITTER_ORDERS.to(keys.device)[order_ix],  # [B, 4]
        gray=uniform(keys, GRAY) < aug.p_gray,
        blur=uniform(keys, BLUR) < aug.p_blur,
        sigma=(s0 + (s1 - s0) * uniform(keys, SIGMA)).float(),  # [B]
        flip=uniform(keys, FLIP) < aug.p_flip,
    )


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _where(flag: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Per sample: y where flag [B], else x (no host sync, unlike selecting the flagged samples)."""
    return torch.where(flag.view(-1, 1, 1, 1), y, x)  # [B, 3, H, W]


def apply(x: Tensor, d: AugDraws, kernel_size: int) -> Tensor:
    """ColorJitter (per-sample random order) p, grayscale p, blur p, flip p, in MoCo's order, on any device.

    Every op runs on the whole batch and a per-sample mask keeps its result or the input: more arithmetic
    than selecting the samples an op applies to, but no data-dependent shapes, hence no host sync on a GPU
    and it traces under FakeTensorMode. The CPU loader uses colour_cpu.augment_views instead (same math).
    """
    for k in range(4):  # position in the jitter order
        for op_id, op in enumerate(_JITTER_OPS):
            x = _where(d.jitter & (d.order[:, k] == op_id), op(x, d.factors[:, op_id]), x)  # [B, 3, H, W]
    x = _where(d.gray, to_grayscale(x), x)  # [B, 3, H, W]
    x = _where(d.blur, gaussian_blur(x, d.sigma, kernel_size), x)  # [B, 3, H, W]
    return _where(d.flip, hflip(x), x)  # [B, 3, H, W]


def apply_cpu(images: Tensor, d: AugDraws, kernel_size: int) -> Tensor:
    """apply + normalize for uint8 [B, H, W, 3] CPU crops, per sample in one numba function (colour_cpu.py);
    -> normalised float32 [B, 3, H, W]."""
    B, H, W, _ = images.shape
    out = torch.empty(B, 3, H, W, dtype=torch.float32)  # [B, 3, H, W]
    taps = gaussian_kernel1d(d.sigma, kernel_size)  # [B, K]
    augment_views(images.numpy(), d.jitter.numpy(), d.factors.numpy(), d.order.numpy(), d.gray.numpy(),
                  d.blur.numpy(), taps.numpy(), d.flip.numpy(), np.array(IMAGENET_MEAN, dtype=np.float32),
                  np.array(IMAGENET_STD, dtype=np.float32), out.numpy())
    return out


def to_float(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] (FFCV layout) -> float32 [B, 3, H, W] in [0, 1], contiguous."""
    B, H, W, _ = images.shape
    x = torch.empty(B, 3, H, W, dtype=torch.float32, device=images.device)  # [B, 3, H, W]
    return x.copy_(images.permute(0, 3, 1, 2)).div_(255.0)


def normalize(x: Tensor) -> Tensor:
    """ImageNet mean/std, in place: (x - m) / s."""
    m = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
    s = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
    return x.sub_(m).div_(s)  # [B, 3, H, W]


class MocoV2Augment:
    """aug+ after the crop, for one view: cropped uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W].

    On CPU tensors the numba path (apply_cpu), elsewhere the torch path (apply); both draw the same
    parameters, so a device changes float rounding, not the augmentation."""

    def __init__(self, aug: AugParams, seed: int, view: int):
        self.aug, self.seed, self.view = aug, seed, view

    def draws(self, index: Tensor, epoch: int) -> AugDraws:
        return draw(sample_keys(self.seed, epoch, self.view, index), self.aug)

    def __call__(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        d = self.draws(index.to(images.device), epoch)
        if images.device.type == "cpu":
            return apply_cpu(images, d, blur_kernel_size(images.shape[1]))  # [B, 3, H, W]
        return normalize(apply(to_float(images), d, blur_kernel_size(images.shape[1])))  # [B, 3, H, W]


def colour_augment(views: Tensor, indices: Tensor, epoch: int, device: torch.device | str, aug: AugParams,
                   seed: int) -> tuple[Tensor, ...]:
    """The loader's colour ops, run where the caller wants them (the training step, on its GPU).

    views: uint8 [B, V, H, W, 3] crops as TwoViewLoader yields them with augment_device != cpu; indices:
    the samples' dataset indices [B]; epoch: the loader's epoch. Returns V normalised float32
    [B, 3, H, W] on `device`, the same views (up to float rounding) as the loader's CPU path gives.
    """
    views = views.to(device, non_blocking=True)  # [B, V, H, W, 3]
    indices = indices.to(views.device, non_blocking=True)  # [B]
    k = blur_kernel_size(views.shape[2])
    out = []
    for v in range(views.shape[1]):
        d = draw(sample_keys(seed, epoch, v, indices), aug)
        out.append(normalize(apply(to_float(views[:, v]), d, k)))  # [B, 3, H, W]
    return tuple(out)


def resolve_augment_device(setting: str, train_device: torch.device) -> torch.device:
    """data.augment_device -> where the colour ops run: auto = where training runs."""
    if setting == "auto":
        return train_device
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("data.augment_device = 'cuda' but torch sees no CUDA device (use auto or cpu)")
    return torch.device(setting)
