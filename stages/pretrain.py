"""DVC stage pretrain: MoCo v2 on data/ffcv/train.beton -> models/pretrain/checkpoint.pt, metrics/pretrain.json.

Runs here or as a (multi-GPU, multi-node) SLURM job, per launch.executor; blocks until it ends."""

import sys
from pathlib import Path

from pipeline import launch
from pipeline.cli import run_stage, stage_identity, write_metrics
from pipeline.config import Params, tau_plus_warning
from pipeline.train.pretrain import pretrain, run_identity


def main(p: Params) -> None:
    here = Path.cwd()
    classes = here / "data/ffcv/classes.txt"  # label i = line i, written by ffcv_convert
    class_names = classes.read_text().splitlines() if classes.is_file() else None
    warning = tau_plus_warning(p.pretrain, len(class_names), "data/ffcv/classes.txt") if class_names else None
    if warning:
        print(f"pretrain: warning: {warning}", file=sys.stderr, flush=True)
    identity = stage_identity("pretrain", p, run_identity(p))
    metrics, job = launch.run(
        p, "pretrain", pretrain, p, here / "data/ffcv/train.beton", here / "data/ffcv/val.beton",
        here / "models/pretrain/checkpoint.pt", here / "checkpoints/pretrain/last.pt", here / "dvclive/pretrain",
        here / "analysis/pretrain", class_names, identity, identity=identity,
    )
    write_metrics("metrics/pretrain.json", metrics, p, p.pretrain.seed, job)


if __name__ == "__main__":
    run_stage("pretrain", main)
