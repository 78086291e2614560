"""pipeline.compare: the statistics against hand-computed numbers, and the comparison of real DVC experiments.

The DVC tests use stand-in stages (a few lines that write metrics through the stages' own write_metrics, with
values set by method and seed) under the real params schema, real `dvc exp run` and the real freshness hash,
so that refusal and staleness are checked in seconds. The sweep itself, on the real stages through DVC's queue,
is tests/test_pipeline_e2e.py::test_hard_negative_methods_run_as_dvc_experiments_and_compare."""

import json
import re
import textwrap

import pytest

from pipeline.compare import (
    CompareError,
    Run,
    check_comparable,
    paired_difference,
    summarize,
    t_quantile,
    verdict,
)
from tests.conftest import make_project, run

# two-sided 95% critical values of Student's t, from any printed table
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042}


@pytest.mark.parametrize("df, expected", T_TABLE.items())
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=6e-4)


def test_summary_and_paired_difference_by_hand():
    s = summarize([1.0, 2.0, 3.0])  # mean 2, std 1, half-width 4.303 / sqrt(3) = 2.4843
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert (s.low, s.high) == pytest.approx((2 - 2.4843, 2 + 2.4843), abs=1e-3)
    one = summarize([5.0])
    assert (one.n, one.std, one.low) == (1, None, None) and verdict(one) == "one seed: no interval"

    # seeds 0, 1 in both; seed 2 only in the method, 3 only in the baseline: paired over 0 and 1 only
    diff, seeds = paired_difference({0: 90.0, 1: 92.0, 2: 91.0}, {0: 89.0, 1: 90.5, 3: 95.0})
    assert seeds == [0, 1]
    # differences 1.0 and 1.5: mean 1.25, std 0.35355, half-width 12.706 * 0.35355 / sqrt(2) = 3.1765
    assert (diff.mean, diff.std) == pytest.approx((1.25, 0.353553), abs=1e-5)
    assert (diff.low, diff.high) == pytest.approx((1.25 - 3.1765, 1.25 + 3.1765), abs=1e-3)
    assert verdict(diff) == "no difference shown"
    # differences 1.0, 1.1, 0.9: mean 1.0, std 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.2484: excludes 0
    diff, _ = paired_difference({0: 71.0, 1: 71.1, 2: 70.9}, {0: 70.0, 1: 70.0, 2: 70.0})
    assert (diff.low, diff.high) == pytest.approx((0.7516, 1.2484), abs=1e-3) and verdict(diff) == "higher"
    diff, _ = paired_difference({0: 69.0, 1: 68.9, 2: 69.1}, {0: 70.0, 1: 70.0, 2: 70.0})
    assert verdict(diff) == "lower"
    assert paired_difference({0: 1.0}, {1: 1.0}) is None  # no common seed: nothing to pair


def test_check_comparable_names_every_differing_key():
    base = {"pretrain": {"method": "moco", "seed": 0, "lr": 0.03}, "lineval": {"epochs": 30}}
    runs = [Run("a", "r1", None, base),
            Run("b", "r2", None, {"pretrain": {"method": "mochi", "seed": 1, "lr": 0.03}, "lineval": {"epochs": 30}}),
            Run("c", "r3", None, {"pretrain": {"method": "moco", "seed": 1, "lr": 0.06}, "lineval": {"epochs": 10}})]
    check_comparable(runs[:2])  # only the swept keys differ
    with pytest.raises(CompareError) as e:
        check_comparable(runs)
    assert "lineval.epochs: a has 30, c has 10" in str(e.value)
    assert "pretrain.lr: a has 0.03, c has 0.06" in str(e.value)


# A stand-in for the lineval and knn stages: metrics that depend on method and seed, written as the stages write
# them (params hash for freshness, run record beside)
STAND_IN = textwrap.dedent("""
    import sys
    from pipeline.cli import write_metrics
    from pipeline.config import load_params
    p = load_params()
    stage, pt = sys.argv[1], p.pretrain
    shift = {"moco": 0.0, "mochi": 1.0, "synco": -0.5}[pt.method]
    value = 80.0 + shift + [0.0, 0.4, -0.3][pt.seed] + (5.0 if stage == "knn" else 0.0)
    numbers = {"top1": value, "top1_best": value + 0.1} if stage == "lineval" else {"top1": value}
    write_metrics(f"metrics/{stage}.json", numbers, p, pt.seed)
""")


def _stand_in_project(tmp_path):
    path, set_params = make_project(tmp_path)
    set_params({"pretrain": {"hard_start_epoch": 2}})  # mochi and synco must be valid with the tiny 2 epochs
    (path / "stand_in.py").write_text(STAND_IN)
    stages = {}
    for stage in ("lineval", "knn"):
        stages[stage] = {"cmd": f"python stand_in.py {stage}", "deps": ["stand_in.py"], "params": ["pretrain", stage],
                         "metrics": [{f"metrics/{stage}.json": {"cache": False}}],
                         "outs": [{f"metrics/{stage}.run.json": {"cache": False}}]}
    (path / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=1))
    run(["dvc", "repro"], path)
    run(["git", "add", "-A"], path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "stand-in stages"], path)
    return path


def _exp(path, name, *sets, targets=()):
    run(["dvc", "exp", "run", "-n", name, *[a for s in sets for a in ("-S", s)], *targets], path)


def _compare(path, *args):
    return run(["python", "-m", "pipeline.compare", "--no-run", *args], path, check=False)


def test_compare_real_experiments_paired_stale_and_refused(tmp_path):
    path = _stand_in_project(tmp_path)
    for method in ("moco", "mochi"):
        for seed in (0, 1, 2):
            _exp(path, f"cmp-{method}-s{seed}", f"pretrain.method={method}", f"pretrain.seed={seed}")
    r = _compare(path, "--methods", "moco", "mochi")
    assert r.returncode == 0, r.stderr
    md = (path / "reports/comparison.md").read_text()
    assert (path / "reports/comparison.png").stat().st_size > 0
    # moco: 80.1 + (0, 0.4, -0.3) -> mean 80.1333, std 0.3512, n 3; mochi - moco = +1.0 on every seed (std 0)
    assert "| linear top-1 | 80.13 ± 0.35 [79.26, 81.01] (n=3) | 81.13 ± 0.35 [80.26, 82.01] (n=3) |" in md, md
    assert "| kNN top-1 | 85.03 ± 0.35 [84.16, 85.91] (n=3) | 86.03 ± 0.35 [85.16, 86.91] (n=3) |" in md, md
    assert "| linear top-1 | +1.00 [+1.00, +1.00] (n=3) | higher |" in md, md
    assert "Stale" not in md and "Failed" not in md

    # an experiment that ran only knn: its lineval.json is the baseline's (moco seed 0), stale for synco seed 1
    _exp(path, "cmp-synco-s1", "pretrain.method=synco", "pretrain.seed=1", targets=["knn"])
    r = _compare(path, "--methods", "moco", "synco", "--seeds", "0", "1")
    assert r.returncode == 0, r.stderr
    md = (path / "reports/comparison.md").read_text()
    assert "- metrics/lineval.json: cmp-synco-s1" in md.split("### Stale")[1], md
    row = next(line for line in md.splitlines() if line.startswith("| linear top-1 |"))
    assert row.endswith("(n=2) |  |"), row  # synco's cell is empty: its only lineval number was stale
    assert re.search(r"\| kNN top-1 \| .* \| 84\.90 \(n=1\) \|", md), md  # 80 - 0.5 + 0.4 + 5
    assert "| cmp-synco-s1 | synco | 1 | knn |  | 84.90 |" in md, md

    # a differing lineval key: refused, naming the key and the experiments
    _exp(path, "other-lineval", "pretrain.method=mochi", "pretrain.seed=2", "lineval.epochs=7")
    r = _compare(path, "--exp", "cmp-moco-s0", "cmp-mochi-s1", "other-lineval")
    assert r.returncode == 2 and "lineval.epochs: cmp-moco-s0 has 2, other-lineval has 7" in r.stderr, r.stderr
