"""The .beton manifest: which source image each sample index holds.

A .beton stores pixels and labels, no file names, and ffcv_convert may skip unreadable images
(data.on_corrupt: skip), so sample i is not the i-th file of the folder. The manifest written beside each
.beton (`<split>_manifest.tsv`: index, path relative to the split's folder, label) lets a list of file
names (SimCLR's ImageNet 1% / 10% subsets) be mapped to sample indices.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import atomic_write

HEADER = "index\tpath\tlabel\n"


def manifest_path(beton: str | Path) -> Path:
    """data/ffcv/train.beton -> data/ffcv/train_manifest.tsv."""
    beton = Path(beton)
    return beton.with_name(f"{beton.stem}_manifest.tsv")


def write_manifest(path: str | Path, samples: list[tuple[str, int]]) -> None:
    """samples[i] = (path relative to the split folder, label) of sample i; written atomically."""
    text = HEADER + "".join(f"{i}\t{rel}\t{label}\n" for i, (rel, label) in enumerate(samples))
    atomic_write(path, lambda f: f.write(text.encode()))


def read_manifest(path: str | Path) -> tuple[list[str], list[int]]:
    """(paths, labels), position = sample index; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (written by the ffcv_convert stage; re-run it)")
    lines = path.read_text().splitlines()
    if not lines or lines[0] + "\n" != HEADER:
        raise ValueError(f"{path}: not a .beton manifest (expected the header {HEADER.strip()!r})")
    paths, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] != str(len(paths)) or not fields[2].isdigit():
            raise ValueError(f"{path}: line {n} is not '<index>\\t<path>\\t<label>' in index order: {line!r}")
        paths.append(fields[1])
        labels.append(int(fields[2]))
    return paths, labels
