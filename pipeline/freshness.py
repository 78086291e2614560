"""Are a metrics file's numbers this run's? The params hash a stage's results depend on, and the check.

A stage's numbers depend on its own `params:` in dvc.yaml and on those of every stage upstream of it (the
stages whose outputs it reads, transitively): exactly what makes DVC re-run it. write_metrics records
that hash in each metrics file; here it is recomputed from the params in force and compared. An
experiment that ran only some stages (`dvc exp run ... knn`) leaves the other metrics files as the
baseline computed them: they are stale when the experiment changed any params they depend on.

`python -m pipeline.freshness` lists each metrics file as fresh or stale and prints the fresh numbers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pipeline.checkpoint import params_hash
from pipeline.config import Params, load_params, read_yaml


def resolve(text: str, values: dict) -> str:
    """dvc.yaml's ${a.b} interpolation from the params' values (p.to_dict()): every reader of dvc.yaml uses it."""
    def value(match: re.Match) -> str:
        v = values
        for key in match.group(1).split("."):
            v = v[key]
        return str(v)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def _paths(entries: list) -> list[str]:
    """Paths of a dvc.yaml outs/metrics/deps list (plain strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _param_keys(entries: list) -> list[str]:
    """Keys of a stage's `params:` (plain keys of params.yaml, or {file: [keys]})."""
    keys = []
    for e in entries:
        keys += [e] if isinstance(e, str) else [k for ks in e.values() for k in (ks or [])]
    return keys


def stage_params(stage: str, p: Params, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The params keys the results of `stage` depend on: its own and those of every stage upstream."""
    stages = read_yaml(dvc_yaml)["stages"]
    if stage not in stages:
        raise ValueError(f"{dvc_yaml}: no stage {stage!r}")
    values = p.to_dict()
    producer = {resolve(out, values).rstrip("/"): name for name, s in stages.items()
                for out in _paths(s.get("outs", []) + s.get("metrics", []) + s.get("plots", []))}
    keys, seen, todo = set(), set(), [stage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        keys.update(_param_keys(stages[name].get("params", [])))
        for dep in (resolve(d, values).rstrip("/") for d in _paths(stages[name].get("deps", []))):
            todo += [who for out, who in producer.items()
                     if dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")]
    return sorted(keys)


def stage_params_hash(stage: str, p: Params, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """Hash of the values of stage_params(stage): equal iff the stage's results would be computed the same."""
    values = p.to_dict()

    def lookup(key: str):
        v = values
        for part in key.split("."):
            v = v[part]
        return v

    return params_hash({key: lookup(key) for key in stage_params(stage, p, dvc_yaml)})


def stage_of(metrics_path: str | Path, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """The dvc.yaml stage that declares `metrics_path` among its metrics."""
    stages = read_yaml(dvc_yaml)["stages"]
    for name, s in stages.items():
        if Path(metrics_path).as_posix() in _paths(s.get("metrics", [])):
            return name
    raise ValueError(f"{dvc_yaml}: no stage declares {metrics_path} among its metrics")


def is_fresh(metrics: dict, metrics_path: str | Path, p: Params, dvc_yaml: str | Path = "dvc.yaml") -> bool:
    """True iff the metrics were computed with the params now in force (for what their stage depends on)."""
    return metrics.get("params_hash") == stage_params_hash(stage_of(metrics_path, dvc_yaml), p, dvc_yaml)


def main(argv: list[str]) -> int:
    """List metrics/*.json as fresh or stale for params.yaml; print the fresh ones' numbers (all with --all)."""
    p = load_params("params.yaml")
    declared = [m for s in read_yaml("dvc.yaml")["stages"].values()
                for m in _paths(s.get("metrics", []))]
    for path in declared:
        if not Path(path).is_file():
            print(f"{path}: missing")
            continue
        metrics = json.loads(Path(path).read_text())
        fresh = is_fresh(metrics, path, p)
        print(f"{path}: {'fresh' if fresh else 'STALE (computed with other params; dvc repro recomputes it)'}")
        if fresh or "--all" in argv:
            print(json.dumps({k: v for k, v in metrics.items() if k != "params_hash"}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
