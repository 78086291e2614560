"""The built-in toy data set: an ImageNet-style ImageFolder of JPEG textures, deterministic from a seed.

A class is a pattern (stripes, checkerboard, rings, ...), never a colour: every image is a light pattern on a
dark ground in near-fixed greys, so MoCo's colour jitter and grayscale cannot erase the label. Within a class,
images differ only in what aug+ also varies (phase and position, which the crops change; a narrow range of
period, angle and grey level; pixel noise, which the blur removes). Contrastive learning takes the easiest cue
that tells two images apart (feature suppression): per-image colours, grey levels or a wide period range would
be learnt instead of the pattern (measured: pretrained kNN below the random-init control), so the pattern is
left as the only cue that survives the augmentations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# name -> intensity pattern in [0, 1] on rotated coordinates (u, v) in pixels, with period p and phase f
PATTERNS = {
    "stripes_h": lambda u, v, p, f: np.sin(2 * np.pi * (v / p + f)) > 0,
    "stripes_v": lambda u, v, p, f: np.sin(2 * np.pi * (u / p + f)) > 0,
    "checker": lambda u, v, p, f: (np.floor(u / p + f) + np.floor(v / p + f)) % 2 == 0,
    "dots": lambda u, v, p, f: (np.mod(u / p + f, 1) - 0.5) ** 2 + (np.mod(v / p + f, 1) - 0.5) ** 2 < 0.08,
    "rings": lambda u, v, p, f: np.sin(2 * np.pi * (np.hypot(u, v) / p + f)) > 0,
    "wedges": lambda u, v, p, f: np.sin(8 * np.arctan2(v, u) + 2 * np.pi * f) > 0,
    "grid": lambda u, v, p, f: (np.mod(u / p + f, 1) < 0.25) | (np.mod(v / p + f, 1) < 0.25),
    "zigzag": lambda u, v, p, f: np.sin(2 * np.pi * (v / p + 0.6 * np.abs(np.mod(u / p, 2) - 1) + f)) > 0,
    "diagonal": lambda u, v, p, f: np.sin(2 * np.pi * ((u + v) / (1.41 * p) + f)) > 0,
    "crosses": lambda u, v, p, f: (np.abs(np.mod(u / p + f, 1) - 0.5) < 0.12)
    ^ (np.abs(np.mod(v / p + f, 1) - 0.5) < 0.12),
    "triangles": lambda u, v, p, f: np.mod(u / p + f, 1) > np.mod(v / p + f, 1),
    "waves": lambda u, v, p, f: np.sin(2 * np.pi * (v / p + 0.25 * np.sin(2 * np.pi * u / (2 * p)) + f)) > 0,
    "bricks": lambda u, v, p, f: (np.mod(v / p + f, 1) < 0.2)
    | (np.mod(u / p + 0.5 * (np.floor(v / p + f) % 2), 1) < 0.15),
    "spiral": lambda u, v, p, f: np.sin(np.arctan2(v, u) * 2 + 2 * np.pi * (np.hypot(u, v) / p + f)) > 0,
    "squares": lambda u, v, p, f: np.maximum(np.abs(np.mod(u / p + f, 1) - 0.5),
                                             np.abs(np.mod(v / p + f, 1) - 0.5)) < 0.3,
}
CLASS_NAMES = list(PATTERNS)
PERIOD = (0.12, 0.18)  # fraction of the side: narrow, so that period is no instance cue
MAX_ANGLE = 8.0  # degrees


def render(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image [size, size, 3] uint8 of `pattern`: random phase and position, a little period, angle, grey
    and noise jitter."""
    period = rng.uniform(*PERIOD) * size
    phase = rng.uniform(0, 1)
    angle = np.deg2rad(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - size / 2 + rng.uniform(-size / 8, size / 8, 2)[:, None, None]
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    mask = PATTERNS[pattern](u, v, period, phase).astype(np.float64)  # [size, size]
    fg, bg = rng.uniform(185, 215), rng.uniform(40, 70)  # grey levels: the same polarity in every image
    img = np.repeat((mask * fg + (1 - mask) * bg)[..., None], 3, axis=2)  # [size, size, 3]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_toy_imagefolder(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int,
                         seed: int) -> dict:
    """Write root/{train,val}/<class>/<i>.jpg; the same arguments always give the same files."""
    if classes > len(CLASS_NAMES):
        raise ValueError(f"toy.classes = {classes}: at most {len(CLASS_NAMES)} patterns exist")
    counts = {"train": train_per_class, "val": val_per_class}
    for split_id, (split, n) in enumerate(counts.items()):
        for c, name in enumerate(CLASS_NAMES[:classes]):
            folder = root / split / f"{c:02d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, c, i])
                Image.fromarray(render(name, size, rng)).save(folder / f"{i:05d}.jpg", quality=92)
    return {"classes": CLASS_NAMES[:classes], "train": classes * train_per_class, "val": classes * val_per_class}
