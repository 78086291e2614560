"""Detectron2 configs for the MoCo detection transfer: Faster R-CNN C4 (VOC) and Mask R-CNN C4 (COCO).

Backbone = stem + res2..res4 of a ResNet, ROI head = res5 on pooled ROIs + an extra norm, every norm
naiveSyncBN, nothing frozen (MoCo's configs/Base-RCNN-C4-BN.yaml). Detectron2's Res5ROIHeads builds res5
from bottleneck blocks only; the head here also builds it from basic blocks so that R18/R34, the
project's toy backbones, get a real C4 detector too.
"""

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
RES5_BLOCKS = {18: 2, 34: 3, 50: 3, 101: 3}  # blocks in the res5 stage, as in torchvision's layer4

# COCO's schedules (MoCo's detection configs, batch 16): length and lr steps; the only place they are defined.
COCO_SCHEDULES = {"1x": dict(max_iter=90_000, steps=(60_000, 80_000)),
                  "2x": dict(max_iter=180_000, steps=(120_000, 160_000))}
# Paper schedules per task (batch 16): VOC07+12 24k, COCO 1x (2x: `schedule="2x"` in build_c4_cfg).
SCHEDULES = {
    "voc": dict(max_iter=24_000, steps=(18_000, 22_000), warmup_iters=100,
                min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)),
    "coco": dict(**COCO_SCHEDULES["1x"], warmup_iters=1000, min_size_train=(640, 672, 704, 736, 768, 800)),
}


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 ends with one more norm layer (MoCo's detection head).

    MoCo fine-tunes with BN in every layer, new ones included: self-supervised features have other
    scales than supervised ones, and the box predictor should see normalised inputs either way.
    """

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        r = cfg.MODEL.RESNETS
        out_channels = r.RES2_OUT_CHANNELS * 8  # res5 has 8x the channels of res2
        n = RES5_BLOCKS[r.DEPTH]
        common = dict(num_blocks=n, stride_per_block=[2] + [1] * (n - 1), in_channels=out_channels // 2,
                      out_channels=out_channels, norm=r.NORM)
        if r.DEPTH in (18, 34):
            blocks = ResNet.make_stage(BasicBlock, **common)
        else:
            blocks = ResNet.make_stage(BottleneckBlock, **common, stride_in_1x1=r.STRIDE_IN_1X1,
                                       num_groups=r.NUM_GROUPS,
                                       bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8)
        res5 = nn.Sequential(*blocks)
        res5.add_module("norm", get_norm(r.NORM, out_channels))
        return res5, out_channels


def build_c4_cfg(
    arch: str,
    task: str,
    num_classes: int,
    *,
    max_iter: int | None = None,
    schedule: str | None = None,
    steps: tuple[int, ...] | None = None,
    warmup_iters: int | None = None,
    base_lr: float = 0.02,
    ims_per_batch: int = 16,
    min_size_train: tuple[int, ...] | None = None,
    max_size_train: int = 1333,
    min_size_test: int = 800,
    max_size_test: int = 1333,
    roi_batch_size: int = 512,
    test_topk: int = 1000,
    precise_bn_iters: int = 200,
    weights: str = "",
    device: str | None = None,
) -> CfgNode:
    """Faster R-CNN C4 (task "voc") or Mask R-CNN C4 (task "coco") on a torchvision-style ResNet.

    Defaults are the paper's (MoCo's detection configs); steps and warm-up not given follow the
    task's paper schedule scaled to max_iter, so a short run keeps the same shape of schedule. schedule: for
    COCO, "1x" (default) or "2x", whose lr steps are scaled to max_iter.
    """
    if arch not in DEPTHS:
        raise ValueError(f"arch {arch!r} not supported, expected one of {sorted(DEPTHS)}")
    if task not in SCHEDULES:
        raise ValueError(f"task {task!r} not supported, expected one of {sorted(SCHEDULES)}")
    paper = SCHEDULES[task]
    if schedule is not None:
        if task != "coco" or schedule not in COCO_SCHEDULES:
            raise ValueError(f"schedule {schedule!r} not supported for {task}: coco takes one of "
                             f"{sorted(COCO_SCHEDULES)}")
        paper = paper | COCO_SCHEDULES[schedule]
    max_iter = paper["max_iter"] if max_iter is None else max_iter
    scale = max_iter / paper["max_iter"]
    steps = tuple(round(s * scale) for s in paper["steps"]) if steps is None else steps
    steps = tuple(sorted({s for s in steps if 0 < s < max_iter}))  # a step at or past the end never happens
    warmup_iters = round(paper["warmup_iters"] * scale) if warmup_iters is None else warmup_iters
    depth = DEPTHS[arch]

    cfg = get_cfg()
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.MASK_ON = task == "coco"
    # torchvision-trained weights: RGB input normalised with ImageNet mean/std (0-255 scale)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision puts the stride in the 3x3 conv
    cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
    cfg.MODEL.ROI_HEADS.NAME = Res5ROIHeadsExtraNorm.__name__
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = roi_batch_size
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = test_topk
    cfg.INPUT.MIN_SIZE_TRAIN = paper["min_size_train"] if min_size_train is None else min_size_train
    cfg.INPUT.MAX_SIZE_TRAIN = max_size_train
    cfg.INPUT.MIN_SIZE_TEST = min_size_test
    cfg.INPUT.MAX_SIZE_TEST = max_size_test
    cfg.SOLVER.IMS_PER_BATCH = ims_per_batch
    cfg.SOLVER.BASE_LR = base_lr
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = steps
    cfg.SOLVER.WARMUP_ITERS = warmup_iters
    cfg.TEST.PRECISE_BN.ENABLED = precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = precise_bn_iters
    return cfg
