"""Preset dry run: every paper preset, applied as a user would, runs two steps of every training stage on
a tiny ImageNet-shaped set on this CPU, so that a preset that cannot run fails here and not on the cluster.

The set: ImageFolder train/val whose classes are ImageNet wnids (the WordNet analysis runs on them), JPEGs
of 300-500 px a side, placed where the presets look (data/imagenet, data/imagenet100), and the toy
detection set at data/VOCdevkit and data/coco. Only the knobs in KNOBS are overridden (K, epochs,
iterations, batch and world size, image and crop size, ROIs per image, test proposals, precise-BN
iterations; the test-set size is the toy detection set's); the test checks that every other value the
presets set is in effect. Stages are called in-process (launch.executor local), in the order dvc.yaml
runs them; pretraining runs hard_start_epoch epochs (counted from 1) of 2 steps, so the synthetic
negatives of MoCHi and SynCo are made in its last epoch.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import load_params
from pipeline.data.toy_detection import make_toy_detection
from pipeline.presets import PRESETS, flatten, leaves, set_dotted
from stages import convert, detect, ffcv_convert, knn, lineval, pretrain, semisup
from tests.conftest import results

REPO = Path(__file__).resolve().parents[1]
WNIDS = (PRESETS / "imagenet100.txt").read_text().split()[:3]
ROOTS = {"voc": "VOCdevkit", "coco": "coco"}  # where the detection presets look, under data/
TRAIN, VAL = 3, 2  # images per class: 9 train images = 2 steps of batch 4, with K 4 <= 9 - 4

# leaf names the dry run may change (the list, plus N which follows K and semisup's trials and subset);
# everything else stays as the presets set it
KNOBS = {"queue_size", "n_hard", "epochs", "trials", "subset", "max_iter", "batch_size", "ims_per_batch", "executor",
         "nodes", "tasks_per_node",
         "res", "min_size_train", "max_size_train", "min_size_test", "max_size_test", "roi_batch_size", "test_topk",
         "precise_bn_iters"}
DETECTION = {"max_iter": 2, "ims_per_batch": 2, "min_size_train": [64], "max_size_train": 64, "min_size_test": 64,
             "max_size_test": 64, "roi_batch_size": 8, "test_topk": 20, "precise_bn_iters": 1}
OVERRIDES = {
    "launch": {"executor": "local", "nodes": 1, "tasks_per_node": 1},  # world size 1 on this CPU
    # K scaled to the set, so N (each query's hard negatives, top N of the queue) too; s, s' and SynCo's counts stay
    "pretrain": {"queue_size": 4, "batch_size": 4, "res": 32, "mochi": {"n_hard": 4}, "synco": {"n_hard": 4}},
    # SimCLR's lists name ImageNet's files, not this set's: its own balanced subset instead, after checking that
    # the preset's lists are read and refused naming the first image the set lacks
    "semisup": {"subset": "balanced", "trials": 1, "epochs": [1, 1], "batch_size": 4, "res": 32},
    "lineval": {"epochs": 1, "batch_size": 4, "res": 32},
    "knn": {"batch_size": 4, "res": 32},
    "detection": {"voc": DETECTION, "coco": DETECTION},
}

# every preset at least once, each stage a preset touches run with it; detection stages where a detection
# preset is in the combination (voc-24k's 5 trials run once)
COMBINATIONS = [
    (("in1k", "mochi-128-1024-512", "voc-24k", "coco-1x"), ("lineval", "knn", "voc", "coco")),
    (("in100", "synco", "coco-2x"), ("lineval", "knn", "coco")),
    (("in100", "mochi-512-1024-512"), ()),
    (("in1k", "mocov2", "semisup-in1k"), ("semisup",)),
]


@pytest.fixture(scope="module")
def imagenet_shaped(tmp_path_factory) -> Path:
    """train/ and val/ with one folder per wnid, JPEGs of 300-500 px a side (smooth colour fields + noise)."""
    root = tmp_path_factory.mktemp("imagenet_shaped")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN), ("val", VAL)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(300, 501, size=2))
                coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
                pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))  # [h, w, 3]
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / wnid / f"{i}.jpg", quality=90)
    return root


def test_overrides_are_only_the_allowed_knobs():
    assert {key.rsplit(".", 1)[1] for key in flatten(OVERRIDES)} <= KNOBS
    assert {name for names, _ in COMBINATIONS for name in names} == {f.stem for f in PRESETS.glob("*.yaml")}


@pytest.mark.parametrize("names, stages", COMBINATIONS, ids=["+".join(n) for n, _ in COMBINATIONS])
def test_preset_runs_every_training_stage(names, stages, imagenet_shaped, tmp_path, monkeypatch):
    preset = leaves(list(names))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in preset.items():
        set_dotted(raw, dotted, value)
    over = flatten(OVERRIDES)
    method = preset.get("pretrain.method", raw["pretrain"]["method"])
    epochs = raw["pretrain"]["hard_start_epoch"] if method != "moco" else 1  # the warm-up, then its first epoch
    over["pretrain.epochs"] = epochs
    for dotted, value in over.items():
        set_dotted(raw, dotted, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(tmp_path / "params.yaml")

    applied = flatten(p.to_dict())
    kept = {k: v for k, v in preset.items() if k not in over}
    assert {k: applied[k] for k in kept} == kept, "a preset value is not in effect"
    assert p.world_size == 1 and p.launch.executor == "local"

    # the data where the presets look for it, dvc.yaml for the stages' identities
    for key, split in (("data.train_dir", "train"), ("data.val_dir", "val")):
        (tmp_path / applied[key]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / applied[key]).symlink_to(imagenet_shaped / split, target_is_directory=True)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (tmp_path / "presets").symlink_to(REPO / "presets", target_is_directory=True)  # SimCLR's lists, as in the repo
    if {"voc", "coco"} & set(stages):
        assert all(applied[f"detection.{task}.root"] == f"data/{ROOTS[task]}" for task in {"voc", "coco"} & set(stages))
        make_toy_detection(tmp_path / "data", classes=2, train_images=4, test_images=2, size=64, seed=0)
    monkeypatch.chdir(tmp_path)

    ffcv_convert.main(p)
    assert (tmp_path / "data/ffcv/classes.txt").read_text().split() == sorted(WNIDS)
    pretrain.main(p)
    m = results(tmp_path, "pretrain")
    assert (m["method"], m["epochs"], m["steps"]) == (p.pretrain.method, epochs, 2 * epochs)
    assert math.isfinite(m["loss"])
    if method != "moco":  # the last epoch trained with synthetic negatives: k+ must beat them too
        assert m["proxy_acc_with_synthetic"] <= m["proxy_acc"]
    if "lineval" in stages:
        lineval.main(p)
        assert math.isfinite(json.loads((tmp_path / "metrics/lineval.json").read_text())["top1"])
    if "knn" in stages:
        knn.main(p)
        assert math.isfinite(json.loads((tmp_path / "metrics/knn.json").read_text())["top1"])
    if "semisup" in stages:
        assert preset["semisup.subset"] == "simclr"
        with pytest.raises(ValueError, match=r"1percent.txt: line 1: n\d{8}/n\d{8}_\d+.JPEG is not in the train set"):
            semisup.subsets(replace(p, semisup=replace(p.semisup, subset="simclr")))
        semisup.main(p)
        fractions = json.loads((tmp_path / "metrics/semisup.json").read_text())["fractions"]
        assert len(fractions) == 2 and all(math.isfinite(v["top1"]) for v in fractions.values())
    if {"voc", "coco"} & set(stages):
        convert.main(p)
    for task in ("voc", "coco"):
        if task in stages:
            detect.main(p, task)
            d = json.loads((tmp_path / f"metrics/{task}.json").read_text())
            run = getattr(p.detection, task)
            assert len(d["trials"]) == run.trials and d["iterations"] == run.max_iter
            kinds = ("bbox", "segm") if task == "coco" else ("bbox",)  # AP may be NaN after 2 iterations
            assert all({"AP", "AP50", "AP75"} <= set(d[kind]) for kind in kinds)
