"""Pretraining learns: at the toy defaults (the shipped params.yaml), MoCo v2 pretrained from scratch beats the
random-init control of the same architecture by at least 10 kNN points (the README reports ~20). Nothing is
reused: the toy set, the .beton files, the weights and both kNN evaluations are computed here, once."""

import json
import shutil

from tests.conftest import REPO, make_project, run


def test_pretraining_beats_the_random_init_control_by_10_knn_points(tmp_path):
    path, _ = make_project(tmp_path / "study")
    shutil.copy(REPO / "params.yaml", path / "params.yaml")  # the toy defaults, not the tiny test params
    run(["dvc", "repro", "knn"], path, timeout=3600)
    knn = json.loads((path / "metrics/knn.json").read_text())
    pretrain = json.loads((path / "metrics/pretrain.json").read_text())
    assert pretrain["steps"] == 20 * (15 * 160 // 64)  # the default run: 20 epochs of 37 batches
    assert knn["gain"] == knn["top1"] - knn["random_init_top1"]
    assert knn["gain"] >= 10, f"kNN top-1 {knn['top1']:.2f} vs random init {knn['random_init_top1']:.2f}"
