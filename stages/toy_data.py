"""DVC stage toy_data: the built-in toy ImageFolder (train/val JPEGs) at data/toy."""

import shutil
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.data.toy import make_toy_imagefolder

OUT = Path("data/toy")


def main(p: Params) -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    t = p.toy
    info = make_toy_imagefolder(OUT, t.classes, t.train_per_class, t.val_per_class, t.size, t.seed)
    print(f"toy_data: {info['train']} train / {info['val']} val images, classes: {', '.join(info['classes'])}")


if __name__ == "__main__":
    run_stage("toy_data", main)
