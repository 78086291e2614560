"""Does method A beat method B here? A seed sweep as DVC experiments, and its honest summary.

`python -m pipeline.compare` queues `dvc exp run` over pretrain.method x pretrain.seed (experiments named
cmp-<method>-s<seed>; those already run are reused), runs the queue (`dvc queue start -j N`), waits, and
writes reports/comparison.md and reports/comparison.png. With --no-run it only compares: the sweep's
experiments, or those named with --exp, or those whose params match --where, all of one commit (--rev, default
HEAD): a cluster user queues SLURM jobs, and compares once they are done.

Per method and metric: mean, std and a 95% t-interval over seeds, with the number of seeds. Per method
against the baseline: the paired difference over the seeds both have (same seed, same data order and
initialisation), its 95% t-interval and a verdict that says "no difference shown" when the interval covers 0.
Nothing is dropped silently: failed experiments, missing metrics files and stale metrics (computed for other
params, as the baseline's files an experiment did not re-run) are listed, and their cells are empty.
Experiments that differ in any params key other than the swept ones are refused, naming the keys.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import dvc.api
import matplotlib
import yaml
from dvc.exceptions import DvcException, PathMissingError
from matplotlib.figure import Figure

from pipeline.config import ConfigError, Params, load_params
from pipeline.freshness import is_fresh
from pipeline.presets import flatten
from pipeline.report import PANEL, PRIMARY_LINEVAL, STYLE

SWEPT = ("pretrain.method", "pretrain.seed")
PREFIX = "cmp"  # the sweep's experiment names: cmp-<method>-s<seed>
# what is compared: label, metrics file, path of keys to the number (higher is better for all of them)
METRICS = (
    ("linear top-1", "metrics/lineval.json", (PRIMARY_LINEVAL,)),
    ("kNN top-1", "metrics/knn.json", ("top1",)),
    ("VOC AP50", "metrics/voc.json", ("bbox", "AP50")),
    ("VOC AP", "metrics/voc.json", ("bbox", "AP")),
    ("COCO APbb", "metrics/coco.json", ("bbox", "AP")),
    ("COCO APmk", "metrics/coco.json", ("segm", "AP")),
)
SEMISUP = "metrics/semisup.json"  # one metric per fraction: "semi-sup. top-1 <pct>"
POLL_S = 10


class CompareError(ValueError):
    """The experiments cannot be compared (a differing key, nothing to compare); the message says why."""


# ---------------------------------------------------------------------------------------------- statistics

def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1 (Abramowitz & Stegun 26.7.3-4: a finite series in
    theta = atan(t / sqrt(df)))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)), df - 3 over 2 terms after 1
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The two-sided critical value t with P(|T| <= t) = p (0.95 for a 95% interval), by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Summary:
    """Mean, sample std (n - 1) and 95% t-interval of n values; std and the interval need n >= 2."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    def covers_zero(self) -> bool:
        return self.low is not None and self.low <= 0 <= self.high


def summarize(values: list[float], level: float = 0.95) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> tuple[Summary, list[int]] | None:
    """method - baseline over the seeds both have: (summary of the per-seed differences, those seeds); None if
    they share no seed. Pairing removes what the seed does to both (data order, initialisation)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    return summarize([method[s] - baseline[s] for s in seeds]), seeds


def verdict(diff: Summary) -> str:
    if diff.low is None:
        return "one seed: no interval"
    if diff.covers_zero():
        return "no difference shown"
    return "higher" if diff.low > 0 else "lower"


# ---------------------------------------------------------------------------------------------- experiments

@dataclass
class Run:
    """One experiment: its name, git revision, DVC state, params, and each metrics file (None when absent)."""

    name: str
    rev: str
    state: str | None
    params: dict = field(default_factory=dict)
    metrics: dict[str, dict | None] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.params["pretrain"]["method"]

    @property
    def seed(self) -> int:
        return int(self.params["pretrain"]["seed"])


def sweep_names(methods: list[str], seeds: list[int]) -> list[str]:
    return [f"{PREFIX}-{m}-s{s}" for m in methods for s in seeds]


def list_experiments(repo: str, rev: str) -> dict[str, dict]:
    """DVC's experiments of commit `rev` by name: {"rev", "state"} (dvc.api.exp_show)."""
    rows = dvc.api.exp_show(repo=repo, revs=rev, force=True)
    return {r["Experiment"]: {"rev": r["rev"], "state": r["State"]} for r in rows if r.get("Experiment")}


def metric_files() -> list[str]:
    return sorted({path for _, path, _ in METRICS} | {SEMISUP})


def read_run(repo: str, name: str, rev: str, state: str | None) -> Run:
    """An experiment's params (dvc.api.params_show) and metrics files as its commit holds them (dvc.api.read:
    metrics_show fails for a whole revision when any declared metrics file is absent from it)."""
    run = Run(name, rev, state, params=dvc.api.params_show(repo=repo, rev=rev))
    for path in metric_files():
        try:
            run.metrics[path] = json.loads(dvc.api.read(path, repo=repo, rev=rev))
        except (FileNotFoundError, PathMissingError):
            run.metrics[path] = None
    return run


def matches(params: dict, where: list[str]) -> bool:
    """--where key=value filters (values compared as YAML scalars: 0.1 == 0.10)."""
    flat = flatten(params)
    for cond in where:
        key, _, value = cond.partition("=")
        if key not in flat or flat[key] != yaml.safe_load(value):
            return False
    return True


def check_comparable(runs: list[Run], swept: tuple[str, ...] = SWEPT) -> None:
    """Refuse runs that differ in any params key other than the swept ones, naming the keys and runs."""
    if not runs:
        raise CompareError("no experiments to compare")
    first = flatten(runs[0].params)
    differing: dict[str, list[str]] = {}
    for run in runs[1:]:
        flat = flatten(run.params)
        for key in sorted(set(first) | set(flat)):
            if key not in swept and first.get(key) != flat.get(key):
                differing.setdefault(key, []).append(f"{run.name} has {flat.get(key)!r}")
    if differing:
        lines = [f"  {key}: {runs[0].name} has {first.get(key)!r}, " + ", ".join(who) for key, who in differing.items()]
        raise CompareError("experiments differ in params other than the swept ones "
                           f"({', '.join(swept)}); refusing to mix them:\n" + "\n".join(lines))


def params_of(run: Run, repo: str | Path) -> Params:
    """The run's params as the stages validated them (the freshness hash is computed from these); the file is
    written beside params.yaml, where a launch profile is looked up."""
    with tempfile.NamedTemporaryFile("w", dir=repo, prefix=".compare-", suffix=".yaml") as f:
        f.write(yaml.safe_dump(run.params, sort_keys=False))
        f.flush()
        try:
            return load_params(f.name)
        except ConfigError as e:
            raise CompareError(f"{run.name}: {e}") from None


def _lookup(tree: dict, keys: tuple) -> float | None:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return float(tree) if isinstance(tree, (int, float)) and not isinstance(tree, bool) else None


@dataclass
class Table:
    """values[metric][method][seed]; and what was not used, with why."""

    values: dict[str, dict[str, dict[int, float]]]
    failed: list[str]
    missing: dict[str, list[str]]  # metrics file -> the experiments without it
    stale: dict[str, list[str]]  # metrics file -> the experiments where it was computed for other params
    stages_ran: dict[str, list[str]]


def tabulate(runs: list[Run], repo: str | Path = ".") -> Table:
    """Collect each fresh metric of each successful run. A metrics file whose params hash is not the run's
    (pipeline.freshness, with the run's own dvc.yaml) is stale: it was computed for other params or weights,
    and is not used."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    failed, missing, stale, stages_ran = [], {}, {}, {}
    for run in runs:
        if run.state not in (None, "Success"):
            failed.append(f"{run.name} ({run.state})")
            continue
        p = params_of(run, repo)
        fresh_files = []
        with tempfile.TemporaryDirectory() as tmp:
            dvc_yaml = Path(tmp) / "dvc.yaml"  # the run's own stage definitions: its commit's dvc.yaml
            dvc_yaml.write_text(dvc.api.read("dvc.yaml", repo=str(repo), rev=run.rev))
            for path in metric_files():
                m = run.metrics.get(path)
                if m is None:
                    missing.setdefault(path, []).append(run.name)
                elif not is_fresh(m, path, p, dvc_yaml):
                    stale.setdefault(path, []).append(run.name)
                else:
                    fresh_files.append(path)
        stages_ran[run.name] = [Path(f).stem for f in fresh_files]
        found = [(label, run.metrics[path], keys) for label, path, keys in METRICS if path in fresh_files]
        if SEMISUP in fresh_files:
            found += [(f"semi-sup. top-1 {name}", run.metrics[SEMISUP]["fractions"], (name, "top1"))
                      for name in sorted(run.metrics[SEMISUP].get("fractions", {}), key=_pct)]
        for label, m, keys in found:
            v = _lookup(m, keys)
            if v is not None and math.isfinite(v):
                values.setdefault(label, {}).setdefault(run.method, {})[run.seed] = v
    return Table(values, failed, missing, stale, stages_ran)


def _pct(name: str) -> float:
    try:
        return float(name.removesuffix("pct"))
    except ValueError:
        return math.inf


# ---------------------------------------------------------------------------------------------- the report

def _fmt(s: Summary) -> str:
    if s.std is None:
        return f"{s.mean:.2f} (n=1)"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.low:.2f}, {s.high:.2f}] (n={s.n})"


def _fmt_diff(s: Summary, seeds: list[int]) -> str:
    if s.low is None:
        return f"{s.mean:+.2f} (n=1, seed {seeds[0]})"
    return f"{s.mean:+.2f} [{s.low:+.2f}, {s.high:+.2f}] (n={s.n})"


def _ordered_methods(table: Table, baseline: str) -> list[str]:
    methods = sorted({m for per in table.values.values() for m in per})
    return ([baseline] if baseline in methods else []) + [m for m in methods if m != baseline]


def comparison_markdown(table: Table, runs: list[Run], baseline: str, figure: str | None, note: str = "") -> str:
    methods = _ordered_methods(table, baseline)
    lines = ["# Method comparison over seeds", ""]
    if note:
        lines += [note, ""]
    lines += [f"{len(runs)} experiments; swept: {', '.join(SWEPT)}; every other params key is the same in all of "
              "them (checked). Cells: mean ± std over seeds [95% t-interval] (n = seeds). Higher is better for "
              f"every metric. Linear top-1 is `{PRIMARY_LINEVAL}`, the number the run report calls primary.", ""]
    lines += ["| metric | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, per in table.values.items():
        cells = [_fmt(summarize(list(per[m].values()))) if per.get(m) else "" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    others = [m for m in methods if m != baseline]
    if baseline in methods and others:
        lines += ["", f"## Paired differences to {baseline} (same seeds)", "",
                  "Per method: the mean of (method - baseline) over the seeds both ran, its 95% t-interval, and the "
                  "verdict: 'no difference shown' when the interval covers 0 (which is not evidence of no "
                  "difference: more seeds narrow the interval).", ""]
        lines += ["| metric | " + " | ".join(f"{m} - {baseline} | verdict" for m in others) + " |",
                  "|---" * (2 * len(others) + 1) + "|"]
        for label, per in table.values.items():
            cells = []
            for m in others:
                pair = paired_difference(per.get(m, {}), per.get(baseline, {}))
                cells += [_fmt_diff(*pair), verdict(pair[0])] if pair else ["", "no common seed"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    failed_names = {item.split(" (")[0] for item in table.failed}
    labels = list(table.values)
    lines += ["", "## Experiments", "", "| experiment | method | seed | stages with fresh metrics | "
              + " | ".join(labels) + " |", "|---" * (4 + len(labels)) + "|"]
    for run in runs:
        ran = "(failed)" if run.name in failed_names else ", ".join(table.stages_ran.get(run.name, [])) or "none"
        vals = [table.values[label].get(run.method, {}).get(run.seed) for label in labels]
        cells = ["" if v is None else f"{v:.2f}" for v in vals]
        lines.append(f"| {run.name} | {run.method} | {run.seed} | {ran} | " + " | ".join(cells) + " |")
    done = len(runs) - len(table.failed)

    def by_file(files: dict[str, list[str]], everywhere: str) -> list[str]:
        return [f"{path}: " + (everywhere if len(who) == done else ", ".join(who)) for path, who in files.items()]

    for title, items in (("Failed experiments (not used)", table.failed),
                         ("Missing metrics files (empty cells)",
                          by_file(table.missing, "in none of the experiments (stage not run)")),
                         ("Stale metrics (computed for other params or weights; not used)",
                          by_file(table.stale, "in every experiment (the baseline's file: the stage did not run)"))):
        if items:
            lines += ["", f"### {title}", "", *[f"- {item}" for item in items]]
    if figure:
        lines += ["", f"![per-seed values, mean and 95% interval per method]({figure})"]
    return "\n".join(lines) + "\n"


def plot(table: Table, baseline: str, out: Path) -> bool:
    """One panel per metric: each seed's value as a dot, the mean with its 95% t-interval per method."""
    if not table.values:
        return False
    methods = _ordered_methods(table, baseline)
    labels = list(table.values)
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
        fig.suptitle("Methods over seeds: per-seed values (dots), mean and 95% t-interval (bars)")
        axes = list(fig.subplots(rows, cols, squeeze=False).flat)
        for ax, label in zip(axes, labels, strict=False):
            for x, m in enumerate(methods):
                vals = list(table.values[label].get(m, {}).values())
                if not vals:
                    continue
                s = summarize(vals)
                ax.scatter([x - 0.12] * len(vals), vals, s=14, color="0.5", zorder=2)
                err = [[s.mean - s.low], [s.high - s.mean]] if s.low is not None else None
                ax.errorbar([x + 0.12], [s.mean], yerr=err, fmt="o", color=f"C{x}", capsize=4, zorder=3)
            ax.set(title=label, xticks=range(len(methods)), xticklabels=methods, xlim=(-0.6, len(methods) - 0.4))
        for ax in axes[len(labels):]:
            ax.set_visible(False)
        fig.savefig(out)
    return True


# ---------------------------------------------------------------------------------------------- the sweep

def _dvc(args: list[str], repo: str) -> None:
    """Run a dvc command; its output goes to a file, not a pipe: `dvc queue start` leaves a daemon holding its
    stdout and stderr, and reading a pipe to its end would wait for the whole queue."""
    with tempfile.TemporaryFile("w+") as out:
        r = subprocess.run(["dvc", *args], cwd=repo, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if r.returncode:
            out.seek(0)
            raise CompareError(f"dvc {' '.join(args)} failed ({r.returncode}): {out.read().strip()[-2000:]}")


def queue_sweep(repo: str, rev: str, methods: list[str], seeds: list[int], targets: list[str],
                jobs: int) -> list[str]:
    """Queue the sweep's experiments not already there (on the workspace, at commit `rev`), start the queue; the
    sweep's names."""
    names = sweep_names(methods, seeds)
    known = list_experiments(repo, rev)
    for m in methods:
        for s in seeds:
            name = f"{PREFIX}-{m}-s{s}"
            if name in known and known[name]["state"] != "Failed":
                print(f"compare: {name} already {known[name]['state'] or 'done'}; reused", flush=True)
                continue
            if name in known:  # failed before: queue it again under the same name
                _dvc(["exp", "remove", name], repo)
            _dvc(["exp", "run", "--queue", "-n", name, "-S", f"pretrain.method={m}", "-S", f"pretrain.seed={s}",
                  *targets], repo)
            print(f"compare: queued {name}", flush=True)
    _dvc(["queue", "start", "-j", str(jobs)], repo)
    return names


def wait_for(repo: str, rev: str, names: list[str]) -> dict[str, dict]:
    """Poll the experiments' states until none is queued or running; the final listing."""
    last, errors = "", 0
    while True:
        try:
            known = list_experiments(repo, rev)
        except (DvcException, OSError) as e:  # an experiment's temp workspace made or removed mid-listing
            errors += 1
            if errors > 30:
                raise CompareError(f"dvc.api.exp_show kept failing while waiting: {e}") from None
            time.sleep(POLL_S)
            continue
        errors = 0
        states = {n: known.get(n, {}).get("state") for n in names}
        pending = [n for n, s in states.items() if s in ("Queued", "Running")]
        line = ", ".join(f"{n}: {s or 'done'}" for n, s in states.items())
        if line != last:
            print(f"compare: {time.strftime('%H:%M:%S')} {line}", flush=True)
            last = line
        if not pending:
            return known
        time.sleep(POLL_S)


def select(repo: str, names: list[str] | None, where: list[str], known: dict[str, dict]) -> list[Run]:
    """The experiments to compare: those named (each must exist), else all of this commit matching --where."""
    if names:
        absent = [n for n in names if n not in known]
        if absent:
            raise CompareError(f"no experiment named {', '.join(absent)} on the compared commit (--rev; "
                               "`dvc exp show` lists them)")
        chosen = names
    else:
        chosen = sorted(known)
    runs = [read_run(repo, n, known[n]["rev"], known[n]["state"]) for n in chosen]
    return [r for r in runs if matches(r.params, where)] if where else runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["moco", "mochi", "synco"], help="pretrain.method values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="pretrain.seed values")
    ap.add_argument("--baseline", default="moco", help="the method the others are paired against")
    ap.add_argument("--jobs", type=int, default=1, help="dvc queue start -j N (on 2 cores, parallel jobs contend)")
    ap.add_argument("--targets", nargs="*", default=["lineval", "knn"],
                    help="stages each experiment runs (with what they need); none: the whole pipeline")
    ap.add_argument("--no-run", action="store_true", help="compare experiments that exist, queue nothing")
    ap.add_argument("--exp", nargs="+", help="with --no-run: the experiments to compare, by name")
    ap.add_argument("--where", nargs="+", default=[], help="with --no-run: params filters key=value")
    ap.add_argument("--rev", default="HEAD", help="the commit whose experiments are compared (the sweep: the one "
                    "it queues on, whatever is committed while it runs)")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", default="reports/comparison.md")
    a = ap.parse_args(argv)
    try:
        start = time.monotonic()
        rev = subprocess.run(["git", "rev-parse", a.rev], cwd=a.repo, capture_output=True, text=True).stdout.strip()
        if not rev:
            raise CompareError(f"--rev {a.rev}: not a commit of {a.repo}")
        if a.no_run:
            known = list_experiments(a.repo, rev)
            names = a.exp or (None if a.where else [n for n in sweep_names(a.methods, a.seeds) if n in known])
        else:
            names = queue_sweep(a.repo, rev, a.methods, a.seeds, a.targets, a.jobs)
            known = wait_for(a.repo, rev, names)
        runs = select(a.repo, names, a.where, known)
        check_comparable(runs)
        table = tabulate(runs, a.repo)
    except CompareError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.repo) / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = out.with_suffix(".png")
    drawn = plot(table, a.baseline, figure)
    note = "" if a.no_run else (f"Sweep: `python -m pipeline.compare --methods {' '.join(a.methods)} --seeds "
                                f"{' '.join(map(str, a.seeds))} --targets {' '.join(a.targets) or '(all)'} "
                                f"--jobs {a.jobs}`, {time.monotonic() - start:.0f} s wall.")
    out.write_text(comparison_markdown(table, runs, a.baseline, figure.name if drawn else None, note))
    print(out.read_text())
    print(f"compare: wrote {out}" + (f" and {figure}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
