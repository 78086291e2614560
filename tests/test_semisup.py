"""Semi-supervised evaluation: labelled subsets (balanced, seeded, the same for every method, SimCLR's lists
through the .beton manifest), the fine-tuning optimizer, bad params, and the real stage under DVC."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, Params, SemisupParams, load_params
from pipeline.data.ffcv_io import EvalLoader, write_beton
from pipeline.data.manifest import manifest_path, read_manifest, write_manifest
from pipeline.data.subsets import SIMCLR_LISTS, balanced_subset, read_simclr_list, subset_from_names
from pipeline.models.backbone import random_init_backbone, resnet
from pipeline.train.semisup import classifier, optimizer
from tests.conftest import REPO, results, run

LABELS = torch.tensor([0] * 160 + [1] * 37 + [2] * 5 + [3] * 1)  # uneven classes, one of a single image


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_balanced_subset_takes_the_rounded_share_of_every_class_at_least_one(fraction):
    chosen = balanced_subset(LABELS, fraction, seed=0)
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == len(chosen)
    for c in range(4):  # loop reference for the per-class count
        n_c = int((LABELS == c).sum())
        assert int((LABELS[chosen] == c).sum()) == max(1, int(fraction * n_c + 0.5)), (c, fraction)


def test_balanced_subset_is_seeded_nested_and_independent_of_anything_but_labels_and_seed():
    a, b, other = (balanced_subset(LABELS, 0.1, s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, other)
    small = set(balanced_subset(LABELS, 0.01, 3).tolist())
    assert small <= set(a.tolist())  # the same seed's 1% is inside its 10%
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(balanced_subset(LABELS, 0.1, 3), a)


def test_stage_subsets_are_identical_across_pretraining_methods(tmp_path, monkeypatch):
    from stages import semisup as stage

    monkeypatch.chdir(tmp_path)
    write_manifest(manifest_path(stage.TRAIN), [(f"c{int(y)}/{i}.jpg", int(y)) for i, y in enumerate(LABELS)])
    chosen = {}
    for method in ("moco", "mochi", "synco"):
        p = Params()
        p.pretrain = replace(p.pretrain, method=method)
        chosen[method] = stage.subsets(p)
    for key, indices in chosen["moco"].items():
        assert torch.equal(indices, chosen["mochi"][key]) and torch.equal(indices, chosen["synco"][key]), key
    assert not torch.equal(chosen["moco"][(0.1, 0)], chosen["moco"][(0.1, 1)])  # trials draw other subsets


def _simclr_style(tmp_path: Path, fraction: float, lines: list[str]) -> Path:
    path = tmp_path / SIMCLR_LISTS[fraction][0]
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_simclr_list_must_exist_and_be_the_published_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1percent.txt: SimCLR's ImageNet 1% list not found; copy"):
        read_simclr_list(tmp_path / "1percent.txt", 0.01)
    path = _simclr_style(tmp_path, 0.1, ["n01440764_10026.JPEG"])
    with pytest.raises(ValueError, match=r"not SimCLR's 10percent.txt \(sha256 differs"):
        read_simclr_list(path, 0.1)


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_simclr_lists_parse_to_imagenet_train_paths_of_all_1000_classes(fraction):
    """The shipped lists (presets/imagenet_subsets, sha256-checked on reading)."""
    name, count, _ = SIMCLR_LISTS[fraction]
    rels = read_simclr_list(REPO / "presets/imagenet_subsets" / name, fraction)
    assert len(rels) == len(set(rels)) == count
    wnids = [rel.split("/")[0] for rel in rels]
    assert len(set(wnids)) == 1000 and all(rel.startswith(f"{w}/{w}_") for rel, w in zip(rels, wnids, strict=True))
    index = {w: i for i, w in enumerate(sorted(set(wnids)))}
    per_class = torch.bincount(torch.tensor([index[w] for w in wnids]))
    assert int(per_class.min()) >= 1 and int(per_class.max()) <= (13 if fraction == 0.01 else 130)


def test_file_names_map_to_samples_through_the_manifest_skipped_images_accounted(tiny_imagefolder):
    train = tiny_imagefolder / "train"
    (train / "bee" / "0.jpg").write_bytes(b"not a jpeg")  # skipped: every later sample shifts down by one
    beton = tiny_imagefolder / "train.beton"
    info = write_beton(train, beton, max_resolution=32, on_corrupt="skip", num_workers=1)
    write_manifest(manifest_path(beton), info["samples"])
    paths, labels = read_manifest(manifest_path(beton))
    assert len(paths) == info["images"] == 11 and "bee/0.jpg" not in paths
    chosen = subset_from_names(["cat/1.jpg", "ant/2.jpg", "bee/3.jpg"], paths, "list.txt")
    assert [paths[i] for i in chosen] == ["ant/2.jpg", "bee/3.jpg", "cat/1.jpg"]
    loader = EvalLoader(beton, 8, 16, 1, train_aug=False, indices=chosen.tolist())
    seen = torch.cat([y for _, y in loader])
    assert seen.tolist() == [labels[i] for i in chosen] == [0, 1, 2]  # the .beton's labels agree with the manifest
    with pytest.raises(ValueError, match=r"list.txt: line 2: bee/0.jpg is not in the train set .*1 of 3"):
        subset_from_names(["cat/1.jpg", "bee/0.jpg", "ant/0.jpg"], paths, "list.txt")


def test_optimizer_gives_backbone_and_classifier_their_own_lr_and_a_cosine_schedule():
    sp = SemisupParams(lr_backbone=0.0, lr_classifier=0.5)
    torch.manual_seed(0)
    model = classifier(resnet("resnet18"), "resnet18", 5)
    assert float(model[1].weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not model[1].bias.any()
    opt, sched = optimizer(model, sp, epochs=4)
    conv = model[0].conv1.weight.detach().clone()
    fc = model[1].weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.equal(model[0].conv1.weight, conv) and not torch.equal(model[1].weight, fc)  # lr_backbone 0
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5 * (1 + 2 ** -0.5) / 2, 0.25, 0.5 * (1 - 2 ** -0.5) / 2])


def test_random_init_control_is_one_seeded_network_and_leaves_the_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b = random_init_backbone("resnet18", 0), random_init_backbone("resnet18", 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    torch.manual_seed(0)
    assert torch.equal(resnet("resnet18").conv1.weight, a.conv1.weight)  # what stages/knn.py built before


@pytest.mark.parametrize("overrides, message", [
    ({"fractions": [0.0, 0.1]}, "semisup.fractions = [0.0, 0.1]: 0.0 is not in (0, 1]"),
    ({"fractions": [1.5]}, "semisup.fractions = [1.5]: 1.5 is not in (0, 1]"),
    ({"fractions": []}, "semisup.fractions = [] must be a non-empty list"),
    ({"epochs": [10, 20, 30]}, "semisup.epochs = [10, 20, 30] must be one integer >= 1, or one per fraction"),
    ({"subset": "simclr", "fractions": [0.05]}, "semisup.subset = simclr has lists for 0.01, 0.1 only"),
    ({"fractions": [0.01, 0.1], "epochs": [60, 30]}, None),  # SynCo's per-fraction epochs
    ({"fractions": [0.05]}, None),  # `dvc exp run -S semisup.fractions=[0.05]` with the default epochs
    ({"trials": 0}, "semisup.trials = 0 must be >= 1"),
])
def test_semisup_params_bad_ones_name_the_key(tmp_path, overrides, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["semisup"] |= overrides
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    if message is None:
        assert load_params(tmp_path / "params.yaml").semisup.fractions == overrides["fractions"]
        return
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "params.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_semisup_stage_under_dvc_metrics_resume_narrow_deps_and_bad_lists(project):
    path, set_params = project
    run(["dvc", "repro", "semisup"], path)
    m = results(path, "semisup")
    assert set(m["fractions"]) == {"25pct", "50pct"} and m["subset"] == "balanced"
    for key, images in (("25pct", 12), ("50pct", 24)):  # 3 classes x 16 train images
        f = m["fractions"][key]
        assert f["images"] == images and f["trials"] == 2
        assert 0 <= f["top1"] <= f["top5"] <= 100 and f["top1_std"] >= 0
        assert f["gain"] == pytest.approx(f["top1"] - f["random_init_top1"], abs=1e-3)
    runs = json.loads((path / "checkpoints/semisup/runs.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2  # fractions x trials x (pretrained, random init)

    # resumable per trial: a run lost to a kill is the only one done again, with the same result
    log = path / "checkpoints/semisup/runs.json"
    saved = json.loads(log.read_text())
    del saved["runs"]["50pct/trial1/random_init"]
    log.write_text(json.dumps(saved))
    out = run(["python", "-m", "stages.semisup"], path).stdout
    assert "semisup 50pct trial 2/2 random_init" in out and out.count("top-1") == 1 + 2, out  # 1 run + 2 summaries
    assert json.loads((path / "metrics/semisup.json").read_text())["fractions"] == m["fractions"]

    # narrow deps: a semisup param re-runs this stage only
    set_params({"semisup": {"fractions": [0.5]}})
    out = run(["dvc", "repro", "semisup"], path).stdout
    assert "Running stage 'semisup'" in out and "Running stage 'pretrain'" not in out, out
    assert set(json.loads((path / "metrics/semisup.json").read_text())["fractions"]) == {"50pct"}

    # SimCLR lists: a missing list, then a list naming an image the train set lacks, fail in one line
    set_params({"semisup": {"subset": "simclr", "fractions": [0.01], "simclr_dir": "lists"}})
    r = run(["python", "-m", "stages.semisup"], path, check=False)
    assert r.returncode == 2 and "lists/1percent.txt: SimCLR's ImageNet 1% list not found" in r.stderr, r.stderr
    # the published list (shipped) against the toy train set: its first image is not there
    real = REPO / "presets/imagenet_subsets"
    (path / "lists").mkdir()
    shutil.copy(real / "1percent.txt", path / "lists/1percent.txt")
    r = run(["python", "-m", "stages.semisup"], path, check=False)
    first = (real / "1percent.txt").read_text().split()[0]
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"lists/1percent.txt: line 1: {first.split('_')[0]}/{first} is not in the train set" in r.stderr
