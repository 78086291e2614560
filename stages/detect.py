"""DVC stages detect_voc and detect_coco (`python -m stages.detect voc|coco`): fine-tune the converted
backbone -> metrics/<task>.json.

voc: Faster R-CNN C4, VOC07+12 trainval -> VOC07 test, box AP/AP50/AP75. coco: Mask R-CNN C4 (1x or 2x
schedule shape), box and mask AP/AP50/AP75. Each is the mean and std over detection.<task>.trials runs.
Runs here or as a (multi-GPU) SLURM job, per launch.executor; an interrupted or preempted run resumes
from detectron2's last checkpoint in models/detection/<task>/trial<i>."""

import sys
from functools import partial
from pathlib import Path

from pipeline import launch
from pipeline.cli import run_stage, stage_identity, write_metrics
from pipeline.config import Params
from pipeline.detection.train import finetune

TASKS = ("voc", "coco")


def main(p: Params, task: str) -> None:
    here = Path.cwd()
    weights = here / "models/detection/backbone.pkl"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: run the convert stage first")
    identity = stage_identity(f"detect_{task}", p, p.to_dict() | {"task": task})
    metrics, job = launch.run(p, f"detect_{task}", finetune, p, task, weights, here / "models/detection" / task,
                              identity, identity=identity)
    summary = "  ".join(f"{kind} AP {m['AP']:.2f} AP50 {m['AP50']:.2f} AP75 {m['AP75']:.2f}"
                        for kind, m in metrics.items() if kind in ("bbox", "segm"))
    print(f"detect_{task}: {summary}")
    write_metrics(f"metrics/{task}.json", metrics, p, getattr(p.detection, task).seed, job)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python -m stages.detect {{{'|'.join(TASKS)}}}")
    run_stage(f"detect_{sys.argv[1]}", partial(main, task=sys.argv[1]))
