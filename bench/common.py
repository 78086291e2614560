"""What the benchmarks share: the toy .beton they train on, a phase clock, a process-tree memory sampler, and
the one-line machine-readable summary every benchmark ends with (`RESULT {json}`)."""

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from pipeline.data.toy import make_toy_imagefolder

OUT = Path(__file__).resolve().parent / "out"  # figures and logs; created by the benchmark that writes there


def toy_betons(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int, workers: int
               ) -> dict[str, Path]:
    """The built-in toy set (pipeline/data/toy.py) under `root` as {"train": .beton, "val": .beton (if any)}.

    Stored at its own size, as the pipeline's ffcv_convert stage does with data.max_resolution = toy.size."""
    from pipeline.data.ffcv_io import write_beton

    make_toy_imagefolder(root / "images", classes, train_per_class, val_per_class, size, seed=0)
    splits = ("train", "val") if val_per_class else ("train",)
    out = {split: root / f"{split}.beton" for split in splits}
    for split, beton in out.items():
        write_beton(root / "images" / split, beton, max_resolution=size, num_workers=workers)
    return out


def drain(batches: Iterator, n: int | None = None) -> None:
    """Read the `n` batches (default: all) left in an ffcv epoch before leaving it.

    ffcv's prefetch thread ends an epoch with a blocking put of its end marker into a queue of
    `batches_ahead` (3) slots; a consumer that leaves with exactly 3 batches unread leaves that thread
    blocked for ever, and pipeline/data/ffcv_io._epoch_batches, which joins it on exit, hangs."""
    for _ in itertools.islice(batches, n):
        pass


def where(device: torch.device) -> str:
    """The device in words, for the header line of a benchmark."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({len(os.sched_getaffinity(0))} cores, no GPU)"


class PhaseClock:
    """perf_counter seconds per named phase, laps back to back so that the phases add up to the wall time.

    On CUDA every lap synchronizes first: kernels are asynchronous, and without it a phase's work would be
    charged to whichever later phase waits for it."""

    def __init__(self, phases: tuple[str, ...], device: torch.device):
        self.phases, self.cuda = phases, device.type == "cuda"
        self.seconds, self.t = dict.fromkeys(phases, 0.0), 0.0

    def start(self) -> None:
        """Zero the sums and start the first lap (after the warm-up)."""
        self.seconds = dict.fromkeys(self.phases, 0.0)
        self._sync()
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self.t
        self.t = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class TreeRSS:
    """High-water mark of the RSS summed over a process and all its descendants, sampled in a thread.

    One sum per labelled phase (`phase` is set by the caller as the work moves on). Multiprocessing's
    resource tracker is left out: it is not the loader's. A sum of RSS counts a page shared by forked
    processes once per process, so it overstates a tree with forked workers; `pss_mib()` gives the
    footprint without double counting (too slow to sample often: it walks every mapping)."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.phase, self.peak_mib = "", {}
        self._skip: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def processes(self) -> list[psutil.Process]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        return [p for p in procs if not self._skipped(p)]

    def _skipped(self, p: psutil.Process) -> bool:
        if p.pid not in self._skip:
            try:
                self._skip[p.pid] = "resource_tracker" in " ".join(p.cmdline())
            except psutil.Error:
                return True
        return self._skip[p.pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.processes():
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    pass
            phase = self.phase
            self.peak_mib[phase] = max(self.peak_mib.get(phase, 0.0), total / 2**20)
            self._stop.wait(self.interval_s)

    def pss_mib(self) -> float:
        """Proportional set size of the tree now: shared pages split among the processes that map them."""
        total = 0
        for p in self.processes():
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        return total / 2**20


def result(bench: str, **fields) -> None:
    """The last line of every benchmark: `RESULT {"bench": ..., ...}`, for scripts that collect the figures."""
    print("RESULT " + json.dumps({"bench": bench, **fields}), flush=True)
