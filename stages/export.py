"""DVC stage export: the pretrained query encoder as a plain torchvision state_dict
(models/pretrain/backbone_torchvision.pt), for use outside this pipeline.

The checkpoint holds both encoders, the queue and the optimizer under MoCo's names; other code wants
`torchvision.models.<arch>()` weights. The file has every key of that network but `fc` (the pretraining
head is not a classifier), and loads with `torch.load(path, weights_only=True)`."""

from pathlib import Path

from pipeline.checkpoint import save_atomic
from pipeline.cli import run_stage
from pipeline.config import PRETRAINED, Params
from pipeline.models.backbone import load_backbone_state

OUT = Path("models/pretrain/backbone_torchvision.pt")


def main(p: Params) -> None:
    state = load_backbone_state(PRETRAINED, p.model.arch, "the pretrain stage's output")
    save_atomic({k: v.clone() for k, v in state.items()}, OUT)  # clone: not views into the whole checkpoint
    print(f"export: {len(state)} tensors of {p.model.arch} from {PRETRAINED} -> {OUT} (torchvision names, no fc)")


if __name__ == "__main__":
    run_stage("export", main)
