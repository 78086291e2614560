"""Labelled subsets for semi-supervised fine-tuning, as sample indices of the train .beton.

Two kinds, both a function of the data and params only (never of the pretraining method), so that every
method is fine-tuned on the same images and comparisons are paired:
- `balanced`: per class, the first max(1, round(fraction x class size)) images of a permutation drawn from
  (seed, class); a smaller fraction is therefore a subset of a larger one with the same seed;
- `simclr`: the lists every ImageNet semi-supervised result uses, SimCLR's imagenet_subsets/1percent.txt and
  10percent.txt (google-research/simclr), file names mapped to samples through the .beton manifest.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from pipeline.data.augment import mix64_int

# google-research/simclr, imagenet_subsets/ (unchanged since its first commit be133b3, March 2020; checked at
# 383d414): file name, images listed, sha256 of the file.
SIMCLR_LISTS = {
    0.01: ("1percent.txt", 12811, "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"),
    0.1: ("10percent.txt", 128116, "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091"),
}
SIMCLR_SOURCE = "https://github.com/google-research/simclr/tree/master/imagenet_subsets"
_IMAGENET_TRAIN_FILE = re.compile(r"(n\d{8})_\d+\.JPEG")


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted sample indices [M] of a class-balanced subset of `labels` [N]: per class c of n_c images,
    max(1, round(fraction * n_c)) of them, drawn with a generator seeded by (seed, c)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)  # [n_c]
        k = max(1, int(fraction * len(members) + 0.5))
        gen = torch.Generator().manual_seed(mix64_int(mix64_int(seed) + c) >> 1)  # >> 1: a non-negative int64
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])  # [k]
    return torch.cat(chosen).sort().values  # [M]


def simclr_list_path(folder: str | Path, fraction: float) -> Path:
    """Where SimCLR's list for `fraction` (0.01 or 0.1) is expected: folder/<1percent|10percent>.txt."""
    if fraction not in SIMCLR_LISTS:
        raise ValueError(f"SimCLR's ImageNet subsets exist for the fractions {', '.join(map(str, SIMCLR_LISTS))} "
                         f"only, not {fraction}")
    return Path(folder) / SIMCLR_LISTS[fraction][0]


def read_simclr_list(path: str | Path, fraction: float) -> list[str]:
    """The images of SimCLR's list as paths relative to ImageNet's train folder (`<wnid>/<wnid>_<n>.JPEG`).

    Refuses a missing file (saying where the lists come from) and one that is not SimCLR's file (sha256)."""
    path = Path(path)
    name, count, sha = SIMCLR_LISTS[fraction]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SimCLR's ImageNet {100 * fraction:g}% list not found; copy {name} from "
                                f"{SIMCLR_SOURCE} there (no download at run time)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"{path}: not SimCLR's {name} (sha256 differs; the published file lists {count} images)")
    rels = []
    for n, line in enumerate(data.decode().splitlines(), start=1):
        m = _IMAGENET_TRAIN_FILE.fullmatch(line.strip())
        if not m:
            raise ValueError(f"{path}: line {n} is not an ImageNet train file name: {line!r}")
        rels.append(f"{m.group(1)}/{m.group(0)}")
    return rels


def subset_from_names(names: list[str], manifest_paths: list[str], source: str | Path) -> torch.Tensor:
    """Sorted sample indices [M] of the images `names` (paths relative to the train folder), looked up in the
    train manifest; fails naming the first listed image that is not a sample (absent or skipped as corrupt)."""
    index = {rel: i for i, rel in enumerate(manifest_paths)}
    missing = [(n, rel) for n, rel in enumerate(names, start=1) if rel not in index]
    if missing:
        line, rel = missing[0]
        raise ValueError(f"{source}: line {line}: {rel} is not in the train set (data.train_dir, as ffcv_convert "
                         f"kept it); {len(missing)} of {len(names)} listed images are missing")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: lists an image more than once")
    return torch.tensor(sorted(index[rel] for rel in names), dtype=torch.long)  # [M]
