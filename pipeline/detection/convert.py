"""Pretrained ResNet (torchvision names) -> detectron2 pickle, as MoCo's convert-pretrain-to-detectron2.

Keys are renamed to detectron2's ResNet (stem, res2..res5, convK.norm, shortcut[.norm]) and left without
the model prefix: detectron2's checkpointer, told to use matching heuristics, puts `res5.*` into the C4
ROI head (`roi_heads.res5.*`) and the rest into `backbone.*` by suffix matching.
"""

import pickle
import re
from pathlib import Path

import torch
import torchvision
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from pipeline.checkpoint import atomic_write
from pipeline.compat import detectron2 as d2

MOCO_PREFIX = "module.encoder_q."  # query encoder in an official MoCo checkpoint (DDP-wrapped)
D2_META = {"__author__": "MOCO", "matching_heuristics": True}  # match names by suffix when loading


def _d2_name(k: str) -> str:
    """torchvision key -> detectron2 key, e.g. layer1.0.bn2.weight -> res2.0.conv2.norm.weight."""
    if not k.startswith("layer"):
        k = "stem." + k  # conv1, bn1
    k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
    k = re.sub(r"\bbn(\d)\b", r"conv\1.norm", k)
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def convert_moco_to_d2(state_dict: dict, arch: str) -> dict[str, torch.Tensor]:
    """Backbone weights of a torchvision `arch` ResNet -> detectron2 ResNet names (fc dropped).

    Takes a torchvision state_dict, or an official MoCo checkpoint ({"state_dict": {module.encoder_q.*}}),
    whose query encoder is kept. Raises ValueError when the weights are not those of `arch`.
    """
    sd = state_dict.get("state_dict", state_dict)
    if any(k.startswith(MOCO_PREFIX) for k in sd):
        sd = {k.removeprefix(MOCO_PREFIX): v for k, v in sd.items() if k.startswith(MOCO_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # classifier or MoCo's MLP head

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: v.shape for k, v in torchvision.models.get_model(arch).state_dict().items()
                    if not k.startswith("fc.")}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & sd.keys() if sd[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        raise ValueError(f"weights are not a torchvision {arch} backbone: "
                         + _describe(missing=missing, unexpected=unexpected, wrong_shape=wrong_shape))
    return {_d2_name(k): v.detach().cpu() for k, v in sd.items()}


def save_d2_weights(d2_weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write the pickle detectron2 loads with matching heuristics (numpy arrays, as MoCo's script)."""
    path = Path(path)
    if path.suffix != ".pkl":
        raise ValueError(f"{path}: detectron2 reads a pickle only from a .pkl file")
    obj = {"model": {k: v.numpy() for k, v in d2_weights.items()}, **D2_META}
    atomic_write(path, lambda f: pickle.dump(obj, f))


def verify_conversion(d2_weights: dict[str, torch.Tensor], cfg: CfgNode) -> None:
    """Load the weights into the detector of `cfg` the way training will, through detectron2's
    checkpointer, and raise ValueError unless every backbone and res5 tensor was filled by exactly one
    converted tensor of the right shape (the head's extra norm is new and not counted)."""
    model = build_model(cfg)
    report = d2.load_report(model, {"model": dict(d2_weights), **D2_META})
    pretrained = [k for k in model.state_dict() if k.startswith(("backbone.", "roi_heads.res5."))
                  and not k.startswith("roi_heads.res5.norm.")]
    missing = sorted(set(pretrained) & set(report.missing_keys))
    wrong_shape = sorted(k for k, *_ in report.incorrect_shapes)
    unexpected = sorted(report.unexpected_keys)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"converted weights do not fit the {cfg.MODEL.RESNETS.DEPTH}-layer C4 model: "
                         + _describe(missing=missing, unexpected=unexpected, wrong_shape=wrong_shape))


def _describe(**keys: list[str]) -> str:
    """'missing (3): a, b, c; unexpected (12): d, e, ...' for the non-empty lists of keys."""
    parts = []
    for what, names in keys.items():
        if names:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            parts.append(f"{what.replace('_', ' ')} ({len(names)}): {shown}")
    return "; ".join(parts)
