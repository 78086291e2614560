"""ResNet backbones, the split-BN that emulates shuffle BN in one process, and checkpoint loading.

A backbone here is a torchvision ResNet whose `fc` is the projection head (during pretraining) or
`nn.Identity` (evaluation), so its state_dict keys are exactly torchvision's: what detection
conversion and external tools expect.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline import checkpoint

FEATURE_DIM = {"resnet18": 512, "resnet50": 2048}


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm over `num_splits` groups of the batch (sample n in group n % num_splits).

    In one process, MoCo's key encoder sees the same BN batch as the query encoder, and BN statistics
    can leak which key is the positive. Splitting the batch into groups and shuffling the keys before
    the key encoder (as MoCo's single-GPU demo does) gives each group its own statistics, which emulates
    the per-GPU BN of the multi-GPU shuffle BN. The parameters and buffers are those of BatchNorm2d, so
    checkpoints load into a plain ResNet.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        S = self.num_splits
        if not self.training or S == 1:
            return super().forward(x)
        mean = self.running_mean.repeat(S)  # [S*C]
        var = self.running_var.repeat(S)  # [S*C]
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = F.batch_norm(
            x.reshape(N // S, S * C, H, W), mean, var, self.weight.repeat(S), self.bias.repeat(S),
            training=True, momentum=self.momentum, eps=self.eps,
        ).view(N, C, H, W)  # [N, C, H, W]; a channels_last x is copied to merge S with C, and its format restored
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(S, C).mean(0))
            self.running_var.copy_(var.view(S, C).mean(0))
            self.num_batches_tracked += 1
        return out


def resnet(arch: str, bn_splits: int = 1) -> nn.Module:
    """A torchvision ResNet with random weights and `fc = nn.Identity()` (features of FEATURE_DIM[arch])."""
    if arch not in FEATURE_DIM:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(FEATURE_DIM)}")
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)
    net.fc = nn.Identity()
    return net


def random_init_backbone(arch: str, seed: int) -> nn.Module:
    """The random-init control of every evaluation (kNN, semi-supervised, detection): resnet(arch) drawn
    from torch's generator seeded with `seed`, so each stage's control is the same network. The caller's
    RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet(arch)


# Where a ResNet's torchvision-named weights sit in the checkpoints people have: MoCo's official one (DDP),
# this pipeline's, a DDP-wrapped plain network, a plain torchvision / timm network. First match wins, so a
# MoCo checkpoint gives its query encoder, never the key encoder.
PREFIXES = ("module.encoder_q.", "encoder_q.", "module.", "")
ACCEPTED = ("this pipeline's checkpoint ({'model': encoder_q.*}), MoCo's ({'state_dict': module.encoder_q.*}), "
            "a torchvision or timm ResNet state_dict (conv1.weight, layer1.0.*), or one wrapped as "
            "{'state_dict': ...} or {'model': ...}")


def _is_tensor_dict(d: object) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def backbone_state_from_checkpoint(ckpt: object, source: str | Path) -> dict[str, torch.Tensor]:
    """The backbone weights (torchvision names, no fc) in any of the formats of ACCEPTED.

    Researchers bring weights from MoCo's releases, torchvision, timm or their own runs; they should not
    have to rename keys by hand. Errors are one line naming `source` and what was found there."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source}: holds a {type(ckpt).__name__}, not a dict of weights; expected {ACCEPTED}")
    containers = [("", ckpt)] if _is_tensor_dict(ckpt) else []
    containers += [(key, ckpt[key]) for key in ("state_dict", "model") if isinstance(ckpt.get(key), dict)]
    for _, state in containers:
        for prefix in PREFIXES:
            if isinstance(state.get(prefix + "conv1.weight"), torch.Tensor):
                out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                return {k: v for k, v in out.items() if not k.startswith("fc.")}  # classifier or MLP head
    found = f"top-level keys {_some(ckpt)}" + "".join(
        f", '{key}' keys {_some(state)}" for key, state in containers if key)
    raise ValueError(f"{source}: no ResNet backbone (no '*conv1.weight' tensor) in it: {found}; expected {ACCEPTED}")


def _some(d: dict, n: int = 5) -> str:
    """The first n keys of d, for an error message."""
    keys = [str(k) for k in d]
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys)} in all" if len(keys) > n else "") + "]"


def _expected_shapes(arch: str) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only, no memory
        return {k: v.shape for k, v in resnet(arch).state_dict().items()}


def load_backbone_state(path: str | Path, arch: str, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone weights of the file at `path`, checked to be exactly a torchvision `arch` (no fc).

    key: the params key that named the file, for the error when it is missing. An architecture mismatch
    names the architecture the file does hold, when it is one of FEATURE_DIM."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key} = '{path}': file not found")
    state = backbone_state_from_checkpoint(checkpoint.load(path), path)
    expected = _expected_shapes(arch)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        held = [a for a in FEATURE_DIM if a != arch and {k: v.shape for k, v in state.items()} == _expected_shapes(a)]
        if held:
            raise ValueError(f"{path} holds a {held[0]} backbone, but model.arch = {arch}")
        raise ValueError(
            f"{path} does not fit {arch}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong_shape)} of other shape "
            f"(e.g. {wrong_shape[:3]}); was it trained with another model.arch?"
        )
    return state


def load_backbone(path: str | Path, arch: str, key: str = "checkpoint") -> nn.Module:
    """A frozen-ready backbone (fc = Identity) from a weights file in any format load_backbone_state reads."""
    net = resnet(arch)
    net.load_state_dict(load_backbone_state(path, arch, key))
    return net
