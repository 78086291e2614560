"""DVC stage lineval: linear classifier on the frozen pretrained backbone -> metrics/lineval.json.

Runs here or as a one-task SLURM job, per launch.executor."""

from pathlib import Path

from pipeline import launch
from pipeline.cli import read_json, run_stage, stage_identity, write_metrics
from pipeline.config import Params
from pipeline.models.backbone import load_backbone
from pipeline.train.evaluate import linear_eval


def evaluate(p: Params) -> dict:
    ckpt = Path(p.lineval.checkpoint)
    backbone = load_backbone(ckpt, p.model.arch, "lineval.checkpoint")
    num_classes = read_json("metrics/ffcv.json", "train", "classes")
    metrics = linear_eval(backbone, p.model.arch, Path("data/ffcv/train.beton"), Path("data/ffcv/val.beton"),
                          num_classes, p.lineval, p.data.num_workers, Path("dvclive/lineval"), launch.local_device())
    return metrics | {"checkpoint": str(ckpt)}


def main(p: Params) -> None:
    identity = stage_identity("lineval", p, p.to_dict())
    metrics, job = launch.run(p, "lineval", evaluate, p, identity=identity, single_task=True)
    print(f"lineval: top-1 {metrics['top1']:.2f} (last epoch), {metrics['top1_best']:.2f} (best, epoch "
          f"{metrics['best_epoch']})  top-5 {metrics['top5']:.2f}")
    write_metrics("metrics/lineval.json", metrics, p, p.lineval.seed, job)


if __name__ == "__main__":
    run_stage("lineval", main)
