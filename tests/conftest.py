"""Shared fixtures: a scratch copy of the project with tiny params, where the real stages and DVC run."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import Params, read_yaml
from pipeline.data.ffcv_io import write_beton
from tests.slurm_fixture import slurm_cluster  # noqa: F401  (the real one-node SLURM cluster)

REPO = Path(__file__).resolve().parents[1]

# the smallest study that still exercises every stage for real
TINY_DETECTION = {"max_iter": 2, "ims_per_batch": 2, "min_size_train": [64], "max_size_train": 64,
                  "min_size_test": 64, "max_size_test": 64, "roi_batch_size": 8, "test_topk": 20,
                  "precise_bn_iters": 1, "checkpoint_period": 1}
TINY = {
    "toy": {"classes": 3, "train_per_class": 16, "val_per_class": 8, "size": 32},
    "data": {"max_resolution": 32, "num_workers": 1},
    "pretrain": {"epochs": 2, "batch_size": 8, "queue_size": 32, "bn_splits": 2, "res": 32, "keep_every": 1},
    "lineval": {"epochs": 2, "batch_size": 16, "res": 32},
    "knn": {"k": 5, "res": 32},
    "semisup": {"fractions": [0.25, 0.5], "trials": 2, "epochs": [1], "batch_size": 8, "res": 16},
    "detection": {"num_workers": 0, "toy": {"classes": 2, "train_images": 8, "test_images": 4, "size": 64},
                  **{task: TINY_DETECTION for task in ("voc", "coco")}},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def results(path: Path, stage: str) -> dict:
    """A stage's metrics file and its run record (job, provenance, text values) as one dict."""
    numbers = json.loads((path / f"metrics/{stage}.json").read_text())
    record = path / f"metrics/{stage}.run.json"
    return numbers | (json.loads(record.read_text()) if record.is_file() else {})


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(cwd))
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` (an event: a file, a log line, a job state) until it holds; `timeout_s` only ends a hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def make_project(path: Path) -> tuple[Path, Callable[[dict], None]]:
    """A git + DVC project at `path` with this repo's code and tiny params. Returns (path, set_params)."""
    (path / "slurm").mkdir(parents=True)
    for name in ("pipeline", "stages", "slurm/profiles", "presets", "dvc.yaml", "params.yaml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / name)
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    for name in (".gitignore", ".dvcignore"):  # as a clone has them: `dvc exp` must not commit checkpoints to git
        shutil.copy(REPO / name, path / name)

    def set_params(over: dict) -> None:
        params = path / "params.yaml"
        params.write_text(yaml.safe_dump(merge(read_yaml(params), over), sort_keys=False))

    set_params(TINY)
    run(["git", "add", "-A"], path)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "tiny study"], path)
    return path, set_params


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Callable[[dict], None]]:
    """make_project in tmp_path."""
    return make_project(tmp_path)


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """tmp_path/{train,val}/<class>/<i>.jpg: classes ant, bee, cat with 4 + 2 JPEGs of 48x40 each. Every
    image has its own colour (a 3x3x3 grid, >= 90 apart) plus a faint ramp, so it stays identifiable after
    crops and flips."""
    levels = (40, 130, 220)
    colours = list(itertools.product(levels, levels, levels))
    ramp = np.linspace(-10, 10, 48)[None, :, None] + np.linspace(-5, 5, 40)[:, None, None]  # [40, 48, 1]
    k = 0
    for split, per_class in (("train", 4), ("val", 2)):
        for name in ("ant", "bee", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = (np.array(colours[k], dtype=np.float64) + ramp).round().astype(np.uint8)  # [40, 48, 3]
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.jpg", quality=95)
                k += 1
    return tmp_path


@pytest.fixture
def betons(tiny_imagefolder: Path) -> list[Path]:
    """[train.beton, val.beton] of tiny_imagefolder."""
    out = [tiny_imagefolder / "betons" / f"{split}.beton" for split in ("train", "val")]
    for split, beton in zip(("train", "val"), out, strict=True):
        write_beton(tiny_imagefolder / split, beton, max_resolution=32, num_workers=1)
    return out


def tiny_pretrain(tmp_path: Path, **pretrain_params) -> tuple[Params, list[Path]]:
    """Tiny pretraining params and the paths pretrain() takes after the betons, under tmp_path (3 steps an epoch)."""
    p = Params()
    p.data = replace(p.data, num_workers=1)
    p.pretrain = replace(p.pretrain, **{"epochs": 1, "batch_size": 4, "queue_size": 8, "bn_splits": 2, "res": 16}
                         | pretrain_params)
    return p, [tmp_path / name for name in ("out/checkpoint.pt", "state/last.pt", "live", "analysis")]
