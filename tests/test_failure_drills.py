"""Failure drills: what a long run meets in practice (a kill while a checkpoint is written, a damaged
ImageFolder, a checkpoint of another architecture or a tampered one, a diverging loss, an unwritable or
full disk) must end in one clear line naming the file, never in a loaded truncated file, code run from a
checkpoint, silent training on NaN, or an error hours later."""

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.cli import run_stage, stage_deps, stage_identity
from pipeline.config import Params
from pipeline.data.ffcv_io import write_beton
from pipeline.models.backbone import load_backbone, resnet
from pipeline.train import pretrain as pretrain_module
from pipeline.train.pretrain import pretrain
from stages import ffcv_convert, knn
from tests.conftest import tiny_pretrain

REPO = Path(__file__).resolve().parents[1]

# ---- kill -9 while a checkpoint is written -------------------------------------------------------------

KILLED_WRITER = """
import io, os, signal, sys
import torch
from pipeline import checkpoint

def write_half_then_die(f):
    buf = io.BytesIO()
    torch.save({"step": 2, "model": {"w": torch.ones(4_000_000)}}, buf)  # 16 MB
    f.write(buf.getvalue()[: buf.tell() // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.atomic_write(sys.argv[1], write_half_then_die)
"""


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path: Path):
    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "model": {"w": torch.zeros(3)}}, target)
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr
    state = checkpoint.load(target)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))
    (half,) = tmp_path.glob(".last.pt.*.tmp")  # SIGKILL skips the cleanup: the half-written temp stays
    assert 0 < half.stat().st_size < 16_000_000
    with pytest.raises(ValueError, match=re.escape(str(half))):
        checkpoint.load(half)


# ---- damaged ImageFolder splits --------------------------------------------------------------------------


def test_missing_class_folder_and_empty_splits_fail_naming_the_folder(tiny_imagefolder: Path, monkeypatch):
    monkeypatch.chdir(tiny_imagefolder)  # the stage writes data/ffcv here
    train, val = tiny_imagefolder / "train", tiny_imagefolder / "val"
    p = Params()
    p.data = replace(p.data, train_dir=str(train), val_dir=str(val))
    for f in (val / "cat").iterdir():
        f.unlink()
    (val / "cat").rmdir()
    with pytest.raises(ValueError, match=re.escape(f"{val}: class folders differ from {train}: missing ['cat']")):
        ffcv_convert.main(p)
    assert not Path("data").exists()  # refused before converting anything
    for d in val.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with pytest.raises(ValueError, match=re.escape(f"no class folders in {val}")):
        ffcv_convert.main(p)
    for f in train.rglob("*.jpg"):
        f.unlink()
    with pytest.raises(ValueError, match=re.escape(f"class folder without images: {train / 'ant'}")):
        write_beton(train, tiny_imagefolder / "train.beton", max_resolution=32)


# ---- foreign and tampered checkpoints --------------------------------------------------------------------


def test_checkpoint_of_another_architecture_or_format_is_refused(tmp_path: Path):
    r50 = tmp_path / "r50.pt"
    checkpoint.save_atomic({"model": {f"encoder_q.{k}": v for k, v in resnet("resnet50").state_dict().items()}}, r50)
    with pytest.raises(ValueError, match=rf"{re.escape(str(r50))} holds a resnet50 backbone, but model.arch = "):
        load_backbone(r50, "resnet18")
    detector = tmp_path / "detector.pt"  # not a backbone in any format load_backbone knows (tests/test_weights.py)
    torch.save({"model": {"backbone.res2.0.conv1.weight": torch.zeros(1)}}, detector)
    with pytest.raises(ValueError, match=re.escape(f"{detector}: no ResNet backbone")):
        load_backbone(detector, "resnet18")


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_is_refused_without_running_its_code(tmp_path: Path):
    path, marker = tmp_path / "tampered.pt", tmp_path / "code-ran"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable weights-only checkpoint")):
        checkpoint.load(path)
    assert not marker.exists()


# ---- a diverging loss ------------------------------------------------------------------------------------


def test_nan_loss_ends_the_stage_in_one_line_naming_the_step(betons: list[Path], tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p, (out, state, live, analysis) = tiny_pretrain(tmp_path, lr=1e30)
    checkpoint.save_atomic({"identity": "another run"}, state)  # not this run's: must not be named as good
    with pytest.raises(SystemExit) as e:
        run_stage("pretrain", lambda _: pretrain(p, *betons, out, state, live, analysis), str(REPO / "params.yaml"))
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert f"{state} belongs to other params" in captured.out
    last = captured.err.split("\r")[-1]  # after the cleared progress bar
    assert re.fullmatch(r"pretrain: error: loss is nan at step [1-9]\d* \(epoch 1\); last good checkpoint: none\n",
                        last), captured.err
    assert not out.exists()


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(betons: list[Path], tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrain_module, "lr_at", lambda base_lr, epoch, *_: base_lr if epoch == 0 else 1e30)
    p, (out, state, live, analysis) = tiny_pretrain(tmp_path, epochs=2)
    with pytest.raises(FloatingPointError, match=rf"at step [4-9]\d* \(epoch 2\); last good checkpoint: "
                                                 rf"{re.escape(str(state))}$"):
        pretrain(p, *betons, out, state, live, analysis)
    good = checkpoint.load(state)
    assert (good["epoch"], good["step"]) == (1, 3)
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())


# ---- unwritable or full disk -----------------------------------------------------------------------------


def test_unwritable_output_fails_before_any_training(tmp_path: Path):
    (tmp_path / "a-file").write_text("not a directory")
    p, (_, state, live, analysis) = tiny_pretrain(tmp_path)
    out = tmp_path / "a-file" / "checkpoint.pt"
    missing = tmp_path / "no.beton"  # never opened: the check comes first
    with pytest.raises(OSError, match=re.escape(f"{tmp_path / 'a-file'}: cannot write checkpoints there")):
        pretrain(p, missing, missing, out, state, live, analysis)
    assert not state.exists() and not live.exists()


def test_require_writable_names_the_directory_and_the_space(tmp_path: Path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(OSError, match=re.escape(f"{tmp_path / 'a-file' / 'sub'}: cannot write checkpoints there")):
        checkpoint.require_writable(tmp_path / "a-file" / "sub" / "last.pt", 1)
    with pytest.raises(OSError, match=rf"^{re.escape(str(tmp_path / 'new'))}: needs ~1000000000\.0 GB free for "
                                      r"checkpoints, [\d.]+ GB available$"):
        checkpoint.require_writable(tmp_path / "new" / "last.pt", 10**18)
    checkpoint.require_writable(tmp_path / "new" / "last.pt", 1)
    assert list((tmp_path / "new").iterdir()) == []  # the probe file is gone


# ---- a checkpoint of other code or data ------------------------------------------------------------------


def test_stage_identity_follows_the_stage_code_and_data_not_other_files(tmp_path: Path, monkeypatch):
    """`dvc repro` re-runs a stage after its code or data changed; resuming the old run's checkpoint would
    record the old outputs under the new dependencies."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "loss.py").write_text("T = 0.2\n")
    (tmp_path / "code" / "__pycache__").mkdir()
    (tmp_path / "data.bin").write_bytes(b"x" * 64)
    (tmp_path / "other.py").write_text("")
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    deps:\n      - code\n      - ${data.train_dir}\n")
    monkeypatch.chdir(tmp_path)
    p = Params()
    p = replace(p, data=replace(p.data, train_dir="data.bin"))
    assert stage_deps("train", p) == [Path("code"), Path("data.bin")]
    base = stage_identity("train", p, {"lr": 0.1})
    (tmp_path / "other.py").write_text("x = 1\n")  # not a dependency
    (tmp_path / "code" / "__pycache__" / "loss.cpython-311.pyc").write_bytes(b"\0")  # bytecode cache
    os.utime(tmp_path / "code" / "loss.py", ns=(1, 1))  # code counts by content (a checkout touches it)
    assert stage_identity("train", p, {"lr": 0.1}) == base
    assert stage_identity("train", p, {"lr": 0.2}) != base  # params
    (tmp_path / "code" / "loss.py").write_text("T = 0.07\n")  # code
    changed = stage_identity("train", p, {"lr": 0.1})
    assert changed != base
    os.utime(tmp_path / "data.bin", ns=(1, 1))  # data count by size and time: rewritten = changed
    assert stage_identity("train", p, {"lr": 0.1}) != changed
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * 10)
    before = checkpoint.files_digest([big], content_limit=10)
    big.write_text("x = 2\n" * 10)
    os.utime(big, ns=(1, 1))  # a source file over the limit counts by size and time too
    assert checkpoint.files_digest([big], content_limit=10) != before
    with pytest.raises(ValueError, match="no stage 'eval'"):
        stage_deps("eval", p)


# ---- a bad params file, a damaged file of an earlier stage -----------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("- data\n- pretrain\n", "params: params.yaml: the top level must be a mapping of sections (data, toy, "),
    ("7\n", "params: params.yaml: the top level must be a mapping of sections (data, toy, "),
    ("pretrain:\n  lr: .nan\n", "params: pretrain.lr = nan must be a finite number"),
    ("pretrain:\n  temperature: .inf\n", "params: pretrain.temperature = inf must be a finite number"),
    ("pretrain:\n  lr: [0.1\n", "params: params.yaml:3:1: invalid YAML: expected ',' or ']'"),
    ("pretrain:\n  method: mochi\n  mochi:\n    n_hard: 512\n",
     "params: pretrain.mochi.n_hard = 512 must be <= pretrain.queue_size = 256"),
])
def test_a_bad_params_file_ends_the_stage_in_one_line_before_any_work(tmp_path: Path, text: str, message: str):
    """These used to end in a traceback (a list or a scalar as the file), at step 0 as "loss is nan" (a .nan), in a
    multi-line parser message (a syntax error), or trained silently with N = K (n_hard above the queue)."""
    (tmp_path / "params.yaml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"pretrain: error: {message}") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was started


def test_a_damaged_metrics_file_of_an_earlier_stage_is_named(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ffcv = Path("metrics/ffcv.json")
    ffcv.parent.mkdir()
    for text, message in (('{"train": ', "metrics/ffcv.json:1:11: not valid JSON: Expecting value"),
                          ('{"val": {}}', "metrics/ffcv.json: no 'train' in it"),
                          ('{"train": {"classes": 3}}', "metrics/ffcv.json: no 'train.images' in it")):
        ffcv.write_text(text)
        with pytest.raises(SystemExit) as e:
            run_stage("knn", knn.main, str(REPO / "params.yaml"))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"knn: error: {message}") and err.count("\n") == 1, err


def test_knn_warns_when_k_exceeds_the_training_images(tmp_path: Path, monkeypatch, capsys):
    """knn_predict caps k at the training set; the stage says so, naming the key, before it starts."""
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/ffcv.json").write_text('{"train": {"images": 12, "classes": 3}}')
    with pytest.raises(SystemExit):  # then stops: this folder holds no project
        run_stage("knn", knn.main, str(REPO / "params.yaml"))
    out = capsys.readouterr()
    assert out.out == "knn: warning: knn.k = 20 is more than the 12 training images; every image votes (k = 12)\n"
    assert out.err.startswith("knn: error: ") and out.err.count("\n") == 1
