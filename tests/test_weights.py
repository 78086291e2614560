"""Weights in and out: every checkpoint format a researcher brings loads as the same backbone, anything else
is refused in one line naming the file, the export stage writes plain torchvision weights, and an external
checkpoint is a DVC dependency of the stages that read it."""

import json
import pickle
import re

import pytest
import torch
import torchvision
from torch import nn

from pipeline import checkpoint
from pipeline.config import PRETRAINED, Params
from pipeline.models.backbone import load_backbone, load_backbone_state
from pipeline.models.moco import MoCo
from stages import convert, export
from tests.conftest import run


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """A torchvision resnet18 with random weights and non-trivial BN statistics, classifier included."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1000)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def _backbone(net: nn.Module) -> dict:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _pipeline_checkpoint(ref: nn.Module) -> dict:
    moco = MoCo("resnet18", dim=16, K=32, m=0.99)  # this pipeline's model, so its real key names
    moco.encoder_q.load_state_dict(_backbone(ref), strict=False)
    return {"model": moco.state_dict(), "epoch": 2, "arch": "resnet18"}


def _official_moco(ref: nn.Module) -> dict:
    """main_moco.py's checkpoint: DDP-wrapped MoCo with an MLP head, key encoder different from the query one."""
    sd = _backbone(ref)
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    state |= {f"module.encoder_k.{k}": v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    state |= {"module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight":
              torch.zeros(128, 512), "module.queue": torch.zeros(128, 64), "module.queue_ptr": torch.zeros(1)}
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def _timm_style(ref: nn.Module) -> dict:
    """What timm's train script saves for a resnet18: torchvision's key names, its own classifier (here 11
    classes), wrapped with the epoch and arch."""
    sd = _backbone(ref) | {"fc.weight": torch.zeros(11, 512), "fc.bias": torch.zeros(11)}
    return {"epoch": 90, "arch": "resnet18", "state_dict": sd, "version": 2}


FORMATS = {
    "pipeline": _pipeline_checkpoint,
    "moco_official": _official_moco,
    "torchvision": lambda ref: ref.state_dict(),
    "torchvision_no_fc": _backbone,
    "timm": _timm_style,
    "plain_state_dict_wrapper": lambda ref: {"state_dict": ref.state_dict()},
    "ddp_wrapped": lambda ref: {f"module.{k}": v for k, v in ref.state_dict().items()},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_as_the_same_backbone(tmp_path, reference, fmt):
    path = tmp_path / f"{fmt}.pt"
    torch.save(FORMATS[fmt](reference), path)
    net = load_backbone(path, "resnet18")
    want = _backbone(reference)
    got = net.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), fmt
    x = torch.randn(2, 3, 32, 32)
    reference.fc, fc = nn.Identity(), reference.fc
    try:
        assert torch.equal(net.eval()(x), reference(x))  # [2, 512] features, same computation
    finally:
        reference.fc = fc


def _one_line_error(call, match: str) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_unknown_formats_are_refused_naming_the_file_and_what_it_holds(tmp_path, reference):
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3), "epoch": 3}, other)
    msg = _one_line_error(lambda: load_backbone(other, "resnet18"),
                          rf"^{re.escape(str(other))}: no ResNet backbone .*top-level keys \[encoder.weight, epoch\]")
    assert "torchvision or timm" in msg and "module.encoder_q" in msg  # says what it accepts
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3)}}, nested)  # a ViT, say
    _one_line_error(lambda: load_backbone(nested, "resnet18"), r"'state_dict' keys \[blocks.0.attn.qkv.weight\]")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], listed)
    _one_line_error(lambda: load_backbone(listed, "resnet18"), rf"^{re.escape(str(listed))}: holds a list")
    _one_line_error(lambda: load_backbone(tmp_path / "none.pt", "resnet18", "lineval.checkpoint"),
                    rf"^lineval.checkpoint = '{re.escape(str(tmp_path / 'none.pt'))}': file not found$")


def test_architecture_mismatch_names_the_architecture_held(tmp_path, reference):
    r50 = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    _one_line_error(lambda: load_backbone(r50, "resnet18"),
                    rf"^{re.escape(str(r50))} holds a resnet50 backbone, but model.arch = resnet18$")
    truncated = tmp_path / "truncated.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("layer4")}, truncated)
    _one_line_error(lambda: load_backbone(truncated, "resnet18"), r"does not fit resnet18: \d+ missing .*layer4")


def test_export_writes_plain_torchvision_weights(tmp_path, reference, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_atomic(_pipeline_checkpoint(reference), PRETRAINED)
    export.main(Params())
    exported = torch.load(export.OUT, weights_only=True)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(exported)  # strict: exactly torchvision's keys but fc
    want = _backbone(reference)
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    assert load_backbone_state(export.OUT, "resnet18").keys() == want.keys()  # and it reads back in


def test_convert_takes_a_timm_style_file(tmp_path, reference, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(_timm_style(reference), tmp_path / "timm.pt")
    p = Params()
    p.detection.checkpoint = str(tmp_path / "timm.pt")
    convert.main(p)
    with open(convert.OUT, "rb") as f:
        d2 = pickle.load(f)["model"]
    assert (d2["stem.conv1.weight"] == reference.conv1.weight.detach().numpy()).all()
    assert (d2["res5.1.conv2.norm.running_var"] == reference.layer4[1].bn2.running_var.numpy()).all()


def test_external_weights_are_a_tracked_dependency_and_pretraining_is_not_needed(project, reference):
    path, set_params = project
    weights = path.parent / "external" / "torchvision_r18.pt"  # outside the project, as a download would be
    weights.parent.mkdir()
    torch.save(reference.state_dict(), weights)
    set_params({"lineval": {"checkpoint": str(weights)}})
    out = run(["dvc", "repro", "lineval"], path).stdout
    assert "Running stage 'lineval'" in out and "Running stage 'pretrain'" not in out, out
    assert not (path / PRETRAINED).exists()
    assert json.loads((path / "metrics/lineval.run.json").read_text())["checkpoint"] == str(weights)
    assert "up to date" in run(["dvc", "status", "lineval"], path).stdout.lower()

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # other weights under the same name
    status = run(["dvc", "status", "lineval"], path).stdout
    assert "changed deps" in status and str(weights) in status, status
    assert "Running stage 'lineval'" in run(["dvc", "repro", "lineval"], path).stdout
