"""MoCo -> detectron2 conversion and the C4 detectors: weights land where torchvision had them, the
converted detector computes what the torchvision network computes, and both detectors train on CPU."""

import pickle

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from pipeline.compat import detectron2 as d2
from pipeline.detection.c4 import build_c4_cfg
from pipeline.detection.convert import convert_moco_to_d2, save_d2_weights, verify_conversion

SMALL = dict(min_size_train=(128,), max_size_train=160, min_size_test=128, max_size_test=160, roi_batch_size=16,
             test_topk=20, ims_per_batch=2, precise_bn_iters=4)


def random_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet whose BN affine parameters and running statistics are random too, so that a
    swapped or dropped BN tensor changes the network's output."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    return {arch: random_resnet(arch) for arch in ("resnet18", "resnet50")}


def test_keys_follow_moco_renaming(nets):
    sd = nets["resnet50"].state_dict()
    d2 = convert_moco_to_d2(sd, "resnet50")
    expected = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "layer1.0.conv1.weight": "res2.0.conv1.weight",
        "layer1.0.bn3.bias": "res2.0.conv3.norm.bias",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.running_var": "res2.0.shortcut.norm.running_var",
        "layer3.5.bn2.num_batches_tracked": "res4.5.conv2.norm.num_batches_tracked",
        "layer4.2.bn3.weight": "res5.2.conv3.norm.weight",
    }
    for tv_key, d2_key in expected.items():
        assert torch.equal(d2[d2_key], sd[tv_key]), tv_key
    assert len(d2) == len(sd) - 2  # everything but fc.weight, fc.bias
    assert not any(k.startswith("fc") or ".fc" in k or "bn" in k or "downsample" in k for k in d2)


def test_official_moco_checkpoint_keeps_the_query_encoder(nets):
    sd = nets["resnet50"].state_dict()
    moco = {"module.encoder_q." + k: v for k, v in sd.items() if not k.startswith("fc.")}
    moco |= {"module.encoder_k." + k: v + 1 for k, v in sd.items() if v.is_floating_point()}
    moco |= {"module.encoder_q.fc.0.weight": torch.zeros(2048, 2048), "module.encoder_q.fc.2.weight":
             torch.zeros(128, 2048), "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1)}
    ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": moco, "optimizer": {}}
    got, want = convert_moco_to_d2(ckpt, "resnet50"), convert_moco_to_d2(sd, "resnet50")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_converted_weights_load_and_compute_as_torchvision(nets, arch, tmp_path):
    net = nets[arch]
    sd = net.state_dict()
    d2 = convert_moco_to_d2(sd, arch)
    cfg = build_c4_cfg(arch, "voc", 3, **SMALL)
    verify_conversion(d2, cfg)

    path = tmp_path / "d2.pkl"
    save_d2_weights(d2, path)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(path))
    backbone, res5 = model.backbone, model.roi_heads.res5
    for got, tv_key in [
        (backbone.stem.conv1.weight, "conv1.weight"),
        (backbone.stem.conv1.norm.running_mean, "bn1.running_mean"),
        (backbone.res2[0].conv1.norm.running_var, "layer1.0.bn1.running_var"),
        (backbone.res3[0].shortcut.norm.weight, "layer2.0.downsample.1.weight"),
        (backbone.res4[1].conv2.weight, "layer3.1.conv2.weight"),
        (res5[0].shortcut.weight, "layer4.0.downsample.0.weight"),
        (res5[1].conv2.norm.running_mean, "layer4.1.bn2.running_mean"),
    ]:
        assert torch.equal(got, sd[tv_key]), tv_key
    # the whole state: every converted tensor is in the model, under backbone.* or roi_heads.res5.*
    model_sd = model.state_dict()
    for k, v in d2.items():
        assert torch.equal(model_sd[("roi_heads." if k.startswith("res5.") else "backbone.") + k], v), k

    # the C4 split computes torchvision's network: stem..res4 = conv1..layer3, res5 = layer4
    x = torch.randn(2, 3, 64, 64)  # [B, 3, H, W]
    with torch.no_grad():
        c4 = backbone(x)["res4"]  # [B, C4, H/16, W/16]
        tv_c4 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        torch.testing.assert_close(c4, tv_c4, rtol=1e-4, atol=1e-4)
        c5 = res5[:-1](c4)  # [B, C5, H/32, W/32], without the head's extra norm
        torch.testing.assert_close(c5, net.layer4(c4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,block,channels",
                         [("resnet18", BasicBlock, 512), ("resnet50", BottleneckBlock, 2048)])
def test_res5_head_is_the_last_stage_plus_a_norm(arch, block, channels):
    model = build_model(build_c4_cfg(arch, "voc", 3, **SMALL))
    res5 = model.roi_heads.res5
    n_blocks = {"resnet18": 2, "resnet50": 3}[arch]
    assert [type(b) for b in res5[:-1]] == [block] * n_blocks
    assert res5[0].stride == 2 and res5[-2].out_channels == channels
    assert isinstance(res5.norm, NaiveSyncBatchNorm) and res5.norm.num_features == channels
    assert isinstance(model.backbone.stem.conv1.norm, NaiveSyncBatchNorm)
    assert list(model.backbone.output_shape()) == ["res4"]
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0


def test_wrong_architecture_fails_naming_keys(nets):
    d2_r18 = convert_moco_to_d2(nets["resnet18"].state_dict(), "resnet18")
    with pytest.raises(ValueError) as err:
        verify_conversion(d2_r18, build_c4_cfg("resnet50", "voc", 3, **SMALL))
    assert "missing (" in str(err.value) and "backbone.res2.0.conv3.weight" in str(err.value)
    assert "unexpected (" in str(err.value) and "res2.0.conv1.weight" in str(err.value)  # 3x3 vs 1x1
    d2_r50 = convert_moco_to_d2(nets["resnet50"].state_dict(), "resnet50")
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): .*res2\.0\.conv3\.norm\.bias"):
        verify_conversion(d2_r50, build_c4_cfg("resnet18", "voc", 3, **SMALL))
    sd_r18 = nets["resnet18"].state_dict()
    with pytest.raises(ValueError, match=r"resnet50 backbone: missing \(\d+\): layer1\.0\.bn3"):
        convert_moco_to_d2(sd_r18, "resnet50")
    with pytest.raises(ValueError, match=r"wrong shape \(1\): layer1\.0\.conv1\.weight$"):
        convert_moco_to_d2(sd_r18 | {"layer1.0.conv1.weight": torch.zeros(1)}, "resnet18")


def test_pickle_is_what_detectron2_reads(nets, tmp_path):
    d2 = convert_moco_to_d2(nets["resnet18"].state_dict(), "resnet18")
    path = tmp_path / "out" / "model.pkl"
    save_d2_weights(d2, path)
    save_d2_weights(d2, path)  # overwriting is fine
    with open(path, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    assert obj["model"].keys() == d2.keys()
    assert all((torch.from_numpy(obj["model"][k]) == v).all() for k, v in d2.items())
    assert [p.name for p in path.parent.iterdir()] == ["model.pkl"]  # no temp file left
    with pytest.raises(ValueError, match=r"\.pkl"):
        save_d2_weights(d2, tmp_path / "model.pth")


def test_cfg_follows_moco_configs():
    cfg = build_c4_cfg("resnet50", "voc", 20)  # the defaults are the paper's
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (
        24_000, (18_000, 22_000), 0.02, 16)
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 256
    assert cfg.TEST.PRECISE_BN.ENABLED and not cfg.MODEL.MASK_ON
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    coco = build_c4_cfg("resnet50", "coco", 80, max_iter=180_000, steps=(120_000, 160_000))
    assert coco.MODEL.MASK_ON and coco.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert (coco.SOLVER.MAX_ITER, tuple(coco.SOLVER.STEPS)) == (180_000, (120_000, 160_000))
    assert tuple(build_c4_cfg("resnet50", "coco", 80).SOLVER.STEPS) == (60_000, 80_000)
    two_x = build_c4_cfg("resnet50", "coco", 80, schedule="2x")  # COCO_SCHEDULES: defined once, in c4.py
    assert (two_x.SOLVER.MAX_ITER, tuple(two_x.SOLVER.STEPS), two_x.SOLVER.WARMUP_ITERS) == (
        180_000, (120_000, 160_000), 1000)
    short_2x = build_c4_cfg("resnet18", "coco", 3, max_iter=180, schedule="2x")  # the 2x shape, scaled
    assert tuple(short_2x.SOLVER.STEPS) == (120, 160)
    with pytest.raises(ValueError, match="schedule '3x' not supported for coco"):
        build_c4_cfg("resnet18", "coco", 3, schedule="3x")
    # a short run keeps the schedule's shape
    toy = build_c4_cfg("resnet18", "voc", 3, max_iter=240)
    assert (tuple(toy.SOLVER.STEPS), toy.SOLVER.WARMUP_ITERS) == ((180, 220), 1)
    assert (toy.MODEL.RESNETS.DEPTH, toy.MODEL.RESNETS.RES2_OUT_CHANNELS) == (18, 64)
    with pytest.raises(ValueError, match="arch"):
        build_c4_cfg("vit_b_16", "voc", 3)
    with pytest.raises(ValueError, match="task"):
        build_c4_cfg("resnet18", "lvis", 3)


def tiny_batch(task: str, size: int = 96) -> list[dict]:
    """Two random images with two boxes each (and their box-shaped masks for Mask R-CNN)."""
    batch = []
    for _ in range(2):
        boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0, 30.0, 90.0, 88.0]])  # [2, 4] x0 y0 x1 y1
        inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]))
        if task == "coco":
            masks = torch.zeros(2, size, size, dtype=torch.bool)  # [2, H, W]
            for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist(), strict=True):
                m[y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, size, size) * 255, "instances": inst})  # [3, H, W] RGB 0-255
    return batch


@pytest.mark.parametrize("arch,task", [("resnet18", "voc"), ("resnet18", "coco"), ("resnet50", "voc")])
def test_train_step_and_inference_on_cpu(nets, arch, task):
    torch.manual_seed(0)
    cfg = build_c4_cfg(arch, task, 3, **SMALL)
    model = build_model(cfg).train()
    d2.load_report(model, {"model": convert_moco_to_d2(nets[arch].state_dict(), arch), "matching_heuristics": True})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with EventStorage(0):
        losses = model(tiny_batch(task))
    want = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    if task == "coco":
        want.add("loss_mask")
    assert losses.keys() == want and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ["backbone.stem.conv1.weight", "backbone.res4.0.conv1.weight",
                 "roi_heads.res5.0.conv1.weight", "roi_heads.res5.norm.weight",
                 "roi_heads.box_predictor.cls_score.weight"]:
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    opt.step()
    after = model.state_dict()
    assert not torch.equal(after["backbone.stem.conv1.weight"], before["backbone.stem.conv1.weight"])
    # train-mode BN (naiveSyncBN in one process) updated its running statistics
    key = "roi_heads.res5.norm.running_mean"
    assert not torch.equal(after[key], before[key])

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 96, 96) * 255, "height": 192, "width": 192}])
    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (192, 192)
    assert 0 < len(inst) <= 100 and inst.pred_boxes.tensor.shape == (len(inst), 4)
    assert inst.pred_classes.max() < 3 and (inst.scores >= cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST).all()
    if task == "coco":
        assert inst.pred_masks.shape == (len(inst), 192, 192)
