"""Detection batches: images resized to image_size x image_size (their boxes scaled with them), 0..1
pixels (torchvision's detectors normalise inside), boxes and labels padded to the batch's most boxes."""

from __future__ import annotations

import numpy as np
import torch

from finetune_trainer.batches import Batch, Encoded, View, resized
from finetune_trainer.data import open_image
from finetune_trainer.detection.coco import Annotated

PAD_LABEL = -1


def squashed(path: str, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file as training reads it (`squashed_pixels`) and its own (width, height), as stored."""
    pixels = squashed_pixels([path], image_size)[0]  # first: a file that is no image is named as in training
    with open_image(path) as stored:  # its header (nothing decoded: the pixels were read, checked, above)
        return pixels, stored.size


def squashed_pixels(paths: list[str], image_size: int, views: list[View] | None = None) -> torch.Tensor:
    """Image files as training reads them, (N, 3, image_size, image_size) in 0..1 (`resized`). PIL's resize smooths a
    large image before it samples it; torchvision's resize of a tensor does not, so a large photo given to the
    detector whole would be seen aliased, as training never showed it."""
    return torch.from_numpy(resized(paths, image_size, as_shown=False, views=views) / np.float32(255))


def collate_detection(data: Encoded, idx: list[int], image_size: int) -> Batch:
    records = [data.features[i] for i in idx]
    most = max(1, max(len(r.boxes) for r in records))
    views = data.augmenting.views(idx) if data.augmenting else [View()] * len(idx)  # horizontal flips only
    pixels = squashed_pixels([r.path for r in records], image_size, views)
    boxes = torch.zeros((len(records), most, 4))
    labels = torch.full((len(records), most), PAD_LABEL, dtype=torch.long)
    for i, (record, view) in enumerate(zip(records, views)):
        if record.boxes:
            scaled = scaled_boxes(record, record.boxes, image_size)
            boxes[i, : len(record.boxes)] = mirrored(scaled, image_size) if view.flip else scaled
            labels[i, : len(record.labels)] = torch.tensor(record.labels)
    n = len(records)
    return Batch({"pixel_values": pixels, "boxes": boxes, "box_labels": labels}, labels, n, 0, n)


def scaled_boxes(record: Annotated, boxes: list[list[float]], image_size: int) -> torch.Tensor:
    """The record's `boxes` (N, 4) in pixels of its image resized to image_size x image_size."""
    scale = torch.tensor([image_size / record.width, image_size / record.height] * 2)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


def mirrored(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes (N, 4) [x0, y0, x1, y1] as they lie in their image mirrored left to right: x0 becomes width - x1."""
    return boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([width, 0.0, width, 0.0])
