"""Object detectors and instance segmenters: torchvision's detection models on backbones from visrec's zoo.

    fasterrcnn_<backbone>   two-stage: region proposal network, then RoI-aligned box classification (Ren et al.)
    maskrcnn_<backbone>     Faster R-CNN plus a mask head per region: instance segmentation (He et al., 2017)
    retinanet_<backbone>    single-stage: dense anchors with the focal loss (Lin et al., 2017)
    fcos_<backbone>         single-stage and anchor-free: a box per feature-map location (Tian et al., 2019)

with <backbone> one of resnet18, resnet34, resnet50 and mobilenet_v1 (any stem: `stem=small|imagenet|auto`).
The backbone's last stages feed a feature pyramid (FPN, Lin et al., 2017); R-CNNs read P2-P5 and a max-pooled
P6, the single-stage models P3-P5 with P6 and P7 computed from P5.

Sizes are data-dependent, and the detection task fits them to the training boxes unless given
(`model.kwargs`): `min_size`/`max_size` (the side the images are resized to: torchvision's 800 would upscale
64-pixel scenes 12 times), `object_sizes` (the smallest and largest object side after resizing: each level's
anchors, 4-8 strides wide, are clamped into it) and `aspect_ratios` (height / width). `anchor_sizes` (one list
per pyramid level, in pixels of the resized image) replaces the rule. `fpn_channels`, `head_size` (the R-CNN box
head's width) and the sampling sizes default smaller than torchvision's (which sizes them for 800-pixel COCO
images with dozens of objects).

The network takes the batch visrec prepared (normalized, augmented: torchvision's own normalization is
switched off) as one tensor. In training it takes the targets too (a list of {boxes xyxy, labels, masks}) and
returns torchvision's loss dictionary; in evaluation it returns one {boxes, labels, scores(, masks)} per image,
with labels as visrec's class indices (0..C-1) for every model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ..errors import VisrecError
from ._registry import create_model, register_model

BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v1")
HEADS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")


class ZooFPN(nn.Module):
    """A zoo classifier's last `levels` stages, as a feature pyramid: OrderedDict of maps with `out_channels`
    channels each, finest first, as torchvision's detection heads read them."""

    def __init__(self, body: nn.Module, probe: nn.Module, in_chans: int, image_size: tuple[int, int], *,
                 levels: int, out_channels: int, extra: str):
        super().__init__()
        paths = list(body.stage_paths)
        if len(paths) < levels:
            raise VisrecError(f"{type(body).__name__} has {len(paths)} stages; a feature pyramid needs {levels}",
                              f"use one of the backbones {', '.join(BACKBONES)}")
        self.paths = paths[-levels:]
        body.reset_classifier(1)  # the classifier is unused; keep it tiny
        self.body = body
        with torch.no_grad():  # shapes from the same network built on the meta device: no compute
            maps = probe.eval().feature_maps(torch.empty(1, in_chans, *image_size, device="meta"))
        self.strides = [image_size[0] / maps[p].shape[-2] for p in self.paths]
        in_list = [maps[p].shape[1] for p in self.paths]
        extra_block = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(in_list, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.num_maps = levels + (1 if extra == "pool" else 2)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.feature_maps(x)
        return self.fpn(OrderedDict((str(i), maps[p]) for i, p in enumerate(self.paths)))


def anchors_for_strides(strides: list[float], object_sizes: list[float] | None, per_level: int = 3
                        ) -> list[list[float]]:
    """Anchor sizes per pyramid level: `per_level` steps of 2^(1/per_level) from 4x the level's stride (FPN's rule:
    an anchor 4-8 strides wide overlaps any object of its size by IoU >= 0.6 somewhere), clamped into the
    objects' size range (`object_sizes` = [smallest, largest], in pixels of the resized image) so no anchor is
    wasted on sizes the data does not have."""
    lo, hi = object_sizes if object_sizes else (0.0, math.inf)
    out = []
    for s in strides:
        out.append([round(min(max(4 * s * 2 ** (j / per_level), lo), hi), 1) for j in range(per_level)])
    return out


class Detector(nn.Module):
    """A torchvision detection model behind visrec's batch interface (see the module's docstring)."""

    detector = True  # the tasks' check: this network outputs boxes, not class scores
    dense_output = False

    def __init__(self, net: nn.Module, label_offset: int, masks: bool):
        super().__init__()
        self.net, self.label_offset, self.masks = net, label_offset, masks

    def forward(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        images = list(x.unbind(0))
        if self.training:
            shifted = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
            return self.net(images, shifted)
        out = self.net(images)
        for o in out:
            o["labels"] = o["labels"] - self.label_offset
        return out


def _size_options(image_size: tuple[int, int], min_size: int | None, max_size: int | None) -> tuple[int, int]:
    short = min_size or min(image_size)
    return short, max_size or max(short, round(short * max(image_size) / min(image_size)))


def build_detector(head: str, backbone: str, *, in_chans: int, num_classes: int, image_size: tuple[int, int],
                   stem: str = "auto", min_size: int | None = None, max_size: int | None = None,
                   anchor_sizes: list[list[float]] | None = None, aspect_ratios: list[float] | None = None,
                   object_sizes: list[float] | None = None, fpn_channels: int = 128, head_size: int = 256,
                   rpn_batch: int = 128, roi_batch: int = 64,
                   proposals: int = 300, detections: int = 100, score_thresh: float = 0.05,
                   nms_thresh: float = 0.5) -> Detector:
    if head not in HEADS:
        raise VisrecError(f"unknown detection head {head!r}", f"use one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise VisrecError("a detector needs at least one object class")
    if head == "fcos" and fpn_channels % 32:
        raise VisrecError(f"fpn_channels={fpn_channels}: FCOS's heads normalize in 32 groups",
                          "give a multiple of 32 (default 128)")
    short, long_ = _size_options(image_size, min_size, max_size)
    rcnn = head in ("fasterrcnn", "maskrcnn")
    def body() -> nn.Module:
        return create_model(backbone, in_chans=in_chans, num_classes=1, image_size=(short, long_), stem=stem,
                            check_size=False)

    with torch.device("meta"):
        probe = body()
    fpn = ZooFPN(body(), probe, in_chans, (short, long_), levels=4 if rcnn else 3, out_channels=fpn_channels,
                 extra="pool" if rcnn else "p6p7")
    strides = [*fpn.strides] + [fpn.strides[-1] * 2 ** (i + 1) for i in range(fpn.num_maps - len(fpn.strides))]
    sizes = anchor_sizes or anchors_for_strides(strides, object_sizes)
    if len(sizes) != fpn.num_maps:
        raise VisrecError(f"anchor_sizes has {len(sizes)} levels; {head} on {backbone} has {fpn.num_maps}",
                          "give one list of sizes per pyramid level, or leave anchor_sizes unset to fit them")
    ratios = list(aspect_ratios or [0.5, 1.0, 2.0])
    common = dict(min_size=short, max_size=long_, image_mean=[0.0] * in_chans, image_std=[1.0] * in_chans)
    if head == "fcos":
        # FCOS places one point per location: its "anchors" are the levels' strides
        gen = AnchorGenerator(tuple((float(s),) for s in strides), ((1.0,),) * fpn.num_maps)
        net = FCOS(fpn, num_classes, anchor_generator=gen, score_thresh=score_thresh, nms_thresh=nms_thresh,
                   detections_per_img=detections, topk_candidates=proposals, **common)
        return Detector(net, 0, False)
    gen = AnchorGenerator(tuple(tuple(float(s) for s in lv) for lv in sizes), (tuple(ratios),) * fpn.num_maps)
    if head == "retinanet":
        net = RetinaNet(fpn, num_classes, anchor_generator=gen, score_thresh=score_thresh, nms_thresh=nms_thresh,
                        detections_per_img=detections, topk_candidates=proposals, **common)
        return Detector(net, 0, False)
    rcnn_kw = dict(rpn_anchor_generator=gen, rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=roi_batch,
                   rpn_pre_nms_top_n_train=proposals * 2, rpn_post_nms_top_n_train=proposals,
                   rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals // 2,
                   box_score_thresh=score_thresh, box_nms_thresh=nms_thresh, box_detections_per_img=detections,
                   box_head=TwoMLPHead(fpn_channels * 7 * 7, head_size), **common)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    rcnn_kw["box_predictor"] = FastRCNNPredictor(head_size, num_classes + 1)
    if head == "fasterrcnn":
        return Detector(FasterRCNN(fpn, None, **rcnn_kw), 1, False)
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    net = MaskRCNN(fpn, None, mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1),
                   mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1), **rcnn_kw)
    return Detector(net, 1, True)


def _make(head: str, backbone: str):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              min_size: int | None = None, max_size: int | None = None,
              anchor_sizes: list[list[float]] | None = None, aspect_ratios: list[float] | None = None,
              object_sizes: list[float] | None = None, fpn_channels: int = 128, head_size: int = 256,
              rpn_batch: int = 128, roi_batch: int = 64,
              proposals: int = 300, detections: int = 100, score_thresh: float = 0.05,
              nms_thresh: float = 0.5) -> nn.Module:
        return build_detector(head, backbone, in_chans=in_chans, num_classes=num_classes, image_size=image_size,
                              stem=stem, min_size=min_size, max_size=max_size, anchor_sizes=anchor_sizes,
                              aspect_ratios=aspect_ratios, object_sizes=object_sizes, fpn_channels=fpn_channels,
                              head_size=head_size,
                              rpn_batch=rpn_batch, roi_batch=roi_batch, proposals=proposals, detections=detections,
                              score_thresh=score_thresh, nms_thresh=nms_thresh)

    kind = {"fasterrcnn": "Faster R-CNN", "maskrcnn": "Mask R-CNN", "retinanet": "RetinaNet", "fcos": "FCOS"}[head]
    build.__name__ = f"{head}_{backbone}"
    build.__doc__ = f"{kind} with an FPN on {backbone} ({'instance' if head == 'maskrcnn' else 'detection'})"
    return build


for _h in HEADS:
    for _b in BACKBONES:
        register_model(_make(_h, _b), family="instance" if _h == "maskrcnn" else "detection")
