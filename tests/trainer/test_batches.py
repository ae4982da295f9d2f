"""Tokenizing texts for training: what a classifier's truncation costs is said."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_trainer.batches import (IMAGENET_MEAN, IMAGENET_STD, Batch, Encoded, collate_images, collated,
                                      encode_images, encode_text, loader_threads, make_collate, open_rgb)
from finetune_trainer.config import Metric, ModelSpec, Task, TrainerConfig, TrainingSpec
from finetune_trainer.data import LabelledData, Split, cap_jpeg_memory
from finetune_trainer.distributed import World
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.models import load_tokenizer
from finetune_trainer.pipeline import encode
from tiny import bpe_tokenizer


def test_texts_a_classifier_truncates_are_counted(pvc_root: Path) -> None:
    """Longer texts lost their end with no word: a maxLength that cut off what the labels are about went unseen."""
    tokenizer = load_tokenizer(ModelSpec(uri="pvc://models/all-MiniLM-L6-v2", task="sequence-classification"))
    short, exact = "a fine day", "one two three four five six"  # exact: 6 words and [CLS], [SEP]: 8 tokens
    data = encode_text(Split([short, exact, "word " * 50, "more words " * 40], [0, 1, 0, 1]), tokenizer, 8)
    assert max(data.lengths) == 8 and len(tokenizer(exact)["input_ids"]) == 8
    assert data.truncated == 2


def test_a_pair_is_encoded_as_the_tokenizer_pairs_texts_with_segment_ids_in_its_batches(pvc_root: Path) -> None:
    """BERT's pair: [CLS] first [SEP] second [SEP], the second's tokens of segment 1, cut from the longer text; the
    batch pads the segment ids with 0 as the tokenizer does."""
    tokenizer = load_tokenizer(ModelSpec(uri="pvc://models/all-MiniLM-L6-v2", task="sequence-classification"))
    pairs = [("a man sleeps", "a person rests"), ("word " * 50, "a fine day")]
    data = encode_text(Split(pairs, [0, 1]), tokenizer, 12)
    assert data.features[0] == tokenizer("a man sleeps", "a person rests")["input_ids"]
    assert tokenizer.decode(data.features[0]) == "[CLS] a man sleeps [SEP] a person rests [SEP]"
    assert tokenizer.decode(data.features[1]).endswith("[SEP] a fine day [SEP]")  # the long first text cut
    assert data.truncated == 1
    batch = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0)(data, [1, 0])
    assert batch.inputs["token_type_ids"].tolist() == [[0] * 8 + [1] * 4, [0] * 5 + [1] * 4 + [0] * 3]
    assert batch.inputs["attention_mask"].tolist()[1] == [1] * 9 + [0] * 3
    assert "token_type_ids" not in make_collate(Task.SEQUENCE_CLASSIFICATION, 0, 0)(
        encode_text(Split(["a man sleeps"], [0]), tokenizer, 12), [0]).inputs  # one text: as before


def test_a_pairs_second_text_is_led_by_the_eos_where_the_tokenizer_marks_no_boundary(tmp_path: Path) -> None:
    """GPT-2's tokenizer (as Qwen's) adds no special token to a pair: its two texts ran together, the second's first
    word read as the first's last word's continuation."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer(tmp_path / "bpe", eos="<|endoftext|>"))
    assert tokenizer("a fine", "day")["input_ids"] == tokenizer("a fineday")["input_ids"]  # run together
    data = encode_text(Split([("a fine", "day")], [0]), tokenizer, 16)
    eos = tokenizer.eos_token_id
    assert data.features == [[*tokenizer("a fine")["input_ids"], eos, *tokenizer("day")["input_ids"]]]
    assert data.segments is None
    # A long first text is cut, not the second: one text joined was cut from its end, the marker and the second with it
    long = encode_text(Split([("a fine " * 20, "this is awful")], [0]), tokenizer, 16)
    assert long.truncated == 1 and len(long.features[0]) == 16
    assert long.features[0][-len(tokenizer("this is awful")["input_ids"]) - 1:] == [eos, *tokenizer("this is awful")[
        "input_ids"]]
    bare = PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer(tmp_path / "bare", eos=None))
    with pytest.raises(ConfigError, match=r"dataset.textPairField: the tokenizer marks no boundary between a pair's "
                                          r"two texts and has no sep or eos token"):
        encode_text(Split([("a fine", "day")], [0]), bare, 16)


def test_truncation_is_said_once_a_run_on_the_main_rank(tiny_cfg: TrainerConfig,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A warning a split and a rank (3 lines a run of the bundled examples, 6 with 2 workers, for a cut they make by
    design), and a document over the model's limit tokenized whole: transformers' false alarm of indexing errors."""
    tokenizer = load_tokenizer(tiny_cfg.model)
    short, document = "a fine day", "word " * 1000  # the document: over MiniLM's 512 tokens
    caplog.set_level(logging.INFO)
    transformers_log = logging.getLogger("transformers")  # which does not propagate to the root's handlers
    transformers_log.addHandler(caplog.handler)
    try:
        def said(texts: list[str], main: bool = True) -> list[logging.LogRecord]:
            caplog.clear()
            data = LabelledData(Split(texts, [0] * len(texts)), Split([short] * 2, [0, 0]), Split([short], [0]), {0: "a"})
            encode(data, tokenizer, tiny_cfg, main)
            return caplog.records

        records = said([document, short, short, short, short])
        assert [(r.levelno, r.getMessage()) for r in records] == [
            (logging.INFO, f"1 of 8 texts are longer than dataset.maxLength ({tiny_cfg.dataset.max_length} tokens): "
                           "truncated to it")]
        assert said([document] * 3 + [short])[0].levelno == logging.WARNING  # 3 of 7: over a quarter
        assert said([document, short], main=False) == []
    finally:
        transformers_log.removeHandler(caplog.handler)


GPU = torch.device("cuda")  # a device, not a use of one: which loader a loop on it gets


def photos(folder: Path, count: int) -> list[str]:
    """JPEG crops of the two photos scikit-learn ships, as a camera's files would be: each its own, 120x90."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    paths = []
    for i, pixels in zip(range(count), itertools.cycle(load_sample_images().images)):
        path = folder / f"{i}.jpg"
        cut = Image.fromarray(pixels).crop((i * 7, i * 5, i * 7 + 360, i * 5 + 270))
        cut.resize((120, 90)).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_a_causal_split_with_no_token_to_predict_is_refused(tiny_cfg: TrainerConfig) -> None:
    """One-token texts and a tokenizer that appends no end-of-text token: no split had a target, and the run
    reported a test loss of 0 and a perplexity of 1 (evaluate's 0 / max(0, 1)), exit 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert tokenizer.eos_token_id is None and tokenizer("a")["input_ids"] == [1]
    wire = tiny_cfg.to_wire()
    cfg = TrainerConfig.model_validate(wire | {"model": wire["model"] | {"task": "causal-lm", "architecture": "gpt2"}})
    fine = Split(["a b", "c a b"], None)
    with pytest.raises(DataError, match=r"no text of the training split has a token to predict: each is one token long "
                                        r"and the tokenizer appends no end-of-text token"):
        encode(LabelledData(Split(["a", "b", "c"], None), fine, fine, {}), tokenizer, cfg, True)
    assert [e.lengths for e in encode(LabelledData(Split(["a", "b c"], None), fine, fine, {}), tokenizer, cfg, True)
            ] == [[1, 2], [2, 3], [2, 3]]  # one text with a target is enough


def test_the_processes_of_a_node_share_its_cpus_for_their_loader_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's LOCAL_WORLD_SIZE processes (one per GPU) each made batches with a thread per CPU of the pod."""
    try:
        if Path("/sys/fs/cgroup/cpu.max").read_text().split()[0] != "max":
            pytest.skip("a cgroup CPU quota caps the count here")
    except OSError:
        pass
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # a 16-CPU pod
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_threads(Task.IMAGE_CLASSIFICATION, GPU) == 8  # at most MAX_LOADER_THREADS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_threads(Task.IMAGE_CLASSIFICATION, GPU) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert loader_threads(Task.IMAGE_CLASSIFICATION, GPU) == 1  # never none: a GPU's batches are still made ahead


def test_image_batches_are_made_ahead_by_threads_the_same_and_in_order(tmp_path: Path) -> None:
    data = encode_images(Split(photos(tmp_path, 10), list(range(10))))
    plan = [[3, 1], [0, 9, 4], [2], [8, 7, 6, 5]]
    makers: list[str] = []

    def collate(data: Encoded, idx: list[int]) -> Batch:
        makers.append(threading.current_thread().name)
        return collate_images(data, idx, 32)

    ahead = list(collated(data, collate, plan, loader_threads(Task.IMAGE_CLASSIFICATION, GPU)))
    assert len(makers) == 4 and all(name.startswith("collate") for name in makers)
    for batch, idx in zip(ahead, plan, strict=True):
        in_line = collate_images(data, idx, 32)
        assert torch.equal(batch.inputs["pixel_values"], in_line.inputs["pixel_values"])
        assert batch.labels.tolist() == idx
    assert loader_threads(Task.SEQUENCE_CLASSIFICATION, GPU) == 0  # a text batch is made in line
    assert loader_threads(Task.IMAGE_CLASSIFICATION, torch.device("cpu")) == 0  # the model's operators use the cores


def test_a_loop_fed_ahead_trains_and_scores_as_one_fed_in_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop and the evaluation of a GPU, where batches are made ahead, on the CPU: the same steps, over an epoch's
    end (where the epoch's batches are dropped and the next epoch's begun), and the same scores."""
    import torchvision

    from finetune_trainer import evaluate, train
    from finetune_trainer.models import ImageClassifier

    data = encode_images(Split(photos(tmp_path, 12), [i % 2 for i in range(12)]))
    collate = make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)
    world = World(rank=0, size=1, device=torch.device("cpu"))

    def run() -> tuple[list[float], dict[str, float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = ImageClassifier(torchvision.models.resnet18(num_classes=2), "resnet18")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        spec = TrainingSpec(max_steps=5, batch_size=4, gradient_accumulation=2, precision="fp32", seed=0)
        state = train.train_loop(model, optimizer, scheduler, data, collate, spec, Task.IMAGE_CLASSIFICATION, world)
        scores = evaluate.evaluate(model, data, collate, Task.IMAGE_CLASSIFICATION, [Metric.ACCURACY, Metric.LOSS], 5,
                                   world, 2)
        return [h["loss"] for h in state.history], scores, model.state_dict()

    losses, scores, weights = run()
    ahead = lambda task, device: 3  # noqa: E731
    monkeypatch.setattr(train, "loader_threads", ahead)
    monkeypatch.setattr(evaluate, "loader_threads", ahead)
    threads = threading.active_count()
    fed_ahead = run()
    assert fed_ahead[:2] == (losses, scores) and len(losses) == 5
    assert all(torch.equal(weights[k], v) for k, v in fed_ahead[2].items())
    deadline = time.monotonic() + 30
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() == threads  # no loader thread outlives its epoch or its evaluation


def test_a_batch_that_cannot_be_made_raises_when_its_turn_comes(tmp_path: Path) -> None:
    paths = photos(tmp_path, 4)
    Path(paths[2]).write_bytes(Path(paths[2]).read_bytes()[:400])  # an upload cut short: its header still reads
    batches = collated(encode_images(Split(paths, [0, 1, 2, 3])),
                       lambda data, idx: collate_images(data, idx, 32), [[0], [1], [2], [3]], 3)
    assert [next(batches).labels.tolist() for _ in range(2)] == [[0], [1]]
    with pytest.raises(DataError, match=rf"{paths[2]}: cannot read it as an image"):
        next(batches)


def test_closing_the_batches_makes_no_further_batch() -> None:
    made: list[int] = []

    def collate(data: Encoded, idx: list[int]) -> Batch:
        time.sleep(0.05)
        made.append(idx[0])
        return Batch({}, torch.tensor(idx), 1, 0, 1)

    with contextlib.closing(collated(Encoded([], None, []), collate, [[i] for i in range(20)], 2)) as batches:
        assert next(batches).labels.tolist() == [0]
    time.sleep(1)  # what was begun ends
    assert set(made) <= {0, 1, 2}  # the first, and the two made ahead of it


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_nearly_the_same_input(tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import functional as F

    from finetune_trainer.batches import open_rgb, pixel_values
    from finetune_trainer.detection.batches import squashed

    path = tmp_path / "photo.jpg"
    Image.fromarray(load_sample_images().images[0]).resize((1280, 854), Image.BICUBIC).save(path, quality=90)
    assert open_rgb(str(path), at_least=224).size == (1280, 854)  # a half would leave 427 rows, under twice 224
    assert open_rgb(str(path), at_least=100).size == (320, 214)  # a quarter: an eighth would leave 107, under 200
    assert open_rgb(str(path), at_least=50).size == (160, 107)  # an eighth
    pixels, size = squashed(str(path), 100)
    assert size == (1280, 854) and pixels.shape == (3, 100, 100)  # the detector's boxes come back in the photo's pixels
    # a sharp photo (the china one as shipped, 640x427), decoded at half its size for 100 pixels: its input moves by
    # 1.65 levels of 255 on average (more when the reduction left the resize less than a factor of 2)
    Image.fromarray(load_sample_images().images[0]).save(sharp := tmp_path / "sharp.jpg", quality=90)
    whole = F.pil_to_tensor(open_rgb(str(sharp), as_shown=True).resize((100, 100), Image.BILINEAR)).float()
    drafted = pixel_values([str(sharp)], 100)[0] * torch.tensor(IMAGENET_STD)[:, None, None]
    drafted = (drafted + torch.tensor(IMAGENET_MEAN)[:, None, None]) * 255
    assert open_rgb(str(sharp), at_least=100).size == (320, 214) and (drafted - whole).abs().mean() < 2


def test_augmented_views_are_drawn_from_seed_epoch_and_row_alone() -> None:
    from finetune_trainer.batches import Augmenting
    from finetune_trainer.config import Augmentation

    both = Augmenting((Augmentation.HORIZONTAL_FLIP, Augmentation.RANDOM_RESIZED_CROP), seed=3)
    rows = list(range(200))
    views = both.views(rows)
    assert views == both.views(rows) and views[50:60] == both.views(rows[50:60])  # however the rows are batched
    assert 70 < sum(v.flip for v in views) < 130 and len({v.crop for v in views}) == 200
    again = [dataclasses.replace(both, epoch=1).views(rows), dataclasses.replace(both, seed=4).views(rows)]
    assert all(sum(a != b for a, b in zip(views, other)) > 150 for other in again)
    flips = Augmenting((Augmentation.HORIZONTAL_FLIP,), seed=3).views(rows)
    assert all(v.crop is None for v in flips) and sum(v.flip for v in flips) > 70


def test_a_view_mirrors_the_image_and_crops_a_part_of_it_as_torchvision_would(tmp_path: Path) -> None:
    import random

    from finetune_trainer.batches import View, random_resized_box, resized

    paths = photos(tmp_path, 2)
    whole = resized(paths, 32, as_shown=True)
    assert np.array_equal(resized(paths, 32, True, [View(flip=True), View()]),
                          np.stack([whole[0, :, :, ::-1], whole[1]]))
    cropped = resized(paths, 32, True, [View(crop=7), View(crop=8)])
    assert cropped.shape == whole.shape and not np.array_equal(cropped, whole)
    rng = random.Random(0)
    # as torchvision draws them: the area uniform in 8-100%, the aspect uniform in log space
    from torchvision.transforms import RandomResizedCrop

    def shape(box: tuple[int, int, int, int]) -> tuple[float, float]:
        return (box[2] - box[0]) * (box[3] - box[1]) / (640 * 427), math.log((box[2] - box[0]) / (box[3] - box[1]))

    torch.manual_seed(0)
    theirs = [shape((j, i, j + w, i + h)) for i, j, h, w in (
        RandomResizedCrop.get_params(torch.empty(3, 427, 640), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000))]
    ours = [shape(random_resized_box((640, 427), rng)) for _ in range(4000)]
    for k, within in ((0, 0.02), (1, 0.01)):  # about 3 and 5 standard errors of the difference of 4,000 draws
        assert abs(np.mean([o[k] for o in ours]) - np.mean([t[k] for t in theirs])) < within
        assert abs(np.std([o[k] for o in ours]) - np.std([t[k] for t in theirs])) < within
    for size in [(640, 427), (120, 90), (1000, 10), (10, 1000)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_box(size, rng)
            assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
            if size == (640, 427):  # torchvision's bounds: 8-100% of the area, aspect 3/4 to 4/3 (as rounded)
                area, aspect = (right - left) * (bottom - top) / (640 * 427), (right - left) / (bottom - top)
                assert 0.079 <= area <= 1 and 0.74 <= aspect <= 1.36


def test_only_the_training_split_is_augmented(tiny_cfg: TrainerConfig, tmp_path: Path) -> None:
    from finetune_trainer.pipeline import encode

    (images := tmp_path / "images").mkdir()  # beside the output (tiny_cfg's tmp_path/out), not around it
    cfg = TrainerConfig.from_wire(tiny_cfg.to_wire() | {
        "model": {"task": "image-classification", "architecture": "resnet18"},
        "dataset": {"uri": str(images), "augment": ["horizontal-flip"]}})
    split = Split(photos(images, 3), [0, 1, 0])
    train, validation, test = encode(LabelledData(split, split, split, {0: "a", 1: "b"}), None, cfg, True)
    assert train.augmenting is not None and train.augmenting.seed == cfg.training.seed
    assert validation.augmenting is None and test.augmenting is None


def test_a_detectors_flipped_image_carries_its_boxes_mirrored(pvc_root: Path) -> None:
    from finetune_trainer.batches import Augmenting
    from finetune_trainer.config import Augmentation, DatasetSpec
    from finetune_trainer.detection.batches import collate_detection
    from finetune_trainer.detection.coco import load_coco

    data = encode_images(load_coco(DatasetSpec(uri="pvc://data/shapes", format="coco"), seed=0).train)
    plain = collate_detection(data, [0, 1, 2, 3], 64)
    flips = Augmenting((Augmentation.HORIZONTAL_FLIP,), seed=0)
    epoch = next(e for e in range(50) if [v.flip for v in dataclasses.replace(flips, epoch=e).views([0, 1, 2, 3])]
                 == [True, False, True, False])
    drawn = collate_detection(dataclasses.replace(data, augmenting=dataclasses.replace(flips, epoch=epoch)),
                              [0, 1, 2, 3], 64)
    pixels, boxes = drawn.inputs["pixel_values"], drawn.inputs["boxes"]
    assert torch.equal(pixels[[1, 3]], plain.inputs["pixel_values"][[1, 3]])
    assert torch.equal(pixels[[0, 2]], plain.inputs["pixel_values"][[0, 2]].flip(-1))
    assert torch.equal(boxes[[1, 3]], plain.inputs["boxes"][[1, 3]])
    for i in (0, 2):
        real = drawn.inputs["box_labels"][i] >= 0
        x0, y0, x1, y1 = plain.inputs["boxes"][i][real].unbind(-1)
        assert torch.allclose(boxes[i][real], torch.stack([64 - x1, y0, 64 - x0, y1], -1))
        # where a shape was drawn, it is drawn now: its box's pixels, mirrored, are the plain box's pixels
        for (a0, b0, a1, b1) in boxes[i][real].round().int().tolist():
            here = pixels[i][:, b0:b1, a0:a1]
            there = plain.inputs["pixel_values"][i][:, b0:b1, 64 - a1:64 - a0].flip(-1)
            assert torch.equal(here, there)


def test_an_augmented_run_resumed_mid_epoch_draws_as_one_that_was_not(tmp_path: Path) -> None:
    """The loop draws each epoch's views (the epoch it is in, restored by a resume), not epoch 0's again."""
    import torchvision

    from finetune_trainer import train
    from finetune_trainer.batches import Augmenting
    from finetune_trainer.config import Augmentation
    from finetune_trainer.models import ImageClassifier

    kinds = (Augmentation.HORIZONTAL_FLIP, Augmentation.RANDOM_RESIZED_CROP)
    data = encode_images(Split(photos(tmp_path, 12), [i % 2 for i in range(12)]), Augmenting(kinds, seed=0))
    collate = make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)
    drawn: list[int] = []

    def recorded(data: Encoded, idx: list[int]) -> Batch:
        drawn.append(data.augmenting.epoch)
        return collate(data, idx)

    def run(steps: int, folder: Path | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = ImageClassifier(torchvision.models.resnet18(num_classes=2), "resnet18")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        spec = TrainingSpec(max_steps=steps, batch_size=4, precision="fp32", seed=0)
        train.train_loop(model, optimizer, scheduler, data, recorded, spec, Task.IMAGE_CLASSIFICATION,
                         World(rank=0, size=1, device=torch.device("cpu")), train.Hooks(checkpoint_dir=folder))
        return model.state_dict()

    straight = run(7, None)
    assert drawn == [0, 0, 0, 1, 1, 1, 2]  # 3 batches an epoch
    run(4, tmp_path / "checkpoints")
    drawn.clear()
    resumed = run(7, tmp_path / "checkpoints")
    assert drawn == [1, 1, 2]
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())


def big_photos(folder: Path) -> None:
    """An ImageFolder of two classes, three 400x300 JPEGs each: 'huge' where a test sets Pillow's limit low."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for i, pixels in enumerate(load_sample_images().images):
        (folder / f"class{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(pixels).crop((j * 9, j * 7, j * 9 + 400, j * 7 + 300)).save(folder / f"class{i}/{j}.jpg")


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_a_jpeg_past_pils_size_limit_trains_as_the_pixels_it_decodes_fit_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200-megapixel phone photo (16320x12240) is past twice Pillow's limit, refused at Image.open as a
    decompression bomb although it decodes at 1/8 (3 megapixels) for 224 pixels. At this limit the 400x300 photos
    stand for it: at imageSize 16 each decodes in 50x38 pixels, under twice 1,000; with random-resized-crop, which
    decodes 4 times as many a side, in 200x150, over it: refused before training, naming the files."""
    from PIL import Image

    from finetune_trainer import pipeline

    big_photos(data := tmp_path / "photos")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": str(data), "imageSize": 16, "validationSplit": 0.2, "testSplit": 0.2},
           "analyze": {"probeBatches": 1}, "evaluation": {"baseline": False},
           "training": {"maxSteps": 1, "batchSize": 2}, "output": {"uri": str(tmp_path / "out")}}
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    doc["dataset"]["augment"] = ["random-resized-crop"]
    with pytest.raises(DataError, match=rf"dataset {data}: 6 of its 6 image files do not open as images: .*"
                                        rf"{data}/class0/0.jpg.* \(the first: DecompressionBombError: Image size "
                                        r"\(400x300, 200x150 decoded at a reduced scale: 30000 pixels\) exceeds limit "
                                        r"of 2000 pixels"):
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "cropped")


def test_a_jpeg_is_not_warned_of_as_a_bomb_by_the_pixels_it_does_not_decode(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns of an image past its limit (but under twice it) at Image.open: every photo over 89 megapixels
    logged a DecompressionBombWarning, though it decodes at 1/8 for 224 pixels. A PNG, which decodes whole, still
    warns."""
    from PIL import Image

    from finetune_trainer.batches import open_rgb

    path = photos(tmp_path, 1)[0]  # 120x90: 10,800 pixels
    Image.open(path).save(png := tmp_path / "photo.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_rgb(path, at_least=8).size == (30, 23)  # a quarter
    assert not caught
    with pytest.warns(Image.DecompressionBombWarning):
        open_rgb(str(png), at_least=8)


def multiscan_jpeg(path: Path, width: int, height: int) -> Path:
    """A baseline JPEG of three components, each in a scan of its own, all coefficients zero (a few bytes a block):
    libjpeg keeps its whole image to decode it, and Pillow does not say so (no "progressive")."""
    import struct

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
    out += segment(0xC0, struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00")
    for table in (b"\x00", b"\x10"):  # a DC and an AC Huffman table, of one code each
        out += segment(0xC4, table + bytes([1] + [0] * 15) + b"\x00")
    for component in (1, 2, 3):  # a DC "0" and an end of block "0": 2 bits a block
        out += segment(0xDA, bytes([1, component, 0]) + b"\x00\x3f\x00") + bytes((2 * blocks + 7) // 8)
    path.write_bytes(out + b"\xff\xd9")
    return path


def test_libjpegs_whole_image_of_a_jpeg_is_bounded_by_the_pixel_limit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline JPEG in a scan per component is decoded whole by libjpeg whatever the draft (8000x8000: 371 MiB
    for a 1 KB-a-block file), and Pillow does not tell it from an interleaved one: JPEGMEM bounds it, from twice
    Pillow's limit, and past it the file fails as its own fault, named, not the worker's memory."""
    from PIL import Image

    monkeypatch.delenv("JPEGMEM", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 12 MB: 2 x 1M pixels x 3 components x 2 bytes
    cap_jpeg_memory()
    assert os.environ["JPEGMEM"] == "12M"
    path = multiscan_jpeg(tmp_path / "scans.jpg", 1600, 1600)  # 15 MB of coefficients, 2.6 M pixels
    with pytest.raises(DataError, match=rf"{path}: cannot read it as an image \(OSError: "):
        open_rgb(str(path), at_least=16)  # 200x200 decoded: within the pixel limit
    monkeypatch.setenv("JPEGMEM", "100M")  # the user's own is kept
    cap_jpeg_memory()
    assert os.environ["JPEGMEM"] == "100M" and open_rgb(str(path), at_least=16).size == (200, 200)
