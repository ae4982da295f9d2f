"""Tokenizing texts for training: what a classifier's truncation costs is said."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.batches import encode_text
from finetune_trainer.config import ModelSpec
from finetune_trainer.data import Split
from finetune_trainer.models import load_tokenizer


def test_texts_a_classifier_truncates_are_counted(pvc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Longer texts lost their end with no word: a maxLength that cut off what the labels are about went unseen."""
    tokenizer = load_tokenizer(ModelSpec(uri="pvc://models/all-MiniLM-L6-v2", task="sequence-classification"))
    short, exact = "a fine day", "one two three four five six"  # exact: 6 words and [CLS], [SEP]: 8 tokens
    data = encode_text(Split([short, exact, "word " * 50, "more words " * 40], [0, 1, 0, 1]), tokenizer, 8)
    assert max(data.lengths) == 8 and len(tokenizer(exact)["input_ids"]) == 8
    assert "2 of 4 texts are longer than dataset.maxLength (8 tokens)" in caplog.text
