"""Object detection: COCO data, torchvision's detectors, their analysis and COCO mAP.

The pipeline's stages call into these modules where a detector differs from a classifier;
everything else (adjust, the training loop, checkpoints, telemetry) is shared.
"""
