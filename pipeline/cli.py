"""What every stage entry point shares: params loading, one-line errors, atomic JSON outputs."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.checkpoint import atomic_write, files_digest, params_hash
from pipeline.config import ConfigError, Params, load_params
from pipeline.freshness import stage_of, stage_params_hash
from pipeline.launch import JobFailed

PACKAGES = ("torch", "torchvision", "ffcv", "sal-detectron2", "dvc", "submitit")


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically (temp file + rename), so a metrics file is never half-written."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def provenance(p: Params, seed: int | None) -> dict:
    """What produced an output: the code's commit (and whether the work tree differed from it), the hash
    of all params, package versions, the seed and the world size."""
    return {"git_commit": _git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "params_hash": params_hash(p.to_dict()), "seed": seed, "world_size": p.world_size,
            "versions": {"python": platform.python_version()} | {k: _version(k) for k in PACKAGES}}


def stage_deps(stage: str, p: Params, dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The dependencies of DVC stage `stage` as dvc.yaml lists them, ${params} resolved."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    if stage not in stages:
        raise ValueError(f"{dvc_yaml}: no stage {stage!r}")
    values = p.to_dict()

    def resolve(match: re.Match) -> str:
        value = values
        for key in match.group(1).split("."):
            value = value[key]
        return str(value)

    return [Path(re.sub(r"\$\{([\w.]+)\}", resolve, dep)) for dep in stages[stage].get("deps", [])]


def stage_identity(stage: str, p: Params, section: dict) -> str:
    """What makes two runs of a stage the same run: `section` of the params and the stage's dependencies
    (code, data, upstream models). Only a checkpoint or SLURM job with this identity is resumed or re-attached:
    after a change to the code or the data, `dvc repro` must not record outputs an older run produced."""
    return params_hash(section | {"deps": files_digest(stage_deps(stage, p))})


def run_record_path(metrics_path: str | Path) -> Path:
    """The sibling of metrics/<name>.json that holds what is not a metric: metrics/<name>.run.json."""
    return Path(metrics_path).with_suffix(".run.json")


def write_metrics(path: str | Path, metrics: dict, p: Params, seed: int | None, job: dict | None = None) -> None:
    """Split a stage's results so that `dvc metrics diff` shows only what changed in results: the metrics file
    keeps the numbers and the hash of the params they depend on (pipeline/freshness.py); its text values
    (method, init, checkpoint...), the job and the provenance go to the run record beside it (run_record_path),
    an output DVC tracks but does not read as metrics. The record is written first."""
    text = {k: v for k, v in metrics.items() if isinstance(v, str)}
    write_json(run_record_path(path), text | ({"job": job} if job else {}) | {"provenance": provenance(p, seed)})
    numbers = {k: v for k, v in metrics.items() if k not in text}
    write_json(path, numbers | {"params_hash": stage_params_hash(stage_of(path), p)})


def run_stage(name: str, main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Load and validate params, run `main`; bad input, an unwritable or full disk, a diverged run and a failed
    SLURM job (id, state, tail of its log) end the stage with that message and exit code 2, not a traceback."""
    try:
        main(load_params(params_path))
    except (ConfigError, OSError, ValueError, FloatingPointError, JobFailed) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: one line; the stage's own message says where it resumes
        print(f"{name}: interrupted; {e or '`dvc repro` runs the stage again (what it saved, it resumes from)'}",
              file=sys.stderr)
        sys.exit(130)
