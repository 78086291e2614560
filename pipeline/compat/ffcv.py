"""ffcv 1.0.2 internals used by pipeline/data/ffcv_io.py, and the import side effect it needs undone.

- Importing ffcv sets torch's process-wide intra-op thread count to 1 (ffcv.pipeline.compiler calls
  Compiler.set_num_threads(1) at import); `import_ffcv` below puts the count back.
- `Loader.next_epoch`: the epoch whose seeded RANDOM order the next iteration uses (ffcv has no setter).
- `EpochIterator.output_queue`: ffcv's own `next()` waits for ever when its loading thread died; waiting on the
  queue ourselves lets the consumer see that the thread is gone. (Its size is read with the stdlib queue's
  `_qsize()`, the lock-free size, because the caller holds the queue's lock: `qsize()` would deadlock.)
"""

from __future__ import annotations

import os

import torch

from pipeline.compat import check_version, require

TESTED = ("1.0.2",)
check_version("ffcv", TESTED)


def default_torch_threads() -> int:
    """The intra-op thread count a process should have: OMP_NUM_THREADS, else a SLURM task's CPUs, else the usable
    cores."""
    return (int(os.environ.get("OMP_NUM_THREADS", 0)) or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
            or len(os.sched_getaffinity(0)))


def _import_ffcv() -> None:
    """Import ffcv's modules and undo the thread count ffcv sets at import (see the module docstring)."""
    import ffcv.loader  # noqa: F401  (the import that runs Compiler.set_num_threads(1))

    torch.set_num_threads(default_torch_threads())


_import_ffcv()


def set_next_epoch(loader, epoch: int) -> None:
    """Make the loader's next iteration epoch `epoch` (its RANDOM order is seeded by seed + epoch)."""
    require(loader, "next_epoch", "ffcv", "ffcv")
    loader.next_epoch = epoch


def output_queue(it):
    """The queue an EpochIterator's loading thread puts batches into."""
    return require(it, "output_queue", "ffcv", "ffcv")


def batch_ready(it) -> bool:
    """Whether the loading thread has put a batch (or its end marker) into the iterator's queue; call with the
    queue's lock held (`output_queue(it).not_empty`)."""
    return bool(output_queue(it)._qsize())
