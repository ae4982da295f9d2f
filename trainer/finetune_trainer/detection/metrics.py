"""Stage 5 for detectors: COCO mAP (IoU 0.5:0.95), mAP@50, mAP@75 and per-class AP, computed by
torchmetrics' MeanAveragePrecision with pycocotools (the reference COCO evaluation) behind it.

Each rank runs the detector on its share of the batches; every rank then gathers the detections
of all ranks and computes, so every rank returns the same numbers. Boxes are compared in the resized
input's pixels, where the detector sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finetune_trainer.batches import Batch, Encoded, loader_threads, polled_eval_batches
from finetune_trainer.config import Metric, Task
from finetune_trainer.detection.batches import scaled_boxes
from finetune_trainer.detection.coco import Annotated
from finetune_trainer.distributed import World
from finetune_trainer.matplotlib_folder import matplotlib_folder
from finetune_trainer.train import unwrap

KEYS = {Metric.MAP: "map", Metric.MAP50: "map_50", Metric.MAP75: "map_75"}


@torch.no_grad()
def evaluate_detector(model: nn.Module, data: Encoded, collate: Callable[[Encoded, list[int]], Batch],
                      metrics: list[Metric], batch_size: int, world: World,
                      id2label: dict[int, str], before_batch: Callable[[], None] = lambda: None
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """The requested metrics, and AP per category name (categories without a box in the split left out);
    `before_batch` as in `evaluate.evaluate`."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    predictions: list[dict[str, torch.Tensor]] = []
    truths: list[dict[str, torch.Tensor]] = []
    for idx, batch in polled_eval_batches(data, collate, batch_size, world.rank, world.size, before_batch,
                                          loader_threads(Task.OBJECT_DETECTION, world.device)):
        batch = batch.to(world.device)
        detections = model(batch.inputs["pixel_values"])  # in fp32 (Detector.forward)
        boxes, labels = batch.inputs["boxes"].cpu(), batch.inputs["box_labels"].cpu()
        predictions += [{k: v.cpu() for k, v in d.items()} for d in detections]
        size = batch.inputs["pixel_values"].shape[-1]
        truths += [with_crowds(b[lab >= 0], lab[lab >= 0], data.features[i], size)
                   for b, lab, i in zip(boxes, labels, idx)]
    model.train(was_training)
    scorer = coco_scorer()
    for rank_predictions, rank_truths in world.gather((predictions, truths)):
        scorer.update(rank_predictions, rank_truths)
    result = scorer.compute()
    values = {m.value: max(0.0, float(result[KEYS[m]])) for m in metrics}  # -1 means no box to score at all
    classes = result["classes"].reshape(-1).tolist()
    per_class = result["map_per_class"].reshape(-1).tolist()
    return values, {id2label.get(int(c), str(c)): float(ap) for c, ap in zip(classes, per_class) if ap >= 0}


def coco_scorer() -> Any:
    """torchmetrics' MeanAveragePrecision with COCO's own IoU and recall thresholds: torchmetrics' defaults are
    torch.linspace's float32, where 0.6 is 0.6000000238, so an IoU or a recall of exactly 0.6 (or 0.55, 0.8, 0.85 ...)
    fell short of its threshold. Not torchmetrics' own sync: it gathers its states one image's tensor at a time, which
    breaks the collectives (gloo aborts, NCCL hangs) when the ranks hold different numbers of images, as an uneven
    last batch makes."""
    from pycocotools.cocoeval import Params

    matplotlib_folder()  # torchmetrics' detection metrics import matplotlib
    from torchmetrics.detection import MeanAveragePrecision

    coco = Params(iouType="bbox")
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools",
                                iou_thresholds=coco.iouThrs.tolist(), rec_thresholds=coco.recThrs.tolist(),
                                sync_on_compute=False)


def with_crowds(boxes: torch.Tensor, labels: torch.Tensor, record: Annotated, size: int) -> dict[str, torch.Tensor]:
    """An image's ground truth with its crowd regions (iscrowd 1), where COCO's evaluation ignores a detection
    rather than count it a false positive."""
    crowds = len(record.crowd_labels)
    return {"boxes": torch.cat([boxes, scaled_boxes(record, record.crowd_boxes, size)]),
            "labels": torch.cat([labels, torch.tensor(record.crowd_labels, dtype=labels.dtype)]),
            "iscrowd": torch.cat([torch.zeros(len(labels), dtype=torch.long), torch.ones(crowds, dtype=torch.long)])}
