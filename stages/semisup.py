"""DVC stage semisup: fine-tune the pretrained backbone (and the random-init control) with a labelled fraction of
the train set -> metrics/semisup.json (val top-1/top-5, mean and std over trials, per fraction).

Runs here or as a one-task SLURM job, per launch.executor; resumes at the first (fraction, trial) not done."""

import json
from pathlib import Path

import torch

from pipeline import launch
from pipeline.cli import run_stage, stage_identity, write_metrics
from pipeline.config import Params
from pipeline.data.manifest import manifest_path, read_manifest
from pipeline.data.subsets import balanced_subset, read_simclr_list, simclr_list_path, subset_from_names
from pipeline.models.backbone import load_backbone, random_init_backbone
from pipeline.train.semisup import RunLog, semisup

TRAIN, VAL = Path("data/ffcv/train.beton"), Path("data/ffcv/val.beton")
CHECKPOINT = Path("models/pretrain/checkpoint.pt")
LOG = Path("checkpoints/semisup/runs.json")


def subsets(p: Params) -> dict[tuple[float, int], torch.Tensor]:
    """Sample indices of every (fraction, trial)'s labelled subset, all checked before any training."""
    sp = p.semisup
    paths, labels = read_manifest(manifest_path(TRAIN))
    out = {}
    for f in sp.fractions:
        if sp.subset == "simclr":  # one published list per fraction: the trials differ in init and order only
            source = simclr_list_path(sp.simclr_dir, f)
            indices = subset_from_names(read_simclr_list(source, f), paths, source)
            out |= {(f, t): indices for t in range(sp.trials)}
        else:
            out |= {(f, t): balanced_subset(torch.tensor(labels), f, sp.seed + t) for t in range(sp.trials)}
    return out


def evaluate(p: Params, identity: str) -> dict:
    _, _, device = launch.init_distributed()
    chosen = subsets(p)
    arch = p.model.arch
    backbones = {"pretrained": lambda: load_backbone(CHECKPOINT, arch)}
    if p.semisup.control:
        backbones["random_init"] = lambda: random_init_backbone(arch, p.pretrain.seed)  # the kNN control's network
    num_classes = json.loads(Path("metrics/ffcv.json").read_text())["train"]["classes"]
    summary = semisup(backbones, arch, TRAIN, VAL, chosen, num_classes, p.semisup, p.data.num_workers, device,
                      RunLog(LOG, identity))
    return {"fractions": summary, "subset": p.semisup.subset, "device": device.type}


def main(p: Params) -> None:
    if not CHECKPOINT.is_file():
        raise FileNotFoundError(f"{CHECKPOINT}: no pretrained checkpoint (run the pretrain stage first)")
    identity = stage_identity("semisup", p, {"semisup": p.to_dict()["semisup"], "arch": p.model.arch,
                                             "control_seed": p.pretrain.seed})
    subsets(p)  # bad lists or fractions fail here, before a SLURM job is submitted
    metrics, job = launch.run(p, "semisup", evaluate, p, identity, identity=identity, single_task=True)
    for key, m in metrics["fractions"].items():
        control = (f"  random init {m['random_init_top1']:.2f} ± {m['random_init_top1_std']:.2f}  "
                   f"gain {m['gain']:+.2f} ± {m['gain_std']:.2f}") if "gain" in m else ""
        print(f"semisup {key}: top-1 {m['top1']:.2f} ± {m['top1_std']:.2f}  top-5 {m['top5']:.2f}{control}")
    write_metrics("metrics/semisup.json", metrics, p, p.semisup.seed, job)


if __name__ == "__main__":
    run_stage("semisup", main)
