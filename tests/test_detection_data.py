"""The toy detection set in real VOC and COCO formats: deterministic, read by detectron2's own loaders,
scored 100 AP by detectron2's evaluators when the ground truth is the prediction, and bad data sets fail
their checks with the offending file named."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import Params
from pipeline.data.toy_detection import make_toy_detection
from pipeline.detection.datasets import (
    DatasetError,
    check_coco,
    check_voc,
    register_coco,
    register_voc,
    voc_classes,
)
from stages import toy_detection as stage

TOY = dict(classes=3, train_images=8, test_images=6, size=96, seed=0)
VOC_TRAIN = ["VOC2007/trainval", "VOC2012/trainval"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    """(root, summary) of the tiny toy set, written once for the module."""
    root = tmp_path_factory.mktemp("toy_det")
    return root, make_toy_detection(root, **TOY)


@pytest.fixture
def toy_copy(toy, tmp_path) -> Path:
    """A scratch copy of the toy set that a test may break."""
    shutil.copytree(toy[0], tmp_path / "toy")
    return tmp_path / "toy"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def objects_by_image(dicts: list[dict]) -> dict[str, list[tuple]]:
    """{file stem: sorted [(class, x0, y0, x1, y1)]} of detectron2 dataset dicts, boxes as XYXY_ABS."""
    classes = {}
    for d in dicts:
        classes[Path(d["file_name"]).stem] = sorted(
            (a["category_id"], *BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS))
            for a in d["annotations"])
    return classes


def polygon_masks(ann: dict, height: int, width: int) -> np.ndarray:
    """[H, W] bool: the annotation's polygons rasterised by pycocotools, as COCO's evaluator does."""
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], height, width))
    return mask_utils.decode(rle).astype(bool)


def ground_truth_as_predictions(d: dict, with_masks: bool = False, class_shift: int = 0) -> Instances:
    """The image's ground truth as a detector's output, every score 1 (classes shifted for a control)."""
    anns = d["annotations"]
    boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    inst = Instances((d["height"], d["width"]), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     scores=torch.ones(len(anns)),
                     pred_classes=torch.tensor([a["category_id"] + class_shift for a in anns]) % TOY["classes"])
    if with_masks:
        inst.pred_masks = torch.from_numpy(np.stack([polygon_masks(a, d["height"], d["width"]) for a in anns]))
    return inst


def test_generation_is_deterministic_and_the_formats_agree(toy, tmp_path):
    root, summary = toy
    again = make_toy_detection(tmp_path, **TOY)
    assert again == summary and files(tmp_path) == files(root)
    make_toy_detection(tmp_path / "seed1", **TOY | {"seed": 1})
    assert files(tmp_path / "seed1") != files(root)
    splits = summary["splits"]
    assert summary["classes"] == ["checker", "stripes_h", "stripes_v"]  # the first 3 toy textures, sorted
    assert {s: n["images"] for s, n in splits.items()} == {
        "VOC2007/trainval": 4, "VOC2012/trainval": 4, "VOC2007/test": 6, "train2017": 8, "val2017": 6}
    objects = {split: n["objects"] for split, n in splits.items()}
    assert objects["train2017"] == objects["VOC2007/trainval"] + objects["VOC2012/trainval"]
    assert objects["val2017"] == objects["VOC2007/test"]
    for split in ("train2017", "val2017"):  # 1-3 objects an image
        assert splits[split]["images"] <= splits[split]["objects"] <= 3 * splits[split]["images"]
    voc, coco = root / "VOCdevkit", root / "coco"
    for voc_file, coco_file in (("VOC2007/JPEGImages/000001.jpg", "train2017/000001.jpg"),
                                ("VOC2012/JPEGImages/2012_000005.jpg", "train2017/2012_000005.jpg"),
                                ("VOC2007/JPEGImages/000009.jpg", "val2017/000009.jpg")):  # one rendering
        assert (voc / voc_file).read_bytes() == (coco / coco_file).read_bytes()
    with pytest.raises(ValueError, match="at least 4 and 2"):
        make_toy_detection(tmp_path / "small", **TOY | {"test_images": 1})
    with pytest.raises(ValueError, match="at least classes = 3 each"):
        make_toy_detection(tmp_path / "small", **TOY | {"test_images": 2})


def test_detectron2_loaders_read_both_formats(toy):
    root, summary = toy
    voc, coco = root / "VOCdevkit", root / "coco"
    classes = voc_classes(voc, VOC_TRAIN)
    assert classes == summary["classes"]
    voc_names = register_voc(voc, [*VOC_TRAIN, "VOC2007/test"], classes)
    assert register_voc(voc, VOC_TRAIN, classes) == voc_names[:2]  # registering again is harmless
    assert voc_names[0].startswith("voc_2007_trainval@") and voc_names[1].startswith("voc_2012_trainval@")
    assert MetadataCatalog.get(voc_names[2]).year == 2007 and MetadataCatalog.get(voc_names[1]).year == 2012
    coco_train, coco_test = register_coco(coco, "train2017"), register_coco(coco, "val2017")
    assert register_coco(coco, "val2017") == coco_test
    assert MetadataCatalog.get(coco_test).thing_classes == classes  # known before the first load

    voc_train = [d for name in voc_names[:2] for d in DatasetCatalog.get(name)]
    voc_test = DatasetCatalog.get(voc_names[2])
    coco_train_dicts, coco_test_dicts = DatasetCatalog.get(coco_train), DatasetCatalog.get(coco_test)
    for voc_dicts, coco_dicts, split in ((voc_train, coco_train_dicts, "train2017"),
                                         (voc_test, coco_test_dicts, "val2017")):
        n = summary["splits"][split]
        assert len(voc_dicts) == len(coco_dicts) == n["images"]
        assert sum(len(d["annotations"]) for d in coco_dicts) == n["objects"]
        assert objects_by_image(voc_dicts) == objects_by_image(coco_dicts)  # same class order, same boxes
        assert {a["category_id"] for d in coco_dicts for a in d["annotations"]} == set(range(len(classes)))

    for d in coco_test_dicts:
        for a in d["annotations"]:  # the mask is the box's content: its tight box is the box
            mask = polygon_masks(a, d["height"], d["width"])
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
        # the drawn objects are where the masks say: textured inside, a smooth background outside
        gray = np.asarray(Image.open(d["file_name"]).convert("L"), dtype=np.float64)
        edges = np.abs(np.diff(gray, axis=1))[1:] + np.abs(np.diff(gray, axis=0))[:, 1:]  # [H-1, W-1]
        inside = np.any([polygon_masks(a, d["height"], d["width"]) for a in d["annotations"]], axis=0)[1:, 1:]
        assert edges[inside].mean() > 3 * edges[~inside].mean()

    # detectron2's training mapper turns a dict into an image tensor and instances (with masks for COCO)
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True)
    coco_item, voc_item = mapper(coco_train_dicts[0]), mapper(voc_train[0])
    assert coco_item["image"].shape == (3, TOY["size"], TOY["size"])
    assert len(coco_item["instances"].gt_masks) == len(coco_train_dicts[0]["annotations"])
    assert len(voc_item["instances"]) == len(voc_train[0]["annotations"])


def test_evaluators_score_ground_truth_100_ap(toy):
    root, summary = toy
    name = register_voc(root / "VOCdevkit", ["VOC2007/test"], summary["classes"])[0]
    dicts = DatasetCatalog.get(name)

    def voc_ap(class_shift: int) -> dict:
        evaluator = PascalVOCDetectionEvaluator(name)
        evaluator.reset()
        for d in dicts:
            evaluator.process([d], [{"instances": ground_truth_as_predictions(d, class_shift=class_shift)}])
        return evaluator.evaluate()["bbox"]

    # exact boxes match at every IoU up to 0.95, so even VOC07's 11-point AP (2007) reaches 100
    assert voc_ap(0) == pytest.approx({"AP": 100, "AP50": 100, "AP75": 100})
    assert voc_ap(1)["AP50"] == pytest.approx(0)  # control: every box given the wrong class

    name = register_coco(root / "coco", "val2017")
    dicts = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    evaluator.reset()
    for d in dicts:
        evaluator.process([d], [{"instances": ground_truth_as_predictions(d, with_masks=True)}])
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100) and results[task]["AP50"] == pytest.approx(100), task


def test_toy_set_passes_its_checks(toy):
    root = toy[0]
    for split in [*VOC_TRAIN, "VOC2007/test"]:
        check_voc(root / "VOCdevkit", split, for_evaluation=True)
    for split in ("train2017", "val2017"):
        check_coco(root / "coco", split)


def set_first(xml: Path, tag: str, value: str) -> None:
    """Set the first <tag> of an XML file to `value`."""
    text, n = re.subn(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", xml.read_text(), count=1)
    assert n == 1
    xml.write_text(text)


def test_bad_voc_data_fails_naming_the_file(toy_copy):
    voc = toy_copy / "VOCdevkit"
    xml = voc / "VOC2007/Annotations/000009.xml"  # the first test image
    good = xml.read_text()
    set_first(xml, "xmax", "1")
    with pytest.raises(DatasetError, match=r"VOC2007/Annotations/000009\.xml: object 1 \(\w+\) has xmin \d+ >= xmax 1"):
        check_voc(voc, "VOC2007/test")
    xml.write_text(good)
    set_first(xml, "ymin", "20.5")
    check_voc(voc, "VOC2007/test")  # fractional, as in real VOC2012: the loader reads it, the evaluator not
    with pytest.raises(DatasetError, match=r"000009\.xml: object 1 \(\w+\) has bndbox/ymin '20\.5'; expected an int"):
        check_voc(voc, "VOC2007/test", for_evaluation=True)
    xml.write_text("<annotation><size><width>96</width>")
    with pytest.raises(DatasetError, match=r"000009\.xml: not valid XML"):
        check_voc(voc, "VOC2007/test")

    (voc / "VOC2012/JPEGImages/2012_000005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"VOC2012/JPEGImages/2012_000005\.jpg: not found \(listed in .*trainval"):
        check_voc(voc, "VOC2012/trainval")

    (voc / "VOC2012/ImageSets/Main/trainval.txt").unlink()
    for call in (lambda: check_voc(voc, "VOC2012/trainval"), lambda: voc_classes(voc, VOC_TRAIN)):
        with pytest.raises(DatasetError, match=r"VOC2012/ImageSets/Main/trainval\.txt: split file not found"):
            call()
    (voc / "VOC2012/ImageSets/Main/trainval.txt").write_text("2012_000006\n")
    with pytest.raises(DatasetError, match="trainval.txt: 1 image id"):
        check_voc(voc, "VOC2012/trainval")
    with pytest.raises(DatasetError, match=r"VOC2013: VOC year folder not found"):
        check_voc(voc, "VOC2013/test")


def test_register_refuses_other_metadata_under_the_same_name(toy):
    voc = toy[0] / "VOCdevkit"
    register_voc(voc, ["VOC2007/test"], toy[1]["classes"])
    with pytest.raises(DatasetError, match=r"VOC2007: detectron2 data set voc_2007_test@\w+ is already registered "
                                           r"with another thing_classes"):
        register_voc(voc, ["VOC2007/test"], ["dog", "cat"])


def test_bad_coco_data_fails_naming_the_file(toy_copy):
    coco = toy_copy / "coco"
    path = coco / "annotations/instances_val2017.json"
    image = coco / "val2017/000010.jpg"
    pixels = image.read_bytes()
    image.unlink()
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: image 10: .*val2017/000010\.jpg not found"):
        check_coco(coco, "val2017")
    image.write_bytes(pixels)

    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: annotation 1: polygon 1 has 4 coordinates"):
        check_coco(coco, "val2017")
    data["annotations"][0]["bbox"][2] = 500
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 1 \(image 000009\.jpg\): bbox .* outside the 96x96 image"):
        check_coco(coco, "val2017")

    path.write_text(path.read_text()[:-20])
    for call in (lambda: check_coco(coco, "val2017"), lambda: register_coco(coco, "val2017")):
        with pytest.raises(DatasetError, match=r"instances_val2017\.json: not valid JSON"):
            call()
    with pytest.raises(DatasetError, match=r"instances_test2017\.json: not found"):
        check_coco(coco, "test2017")


def test_stage_rewrites_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stray = tmp_path / "data/toy_det/coco/train2017/old.jpg"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left over from other params")
    p = Params()
    for key, value in (TOY | {"classes": 2, "train_images": 4, "test_images": 2, "size": 32}).items():
        setattr(p.detection.toy, key, value)
    stage.main(p)
    assert not stray.exists()
    assert len(list((tmp_path / "data/toy_det/coco/train2017").iterdir())) == 4
    check_voc(tmp_path / "data/toy_det/VOCdevkit", "VOC2012/trainval")
