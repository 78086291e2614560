"""Every bad-params case stops with one line naming the key and what is allowed."""

import dataclasses
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import dvc.api
import pytest
import yaml

from pipeline.config import ConfigError, Params, PretrainParams, load_params, read_yaml, tau_plus_warning

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, overrides: dict) -> Path:
    raw = read_yaml(REPO / "params.yaml")
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
    bad.write_text("data:\n  num_workers: 2\npretrain: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_params(bad)
    assert str(e.value) == (f"params: {bad}:4:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
                            "(while parsing a flow sequence from line 3, column 11)")
    bad.write_text("pretrain:\n  lr: 0.1\n  lr: 0.2\n")  # PyYAML kept the last; DVC's reader refuses it
    with pytest.raises(ConfigError, match=rf"^params: {bad}:3:3: invalid YAML: found duplicate key \"lr\""):
        load_params(bad)
    bad.write_text("pretrain:\n\tlr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^params: {bad}:2:1: invalid YAML: found character '\\t'") as e:
        load_params(bad)
    assert "\n" not in str(e.value)


# ---- every class of bad input, for every key it can reach ------------------------------------------------


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, type) of every leaf field of the schema."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        out += _leaves(tp, key + ".") if dataclasses.is_dataclass(tp) else [(key, tp)]
    return out


FLOAT_KEYS = [key for key, tp in _leaves(Params) if tp is float]
FLOAT_LIST_KEYS = [key for key, tp in _leaves(Params) if tp == list[float]]


def test_the_schema_has_the_float_keys_the_parametrised_tests_walk():
    assert {"pretrain.lr", "pretrain.synco.sigma", "detection.coco.base_lr", "knn.temperature"} <= set(FLOAT_KEYS)
    assert {"pretrain.crop_scale", "pretrain.blur_sigma", "lineval.lr_steps"} <= set(FLOAT_LIST_KEYS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", ".Inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(tmp_path, key, value):
    path = write(tmp_path, {key: "PLACEHOLDER"})
    path.write_text(path.read_text().replace("PLACEHOLDER", value))
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value).startswith(f"params: {key} = ") and str(e.value).endswith("must be a finite number")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_LIST_KEYS)
def test_non_finite_list_elements_are_refused_naming_the_key(tmp_path, key, value):
    path = write(tmp_path, {key: ["PLACEHOLDER", 0.9]})
    path.write_text(path.read_text().replace("PLACEHOLDER", value))
    with pytest.raises(ConfigError, match=rf"^params: {key}\[0\] = \S+ must be a finite number$"):
        load_params(path)


@pytest.mark.parametrize("text, kind", [
    ("- data\n- pretrain\n", "a list"), ("42\n", "an int"), ("just text\n", "a str"), ("[1, 2]\n", "a list"),
])
def test_a_top_level_that_is_not_a_mapping_is_one_line(tmp_path, text, kind):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value) == (f"params: {path}: the top level must be a mapping of sections (data, toy, model, "
                            f"pretrain, lineval, knn, semisup, detection, launch), got {kind}")


@pytest.mark.parametrize("overrides, message", [
    ({"pretrain": None}, "params: pretrain must be a mapping of keys (method, loss, "),
    ({"pretrain.mochi": [16, 16, 8]},
     "params: pretrain.mochi must be a mapping of keys (n_hard, s, s_prime), got a list"),
    ({"pretrain.crop_scale": "0.2-1.0"}, "params: pretrain.crop_scale = '0.2-1.0' must be a list of float"),
    ({"pretrain.synco.counts": [6, 6, 6, 2, 2, 2.5]}, "params: pretrain.synco.counts[5] = 2.5 must be of type int"),
    ({"detection.voc.train_splits": ["VOC2007/trainval", 2012]},
     "params: detection.voc.train_splits[1] = 2012 must be of type str"),
    ({"launch.extra_sbatch": {"exclusive": [1]}}, "params: launch.extra_sbatch.exclusive = [1] must be of type "
                                                  "str | int | float | bool"),
    ({"launch.extra_sbatch": {"mem_per_cpu": float("nan")}}, "params: launch.extra_sbatch.mem_per_cpu = nan"),
    # values the code used to clamp or ignore silently
    ({"pretrain.method": "mochi", "pretrain.mochi.n_hard": 512},
     "params: pretrain.mochi.n_hard = 512 must be <= pretrain.queue_size = 256"),
    ({"pretrain.method": "synco", "pretrain.synco.n_hard": 1024},
     "params: pretrain.synco.n_hard = 1024 must be <= pretrain.queue_size = 256"),
    ({"pretrain.drop_hardest": 0.999},
     "params: pretrain.drop_hardest = 0.999 drops 256 of the pretrain.queue_size = 256"),
    ({"detection.voc.min_size_train": [480, 800]},
     "params: detection.voc.min_size_train = [480, 800] must not exceed detection.voc.max_size_train = 160"),
    ({"detection.coco.min_size_test": 800}, "params: detection.coco.min_size_test = 800 must not exceed "
                                            "detection.coco.max_size_test = 160"),
    ({"launch.executor": "slurm", "launch.timeout_min": 2, "launch.signal_delay_s": 120},
     "params: launch.signal_delay_s = 120 must be less than launch.timeout_min = 2 minutes"),
    ({"launch.profile": "../../etc/passwd"}, "params: launch.profile = '../../etc/passwd': no file"),
])
def test_more_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, overrides))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_the_synthesis_limits_apply_only_to_the_method_in_use(tmp_path):
    p = load_params(write(tmp_path, {"pretrain.mochi.n_hard": 512}))  # method moco: MoCHi's N is unused
    assert p.pretrain.mochi.n_hard == 512


@pytest.mark.parametrize("profile, message", [
    ("- launch\n", "{path}: the top level must be a mapping of sections (launch), got a list"),
    ("launch:\n  partiton: gpu\n", "{path}: unknown key 'launch.partiton' (did you mean 'partition'?)"),
    ("launch:\n  mem_gb: .inf\n", "{path}: launch.mem_gb = inf must be of type int"),
    ("launch:\n  partition: gpu\nslurm:\n  x: 1\n", "{path}: unknown section(s) 'slurm'"),
    ("launch: [gpu]\n", "{path}: launch must be a mapping of keys"),
    ("launch:\n  partition: [gpu\n", "{path}:3:1: invalid YAML"),
])
def test_a_bad_slurm_profile_is_named(tmp_path, profile, message):
    (tmp_path / "slurm/profiles").mkdir(parents=True)
    path = tmp_path / "slurm/profiles/mine.yaml"
    path.write_text(profile)
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, {"launch.profile": "mine"}))
    assert message.format(path=path) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_params_are_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2 as DVC (ruamel.yaml): `1e-3` is a float (PyYAML's YAML 1.1 read it as text and the stages refused
    what `dvc exp run -S pretrain.lr=1e-3` wrote), `yes` is text, not a boolean."""
    path = write(tmp_path, {})
    text = path.read_text().replace("lr: 0.12", "lr: 1e-3").replace("weight_decay: 0.0001", "weight_decay: 1E-4")
    path.write_text(text + "extra:\n  flag: yes\n  octal: 012\n  big: 1_000\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params:\n      - pretrain\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    assert read_yaml(path) == dvc.api.params_show(repo=str(tmp_path))  # every value as DVC sees it
    assert read_yaml(path)["extra"] == {"flag": "yes", "octal": 12, "big": 1000}
    path.write_text(text)
    p = load_params(path)
    assert p.pretrain.lr == 0.001 and p.pretrain.weight_decay == 0.0001
    path.write_text(text.replace("mlp: true", "mlp: yes"))  # YAML 1.1's boolean is text to DVC: refused, not True
    with pytest.raises(ConfigError, match="pretrain.mlp = 'yes' must be of type bool"):
        load_params(path)


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
