"""Paper presets: each validates on its own and in the combinations users run, and what they derive
(world size, global batch, lr, K, warm-up, detection schedule) is what the papers used."""

import shutil
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_params
from pipeline.detection.train import detection_cfg
from pipeline.presets import apply, available, flags, imagenet100, leaves

REPO = Path(__file__).resolve().parents[1]
DETECTION = ["voc-24k", "coco-1x"]  # a multi-GPU preset needs a detection batch its GPUs divide


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "slurm/profiles", tmp_path / "slurm/profiles")
    return tmp_path / "params.yaml"


def test_presets_exist():
    assert {"in1k", "in100", "mocov2", "mochi-128-1024-512", "mochi-512-1024-512", "synco", "voc-24k", "coco-1x",
            "coco-2x"} <= set(available())


@pytest.mark.parametrize("name", available())
def test_each_preset_validates(params_file, name):
    """Each preset in a paper study: on ImageNet (IN-1k unless it is the data preset), with the detection
    presets, whose batch of 16 the 8 or 4 GPUs divide."""
    data = [] if name.startswith("in") else ["in1k"]
    apply([*data, name, *DETECTION], params_file)


def test_apply_keeps_comments_and_leaves_other_keys(params_file):
    before, original = load_params(params_file), params_file.read_text()
    with pytest.raises(ConfigError, match=r"pretrain\.mochi\.n_hard = 512 must be <= pretrain\.queue_size = 256"):
        apply(["mochi-512-1024-512"], params_file)  # N 512 of the toy's K 256 would silently be N = K
    assert params_file.read_text() == original  # nothing written
    apply(["mochi-128-1024-512"], params_file)
    text = params_file.read_text()
    assert "# Every knob of every stage." in text and "# v2 projection head" in text
    after = load_params(params_file)
    assert (after.pretrain.method, after.pretrain.mochi.n_hard) == ("mochi", 128)
    assert after.data == before.data and after.lineval == before.lineval


def test_mocov2_on_imagenet_1k_is_moco_v2(params_file):
    p = apply(["in1k", "mocov2", *DETECTION], params_file)
    assert p.world_size == 8 and p.launch.gpus_per_node == 8 and p.launch.executor == "slurm"
    global_batch = p.pretrain.batch_size * p.world_size
    assert global_batch == 256 and p.pretrain.lr * global_batch / 256 == pytest.approx(0.03)
    pt = p.pretrain
    assert (pt.queue_size, pt.key_momentum, pt.temperature, pt.epochs, pt.res) == (65536, 0.999, 0.2, 200, 224)
    assert pt.queue_size % global_batch == 0 and pt.bn_splits == 1 and p.model.arch == "resnet50"
    lv = p.lineval
    assert (lv.lr, lv.epochs, lv.batch_size, lv.lr_steps, lv.augment) == (30.0, 100, 256, [0.6, 0.8], True)


@pytest.mark.parametrize("n_hard", [128, 512])
def test_mochi_released_models(params_file, n_hard):
    pt = apply(["in1k", f"mochi-{n_hard}-1024-512", *DETECTION], params_file).pretrain
    m = pt.mochi
    assert (pt.method, m.n_hard, m.s, m.s_prime, pt.hard_start_epoch) == ("mochi", n_hard, 1024, 512, 16)


def test_imagenet_100_scales_batch_and_lr(params_file):
    p = apply(["in100", "mochi-128-1024-512", *DETECTION], params_file)
    global_batch = p.pretrain.batch_size * p.world_size
    assert p.world_size == 4 and global_batch == 128
    assert p.pretrain.lr * global_batch / 256 == pytest.approx(0.015)  # linear scaling of MoCo's 0.03 per 256
    assert (p.pretrain.queue_size, p.pretrain.hard_start_epoch, p.lineval.lr) == (16384, 11, 10.0)


def test_synco_defaults(params_file):
    s = apply(["in1k", "synco", *DETECTION], params_file).pretrain
    assert (s.method, s.synco.n_hard, s.hard_start_epoch) == ("synco", 1024, 11)
    assert s.synco.counts == [256, 256, 256, 64, 64, 64]
    assert (s.synco.sigma, s.synco.delta, s.synco.eta) == (0.01, 0.01, 0.01)


@pytest.mark.parametrize("coco, max_iter, steps", [("coco-1x", 90_000, (60_000, 80_000)),
                                                   ("coco-2x", 180_000, (120_000, 160_000))])
def test_detection_presets_are_mocos_configs(params_file, tmp_path, coco, max_iter, steps):
    p = apply(["in1k", "voc-24k", coco], params_file)
    names = dict(train=["train"], test="test", weights="", output_dir=tmp_path, seed=0, num_workers=4, device="cpu")
    voc = detection_cfg("resnet50", "voc", 20, p.detection.voc, **names)
    assert (voc.SOLVER.MAX_ITER, tuple(voc.SOLVER.STEPS), voc.SOLVER.BASE_LR, voc.SOLVER.IMS_PER_BATCH) == (
        24_000, (18_000, 22_000), 0.02, 16)
    assert voc.INPUT.MIN_SIZE_TRAIN == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (voc.INPUT.MIN_SIZE_TEST, voc.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert voc.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512
    assert voc.TEST.PRECISE_BN.NUM_ITER == 200 and p.detection.voc.trials == 5
    c = detection_cfg("resnet50", "coco", 80, p.detection.coco, **names)
    assert (c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS), c.MODEL.MASK_ON) == (max_iter, steps, True)
    assert c.SOLVER.IMS_PER_BATCH % p.world_size == 0  # 2 images per GPU on 8 GPUs


def test_flags_are_dvc_set_param_arguments():
    out = flags(["mocov2", "voc-24k"])
    pairs = dict(a.split("=", 1) for a in out[1::2])
    assert set(out[::2]) == {"-S"} and len(pairs) == len(leaves(["mocov2", "voc-24k"]))
    assert pairs["pretrain.method"] == "moco" and pairs["detection.voc.min_size_train"].startswith("[480,512,")


def test_unknown_preset_and_bad_combination_fail_without_writing(params_file):
    before = params_file.read_text()
    with pytest.raises(ConfigError, match="preset 'mochi' not found.*mochi-128-1024-512"):
        apply(["mochi"], params_file)
    # 8 GPUs cannot split the toy detection batch of 4: the detection presets must come along
    with pytest.raises(ConfigError, match="detection.voc.ims_per_batch = 4 must be a multiple of the world size 8"):
        apply(["in1k"], params_file)
    assert params_file.read_text() == before


def test_imagenet100_links_the_cmc_classes(tmp_path):
    wnids = (REPO / "presets/imagenet100.txt").read_text().split()
    assert len(wnids) == len(set(wnids)) == 100
    for split in ("train", "val"):
        for w in wnids + ["n99999999"]:
            (tmp_path / "in1k" / split / w).mkdir(parents=True)
    assert imagenet100(tmp_path / "in1k", tmp_path / "in100") == 200
    assert sorted(p.name for p in (tmp_path / "in100/train").iterdir()) == sorted(wnids)
    (tmp_path / "in1k/val" / wnids[5]).rmdir()
    with pytest.raises(FileNotFoundError, match=wnids[5]):
        imagenet100(tmp_path / "in1k", tmp_path / "other")


def test_semisup_in1k_is_synco_released_recipe(params_file):
    p = apply(["in1k", "semisup-in1k", *DETECTION], params_file)
    sp = p.semisup
    assert (sp.subset, sp.fractions, sp.epochs, sp.batch_size, sp.res) == ("simclr", [0.01, 0.1], [60, 30], 1024, 224)
    assert (sp.lr_classifier, sp.lr_backbone, sp.momentum, sp.weight_decay) == (0.5, 0.005, 0.9, 1e-6)
    text = (REPO / "presets/semisup-in1k.yaml").read_text()
    assert "giakoumoglou/synco" in text and "barlowtwins" in text and "2410.02401" in text  # cites its sources


SOURCED = ("model", "pretrain", "lineval", "detection", "knn")  # paper settings; launch and data paths are the user's


@pytest.mark.parametrize("name", available())
def test_every_paper_value_says_where_it_comes_from(name):
    """Each value of a paper setting carries its source on its line or in the comment just above it (a quote
    with its file or section, or "not stated" and the value's other source)."""
    lines = (REPO / "presets" / f"{name}.yaml").read_text().splitlines()
    section, unsourced = "", []
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            section = line.rstrip(":")
        key, _, value = line.strip().partition(":")
        value = value.split("#")[0].strip()
        if not value or line.lstrip().startswith("#") or section not in SOURCED or key in ("root", "method"):
            continue
        if "#" not in line and not lines[i - 1].lstrip().startswith("#"):
            unsourced.append(f"{section}: {line.strip()}")
    assert not unsourced, f"presets/{name}.yaml: values without a source: {unsourced}"


@pytest.mark.parametrize("data, classes", [("in1k", 1000), ("in100", 100)])
def test_data_presets_set_tau_plus_to_their_class_prior(params_file, data, classes):
    """DCL/HCL's tau+ is the class prior 1/C: each data preset sets its own (the toy's 0.1 on 1000 classes
    would put most queries' negatives on the clamp), and pretrain's check accepts it."""
    from dataclasses import replace

    from pipeline.config import tau_plus_warning
    p = apply([data, *DETECTION], params_file)
    assert p.pretrain.tau_plus == pytest.approx(1 / classes)
    assert "pretrain.tau_plus" in leaves([data])
    for loss in ("dcl", "hcl"):
        assert tau_plus_warning(replace(p.pretrain, loss=loss), classes) is None
