"""DVC stage pretrain: MoCo v2 on data/ffcv/train.beton -> models/pretrain/checkpoint.pt, metrics/pretrain.json."""

from pathlib import Path

from pipeline.cli import run_stage, write_json
from pipeline.config import Params
from pipeline.train.pretrain import pretrain


def main(p: Params) -> None:
    metrics = pretrain(p, Path("data/ffcv/train.beton"), Path("data/ffcv/val.beton"),
                       out_path=Path("models/pretrain/checkpoint.pt"), state_path=Path("checkpoints/pretrain/last.pt"),
                       live_dir=Path("dvclive/pretrain"), analysis_dir=Path("analysis/pretrain"))
    write_json("metrics/pretrain.json", metrics)


if __name__ == "__main__":
    run_stage("pretrain", main)
