"""DVC stage ffcv_convert: ImageFolder train/val -> data/ffcv/{train,val}.beton, classes.txt (label i = line i),
{train,val}_manifest.tsv (sample index -> source image, skipped images left out) + metrics/ffcv.json."""

from pathlib import Path

from pipeline.cli import run_stage, write_metrics
from pipeline.config import Params, require_dir
from pipeline.data.ffcv_io import class_folders, write_beton
from pipeline.data.manifest import manifest_path, write_manifest

OUT = Path("data/ffcv")


def main(p: Params) -> None:
    d = p.data
    dirs = {"train": require_dir("data.train_dir", d.train_dir), "val": require_dir("data.val_dir", d.val_dir)}
    train, val = class_folders(dirs["train"]), class_folders(dirs["val"])  # a listing: fails before converting
    if train != val:  # a label is the index of its class folder name: both splits need the same folders
        missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(f"{dirs['val']}: class folders differ from {dirs['train']}: missing {missing}, extra {extra}")
    summary = {}
    for split, src in dirs.items():
        info = write_beton(src, OUT / f"{split}.beton", d.max_resolution, d.jpeg_quality, d.on_corrupt, d.num_workers)
        write_manifest(manifest_path(OUT / f"{split}.beton"), info["samples"])
        for path in info["skipped"]:
            print(f"ffcv_convert: skipped unreadable image {path}")
        summary[split] = {"images": info["images"], "classes": len(info["classes"]), "skipped": len(info["skipped"])}
        print(f"ffcv_convert: {split}: {info['images']} images, {len(info['classes'])} classes, "
              f"{len(info['skipped'])} skipped")
    (OUT / "classes.txt").write_text("".join(f"{name}\n" for name in train))
    write_metrics("metrics/ffcv.json", summary, p, seed=None)


if __name__ == "__main__":
    run_stage("ffcv_convert", main)
