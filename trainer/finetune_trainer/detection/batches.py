"""Detection batches: images resized to image_size x image_size (their boxes scaled with them), 0..1
pixels (torchvision's detectors normalise inside), boxes and labels padded to the batch's most boxes."""

from __future__ import annotations

import torch
from PIL import Image

from finetune_trainer.batches import Batch, Encoded, open_rgb
from finetune_trainer.detection.coco import Annotated

PAD_LABEL = -1


def collate_detection(data: Encoded, idx: list[int], image_size: int) -> Batch:
    from torchvision.transforms import functional as F

    records = [data.features[i] for i in idx]
    most = max(1, max(len(r.boxes) for r in records))
    pixels = torch.empty((len(records), 3, image_size, image_size))
    boxes = torch.zeros((len(records), most, 4))
    labels = torch.full((len(records), most), PAD_LABEL, dtype=torch.long)
    for i, record in enumerate(records):
        resized = open_rgb(record.path).resize((image_size, image_size), Image.BILINEAR)
        pixels[i] = F.pil_to_tensor(resized).float() / 255
        if record.boxes:
            boxes[i, : len(record.boxes)] = scaled_boxes(record, record.boxes, image_size)
            labels[i, : len(record.labels)] = torch.tensor(record.labels)
    n = len(records)
    return Batch({"pixel_values": pixels, "boxes": boxes, "box_labels": labels}, labels, n, n, n)


def scaled_boxes(record: Annotated, boxes: list[list[float]], image_size: int) -> torch.Tensor:
    """The record's `boxes` (N, 4) in pixels of its image resized to image_size x image_size."""
    scale = torch.tensor([image_size / record.width, image_size / record.height] * 2)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
