"""Read a labelled dataset (CSV, JSONL, parquet, HF save_to_disk, ImageFolder) into a table,
split it with a seed and name its labels.

Everything here is plain Python and pandas; tokenizing and batching are in `batches.py`.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import enum
import errno
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import re
import struct
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain, islice
from numbers import Number
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from finetune_trainer.config import DatasetFormat, DatasetSpec, Task, TextFormat, TextsSpec
from finetune_trainer.errors import UNREADABLE, DataError, damaged_file, says_not_the_files, unreadable
from finetune_trainer.uris import fetch

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
T = TypeVar("T")

# torchvision ImageFolder's (the Netpbm ones among them: GTSRB is .ppm, the ORL faces .pgm), and the JPEG and
# AVIF files phones and browsers save, which Pillow reads too
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm", ".pnm"}
# An iPhone's photos, which Pillow reads only with a plugin (pillow-heif) the trainer lacks: said, not read
HEIF_SUFFIXES = {".heic", ".heif"}
FILE_FORMATS = {".csv": DatasetFormat.CSV, ".tsv": DatasetFormat.CSV, ".jsonl": DatasetFormat.JSONL,
                ".json": DatasetFormat.JSONL, ".parquet": DatasetFormat.PARQUET}
# The hub's text files are often compressed (train.jsonl.gz); zstd has no reader in the standard library: refused
DECOMPRESSORS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress, ".zst": None}
CSV_SEPARATORS = ",\t;|"  # a comma first: it wins a tie
HEADER_READERS = 16  # threads opening image files at load, which mostly wait on the volume
IMAGE_COLUMN = "image"  # the column an ImageFolder's file paths land in
TABLE_FOLDER = "\0table folder"  # the folder of the file a row of a folder's tables came from
IN_ARRAYS = "json arrays"  # the attrs key of a table read from JSON arrays (in_arrays)
TRAIN, VALIDATION, TEST = "train", "validation", "test"
MISSING_SPELLINGS = {"na", "nan", "null", "none", "n/a"}  # R's, pandas', JSON's and Python's, in lower case
# The words the hub's loader (datasets' data_files patterns) reads as a split name, between separators.
SPLIT_WORDS = {TRAIN: ("train", "training"), VALIDATION: ("validation", "valid", "dev", "val"),
               TEST: ("test", "testing", "eval", "evaluation")}
SPLIT_NAMES = {name: re.compile(rf"(^|[-._ /\d])({'|'.join(words)})([-._ /\d]|$)")
               for name, words in SPLIT_WORDS.items()}


@dataclass
class Split:
    """Inputs (texts or image paths) and label ids of one side of the split."""

    inputs: list[str] | list[tuple[str, str]]  # a pair of texts each with dataset.textPairField
    labels: list[int] | None  # None for causal-lm


@dataclass
class LabelledData:
    train: Split
    validation: Split  # evaluated during training: early stopping selects on it
    test: Split  # the baseline and final scores, from rows neither training nor selection saw
    id2label: dict[int, str]  # empty for causal-lm


def load_dataset(spec: DatasetSpec, task: Task, seed: int) -> LabelledData:
    # A text task would read an image folder's file paths as its texts, and their class folders as the answer.
    found, fmt, tables = read_dataset(spec, "dataset", texts_only=task != Task.IMAGE_CLASSIFICATION)
    path = found.path
    input_field = IMAGE_COLUMN if fmt == DatasetFormat.IMAGE_FOLDER else spec.text_field
    label_field = None if task == Task.CAUSAL_LM else ("label" if fmt == DatasetFormat.IMAGE_FOLDER else spec.label_field)
    pair_field = spec.text_pair_field  # sequence-classification's alone (the config's rules)
    columns = [c for c in (input_field, pair_field, label_field) if c is not None]
    if label_field is not None:
        drop_unlabelled_splits(found, fmt, tables, label_field, spec.uri)
    check_columns(tables, spec.uri, {"textField": input_field, "textPairField": pair_field, "labelField": label_field},
                  "dataset")
    if task == Task.SEQUENCE_CLASSIFICATION and pair_field is None:
        warn_half_of_a_pair(tables[TRAIN], input_field, spec.uri)
    usable: dict[str, pd.DataFrame] = {}
    for name, table in tables.items():
        usable[name] = blank_to_missing(table[columns]).dropna()
        if dropped := len(table) - len(usable[name]):
            log.warning("dataset %s: dropped %d %s rows with an empty %s", spec.uri, dropped, name, " or ".join(columns))
    names = None  # a ClassLabel's, whose -1 is no label in every split
    if label_field is not None:
        names = class_names(found, fmt, label_field)
        drop_withheld_labels(usable, label_field, names is not None, spec.uri)
    if usable[TRAIN].empty:
        raise DataError(f"dataset {spec.uri}: no usable rows")
    drop_empty_splits(usable, spec.uri)
    if task == Task.IMAGE_CLASSIFICATION and fmt != DatasetFormat.IMAGE_FOLDER:
        folder = path if path.is_dir() else path.parent
        inputs = {name: image_paths(table[input_field], table_folders(tables[name], table.index, folder), folder,
                                    spec.uri) for name, table in usable.items()}
    else:
        inputs = {name: texts_of(table, input_field, pair_field, spec.uri, "dataset") for name, table in usable.items()}
    id2label: dict[int, str] = {}
    labels: dict[str, list[int] | None] = dict.fromkeys(usable)
    if label_field is not None:
        for table in usable.values():
            # np.bool_: a true/false column (pandas reads a CSV's too), whose classes are False and True, as for the
            # Python bools a mixed column holds
            check_inputs(table[label_field], (str, Number, np.bool_), "a label (one per row)", spec.uri,
                         "dataset.labelField")
        id2label, ids = label_ids(pd.concat([t[label_field] for t in usable.values()], ignore_index=True))
        id2label = named_classes(id2label, names)
        if len(id2label) < 2:
            raise DataError(f"dataset {spec.uri}: " + (one_class_folder(found, id2label[0], spec.uri)
                                                       if fmt == DatasetFormat.IMAGE_FOLDER else
                                                       f"column {label_field!r} has {len(id2label)} distinct label(s); "
                                                       "need 2 or more"))
        warn_labels_no_classes(id2label, len(ids), None if fmt == DatasetFormat.IMAGE_FOLDER else label_field,
                               spec.uri)
        if fmt != DatasetFormat.IMAGE_FOLDER and names is None:  # a ClassLabel's own names (tweet_eval's none) are
            warn_labels_spelt_missing(id2label, ids, label_field, spec.uri)  # not values a file spelt
        offsets = np.cumsum([0, *(len(t) for t in usable.values())])
        labels = {name: ids[offsets[i]:offsets[i + 1]] for i, name in enumerate(usable)}
        warn_labels_differing_in_case(id2label, spec.uri)
    train, validation, test, _ = split(inputs, labels, spec, seed, images=task == Task.IMAGE_CLASSIFICATION)
    if label_field is not None:  # after the split: a class of a row or two may all be held out of train
        warn_labels_train_lacks({TRAIN: train.labels, VALIDATION: validation.labels, TEST: test.labels}, id2label,
                                spec.uri)
    log.info("dataset %s (%s; splits given: %s): %d train, %d validation, %d test rows, %d labels", spec.uri,
             fmt.value, ", ".join(tables), len(train.inputs), len(validation.inputs), len(test.inputs), len(id2label))
    return LabelledData(train=train, validation=validation, test=test, id2label=id2label)


def one_class_folder(found: Found, name: str, uri: str) -> str:
    """Why an ImageFolder of one class is none, and where its classes are when that folder holds them: Kaggle's
    cats and dogs unzip to PetImages/Cat and PetImages/Dog, and one folder up (or in a train/ of it) they were one
    class, PetImages."""
    path, where = found.path, ""
    if holds_class_folders(folder := train_folder(path, found.listings) / name, found.listings):
        inner = folder.relative_to(path).as_posix()  # PetImages, or train/PetImages
        where = f"; {inner} holds class folders: point dataset.uri at {uri.rstrip('/')}/{inner}"
    return f"its images are all in one class folder, {name} (an ImageFolder has a folder per class){where}"


def image_paths(column: pd.Series, bases: list[Path], folder: Path, uri: str) -> list[str]:
    """A table's image files for image-classification, a relative path read from the folder of the table file that
    holds it (`bases`, row by row: the hub's train/metadata.csv names train/'s images) where it names a file there,
    else from the dataset's folder (never from the trainer's working directory)."""
    check_inputs(column, (str,), "a path; image-classification reads image files: an ImageFolder or a table of their "
                 "paths", uri, "dataset.textField")  # such as the hub's Image feature: {'bytes': ..., 'path': ...}
    paths = [str(base / value if base != folder and names_file(base / value) else folder / value)
             for value, base in zip(column, bases)]
    # Else found only when its batch comes, which may be hours into an epoch, after the steps since a checkpoint.
    if missing := [path for path in dict.fromkeys(paths) if not names_file(Path(path))]:
        raise DataError(f"dataset {uri}: {len(missing)} of its image paths (column {column.name!r}, dataset.textField) "
                        f"name no file, such as {', '.join(missing[:3])}")
    return paths


def names_file(path: Path) -> bool:
    """Whether `path`, a dataset's value (a table's image path, a COCO file_name), names a file: one longer than the
    filesystem takes names none, where Path.is_file raised its ENAMETOOLONG, the pod's fault (exit 2, retried)."""
    try:
        return path.is_file()
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        return False


def bad_images(paths: list[str], at_least: int | None = None) -> dict[str, str]:
    """Of the files, those that do not open as images, by their headers, and why: one that is none (Kaggle's 0-byte
    PetImages/Cat/666.jpg, an HTML page saved as .jpg) stopped the job only when its batch came, hours into an epoch,
    and the next such file the next run. A file cut short after its header still stops the job at its batch
    (batches.open_rgb). Read by threads: on a network volume each file's open waits on a round trip. `at_least`: the
    size a batch decodes each for (`draft`; None: whole)."""
    problems = by_threads(functools.partial(image_problem, at_least=at_least), paths)
    return {path: problem for path, problem in problems.items() if problem}


def bad_images_error(bad: dict[str, str], count: int, uri: str) -> DataError:
    return DataError(f"dataset {uri}: {len(bad)} of its {count} image files do not open as images: "
                     f"{listed(list(bad))} (the first: {next(iter(bad.values()))}); remove them")


# Pillow's convert("RGB") clips a float image at 0..255: one of 0..1 (a scan, a simulation) trained as black.
FLOAT_IMAGE = ("a 32-bit floating-point image, whose values have no set range of colours; save it with 8 or 16 bits "
               "a channel")
WIDE_IMAGE = ("a 32-bit integer image with values beyond 16 bits' 0..65535, which have no set range of colours; save "
              "it with 8 or 16 bits a channel")


def image_problem(path: str, at_least: int | None = None) -> str | None:
    """Why Pillow does not open the file (its header; a 32-bit integer image's pixels too) as an image a batch can
    take, decoded for `at_least` (`draft`), None where it does."""
    try:
        with open_image(path) as image:
            draft(image, at_least)
            return FLOAT_IMAGE if image.mode == "F" else WIDE_IMAGE if beyond_16_bits(int_range(image)) else None
    except decode_errors() as exc:
        return image_fault(exc)


def open_image(path: str | Path) -> Image.Image:
    """The image file at `path` opened, its header read and nothing decoded: by Image.open, which refuses a
    decompression bomb by the size its header declares, but for a JPEG, which libjpeg may decode at a reduced scale:
    its check is `draft`'s, once that scale is known. Decode none without `draft`."""
    from PIL import Image, JpegImagePlugin

    try:  # a JPEG opened once: the factory tells one by its first bytes, as Image.open does
        return JpegImagePlugin.jpeg_factory(path)
    except (SyntaxError, IndexError, TypeError, struct.error):  # no JPEG, or a damaged header: as Image.open names it
        return Image.open(path)


def draft(image: Image.Image, at_least: int | None) -> None:
    """`image` (`open_image`'s) set to decode, for an image to be resized to `at_least` square, a JPEG at the smallest
    of libjpeg's scales, 1/2, 1/4 or 1/8, that keeps both its sides twice that long or longer (any other format, or
    with None, decodes whole). Refused as a decompression bomb where the pixels it decodes are over twice
    Image.MAX_IMAGE_PIXELS, read now so that a limit the user set holds: the size Pillow refuses at Image.open, but
    counted in the pixels decoded, not those declared, as memory is what it guards (a 200-megapixel phone photo
    decodes in 3 megapixels for 224). A JPEG within it is not warned of, as Pillow warns above once its limit. A
    progressive JPEG counts whole: libjpeg keeps its every coefficient, whatever the scale it puts out (a 782 KB one
    of 20000x20000 took 770 MiB at 1/8); a baseline one in a scan per component does too, which Pillow does not tell,
    and cap_jpeg_memory bounds."""
    from PIL import Image

    stored = image.size
    if at_least:
        image.draft(None, (2 * at_least, 2 * at_least))
    width, height = stored if image.info.get("progressive") else image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        scaled = f", {width}x{height} decoded at a reduced scale" if (width, height) != stored else ""
        raise Image.DecompressionBombError(
            f"Image size ({stored[0]}x{stored[1]}{scaled}: {width * height} pixels) exceeds limit of "
            f"{2 * limit} pixels, could be decompression bomb DOS attack.")


def cap_jpeg_memory() -> None:
    """Bound what libjpeg holds of a JPEG's whole image (a progressive one's, or a baseline one's in a scan per
    component: draft's) to that of an image of twice Pillow's pixel limit, three components of 2-byte coefficients:
    past it, decoding fails (an OSError, the file's fault, named), where it took a worker's memory. libjpeg reads
    JPEGMEM (in thousands of bytes, M for millions) at each decode; set once, before any loader thread, and not where
    the user set it."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None:
        os.environ.setdefault("JPEGMEM", f"{math.ceil(2 * Image.MAX_IMAGE_PIXELS * 3 * 2 / 1e6)}M")


def decode_errors() -> tuple[type[Exception], ...]:
    """What Pillow raises on a file it cannot read as an image: OSError (no image, a stream cut short; image_fault
    tells a failed read by its errno), DecompressionBombError (no OSError), and what its decoders raise on damaged
    data besides: ValueError (a Netpbm's or a DDS's damaged header), SyntaxError (an AVIF cut short), RuntimeError
    (libavif's other failures). Any of them escaped as an infrastructure failure, retried for ever, naming no file."""
    from PIL import Image

    return OSError, Image.DecompressionBombError, ValueError, SyntaxError, RuntimeError


def int_range(image: Image.Image) -> tuple[int, int] | None:
    """A 32-bit integer image's (mode I) lowest and highest values, read from its pixels; None for other modes."""
    return image.getextrema() if image.mode == "I" else None


def beyond_16_bits(values: tuple[int, int] | None) -> bool:
    """Whether a 32-bit integer image's `values` (int_range) leave 0..65535, which neither 8 nor 16 bits hold:
    convert("RGB") clipped them at 0..255."""
    return values is not None and (values[0] < 0 or values[1] > 65535)


def image_fault(exc: Exception) -> str:
    """What is wrong with an image file, from what Pillow raised opening or decoding it: one that is no image (an
    HTML page saved as .jpg, an upload cut short, a decompression bomb) or that the trainer may not read is the
    file's fault, the dataset's (the trainer runs as a non-root user). Another OSError with an errno (EIO, ESTALE), or
    of none that says an OS fault (errors.damaged_file), is a read that failed, the volume's or the node's fault, not
    the file's: raised again."""
    if isinstance(exc, OSError) and exc.errno not in UNREADABLE and not damaged_file(exc):
        raise exc
    # libavif's faults that are none of the file's (Pillow raises each as a RuntimeError naming libavif's result,
    # "Failed to decode image: Out of memory"), raised again: retried, where the file's own faults are the dataset's.
    if isinstance(exc, RuntimeError) and says_not_the_files(exc):
        raise exc
    return f"{type(exc).__name__}: {exc}"


def table_folders(table: pd.DataFrame, rows: pd.Index, folder: Path) -> list[Path]:
    """The folder of the table file each of `rows` came from (`folder` where the dataset is one file)."""
    if TABLE_FOLDER not in table.columns:
        return [folder] * len(rows)
    return [Path(base) for base in table.loc[rows, TABLE_FOLDER]]


def check_inputs(column: pd.Series, kinds: tuple[type, ...], what: str, uri: str, field: str) -> None:
    """Every value of the column that `field` (such as dataset.textField) names is one of `kinds`: a list or a
    record (chat messages, an inline image, a row's several labels) would be read as its Python repr,
    "[{'role': 'user', ...", and trained on as such."""
    for value in column:
        if not isinstance(value, kinds):
            shown = " ".join(str(value).split())[:80]  # on one line: numpy prints an array of records over several
            raise DataError(f"{field.rpartition('.')[0]} {uri}: column {column.name!r} ({field}) holds {shown}, "
                            f"not {what}{columns_hint(column, value)}")


def columns_hint(column: pd.Series, value: Any) -> str:
    """How to write the rows, where the file is one object of columns, each a dict by row number: pandas'
    df.to_json() by default, read as one row that holds the columns."""
    if len(column) == 1 and isinstance(value, dict) and value and all(str(key).isdigit() for key in value):
        return ('; the file holds a dict of rows per column (pandas\' default df.to_json()): write a record per row, '
                'df.to_json(path, orient="records", lines=True), or a list of objects')
    return ""


def blank_to_missing(table: pd.DataFrame) -> pd.DataFrame:
    """Empty and whitespace-only strings as missing, as an empty CSV cell is: JSON and parquet keep "" as a value,
    which would be a label class of its own or a text with nothing to learn from."""
    return table.replace(r"^\s*$", np.nan, regex=True)


def drop_withheld_labels(usable: dict[str, pd.DataFrame], label_field: str, class_label: bool, uri: str) -> None:
    """Drop rows labelled -1, the hub's mark of no label: a ClassLabel's (`class_label`: its names are known) in
    every split (SNLI's train has 785 such rows), else held-out rows where train has no such label (GLUE's and
    SST-2's test splits). Kept, they would become a class "-1" and make the scores noise."""
    if not class_label and (numeric(usable[TRAIN][label_field]) == -1).any():
        return  # -1 is one of the dataset's classes (negative sentiment, say)
    why = (f"no label: column {label_field!r} (dataset.labelField) is a ClassLabel, whose classes number from 0"
           if class_label else "no label: train has no such class")
    for name in (TRAIN, VALIDATION, TEST) if class_label else (VALIDATION, TEST):
        if name in usable and (withheld := numeric(usable[name][label_field]) == -1).any():
            log.warning("dataset %s: dropped %d %s rows labelled -1 (%s)", uri, int(withheld.sum()), name, why)
            usable[name] = usable[name][~withheld]


def warn_labels_train_lacks(labels: dict[str, list[int] | None], id2label: dict[int, str], uri: str) -> None:
    """Name the labels of the validation or test split that the train split lacks: classes the model never trains
    on and scores 0 on (a test file that spells a label otherwise, a class of one row that the split held out)."""
    trained = set(labels[TRAIN] or [])
    for name in (VALIDATION, TEST):
        if lacking := sorted(set(labels.get(name) or []) - trained):
            log.warning("dataset %s: labels of its %s split that its train split lacks, which the model cannot "
                        "learn: %s", uri, name, listed([id2label[i] for i in lacking]))


def listed(names: list[str], sep: str = ", ", most: int = 10) -> str:
    """The first `most` names and how many more: a column of scores, not classes, lacks thousands."""
    return sep.join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def warn_labels_no_classes(id2label: dict[int, str], rows: int, column: str | None, uri: str) -> None:
    """Say when the labels look like no classes: under 2 rows a label (an id; most classes could not be both trained
    on and scored), or fractional numbers among more than a few (a score, such as the sentiment corpus' confidence:
    2,319 values between 0.25 and 1). `column` None: an ImageFolder's class folders, which no labelField names."""
    names = list(id2label.values())
    # "nan" among scores is no class but their missing mark
    fractional = len(names) > 10 and all(map(is_float, names)) and any(
        is_number(n) and not float(n).is_integer() for n in names)
    if column is None and len(names) > rows / 2:
        log.warning("dataset %s: %d class folders hold %d images, such as %s: a folder per class? (one per sample, "
                    "or per image, is not)", uri, len(names), rows, listed(names, most=3))
    elif len(names) > rows / 2 or fractional:
        log.warning("dataset %s: column %r (dataset.labelField) has %d distinct labels in %d rows, such as %s: a "
                    "column of classes? (a score or an id is not)", uri, column, len(names), rows, listed(names, most=3))


# The hub's columns of a text pair (GLUE's MRPC, RTE, QNLI, QQP; SNLI, MultiNLI; BoolQ; PAWS), first and second
TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
              ("question", "sentence"), ("question", "passage"), ("text_a", "text_b"))


def warn_half_of_a_pair(table: pd.DataFrame, text_field: str, uri: str) -> None:
    """Warns where textField is one text of a pair whose other the table has, and textPairField is unset: an
    entailment or paraphrase dataset (premise, hypothesis) trained on the premise alone, its labels unlearnable."""
    for pair in TEXT_PAIRS:
        if text_field in pair and (other := pair[1 - pair.index(text_field)]) in table.columns:
            log.warning("dataset %s: column %r (dataset.textField) is one text of a pair with column %r, which is not "
                        "read: a row's label may depend on both (entailment, paraphrase); to classify the pair, set "
                        "dataset.textField to %r and dataset.textPairField to %r", uri, text_field, other, *pair)
            return


def texts_of(table: pd.DataFrame, text_field: str, pair_field: str | None, uri: str,
             field: str) -> list[str] | list[tuple[str, str]]:
    """A table's inputs: its texts, or with textPairField, its pairs of texts (which split compares as pairs: a
    premise that trained with one hypothesis may be tested with another, as NLI's splits have it); `field` is the
    spec's place in the job, which the errors name."""
    fields = {"textField": text_field} | ({"textPairField": pair_field} if pair_field else {})
    for role, column in fields.items():
        check_inputs(table[column], (str, Number), "a text", uri, f"{field}.{role}")
    texts = [table[column].astype(str).tolist() for column in fields.values()]
    return texts[0] if pair_field is None else list(zip(*texts))


def warn_labels_spelt_missing(id2label: dict[int, str], ids: list[int], column: str, uri: str) -> None:
    """Name the labels spelt as a missing value, with their rows: only an empty cell is missing (read_rows), so R's
    write.csv, which writes a missing value as NA, made a class "NA" unsaid."""
    counts = np.bincount(ids, minlength=len(id2label))
    if spelt := [f"{name} ({counts[i]} of {len(ids)} rows)" for i, name in id2label.items()
                 if name.lower() in MISSING_SPELLINGS]:
        log.warning("dataset %s: column %r (dataset.labelField) holds labels spelt as a missing value, each a class "
                    "of its own: %s; clean the file: empty those cells (their rows are then dropped; R: write.csv(..., "
                    'na = "")) or give them their labels', uri, column, ", ".join(spelt))


def warn_labels_differing_in_case(id2label: dict[int, str], uri: str) -> None:
    """Name the labels that differ only in case (pos, POS): distinct classes, which a user rarely means."""
    spellings: dict[str, list[str]] = {}
    for name in id2label.values():
        spellings.setdefault(name.lower(), []).append(name)
    if alike := [" and ".join(names) for names in spellings.values() if len(names) > 1]:
        log.warning("dataset %s: labels that differ only in case, each a class of its own: %s", uri,
                    listed(alike, "; "))


def drop_empty_splits(splits: dict[str, Sized], uri: str) -> None:
    """Forget a validation or test split of the dataset's that has no usable rows: `split` holds one out of train."""
    for name in (VALIDATION, TEST):
        if name in splits and not len(splits[name]):
            log.warning("dataset %s: its %s split has no usable rows; holding %s rows out of train instead",
                        uri, name, name)
            del splits[name]


def numeric(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce")


def load_texts(spec: TextsSpec, field: str) -> list[str] | list[tuple[str, str]]:
    """Every non-empty text, or with textPairField every pair of non-empty texts, of every split `spec` names
    (unlabelled text, e.g. healing's), read as the dataset's (texts_of); `field` is the spec's place in the job
    (rearrange.prune.heal.dataset), which the errors name."""
    _, _, tables = read_dataset(spec, field, texts_only=True)
    roles = {"textField": spec.text_field, "textPairField": spec.text_pair_field}
    check_columns(tables, spec.uri, roles, field)
    columns = [c for c in roles.values() if c is not None]
    texts = [text for table in tables.values() for text in texts_of(
        blank_to_missing(table[columns]).dropna(), spec.text_field, spec.text_pair_field, spec.uri, field)]
    what = "pairs of texts" if spec.text_pair_field else "texts"
    if not texts:
        raise DataError(f"{field} {spec.uri}: no {what} in column{'s' * (len(columns) - 1)} "
                        f"{' and '.join(map(repr, columns))}")
    log.info("%s %s: %d %s", field, spec.uri, len(texts), what)
    return texts


def read_dataset(spec: TextsSpec, field: str,
                 texts_only: bool = False) -> tuple[Found, DatasetFormat, dict[str, pd.DataFrame]]:
    """The local path (with its files), the format and the tables by split of the dataset `spec` names, `field` its
    place in the job; `texts_only` refuses images (which `format: auto` finds in a folder of folders) before reading
    them, and leaves out the tables' folders, which only image paths are read from."""
    found = Found(fetch(spec.uri, kind=f"{field}.uri", revision=spec.revision, repo_type="dataset", error=DataError))
    try:
        return found, *read_found(found, spec, field, texts_only)
    except PermissionError as exc:  # the mode of a file or folder, as for an image (UNREADABLE): the owner's to fix
        raise DataError(f"{field} {spec.uri}: {unreadable(exc)}") from exc


def read_found(found: Found, spec: TextsSpec, field: str,
               texts_only: bool) -> tuple[DatasetFormat, dict[str, pd.DataFrame]]:
    """read_dataset's format and tables of the dataset `found`."""
    path, used = found.path, used_columns(spec)
    fmt = detect_format(found, spec.format, field)
    if (not texts_only and spec.format == DatasetFormat.AUTO and fmt in FILE_FORMATS.values()
            and holds_class_folders(path, found.listings)):
        if (tables := tables_with(found, fmt, spec.text_field, used)) is not None:
            return fmt, tables  # a table of image paths in folders (train/patient1/, part_1/, the hub's shards)
        # images in class folders, and a table beside them (Kaggle's sample_submission.csv, GTSRB's GT-00000.csv
        # in each class folder) that the extension rule took for the dataset
        log.warning("%s: read as an ImageFolder of its class folders; its %s files are no dataset with a column %r "
                    "(%s.textField): %s", path, fmt.value, spec.text_field, field, ", ".join(
                        str(f.relative_to(path)) for f in islice(found.files(suffixes_of(fmt)), 3)))
        fmt = DatasetFormat.IMAGE_FOLDER
    if texts_only and fmt in (DatasetFormat.IMAGE_FOLDER, DatasetFormat.COCO):
        raise DataError(f"{field} {spec.uri}: holds images ({fmt.value}), not texts; point {field}.uri at texts")
    try:
        return fmt, read_splits(found, fmt, used, folders=not texts_only)
    # a parser's complaint (pandas, pyarrow, json, datasets); json's RecursionError is a value nested too deep for it,
    # the file's fault (escaped, it was taken for the pod's and retried)
    except (ValueError, FileNotFoundError, RecursionError) as exc:
        raise DataError(f"{field} {spec.uri}: cannot read it as {fmt.value} ({type(exc).__name__}: {exc})") from exc


def used_columns(spec: TextsSpec) -> set[str]:
    """The columns a job reads of its dataset (textField, an image table's paths too; textPairField; labelField)."""
    return {name for name in (spec.text_field, spec.text_pair_field, getattr(spec, "label_field", None)) if name}


def tables_with(found: Found, fmt: DatasetFormat, column: str,
                used: Collection[str]) -> dict[str, pd.DataFrame] | None:
    """The folder's tables by split where they are a dataset with `column` (the configured textField), else None:
    beside class folders of images, a table without it (or that does not read) is no dataset of theirs. The walk's
    links are said only where the tables are the dataset: an image dataset says its own (Found.say_skipped), and
    they were said twice."""
    try:
        tables = folder_tables(found.path, fmt, list(found.files(suffixes_of(fmt))), used, folders=True)
    except (DataError, ValueError, FileNotFoundError):  # a test.csv of Kaggle's beside train/<class>/: no train split
        return None
    if not any(column in table.columns for table in tables.values()):
        return None
    found.say_skipped()
    return tables


def suffixes_of(fmt: DatasetFormat) -> set[str]:
    return {suffix for suffix, f in FILE_FORMATS.items() if f == fmt}


def check_columns(tables: dict[str, pd.DataFrame], uri: str, columns: dict[str, str | None], field: str) -> None:
    """Every split has each column (a role such as textField: the column's name, None when not read)."""
    for name, table in tables.items():
        for role, column in columns.items():
            where = f" in its {name} split" if len(tables) > 1 else ""
            if column is not None and column not in table.columns:
                raise DataError(f"{field} {uri}: no column {column!r} ({field}.{role}){where}; "
                                f"it has {', '.join(map(repr, written_columns(table.columns)))}{wrapped_hint(table)}")
            if column is not None and repeat_of(column, 1) in table.columns:
                raise DataError(f"{field} {uri}: its header repeats column {column!r} ({field}.{role}){where}; "
                                "which copy to read is unclear: rename or drop the others")


def wrapped_hint(table: pd.DataFrame) -> str:
    """How to read the rows of a JSON file that holds them in one object ({"data": [...]}, as exports wrap them): read
    as one row. Its lists are not made the rows here: they may not be (SQuAD's "data" holds articles, each holding its
    questions), and a row's list of objects (a chat's messages) is no such wrapper."""
    if len(table) != 1:
        return ""
    wrapped = [(key, len(value)) for key, value in table.iloc[0].items()  # a list of one record is rows of none
               if isinstance(value, list) and len(value) > 1 and all(isinstance(record, dict) for record in value)]
    if not wrapped:
        return ""
    lists = " and ".join(f"key {key!r} holds a list of {count} records" for key, count in wrapped)
    return (f"; the file holds one record, whose {lists}: if those are the rows, write them one a line, as "
            f"{jq_rows(str(wrapped[0][0]), table.attrs.get(IN_ARRAYS, False))} does")


def jq_rows(key: str, arrays: bool) -> str:
    """The shell command that writes the records of the list at `key` one a line, of an object in arrays where
    `arrays` ([{"data": [...]}], where `.data[]` is jq's error): jq's `.key` takes ASCII names only, and a quote
    in the key ends the shell's quoting."""
    path = f".{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f".[{json.dumps(key, ensure_ascii=False)}]"
    return "jq -c '" + f"{'.[]' * arrays}{path}[]".replace("'", "'\\''") + "'"


def written_columns(columns: Iterable[Any]) -> list[Any]:
    """The columns a file wrote: not TABLE_FOLDER nor a header's repeat (repeat_of), whose names hold a NUL."""
    return [c for c in columns if "\0" not in str(c)]


def drop_unlabelled_splits(found: Found, fmt: DatasetFormat, tables: dict[str, pd.DataFrame], label_field: str,
                           uri: str) -> None:
    """Forget a validation or test split without the label column: unlabelled, the rows to predict (Kaggle's
    test.csv beside train.csv and sample_submission.csv), which no score can be taken on; `split` holds one out of
    train instead. A train split without it is refused (check_columns)."""
    for name in (VALIDATION, TEST):
        if name in tables and label_field not in tables[name].columns:
            files = listed(split_files(found, fmt, name))
            log.warning("dataset %s: its %s split%s has no column %r (dataset.labelField), so unlabelled: not used; "
                        "holding %s rows out of train instead", uri, name, f" ({files})" if files else "",
                        label_field, name)
            del tables[name]


def split_files(found: Found, fmt: DatasetFormat, name: str) -> list[str]:
    """The files of a folder's split `name` (read_splits'), relative to it; none for a save_to_disk split."""
    relative = (f.relative_to(found.path) for f in found.files(suffixes_of(fmt)))
    return [str(file) for file in relative if innermost_split(file) == name]


def detect_format(found: Found, declared: DatasetFormat | TextFormat, field: str) -> DatasetFormat:
    path = found.path
    if declared == DatasetFormat.IMAGE_FOLDER and not path.is_dir():  # listing it raised NotADirectoryError: exit 2
        raise DataError(f"{field}.uri {path}: a file, and {field}.format imagefolder reads a folder of class folders; "
                        f"point {field}.uri at the folder")
    if declared != DatasetFormat.AUTO:
        return DatasetFormat(declared)
    if path.is_file():
        if fmt := FILE_FORMATS.get(format_suffix(path)):
            return fmt
        readable = ", ".join(f.value for f in DatasetFormat if f not in (DatasetFormat.AUTO, DatasetFormat.HF_DISK,
                                                                          DatasetFormat.IMAGE_FOLDER))
        raise DataError(f"{path}: cannot tell the format from the extension; set {field}.format to the file's "
                        f"({readable}); plain text lines are none of them: write them as JSONL, one "
                        '{"text": ...} a line')
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return DatasetFormat.HF_DISK
    if formats := {FILE_FORMATS[format_suffix(f)] for f in found.files(set(FILE_FORMATS))}:
        if len(formats) > 1:
            raise DataError(f"{path}: holds {' and '.join(sorted(formats))} files; set {field}.format")
        return formats.pop()
    if any(child.is_dir() for child in path.iterdir()) and any(found.files(IMAGE_SUFFIXES)):  # a Path is never false
        return DatasetFormat.IMAGE_FOLDER
    suffixes = sorted({format_suffix(f) or f.name for f in found.entries if f.is_file()})
    raise DataError(f"{path}: a folder that is neither an ImageFolder nor an HF dataset, nor holds files of a format "
                    f"(it holds {listed(suffixes) or 'no file'}); point {field}.uri at a file")


def format_suffix(file: Path) -> str:
    """A file's suffix, that of its text format where it is compressed (.jsonl of train.jsonl.gz)."""
    suffix, inner = file.suffix.lower(), Path(file.stem).suffix.lower()
    return inner if suffix in DECOMPRESSORS and FILE_FORMATS.get(inner) in (DatasetFormat.CSV,
                                                                            DatasetFormat.JSONL) else suffix


@dataclass
class Found:
    """A dataset's (or a class folder's) local path, and where it is a folder, the entries below it: walked once, at
    their first use, as the format, the splits and the parquet class names each filter them (a hub repo of
    thousands of shards on a network volume was walked three times)."""

    path: Path
    # the links its walk skips (entered), as "x links to y": the walk's, not a caller's
    skipped: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    # an image dataset's folders' data folders (data_folders), and the images beside them (beside): listed once,
    # though the splits, the classes and their reading each ask for them
    listings: dict[Path, list[Path]] = field(default_factory=dict, init=False, repr=False, compare=False)
    # the paths of the files its walk found that are links, which its listings tell at no stat each
    links: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @functools.cached_property
    def entries(self) -> list[Path]:
        return sorted(files_below(self.path, self.skipped, self.links))

    def say_skipped(self) -> None:
        """Say the links its walk skipped, by the reader of its files, where they are read there: a table dataset's,
        an image dataset's class folder's. Not an image dataset's own walk: it reads its split and class folders
        each from itself, and says their links itself (distinct_folders, check_read_once)."""
        for link in self.skipped:
            said_once(f"{link}, a folder of the dataset: its files are read there, once")

    def files(self, suffixes: set[str]) -> Iterator[Path]:
        """The files with these suffixes (format_suffix) anywhere below the folder, but not in hidden folders (.git,
        .cache) nor lost+found (data_folder), in sorted order; each found a file (a stat) only as it is read. Links
        to no file among them are said once read through (say_dangling)."""
        dangling = []
        for p in self.entries:
            if format_suffix(p) in suffixes:
                if p.is_file():
                    yield p
                elif p.is_symlink():
                    dangling.append(p)
        if dangling:
            say_dangling(self.path, dangling)


def say_dangling(folder: Path, links: list[Path]) -> None:
    """Say the links in `folder` to no file, with a count and the first few: git-annex's and DVC's links to content
    not fetched, or links out of the pod's volume, were left out without a word (a class of 10 images read as 4)."""
    said_once(f"{folder}: {len(links)} files that are links to no file (content not fetched, as git-annex and DVC "
              f"leave it, or a link out of the volume): not read "
              f"({listed([str(p.relative_to(folder)) for p in links], most=3)})")


def files_below(folder: Path, skipped: list[str] | None = None, links: set[str] | None = None) -> Iterator[Path]:
    """The entries (not hidden) of the data folders below `folder` (data_folder), in sorted order, through folders
    linked in from elsewhere (a split), which Path.rglob skipped, as it skipped a folder it may not read: a
    PermissionError. The links it skips are added to `skipped` (entered), the paths of its files that are links to
    `links`."""
    for root, _, files in walk_below(folder, skipped, links):
        yield from (Path(root, name) for name in files)


def walk_below(folder: Path, skipped: list[str] | None = None,
               links: set[str] | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """An os.walk (following links) of files_below's folders and files; a caller may empty a folder's list of
    subfolders to walk none of them."""
    top = os.path.realpath(folder)
    yield from walk_from(os.fspath(folder), top, {top}, skipped, links)


def walk_from(root: str, top: str, walked: set[str], skipped: list[str] | None,
              links: set[str] | None) -> Iterator[tuple[str, list[str], list[str]]]:
    """walk_below's walk of the folder `root` and those below it, from their os.scandir entries, which tell a file
    link from a file at no stat (os.walk keeps them to itself: each image's was an lstat, 0.15 s of 100,000)."""
    with os.scandir(root) as listing:  # a folder it may not list is refused, as os.walk's onerror did
        entries = [(entry, is_folder(entry)) for entry in listing]
    dirs = [name for name in sorted(entry.name for entry, folder in entries if folder)
            if data_folder(name) and entered(os.path.join(root, name), top, walked, skipped)]
    files = [entry for entry, folder in entries if not folder and not entry.name.startswith(".")]
    if links is not None:
        links.update(entry.path for entry in files if entry.is_symlink())
    yield root, dirs, [entry.name for entry in files]
    for name in dirs:  # as the caller left them
        yield from walk_from(os.path.join(root, name), top, walked, skipped, links)


def is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether a folder's entry is a folder or a link to one; one that cannot be told is none, as os.walk has it."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def entered(path: str, top: str, walked: set[str], skipped: list[str] | None) -> bool:
    """Whether files_below walks into the folder at `path`, and if so its real path added to `walked`: a real folder
    once, never one above a link to it (a loop, and the folders around it are no dataset's). A link to a folder
    walked already, or to one of the dataset's real folder `top` walked anyway, is skipped, and added to `skipped`
    where it is a list, to be said (current -> data read it twice; validation -> test stood for a slice of train
    unsaid)."""
    real, link = os.path.realpath(path), os.path.islink(path)
    if link and within(os.path.realpath(os.path.dirname(path)), real):
        return False
    if real in walked or link and within(real, top) and all(map(data_folder, Path(os.path.relpath(real, top)).parts)):
        if link and skipped is not None:
            skipped.append(f"{path} links to {real}")
        return False
    walked.add(real)
    return True


@functools.cache
def said_once(warning: str) -> None:
    """A warning of the folders' walk (Found.say_skipped, say_dangling), or of an image dataset's folders
    (stood_for): said once however often the folders are read (a load lists them once, but a process may load the
    dataset again)."""
    log.warning("%s", warning)


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def data_folder(name: str) -> bool:
    """Whether a folder of this name may hold a dataset's files: not a hidden one (.git, .cache), nor lost+found,
    the filesystem's own at the root of a volume (where the operator mounts a claim), which only root may read."""
    return not name.startswith(".") and name != "lost+found"


def split_of(relative: str, whole: bool = False) -> str | None:
    """The split a hub file or folder belongs to, by the words the hub's loader knows (datasets' data_files
    patterns): a word of its path between separators, like train/, validation-00000-of-00001.parquet or test.csv;
    or, `whole`, its whole name (train, Val), which is how a folder that may be a class names a split."""
    text = relative.lower()
    return next((name for name, words in SPLIT_WORDS.items()
                 if (text in words if whole else SPLIT_NAMES[name].search(text))), None)


def innermost_split(relative: Path) -> str | None:
    """The split a file belongs to by the innermost part of its path that names one: test.csv in a folder
    train_test_split/ is the test split (its whole path, searched for train first, made it train's, unsaid)."""
    return next((found for part in reversed(relative.parts) if (found := split_of(part)) is not None), None)


def read_splits(found: Found, fmt: DatasetFormat, used: Collection[str],
                folders: bool = False) -> dict[str, pd.DataFrame]:
    """The dataset's tables by split (train first; validation and test when the dataset names them).

    A file is the train split. A folder is read as the hub lays datasets out: files named by split or in
    folders named by split (parquet shards concatenated); files of no split name are one train split together.
    `folders` adds the folder of each row's file (TABLE_FOLDER), which image paths are read from: only they need
    it, and in a corpus of short texts it is a good part of the table's memory.
    """
    path = found.path
    if fmt == DatasetFormat.IMAGE_FOLDER:
        return read_image_splits(path, found.listings)
    if fmt == DatasetFormat.HF_DISK:
        import datasets

        loaded = load_saved(path)
        # Memory-mapped as it is: a damaged .arrow file's offsets past its buffers crashed the process as its rows were
        # read (a segfault, exit 139, the pod's fault, retried), and a string not UTF-8 raised an ArrowException
        # there. Checked whole, it is refused where the job reads the column, and the column dropped where not
        checked = {}
        for split, saved in loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]:
            where = f"{path}{f' (its {split} split)' if split else ''}"
            held = "data not of its type (a string not UTF-8, offsets past its buffers)"
            bad = unread_bad_columns(saved.data.table, used, where, held, lambda names: ValueError(
                f"{where}: a damaged save_to_disk file: its column {listed(names)} holds {held}"))
            checked[split] = saved.remove_columns(bad) if bad else saved
        loaded = datasets.DatasetDict(checked) if isinstance(loaded, datasets.DatasetDict) else checked[None]
        if not isinstance(loaded, datasets.DatasetDict):
            return {TRAIN: loaded.to_pandas()}
        # Splits of one kind are one split together, as the files of a folder are: MNLI's validation_matched and
        # validation_mismatched, a chat set's train_sft and train_gen (a dict by kind kept the last one alone).
        named: dict[str, list[str]] = {}
        for name in loaded:
            named.setdefault(split_of(name) or name, []).append(name)
        if TRAIN not in named:
            raise DataError(f"{path}: its splits ({', '.join(loaded)}) include no train split")
        for kind, names in named.items():
            if len(names) > 1 and kind in (TRAIN, VALIDATION, TEST):
                log.info("%s: its %s split is %s together", path, kind, " + ".join(names))
        if ignored := [name for kind in named if kind not in (TRAIN, VALIDATION, TEST) for name in named[kind]]:
            # as folder_tables says its files of no split name: the hub's unsupervised, a heldout, went unsaid
            log.warning("%s: ignoring its splits of no train, validation or test name: %s", path, ", ".join(ignored))
        return {kind: pd.concat([loaded[name].to_pandas() for name in named[kind]], ignore_index=True)
                for kind in (TRAIN, VALIDATION, TEST) if kind in named}
    if path.is_file():
        return {TRAIN: read_table(path, fmt, used)}
    files = list(found.files(suffixes_of(fmt)))
    found.say_skipped()
    return folder_tables(path, fmt, files, used, folders)


def load_saved(path: Path) -> Any:
    """load_from_disk's Dataset or DatasetDict of the folder, its splits of no rows too; a damaged file or metadata
    of another shape is a ValueError naming the folder (the dataset's fault), a read that failed an OSError."""
    try:
        return load_saved_splits(path)
    except FileNotFoundError:  # datasets' own, for a folder it is not (read_found names it)
        raise
    except OSError as exc:  # a damaged .arrow file ("Invalid flatbuffers message"): the file's fault, which
        if not damaged_file(exc):  # escaped as the pod's (exit 2, retried); a failed read or mmap is not
            raise
        raise ValueError(f"{path}: a damaged save_to_disk file ({exc})") from exc
    # load_from_disk indexes its JSON files as it writes them: a hand-edited value of another shape raised one of
    # these, the pod's fault (exit 2, retried). A read that failed is an OSError, raised above.
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: its save_to_disk metadata (state.json, dataset_info.json, dataset_dict.json) "
                         f"is not as datasets writes it: {type(exc).__name__}: {exc}") from exc


def load_saved_splits(path: Path) -> Any:
    """load_saved's loading: save_to_disk writes a split of no rows with no data file ("_data_files": []), which
    load_from_disk cannot read back (IndexError): a zero-row Dataset of its features here, which the trainer drops
    as it does any validation or test split of no rows (drop_empty_splits)."""
    import datasets

    def of_no_rows(folder: Path) -> bool:
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):  # load_from_disk says which
            return False
        return isinstance(state, dict) and state.get("_data_files") == []

    def empty(folder: Path) -> datasets.Dataset:
        features = datasets.Features.from_dict(
            json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))["features"])
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)

    if of_no_rows(path):
        return empty(path)
    if (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if empty_names := {name for name in names if of_no_rows(path / name)}:
            return datasets.DatasetDict({name: empty(path / name) if name in empty_names
                                         else datasets.load_from_disk(str(path / name)) for name in names})
    return datasets.load_from_disk(str(path))


def folder_tables(path: Path, fmt: DatasetFormat, files: list[Path], used: Collection[str],
                  folders: bool) -> dict[str, pd.DataFrame]:
    """read_splits' tables of the folder `path`, from its `files` of the format."""
    if not files:
        raise DataError(f"{path}: no {fmt.value} file in the folder")
    by_split: dict[str | None, list[Path]] = {}
    for file in files:
        by_split.setdefault(innermost_split(file.relative_to(path)), []).append(file)
    if set(by_split) != {None} and None in by_split:
        log.warning("%s: ignoring files of no split name: %s", path, ", ".join(p.name for p in by_split.pop(None)))
    if None in by_split:
        by_split = {TRAIN: by_split[None]}  # no file names a split: they are one train split together
    elif TRAIN not in by_split:
        raise DataError(f"{path}: the files name splits ({', '.join(map(str, by_split))}) but none is train")
    elif len(subsets := {subset_of(f.relative_to(path)) for f in by_split[TRAIN]}) > 1:
        raise DataError(f"{path}: holds {len(subsets)} datasets in its folders ({', '.join(sorted(subsets))}), "
                        "each with a train split; point the uri at one of those folders")
    else:
        check_held_out_subset(path, by_split, subsets.pop())
    tables = {}
    for name in (TRAIN, VALIDATION, TEST):
        if name in by_split:
            read = {f: with_folder(read_table(f, fmt, used), f.parent) if folders else read_table(f, fmt, used)
                    for f in by_split[name]}
            say_columns_missing(path, name, read)
            tables[name] = pd.concat(read.values(), ignore_index=True)
    return tables


def say_columns_missing(path: Path, split: str, tables: dict[Path, pd.DataFrame]) -> None:
    """Warns of files of the split without a column that another file of it has, once a split: their rows have that
    column empty once the files are one table, and a file with `sentence` where the others have `text` lost every
    row, said only as rows with an empty text."""
    columns = written_columns(dict.fromkeys(chain.from_iterable(t.columns for t in tables.values())))
    lacking = {column: [str(f.relative_to(path)) for f, t in tables.items() if column not in t.columns]
               for column in columns}
    if said := [f"{column!r} ({len(files)} of {len(tables)} files: {listed(files, most=3)})"
                for column, files in lacking.items() if files]:
        log.warning("%s: files of its %s split lack columns that others of it have, and their rows have them empty: "
                    "%s", path, split, "; ".join(said))


def check_held_out_subset(path: Path, by_split: dict[str | None, list[Path]], subset: str) -> None:
    """Refuses validation and test files outside the train split's folder `subset`, as train files in two folders
    are: another dataset's held-out files (a/train.csv, a/test.csv, b/test.csv) were read into this one's."""
    for name in (VALIDATION, TEST):
        if stray := [f.relative_to(path) for f in by_split.get(name, []) if subset_of(f.relative_to(path)) != subset]:
            raise DataError(f"{path}: {name} files outside the train split's folder ({subset}): "
                            f"{listed([str(f) for f in stray])}; point the uri at one dataset's folder")


def with_folder(table: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """`table` with the folder of its file in each row, added in place: assign() would copy a corpus of gigabytes."""
    table[TABLE_FOLDER] = str(folder)
    return table


def subset_of(relative: Path) -> str:
    """The folder a split file sits in, less the folders named by split: a hub repo with one folder per
    subset (GLUE's cola/, sst2/) gives one per subset; data/train-*.parquet and train/*.jsonl give one."""
    return "/".join(part for part in relative.parent.parts if split_of(part) is None) or "."


def read_table(file: Path, fmt: DatasetFormat, used: Collection[str]) -> pd.DataFrame:
    """The file's table; `used`: the columns the job reads (used_columns), whose values are checked."""
    # Nullable dtypes: a column of integers and nulls (a text 12, a label 3) stays integers, not floats ("12.0")
    if fmt == DatasetFormat.PARQUET:
        try:
            return read_parquet(file, used)
        # pyarrow raises a damaged file's thrift, page or codec data as an OSError ("Couldn't deserialize thrift",
        # "Corrupt snappy compressed data"; damaged_file), and pandas its index metadata missing a key as a KeyError:
        # the file's fault, which escaped as the pod's (exit 2, retried). A read or an allocation that failed is not.
        except OSError as exc:
            if not damaged_file(exc):
                raise
            raise ValueError(f"{file.name} is a damaged parquet file ({exc})") from exc
        except KeyError as exc:
            raise ValueError(f"{file.name}: its pandas metadata lacks the key {exc}; write it again") from exc
    text = read_text(file)
    if fmt == DatasetFormat.JSONL:
        return read_json(text, file.name)
    if declared := re.match(r"sep=([^\r\n])[^\S\r\n]*(\r?\n)", text):  # Excel's first line, naming the separator
        sep, text = declared[1], declared[2] + text[declared.end():]  # a blank line: the errors' line numbers stay
    else:
        sep = csv_separator(text, format_suffix(file))
    header = line_fields(first_line(text), sep)  # as pandas reads it
    try:
        table = read_delimited(text, file.name, sep)
    except pd.errors.ParserError as exc:  # which file of a folder, as a JSON file's error says
        raise pd.errors.ParserError(f"{file.name}: {exc}") from exc
    return without_repeated_headers(with_repeats_renamed(table, header), header, file.name)


def read_parquet(file: Path, used: Collection[str]) -> pd.DataFrame:
    """The parquet file's table, read once (again only where it fails, below), refused where a column the job reads
    (`used`) holds a string that is not UTF-8 (a damaged page, or bytes written as a string column): pyarrow reads strings unchecked, and the
    ArrowException ("Wrapping ... failed") came as the rows were read, escaping as the pod's fault (exit 2, retried).
    pandas keeps string columns as arrow's (checked here, the used ones only: Spark writes strings unchecked, and a
    column the job never reads is no fault of its data); a list of strings it makes Python's as it reads, and a bad
    one fails the read: then the file is read again without the columns that hold one, if the job reads none of
    them."""
    import pyarrow as pa

    try:
        table = pd.read_parquet(file, dtype_backend="numpy_nullable")
    except pa.ArrowException as exc:
        if isinstance(exc, (OSError, ValueError)):  # a damaged file's (read_table), or no parquet file's
            raise
        import pyarrow.parquet as pq

        whole = pq.read_table(file)
        bad = unread_bad_columns(whole, used, str(file), "strings that are not UTF-8", lambda names: ValueError(
            f"{file.name} is a damaged parquet file (column {listed(names)}: a string that is not UTF-8: {exc})"))
        if not bad:
            raise ValueError(f"{file.name} is a damaged parquet file ({exc})") from exc
        # every column left checked whole
        return pd.read_parquet(file, columns=[name for name in whole.column_names if name not in bad],
                               dtype_backend="numpy_nullable")
    for name in used:
        if name in table.columns and hasattr(values := table[name].array, "__arrow_array__"):
            try:
                pa.array(values).validate(full=True)
            except pa.ArrowInvalid as exc:
                raise ValueError(f"{file.name} is a damaged parquet file (column {name!r}: {exc})") from exc
    return table


def unread_bad_columns(table: Any, used: Collection[str], where: str, held: str,
                       refused: Callable[[list[str]], Exception]) -> list[str]:
    """The columns of arrow's `table` whose data is not of its type (`valid_arrow`), which the job reads none of
    (`used`): warned of, naming `where` and what they hold; `refused(names)` raised where it reads some."""
    bad = [name for name, column in zip(table.column_names, table.columns) if not valid_arrow(column)]
    if used_bad := [name for name in bad if name in used]:
        raise refused(used_bad)
    if bad:
        log.warning("%s: its column %s holds %s; the job reads none of them: ignored", where, listed(bad), held)
    return bad


def valid_arrow(values: Any) -> bool:
    """Whether arrow's `values` (an array, chunked or not) hold what their type says (strings UTF-8, offsets within
    their buffers)."""
    import pyarrow as pa

    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def read_json(text: str, name: str) -> pd.DataFrame:
    """The records of the JSON file `name`, as its layout holds them (json_layout); "10" stays the string the user
    wrote."""
    layout = json_layout(text)
    if layout is JsonLayout.STREAM:
        return records_table(stream_records(text, name, dict))
    try:
        table = pd.read_json(io.StringIO(text), lines=layout is JsonLayout.LINES, dtype=False,
                             dtype_backend="numpy_nullable")
    except (TypeError, ValueError) as exc:  # TypeError: pandas' complaint about a record such as [1, 2] or null
        if layout is JsonLayout.ARRAY and several_values(text):  # array files joined with cat
            return in_arrays(records_table(stream_records(text, name, list)))
        if (where := first_bad_record(text, layout)) is None:  # such as an integer past 64 bits ("Value is too big!")
            raise ValueError(f"{name}: {exc}") from exc  # which file of a folder, as a CSV's error says
        raise ValueError(f"{name} {where}") from exc
    return in_arrays(table) if layout is JsonLayout.ARRAY else table


def in_arrays(table: pd.DataFrame) -> pd.DataFrame:
    """`table` marked as the records of JSON arrays, which jq finds at .[] (wrapped_hint)."""
    table.attrs[IN_ARRAYS] = True
    return table


def stream_records(text: str, name: str, kind: type[dict] | type[list]) -> list[dict]:
    """The records of a text of JSON values one after another: objects (`kind` dict), or arrays of objects (list).
    Decoded once, here: made one array for pandas, a stream was decoded twice (a third more time)."""
    records: list[dict] = []
    end = 0
    try:
        for start, end, value in json_values(text):
            if not isinstance(value, kind) or kind is list and not all(isinstance(r, dict) for r in value):
                raise ValueError(f"{name} line {line_at(text, start)} {not_records(value, kind)}")
            if isinstance(value, list):
                records.extend(value)
            else:
                records.append(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} {not_json(exc.lineno, exc)}") from exc
    except OverflowError as exc:  # json_integer's, in the value after the last one read
        line = line_at(text, JSON_BLANK.match(text, end).end())
        raise ValueError(f"{name} line {line} starts a value holding {exc}: write it as a string") from exc
    return records


def not_records(value: Any, kind: type[dict] | type[list]) -> str:
    """What is wrong with a value of a stream of objects (`kind` dict) or of arrays of objects (list)."""
    if kind is dict:
        return "is not a JSON object"
    if not isinstance(value, list):
        return "is not a JSON array, as the file's first value is"
    bad = next(i for i, record in enumerate(value) if not isinstance(record, dict))
    return f"starts an array whose record [{bad}] is not a JSON object"


def records_table(records: list[dict]) -> pd.DataFrame:
    """The table pd.read_json(dtype=False, dtype_backend="numpy_nullable") makes of an array of `records`, as it
    builds it: columns in the order the records name them, an axis of names that read as numbers (or dates) as those,
    a missing value NA whether null or absent."""
    try:
        table = pd.DataFrame(records)
    except UnicodeEncodeError:  # a lone surrogate (\ud83d, an emoji cut in two), which pandas' parser drops
        return pd.read_json(io.StringIO(json.dumps(records)), dtype=False, dtype_backend="numpy_nullable")
    table.columns = pd.read_json(io.StringIO(json.dumps([dict.fromkeys(table.columns, 0)]))).columns
    for column in [c for c, has_na in zip(table.columns, table.isna().any()) if has_na]:
        table[column] = table[column].fillna(np.nan)
    with pd.option_context("future.distinguish_nan_and_na", False):
        return table.convert_dtypes(dtype_backend="numpy_nullable")


def several_values(text: str) -> bool:
    """Whether `text` holds more than one JSON value (the first one whole)."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, JSON_BLANK.match(text).end())
    except json.JSONDecodeError:
        return False
    return JSON_BLANK.match(text, end).end() < len(text)


class JsonLayout(enum.Enum):
    LINES = enum.auto()  # JSON Lines: a value a line
    ARRAY = enum.auto()  # one array of values
    STREAM = enum.auto()  # values one after another, each over lines, as `jq .` prints them


def json_layout(text: str) -> JsonLayout:
    """How a JSON file holds its records: an array where it starts with "[", JSON Lines where its first line is a
    whole value (or it has none), else a stream of values one after another, each over lines, unless its first line
    is one of JSON Lines cut short."""
    line = first_line(text)
    if line.lstrip().startswith("["):
        return JsonLayout.ARRAY
    # "{" alone is how jq starts an object; an empty one it prints on one line, "{}", and a stream starting with one
    # was taken for JSON Lines (refused at line 2)
    if first_line(text, EMPTY_OBJECTS.match(text).end()).strip() == "{":
        return JsonLayout.STREAM
    try:
        json.loads(line or "null")
        return JsonLayout.LINES
    except json.JSONDecodeError:
        pass
    # A first line cut short is JSON Lines', its error named on it
    return JsonLayout.STREAM if first_value_parses(text) else JsonLayout.LINES


def first_value_parses(text: str) -> bool:
    """Whether the first JSON value of `text` parses, over however many lines."""
    try:
        next(json_values(text), None)
    except json.JSONDecodeError:
        return False
    except OverflowError:  # it parses: stream_records refuses its integer
        pass
    return True


def json_values(text: str) -> Iterator[tuple[int, int, Any]]:
    """Where each JSON value of a text of values one after another starts and ends, and the value: decoded one at a
    time, for a corpus' memory. A JSONDecodeError's line is the text's own."""
    decoder = json.JSONDecoder(parse_int=json_integer)
    start = JSON_BLANK.match(text).end()
    while start < len(text):
        value, end = decoder.raw_decode(text, start)
        yield start, end, value
        start = JSON_BLANK.match(text, end).end()


def json_integer(digits: str) -> int:
    """A JSON integer, refused past 64 bits (an OverflowError) as pandas refuses it in an array or JSON Lines
    ("Value is too big!"): a stream or joined arrays, decoded here, were read where one array was refused."""
    if (value := int(digits)) not in JSON_INTEGERS:
        raise OverflowError(f"an integer past 64 bits ({digits})")
    return value


JSON_INTEGERS = range(-2 ** 63, 2 ** 64)  # int64's and uint64's: those pandas reads of JSON
JSON_BLANK = re.compile(r"[ \t\n\r\ufeff]*")  # JSON's whitespace, and the byte order mark of each file joined
EMPTY_OBJECTS = re.compile(r"([ \t\n\r\ufeff]*\{[ \t]*\}[ \t\r]*\n)*")  # lines of "{}" (json_layout)
FIRST_LINE = re.compile(r"^[^\S\r\n]*\S[^\r\n]*", re.M)


def first_line(text: str, start: int = 0) -> str:
    """The first line of `text` (from `start`, a line's) that is not blank ("" where none is): found, not the whole
    text split in lines."""
    found = FIRST_LINE.search(text, start)
    return found[0] if found else ""


def without_repeated_headers(table: pd.DataFrame, header: list[str], name: str) -> pd.DataFrame:
    """`table` less its rows that repeat its header, as files joined with `cat` and frames appended by to_csv(mode="a")
    hold (an index's empty name first): each was a row, its label the name of the label column a class of its own. A
    BOM (a joined file's from Excel) and the spaces around a cell do not count."""
    if len(header) != len(table.columns) or table.empty:
        return table
    header = [written.strip().lstrip("\ufeff") for written in header]
    first = table.iloc[:, 0]
    # Rows that may be one, by a test that copies no text (a corpus' texts may be gigabytes); then those alone
    maybe = first.isna() if not header[0] else first.str.contains(header[0], regex=False).fillna(False).astype(bool)
    if not maybe.any():
        return table
    repeated = pd.Series(True, index=table.index[maybe.to_numpy()])
    for column, written in zip(table.columns, header):
        cells = table.loc[repeated.index, column].fillna("").astype(str).str.strip().str.lstrip("\ufeff")
        repeated &= (cells == written).to_numpy()
    if not repeated.any():
        return table
    rows = repeated.index[repeated.to_numpy()]
    log.warning("%s: dropped %d row(s) that repeat its header (files joined with theirs?), the first after %d data "
                "row(s)", name, len(rows), table.index.get_loc(rows[0]))
    return table.drop(index=rows).reset_index(drop=True)


def with_repeats_renamed(table: pd.DataFrame, header: list[str]) -> pd.DataFrame:
    """`table` with each column whose name its `header` wrote before renamed repeat_of(name, copy), in place:
    pandas named a second 'label' 'label.1', which a header may hold too, and a configured column the header
    repeats was read as its first copy alone, silently; check_columns refuses it."""
    if len(set(header)) < len(header) == len(table.columns):  # not a header whose quoted name holds a line break
        table.columns = [repeat_of(name, header[:i].count(name)) if name in header[:i] else column
                         for i, (name, column) in enumerate(zip(header, table.columns))]
    return table


def repeat_of(name: str, copy: int) -> str:
    """The column of a header's `copy`th repeat of `name`: a NUL in it, which no header holds, as in TABLE_FOLDER."""
    return f"{name}\0{copy}"


def read_delimited(text: str, name: str, sep: str) -> pd.DataFrame:
    """A CSV's rows, with quoting. A quote that starts a cell and closes lines later, mid-cell (a text that starts
    with a quote, unquoted), takes in the rows between as that cell's text: refused, naming its line. A
    tab-separated file is read again without quoting, as IANA's TSV and GLUE's files are written (their texts start
    with `"`)."""
    try:
        table = read_rows(text, name, sep, csv.QUOTE_MINIMAL)
        # the check first: it is quick where no cell holds lines (most files); the strict parse reads all the text
        if (swallowed := swallowed_rows(text, table, sep)) is None:
            return table
        if quoted_as_written(text, sep):  # a writer's quotes, or a stray one that closes just before a separator
            log.warning("%s %s; read as quoted, as its every quote closes where a cell ends", name, swallowed)
            return table
    except pd.errors.ParserError as exc:  # such as a quote that never closes ("EOF inside string")
        if sep != "\t":
            raise
        swallowed = str(exc)
    if sep != "\t":
        raise ValueError(f'{name} {swallowed}; quote a text that starts with a quote and double its quotes ("""Hi"", '
                         'she said")')
    # A csv writer's quotes always close where a cell ends: this file was written without quoting.
    log.warning("%s: %s; reading it without quoting, as a TSV", name, swallowed)
    return read_rows(text, name, "\t", csv.QUOTE_NONE)


def read_rows(text: str, name: str, sep: str, quoting: int) -> pd.DataFrame:
    # Only an empty cell is missing: a label "None" or "NA", or the text "null", is data. A cell is the string it
    # holds: as numbers, the texts 007 and 12 came back "7.0" and "12.0" where the column had an empty cell. The
    # spaces an unquoted cell starts with, after a separator or at a line's start, are none of it, as in csv readers
    # ("text, label" names a column 'label'; `, "a, b"` is quoted); a quoted cell keeps them.
    options = dict(sep=sep, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True, quoting=quoting)
    table = pd.read_csv(io.StringIO(text), **options)
    if isinstance(table.index, pd.RangeIndex):
        return table
    # Rows of one field more than the header: pandas read their first fields as the index, the rest as the columns
    if table.index.nlevels == 1 and table.iloc[:, -1].isna().all():  # "t0,a,": a separator ends every row
        return pd.read_csv(io.StringIO(text), index_col=False, **options)
    if row_names(table.index, text):
        return table.reset_index(drop=True)
    raise ValueError(f"{name} {first_long_row(text, sep, quoting)}")


def row_names(index: pd.Index, text: str) -> bool:
    """Whether the first fields of rows longer than the header are row names, which the header does not name: they
    number the rows 1..n (R's write.table) or 0..n-1 (pandas' to_csv), in any order (a shuffled frame's), or they are
    distinct whole numbers in quotes (R quotes them: a filtered frame's), where no comma in a text makes a field
    more. Other numbers are refused, naming the line: a named id column with a separator in its texts ("48213,great
    acting, fun plot") reads just as row names do, and taken for them shifted every column."""
    names = [str(i) for i in index] if index.nlevels == 1 else []
    if not names or not index.is_unique or not all(n.isascii() and n.isdigit() for n in names):
        return False
    numbers = {int(n) for n in names}
    first_row = text.partition("\n")[2].partition("\n")[0]
    return numbers in ({*range(1, len(names) + 1)}, {*range(len(names))}) or bool(re.match(r'\s*"\d+"', first_row))


def quoted_as_written(text: str, sep: str) -> bool:
    """Whether every quote that opens a cell closes just before a separator or a line's end, as a csv writer's
    quotes do: then a quoted cell's lines are its text whatever they read as ("Overall, positive" in a review). A
    quote that takes in rows (an unquoted text's first character) closes mid-cell, `bye " she said,b`, unless it
    happens to close just before a separator: then the file is read as pandas reads it."""
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))  # a written cell may be any length
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), delimiter=sep, skipinitialspace=True, strict=True):
            pass
    except csv.Error:  # such a quote, or one that never closes
        return False
    finally:
        csv.field_size_limit(limit)
    return True


def swallowed_rows(text: str, table: pd.DataFrame, sep: str) -> str | None:
    """Where a quoted cell holds lines that read as rows of the file, None where none does. A line of a cell is
    taken for a row where it splits into the fields a row has there (at the cell's first line, those from the
    cell's column on) and one of them, outside the cell's column, is a value that its column holds in the table
    (a label): a text of several lines, even with separators in them, rarely ends its lines in a label."""
    @functools.cache
    def values(name: str) -> set[str]:  # read only for a table with a cell of several lines, once a column
        return set(table[name].dropna().astype(str).str.strip())

    columns = list(table.columns)
    for place, column in enumerate(columns):
        if not pd.api.types.is_string_dtype(table[column]):
            continue
        for row, cell in table[column][table[column].str.contains("[\r\n]", na=False)].items():
            lines = re.split(r"\r\n?|\n", cell)
            for i, line in enumerate(lines[:-1]):  # the last ends where the quote closes: a row's start at most
                fields = line_fields(line, sep)
                names = columns[place if i == 0 else 0:]
                if len(fields) == len(names) and any(
                        name != column and field.strip() in values(name)
                        for name, field in zip(names, fields)):
                    return (f"{rows_of(text, sep, int(row))}: the quote that opens its cell in column {column!r} "
                            f"takes in what reads as a row ({line.strip()[:80]!r})")
    return None


def line_fields(line: str, sep: str) -> list[str]:
    """A line's fields, none where one is over csv's field size limit (128 KiB of a text: no row's)."""
    try:
        return next(csv.reader([line], delimiter=sep, skipinitialspace=True), [])
    except csv.Error:
        return []


def rows_of(text: str, sep: str, row: int) -> str:
    """The lines of the file that the table's row (from 0) was read from, as pandas reads them (blank lines none)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep, skipinitialspace=True)
    start, records = 1, -1  # the header is record 0
    try:
        for fields in reader:
            records += bool(fields)
            if records == row + 1:
                return f"lines {start}-{reader.line_num}"
            start = reader.line_num + 1
    except csv.Error:  # a cell over csv's field size limit
        pass
    return f"row {row + 1}"


def first_long_row(text: str, sep: str, quoting: int) -> str:
    """Where the first row with more fields than the header is: every row of a text with an unquoted separator
    in it ("hello, world,pos") has one more, as has every row of a column that the header does not name."""
    reader = csv.reader(io.StringIO(text), delimiter=sep, skipinitialspace=True, quoting=quoting)  # as pandas reads it
    header = next(reader)
    try:
        where = next((f"line {reader.line_num}" for row in reader if len(row) > len(header)), "a row")
    except csv.Error:  # a cell over csv's field size limit before such a row
        where = "a row"
    return (f"{where} has more fields than its header ({len(header)}): quote a field that holds {sep!r}, "
            "or name every column in the header")


def csv_separator(text: str, suffix: str) -> str:
    """The separator the header line uses most: a comma, or a tab (a .tsv), a semicolon (Excel's where a comma is
    the decimal point) or a pipe, which read with commas made one column named 'text;label'. A tie goes to the
    file's own: a .tsv's tab, where a one-column header (a causal LM's `text`) had 'Hello, world' split at its comma."""
    header = text.split("\n", 1)[0]
    order = "\t" + CSV_SEPARATORS.replace("\t", "") if suffix.lower() == ".tsv" else CSV_SEPARATORS
    return max(order, key=header.count)


def first_bad_record(text: str, layout: JsonLayout) -> str | None:
    """Where the first record of a JSON text that is not JSON, or not an object, is and what is wrong with it:
    pandas names only a character offset ("Expected object or value at position 1437")."""
    number = 0
    try:
        if layout is JsonLayout.ARRAY:
            return next((f"record [{i}] is not a JSON object" for i, record in enumerate(json.loads(text))
                         if not isinstance(record, dict)), None)
        for number, line in enumerate(text.split("\n"), 1):  # as pandas splits: not at a string's U+2028
            if line.strip() and not isinstance(json.loads(line), dict):
                return f"line {number} is not a JSON object"
    except json.JSONDecodeError as exc:
        return not_json(number if layout is JsonLayout.LINES else exc.lineno, exc)
    return None


def not_json(line: int, exc: json.JSONDecodeError) -> str:
    return f"line {line} is not JSON ({exc.msg}, column {exc.colno})"


def line_at(text: str, at: int) -> int:
    """The number of the line of `text` that its character `at` is on."""
    return text.count("\n", 0, at) + 1


def read_text(file: Path) -> str:
    """UTF-8 when the bytes are UTF-8 (UTF-16 when they start with its byte order mark); otherwise each line that is
    not UTF-8 as Windows-1252, what Excel saves a CSV in on Windows, and where that has no character for a byte,
    Latin-1, which maps every byte and never fails (the two differ only in 0x80-0x9f: Windows' “quotes”, € and
    dashes, Latin-1's controls).

    Scraped corpora (the bundled sentiment CSV among them) mix encodings; refusing them would make the user
    re-encode by hand. Line by line, one stray byte garbles its own line, not every UTF-8 character of the file.
    """
    raw = decompressed(file)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # what Windows PowerShell 5's > and Out-File write
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    # a UTF-8 file's mark, more lines appended in another encoding; a UTF-8 character holds no \r or \n byte
    lines = raw.removeprefix(codecs.BOM_UTF8).splitlines(keepends=True)
    decoded = [decoded_line(line) for line in lines]
    legacy = [(number, encoding) for number, (_, encoding) in enumerate(decoded, 1) if encoding != "UTF-8"]
    log.warning("%s: %d of its %d lines are not valid UTF-8 (the first: line %d); reading them as %s", file,
                len(legacy), len(lines), legacy[0][0], " or ".join(sorted({encoding for _, encoding in legacy})))
    return "".join(text for text, _ in decoded)


def decoded_line(line: bytes) -> tuple[str, str]:
    """A line's text and the encoding it was read in: UTF-8, else Windows-1252, else Latin-1."""
    for codec, encoding in (("utf-8", "UTF-8"), ("cp1252", "Windows-1252")):
        try:
            return line.decode(codec), encoding
        except UnicodeDecodeError:
            pass
    return line.decode("latin-1"), "Latin-1"


def decompressed(file: Path) -> bytes:
    """The file's bytes, decompressed where its suffix names a compression."""
    raw = file.read_bytes()
    if (suffix := file.suffix.lower()) not in DECOMPRESSORS:
        return raw
    if (decompress := DECOMPRESSORS[suffix]) is None:
        raise ValueError(f"{file.name} is compressed with zstd, which the trainer does not read: decompress it "
                         "(zstd -d) or compress it with gzip")
    try:
        return decompress(raw)
    # cut short, or compressed otherwise; bz2 raises a stream cut short as a ValueError, which named no file
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"{file.name} does not decompress as {suffix} ({exc})") from exc


def read_image_splits(path: Path, listings: dict[Path, list[Path]]) -> dict[str, pd.DataFrame]:
    """An ImageFolder, or one per split in folders named by split that hold class folders (train/cat/*.png,
    test/cat/*.png: torchvision's and the hub's layout); `listings`: the load's data_folders."""
    # A folder without images decides nothing: __MACOSX/ (a Mac's zip: ._ files only) or docs/ beside train/ and
    # test/ named no split, which made those two the classes.
    folders = image_folders(path, listings)
    deciding = [d for d in folders if d not in shortcuts(folders)]
    named = list(zip(folder_splits(deciding), deciding))
    walks: dict[tuple[Path, frozenset[str]], bool] = {}  # read_through's, by folder and targets: each walked once
    labelled = labelled_splits(path, named, listings, walks)
    if TRAIN not in labelled:
        if labelled and None not in dict(named) and TRAIN not in dict(named):
            raise DataError(f"{path}: its folders name splits ({', '.join(d.name for d in folders)}) but none is train")
        warn_splits_read_as_classes(path, folders)
        # class folders (a class may be named test or train: it holds images)
        return read_image_tables(path, {TRAIN: path}, listings)
    # train/ holds class folders: the others are no classes (Kaggle's test/ of the images to predict, a samples/)
    # seg_train/ of train -> seg_train/seg_train is read too, and so is a shortcut into a split (preview -> train/cat)
    reals = {os.path.realpath(d) for d in labelled.values()}
    for folder in (d for d in folders
                   if not read_through(d, reals, walks) and not lies_in(os.path.realpath(d), reals)):
        log.warning("%s: its images are in no class folder of a split, so unlabelled: not used", folder)
    splits = {name: labelled[name] for name in (TRAIN, VALIDATION, TEST) if name in labelled}
    # train first (without it nothing is learnt; test is then held out of it), then test before validation: the
    # final score is on the folder meant for it, and validation is held out of train
    claims = [name for name in (TRAIN, TEST, VALIDATION) if name in splits]
    return read_image_tables(path, distinct_folders(splits, "the {} split", claims), listings)


def labelled_splits(path: Path, named: list[tuple[str | None, Path]], listings: dict[Path, list[Path]],
                    walks: dict[tuple[Path, frozenset[str]], bool]) -> dict[str, Path]:
    """The folders of `named` (split, folder) that hold class folders, by split. Two folders may name one split: one
    that is the other, or holds images only in it (val -> validation; seg_test/ of test -> seg_test/seg_test, Intel's
    nesting linked), is read as the inner one; others the user must choose between (the last one was taken, the
    other said unlabelled, unread: test/ beside a test_images/test_images/ of the images to predict)."""
    labelled: dict[str, Path] = {}
    for name, folder in named:
        if name is None or not any(has_images(c) for c in data_folders(folder, listings)):
            continue
        if (kept := labelled.setdefault(name, folder)) == folder:
            continue
        if not (read_through(kept, {os.path.realpath(folder)}, walks)
                or read_through(folder, {os.path.realpath(kept)}, walks)):
            raise DataError(f"{path}: {kept.name} and {folder.name} both name the {name} split and hold images in "
                            "folders: keep one, or name the other for no split")
        labelled[name] = max((kept, folder), key=lambda d: len(os.path.realpath(d)))  # the inner one
    return labelled


def read_through(folder: Path, reals: set[str], walks: dict[tuple[Path, frozenset[str]], bool]) -> bool:
    """Whether `folder` is read as, or only through, the folders of real paths `reals`: it is one, or holds images
    only in those below it (seg_train/ of a train -> seg_train/seg_train), not a class of one (training ->
    train/cat, beside train/dog). `walks`: the load's linked_into answers, by folder and targets, since the unused
    folders' warning asks labelled_splits' again (seg_train/ was walked twice)."""
    real = os.path.realpath(folder)
    inner = frozenset(r for r in reals if within(r, real))
    if real in reals or not inner:
        return real in reals
    if (folder, inner) not in walks:
        walks[folder, inner] = linked_into(folder, inner)
    return walks[folder, inner]


def read_image_tables(path: Path, splits: dict[str, Path],
                      listings: dict[Path, list[Path]]) -> dict[str, pd.DataFrame]:
    """The image dataset `path`'s tables of its split folders `splits`, each image read once."""
    links: set[str] = set()  # the class folders' files that are links (Found.links)
    tables = {name: read_image_folder(folder, listings, links) for name, folder in splits.items()}
    check_read_once(path, splits, tables, links)
    return tables


def distinct_folders(folders: dict[str, Path], role: str, claims: list[str]) -> dict[str, Path]:
    """The split or class folders by name, less those whose real folder another reads: of the names that share one,
    the first in `claims` reads it, and the others are skipped, which is said (`role`, formatted with a name).
    validation -> test made test's images the validation split (early stopping chose on the test set), kitty -> cat
    a third class of cat's images. Skipped, nothing is read wrong: the validation split is then held out of train,
    and cat's images are read once, as cat."""
    read: dict[str, str] = {}  # a folder's real path: its name
    for name in claims:
        if (real := os.path.realpath(folder := folders[name])) in read:
            link = folder if folder.is_symlink() else folders[read[real]]  # test -> validation: test names it
            log.warning("%s links to %s, read as %s: not read again, as %s", link, real,
                        role.format(read[real]), role.format(name))
        else:
            read[real] = name
    return {name: folder for name, folder in folders.items() if name in read.values()}


def check_read_once(path: Path, splits: dict[str, Path], tables: dict[str, pd.DataFrame], links: set[str]) -> None:
    """Refuse an image that a folder link reads in two splits or as two classes: test/cat -> ../train/cat read
    train's cats into test too (the model scored on images it trained on), cat/more -> ../dog read dog's images as
    cats too; so an image file's link to an image read where it lies (train/cat/x.png -> ../../test/cat/0.png).
    Refused, not skipped as a linked split or class is (distinct_folders): which read is meant is the owner's to
    say, and a skip would score test without its cats, or train on a layout that calls dogs cats. `links`: the
    class folders' files that are links (Found.links)."""
    read: dict[str, tuple[str, str, str]] = {}  # an image's real place: its split, class and path as read
    file_links: list[tuple[str, str, str]] = []  # the images that are links: their split, class and path
    reals: dict[str, str] = {}  # real_folder's
    for name, table in tables.items():
        images = table[IMAGE_COLUMN].tolist()  # a list: a column's items are slower to iterate, here twice
        for image, label, place in zip(images, table["label"].tolist(), real_places(images, reals)):
            if (first := read.setdefault(place, (name, label, image)))[:2] != (name, label):
                raise DataError(f"{path}: {read_twice(path, splits, place, (name, label, image), first)}")
            if image in links:
                file_links.append((name, label, image))
    # not the hub cache's links to blobs, which no path reads where they lie: two in two splits are two copies
    for name, label, image in file_links:
        if (first := read.get(real := real_file(image, reals, read), (name, label, image)))[:2] != (name, label):
            said = [read_as(path, splits, name, label), read_as(path, splits, *first[:2])]
            raise DataError(f"{path}: {linked_twice(image, real, said, real)}")  # where it stopped, not a blob


def read_twice(path: Path, splits: dict[str, Path], place: str, *reads: tuple[str, str, str]) -> str:
    """Why the image at `place` is read twice (`reads`, by split, class and path), by what to blame: a link inside
    a class folder (cat/more -> ../dog, not the test -> /elsewhere/test above the other path), else a real class
    folder holding a folder that a class links to, with that link (a pool/ of cat -> pool/cat, which holds an
    unlinked bird/ too; a cat/ of tabby -> cat/tabby), else a class folder's link (test/cat -> ../train/cat)."""
    said = [read_as(path, splits, split, label) for split, label, _ in reads]
    entries = entered_by(*(image for _, _, image in reads))
    inside = [i for i, (split, label, _) in enumerate(reads) if splits[split] / label in entries[i].parents]
    links = [i for i in inside if entries[i].is_symlink()]
    # a holder that is a link (cat -> /elsewhere/cats beside tabby -> /elsewhere/cats/tabby) is no real folder to
    # link each folder of beside it: the other link is blamed
    if inside and not links and not (splits[reads[inside[0]][0]] / reads[inside[0]][1]).is_symlink():
        holder, other = inside[0], 1 - inside[0]
        return (f"{splits[reads[holder][0]] / reads[holder][1]} is read as {said[holder]}, and holds "
                f"{entries[holder]}, which {entries[other]} links to, read as {said[other]}: an image is read once, "
                f"as one class of one split ({place}); remove the link, or link each folder of it beside it (a "
                "folder that holds only the targets of two or more links beside it is no class)")
    link = entries[links[0] if links else 0 if entries[0].is_symlink() else 1]
    return linked_twice(link, place, said)


def read_as(path: Path, splits: dict[str, Path], split: str, label: str) -> str:
    """How an image of the dataset `path` is read: its class, and its split where the dataset has split folders,
    not where its classes are at its root."""
    return f"class {label}" + (f" of the {split} split" if splits[split] != path else "")


def linked_twice(link: Path | str, place: str, said: list[str], target: str | None = None) -> str:
    """The refusal of the `link` (to `target`, by default its real path) through which the image at `place` is read
    as each of `said`."""
    return (f"{link} links to {target or os.path.realpath(link)}, which reads {place} as {' and as '.join(said)}; an "
            "image is read once, as one class of one split: remove the link")


def entered_by(*images: str) -> list[Path]:
    """The folders through which the paths `images` of one image (real_places) come into the real folder it lies
    in: their highest folders that are one real folder, level by level up from the image's; one of them a link."""
    chains = [Path(image).parents for image in images]
    level = 0
    while (all(level + 1 < len(c) for c in chains)
           and len({os.path.realpath(c[level + 1]) for c in chains}) == 1):
        level += 1
    return [c[level] for c in chains]


def real_places(images: Iterable[str], reals: dict[str, str]) -> list[str]:
    """Where the images lie: in their folders' real paths (real_folder, remembered in `reals`). Not their own: the
    hub's cache links each file to a blob by its contents, and two copies of one image are two images. An image in
    a folder that is its own real path (most are) lies where it is read: no path joined."""
    return [image if (real := real_folder(folder := os.path.dirname(image), reals)) == folder
            else os.path.join(real, os.path.basename(image)) for image in images]


def real_file(link: str, reals: dict[str, str], read: Collection[str]) -> str:
    """The real path of the file that `link`, a file link, leads to: each link's target by its folder's real path
    (real_folder), not a realpath of each link, an lstat a level (20,000 links of the hub's cache). It stops at an
    image `read` where it lies: a link to another split's image that itself links on to a blob (every image of the
    hub's cache does) is a link to that image."""
    target = os.path.join(real_folder(os.path.dirname(link), reals), os.readlink(link))
    real = os.path.join(real_folder(os.path.dirname(target), reals), os.path.basename(target))
    return real if real in read or not os.path.islink(real) else real_file(real, reals, read)


def real_folder(folder: str, reals: dict[str, str]) -> str:
    """The real path of `folder`: its parent's (remembered in `reals`) and its name, where it is no link; one lstat
    a folder, not a realpath (one a level) of each: 42,000 folders of one image each, 14 deep, took longer than
    their walk."""
    if (real := reals.get(folder)) is None:
        parent = os.path.dirname(folder)
        if os.path.basename(folder) in ("", ".") and parent not in ("", folder):  # a/./b in a link's target: a's
            real = reals[folder] = real_folder(parent, reals)
            return real
        resolved = parent in ("", folder) or os.path.basename(folder) == ".." or os.path.islink(folder)
        real = reals[folder] = (os.path.realpath(folder) if resolved else
                                os.path.join(real_folder(parent, reals), os.path.basename(folder)))
    return real


def warn_splits_read_as_classes(path: Path, folders: list[Path]) -> None:
    """Say where folders read as classes name two splits or more and hold no image of their own: Kaggle's Intel
    scenes unzip to seg_train/ and seg_test/ (their class folders a level down) beside seg_pred/ (images to predict),
    which names no split, and the model was trained to tell the three folders apart, without a word."""
    named = [d for d in folders if split_of(d.name) is not None
             and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())]
    others = [d.name for d in folders if d not in named]
    if len({split_of(d.name) for d in named}) > 1 and others:
        log.warning("%s: its folders %s name splits, but %s names none, so all are read as classes (folders are "
                    "splits where every one names a split, or by their whole names: train, val, test); point "
                    "dataset.uri at the train split's folder of class folders, or rename the split folders", path,
                    listed([d.name for d in named]), listed(others))


def read_image_folder(path: Path, listings: dict[Path, list[Path]], links: set[str]) -> pd.DataFrame:
    """The images of the class folders in `path`, by class; their files that are links added to `links`."""
    rows, empty, heif = [], [], []
    classes = {d.name: d for d in data_folders(path, listings)}
    real_first = sorted(classes, key=lambda name: classes[name].is_symlink())  # kitty -> cat: cat names it
    for class_dir in distinct_folders(classes, "class {}", real_first).values():
        images = list((found := Found(class_dir)).files(IMAGE_SUFFIXES))  # its subfolders' too, as torchvision's
        found.say_skipped()
        rows += [{IMAGE_COLUMN: str(image), "label": class_dir.name} for image in images]
        links.update(found.links)
        heif += found.files(HEIF_SUFFIXES)
        if not images:
            empty.append(class_dir.name)
    if not rows:
        raise DataError(f"{path}: no images in its class folders")
    if empty:  # the model will not know these classes, nor be scored on them
        log.warning("%s: class folders without images, so not classes: %s", path, ", ".join(empty))
    say_unread_images(path, listings[beside(path)], heif)
    return pd.DataFrame(rows)


def say_unread_images(path: Path, loose: list[Path], heif: list[Path]) -> None:
    """Say the images of the ImageFolder (or split folder) `path` that are not read, with a count and the first few:
    those `loose` beside its class folders, in none (a train/x.png beside train/cat/), and its classes' `heif`
    files. Both were left out without a word, and a user who meant them to be trained on did not know."""
    if loose:
        log.warning("%s: %d images beside its class folders, in none, so unlabelled: not used (%s)", path, len(loose),
                    listed([p.name for p in loose], most=3))
    if heif:
        log.warning("%s: %d HEIC/HEIF images, which the trainer cannot read: not used; convert them to JPEG or PNG "
                    "(%s)", path, len(heif), listed([str(p.relative_to(path)) for p in heif], most=3))


def holds_class_folders(path: Path, listings: dict[Path, list[Path]]) -> bool:
    """Whether a folder is an ImageFolder by its folders: two or more class folders holding images, in it or in its
    train/ (not the hub's train/*.png beside a train/metadata.csv, nor one images/ folder that a table names)."""
    return path.is_dir() and len(image_folders(train_folder(path, listings), listings)) >= 2


def train_folder(path: Path, listings: dict[Path, list[Path]]) -> Path:
    """The folder of an image dataset's train class folders: its train/ where a folder names the split, else itself."""
    folders = image_folders(path, listings)
    return next((d for d, name in zip(folders, folder_splits(folders)) if name == TRAIN), path)


def shortcuts(folders: list[Path]) -> set[Path]:
    """The links among an image dataset's top `folders`, not named by a split's whole name, into a real folder beside
    them (preview_Cat -> training_set/Cat, test_preview -> test/Cat): no splits, so they decide none; they made the
    splits read by whole names only (folder_splits), and training_set/ beside test_set/ a class, or took a split's
    name from its folder. Not train -> v3/train, a split, where v3/ holds more than its links reach."""
    reals = {os.path.realpath(d) for d in folders if not d.is_symlink()}
    return {d for d in folders if d.is_symlink() and not split_of(d.name, whole=True)
            and any(within(target := os.path.realpath(d), real) and target != real for real in reals)}


def image_folders(path: Path, listings: dict[Path, list[Path]]) -> list[Path]:
    """The data folders in `path` that hold images below them."""
    return [d for d in data_folders(path, listings) if has_images(d)]


def data_folders(path: Path, listings: dict[Path, list[Path]]) -> list[Path]:
    """The data folders in `path` (folders_in), listed once a load: remembered in `listings` (Found.listings)."""
    if (folders := listings.get(path)) is None:
        folders = listings[path] = folders_in(path, listings)
    return folders


def beside(folder: Path) -> Path:
    """Where a load's listings keep the image files that `folder` holds beside its data folders (folders_in), which
    read_image_folder says are in no class: a NUL in it, which no real path holds (as in TABLE_FOLDER)."""
    return folder / "\0"


def folders_in(path: Path, listings: dict[Path, list[Path]]) -> list[Path]:
    """The data folders in `path` (data_folder), in sorted order, that may be splits or classes: not a real folder
    that the links beside it stand for (stood_for), which is none itself. `listings`: the load's data_folders,
    through which release_links lists the links' folders."""
    entries = [(entry, entry.is_dir()) for entry in sorted(path.iterdir())]  # a stat each, once: a class's images
    folders = [d for d, is_dir in entries if is_dir and data_folder(d.name)]
    # loose beside class folders only: a folder of no data folders (the hub's train/*.png) would keep all its images
    listings[beside(path)] = [f for f, is_dir in entries if folders and not is_dir
                              and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    links = {d: os.path.realpath(d) for d in folders if d.is_symlink()}
    # a real folder holds targets only where its real path is above one: a lookup each, not a walk each
    above = {str(p) for t in links.values() for p in Path(t).parents}
    if not above:
        return folders
    real = os.path.realpath(path)  # a real folder's real path is its parent's and its name: no realpath each
    named = [d for d in folders if d not in links and split_of(d.name) and has_images(d)]  # not a training_logs/
    return [d for d in folders if d in links or (inside := os.path.join(real, d.name)) not in above
            or not stood_for(d, inside, links, listings, by_word=any(other != d for other in named))]


def stood_for(folder: Path, real: str, links: dict[Path, str], listings: dict[Path, list[Path]],
              by_word: bool) -> bool:
    """Whether the links beside the real `folder` (by their real paths) stand for it, in its place: two or more
    link into it and it holds images only there (a release v3/ of train -> v3/train and test -> v3/test, a pool/ of
    cat -> pool/cat and dog -> pool/dog), and they name splits where its name does. Not a train/ beside test/ that
    shortcuts cat -> train/cat and dog -> train/dog link into: they are no splits, and it is the train split. Nor a
    class cat/ of kittens/ alone that kittens -> cat/kittens links to: it may be cat of the other splits, and its
    images, read as both classes, are refused (check_read_once). Said where it is so: the folder is read only
    through them. `real`: the folder's real path; `by_word`: whether another real folder beside it names a split by
    a word (test_set/ beside training_set/: the splits are named so), else a split is named by its whole name (a
    pool test_images/ alone is a pool)."""
    into = [d for d, target in links.items() if within(target, real) and target != real]  # kitty -> cat: a class
    if (len(into) < 2 or split_of(folder.name, not by_word) and not release_links(into, by_word, listings)
            or not linked_into(folder, {links[d] for d in into})):
        return False
    said_once(f"{folder} holds images only in the folders that {listed([str(d) for d in into])} link to: read "
              "through them, it is no split nor class itself")
    return True


def release_links(links: list[Path], by_word: bool, listings: dict[Path, list[Path]]) -> bool:
    """Whether `links` into a folder named by a split can stand for it, as a release's: each names another split
    (test_set_Cat and test_set_Dog are shortcuts) and holds class folders (val_Cat and test_Dog into test/Cat and
    test/Dog are shortcuts too: test/ was dropped). Their folders are listed through `listings` (data_folders): a
    release's are read as its splits, and were listed twice."""
    splits = [split_of(d.name, not by_word) for d in links]
    return (all(splits) and len(set(splits)) == len(splits)
            and all(any(has_images(c) for c in data_folders(d, listings)) for d in links))


def linked_into(folder: Path, targets: set[str]) -> bool:
    """Whether the real `folder` holds images only in the real folders `targets` below it: its other folders walked,
    to their first image (as has_images), not the targets. A folder it may not list is refused, as the dataset's
    walk (Found) refused it already."""
    for root, dirs, files in walk_below(folder):
        if lies_in(os.path.realpath(root), targets):
            dirs.clear()
        elif any(Path(root, name).suffix.lower() in IMAGE_SUFFIXES and Path(root, name).is_file() for name in files):
            return False
    return True


def lies_in(path: str, folders: set[str]) -> bool:
    """Whether the real `path` is one of the real `folders` or below one: its parents looked up in them."""
    return path in folders or any(str(p) in folders for p in Path(path).parents)


def folder_splits(folders: list[Path]) -> list[str | None]:
    """The split each of an image dataset's top folders names: by its whole name (train/, Val/), or by a word in it
    (training_set/, seg_test/) only where every folder names a split, since a class may hold one: train_station/
    beside airport_terminal/ is a class, not the train split."""
    by_word = [split_of(d.name) for d in folders]
    return by_word if all(by_word) else [split_of(d.name, whole=True) for d in folders]


def has_images(folder: Path) -> bool:
    """Whether an image file (not hidden) lies anywhere below `folder`; stops at the first."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in files_below(folder))


def label_ids(column: pd.Series) -> tuple[dict[int, str], list[int]]:
    """Ids in sorted label order (label_order), so runs agree."""
    # Named by their text, once each: a name depends on nothing else, and keyed by value, True, 1 and 1.0 were one key,
    # named after whichever came first
    texts = column.astype(str)
    names = texts.map({text: label_name(text) for text in texts.unique()})
    distinct = names.unique().tolist()
    ordered = sorted(distinct, key=label_order)
    index = {name: i for i, name in enumerate(ordered)}
    return dict(enumerate(ordered)), [index[n] for n in names]


def label_order(name: str) -> tuple[bool, float, str]:
    """Where a label sorts: the numbers first, by value (2 before 10), then the others by their text; a class
    "nan" among numbers made them all sort as text, 10 before 2."""
    number = is_number(name)
    return not number, float(name) if number else 0.0, name


# A whole number in ASCII digits, perhaps written as a float (1.0), without a leading zero: "007" (a class folder of
# GTSRB's 00007/) is a name. Not what float() reads: 1_000, 1e3 and 1000 were one class, ١ (Arabic-Indic) and 1 one.
WHOLE_NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.0*)?")


def label_name(value: Any) -> str:
    """A label as its class name: without the spaces around it (a CSV's "text, pos"), and a whole number written
    as a float as that number, so that 1, 1.0 and "1" are one class (a float column, a file that writes 1.0).
    Composed (NFC), as a class folder's name too: macOS and some editors write "café" decomposed, and the two
    spellings were two classes."""
    text = unicodedata.normalize("NFC", str(value)).strip()
    # exact: "+1" is 1, and so is "1.0"; a long id keeps its digits
    return str(int(Decimal(text))) if WHOLE_NUMBER.fullmatch(text) else text


def class_names(found: Found, fmt: DatasetFormat, field: str) -> list[str] | None:
    """The names a hub dataset gives its integer labels (a ClassLabel feature): in a save_to_disk dataset's
    features, or in the schema metadata that `datasets` (and so the hub) writes into parquet files."""
    path = found.path
    if fmt == DatasetFormat.HF_DISK:
        import datasets

        loaded = load_saved(path)
        splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        feature = next(iter(splits)).features.get(field)
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if fmt == DatasetFormat.PARQUET:
        import pyarrow.parquet as pq

        first = path if path.is_file() else next(found.files({".parquet"}))
        # the file's own to get right: a JSONDecodeError, or an AttributeError or TypeError of a value of another
        # shape, escaped as the pod's fault (exit 2, retried)
        try:
            hub = json.loads((pq.read_schema(first).metadata or {}).get(b"huggingface", b"{}"))
        except ValueError as exc:
            raise DataError(f"{first}: its schema metadata 'huggingface' is not JSON ({exc})") from exc
        info = hub.get("info") if isinstance(hub, dict) else None
        features = info.get("features") if isinstance(info, dict) else None
        feature = features.get(field) if isinstance(features, dict) else None
        if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
            return None
        if not (isinstance(names := feature.get("names"), list) and all(isinstance(name, str) for name in names)):
            raise DataError(f"{first}: its schema metadata 'huggingface' gives column {field!r} (dataset.labelField) "
                            f"a ClassLabel whose names are {names!r}, not a list of texts")
        return names
    return None


def named_classes(id2label: dict[int, str], names: list[str] | None) -> dict[int, str]:
    """`id2label` with each label that is a class number of `names` named by it: ASCII digits, as label_name writes
    a whole number (str.isdigit() holds for "²", which int() refuses, and for "١", which label_name keeps a name)."""
    if names is None:
        return id2label
    return {i: names[int(label)] if label.isascii() and label.isdigit() and int(label) < len(names) else label
            for i, label in id2label.items()}


def is_number(text: str) -> bool:
    """Whether a label is a finite number: a CSV's "nan" is a class of that name (only an empty cell is missing), and
    as a number it compared false with every other, leaving numeric labels in the order of the rows."""
    return is_float(text) and math.isfinite(float(text))


def is_float(text: str) -> bool:
    """Whether a text reads as a float, "nan" and "inf" too."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def split(inputs: dict[str, list[str]], labels: dict[str, list[int] | None], spec: DatasetSpec,
          seed: int, *, images: bool = False) -> tuple[Split, Split, Split, set[str]]:
    """Train, validation and test: the dataset's own where it has them, else held out of its train rows with
    the seed (test first, so that its rows do not depend on whether the dataset brings a validation split).
    The inputs are placed in the seed's order of their first rows in the file, each with all its copies, and the
    held-out sides take whole inputs until they hold their share of the rows: no held-out score is taken on a text
    that trained, and without copies the sides are the seed's slices of the rows' order. Not in the order of each
    input's earliest copy in the seed's order: the more copies an input had, the earlier that came, and the held-out
    sides took every frequent input (a text 300 times in 1,000 rows was in test under every seed, test 460 rows where
    100 were asked). A dataset's validation split keeps none of the test's inputs (own_rows). `images`: the
    inputs are image files (or records of one), compared by their bytes (image_keys), within a split too: a scraped
    duplicate under another name (`a (1).jpg`) is a copy of its image, held out with it or trained with it.
    Last, the names of the held-out sides that are the dataset's own split, not held out of train (a validation split
    mostly of test inputs is not: own_rows), so that a fault found on a side names its field."""
    rng = np.random.default_rng(seed)
    texts = inputs[TRAIN]
    keys = image_keys(inputs) if images else {name: list(map(input_key, rows)) for name, rows in inputs.items()}
    shuffled = rng.permutation(len(texts))
    first: dict[Hashable, int] = {}
    owner = np.array([first.setdefault(key, row) for row, key in enumerate(keys[TRAIN])], dtype=np.int64)
    copies = np.bincount(owner, minlength=len(texts))  # of each input, at its first row
    owners = shuffled[copies[shuffled] > 0]
    starts = np.zeros(len(texts), dtype=np.int64)
    starts[owners] = np.cumsum(copies[owners]) - copies[owners]
    decided_at = starts[owner][shuffled]  # for each place in `shuffled`: the rows of the inputs placed before its own
    taken = 0
    held: dict[str, tuple[str, np.ndarray]] = {}
    test_keys: set[Hashable] = set()  # the test's inputs once it is decided, left out of validation
    test_is = ""  # what they are
    for name, fraction in ((TEST, spec.test_split), (VALIDATION, spec.validation_split)):
        if (kept := own_rows(keys, name, spec.uri, test_keys, test_is)) is not None:
            drawn = rng.permutation(len(inputs[name]))  # shuffled: a hub split may be sorted by label
            held[name] = (name, drawn[kept[drawn]])
            if repeats := len(set(keys[name]).intersection(keys[TRAIN])):
                log.warning("dataset %s: %d inputs of its %s split are in its train split too", spec.uri, repeats, name)
        else:
            # not fewer where maxEvalSamples evaluates fewer: runs of different evaluation budgets train on the same
            # rows (the benchmarks' teacher and job compare so), the rows over it unused, as take says
            side = (decided_at >= taken) & (decided_at < taken + max(1, round(len(texts) * fraction)))
            held[name] = (TRAIN, shuffled[side])
            taken += int(side.sum())  # the whole of the last input taken, its copies past the share too
        if name == TEST:  # every copy of an input held out of train is held out with it
            test_side, test_idx = held[TEST]
            test_keys = {keys[test_side][i] for i in test_idx}
            if test_side == TEST:  # an input the train split holds too trained already: no selection on it to keep
                test_keys -= set(keys[TRAIN])
            test_is = "its test split" if test_side == TEST else "the test rows held out of its train split"
    order = shuffled[decided_at >= taken]
    if len(order) == 0:
        raise DataError(f"dataset {spec.uri}: {len(inputs[TRAIN])} rows ({len(set(keys[TRAIN]))} distinct "
                        f"inputs) are too few to hold out {spec.validation_split:.0%} for validation "
                        f"(dataset.validationSplit) and {spec.test_split:.0%} for test (dataset.testSplit) and train "
                        "on the rest (each side takes whole inputs, every copy of a text or image, until it holds its "
                        "share of the rows); add rows, or validation and test files of its own")

    def take(side: str, name: str, idx: np.ndarray, limit: int | None, field: str) -> Split:
        if limit is not None and len(idx) > limit:
            log.info("dataset %s: %d of its %d %s rows go unused, over dataset.%s (%d)", spec.uri, len(idx) - limit,
                     len(idx), side, field, limit)
        idx = idx[:limit]
        return Split([inputs[name][i] for i in idx], None if labels[name] is None else [labels[name][i] for i in idx])

    (v_name, v_idx), (t_name, t_idx) = held[VALIDATION], held[TEST]
    return (take(TRAIN, TRAIN, order, spec.max_train_samples, "maxTrainSamples"),
            take(VALIDATION, v_name, v_idx, spec.max_eval_samples, "maxEvalSamples"),
            take(TEST, t_name, t_idx, spec.max_eval_samples, "maxEvalSamples"),
            {name for name, (side, _) in held.items() if side == name})


def own_rows(keys: dict[str, list[Hashable]], name: str, uri: str, test: set[Hashable], test_is: str
             ) -> np.ndarray | None:
    """Which rows of the dataset's own `name` split (validation or test) it keeps; None where it has none, or where
    its validation split is mostly `test`'s inputs (as some hub datasets ship it): then that side is held out of
    train. The test's scores are to come from rows that neither training nor selection (early stopping, the best
    checkpoint) saw, so validation rows whose input the test holds (`test`: its own split's, or those held out of
    train; `test_is` says which) are left out of validation."""
    if name not in keys:
        return None
    kept = np.array([key not in test for key in keys[name]], dtype=bool)
    if (shared := int((~kept).sum())) * 2 > len(kept):
        log.warning("dataset %s: %d of the %d rows of its validation split are inputs of %s: held out of its train "
                    "split instead (dataset.validationSplit), so that no selection is made on test rows", uri, shared,
                    len(kept), test_is)
        return None
    if shared:
        log.warning("dataset %s: %d rows of its validation split are inputs of %s too: left out of validation, so "
                    "that no selection is made on test rows", uri, shared, test_is)
    return kept


def input_key(item: Any) -> Hashable:
    """What makes two rows the same input: the text, the image's path, or a COCO record's image file."""
    return getattr(item, "path", item)


def image_keys(inputs: dict[str, list[Any]]) -> dict[str, list[Hashable]]:
    """Each split's input keys where the inputs are image files: a file's digest where another file, of its split or
    of another, has the same bytes, else its path. Within a split, rows were told apart by path: a scraped duplicate
    under another name (`a (1).jpg`) in the train folder was another input, held out for test while its twin trained
    (11 of 20 test images of 50 images saved twice). Across splits, a val/ folder copied from test/ (not linked to
    it), or a test image copied into train, has other paths than the test's but the same bytes. Copies in two class
    folders are one input too, each row keeping its label: held out or trained together.
    Files are told apart as cheaply as they can be: by size (a stat each, the whole cost where no two files share a
    size), then by their ends, read only of files that share their size with another, and read whole only where
    another file has the same ends too and is over 2 * ENDS bytes (a smaller one was read whole for its ends). By
    size alone, nearly every file of a large JPEG dataset shares its size with another, and the whole dataset was
    read; by their ends, 5,000 JPEGs of 25 to 33 KB in one train folder took 0.2 to 0.4 s (in the page cache, on two
    busy cores), the stats 12 ms of it. A file that cannot be read, or an empty one (Kaggle's 0-byte JPEGs), is no image to compare:
    it keeps its path, for the image check after the split to name where the run uses it, and which broken files are
    empty does not move the split."""
    paths = {name: list(map(input_key, rows)) for name, rows in inputs.items()}
    alike = list(dict.fromkeys(chain.from_iterable(paths.values())))
    sizes = {path: size or None for path, size in by_threads(file_size, alike).items()}  # an empty file: no image
    ends = by_threads(file_ends, shared_keys(sizes))
    alike = shared_keys(ends)
    digests = by_threads(file_digest, [path for path in alike if sizes[path] > 2 * ENDS])
    key = {path: digests.get(path, ends[path]) for path in alike}
    shared = set(shared_keys(key))
    return {name: [key[path] if path in shared else path for path in names] for name, names in paths.items()}


def shared_keys(key: dict[str, Hashable | None]) -> list[str]:
    """Of the paths `key` has (None: unread), those whose key another path has too."""
    counts = Counter(found for found in key.values() if found is not None)
    return [path for path, found in key.items() if found is not None and counts[found] > 1]


def by_threads(read: Callable[[str], T], paths: list[str]) -> dict[str, T]:
    """read(path) of each path, by HEADER_READERS threads (on a network volume each read waits on a round trip),
    each taking a share of the paths: a task a file cost more than a small file's read (5,000 files of 4 KB hashed
    in 0.40 s, against 0.17 s)."""
    from concurrent.futures import ThreadPoolExecutor

    if not paths:  # no pool to start (image_keys: no file left to read)
        return {}
    shares = [paths[i::HEADER_READERS] for i in range(HEADER_READERS)]
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        done = pool.map(lambda share: list(map(read, share)), shares)
        return dict(zip(chain.from_iterable(shares), chain.from_iterable(done)))


# A file that cannot be read (missing, EACCES, EIO) is compared by its path: the image check after the split
# (check_images_once) names it, as the dataset's fault or the volume's; raised here, it was an infrastructure failure.
def file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


ENDS = 8192  # bytes at each end of a file that file_ends reads


def file_ends(path: str) -> bytes | None:
    """A digest of the file's size and its first and last ENDS bytes (a small file's every byte)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(ENDS)
            file.seek(max(size - ENDS, len(head)))
            tail = file.read(ENDS)
    except OSError:
        return None
    return hashlib.blake2b(size.to_bytes(8, "little") + head + tail, digest_size=16).digest()


def file_digest(path: str) -> bytes | None:
    """A digest of the file's bytes, read in blocks (hashlib lets other threads run meanwhile)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.digest()


def head_order(id2label: dict[int, str], head_labels: dict[int, str]) -> list[int] | None:
    """The head's id of each dataset label id, where a trained head names the same labels (matched_labels: in any
    case, POSITIVE is positive) in another order, so that it keeps what it learned (transformers' run_glue maps them
    so too); None where the names differ or the order is the same. A head wider than the labels (numLabels above
    them) that names each of them gives each its id too, its other outputs left unused."""
    matched = matched_labels(id2label, head_labels)
    if len(matched) != len(id2label) or len(head_labels) < len(id2label):
        return None
    order = [matched[i] for i in id2label]
    return None if order == list(id2label) else order


def by_number(names: dict[Any, Any] | None) -> dict[int, str]:
    """A head's class names (config.id2label, whose keys JSON made texts) by class number."""
    return {int(i): str(name) for i, name in (names or {}).items()}


def matched_labels(ours: dict[int, str], theirs: dict[int, str]) -> dict[int, int]:
    """The id in `theirs` of each label of `ours` it names, one to one: the label of the same name, else the one
    that differs only in case (POSITIVE is positive) where neither side has another such label left. Labels that
    differ only in case (pos, POS) are classes of their own (warn_labels_differing_in_case): matched in any case,
    both took the same id."""
    exact = {str(name): int(i) for i, name in theirs.items()}
    matched = {i: exact[name] for i, name in ours.items() if name in exact}
    left: dict[str, tuple[list[int], list[int]]] = {}  # by the name in lower case: ours left, theirs left
    for i, name in ours.items():
        if i not in matched:
            left.setdefault(name.lower(), ([], []))[0].append(i)
    for i, name in theirs.items():
        if int(i) not in matched.values() and (spelt := left.get(str(name).lower())):
            spelt[1].append(int(i))
    return matched | {mine[0]: other[0] for mine, other in left.values() if len(mine) == len(other) == 1}


def in_head_order(data: LabelledData, order: list[int]) -> LabelledData:
    """`data` with label id i renumbered order[i]."""
    def moved(split: Split) -> Split:
        return Split(split.inputs, [order[i] for i in split.labels or []])

    return LabelledData(moved(data.train), moved(data.validation), moved(data.test),
                        dict(sorted((order[i], name) for i, name in data.id2label.items())))


def check_label_count(id2label: dict[int, str], head_labels: int | str) -> int:
    """The head size to build: the dataset's label count, or the user's, which must cover the data."""
    if head_labels == "auto":
        return len(id2label)
    if int(head_labels) < len(id2label):
        raise DataError(
            f"rearrange.head.numLabels is {head_labels} but the dataset has {len(id2label)} labels "
            f"({listed(list(id2label.values()))})"
        )
    return int(head_labels)
