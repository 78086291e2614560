"""DVC stage knn: weighted kNN top-1 of the pretrained backbone and of a random-init control -> metrics/knn.json.

Runs here or as a one-task SLURM job, per launch.executor."""

from pathlib import Path

from pipeline import launch
from pipeline.cli import read_json, run_stage, stage_identity, write_metrics
from pipeline.config import Params
from pipeline.models.backbone import load_backbone, random_init_backbone
from pipeline.train.evaluate import knn_top1


def evaluate(p: Params) -> dict:
    pretrained = load_backbone(Path(p.knn.checkpoint), p.model.arch, "knn.checkpoint")
    control = random_init_backbone(p.model.arch, p.pretrain.seed)  # same architecture, evaluated identically
    num_classes = read_json("metrics/ffcv.json", "train", "classes")
    betons = Path("data/ffcv/train.beton"), Path("data/ffcv/val.beton")
    kn = p.knn
    device = launch.local_device()
    top1 = {name: knn_top1(net, *betons, kn.res, kn.batch_size, p.data.num_workers, kn.k, kn.temperature, num_classes,
                           device) for name, net in (("pretrained", pretrained), ("random_init", control))}
    return {"top1": top1["pretrained"], "random_init_top1": top1["random_init"],
            "gain": top1["pretrained"] - top1["random_init"], "k": kn.k, "temperature": kn.temperature,
            "checkpoint": kn.checkpoint}


def main(p: Params) -> None:
    n_train = read_json("metrics/ffcv.json", "train", "images")
    if p.knn.k > n_train:  # the kNN would quietly use every training image
        print(f"knn: warning: knn.k = {p.knn.k} is more than the {n_train} training images; every image votes "
              f"(k = {n_train})", flush=True)
    identity = stage_identity("knn", p, p.to_dict())
    metrics, job = launch.run(p, "knn", evaluate, p, identity=identity, single_task=True)
    print(f"knn: top-1 {metrics['top1']:.2f} (random init {metrics['random_init_top1']:.2f})")
    write_metrics("metrics/knn.json", metrics, p, p.pretrain.seed, job)


if __name__ == "__main__":
    run_stage("knn", main)
