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


def backbone_state_from_checkpoint(ckpt: dict, source: str | Path) -> dict:
    """The query encoder's backbone weights (torchvision names, no fc) from this project's checkpoint
    (`{"model": MoCo state_dict, ...}`) or from an official MoCo one (`{"state_dict": {"module.encoder_q.*"}}`);
    errors name `source`, the file it came from."""
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        state, prefix = ckpt["model"], "encoder_q."
    elif "state_dict" in ckpt:
        state, prefix = ckpt["state_dict"], "module.encoder_q."
    else:
        raise ValueError(f"{source}: not a MoCo checkpoint: top-level keys {sorted(ckpt)[:8]}")
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in out.items() if not k.startswith("fc.")}
    if not out:
        raise ValueError(f"{source}: no '{prefix}*' backbone keys in the checkpoint")
    return out


def load_backbone(path: str | Path, arch: str) -> nn.Module:
    """A frozen-ready backbone from a checkpoint file; refuses one of another architecture, naming keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = backbone_state_from_checkpoint(checkpoint.load(path), path)
    net = resnet(arch)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not fit {arch}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong_shape)} of other shape "
            f"(e.g. {wrong_shape[:3]}); was it trained with another model.arch?"
        )
    net.load_state_dict(state)
    return net
