"""Detectron2 fine-tuning on the toy VOC and COCO sets: a few iterations train and produce metrics, and an
interrupted run resumes from its last checkpoint instead of restarting."""

import json
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase

from pipeline.config import Params
from pipeline.data.toy_detection import make_toy_detection
from pipeline.detection import train
from pipeline.detection.convert import convert_moco_to_d2, save_d2_weights
from pipeline.models.backbone import resnet
from tests.conftest import TINY_DETECTION


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(toy detection root, converted random-init resnet18 weights)."""
    root = tmp_path_factory.mktemp("toy_det")
    make_toy_detection(root, classes=2, train_images=8, test_images=4, size=64, seed=0)
    torch.manual_seed(0)
    weights = root / "backbone.pkl"
    save_d2_weights(convert_moco_to_d2(resnet("resnet18").state_dict(), "resnet18"), weights)
    return root, weights


def tiny_params(root: Path, **run) -> Params:
    p = Params()
    p.detection.num_workers = 0
    p.detection.voc.root, p.detection.coco.root = str(root / "VOCdevkit"), str(root / "coco")
    for task in (p.detection.voc, p.detection.coco):
        for key, value in (TINY_DETECTION | run).items():
            setattr(task, key, value)
    return p


@pytest.mark.parametrize("task, kinds", [("voc", {"bbox"}), ("coco", {"bbox", "segm"})])
def test_a_few_iterations_train_and_evaluate(setup, tmp_path, task, kinds):
    root, weights = setup
    m = train.finetune(tiny_params(root, max_iter=3), task, weights, tmp_path / task)
    assert kinds <= m.keys() and m["iterations"] == 3 and m["classes"] == 2 and len(m["trials"]) == 1
    for kind in kinds:
        assert set(m[kind]) == {"AP", "AP50", "AP75", "AP_std", "AP50_std", "AP75_std"}
        assert all(0 <= v <= 100 for v in m[kind].values())
    assert m["trials"][0]["timing"]["resumed_at"] == 0
    assert (tmp_path / task / "trial0/model_final.pth").is_file()
    written = json.loads((tmp_path / task / "trial0/results.json").read_text())
    assert written["bbox"] == m["trials"][0]["bbox"]


class Crash(HookBase):
    """Stands in for a killed job: dies after iteration `at`, once the checkpoints up to it are written."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt(f"killed after iteration {self.at}")


def test_interrupted_run_resumes_from_its_last_checkpoint(setup, tmp_path, monkeypatch):
    root, weights = setup
    p = tiny_params(root, max_iter=5, checkpoint_period=2)  # checkpoints after iterations 1 and 3
    build_hooks = train.Trainer.build_hooks
    with monkeypatch.context() as mp:
        mp.setattr(train.Trainer, "build_hooks", lambda self: build_hooks(self) + [Crash(at=2)])
        with pytest.raises(KeyboardInterrupt):
            train.finetune(p, "voc", weights, tmp_path)
    assert (tmp_path / "trial0/last_checkpoint").read_text().strip() == "model_0000001.pth"
    m = train.finetune(p, "voc", weights, tmp_path)
    assert m["trials"][0]["timing"]["resumed_at"] == 2  # the iteration after the checkpoint, not 0
    # a run with other params does not resume from these checkpoints
    m = train.finetune(tiny_params(root, max_iter=2), "voc", weights, tmp_path)
    assert m["trials"][0]["timing"]["resumed_at"] == 0
    # nor does one with the same params but other stage code or data (cli.stage_identity)
    m = train.finetune(tiny_params(root, max_iter=2), "voc", weights, tmp_path, identity="edited code")
    assert m["trials"][0]["timing"]["resumed_at"] == 0


def test_trials_report_mean_and_std():
    trials = [{"bbox": {"AP": a, "AP50": 2 * a, "AP75": a / 2}} for a in (10.0, 20.0, 30.0)]
    s = train.summarize(trials)
    assert s["bbox"]["AP"] == 20.0 and s["bbox"]["AP50"] == 40.0 and s["bbox"]["AP_std"] == 10.0
    assert "segm" not in s
