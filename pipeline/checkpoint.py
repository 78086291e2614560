"""Checkpoints are plain dicts of tensors and Python values, written atomically, read weights-only."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temp file in the same directory, fsync, then rename: a kill never leaves a
    truncated file under `path`. Temp files of `path` left by a killed writer are removed first (one
    writer per path: rank 0), so they never pile up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """shutil.copyfile, atomically: a kill mid-copy leaves no truncated `dst`."""
    with open(src, "rb") as f_src:
        atomic_write(dst, lambda f: shutil.copyfileobj(f_src, f, 2**24))


def load(path: str | Path) -> dict:
    """torch.load(weights_only=True), with the file named in any error."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: {e})") from None


def require_writable(path: str | Path, need_bytes: int) -> None:
    """Fail before hours of work, not at the first save: `path`'s directory must be creatable, writable and
    have `need_bytes` free."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"{folder}: cannot write checkpoints there ({e.strerror or e})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(f"{folder}: needs ~{need_bytes / 1e9:.1f} GB free for checkpoints, {free / 1e9:.1f} GB available")


def rng_state() -> dict:
    """All RNG states as tensors / plain types (weights_only refuses numpy arrays)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def params_hash(section: dict) -> str:
    """A short stable hash of a params section: a resume checkpoint only continues the same run."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".json", ".txt", ".sh", ".cfg")


def files_digest(paths: list[Path], content_limit: int = 16 * 2**20) -> str:
    """A short hash of the files at `paths` (a directory counts as every file under it): code and configs
    (SOURCE_SUFFIXES, up to `content_limit` bytes) by content, anything else (images, .beton, weights,
    annotations) by size and modification time, so that a dataset of 100k files costs a stat each, not a
    read; a missing path counts as missing. Python's bytecode caches are skipped."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if root.is_dir() else [root]
        for f in files:
            h.update(str(f).encode() + b"\0")
            if not f.is_file():
                h.update(b"missing\0")
            elif f.suffix in SOURCE_SUFFIXES and f.stat().st_size <= content_limit:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                st = f.stat()
                h.update(f"{st.st_size} {st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]
