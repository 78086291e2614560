"""What every stage entry point shares: params loading, one-line errors, atomic JSON outputs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic_write, files_digest, params_hash
from pipeline.compat import CompatError
from pipeline.config import ConfigError, Params, load_params, read_yaml_mapping
from pipeline.freshness import resolve, stage_of, stage_params_hash
from pipeline.launch import JobFailed

PACKAGES = ("torch", "torchvision", "ffcv", "sal-detectron2", "dvc", "submitit")


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically (temp file + rename), so a metrics file is never half-written."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def read_json(path: str | Path, *keys: str) -> Any:
    """A JSON file an earlier stage wrote, or the value at `keys` in it; any problem is one line naming the file
    (and the key), not a traceback."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (an earlier stage writes it: run that stage first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from None
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{path}: no {'.'.join(keys[:i + 1])!r} in it (an earlier stage writes it: run that stage "
                             f"again)")
        value = value[key]
    return value


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def dvc_outputs(dvc_yaml: str | Path = "dvc.yaml", p: Params | None = None) -> list[Path]:
    """What DVC writes in a run: every stage's outs, metrics and plots in dvc.yaml (${params} resolved), and
    dvc.lock. These differ from the commit after any `dvc repro` and say nothing about the code that ran."""
    stages = read_yaml_mapping(dvc_yaml, "sections (stages, plots...)").get("stages") or {}
    out = [Path(dvc_yaml).parent / "dvc.lock"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                out.append(Path(dvc_yaml).parent / (resolve(path, p.to_dict()) if p is not None else path))
    return out


def changed_paths(dvc_yaml: str | Path = "dvc.yaml", p: Params | None = None) -> list[str] | None:
    """Paths under this directory that differ from the git commit (modified, staged, deleted or untracked and not
    ignored), except DVC's own outputs (dvc_outputs), the .gitignore files DVC edits for them and `*.dvc` pointers;
    params.yaml too under `dvc exp run`, where it differs by design (the -S values, recorded in params_hash).
    None outside a git work tree."""
    if not _git("rev-parse", "--verify", "-q", "HEAD"):
        return None
    listed = subprocess.run(["git", "diff", "--name-only", "--relative", "-z", "HEAD"], capture_output=True, text=True)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], capture_output=True,
                               text=True)
    paths = {p for p in (listed.stdout + untracked.stdout).split("\0") if p}
    managed = [str(o).rstrip("/") for o in dvc_outputs(dvc_yaml, p)] if Path(dvc_yaml).is_file() else []
    skip = {"params.yaml"} if os.environ.get("DVC_EXP_BASELINE_REV") else set()

    def dvc_made(path: str) -> bool:
        return (path in skip or Path(path).name == ".gitignore" or path.endswith(".dvc")
                or any(path == m or path.startswith(m + "/") for m in managed))

    return sorted(path for path in paths if not dvc_made(path))


def provenance(p: Params, seed: int | None) -> dict:
    """What produced an output: the code's commit, whether code, configs or params differed from it and where
    (changed_paths: DVC's own outputs do not count), the hash of all params, package versions, the seed and the
    world size."""
    changed = changed_paths(p=p)
    return {"git_commit": _git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(changed) if changed is not None else None, "git_changed": changed or [],
            "dvc_experiment": os.environ.get("DVC_EXP_NAME") or None,
            "params_hash": params_hash(p.to_dict()), "seed": seed, "world_size": p.world_size,
            "versions": {"python": platform.python_version()} | {k: _version(k) for k in PACKAGES}}


def stage_deps(stage: str, p: Params, dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The dependencies of DVC stage `stage` as dvc.yaml lists them, ${params} resolved."""
    stages = read_yaml_mapping(dvc_yaml, "sections (stages, plots...)").get("stages") or {}
    if stage not in stages:
        raise ValueError(f"{dvc_yaml}: no stage {stage!r}")
    return [Path(resolve(dep, p.to_dict())) for dep in stages[stage].get("deps", [])]


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
    """Load and validate params, run `main`; bad input, an unwritable or full disk, a diverged run, a failed
    SLURM job (id, state, tail of its log) and a dependency missing an internal name (compat) end the stage with
    that message and exit code 2, not a traceback."""
    try:
        main(load_params(params_path))
    except (ConfigError, OSError, ValueError, FloatingPointError, JobFailed, CompatError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: one line; the stage's own message says where it resumes
        print(f"{name}: interrupted; {e or '`dvc repro` runs the stage again (what it saved, it resumes from)'}",
              file=sys.stderr)
        sys.exit(130)
