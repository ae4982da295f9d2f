"""Stage 1 for detectors: the parts (backbone, neck, heads) and their parameters, the anchors against
the dataset's box sizes, and the probe step the other tasks get (gradients, FLOPs, memory).

A box can be matched well (IoU 0.5 or more) only by an anchor whose side is within a factor
sqrt(2) of its own (for squares centred on each other IoU is the ratio of their areas), so a
box whose side sqrt(w h) lies outside [smallest anchor / sqrt(2), largest anchor x sqrt(2)]
is one the detector can only learn through low-quality matches; when most boxes do, that is
a warning with the sizes to use instead. FCOS, which matches by extent rather than IoU, has
no upper bound: its top level takes boxes of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from finetune_trainer.analyze import (Finding, Severity, StepFlops, StructureReport, findings, layer_types,
                                      measure_step, memory_model, module_counts, tied_weights)
from finetune_trainer.batches import Batch, Encoded
from finetune_trainer.config import Task
from finetune_trainer.detection.models import Detector, class_count, classifier_name
from finetune_trainer.structure import lora_candidates

@dataclass
class DetectionReport(StructureReport):
    parts: dict[str, int] = field(default_factory=dict)  # backbone, neck, head.* -> parameters
    anchors: dict[str, Any] = field(default_factory=dict)  # `anchor_report`


MATCH_RATIO = math.sqrt(2)  # side ratio at which two centred squares have IoU 0.5
MOST = 0.5  # the share of boxes outside the anchors' reach that makes a finding


def parts(detector: Detector) -> dict[str, int]:
    """Parameters by part: the backbone's body, its neck (FPN or SSD's extra layers) and each head."""
    counts: dict[str, int] = {}
    for name, p in detector.net.named_parameters():
        counts[part_of(name)] = counts.get(part_of(name), 0) + p.numel()
    return counts


def part_of(name: str) -> str:
    if name.startswith("backbone."):
        return "neck" if name.startswith(("backbone.fpn.", "backbone.extra.")) else "backbone"
    if name.startswith("rpn."):
        return "head.rpn"
    if name.startswith("roi_heads."):
        return "head.roi"
    if name.startswith("head."):
        return "head." + name.split(".")[1].removesuffix("_head")
    return "other"


def anchor_sides(detector: Detector) -> tuple[float, float]:
    """The smallest and largest anchor side in pixels at the detector's input size."""
    net = detector.net
    generator = net.rpn.anchor_generator if hasattr(net, "rpn") else net.anchor_generator
    if hasattr(generator, "sizes"):  # AnchorGenerator: sizes in pixels, per feature level
        sizes = [s for level in generator.sizes for s in level]
        return float(min(sizes)), float(max(sizes))
    # SSD's DefaultBoxGenerator: fractions of the input size; level k has boxes of side s_k and sqrt(s_k s_k+1), so
    # the last scale (SSD300's 1.05, SSDlite's 1.0) sizes no box of its own: it read 315 px at a 300-pixel input
    scales = generator.scales
    largest = max(math.sqrt(s * t) for s, t in zip(scales, scales[1:]))
    return scales[0] * detector.image_size, largest * detector.image_size


def box_sides(data: Encoded, image_size: int) -> list[float]:
    """sqrt(w h) of every training box, in pixels of the resized input."""
    sides = []
    for record in data.features:
        sx, sy = image_size / record.width, image_size / record.height
        sides += [math.sqrt((x1 - x0) * sx * (y1 - y0) * sy) for x0, y0, x1, y1 in record.boxes]
    return sides


def anchor_report(detector: Detector, data: Encoded) -> dict[str, Any]:
    low, high = anchor_sides(detector)
    sides = sorted(box_sides(data, detector.image_size))
    # FCOS matches no IoU: a location inside a box takes it by the box's extent, its top level without a bound
    reach = (low / MATCH_RATIO, None if detector.architecture.startswith("fcos") else high * MATCH_RATIO)
    below = sum(s < reach[0] for s in sides)
    above = sum(s > reach[1] for s in sides) if reach[1] is not None else 0
    quantile = (lambda q: sides[min(len(sides) - 1, int(q * len(sides)))]) if sides else (lambda q: None)
    return {"anchor_sides": [low, high], "reach": list(reach), "boxes": len(sides), "box_side_p5": quantile(0.05),
            "box_side_median": quantile(0.5), "box_side_p95": quantile(0.95), "below_reach": below,
            "above_reach": above, "outside_share": (below + above) / len(sides) if sides else 0.0}


def anchor_findings(anchors: dict[str, Any]) -> list[Finding]:
    if anchors["outside_share"] <= MOST:
        return []
    low, high = anchors["anchor_sides"]
    top = "any size" if anchors["reach"][1] is None else f"{anchors['reach'][1]:.0f} px"
    return [Finding(Severity.WARNING, "AnchorsMissBoxes",
                    f"{anchors['outside_share']:.0%} of the {anchors['boxes']} training boxes lie outside the anchors' "
                    f"reach ({anchors['below_reach']} smaller, {anchors['above_reach']} larger; anchors {low:.0f} to "
                    f"{high:.0f} px reach {anchors['reach'][0]:.0f} px to {top} at IoU 0.5, the "
                    f"boxes run {anchors['box_side_p5']:.0f} to {anchors['box_side_p95']:.0f} px (5th to 95th "
                    "percentile)): change dataset.imageSize to scale the boxes into reach, or the anchor sizes")]


def analyze(detector: Detector, batches: list[Batch], data: Encoded, num_labels: int,
            dtype: torch.dtype | None = None) -> DetectionReport:
    """The StructureReport of the other tasks for a detector, with `parts` and `anchors` added to it;
    `num_labels` is the dataset's category count."""
    params = dict(detector.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    no_grad, probe = probe_step(detector, batches, dtype)
    report = DetectionReport(
        model_class=f"{type(detector.net).__name__} ({detector.architecture})",
        total_parameters=total,
        trainable_parameters=trainable,
        frozen_parameters=total - trainable,
        modules=module_counts(params),
        layer_types=layer_types(detector),
        lora_candidates={k: list(v) for k, v in lora_candidates(detector, Task.OBJECT_DETECTION).items()},
        head={"name": "net." + classifier_name(detector.net), "out_features": class_count(detector.net),
              "dataset_labels": num_labels + 1},  # background included on both sides
        tied_weights=tied_weights(detector),
        no_grad_parameters=no_grad,
        flops={"measured_per_sample": probe["flops"], "training_per_sample": probe["flops"],
               "rule": "none: convolutions reuse weights across positions, so 6N per sample does not hold",
               "estimate_per_sample": None, "measured_over_estimate": None},
        memory=memory_model(params, probe["activations"], probe["largest_activation"], probe["peak"],
                            probe["peak_source"], probe["gradients"]),
        parts=parts(detector),
        anchors=anchor_report(detector, data),
    )
    # LoRA is not offered for detectors, so its candidates are no finding.
    report.findings = [f for f in findings(report, params, Task.OBJECT_DETECTION) if f.code != "NoLoraCandidates"]
    report.findings += anchor_findings(report.anchors)
    return report


def probe_step(detector: Detector, batches: list[Batch], dtype: torch.dtype | None) -> tuple[list[str], dict[str, Any]]:
    """A training forward and backward of every weight, frozen or not (freezing comes later), without an optimizer
    step; returns the parameters left without a gradient and what it cost."""
    requires = {n: p.requires_grad for n, p in detector.named_parameters()}
    for p in detector.parameters():
        p.requires_grad_(True)
    try:
        return measured(detector, batches, dtype)
    finally:
        for name, p in detector.named_parameters():
            p.requires_grad_(requires[name])


def step_flops(detector: Detector, batch: Batch, dtype: torch.dtype | None) -> StepFlops:
    """FLOPs per sample of a training step of the detector as it will train (its requires_grad flags as set), for
    the MFU gauge: its images are all resized to one size, so one batch's figure holds for every batch."""
    return StepFlops(measured(detector, [batch], dtype)[1]["flops"], per_token=False)


def measured(detector: Detector, batches: list[Batch], dtype: torch.dtype | None) -> tuple[list[str], dict[str, Any]]:
    """A training forward and backward (a detector computes its loss only in train mode) of the parameters that
    require a gradient; the gradients and the batch-norm statistics it moves are put back, so it changes nothing."""
    buffers = {name: b.clone() for name, b in detector.named_buffers()}
    was_training = detector.training
    detector.train()
    # The head as loaded may score fewer classes than the dataset has (rearrange resizes it after this): labels past
    # it become its last class, as a step's cost does not depend on a box's class.
    last = class_count(detector.net) - 1
    batches = [replace(b, inputs=b.inputs | {"box_labels": b.inputs["box_labels"].clamp(max=last)}) for b in batches]
    try:
        probe = measure_step(detector, lambda batch: detector(**batch.inputs), batches, dtype)
        no_grad = [n for n, p in detector.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        with torch.no_grad():
            for name, b in detector.named_buffers():
                b.copy_(buffers[name])
        for p in detector.parameters():
            p.grad = None
        detector.train(was_training)
    return no_grad, probe


def summary_lines(report: DetectionReport) -> list[str]:
    """What the log adds for a detector to `analyze.summary`."""
    parts_line = ", ".join(f"{k} {v:,}" for k, v in report.parts.items())
    a = report.anchors
    return [f"  parts: {parts_line}",
            f"  anchors {a['anchor_sides'][0]:.0f}..{a['anchor_sides'][1]:.0f} px; box sides "
            f"{a['box_side_p5'] or 0:.0f}..{a['box_side_p95'] or 0:.0f} px (p5..p95), "
            f"{a['outside_share']:.0%} outside the anchors' reach"]
