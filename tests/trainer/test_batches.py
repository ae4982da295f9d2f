"""Tokenizing texts for training: what a classifier's truncation costs is said."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune_trainer.batches import encode_text
from finetune_trainer.config import ModelSpec, TrainerConfig
from finetune_trainer.data import LabelledData, Split
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
