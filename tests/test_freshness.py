"""Metrics files hold only metrics (+ the params hash), provenance goes beside them; stale numbers are found."""

import json
import shutil
from dataclasses import replace

import pytest

from pipeline.cli import run_record_path, write_metrics
from pipeline.config import load_params
from pipeline.freshness import is_fresh, stage_of, stage_params, stage_params_hash
from tests.conftest import REPO
from tests.test_report import KNN, LINEVAL, PRETRAIN, _detection, _params


@pytest.fixture
def repo_files(tmp_path, monkeypatch):
    """This repo's dvc.yaml and params.yaml in a scratch folder (write_metrics writes relative paths)."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "slurm/profiles", tmp_path / "slurm/profiles")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_stage_depends_on_its_own_params_and_those_upstream_only(repo_files):
    p = load_params("params.yaml")
    knn, lineval = stage_params("knn", p), stage_params("lineval", p)
    assert {"knn", "pretrain", "model", "data", "toy"} <= set(knn) and "lineval" not in knn
    assert {"lineval", "pretrain", "toy"} <= set(lineval) and "knn" not in lineval
    assert "detection.voc" in stage_params("detect_voc", p) and "detection.coco" not in stage_params("detect_voc", p)
    assert stage_params("ffcv_convert", p) == ["data", "toy"]  # the validate stage adds no params to anyone
    # a knn-only change: knn's numbers go stale, lineval's stay this run's; a pretraining change: both go stale
    other_k = replace(p, knn=replace(p.knn, k=p.knn.k + 1))
    assert stage_params_hash("knn", other_k) != stage_params_hash("knn", p)
    assert stage_params_hash("lineval", other_k) == stage_params_hash("lineval", p)
    other_lr = replace(p, pretrain=replace(p.pretrain, lr=p.pretrain.lr / 2))
    assert stage_params_hash("lineval", other_lr) != stage_params_hash("lineval", p)
    assert stage_of("metrics/voc.json") == "detect_voc" and stage_of("metrics/ffcv.json") == "ffcv_convert"
    with pytest.raises(ValueError, match="no stage declares metrics/nope.json"):
        stage_of("metrics/nope.json")


def test_write_metrics_keeps_numbers_and_puts_the_rest_in_the_run_record(repo_files):
    p = load_params("params.yaml")
    (repo_files / "metrics").mkdir()
    job = {"executor": "local", "hours": 0.01, "gpu_hours": 0.0}
    write_metrics("metrics/knn.json", {"top1": 80.5, "k": 20, "checkpoint": "models/pretrain/checkpoint.pt"}, p, 0, job)
    metrics = json.loads((repo_files / "metrics/knn.json").read_text())
    assert metrics == {"top1": 80.5, "k": 20, "params_hash": stage_params_hash("knn", p)}
    record = json.loads(run_record_path("metrics/knn.json").read_text())
    assert run_record_path("metrics/knn.json").as_posix() == "metrics/knn.run.json"
    assert record["checkpoint"] == "models/pretrain/checkpoint.pt" and record["job"] == job
    assert record["provenance"]["seed"] == 0 and "versions" in record["provenance"]
    assert is_fresh(metrics, "metrics/knn.json", p)
    assert not is_fresh(metrics, "metrics/knn.json", replace(p, knn=replace(p.knn, k=3)))
    assert not is_fresh({"top1": 80.5}, "metrics/knn.json", p)  # no hash recorded (an older file): not fresh


def test_dvc_yaml_tracks_each_run_record_as_an_output_not_a_metric():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for m in stage.get("metrics", []):
            path = next(iter(m))
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
            assert str(run_record_path(path)) in outs, name
        if name != "validate":
            assert "params.validated" in stage["deps"], name  # validate runs before anything is removed


def test_report_strikes_through_stale_cells_and_says_why():
    from pipeline.report import results_markdown

    metrics = {"pretrain": PRETRAIN, "lineval": LINEVAL, "knn": KNN, "voc": _detection("voc", 1),
               "coco": _detection("coco", 1)}
    fresh = results_markdown(_params(), metrics, {})
    assert "stale" not in fresh.lower()
    text = results_markdown(_params(), metrics, {}, stale=["lineval", "voc"])
    assert "**Stale:** metrics/lineval.json, metrics/voc.json were computed with other params" in text
    row = next(line for line in text.splitlines() if "(this run)" in line)
    assert "~~74.5 (73.2 last)~~ stale" in row and "~~" not in row.split("|")[5]  # kNN: fresh, as it was
