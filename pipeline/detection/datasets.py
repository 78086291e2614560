"""VOC and COCO data sets on disk: checked before training, then registered through detectron2's own code.

A check reads every annotation once and fails with a message naming the file and the problem, before
detectron2 would fail with a bare assertion or KeyError hours into a job, or silently drop objects.
Registered names carry a hash of the data set's absolute path ("voc_2007_trainval@3f2a9c01d4"), so a real
and a toy data set never clash and registering again in the same process is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

BOX_TOLERANCE = 1.0  # px a COCO box may stick out of its image (float rounding in real annotations)


class DatasetError(ValueError):
    """An annotation or image file no detector can train or be evaluated on; the message names the file."""


def voc_classes(root: Path, splits: list[str]) -> list[str]:
    """Sorted object names over the XMLs of `splits` (for VOC07+12 trainval: detectron2's 20 CLASS_NAMES)."""
    names = set()
    for split in splits:
        year_dir, _, ids = _read_split(Path(root), split)
        for image_id in ids:
            path = year_dir / "Annotations" / f"{image_id}.xml"
            names.update(obj.findtext("name") or "" for obj in _parse_xml(path).iterfind("object"))
    names.discard("")
    if not names:
        raise DatasetError(f"{root}: no objects in the annotations of {', '.join(splits)}")
    return sorted(names)


def check_voc(root: Path, split: str, *, for_evaluation: bool = False) -> None:
    """Check a "VOC2007/trainval"-style split of the VOCdevkit `root` for what detectron2's loader reads.

    Every listed id needs its JPEG and a parsable XML with size/width, size/height and objects that have a
    name and a box 1 <= xmin < xmax <= width, 1 <= ymin < ymax <= height. With `for_evaluation`, also
    what PascalVOCDetectionEvaluator's parse_rec reads: pose, truncated, difficult and integer coordinates
    (real VOC2012 trainval has a few fractional ones, which only training tolerates)."""
    year_dir, split_file, ids = _read_split(Path(root), split)
    jpegs = _listing(year_dir / "JPEGImages")
    xmls = _listing(year_dir / "Annotations")
    for image_id in ids:
        for folder, suffix, present in (("JPEGImages", ".jpg", jpegs), ("Annotations", ".xml", xmls)):
            if image_id + suffix not in present:
                raise DatasetError(f"{year_dir / folder / (image_id + suffix)}: not found (listed in {split_file})")
        _check_voc_xml(year_dir / "Annotations" / f"{image_id}.xml", for_evaluation)


def register_voc(root: Path, splits: list[str], classes: list[str]) -> list[str]:
    """Register each "VOC2007/trainval"-style split with detectron2.data.datasets.register_pascal_voc.

    The year comes from the folder name; it matters: the evaluator scores 2007 with VOC07's 11-point AP
    and other years with the area under the precision-recall curve. Returns the registered names."""
    root = Path(root).resolve()
    names = []
    for split in splits:
        folder, image_set = _split_parts(root, split)
        match = re.fullmatch(r"VOC(\d{4})", folder)
        if not match:
            raise DatasetError(f"{root / folder}: a VOC year folder must be named VOC<year>, e.g. VOC2007")
        year, dirname = int(match.group(1)), str(root / folder)
        name = f"voc_{year}_{image_set}@{_path_hash(root)}"
        metadata = {"thing_classes": list(classes), "dirname": dirname, "year": year, "split": image_set}
        if _needs_registering(name, metadata):
            register_pascal_voc(name, dirname, image_set, year, list(classes))
        names.append(name)
    return names


def check_coco(root: Path, split: str) -> None:
    """Check root/annotations/instances_<split>.json and root/<split>/ for what detectron2 and COCOeval read.

    Ids unique, every image file present, every annotation's image and category known, its box [x, y, w, h]
    inside the image and every polygon of 3 or more points. Zero-size boxes pass: real train2017 has two
    with height 0, which detectron2 drops when it builds a batch."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    data = _load_coco(path)
    image_dir = root / split
    files = _listing(image_dir)
    try:
        categories = _unique_ids(path, "category", data["categories"])
        images = _unique_ids(path, "image", data["images"])
        for image in images.values():
            if image["file_name"] not in files and not (image_dir / image["file_name"]).is_file():
                raise DatasetError(f"{path}: image {image['id']}: {image_dir / image['file_name']} not found")
        for ann in _unique_ids(path, "annotation", data["annotations"]).values():
            where = f"{path}: annotation {ann['id']}"
            image = images.get(ann["image_id"])
            if image is None:
                raise DatasetError(f"{where} refers to image {ann['image_id']}, which is not in 'images'")
            if ann["category_id"] not in categories:
                raise DatasetError(f"{where} refers to category {ann['category_id']}, which is not in 'categories'")
            _check_coco_box(f"{where} (image {image['file_name']})", ann["bbox"], image["width"], image["height"])
            polygons = ann.get("segmentation")
            for n, polygon in enumerate(polygons if isinstance(polygons, list) else [], 1):  # else RLE
                if len(polygon) < 6 or len(polygon) % 2:
                    raise DatasetError(f"{where}: polygon {n} has {len(polygon)} coordinates; a polygon needs an "
                                       "even number, at least 6 (3 points)")
    except (KeyError, TypeError) as e:  # a missing key or a value of the wrong kind
        raise DatasetError(f"{path}: not a COCO instances file: {type(e).__name__} {e}") from None


def register_coco(root: Path, split: str) -> str:
    """Register root/annotations/instances_<split>.json with detectron2's register_coco_instances.

    The classes and the JSON-id -> contiguous-id map are set now, from the file's categories: detectron2
    sets them only when the data set is first loaded, and a COCOEvaluator built before that would score
    predictions under the wrong category ids without a warning. Returns the registered name."""
    root = Path(root).resolve()
    json_file, image_root = root / "annotations" / f"instances_{split}.json", root / split
    try:
        categories = sorted(_load_coco(json_file)["categories"], key=lambda c: c["id"])
        classes = [c["name"] for c in categories]
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{json_file}: not a COCO instances file: {type(e).__name__} {e}") from None
    name = f"coco_{split}@{_path_hash(root)}"
    extra = {"thing_classes": classes,
             "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)}}
    metadata = {"json_file": str(json_file), "image_root": str(image_root), "evaluator_type": "coco", **extra}
    if _needs_registering(name, metadata):
        register_coco_instances(name, extra, str(json_file), str(image_root))
    return name


def _path_hash(root: Path) -> str:
    return hashlib.sha1(str(root).encode()).hexdigest()[:10]


def _needs_registering(name: str, metadata: dict) -> bool:
    """False if `name` is registered with `metadata` already; a registration with other metadata is an
    error, since detectron2 cannot change it."""
    if name not in DatasetCatalog:
        return True
    known = MetadataCatalog.get(name)
    changed = sorted(key for key, value in metadata.items() if known.get(key) != value)
    if changed:
        raise DatasetError(f"{metadata.get('dirname') or metadata.get('json_file')}: detectron2 data set {name} is "
                           f"already registered with another {', '.join(changed)}")
    return False


def _split_parts(root: Path, split: str) -> tuple[str, str]:
    parts = split.split("/")
    if len(parts) != 2 or not all(parts):
        raise DatasetError(f"{root}: VOC split {split!r} must be <year folder>/<image set>, e.g. VOC2007/trainval")
    return parts[0], parts[1]


def _read_split(root: Path, split: str) -> tuple[Path, Path, list[str]]:
    """(year folder, split file, image ids) of a split, checked the way detectron2 will read the file."""
    folder, image_set = _split_parts(root, split)
    year_dir = root / folder
    if not year_dir.is_dir():
        raise DatasetError(f"{year_dir}: VOC year folder not found (split {split})")
    path = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found")
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) != 1:  # the loader reads a table, the evaluator lines: they agree on one id a line only
            raise DatasetError(f"{path}: line {n} is {line!r}; expected one image id a line")
        ids.append(fields[0])
    if len(ids) < 2:  # np.loadtxt reads one id as a 0-d array, which detectron2's loader cannot iterate
        raise DatasetError(f"{path}: {len(ids)} image id(s); detectron2's VOC loader needs at least 2")
    return year_dir, path, ids


def _listing(folder: Path) -> set[str]:
    """File names in `folder`, read once: one directory listing is much faster than 16k existence checks."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        raise DatasetError(f"{folder}: folder not found") from None


def _parse_xml(path: Path) -> ET.ElementTree:
    try:
        return ET.parse(path)
    except ET.ParseError as e:
        raise DatasetError(f"{path}: not valid XML: {e}") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found") from None


def _check_voc_xml(path: Path, for_evaluation: bool) -> None:
    tree = _parse_xml(path)
    size = {}
    for tag in ("width", "height"):
        text = tree.findtext(f"size/{tag}")
        if text is None or not text.strip().isdigit() or int(text) < 1:
            raise DatasetError(f"{path}: size/{tag} is {text!r}; expected a positive integer")
        size[tag] = int(text)
    for n, obj in enumerate(tree.iterfind("object"), 1):
        name = obj.findtext("name")
        if not name or name != name.strip():  # the loader looks the name up in the classes as it is
            raise DatasetError(f"{path}: object {n} has name {name!r}; expected a word without surrounding space")
        where = f"{path}: object {n} ({name})"
        if for_evaluation:
            if obj.find("pose") is None:
                raise DatasetError(f"{where} has no <pose>, which detectron2's VOC evaluator reads")
            for tag in ("truncated", "difficult"):
                try:
                    int(obj.findtext(tag))
                except (TypeError, ValueError):
                    raise DatasetError(f"{where} has <{tag}> {obj.findtext(tag)!r}; detectron2's VOC evaluator "
                                       "reads an integer") from None
        box = {}
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = obj.findtext(f"bndbox/{tag}")
            try:
                box[tag] = int(text) if for_evaluation else float(text)
            except (TypeError, ValueError):
                kind = "an integer (the evaluator's parse_rec reads int)" if for_evaluation else "a number"
                raise DatasetError(f"{where} has bndbox/{tag} {text!r}; expected {kind}") from None
        for lo, hi, extent in (("xmin", "xmax", "width"), ("ymin", "ymax", "height")):
            if box[lo] < 1:
                raise DatasetError(f"{where} has {lo} {box[lo]:g} < 1 (VOC pixel indices start at 1)")
            if box[lo] >= box[hi]:
                raise DatasetError(f"{where} has {lo} {box[lo]:g} >= {hi} {box[hi]:g}")
            if box[hi] > size[extent]:
                raise DatasetError(f"{where} has {hi} {box[hi]:g} > image {extent} {size[extent]}")


def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: not found")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file: no {', '.join(repr(k) for k in missing)}")
    return data


def _unique_ids(path: Path, kind: str, entries: list[dict]) -> dict[int, dict]:
    """{id: entry}; detectron2 asserts unique annotation ids, and a repeated image or category id would
    silently merge two entries."""
    by_id = {}
    for entry in entries:
        if entry["id"] in by_id:
            raise DatasetError(f"{path}: {kind} id {entry['id']} occurs twice")
        by_id[entry["id"]] = entry
    return by_id


def _check_coco_box(where: str, bbox: list[float], width: int, height: int) -> None:
    if len(bbox) != 4:
        raise DatasetError(f"{where}: bbox {bbox} is not [x, y, w, h]")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise DatasetError(f"{where}: bbox {bbox} has a negative width or height")
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise DatasetError(f"{where}: bbox {bbox} lies outside the {width}x{height} image")
