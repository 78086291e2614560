"""Every bad-params case stops with one line naming the key and what is allowed."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, PretrainParams, load_params, tau_plus_warning

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, overrides: dict) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_params_validate_and_match_the_schema_defaults():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.to_dict() == Params().to_dict(), "params.yaml and the schema defaults in pipeline/config.py diverged"


@pytest.mark.parametrize("overrides, message", [
    ({"pretrain.lrr": 0.1}, "unknown key 'pretrain.lrr' (did you mean 'lr'?)"),
    ({"pretrain.lr": -0.1}, "pretrain.lr = -0.1 must be > 0"),
    ({"pretrain.lr": "fast"}, "pretrain.lr = 'fast' must be of type float"),
    ({"pretrain.epochs": 2.5}, "pretrain.epochs = 2.5 must be of type int"),
    ({"pretrain.mlp": "yes"}, "pretrain.mlp = 'yes' must be of type bool"),
    ({"model.arch": "vit_b"}, "model.arch = 'vit_b' is not one of resnet18, resnet50"),
    ({"pretrain.queue_size": 1000}, "pretrain.queue_size = 1000 must be a multiple of the global batch 64"),
    ({"pretrain.bn_splits": 5}, "pretrain.batch_size = 64 must be divisible by pretrain.bn_splits = 5"),
    ({"pretrain.crop_scale": [0.9, 0.2]}, "pretrain.crop_scale = [0.9, 0.2] must be [low, high]"),
    ({"data.on_corrupt": "ignore"}, "data.on_corrupt = 'ignore' is not one of fail, skip"),
    ({"lineval.lr_steps": [0.8, 0.6]}, "lineval.lr_steps = [0.8, 0.6] must be increasing fractions"),
    ({"knn.k": 0}, "knn.k = 0 must be >= 1"),
    ({"toy.classes": 99}, "toy.classes = 99 must be <= 15"),
    ({"launch.executor": "kubernetes"}, "launch.executor = 'kubernetes' is not one of"),
])
def test_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_section_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'pretrian'"):
        load_params(write(tmp_path, {"pretrian": {"lr": 1}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_stage_reports_missing_data_path_before_any_work(tmp_path):
    params = write(tmp_path, {"data.train_dir": str(tmp_path / "nowhere")})
    code = ("import sys; from pipeline.cli import run_stage; from stages.ffcv_convert import main; "
            f"run_stage('ffcv_convert', main, {str(params)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert f"data.train_dir = '{tmp_path / 'nowhere'}': directory not found" in r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("loss, tau_plus, classes, warns", [
    ("dcl", 0.1, 1000, True),    # the old in1k value: 100x the prior
    ("hcl", 0.0001, 1000, True),  # 10x too small
    ("dcl", 0.001, 1000, False),
    ("hcl", 0.01, 100, False),
    ("dcl", 0.015, 100, False),   # within a factor of 2
    ("dcl", 0.021, 100, True),
    ("infonce", 0.1, 1000, False),  # tau+ unused
])
def test_tau_plus_warning_compares_with_one_over_the_classes(loss, tau_plus, classes, warns):
    pt = replace(PretrainParams(), loss=loss, tau_plus=tau_plus)
    msg = tau_plus_warning(pt, classes, "data/ffcv/classes.txt")
    assert (msg is not None) == warns
    if warns:
        assert f"pretrain.tau_plus = {tau_plus:g}" in msg and f"C = {classes} classes in data/ffcv/classes.txt" in msg
        assert "\n" not in msg


def test_pretrain_stage_warns_about_tau_plus_before_training(tmp_path):
    """The stage reads the class count from ffcv_convert's classes.txt and warns before any work: here the
    .beton files are missing, so the warning must come before that failure."""
    params = write(tmp_path, {"pretrain.loss": "dcl", "pretrain.tau_plus": 0.1})
    (tmp_path / "data/ffcv").mkdir(parents=True)
    (tmp_path / "data/ffcv/classes.txt").write_text("".join(f"class{i}\n" for i in range(1000)))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())  # the stage's identity reads its deps
    code = ("from pipeline.cli import run_stage; from stages.pretrain import main; "
            f"run_stage('pretrain', main, {str(params)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0, r.stderr
    warning = "pretrain: warning: pretrain.tau_plus = 0.1 is far from 1/C = 0.001 (C = 1000 classes"
    assert warning in r.stderr
    assert r.stderr.index(warning) < r.stderr.index("train.beton")
