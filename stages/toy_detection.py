"""DVC stage toy_detection: the built-in toy detection set at data/toy_det, as VOCdevkit and as COCO."""

import shutil
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.data.toy_detection import make_toy_detection

OUT = Path("data/toy_det")


def main(p: Params) -> None:
    shutil.rmtree(OUT, ignore_errors=True)  # the folder is exactly a function of the params
    t = p.detection.toy
    info = make_toy_detection(OUT, t.classes, t.train_images, t.test_images, t.size, t.seed)
    splits = ", ".join(f"{split} {n['images']} images / {n['objects']} objects" for split, n in info["splits"].items())
    print(f"toy_detection: {splits}; classes: {', '.join(info['classes'])}")


if __name__ == "__main__":
    run_stage("toy_detection", main)
