"""Every bad-params case stops with one line naming the key and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params

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
