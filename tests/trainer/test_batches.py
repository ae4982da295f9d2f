"""Tokenizing texts for training: what a classifier's truncation costs is said."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from finetune_trainer.batches import (IMAGENET_MEAN, IMAGENET_STD, Batch, Encoded, collate_images, collated,
                                      encode_images, encode_text, loader_threads, make_collate)
from finetune_trainer.config import Metric, ModelSpec, Task, TrainerConfig, TrainingSpec
from finetune_trainer.data import LabelledData, Split
from finetune_trainer.distributed import World
from finetune_trainer.errors import DataError
from finetune_trainer.models import load_tokenizer
from finetune_trainer.pipeline import encode


def test_texts_a_classifier_truncates_are_counted(pvc_root: Path) -> None:
    """Longer texts lost their end with no word: a maxLength that cut off what the labels are about went unseen."""
    tokenizer = load_tokenizer(ModelSpec(uri="pvc://models/all-MiniLM-L6-v2", task="sequence-classification"))
    short, exact = "a fine day", "one two three four five six"  # exact: 6 words and [CLS], [SEP]: 8 tokens
    data = encode_text(Split([short, exact, "word " * 50, "more words " * 40], [0, 1, 0, 1]), tokenizer, 8)
    assert max(data.lengths) == 8 and len(tokenizer(exact)["input_ids"]) == 8
    assert data.truncated == 2


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


def test_closing_the_batches_drops_those_not_begun() -> None:
    made: list[int] = []

    def collate(data: Encoded, idx: list[int]) -> Batch:
        time.sleep(0.05)
        made.append(idx[0])
        return Batch({}, torch.tensor(idx), 1, 0, 1)

    with contextlib.closing(collated(Encoded([], None, []), collate, [[i] for i in range(20)], 2)) as batches:
        assert next(batches).labels.tolist() == [0]
    time.sleep(1)  # what was begun ends
    assert made[:1] == [0] and len(made) <= 3  # the first, and the two made ahead of it


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_nearly_the_same_input(tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import functional as F

    from finetune_trainer.batches import open_rgb, pixel_values
    from finetune_trainer.detection.batches import squashed

    path = tmp_path / "photo.jpg"
    Image.fromarray(load_sample_images().images[0]).resize((1280, 854), Image.BICUBIC).save(path, quality=90)
    assert open_rgb(str(path), at_least=224).size == (640, 427)  # a quarter would leave 213 rows, under 224
    assert open_rgb(str(path), at_least=100).size == (160, 107)  # an eighth
    whole = F.pil_to_tensor(open_rgb(str(path), as_shown=True).resize((224, 224), Image.BILINEAR)).float()
    drafted = pixel_values([str(path)], 224)[0] * torch.tensor(IMAGENET_STD)[:, None, None]
    drafted = (drafted + torch.tensor(IMAGENET_MEAN)[:, None, None]) * 255
    assert (drafted - whole).abs().mean() < 1.5
    pixels, size = squashed(str(path), 224)
    assert size == (1280, 854) and pixels.shape == (3, 224, 224)  # the detector's boxes come back in the photo's pixels
