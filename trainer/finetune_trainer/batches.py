"""From a split to padded batches: tokenize once, order with a seed, pad each batch to its
longest sample (dynamic padding), optionally grouping samples of similar length first.

The order of an epoch is a pure function of (seed, epoch, rank, world size), so a resumed
run rebuilds it and skips the batches it already consumed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from finetune_trainer.config import Augmentation, Task
from finetune_trainer.data import (FLOAT_IMAGE, WIDE_IMAGE, Split, beyond_16_bits, decode_errors, draft, image_fault,
                                   int_range, open_image)
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.torchrun import local_world_size

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions a causal LM is not scored on (padding)
BUCKET_BATCHES = 50  # batches per length-sorted pool: enough to sort out padding, small enough to keep it random
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's pretrained weights expect these statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]  # as numpy broadcasts them over (N, 3, H, W)
STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
MAX_LOADER_THREADS = 8  # 2,400-3,000 photos a second, uncropped, at 300-375 a core (bench/loader.py)


@dataclass(frozen=True)
class View:
    """How a training image is shown in one epoch: mirrored or not, and the seed that draws the part of it shown
    (None: the whole), drawn once the image's size is known."""

    flip: bool = False
    crop: int | None = None


@dataclass(frozen=True)
class Augmenting:
    """`dataset.augment` for the training split: each row's view is drawn from (seed, epoch, row) alone, so the
    ranks, the loader's threads and a resumed run draw it alike."""

    kinds: tuple[Augmentation, ...]
    seed: int
    epoch: int = 0

    def views(self, idx: list[int]) -> list[View]:
        draws = [random.Random(f"augment:{self.seed}:{self.epoch}:{i}") for i in idx]
        return [View(flip=Augmentation.HORIZONTAL_FLIP in self.kinds and rng.random() < 0.5,
                     crop=rng.getrandbits(64) if Augmentation.RANDOM_RESIZED_CROP in self.kinds else None)
                for rng in draws]


@dataclass
class Encoded:
    """One side of the split, ready to batch: token ids (text) or file paths (images)."""

    features: list[list[int]] | list[str]
    labels: list[int] | None
    lengths: list[int]  # tokens per sample; 1 for images
    truncated: int = 0  # a classifier's texts longer than max_length, cut to it
    segments: list[list[int]] | None = None  # each row's token type ids (a pair's first text 0, its second 1)
    augmenting: Augmenting | None = None  # the training split's images, with dataset.augment


DIGEST_ROWS = 1000


def digest(*splits: Encoded) -> str:
    """Which data these are, for resuming: each split's rows' lengths and labels, and the inputs of up to DIGEST_ROWS
    of its rows, evenly spread (all of a small split's), so that a large corpus costs a fraction of a second. A text
    dataset or tokenizer edited or replaced at the same path changes it; an image's inputs are its path (and a
    detection's, its boxes), so an image file replaced under its own name does not."""
    hashed = hashlib.sha256()
    for split in splits:
        every = max(1, len(split.lengths) // DIGEST_ROWS)
        # default=repr: a detection split's inputs are records (an image's path and boxes), whose repr says all
        hashed.update(json.dumps([split.lengths, split.labels, split.features[::every]], default=repr).encode())
    return hashed.hexdigest()[:16]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the model's forward
    labels: torch.Tensor
    samples: int
    tokens: int  # real, unpadded tokens (images have none)
    targets: int  # terms in the loss: samples for classifiers, scored tokens for causal LMs

    @property
    def padded_tokens(self) -> int:
        """Token positions the model computes, padding included: what a step's FLOPs grow with (images have none)."""
        ids = self.inputs.get("input_ids")
        return 0 if ids is None else ids.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device),
                     self.samples, self.tokens, self.targets)


def encode_text(split: Split, tokenizer, max_length: int) -> Encoded:
    """Texts for a classifier, truncated to max_length tokens, counting those that lost their end. Pairs of texts
    are encoded as the tokenizer pairs them (BERT's [CLS] a [SEP] b [SEP], with segment ids), the second led by a
    marker where the tokenizer marks no boundary (`paired`), and cut from the longer text first
    (truncation="longest_first")."""
    texts = paired(split.inputs, tokenizer)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    full = [texts[i] for i, row in enumerate(ids) if len(row) == max_length]  # only these may be cut
    # One token more tells a cut text: a document tokenized whole is work wasted, and transformers' false alarm
    # that running it through the model will fail
    longer = tokenizer(full, truncation=True, max_length=max_length + 1)["input_ids"] if full else []
    segments = encoded.get("token_type_ids") if texts and isinstance(texts[0], tuple) else None
    return Encoded(ids, split.labels, [len(x) for x in ids], sum(len(row) > max_length for row in longer), segments)


def paired(inputs: list[str] | list[tuple[str, str]], tokenizer) -> list[str] | list[tuple[str, str]]:
    """The inputs as the tokenizer is given them: texts, or pairs, each second text led by the pair_marker where
    there is one. Still a pair, not one text joined: one text is cut from its end, and a long first text took the
    marker and the whole second text with it."""
    if not inputs or isinstance(inputs[0], str) or (marker := pair_marker(tokenizer)) is None:
        return inputs
    return [(first, f"{marker}{second}") for first, second in inputs]


def pair_marker(tokenizer) -> str | None:
    """None where the tokenizer puts a special token between a pair's texts (BERT's [SEP], RoBERTa's </s></s>,
    Llama's second <s>: it adds more to a pair than to one text), else the token to put between them, its sep or else
    its eos. One that adds none (GPT-2's, Qwen's) would run the two together, the second's start not told from the
    first's end."""
    if tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False):
        return None
    if (marker := tokenizer.sep_token or tokenizer.eos_token) is None:
        raise ConfigError("dataset.textPairField: the tokenizer marks no boundary between a pair's two texts and has "
                          "no sep or eos token to mark it with; join the texts into one column (textField)")
    return marker


def say_truncated(splits: Sequence[Encoded], max_length: int) -> None:
    """How many texts dataset.maxLength cut, in one line for the run: a warning where over a quarter of them were,
    as then it likely cuts off what the labels are about (the bundled examples cut about a tenth, by design)."""
    cut, total = sum(e.truncated for e in splits), sum(len(e.lengths) for e in splits)
    if cut:
        log.log(logging.WARNING if cut > total / 4 else logging.INFO,
                "%d of %d texts are longer than dataset.maxLength (%d tokens): truncated to it", cut, total, max_length)


def encode_causal(split: Split, tokenizer, max_length: int) -> Encoded:
    """Texts for a causal LM: each ends with the eos token, so the model learns where a text stops, and a text
    longer than max_length is cut into chunks, not truncated. Chunks overlap by one token, so every token after
    a text's first is a target exactly once (the first token of a chunk is the context of its second)."""
    eos = tokenizer.eos_token_id
    chunks = []
    # verbose=False: tokenized whole to be chunked, a document over the model's limit is no error, which transformers
    # says it will be ("Token indices sequence length is longer ...")
    for row in tokenizer(split.inputs, verbose=False)["input_ids"]:
        if eos is not None and row[-1:] != [eos]:
            row = [*row, eos]
        chunks += [row[i:i + max_length] for i in range(0, max(len(row) - 1, 1), max_length - 1)]
    return Encoded(chunks, None, [len(c) for c in chunks])


def encode_images(split: Split, augmenting: Augmenting | None = None) -> Encoded:
    return Encoded(split.inputs, split.labels, [1] * len(split.inputs), augmenting=augmenting)


def make_collate(task: Task, pad_id: int, image_size: int) -> Callable[[Encoded, list[int]], Batch]:
    if task == Task.IMAGE_CLASSIFICATION:
        return lambda data, idx: collate_images(data, idx, image_size)
    if task == Task.OBJECT_DETECTION:
        from finetune_trainer.detection.batches import collate_detection

        return lambda data, idx: collate_detection(data, idx, image_size)
    return lambda data, idx: collate_text(data, idx, pad_id, causal=task == Task.CAUSAL_LM)


def collate_text(data: Encoded, idx: list[int], pad_id: int, causal: bool) -> Batch:
    rows = [data.features[i] for i in idx]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    tokens = int(mask.sum())
    if causal:
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        targets = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the first token of a row is never predicted
    else:
        labels = torch.tensor([data.labels[i] for i in idx])
        targets = len(rows)
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if data.segments is not None:  # padding is of the first segment, as the tokenizer pads
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
        for i, row in enumerate(idx):
            inputs["token_type_ids"][i, : len(data.segments[row])] = torch.tensor(data.segments[row])
    return Batch(inputs, labels, len(rows), tokens, targets)


def collate_images(data: Encoded, idx: list[int], image_size: int) -> Batch:
    labels = torch.tensor([data.labels[i] for i in idx])
    views = data.augmenting.views(idx) if data.augmenting else None
    pixels = pixel_values([data.features[i] for i in idx], image_size, views)
    return Batch({"pixel_values": pixels}, labels, len(idx), 0, len(idx))


def pixel_values(paths: list[str], image_size: int, views: Sequence[View] | None = None) -> torch.Tensor:
    """The image classifier's input for the images at `paths` (`resized`, as shown), normalised with ImageNet's
    statistics. An export's model card calls it too, so that a user feeds the model as it trained."""
    return torch.from_numpy((resized(paths, image_size, as_shown=True, views=views) / np.float32(255) - MEAN) / STD)


# The smallest part random-resized-crop shows is an eighth of the area at aspect 3/4 or 4/3, a quarter of the image's
# side or a little less: decoded at a scale that keeps 4 times image_size, it still has about image_size pixels.
CROP_DECODE = 4


def resized(paths: list[str], image_size: int, as_shown: bool, views: Sequence[View] | None = None) -> np.ndarray:
    """The images at `paths` (`open_rgb`), each as its view shows it (the whole, if None), resized to image_size
    square, (N, 3, image_size, image_size) uint8. Made in numpy, as is what the callers compute from it: in a loader
    thread, each of torch's operators on a batch this size would start a team of its intra-op threads (one per core),
    which contends with the other loader threads and with the loop."""
    shown = []
    for path, view in zip(paths, views or [View()] * len(paths), strict=True):
        image = open_rgb(path, as_shown, decode_side(image_size, view.crop is not None))
        if view.crop is not None:
            image = image.crop(random_resized_box(image.size, random.Random(view.crop)))
        image = image.resize((image_size, image_size), Image.BILINEAR)
        shown.append(np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else image))
    return np.ascontiguousarray(np.stack(shown).transpose(0, 3, 1, 2))


def decode_side(image_size: int, cropped: bool) -> int:
    """The `at_least` of open_rgb for an image shown at `image_size`, whole or (`cropped`) a random-resized-crop's."""
    return image_size * (CROP_DECODE if cropped else 1)


def random_resized_box(size: tuple[int, int], rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The part of an image of `size` that random-resized-crop shows, as (left, top, right, bottom): torchvision's
    RandomResizedCrop.get_params (10 draws of an area and an aspect that fit, else the whole image cut to the nearest
    aspect allowed), drawn from `rng`, where torchvision draws from torch's global generator, which the loader's
    threads share and a resumed run would not replay."""
    width, height = size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def open_rgb(path: str, as_shown: bool = False, at_least: int | None = None) -> Image.Image:
    """The image at `path`, decoded, in RGB; `as_shown` makes it what a viewer shows (and the hub's `datasets` and
    transformers' image processors load): turned as its EXIF orientation says (a phone stores a portrait photo
    sideways and says so there), and its transparency over white, not the colours that transparent pixels hide
    (black in one file, anything in the next). With `at_least`, for an image to be resized to that size square, a
    JPEG is decoded at the smallest scale of 1/2, 1/4 or 1/8 that keeps both its sides twice that long or longer
    (libjpeg scales as it decodes): the resize that follows still smooths, as Pillow's thumbnail leaves it a factor of
    2 (its reducing_gap); left less, a sharp photo's pixels moved by up to 4 levels of 255 on average and 60 at most.
    A file that does not decode (an HTML page saved as .jpg, an upload cut short, a decompression bomb by the pixels
    decoded: data.draft) is the dataset's fault (data.image_fault); what follows its decoding is not."""
    image, file_format = decoded(path, as_shown, at_least)
    if image.mode == "F":  # a backstop: the datasets' images are checked before training (bad_images)
        raise DataError(f"{path}: {FLOAT_IMAGE}")
    values = int_range(image)  # its pixels read once, for both
    if beyond_16_bits(values):  # a backstop too
        raise DataError(f"{path}: {WIDE_IMAGE}")
    # 16-bit grey: convert() would clip it at 255, nearly all white. A 16-bit PGM opens as mode I, scaled to
    # 0..65535; a TIFF of 32-bit integers (mode I) holds 8-bit values or 16-bit ones, told by its range
    if image.mode.startswith("I;16") or (values is not None and (file_format == "PPM" or values[1] > 255)):
        return Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8)).convert("RGB")
    if as_shown and ("A" in image.getbands() or "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decoded(path: str, as_shown: bool, at_least: int | None) -> tuple[Image.Image, str | None]:
    """The image at `path` with its pixels read (open_rgb's), and its file's format; Pillow's errors here are the
    file's, named with its path."""
    try:
        with open_image(path) as opened:
            draft(opened, at_least)
            turned = as_shown and opened.getexif().get(ExifTags.Base.Orientation, 1) != 1
            image = ImageOps.exif_transpose(opened) if turned else opened
            image.load()
            return image, opened.format
    except FileNotFoundError as exc:  # a path of the dataset's (a table of paths) that names no file
        raise DataError(f"{path}: no such image file") from exc
    except decode_errors() as exc:
        raise DataError(f"{path}: cannot read it as an image ({image_fault(exc)})") from exc


def epoch_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int, bucketed: bool,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches for one epoch: every row of the epoch in one of them, and every rank the same number of
    them (rank_batches), so DDP steps stay in lockstep. The epoch's rows are spread evenly over the ranks' batches;
    where they are too few to give each batch its least (`epoch_rows`), the first few of the shuffled order go twice,
    as DistributedSampler pads: fewer than 2 per worker. Bucketed, each pool of BUCKET_BATCHES batches is sorted by
    length, its bounds a batch's (not in an epoch whose rows repeat: a row sorted beside its copy would make a batch
    of one row twice)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    parts = world_size * rank_batches(len(order), batch_size, world_size)
    if not parts:
        return []
    rows = epoch_rows(len(order), batch_size, world_size)
    order = (order * math.ceil(rows / len(order)))[:rows]
    bounds = [i * rows // parts for i in range(parts + 1)]
    if bucketed and rows == len(lengths):  # a repeated row sorted beside itself would make a batch of one row twice
        for first in range(0, parts, BUCKET_BATCHES):
            lo, hi = bounds[first], bounds[min(first + BUCKET_BATCHES, parts)]
            order[lo:hi] = sorted(order[lo:hi], key=lengths.__getitem__)
    batches = [order[bounds[i]:bounds[i + 1]] for i in range(parts)]
    if bucketed:
        rng.shuffle(batches)  # else every pool would run from short to long samples
    return batches[rank::world_size]


def rank_batches(samples: int, batch_size: int, world_size: int) -> int:
    """The batches each of `world_size` ranks takes an epoch of `samples` rows (0: fewer rows than ranks): the
    batch_count batches of `batch_size` shared out, rounded up, so that no batch holds more than batch_size rows (the
    memory a worker was sized for; one more where batch_count joined a last row) and no row is left out (the last
    batch_count % world_size batches were, up to world_size x batch_size - 1 rows an epoch)."""
    return math.ceil(batch_count(samples, batch_size) / world_size) if samples >= world_size else 0


def epoch_rows(samples: int, batch_size: int, world_size: int) -> int:
    """The rows an epoch's batches hold: `samples`, or as many more (repeated) as give each batch its least, 2 rows
    (batch norm cannot train on one), 1 at batchSize 1 or of a lone sample."""
    least = 1 if batch_size == 1 or samples == 1 else 2
    return max(samples, least * world_size * rank_batches(samples, batch_size, world_size))


def smallest_batch(samples: int, batch_size: int) -> int:
    """The fewest samples a training batch of `epoch_batches` holds, on any number of workers (epoch_rows gives
    every batch 2 rows or more but at batchSize 1 or of a lone sample)."""
    parts = rank_batches(samples, batch_size, 1)
    return epoch_rows(samples, batch_size, 1) // parts if parts else 0


def batch_count(samples: int, batch_size: int) -> int:
    """The batches of `batch_size` that `samples` rows make, a last one of one row joined to the one before: batch
    norm cannot train on a single sample (SSDlite's 1x1 feature maps raise), and one sample makes a noisy step."""
    count = math.ceil(samples / batch_size)
    return count - 1 if batch_size > 1 and count > 1 and samples % batch_size == 1 else count


def eval_batches(lengths: list[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Length-sorted, so evaluation pads little; each rank takes every world_size-th batch."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)][rank::world_size]


def polled_eval_batches(data: Encoded, collate: Callable[[Encoded, list[int]], Batch], batch_size: int, rank: int,
                        world_size: int, before_batch: Callable[[], None], ahead: int
                        ) -> Iterator[tuple[list[int], Batch]]:
    """`eval_batches` and their batches (`collated`), calling `before_batch` before each batch of the rounds where every
    rank has one: as many calls on every rank (the last round may leave some without a batch), so that a collective in
    it pairs up."""
    rounds = math.ceil(len(data.lengths) / batch_size) // world_size
    plan = eval_batches(data.lengths, batch_size, rank, world_size)
    for i, (idx, batch) in enumerate(zip(plan, collated(data, collate, plan, ahead))):
        if i < rounds:
            before_batch()
        yield idx, batch


def collated(data: Encoded, collate: Callable[[Encoded, list[int]], Batch], plan: Sequence[list[int]],
             ahead: int) -> Iterator[Batch]:
    """collate(data, idx) for each idx of `plan`, in order. With `ahead`, that many batches are made by as many threads
    while the caller trains or scores on the one before (Pillow decodes and resizes with the GIL released): made in
    line, an image batch left a GPU idle most of each step. A batch that cannot be made raises when it is taken, as in
    line; closing the iterator drops the batches not yet begun."""
    if not ahead:
        yield from (collate(data, idx) for idx in plan)
        return
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="collate")
    todo = iter(plan)
    pending = deque(pool.submit(collate, data, idx) for idx in itertools.islice(todo, ahead))
    try:
        while pending:
            batch = pending.popleft().result()
            if (idx := next(todo, None)) is not None:
                pending.append(pool.submit(collate, data, idx))
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def loader_threads(task: Task, device: torch.device) -> int:
    """Batches `collated` makes ahead for `task` on `device`. None for text, whose batch takes ~1 ms to make and whose
    thread would only contend with the loop for the GIL; none on a CPU either, whose cores the model's operators
    already use (a resnet18 trained 10% slower with one thread decoding ahead on 2 cores, 20% with two). For images on
    a GPU, one per CPU this process may use (its affinity, capped by a cgroup v2 quota, which is how a container's CPU
    limit shows), shared with torchrun's other processes on the node (LOCAL_WORLD_SIZE: a pod of 8 GPUs and 16 CPUs
    took 64 threads), at least one and at most MAX_LOADER_THREADS."""
    if device.type == "cpu" or task not in (Task.IMAGE_CLASSIFICATION, Task.OBJECT_DETECTION):
        return 0
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # cgroup v1, or none
        pass
    cpus //= max(1, local_world_size())
    return max(1, min(cpus, MAX_LOADER_THREADS))
