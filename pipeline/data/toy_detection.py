"""The built-in toy detection set: textured objects on a soft background, written as VOCdevkit and as COCO.

An object is an ellipse, a rotated rectangle or a polygon filled with one texture of the toy
classification set (pipeline/data/toy.py), and its class is that texture: shapes, sizes and colours are
drawn per object, so a detector must recognise the pattern, the thing a backbone pretrained on the toy
textures has learned to see. Objects are large (30-60% of the image side) and never overlap, so a C4
detector can learn them in ~100 CPU iterations at 128 px, and every mask is exactly the drawn region.

One rendering is written in both formats, so VOC and COCO list the same objects:
  root/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{trainval,test}.txt}
  root/VOCdevkit/VOC2012/{JPEGImages,Annotations,ImageSets/Main/trainval.txt}
  root/coco/{train2017,val2017}/*.jpg, root/coco/annotations/instances_{train2017,val2017}.json
The training images are split between VOC2007 and VOC2012 trainval (all of them are COCO train2017); the
test images are VOC2007 test and COCO val2017.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.toy import CLASS_NAMES, render

SHAPES = ("ellipse", "rectangle", "polygon")
MAX_OBJECTS = 3
PLACEMENT_TRIES = 30  # random positions tried per object before the image keeps fewer objects
MIN_SPLIT_IMAGES = 2  # detectron2's VOC loader reads a split file of one id as a 0-d array and fails


def make_toy_detection(root: Path, classes: int, train_images: int, test_images: int, size: int,
                       seed: int) -> dict:
    """Write the VOC and COCO layouts under `root`; the same arguments always give the same bytes.

    Returns {"classes": [...], "splits": {split: {"images": n, "objects": n}}}, with VOC splits named
    "VOC2007/trainval" and COCO splits "train2017"."""
    if not 1 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"toy detection classes = {classes}: must be 1..{len(CLASS_NAMES)} (one per texture)")
    voc07_train = (train_images + 1) // 2
    if train_images - voc07_train < MIN_SPLIT_IMAGES or test_images < MIN_SPLIT_IMAGES:
        raise ValueError(f"toy detection train_images = {train_images}, test_images = {test_images}: need at "
                         f"least 4 and 2, so that every VOC split holds {MIN_SPLIT_IMAGES} or more images")
    if min(train_images, test_images) < classes:  # VOC's evaluator scores a class missing from the test set 0 AP
        raise ValueError(f"toy detection train_images = {train_images}, test_images = {test_images}: need at "
                         f"least classes = {classes} each, so that every class occurs in both")
    patterns = CLASS_NAMES[:classes]
    names = sorted(patterns)  # the class order of both formats: VOC's is alphabetical, as in detectron2
    voc, coco = Path(root) / "VOCdevkit", Path(root) / "coco"
    voc_splits: dict[str, list[str]] = {"VOC2007/trainval": [], "VOC2012/trainval": [], "VOC2007/test": []}
    coco_splits: dict[str, dict] = {s: _coco_skeleton(names) for s in ("train2017", "val2017")}
    counts = {split: {"images": 0, "objects": 0} for split in [*voc_splits, *coco_splits]}

    for split_id, (n_images, coco_split) in enumerate([(train_images, "train2017"), (test_images, "val2017")]):
        for i in range(n_images):
            image_id = i + 1 + split_id * train_images  # unique over both splits, as in COCO
            if split_id == 1:
                voc_split, voc_id = "VOC2007/test", f"{image_id:06d}"
            elif i < voc07_train:
                voc_split, voc_id = "VOC2007/trainval", f"{image_id:06d}"
            else:
                voc_split, voc_id = "VOC2012/trainval", f"2012_{image_id:06d}"
            rng = np.random.default_rng([seed, split_id, i])
            pixels, objects = render_scene(size, patterns, first_class=i % classes, rng=rng)
            jpeg = io.BytesIO()
            Image.fromarray(pixels).save(jpeg, format="JPEG", quality=92)
            file_name = f"{voc_id}.jpg"

            year_dir = voc / voc_split.split("/")[0]
            _write(year_dir / "JPEGImages" / file_name, jpeg.getvalue())
            _write(year_dir / "Annotations" / f"{voc_id}.xml", _voc_xml(year_dir.name, file_name, size, objects))
            voc_splits[voc_split].append(voc_id)
            _write(coco / coco_split / file_name, jpeg.getvalue())
            _add_coco_image(coco_splits[coco_split], image_id, file_name, size, objects, names)
            for split in (voc_split, coco_split):
                counts[split]["images"] += 1
                counts[split]["objects"] += len(objects)

    for split, ids in voc_splits.items():
        year, image_set = split.split("/")
        _write(voc / year / "ImageSets" / "Main" / f"{image_set}.txt", "".join(f"{i}\n" for i in ids).encode())
    for split, data in coco_splits.items():
        _write(coco / "annotations" / f"instances_{split}.json", json.dumps(data).encode())
    return {"classes": names, "splits": counts}


def render_scene(size: int, patterns: list[str], first_class: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One image [size, size, 3] uint8 and its objects, each {"name", "polygon", "mask"}.

    The first object has class `first_class` (the image's index modulo the classes), so every class
    occurs in a split of at least as many images as classes; the others are random. A texture is pasted
    exactly where the polygon's mask (rasterised by pycocotools, as COCO's evaluator does) is set, and
    masks never overlap."""
    pixels = _background(size, rng)
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    for k in range(rng.integers(1, MAX_OBJECTS + 1)):
        cls = first_class if k == 0 else int(rng.integers(len(patterns)))
        for _ in range(PLACEMENT_TRIES):
            polygon = _random_polygon(size, rng)
            mask = _polygon_mask(polygon, size)
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue  # no free place left for this one
        occupied |= mask
        ys, xs = np.nonzero(mask)
        y0, x0, h, w = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        # a texture canvas of at least half the image, so its period (10-20% of the canvas) stays visible
        canvas = max(h, w, size // 2)
        texture = render(patterns[cls], canvas, rng)  # [canvas, canvas, 3]
        top, left = (canvas - h) // 2, (canvas - w) // 2
        window = mask[y0:y0 + h, x0:x0 + w]
        pixels[y0:y0 + h, x0:x0 + w][window] = texture[top:top + h, left:left + w][window]
        objects.append({"name": patterns[cls], "polygon": polygon, "mask": mask})
    return pixels, objects


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A plain colour with a random amount of smooth (4x4 grid, bilinear) variation and faint noise."""
    colour = rng.uniform(40, 215, 3)
    coarse = rng.normal(0, 1, (4, 4, 3)) * rng.uniform(0, 15)  # [4, 4, 3]
    smooth = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((size, size), Image.BILINEAR))
                       for c in coarse.transpose(2, 0, 1)], axis=-1)  # [size, size, 3]
    img = colour + smooth + rng.normal(0, 3, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_polygon(size: int, rng: np.random.Generator) -> list[float]:
    """Vertices [x1, y1, x2, y2, ...] of a random ellipse (32-gon), rotated rectangle or 5-7-gon whose
    sides are 30-60% of the image, placed at random fully inside the image; rounded to 0.01 px."""
    half = rng.uniform(0.15, 0.3, 2) * size  # half width, half height before rotation
    shape = SHAPES[rng.integers(len(SHAPES))]
    if shape == "ellipse":
        angles, radius = np.linspace(0, 2 * np.pi, 32, endpoint=False), np.ones(32)
        rotation = rng.uniform(0, np.pi)
    elif shape == "rectangle":
        angles, radius = np.array([1, 3, 5, 7]) * np.pi / 4, np.full(4, np.sqrt(2))
        rotation = np.deg2rad(rng.uniform(-30, 30))
    else:  # sorted jittered angles: a star-shaped, never self-intersecting polygon
        n = int(rng.integers(5, 8))
        angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
        radius, rotation = rng.uniform(0.75, 1.0, n), rng.uniform(0, np.pi)
    x, y = half[0] * radius * np.cos(angles), half[1] * radius * np.sin(angles)
    c, s = np.cos(rotation), np.sin(rotation)
    x, y = c * x - s * y, s * x + c * y
    scale = min(1.0, (size - 2) / (np.ptp(x) + 1e-9), (size - 2) / (np.ptp(y) + 1e-9))  # fits the image
    x, y = x * scale, y * scale
    x += rng.uniform(1 - x.min(), size - 1 - x.max())
    y += rng.uniform(1 - y.min(), size - 1 - y.max())
    return np.round(np.stack([x, y], axis=1).ravel(), 2).tolist()


def _polygon_mask(polygon: list[float], size: int) -> np.ndarray:
    """[size, size] bool: the pixels pycocotools assigns to the polygon (COCO's own rasterisation)."""
    rle = mask_utils.frPyObjects([polygon], size, size)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the first and one past the last column and row of the mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _voc_xml(folder: str, file_name: str, size: int, objects: list[dict]) -> bytes:
    """A VOC annotation with every field detectron2's loader and its evaluator (parse_rec) read.

    VOC boxes are 1-based inclusive pixel indices: pixels x0..x1-1 are xmin = x0 + 1, xmax = x1, which
    detectron2 loads back as the box [x0, x1) that COCO's [x, y, w, h] also describes."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = file_name
    ET.SubElement(ET.SubElement(ann, "source"), "database").text = "toy detection"
    size_el = ET.SubElement(ann, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for obj in objects:
        x0, y0, x1, y1 = _tight_box(obj["mask"])
        el = ET.SubElement(ann, "object")
        for tag, value in (("name", obj["name"]), ("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
            ET.SubElement(el, tag).text = value
        box = ET.SubElement(el, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def _coco_skeleton(names: list[str]) -> dict:
    """An instances JSON without images; category ids 1..C follow `names`, so both formats share one order."""
    categories = [{"id": i + 1, "name": name, "supercategory": "texture"} for i, name in enumerate(names)]
    return {"info": {"description": "toy detection (pipeline/data/toy_detection.py)"}, "licenses": [],
            "images": [], "annotations": [], "categories": categories}


def _add_coco_image(data: dict, image_id: int, file_name: str, size: int, objects: list[dict],
                    names: list[str]) -> None:
    data["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    for obj in objects:
        x0, y0, x1, y1 = _tight_box(obj["mask"])
        data["annotations"].append({
            "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": names.index(obj["name"]) + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(obj["mask"].sum()), "iscrowd": 0,
            "segmentation": [obj["polygon"]],
        })


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
