"""DVC stage convert: the pretrained backbone -> detectron2 weights (models/detection/backbone.pkl).

The source is detection.checkpoint (this pipeline's pretraining checkpoint by default; or an official MoCo,
torchvision or timm ResNet file), or, for the control run (detection.init: random), the same architecture
randomly initialised. The weights are loaded into the C4 detector before they are written: a backbone
tensor left unmatched fails the stage, naming the keys."""

from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.detection.c4 import build_c4_cfg
from pipeline.detection.convert import convert_moco_to_d2, save_d2_weights, verify_conversion
from pipeline.models.backbone import load_backbone_state, random_init_backbone

OUT = Path("models/detection/backbone.pkl")


def main(p: Params) -> None:
    d = p.detection
    if d.init == "random":
        state = random_init_backbone(p.model.arch, p.pretrain.seed).state_dict()  # the kNN control's network
        source = f"random-init {p.model.arch}"
    else:
        state, source = load_backbone_state(d.checkpoint, p.model.arch, "detection.checkpoint"), d.checkpoint
    weights = convert_moco_to_d2(state, p.model.arch)
    verify_conversion(weights, build_c4_cfg(p.model.arch, "voc", num_classes=1, device="cpu"))
    save_d2_weights(weights, OUT)
    print(f"convert: {len(weights)} tensors of {source} -> {OUT} (every backbone and res5 tensor matched)")


if __name__ == "__main__":
    run_stage("convert", main)
