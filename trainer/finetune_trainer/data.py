"""Read a labelled dataset (CSV, JSONL, parquet, HF save_to_disk, ImageFolder) into a table,
split it with a seed and name its labels.

Everything here is plain Python and pandas; tokenizing and batching are in `batches.py`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from finetune_trainer.config import DatasetFormat, DatasetSpec, Task
from finetune_trainer.errors import DataError
from finetune_trainer.uris import fetch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FILE_FORMATS = {".csv": DatasetFormat.CSV, ".jsonl": DatasetFormat.JSONL, ".json": DatasetFormat.JSONL,
                ".parquet": DatasetFormat.PARQUET}
IMAGE_COLUMN = "image"  # the column an ImageFolder's file paths land in


@dataclass
class Split:
    """Inputs (texts or image paths) and label ids of one side of the split."""

    inputs: list[str]
    labels: list[int] | None  # None for causal-lm


@dataclass
class LabelledData:
    train: Split
    validation: Split
    id2label: dict[int, str]  # empty for causal-lm


def load_dataset(spec: DatasetSpec, task: Task, seed: int) -> LabelledData:
    path = fetch(spec.uri, kind="dataset", repo_type="dataset", error=DataError)
    fmt = detect_format(path, spec.format)
    try:
        table = read_table(path, fmt)
    except (ValueError, FileNotFoundError) as exc:  # a parser's complaint (pandas, pyarrow, json, datasets)
        raise DataError(f"dataset {spec.uri}: cannot read it as {fmt.value} ({type(exc).__name__}: {exc})") from exc
    input_field = IMAGE_COLUMN if fmt == DatasetFormat.IMAGE_FOLDER else spec.text_field
    label_field = None if task == Task.CAUSAL_LM else ("label" if fmt == DatasetFormat.IMAGE_FOLDER else spec.label_field)
    for role, column in (("textField", input_field), ("labelField", label_field)):
        if column is not None and column not in table.columns:
            raise DataError(
                f"dataset {spec.uri}: no column {column!r} (dataset.{role}); it has {', '.join(map(str, table.columns))}"
            )
    columns = [c for c in (input_field, label_field) if c is not None]
    usable = table[columns].dropna()
    if dropped := len(table) - len(usable):
        log.warning("dataset %s: dropped %d rows with an empty %s", spec.uri, dropped, " or ".join(columns))
    if usable.empty:
        raise DataError(f"dataset {spec.uri}: no usable rows")
    inputs = usable[input_field].astype(str).tolist()
    id2label: dict[int, str] = {}
    labels: list[int] | None = None
    if label_field is not None:
        id2label, labels = label_ids(usable[label_field])
        if len(id2label) < 2:
            raise DataError(f"dataset {spec.uri}: column {label_field!r} has {len(id2label)} distinct label(s); need 2 or more")
    train, validation = split(inputs, labels, spec, seed)
    log.info("dataset %s (%s): %d rows -> %d train, %d validation, %d labels",
             spec.uri, fmt.value, len(usable), len(train.inputs), len(validation.inputs), len(id2label))
    return LabelledData(train=train, validation=validation, id2label=id2label)


def detect_format(path: Path, declared: DatasetFormat) -> DatasetFormat:
    if declared != DatasetFormat.AUTO:
        return declared
    if path.is_file():
        if fmt := FILE_FORMATS.get(path.suffix.lower()):
            return fmt
        raise DataError(f"{path}: cannot tell the format from the extension; set dataset.format")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return DatasetFormat.HF_DISK
    if any(child.is_dir() for child in path.iterdir()):
        return DatasetFormat.IMAGE_FOLDER
    raise DataError(f"{path}: a folder that is neither an ImageFolder nor an HF dataset; point dataset.uri at a file")


def read_table(path: Path, fmt: DatasetFormat) -> pd.DataFrame:
    if fmt == DatasetFormat.IMAGE_FOLDER:
        return read_image_folder(path)
    if fmt == DatasetFormat.HF_DISK:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            # The seeded split below makes its own validation side; take the training rows.
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded.to_pandas()
    file = single_data_file(path, fmt)
    if fmt == DatasetFormat.PARQUET:
        return pd.read_parquet(file)
    text = read_text(file)
    if fmt == DatasetFormat.JSONL:
        return pd.read_json(io.StringIO(text), lines=True, dtype=False)  # "10" stays the string the user wrote
    return pd.read_csv(io.StringIO(text))


def single_data_file(path: Path, fmt: DatasetFormat) -> Path:
    """A file URI as it is; a folder must hold exactly one file of the format."""
    if path.is_file():
        return path
    suffixes = {suffix for suffix, f in FILE_FORMATS.items() if f == fmt}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    if len(files) != 1:
        raise DataError(f"{path}: expected one {fmt.value} file in the folder, found {len(files)}")
    return files[0]


def read_text(file: Path) -> str:
    """UTF-8 when the bytes are UTF-8; otherwise Latin-1, which maps every byte and never fails.

    Scraped corpora (the bundled sentiment CSV among them) mix encodings; refusing them
    would make the user re-encode by hand, and Latin-1 only garbles the odd accented character.
    """
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.warning("%s is not valid UTF-8 (byte %d: 0x%02x); reading it as Latin-1", file, exc.start, raw[exc.start])
        return raw.decode("latin-1")


def read_image_folder(path: Path) -> pd.DataFrame:
    rows = [
        {IMAGE_COLUMN: str(image), "label": class_dir.name}
        for class_dir in sorted(p for p in path.iterdir() if p.is_dir())
        for image in sorted(class_dir.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise DataError(f"{path}: no images in its class folders")
    return pd.DataFrame(rows)


def label_ids(column: pd.Series) -> tuple[dict[int, str], list[int]]:
    """Ids in sorted label order (numeric order when every label is a number: 2 before 10), so runs agree."""
    if pd.api.types.is_float_dtype(column) and (column == column.round()).all():
        column = column.astype("int64")  # integers that a missing value turned into floats: 3, not 3.0
    names = column.astype(str)
    distinct = names.unique().tolist()
    ordered = sorted(distinct, key=float) if all(map(is_number, distinct)) else sorted(distinct)
    index = {name: i for i, name in enumerate(ordered)}
    return dict(enumerate(ordered)), [index[n] for n in names]


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split(inputs: list[str], labels: list[int] | None, spec: DatasetSpec, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng(seed).permutation(len(inputs))
    n_validation = max(1, round(len(inputs) * spec.validation_split))
    if n_validation >= len(inputs):
        raise DataError(f"dataset {spec.uri}: {len(inputs)} rows are too few to hold out {spec.validation_split:.0%}")
    held_out, kept = order[:n_validation], order[n_validation:]
    held_out = held_out[: spec.max_eval_samples]
    kept = kept[: spec.max_train_samples]

    def take(idx: np.ndarray) -> Split:
        return Split([inputs[i] for i in idx], None if labels is None else [labels[i] for i in idx])

    return take(kept), take(held_out)


def check_label_count(id2label: dict[int, str], head_labels: int | str) -> int:
    """The head size to build: the dataset's label count, or the user's, which must cover the data."""
    if head_labels == "auto":
        return len(id2label)
    if int(head_labels) < len(id2label):
        raise DataError(
            f"rearrange.head.numLabels is {head_labels} but the dataset has {len(id2label)} labels "
            f"({', '.join(id2label.values())})"
        )
    return int(head_labels)
