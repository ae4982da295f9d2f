"""torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD/SSDlite) called like the other models:
keyword tensors in; the summed training loss out in train mode, detections in eval mode.

Class ids are 1..K for the dataset's categories and 0 for the background, as in torchvision's
COCO weights, so a detector of K categories has K + 1 classes. `resize_head` (rearrange)
replaces the classification layers when that count differs from the dataset's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import ConfigError, ModelError
from finetune_trainer.models import KeepsFrozenNorms
from finetune_trainer.uris import fetch

log = logging.getLogger(__name__)

PRIOR_PROBABILITY = 0.01  # RetinaNet's and FCOS's initial foreground probability (focal loss paper, 3.3)
TWO_IMAGES_PER_BATCH = ("ssdlite",)  # batch norm down to 1x1 feature maps: one image gives one value per channel
# The builders that, given trained weights, make their backbone's batch norm frozen (torchvision's FrozenBatchNorm2d:
# `norm_layer = FrozenBatchNorm2d if is_trained else BatchNorm2d`): at detection's batches of 2 to 8 images, statistics
# that training moved would stray from the ones the weights were trained with. The v2 builders and SSD keep theirs.
FROZEN_NORM_WHEN_TRAINED = ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                            "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")


class Detector(KeepsFrozenNorms):
    """A torchvision detector over padded batch tensors: pixel_values (B, 3, H, W) in 0..1, boxes (B, M, 4) as
    [x0, y0, x1, y1] pixels and box_labels (B, M), where a label below 0 pads. A backbone frozen by adjust.freeze
    keeps its batch norm's statistics (SSDlite's, the v2 builders'), as the builders' FrozenBatchNorm2d does."""

    def __init__(self, net: nn.Module, architecture: str, image_size: int, builder_kwargs: dict[str, Any],
                 labels: dict[int, str] | None = None, trained_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.architecture = architecture
        self.image_size = image_size
        self.builder_kwargs = builder_kwargs
        self.labels = labels  # the class names of an export of ours, which its head was trained on
        self.trained_size = trained_size  # the input size an export of ours was trained at (its imageSize)
        self.category_ids: dict[int, int] = {}  # each class id's category_id in the annotations trained on
        set_input_size(net, image_size)

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor | None = None,
                box_labels: torch.Tensor | None = None) -> Any:
        images = list(pixel_values)
        if not self.training:
            # fp32 whatever the run trains at: under autocast torchvision decodes the boxes at its dtype, and bf16's
            # steps (2 pixels from 256 up) cost small objects their IoU, hence mAP (torchvision's references
            # evaluate without autocast too)
            with torch.autocast(pixel_values.device.type, enabled=False):
                return self.net(images)
        assert boxes is not None and box_labels is not None, "training needs boxes and box_labels"
        targets = [{"boxes": b[lab >= 0], "labels": lab[lab >= 0]} for b, lab in zip(boxes, box_labels)]
        return sum(self.net(images, targets).values())  # the loss terms, each averaged over the batch


def set_input_size(net: nn.Module, size: int) -> None:
    """Batches arrive resized to size x size, which the detector's own transform leaves so; an image of another
    shape (a photo given to the export) it squashes to size x size as training did, not keeping its aspect, and
    gives its boxes back in that image's pixels (SSD's fixed 320 included: its default boxes follow the feature
    maps of whatever size comes in)."""
    transform = net.transform
    fit_default_boxes(net, transform.fixed_size, size)
    transform.min_size, transform.max_size, transform.fixed_size = (size,), size, (size, size)


def fit_default_boxes(net: nn.Module, built: tuple[int, int] | None, size: int) -> None:
    """SSD300 tiles its default boxes by fixed pixel steps (8, 16, 32, 64, 100, 300) that fit its feature maps at
    300 pixels only: at 512 its last level's 4x4 cells had box centres 150 to 1050 px. At another size than the
    builder's they are dropped, and torchvision's generator centres the boxes on the feature map's cells, size / side
    apart (the SSD paper's tiling, and SSDlite's); at the builder's size they stay, as its weights were trained."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    generator = getattr(net, "anchor_generator", None)
    if isinstance(generator, DefaultBoxGenerator) and generator.steps is not None and built != (size, size):
        generator.steps = None


def detection_architectures() -> list[str]:
    import torchvision

    return [name for name in torchvision.models.list_models(torchvision.models.detection)
            if name.startswith(("fasterrcnn", "retinanet", "fcos", "ssd"))]


def check_batch_size(architecture: str, batch_size: int) -> None:
    """Refuse before anything loads what would fail at the first training step: torch's batch norm raises
    'Expected more than 1 value per channel when training' on SSDlite's 1x1 feature maps of a one-image batch."""
    if batch_size < 2 and architecture.startswith(TWO_IMAGES_PER_BATCH):
        raise ConfigError(f"training.batchSize {batch_size}: {architecture} has batch norm on 1x1 feature maps, "
                          "which cannot train on one image per batch; set training.batchSize to 2 or more")


def load_detector(spec: ModelSpec, image_size: int) -> Detector:
    """Build `spec.architecture` with random weights (no download), then load the weights at `spec.uri`: a
    torchvision state dict (.pth/.pt/.safetensors) or a folder holding one (an export of ours included)."""
    import torchvision

    from finetune_trainer.models import (builder_kwargs, exported_config, exported_labels, read_state_dict,
                                         user_runtime_error, weight_file)

    architecture = spec.architecture or ""
    if problem := spec.config_problem():
        raise ConfigError(f"model.config.{problem}")
    if architecture not in detection_architectures():
        raise ModelError(f"model.architecture {architecture!r}: not a torchvision detector; one of "
                         f"{', '.join(detection_architectures())}")
    path = None if spec.uri is None else fetch(spec.uri, kind="model", revision=spec.revision, error=ModelError)
    saved = exported_config(path)
    kwargs = builder_kwargs(saved, spec.config, background=1)
    try:
        net = torchvision.models.get_model(architecture, weights=None, weights_backbone=None, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not user_runtime_error(exc):  # a negative size is the spec's
            raise
        raise ModelError(f"model.config {spec.config}: {architecture} does not take it ({exc})") from exc
    if path is not None:
        if architecture in FROZEN_NORM_WHEN_TRAINED:  # built with weights=None (no download), so not done by torchvision
            freeze_batch_norm(net.backbone.body)
        state = read_state_dict(weight_file(path))
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"model.uri {spec.uri}: its weights do not fit {architecture}{misfit(net, state)} "
                             f"({exc})"[:2000]) from exc
    return Detector(net, architecture, image_size, kwargs, exported_labels(path) if saved and path else None,
                    saved.get("imageSize") if saved else None)


def misfit(net: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why a state dict does not load, where torch's message lists hundreds of keys: it holds another network (an
    ImageNet backbone's weights, say, whose names lack the detector's `backbone.body.`), or a head of another class
    count (which the builder takes as model.config num_classes)."""
    if not set(state) & set(net.state_dict()):
        names = ", ".join(sorted({key.split(".")[0] for key in state})[:4])
        return (f": none of its {len(state)} tensors is one of the detector's (theirs begin {names}); model.uri takes "
                "a whole detector's state dict, not a backbone's or a classifier's")
    classes = checkpoint_classes(net, state)
    if classes is not None and classes != class_count(net):
        return f": their head has {classes} classes (background included); set model.config.num_classes: {classes}"
    return ""


def checkpoint_classes(net: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The classes (background included) that the head in `state` scores, where it holds this detector's head."""
    head = net.get_submodule(classifier_name(net))
    layer = head.cls_score if hasattr(head, "cls_score") else class_convs(head)[0]
    weight = state.get(next(name for name, m in net.named_modules() if m is layer) + ".weight")
    if weight is None:
        return None
    per_class = 1 if isinstance(layer, nn.Linear) else layer.out_channels // class_count(net)  # anchors per position
    return weight.shape[0] // per_class


def class_convs(head: nn.Module) -> list[nn.Conv2d]:
    """A one-stage detector's class convolutions: RetinaNet's and FCOS's one, SSD's one per feature map."""
    return [head.cls_logits] if hasattr(head, "cls_logits") else [last_conv(m) for m in head.module_list]


def freeze_batch_norm(module: nn.Module) -> None:
    """Each BatchNorm2d below `module` made a FrozenBatchNorm2d of its size and eps (the weights load into it)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, child.eps))
        else:
            freeze_batch_norm(child)


def load_exported(folder: Path) -> Detector:
    """A detector as `export` wrote it: config.json (architecture, classes, input size, each class's category_id)
    and model.safetensors."""
    saved = json.loads((folder / "config.json").read_text())
    spec = ModelSpec(task="object-detection", architecture=saved["architecture"], uri=str(folder.resolve()))
    detector = load_detector(spec, saved["imageSize"])
    # JSON's keys are strings; an export from before categoryIds has none
    detector.category_ids = {int(c): int(cid) for c, cid in saved.get("categoryIds", {}).items()}
    return detector


def classifier_name(net: nn.Module) -> str:
    """The module that scores the classes: Faster R-CNN's box predictor, the one-stage detectors' class head."""
    if hasattr(net, "roi_heads"):
        return "roi_heads.box_predictor"
    return "head.classification_head"


def head_prefix(net: nn.Module) -> str:
    """What `all-but-head` trains: the second stage of a Faster R-CNN, the head of a one-stage detector."""
    return "roi_heads" if hasattr(net, "roi_heads") else "head"


def backbone_units(net: nn.Module) -> list[str]:
    """The backbone's stages, bottom to top, for bottom-layers freezing and layer-wise decay; its stem counts as
    below them, and the neck and heads as above them."""
    name = "body" if hasattr(net.backbone, "body") else "features"
    body = net.backbone.get_submodule(name)
    stages = [n for n, c in body.named_children() if any(True for _ in c.parameters())]
    if len(stages) <= 2:  # SSDlite cuts its MobileNet in two at the feature map it taps: their blocks are the stages
        stages = [f"{n}.{m}" for n in stages for m, c in body.get_submodule(n).named_children()
                  if any(True for _ in c.parameters())]
    # The stem: ResNet's lone conv1 and bn1 before its first block; else the first stage (MobileNet's, VGG's conv)
    stem = next((i for i, s in enumerate(stages) if any(True for _ in body.get_submodule(s).children())), 1)
    return [f"net.backbone.{name}.{stage}" for stage in stages[max(stem, 1):]]


def class_count(net: nn.Module) -> int:
    """Classes the detector scores, the background included."""
    head = net.get_submodule(classifier_name(net))
    if hasattr(head, "cls_score"):
        return head.cls_score.out_features
    return getattr(head, "num_classes", None) or head.num_columns  # SSD's scoring head says num_columns


def resize_head(detector: Detector, num_classes: int, reinitialize: bool) -> bool:
    """Fresh classification layers for `num_classes` (background included) when the count differs or when asked;
    the box regression stays (it is class-agnostic except in Faster R-CNN, whose predictor is replaced whole)."""
    net = detector.net
    old = class_count(net)
    if old == num_classes and not reinitialize:
        return False
    if hasattr(net, "roi_heads"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        predictor = net.roi_heads.box_predictor
        fresh = FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
        net.roi_heads.box_predictor = fresh.to(predictor.cls_score.weight.device)
    else:
        head = net.head.classification_head
        for conv in class_convs(head):
            replace_conv(net, conv, conv.out_channels // old * num_classes)
        if hasattr(head, "num_classes"):
            head.num_classes = num_classes
        else:
            head.num_columns = num_classes
    log.info("new detection head %s: %d -> %d classes (background included)", classifier_name(net), old, num_classes)
    return True


def last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def replace_conv(net: nn.Module, conv: nn.Conv2d, out_channels: int) -> None:
    fresh = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=conv.bias is not None)
    nn.init.normal_(fresh.weight, std=0.01)
    if fresh.bias is not None:  # start every class at the prior, so that the focal loss starts calm
        nn.init.constant_(fresh.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    name = next(n for n, m in net.named_modules() if m is conv)
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent), leaf, fresh.to(conv.weight.device))
