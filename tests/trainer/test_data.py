"""Loading datasets: every format, the encoding fallback, the seeded split and the label mapping."""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from finetune_trainer.config import DatasetSpec, Task
from finetune_trainer.data import (LabelledData, Split, check_label_count, head_order, label_ids, load_dataset,
                                    read_dataset, read_json, real_places)
from finetune_trainer.distributed import World
from finetune_trainer.errors import DataError
from finetune_trainer.pipeline import check_images_once

CPU = World(rank=0, size=1, device=torch.device("cpu"))
ROWS = [{"text": f"sample {i}", "label": ["neg", "pos", "neu"][i % 3]} for i in range(30)]


def spec(uri: Path | str, **kw) -> DatasetSpec:
    return DatasetSpec(uri=str(uri), textField="text", labelField="label", validationSplit=0.2, **kw)


def write(folder: Path, fmt: str) -> Path:
    frame = pd.DataFrame(ROWS)
    if fmt == "csv":
        frame.to_csv(path := folder / "d.csv", index=False)
    elif fmt == "jsonl":
        (path := folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "parquet":
        frame.to_parquet(path := folder / "d.parquet")
    else:
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(path := folder / "hf")
    return path


def labelled_rows(data: LabelledData) -> list[tuple[str, str]]:
    """Every split's rows, as (input, label name), sorted."""
    splits = (data.train, data.validation, data.test)
    return sorted((text, data.id2label[label]) for s in splits for text, label in zip(s.inputs, s.labels))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf-disk"])
def test_tabular_formats_load_the_same_rows(tmp_path: Path, fmt: str) -> None:
    data = load_dataset(spec(write(tmp_path, fmt)), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert data.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert len(data.train.inputs) == 21 and len(data.validation.inputs) == 6 and len(data.test.inputs) == 3
    everything = set(data.train.inputs) | set(data.validation.inputs) | set(data.test.inputs)
    assert len(everything) == 30
    assert everything == {r["text"] for r in ROWS}
    for text, label in zip(data.train.inputs, data.train.labels):
        assert data.id2label[label] == ROWS[int(text.split()[1])]["label"]


def test_a_folder_with_one_data_file_is_that_file(tmp_path: Path) -> None:
    write(tmp_path, "csv")
    assert len(load_dataset(spec(tmp_path, format="csv"), Task.SEQUENCE_CLASSIFICATION, 0).train.inputs) == 21


def test_split_is_seeded_and_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    a = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, seed=1)
    b = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, seed=1)
    c = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, seed=2)
    assert a.validation.inputs == b.validation.inputs != c.validation.inputs and a.test.inputs == b.test.inputs
    # a prefix of the same splits: runs of different budgets train on the same rows and score the same first ones
    capped = load_dataset(spec(path, maxTrainSamples=5, maxEvalSamples=2), Task.SEQUENCE_CLASSIFICATION, seed=1)
    assert capped.train.inputs == a.train.inputs[:5] and capped.validation.inputs == a.validation.inputs[:2]
    assert capped.test.inputs == a.test.inputs[:2]


def test_held_out_rows_over_max_eval_samples_are_said_unused_not_trained(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The rows held out beyond maxEvalSamples are neither trained on nor evaluated: the log says how many (they went
    unsaid). Not trained: the held-out splits do not depend on the evaluation budget."""
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i % 50},{i % 2}\n" for i in range(100)))
    caplog.set_level("INFO", logger="finetune_trainer.data")
    whole = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, seed=0)
    data = load_dataset(spec(path, maxEvalSamples=4), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert data.train.inputs == whole.train.inputs and data.test.inputs == whole.test.inputs[:4]
    assert not set(data.train.inputs) & set(whole.validation.inputs + whole.test.inputs)
    assert f"{len(whole.test.inputs) - 4} of its {len(whole.test.inputs)} test rows go unused, over " \
        "dataset.maxEvalSamples (4)" in caplog.text


def test_numeric_labels_keep_numeric_order(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 11} for i in range(44)]
    pd.DataFrame(rows).to_csv(path := tmp_path / "n.csv", index=False)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert list(data.id2label.values()) == [str(i) for i in range(11)]
    rows.append({"text": "unlabelled", "label": None})  # pandas reads the column as floats: 3.0, 10.0
    pd.DataFrame(rows).to_csv(path, index=False)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert list(data.id2label.values()) == [str(i) for i in range(11)]
    (path := tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": label})
                                                        for i, label in enumerate(["10", "2", "-1.5", "2"] * 3)))
    assert list(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label.values()) == ["-1.5", "2", "10"]



def test_a_nan_label_is_a_class_name_in_an_order_of_the_labels_not_the_rows(tmp_path: Path) -> None:
    """As a number, "nan" compared false with every label: the classes kept the order of the rows."""
    orders = set()
    for first in ("1", "nan"):
        labels = [first, *(label for label in ("0", "1", "2", "nan") if label != first)] * 5
        pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": labels}).to_csv(path := tmp_path / "n.csv",
                                                                                     index=False)
        orders.add(tuple(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label.values()))
    assert orders == {("0", "1", "2", "nan")}


def test_numeric_labels_beside_others_keep_numeric_order(tmp_path: Path) -> None:
    """A class "nan" (or any that is no number) made the numbers sort as text: 1, 10, 2."""
    labels = ["10", "2", "nan", "1", "x"] * 4
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": labels}).to_csv(path := tmp_path / "n.csv",
                                                                                 index=False)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert list(data.id2label.values()) == ["1", "2", "10", "nan", "x"]


def test_a_label_in_composed_and_decomposed_unicode_is_one_class(tmp_path: Path) -> None:
    """"café" written composed (NFC) in train.csv and decomposed (NFD, as macOS names files) in test.csv were two
    classes: the test rows' answer was a class no train row taught."""
    for name, cafe in {"train.csv": "caf\u00e9", "test.csv": "cafe\u0301"}.items():
        pd.DataFrame({"text": [f"{name} {i}" for i in range(10)], "label": [cafe, "bar"] * 5}).to_csv(
            tmp_path / name, index=False)
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "bar", 1: "caf\u00e9"}


def test_latin1_bytes_are_read_not_refused(tmp_path: Path) -> None:
    (path := tmp_path / "l.csv").write_bytes("text,label\ncaf\xe9 ok,a\nna\xefve,b\nplain,a\nmore,b\nx,a\n".encode("latin-1"))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert "café ok" in data.train.inputs + data.validation.inputs + data.test.inputs


def test_a_windows_csv_is_read_as_windows_1252(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Excel's CSV on Windows: read as Latin-1, its “quotes”, € and dashes were control characters."""
    texts = [f"\u201cquoted\u201d \u20ac{i} \u2013 caf\u00e9" for i in range(20)]
    (path := tmp_path / "w.csv").write_bytes(("text,label\n" + "".join(f"{t},{'ab'[i % 2]}\n" for i, t in
                                                                     enumerate(texts))).encode("cp1252"))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(texts)
    assert "20 of its 21 lines are not valid UTF-8 (the first: line 2); reading them as Windows-1252" in caplog.text
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())  # saved as UTF-8 by one tool, more lines by Excel
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)  # its first column was named 'ï»¿text'
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(texts)



def test_a_stray_windows_byte_garbles_only_its_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One Windows-1252 byte (a ’ pasted from Word) made the whole file Windows-1252: every UTF-8 é became Ã©."""
    texts = [f"caf\u00e9 {i} \u2013 na\u00efve" for i in range(20)]
    lines = [f"{t},{'ab'[i % 2]}\n".encode() for i, t in enumerate(texts)]
    lines[7] = "it\u2019s 7,b\n".encode("cp1252")
    (path := tmp_path / "m.csv").write_bytes(b"text,label\n" + b"".join(lines))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(
        texts[:7] + ["it\u2019s 7"] + texts[8:])
    assert (f"{path}: 1 of its 21 lines are not valid UTF-8 (the first: line 9); reading them as Windows-1252"
            in caplog.text)

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_a_byte_order_mark_is_read(tmp_path: Path, encoding: str) -> None:
    """What Windows PowerShell 5's > and Out-File write: it was read as Latin-1, a column named 'ÿþt\x00e\x00x...'."""
    text = "text,label\r\n" + "".join(f"caf\u00e9 {i},{'ab'[i % 2]}\r\n" for i in range(20))
    bom = "\ufeff" if encoding == "utf-16-be" else ""  # Python's utf-16 writes the machine's BOM itself
    (path := tmp_path / "d.csv").write_bytes((bom + text).encode(encoding))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(f"caf\u00e9 {i}" for i in range(20))


def test_bundled_sentiment_corpus(pvc_root: Path) -> None:
    data = load_dataset(DatasetSpec(uri="pvc://data/sentiment/sentiment.csv", labelField="sentiment"),
                        Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) > 38000


def test_image_folder(pvc_root: Path) -> None:
    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=50), Task.IMAGE_CLASSIFICATION, 0)
    assert list(data.id2label.values()) == [str(i) for i in range(10)]
    assert len(data.train.inputs) == 50 and data.train.inputs[0].endswith(".png")
    for split in (data.train, data.validation, data.test):  # an image's class is the folder it is in
        assert split.labels and [data.id2label[label] for label in split.labels] == [
            Path(image).parent.name for image in split.inputs]


def cats_and_dogs(folder: Path, suffix: str, green: int = 0) -> None:
    """Kaggle's cats and dogs: Cat/ and Dog/ in `folder`, three tiny images each (of `green`, to tell folders'), no
    two alike (a copy is one input, image_keys)."""
    from PIL import Image

    for k, name in enumerate(("Cat", "Dog")):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (i * 80, green, k * 100)).save(folder / name / f"{i}{suffix}")


def test_an_image_folder_one_level_above_its_class_folders_says_where_they_are(tmp_path: Path) -> None:
    """Kaggle's cats and dogs unzip to PetImages/Cat and PetImages/Dog: the unzipped folder as dataset.uri was one
    class, PetImages, refused as a "column 'label'" of one label, a column an ImageFolder does not have."""
    cats_and_dogs(tmp_path / "PetImages", ".jpg")
    with pytest.raises(DataError, match=rf"^dataset {tmp_path}: its images are all in one class folder, PetImages "
                                        r"\(an ImageFolder has a folder per class\); PetImages holds class folders: "
                                        rf"point dataset.uri at {tmp_path}/PetImages$"):
        load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    (tmp_path / "PetImages" / "Dog").rename(tmp_path / "Dog")
    with pytest.raises(DataError, match=r"one class folder, Cat \(an ImageFolder has a folder per class\)$"):
        load_dataset(DatasetSpec(uri=str(tmp_path / "PetImages")), Task.IMAGE_CLASSIFICATION, 0)
    (tmp_path / "Dog").rename(tmp_path / "PetImages" / "Dog")
    assert len(load_dataset(DatasetSpec(uri=str(tmp_path / "PetImages")), Task.IMAGE_CLASSIFICATION, 0).id2label) == 2


def test_a_split_folder_one_level_above_its_class_folders_says_where_they_are(tmp_path: Path) -> None:
    """PetImages/{Cat,Dog} unzipped into a train/ folder: its one class was PetImages, and the hint that PetImages
    holds the class folders looked for them beside train/, where they are not, so it was not given."""
    cats_and_dogs(tmp_path / "train" / "PetImages", ".png")
    with pytest.raises(DataError, match=r"one class folder, PetImages \(an ImageFolder has a folder per class\); "
                                        r"train/PetImages holds class folders: point dataset.uri at "
                                        rf"{tmp_path}/train/PetImages$"):
        load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert len(load_dataset(DatasetSpec(uri=str(tmp_path / "train" / "PetImages")), Task.IMAGE_CLASSIFICATION,
                            0).id2label) == 2


def test_files_of_an_image_folder_that_are_no_images_are_all_named_before_training(tmp_path: Path) -> None:
    """Kaggle's cats and dogs hold 0-byte JPEGs: each stopped the job only when its batch came, one a run."""
    cats_and_dogs(tmp_path, ".jpg")
    (tmp_path / "Cat" / "666.jpg").write_bytes(b"")
    (tmp_path / "Dog" / "page.jpg").write_bytes(b"<html>Not found</html>")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"^dataset {tmp_path}: 2 of its 8 image files do not open as images: "
                                        rf"{tmp_path}/Cat/666.jpg, {tmp_path}/Dog/page.jpg \(the first: UnidentifiedImageError: "
                                        r"cannot identify image file .*\); remove them$"):
        check_images_once(data, str(tmp_path), CPU)


@pytest.mark.parametrize("split", ["", "train"])
def test_images_beside_class_folders_are_said_unused_with_a_count(tmp_path: Path, split: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Images at an ImageFolder's top beside cat/ and dog/, or in train/ beside train/cat, are in no class: they
    were left out without a word, and a user who meant them to be trained on did not know."""
    from PIL import Image

    cats_and_dogs(tmp_path / split, ".png")
    if split:
        cats_and_dogs(tmp_path / "test", ".png")
    for i in range(4):
        Image.new("RGB", (4, 4)).save(tmp_path / split / f"loose{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == (12 if split else 6)
    assert (f"{tmp_path / split}: 4 images beside its class folders, in none, so unlabelled: not used "
            "(loose0.png, loose1.png, loose2.png and 1 more)") in caplog.text


def test_heic_images_in_a_class_folder_are_said_unread_with_a_count(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An iPhone's photos (.HEIC, .heif) are images the trainer cannot read (Pillow needs a plugin): a class folder
    of them beside JPEGs was read as its JPEGs alone, without a word."""
    cats_and_dogs(tmp_path, ".jpg")
    for name in ("Cat/IMG_1.HEIC", "Cat/IMG_2.heif", "Dog/IMG_3.HEIC"):
        (tmp_path / name).write_bytes(b"\0\0\0\x18ftypheic")
    load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert (f"{tmp_path}: 3 HEIC/HEIF images, which the trainer cannot read: not used; convert them to JPEG or PNG "
            "(Cat/IMG_1.HEIC, Cat/IMG_2.heif, Dog/IMG_3.HEIC)") in caplog.text


def test_image_links_to_no_file_are_said_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """git-annex's and DVC's links to content not fetched (or links out of the pod's volume) were left out of the
    class without a word, a class of 10 images trained as one of 4."""
    cats_and_dogs(tmp_path, ".png")
    for i in range(4):
        (tmp_path / "Dog" / f"annexed{i}.png").symlink_to(f"../.git/annex/objects/SHA256E-s{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == 6
    assert (f"{tmp_path / 'Dog'}: 4 files that are links to no file (content not fetched, as git-annex and DVC "
            "leave it, or a link out of the volume): not read (annexed0.png, annexed1.png, annexed2.png and 1 more)"
            ) in caplog.text


def test_a_floating_point_image_is_named_before_training(tmp_path: Path) -> None:
    """A 32-bit float TIFF (mode F) opens, but no batch can take it (batches.open_rgb): named with the files that do
    not open, before training, not when its batch comes hours into an epoch."""
    from PIL import Image

    cats_and_dogs(tmp_path, ".png")
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(scan := tmp_path / "Cat" / "scan.tif")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"1 of its 7 image files do not open as images: {scan} \(the first: a "
                                        r"32-bit floating-point image, whose values have no set range of colours"):
        check_images_once(data, str(tmp_path), CPU)


def test_a_decompression_bomb_is_named_before_training_by_the_pixels_a_batch_decodes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past twice Pillow's limit (lowered here, so that 80x60 pixels are past it), a PNG, which decodes whole, is
    still a decompression bomb named before training; a JPEG of that size, which a batch of 8-pixel images decodes
    at 1/2 (40x30), is not, and was (by the size its header declares)."""
    from PIL import Image

    for name in ("Cat", "Dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (80, 60), (i * 80, 0, 0)).save(tmp_path / name / f"{i}.jpg")
    Image.new("RGB", (80, 60)).save(bomb := tmp_path / "Dog" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800)
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"1 of its 7 image files do not open as images: {bomb} \(the first: "
                                        r"DecompressionBombError: Image size \(4800 pixels\) exceeds limit of 1600"):
        check_images_once(data, str(tmp_path), CPU, 8)


def test_a_progressive_jpeg_counts_whole_as_libjpeg_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libjpeg keeps a progressive JPEG's every coefficient whatever the scale it puts out: counted by the pixels
    decoded at 1/2, one past twice the limit got through the check (a 782 KB file of 20000x20000 took 770 MiB)."""
    from PIL import Image

    for name in ("Cat", "Dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (80, 60), (i * 80, 0, 0)).save(tmp_path / name / f"{i}.jpg")
    Image.new("RGB", (80, 60)).save(bomb := tmp_path / "Dog" / "progressive.jpg", progressive=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800)
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"1 of its 7 image files do not open as images: {bomb} \(the first: "
                                        r"DecompressionBombError: Image size \(80x60: 4800 pixels\) exceeds limit of "
                                        r"1600"):
        check_images_once(data, str(tmp_path), CPU, 8)


def test_a_netpbm_with_a_damaged_header_is_named_before_training(tmp_path: Path) -> None:
    """Pillow's Netpbm reader raises ValueError on a damaged header, no OSError: it escaped as an infrastructure
    failure (exit 2, retried for ever) naming no file, not as the dataset's fault naming it."""
    cats_and_dogs(tmp_path, ".png")
    (scan := tmp_path / "Dog" / "scan.pgm").write_bytes(b"P5\n4F 4\n255\n" + bytes(16))
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"1 of its 7 image files do not open as images: {scan} \(the first: "
                                        r"ValueError: "):
        check_images_once(data, str(tmp_path), CPU)


def test_an_avif_cut_short_is_named_when_its_batch_comes(tmp_path: Path) -> None:
    """An AVIF cut short keeps its header, so it passes the check before training; decoding it raises SyntaxError
    ("Truncated data"), which escaped as an infrastructure failure naming no file."""
    from PIL import Image, features

    from finetune_trainer.batches import open_rgb

    if not features.check("avif"):
        pytest.skip("this Pillow writes no AVIF")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        whole := tmp_path / "whole.avif")
    (cut := tmp_path / "cut.avif").write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.95)])
    with pytest.raises(DataError, match=rf"^{cut}: cannot read it as an image \(SyntaxError: .*Truncated data"):
        open_rgb(str(cut), as_shown=True, at_least=16)


def test_an_error_after_an_image_decoded_is_not_blamed_on_its_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """open_rgb's handler of Pillow's errors covered our own work on the decoded pixels too: a ValueError there
    became a DataError naming a good file (exit 1, never retried) instead of the error it is."""
    from PIL import Image

    from finetune_trainer import batches

    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(path := tmp_path / "clear.png")

    def broken(*args: object) -> Image.Image:
        raise ValueError("a bug of ours")

    monkeypatch.setattr(Image, "alpha_composite", broken)
    with pytest.raises(ValueError, match="^a bug of ours$"):
        batches.open_rgb(str(path), as_shown=True)
    monkeypatch.undo()
    assert batches.open_rgb(str(path), as_shown=True).getpixel((0, 0)) == (255, 255, 255)  # over white


def test_a_32_bit_integer_image_of_16_bit_values_keeps_its_shades(tmp_path: Path) -> None:
    """A TIFF of 32-bit integers (mode I) holding 16-bit values (0..65535) was clipped at 255 by convert("RGB"),
    near-white (mean 254.5); one holding 8-bit values is read as it was."""
    from PIL import Image

    from finetune_trainer.batches import open_rgb

    wide = np.arange(32 * 32).reshape(32, 32) * 64  # 0 .. 65472
    Image.fromarray(wide.astype(np.int32)).save(deep := tmp_path / "deep.tif")
    Image.fromarray((wide / 257).round().astype(np.uint8)).save(flat := tmp_path / "flat.png")
    Image.fromarray((wide // 257).astype(np.int32)).save(narrow := tmp_path / "narrow.tif")
    assert Image.open(deep).mode == Image.open(narrow).mode == "I"
    assert np.array_equal(np.asarray(open_rgb(str(deep))), np.asarray(open_rgb(str(flat))))
    assert np.asarray(open_rgb(str(narrow))).max() == 254


def test_a_32_bit_integer_image_beyond_16_bits_is_named_before_training(tmp_path: Path) -> None:
    """A TIFF of 32-bit integers beyond 0..65535 has no set range of colours, as a float one (mode F): it was
    clipped at 0..255, without a word."""
    from PIL import Image

    cats_and_dogs(tmp_path, ".png")
    Image.fromarray(np.full((4, 4), -70000, dtype=np.int32)).save(scan := tmp_path / "Cat" / "scan.tif")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    with pytest.raises(DataError, match=rf"1 of its 7 image files do not open as images: {scan} \(the first: a "
                                        r"32-bit integer image with values beyond 16 bits' 0\.\.65535"):
        check_images_once(data, str(tmp_path), CPU)


def test_an_image_the_trainer_may_not_read_is_the_datasets_fault_another_failed_read_the_volumes() -> None:
    """The trainer runs as a non-root user: a file whose mode it may not read (EACCES, EPERM) is the dataset's to
    fix (exit 1, not retried), as a file that is no image is; an EIO is the volume's, raised (exit 2). The errors
    are the ones open() raises, built here: the tests run as root, which any file's mode lets read."""
    import errno

    from finetune_trainer.data import image_fault

    for code in (errno.EACCES, errno.EPERM):
        assert image_fault(PermissionError(code, os.strerror(code), "x.png")).startswith("PermissionError: ")
    # libavif's own failures, which Pillow raises as RuntimeError: a damaged file's is the dataset's, not memory's
    assert image_fault(RuntimeError("Failed to decode image: BMFF parsing failed")).startswith("RuntimeError: ")
    for cause in ("Out of memory", "No codec available"):
        with pytest.raises(RuntimeError):
            image_fault(RuntimeError(f"Failed to decode image: {cause}"))
    with pytest.raises(OSError, match="Input/output error"):
        image_fault(OSError(errno.EIO, os.strerror(errno.EIO), "x.png"))


def test_a_dataset_file_the_trainer_may_not_read_is_the_users_naming_the_field(tmp_path: Path, monkeypatch) -> None:
    """As for an image: a table whose mode the trainer's user may not read was a PermissionError, read as
    infrastructure (exit 2, retried). The error is the one open() raises, built here (the tests run as root)."""
    import errno

    from finetune_trainer import data
    from finetune_trainer.errors import exit_code_of

    table = tmp_path / "s.csv"
    table.write_text("text,label\na,x\nb,y\n")

    def refused(*_: object, **__: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(table))

    monkeypatch.setattr(data, "read_splits", refused)
    with pytest.raises(DataError, match=rf"^dataset {table}: the trainer may not read {table} \(Permission denied\)"
                       ) as caught:
        load_dataset(DatasetSpec(uri=str(table), textField="text", labelField="label"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert exit_code_of(caught.value) == 1
    from finetune_trainer.detection import coco  # a COCO annotations file likewise

    monkeypatch.setattr(coco, "read_text", refused)
    with pytest.raises(DataError, match=r"^dataset.uri: the trainer may not read .*s.csv \(Permission denied\)"):
        coco.read_json(table)


@pytest.mark.parametrize("linked", ["train", "test"])
def test_split_folders_linked_in_are_read(tmp_path: Path, linked: str) -> None:
    """Path.rglob did not follow a linked folder: a linked test/ was dropped (test rows held out of train instead),
    a linked train/ was "the files name splits (test) but none is train"."""
    for name, count in (("train", 30), ("test", 6)):
        (folder := tmp_path / ("real" if name == linked else "ds") / name).mkdir(parents=True)
        pd.DataFrame([{"text": f"{name} {i}", "label": "ab"[i % 2]} for i in range(count)]).to_csv(
            folder / "part.csv", index=False)
    (tmp_path / "ds" / linked).symlink_to(tmp_path / "real" / linked)
    data = load_dataset(spec(tmp_path / "ds"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(f"test {i}" for i in range(6))
    assert len(data.train.inputs) + len(data.validation.inputs) == 30


def test_a_folder_linked_to_from_inside_the_dataset_is_read_once(tmp_path: Path) -> None:
    """A link to a folder of the dataset (current -> data; a/tob -> ../b beside b/toa -> ../a) read its files
    twice: "holds 2 datasets in its folders (current, data)"."""
    (data := tmp_path / "data").mkdir()
    for name, count in (("train", 30), ("test", 6)):
        pd.DataFrame([{"text": f"{name} {i}", "label": "ab"[i % 2]} for i in range(count)]).to_csv(
            data / f"{name}.csv", index=False)
    (tmp_path / "current").symlink_to("data")
    (tmp_path / "other").mkdir()
    (data / "to_other").symlink_to("../other")
    (tmp_path / "other" / "to_data").symlink_to("../data")
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(f"test {i}" for i in range(6))
    assert sorted(data.train.inputs + data.validation.inputs) == sorted(f"train {i}" for i in range(30))


def test_a_link_inside_the_dataset_is_said_and_one_into_a_hidden_folder_is_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link to a split of the dataset (validation -> test) is skipped, its files read there once, and said: it was
    skipped unsaid, a slice of train standing in. A link to a hidden folder (train -> .versions/v3/train), which is
    walked nowhere else, is read: it was skipped, and the dataset had no files."""
    for name, count in (("train", 30), ("test", 6)):
        (folder := tmp_path / ".versions" / "v3" / name).mkdir(parents=True)
        pd.DataFrame([{"text": f"{name} {i}", "label": "ab"[i % 2]} for i in range(count)]).to_csv(
            folder / "part.csv", index=False)
        (tmp_path / name).symlink_to(folder.relative_to(tmp_path))
    (tmp_path / "validation").symlink_to("test")
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(f"test {i}" for i in range(6))
    assert f"{tmp_path / 'validation'} links to" in caplog.text and "its files are read there, once" in caplog.text


def test_an_image_folder_linking_to_a_folder_above_reads_each_image_once(tmp_path: Path) -> None:
    cats_and_dogs(tmp_path, ".png")
    (tmp_path / "Cat" / "loop").symlink_to(tmp_path)
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == 6


def load_images(root: Path) -> LabelledData:
    return load_dataset(DatasetSpec(uri=str(root)), Task.IMAGE_CLASSIFICATION, 0)


def read_from(images: list[str], root: Path) -> list[str]:
    """The images' paths in `root`, sorted."""
    return sorted(os.path.relpath(image, root) for image in images)


def cats_and_dogs_in(folder: str = "") -> list[str]:
    """The paths of cats_and_dogs' images in `folder`, as read_from lists them."""
    return [os.path.join(folder, name, f"{i}.png") for name in ("Cat", "Dog") for i in range(3)]


def split_folders(root: Path, *names: str) -> None:
    """cats_and_dogs in each folder `names` of `root`, each folder's images other than the others' (a split's copy of
    another's is what image_keys finds)."""
    for k, name in enumerate(names):
        cats_and_dogs(root / name, ".png", green=k * 40)


def test_a_class_folder_linked_to_another_class_is_read_once_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kitty -> Cat was a third class of Cat's images (9 images read for 6 files)."""
    cats_and_dogs(tmp_path, ".png")
    (tmp_path / "kitty").symlink_to("Cat")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.train.inputs + data.validation.inputs + data.test.inputs, tmp_path) == cats_and_dogs_in()
    assert (f"{tmp_path}/kitty links to {tmp_path}/Cat, read as class Cat: not read again, as class kitty"
            in caplog.text)


def test_a_split_folder_linked_to_another_split_is_read_once_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """validation -> test made test's images the validation split too: early stopping chose on the test set. Its
    validation split is held out of train, as where the dataset names none."""
    split_folders(tmp_path, "train", "test")
    (tmp_path / "validation").symlink_to("test")
    data = load_images(tmp_path)
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in("test")
    assert read_from(data.train.inputs + data.validation.inputs, tmp_path) == cats_and_dogs_in("train")
    assert data.validation.inputs and (f"{tmp_path}/validation links to {tmp_path}/test, read as the test split: "
                                       "not read again, as the validation split") in caplog.text


def test_a_link_beside_a_table_that_is_no_dataset_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kitty -> Cat beside a sample_submission.csv: the table's reading said the walk's 'its files are read there,
    once' before the table was found no dataset, and the ImageFolder then said 'not read again' of the same link."""
    cats_and_dogs(tmp_path, ".png")
    (tmp_path / "kitty").symlink_to("Cat")
    (tmp_path / "sample_submission.csv").write_text("id,label\n1,Cat\n")
    assert set(load_images(tmp_path).id2label.values()) == {"Cat", "Dog"}
    assert "no dataset with a column 'text'" in caplog.text
    assert caplog.text.count(f"{tmp_path}/kitty links to") == 1


def test_an_image_datasets_split_and_class_links_are_said_by_it_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The dataset's walk said validation -> test's files were read there, once, beside its 'not read again', and
    said so of test/Cat -> ../train/Cat before the refusal to read it. A link inside a class folder to a folder of
    it is still said: its files are read there, once."""
    split_folders(tmp_path, "train", "test")
    (tmp_path / "validation").symlink_to("test")
    (cat := tmp_path / "train" / "Cat" / "sub").mkdir()
    shutil.copyfile(cat.parent / "0.png", cat / "3.png")
    (cat.parent / "again").symlink_to("sub")
    load_images(tmp_path)
    assert "not read again, as the validation split" in caplog.text
    assert f"{tmp_path}/validation links to {tmp_path}/test, a folder of the dataset" not in caplog.text
    assert f"{cat.parent}/again links to {cat}, a folder of the dataset: its files are read there, once" in caplog.text
    shutil.rmtree(tmp_path / "test" / "Cat")
    (tmp_path / "test" / "Cat").symlink_to("../train/Cat")
    with pytest.raises(DataError, match="remove the link$"):
        load_images(tmp_path)
    assert f"{tmp_path}/test/Cat links to {cat.parent}, a folder of the dataset" not in caplog.text


@pytest.mark.parametrize("layout", ["release", "test to validation", "both elsewhere"])
def test_a_folder_that_validation_and_test_share_is_the_test_split(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, layout: str) -> None:
    """validation -> test beside test -> .versions/v3/test, both links, read test's images as the validation split
    and held a test split of one image out of train; so test -> validation, and both linked to one folder elsewhere.
    The final score is on the test split: it reads the shared folder, and validation is held out of train."""
    ds = tmp_path / "ds"
    if layout == "release":
        split_folders(ds / ".versions" / "v3", "train", "test")
        for split in ("train", "test"):
            (ds / split).symlink_to(f".versions/v3/{split}")
        (ds / "validation").symlink_to("test")
        shared, link = ds / ".versions" / "v3" / "test", ds / "validation"
    elif layout == "test to validation":
        split_folders(ds, "train", "validation")
        (ds / "test").symlink_to("validation")
        shared, link = ds / "validation", ds / "test"
    else:
        split_folders(ds, "train")
        split_folders(tmp_path, "eval")
        for split in ("validation", "test"):
            (ds / split).symlink_to(tmp_path / "eval")
        shared, link = tmp_path / "eval", ds / "validation"
    data = load_images(ds)
    assert read_from(data.test.inputs, ds) == cats_and_dogs_in("test")
    assert read_from(data.train.inputs + data.validation.inputs, ds) == cats_and_dogs_in("train")
    assert data.validation.inputs and (f"{link} links to {shared}, read as the test split: not read again, as the "
                                       "validation split") in caplog.text


def noisy_images(folder: Path, count: int, seed: int) -> None:
    """Cat/ and Dog/ in `folder`, `count` images each of random pixels: no two files alike."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("Cat", "Dog"):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def test_a_validation_folder_copied_from_test_is_not_selected_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An image's identity was its path: val/ copied from test/ (not linked to it) was the validation split, early
    stopping and the best weights chosen on the test images, and a test image copied into train went unsaid."""
    noisy_images(tmp_path / "train", 6, seed=0)
    noisy_images(tmp_path / "test", 3, seed=1)
    shutil.copytree(tmp_path / "test", tmp_path / "val")
    data = load_images(tmp_path)
    assert not [path for path in data.validation.inputs if "/val/" in path] and data.validation.inputs
    assert "6 of the 6 rows of its validation split are inputs of its test split: held out of its train split" in (
        caplog.text)
    shutil.rmtree(tmp_path / "val")
    shutil.copy(tmp_path / "test" / "Cat" / "0.png", tmp_path / "train" / "Cat" / "0 (1).png")
    load_images(tmp_path)
    assert "1 inputs of its test split are in its train split too" in caplog.text


def test_the_comparison_of_splits_reads_whole_only_files_alike_at_their_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Files were read whole wherever two splits had a file of one size: in a large JPEG dataset nearly every file,
    and in one of fixed-size images (BMP, PPM) every file. Now only those alike at their ends too (the copies)."""
    from PIL import Image

    from finetune_trainer import data as data_module

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for name in ("Cat", "Dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):  # 48 KiB each, all of one size
                Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.bmp")
    shutil.copytree(tmp_path / "test", tmp_path / "val")
    read_whole: list[str] = []

    def digest(path: str) -> bytes | None:
        read_whole.append(path)
        return data_module.hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()

    monkeypatch.setattr(data_module, "file_digest", digest)
    data = load_images(tmp_path)
    assert sorted(read_whole) == sorted(map(str, [*(tmp_path / "test").rglob("*.bmp"),
                                                  *(tmp_path / "val").rglob("*.bmp")]))
    assert not [path for path in data.validation.inputs if "/val/" in path] and data.validation.inputs
    assert "6 of the 6 rows of its validation split are inputs of its test split" in caplog.text


@pytest.mark.parametrize("seed", range(4))
def test_a_copy_of_an_image_in_its_own_split_is_held_out_with_it(tmp_path: Path, seed: int) -> None:
    """Rows of one split were told apart by path: a scraped duplicate in the train folder (`0 (1).png`) was another
    input, held out for test or validation while its twin trained (of 20 test images of 50 images saved twice, 11
    had trained). Every copy is one input now, a copy in another class folder too, each keeping its label."""
    import hashlib

    noisy_images(tmp_path, 20, seed=0)
    for i in range(20):
        shutil.copy(tmp_path / "Cat" / f"{i}.png", tmp_path / "Cat" / f"{i} (1).png")
    shutil.copy(tmp_path / "Dog" / "0.png", tmp_path / "Cat" / "dog.png")  # a dog among the cats: two labels
    data = load_dataset(DatasetSpec(uri=str(tmp_path), testSplit=0.2, validationSplit=0.2),
                        Task.IMAGE_CLASSIFICATION, seed)

    def side(split: Split) -> set[str]:
        return {hashlib.blake2b(Path(image).read_bytes()).hexdigest() for image in split.inputs}

    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == 61
    assert data.test.inputs and data.validation.inputs
    assert not side(data.train) & side(data.test) and not side(data.train) & side(data.validation)
    assert not side(data.validation) & side(data.test)
    dog = next(split for split in (data.train, data.validation, data.test)
               if str(tmp_path / "Dog" / "0.png") in split.inputs)
    assert [data.id2label[label] for label in dog.labels or []] == [Path(image).parent.name for image in dog.inputs]
    assert str(tmp_path / "Cat" / "dog.png") in dog.inputs


def test_copies_within_a_split_are_found_reading_only_files_of_a_shared_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one train folder of most datasets is compared within itself too: a stat of each file, the ends read only
    of files whose size another has, and read whole only where the ends are alike and the file is over 2 * ENDS bytes
    (a smaller one was read whole for its ends). A file that may not be read, or an empty one, keeps its path."""
    import builtins
    import errno

    from finetune_trainer import data as data_module

    rng = np.random.default_rng(0)
    files = {name: rng.integers(0, 255, size, dtype=np.uint8).tobytes() for name, size in
             (("a", 100), ("b", 200), ("c", 300), ("d", 300), ("big", 40_000), ("other", 40_000))}
    files |= {"a (1)": files["a"], "big (1)": files["big"], "refused": files["b"], "empty": b"", "empty (1)": b""}
    for name, content in files.items():
        (tmp_path / f"{name}.png").write_bytes(content)
    paths = {name: str(tmp_path / f"{name}.png") for name in files}
    ends_read: list[str] = []
    read_whole: list[str] = []
    file_ends, file_digest = data_module.file_ends, data_module.file_digest
    monkeypatch.setattr(data_module, "file_ends", lambda path: ends_read.append(path) or file_ends(path))
    monkeypatch.setattr(data_module, "file_digest", lambda path: read_whole.append(path) or file_digest(path))

    def opening(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == paths["refused"]:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "open", opening, raising=False)
    keys = dict(zip(files, data_module.image_keys({"train": list(paths.values())})["train"]))
    assert sorted(ends_read) == sorted(paths[name] for name in ("a", "a (1)", "b", "refused", "c", "d", "big",
                                                                "other", "big (1)"))
    assert sorted(read_whole) == sorted([paths["big"], paths["big (1)"]])
    assert keys["a"] == keys["a (1)"] != paths["a"] and keys["big"] == keys["big (1)"] != paths["big"]
    assert all(keys[name] == paths[name] for name in ("b", "refused", "c", "d", "other", "empty", "empty (1)"))


def test_an_image_the_comparison_of_splits_may_not_read_is_left_to_the_image_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits are compared by their files' bytes before the images are checked: a file the trainer may not read
    (EACCES, built here: the tests run as root) raised PermissionError there, an infrastructure failure retried (exit
    2), where the image check names it as the dataset's fault (exit 1). It is compared by its path instead."""
    import builtins
    import errno

    from finetune_trainer import data as data_module

    noisy_images(tmp_path / "train", 6, seed=0)
    noisy_images(tmp_path / "test", 3, seed=1)
    shutil.copy(tmp_path / "test" / "Cat" / "0.png", tmp_path / "train" / "Cat" / "0 (1).png")
    refused = tmp_path / "train" / "Cat" / "0 (1).png"

    def opening(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == refused:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "open", opening, raising=False)
    data = load_images(tmp_path)
    assert str(refused) in data.train.inputs + data.validation.inputs + data.test.inputs


def test_a_train_split_linked_to_test_is_the_train_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train -> test left no train split (a KeyError): nothing is learnt without it, and test is held out of it."""
    split_folders(tmp_path, "validation", "test")
    (tmp_path / "train").symlink_to("test")
    data = load_images(tmp_path)
    assert read_from(data.train.inputs + data.test.inputs, tmp_path) == cats_and_dogs_in("train")
    assert read_from(data.validation.inputs, tmp_path) == cats_and_dogs_in("validation")
    assert data.test.inputs and (f"{tmp_path}/train links to {tmp_path}/test, read as the train split: not read "
                                 "again, as the test split") in caplog.text


@pytest.mark.parametrize("pooled", [False, True])
def test_a_class_folder_of_test_linked_to_trains_is_refused(tmp_path: Path, pooled: bool) -> None:
    """test/Cat -> ../train/Cat read train's cats into test too: the model was scored on images it trained on. So
    where both link to one pool/Cat."""
    split_folders(tmp_path, "train", "test", *["pool"] * pooled)
    real = tmp_path / ("pool" if pooled else "train") / "Cat"
    for split in ("train", "test") if pooled else ("test",):
        shutil.rmtree(tmp_path / split / "Cat")
        (tmp_path / split / "Cat").symlink_to(real)
    with pytest.raises(DataError, match=rf"^{tmp_path}: {tmp_path}/test/Cat links to {real}, which reads "
                                        rf"{real}/0.png as class Cat of the test split and as class Cat of the "
                                        r"train split; an image is read once, as one class of one split: remove "
                                        r"the link$"):
        load_images(tmp_path)


def test_a_folder_in_a_class_linked_to_another_class_is_refused(tmp_path: Path) -> None:
    """Cat/more -> ../Dog read Dog's images as cats too. Said of no split: the dataset has no split folders."""
    cats_and_dogs(tmp_path, ".png")
    (tmp_path / "Cat" / "more").symlink_to("../Dog")
    with pytest.raises(DataError, match=rf"^{tmp_path}: {tmp_path}/Cat/more links to {tmp_path}/Dog, which reads "
                                        rf"{tmp_path}/Dog/0.png as class Dog and as class Cat; an image is read once, "
                                        r"as one class of one split: remove the link$"):
        load_images(tmp_path)


def test_a_class_folder_holding_folders_that_classes_link_to_is_refused_naming_it(tmp_path: Path) -> None:
    """Cat -> pool/Cat and Dog -> pool/Dog beside pool/Bird, unlinked: pool is a class of every image, as it was
    before links were looked at; the refusal named the Cat link, the layout of a pool/ of classes, not pool."""
    cats_and_dogs(pool := tmp_path / "pool", ".png")
    (pool / "Bird").mkdir()
    shutil.copyfile(pool / "Cat" / "0.png", pool / "Bird" / "0.png")
    for name in ("Cat", "Dog"):
        (tmp_path / name).symlink_to(f"pool/{name}")
    with pytest.raises(DataError, match=rf"^{tmp_path}: {pool} is read as class pool, and holds {pool}/Cat, which "
                                        rf"{tmp_path}/Cat links to, read as class Cat: an image is read once, as one "
                                        rf"class of one split \({pool}/Cat/0.png\); remove the link, or link each "
                                        r"folder of it beside it \(.*\)$"):
        load_images(tmp_path)


def test_a_class_folder_holding_only_a_folder_that_a_class_links_to_is_refused_naming_it(tmp_path: Path) -> None:
    """train/Cat of kittens/ alone beside train/kittens -> Cat/kittens dropped Cat from train unsaid, as a pool of
    the link (test/Cat stayed): one folder's images are read as two classes, as they were before links were looked
    at, which is refused."""
    split_folders(tmp_path, "train", "test")
    cat = tmp_path / "train" / "Cat"
    (cat / "kittens").mkdir()
    for image in cat.glob("*.png"):
        image.rename(cat / "kittens" / image.name)
    (tmp_path / "train" / "kittens").symlink_to("Cat/kittens")
    with pytest.raises(DataError, match=rf"^{tmp_path}: {cat} is read as class Cat of the train split, and holds "
                                        rf"{cat}/kittens, which {tmp_path}/train/kittens links to, read as class "
                                        r"kittens of the train split: an image is read once"):
        load_images(tmp_path)


def test_a_linked_class_folder_holding_a_folder_that_a_class_links_to_is_refused_naming_that_link(
        tmp_path: Path) -> None:
    """Cat -> /elsewhere/cats, which holds tabby/, beside tabby -> /elsewhere/cats/tabby: the refusal said Cat holds
    tabby/ and to link each folder of it beside it, as of a real pool/; Cat is a link, and tabby's is to remove."""
    cats_and_dogs(ds := tmp_path / "ds", ".png")
    (cats := tmp_path / "elsewhere" / "cats").mkdir(parents=True)
    (ds / "Cat").rename(cats / "tabby")
    (ds / "Cat").symlink_to(cats)
    (ds / "tabby").symlink_to(cats / "tabby")
    with pytest.raises(DataError, match=rf"^{ds}: {ds}/tabby links to {cats}/tabby, which reads {cats}/tabby/0.png "
                                        r"as class tabby and as class Cat; an image is read once, as one class of "
                                        r"one split: remove the link$"):
        load_images(ds)


def test_a_folder_in_a_class_linked_to_a_class_of_a_linked_split_is_refused_naming_it(tmp_path: Path) -> None:
    """train/Cat/more -> ../../test/Cat beside test -> /elsewhere/test: the refusal named test, the link that is no
    fault, as the link to remove."""
    split_folders(ds := tmp_path / "ds", "train")
    split_folders(tmp_path / "elsewhere", "test")
    (ds / "test").symlink_to(tmp_path / "elsewhere" / "test")
    (ds / "train" / "Cat" / "more").symlink_to("../../test/Cat")
    with pytest.raises(DataError, match=rf"^{ds}: {ds}/train/Cat/more links to {tmp_path}/elsewhere/test/Cat, "):
        load_images(ds)


@pytest.mark.parametrize("how", ["direct", "chained", "dot", "to-a-blob-link"])
def test_an_image_file_linked_to_an_image_of_another_split_is_refused_naming_it(tmp_path: Path, how: str) -> None:
    """train/Cat/x.png -> ../../test/Cat/0.png read a test image in train too: a file link was never looked at. So
    through a link to a link elsewhere, whose folder is a link; through a `.` in the target (ln -s "$PWD/./..."),
    which passed; and to a test image that itself links on to a blob (every image of the hub's cache), which passed."""
    split_folders(tmp_path, "train", "test")
    image = tmp_path / "test" / "Cat" / "0.png"
    link = tmp_path / "train" / "Cat" / "x.png"
    if how == "chained":  # .linked/.. is .elsewhere
        (real := tmp_path / ".elsewhere" / "real").mkdir(parents=True)
        (real / "y.png").symlink_to(image)
        (tmp_path / ".linked").symlink_to(".elsewhere/real")
        link.symlink_to("../../.linked/../real/y.png")
    elif how == "dot":
        os.symlink(f"{tmp_path}/test/./Cat/0.png", link)  # not through Path, which drops the `.`
    else:
        link.symlink_to("../../test/Cat/0.png")
    if how == "to-a-blob-link":
        (blob := tmp_path / ".blobs" / "b0").parent.mkdir()
        image.rename(blob)
        image.symlink_to(blob)
    with pytest.raises(DataError, match=rf"^{tmp_path}: {link} links to {image}, which reads {image} as class Cat of "
                                        r"the train split and as class Cat of the test split; .*: remove the link$"):
        load_images(tmp_path)


def test_image_files_linked_to_one_file_read_nowhere_else_are_read(tmp_path: Path) -> None:
    """The hub's cache links each file to a blob by its contents: two copies of one image, in two splits, are two
    images, the blob read through them alone."""
    split_folders(tmp_path / "ds", "train", "test")
    (blob := tmp_path / "blobs" / "b0").parent.mkdir()
    shutil.copyfile(tmp_path / "ds" / "train" / "Cat" / "0.png", blob)
    for split in ("train", "test"):
        (tmp_path / "ds" / split / "Cat" / "x.png").symlink_to(blob)
    data = load_images(tmp_path / "ds")
    assert "test/Cat/x.png" in read_from(data.test.inputs, tmp_path / "ds")
    assert "train/Cat/x.png" in read_from(data.train.inputs + data.validation.inputs, tmp_path / "ds")


def test_split_folders_linked_into_a_release_folder_are_read(tmp_path: Path) -> None:
    """train -> v3/train and test -> v3/test: the splits, of their classes; v3 is neither a split nor a class."""
    split_folders(tmp_path / "v3", "train", "test")
    for split in ("train", "test"):
        (tmp_path / split).symlink_to(f"v3/{split}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in("test")
    assert read_from(data.train.inputs + data.validation.inputs, tmp_path) == cats_and_dogs_in("train")


@pytest.mark.parametrize("more", ["a split unlinked", "a folder of its own", "an image of its own"])
def test_split_folders_linked_into_a_release_folder_that_holds_more_are_read(tmp_path: Path, more: str) -> None:
    """train -> v3/train beside a v3/ that holds more than the links reach (so is read itself, and its images that no
    split folder holds are unused): the links were taken for shortcuts into v3/, which alone named no split, so the
    root was read as classes, v3 and train, and refused for the images read in both."""
    split_folders(tmp_path / "v3", "train", "test")
    linked = ["train"] if more == "a split unlinked" else ["train", "test"]
    if more == "a folder of its own":
        split_folders(tmp_path / "v3", "extra")
    if more == "an image of its own":
        shutil.copyfile(tmp_path / "v3" / "train" / "Cat" / "0.png", tmp_path / "v3" / "README.png")
    for split in linked:
        (tmp_path / split).symlink_to(f"v3/{split}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert (read_from(data.train.inputs + data.validation.inputs + data.test.inputs, tmp_path)
            == sorted(image for split in linked for image in cats_and_dogs_in(split)))


@pytest.mark.parametrize("into", ["train", "test", "validation"])
@pytest.mark.parametrize("named", [{}, {"train": "training_set", "test": "test_set", "validation": "val_set"}],
                         ids=["whole names", "words"])
@pytest.mark.parametrize("linked_as", ["preview_{name}", "{split}_{name}"])
def test_a_split_folder_that_shortcuts_beside_it_link_into_is_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, into: str, named: dict[str, str], linked_as: str) -> None:
    """Cat -> train/Cat and Dog -> train/Dog beside train/ and test/ dropped train/ unsaid, read the root as classes
    and labelled test's images test; so shortcuts into test/ or validation/ dropped that split. The shortcuts are no
    splits: each split is read as before links were looked at, and they are not said unused (their images are read,
    in their split: they were said to be in no class folder of a split, unused).
    So with splits named by a word (training_set/, test_set/: Kaggle's), which the shortcuts made read by whole
    names, so as classes: test_set was a third class. And with shortcuts named by a split's word (test_Cat), which
    took the split's name from its folder (test dropped, train refused), or stood for it (test_set/ dropped)."""
    folder = {split: named.get(split, split) for split in ("train", "test", "validation")}
    split_folders(tmp_path, folder["train"], folder["test"], *[folder["validation"]] * (into == "validation"))
    links = [linked_as.format(split=folder[into], name=name) for name in ("Cat", "Dog")]
    for link, name in zip(links, ("Cat", "Dog")):
        (tmp_path / link).symlink_to(f"{folder[into]}/{name}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in(folder["test"])
    held_out = cats_and_dogs_in(folder["validation"]) if into == "validation" else []
    assert (read_from(data.train.inputs + data.validation.inputs, tmp_path)
            == sorted(cats_and_dogs_in(folder["train"]) + held_out))
    assert "unlabelled" not in caplog.text  # the shortcuts' images are read, in their split: said unused before
    assert "no split nor class" not in caplog.text


@pytest.mark.parametrize("links", [("val_Cat", "test_Dog"), ("val_Cat", "train_Dog")])
def test_shortcuts_into_a_split_named_by_other_splits_are_shortcuts(tmp_path: Path, links: tuple[str, str]) -> None:
    """val_Cat -> test/Cat and test_Dog -> test/Dog, each named by another split, were taken for a release's splits
    standing for test/: the test split was dropped; with train_Dog, the root was read as classes, train/'s images
    labelled train. Links to class folders stand for no split."""
    split_folders(tmp_path, "train", "test")
    for link, name in zip(links, ("Cat", "Dog")):
        (tmp_path / link).symlink_to(f"test/{name}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in("test")
    assert read_from(data.train.inputs + data.validation.inputs, tmp_path) == cats_and_dogs_in("train")


def test_a_split_named_by_two_folders_is_the_one_with_class_folders(tmp_path: Path) -> None:
    """train/, test/ and test_unlabelled/ (the images to predict, in no class folder): the last folder that named the
    test split was taken, so test/ was dropped, said unlabelled. Two that both hold images in folders are refused,
    naming both (one of them was dropped, said unlabelled, or read as a split of one class)."""
    split_folders(tmp_path, "train", "test")
    (tmp_path / "test_unlabelled").mkdir()
    shutil.copyfile(tmp_path / "test" / "Cat" / "0.png", tmp_path / "test_unlabelled" / "0.png")
    data = load_images(tmp_path)
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in("test")
    (tmp_path / "test_unlabelled").rename(tmp_path / "test_images")  # Kaggle's nesting: test_images/test_images/
    (tmp_path / "test_images" / "test_images").mkdir()
    (tmp_path / "test_images" / "0.png").rename(tmp_path / "test_images" / "test_images" / "0.png")
    with pytest.raises(DataError, match="test and test_images both name the test split and hold images in folders"):
        load_images(tmp_path)
    shutil.rmtree(tmp_path / "test_images")
    (tmp_path / "train_extra" / "Cat").mkdir(parents=True)  # one class: it was dropped, said unlabelled
    shutil.copyfile(tmp_path / "train" / "Cat" / "0.png", tmp_path / "train_extra" / "Cat" / "9.png")
    with pytest.raises(DataError, match="train and train_extra both name the train split and hold images in"):
        load_images(tmp_path)


@pytest.mark.parametrize("layout", ["val -> validation", "train -> training", "Intel's nesting linked",
                                    "Intel's nesting linked, beside seg_pred"])
def test_a_split_folder_and_a_link_to_it_are_one_split(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       layout: str) -> None:
    """A split's folder and a link that names the split too (val -> validation; train -> seg_train/seg_train, the
    fix of Intel's nesting) were refused as two folders that name one split: they are one, read once, not said
    unused."""
    if layout == "val -> validation":
        split_folders(tmp_path, "train", "validation")
        (tmp_path / "val").symlink_to("validation")
        held_out, kept = "validation", "train"
    elif layout == "train -> training":
        split_folders(tmp_path, "training", "test")
        (tmp_path / "train").symlink_to("training")
        held_out, kept = "test", "training"
    else:
        split_folders(tmp_path / "seg_train", "seg_train")
        split_folders(tmp_path / "seg_test", "seg_test")
        if layout.endswith("seg_pred"):  # names no split: seg_train/ and seg_test/ were said unlabelled, unused
            (tmp_path / "seg_pred" / "seg_pred").mkdir(parents=True)
            shutil.copyfile(tmp_path / "seg_test" / "seg_test" / "Cat" / "0.png",
                            tmp_path / "seg_pred" / "seg_pred" / "0.png")
        for split in ("train", "test"):
            (tmp_path / split).symlink_to(f"seg_{split}/seg_{split}")
        held_out, kept = "seg_test/seg_test", "seg_train/seg_train"
    data = load_images(tmp_path)

    def real(inputs: list[str]) -> list[str]:
        return sorted(os.path.relpath(os.path.realpath(p), tmp_path) for p in inputs)

    split = data.validation if held_out == "validation" else data.test
    others = data.train.inputs + (data.test if held_out == "validation" else data.validation).inputs
    assert real(split.inputs) == cats_and_dogs_in(held_out) and real(others) == cats_and_dogs_in(kept)
    assert [line for line in caplog.text.splitlines() if "unlabelled" in line and "seg_pred" not in line] == []


def test_a_link_into_a_class_that_names_a_split_is_refused(tmp_path: Path) -> None:
    """training -> train/Cat beside train/ of Cat and Dog was read as Intel's nesting (a split folder and a link into
    it, one split): the train split was Cat's subfolders, Dog's images dropped unsaid."""
    split_folders(tmp_path, "train", "test")
    for breed in ("persian", "siamese"):
        (tmp_path / "train" / "Cat" / breed).mkdir()
        shutil.copyfile(tmp_path / "train" / "Cat" / "0.png", tmp_path / "train" / "Cat" / breed / "0.png")
    (tmp_path / "training").symlink_to("train/Cat")
    with pytest.raises(DataError, match="train and training both name the train split"):
        load_images(tmp_path)


def test_a_folder_that_links_stand_for_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A release v3/ of train -> v3/train and test -> v3/test is read only through them: said, with the links."""
    split_folders(tmp_path / "v3", "train", "test")
    for split in ("train", "test"):
        (tmp_path / split).symlink_to(f"v3/{split}")
    load_images(tmp_path)
    assert (f"{tmp_path}/v3 holds images only in the folders that {tmp_path}/test, {tmp_path}/train link to: read "
            "through them, it is no split nor class itself") in caplog.text


def test_class_folders_linked_into_a_pool_folder_are_read(tmp_path: Path) -> None:
    """train/Cat -> ../pool/Cat and train/Dog -> ../pool/Dog beside a real test/: pool is no split nor class."""
    split_folders(tmp_path, "test", "pool")
    (tmp_path / "train").mkdir()
    for name in ("Cat", "Dog"):
        (tmp_path / "train" / name).symlink_to(f"../pool/{name}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.test.inputs, tmp_path) == cats_and_dogs_in("test")
    assert read_from(data.train.inputs + data.validation.inputs, tmp_path) == cats_and_dogs_in("train")


@pytest.mark.parametrize("pool", ["pool", "test_images", "val_pool", "training_pool"])
def test_a_pool_folder_that_the_class_folders_link_into_is_no_class(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, pool: str) -> None:
    """Cat -> pool/Cat and Dog -> pool/Dog, no split folders: pool was a third class, of every image. A pool whose
    name holds a split's word, with no split folder beside it named by a word, is a pool too: test_images/ was the
    test split, with no train, and refused; training_pool/ the train split, its class links said unused."""
    cats_and_dogs(tmp_path / pool, ".png")
    (tmp_path / "training_logs").mkdir()  # named by a word, but no split: it holds no image
    (tmp_path / "training_logs" / "notes.txt").write_text("lr 1e-3")
    for name in ("Cat", "Dog"):
        (tmp_path / name).symlink_to(f"{pool}/{name}")
    data = load_images(tmp_path)
    assert sorted(data.id2label.values()) == ["Cat", "Dog"]
    assert read_from(data.train.inputs + data.validation.inputs + data.test.inputs, tmp_path) == cats_and_dogs_in()
    assert "unlabelled" not in caplog.text


def tiny_images(folder: Path, names: list[str], count: int) -> None:
    """`count` tiny images in each folder `names` of `folder`, no two alike (a copy is one input, image_keys)."""
    from PIL import Image

    for k, name in enumerate(names):
        (folder / name).mkdir()
        for i in range(count):
            Image.new("RGB", (4, 4), (k % 256, k // 256, i)).save(folder / name / f"{i}.png")


@pytest.mark.parametrize("pooled", [False, True])
def test_linked_class_folders_cost_a_load_no_comparison_per_link_and_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pooled: bool) -> None:
    """Each of 1,000 class links to folders elsewhere was compared with every link's target, thrice a load (18 s, not
    0.3 s), and each image of a pool/ that they link into with every target too (133 s for 20,000 images)."""
    classes = [f"c{c:03d}" for c in range(200)]
    (store := tmp_path / ("ds/pool" if pooled else "store")).mkdir(parents=True)
    tiny_images(store, classes, 5)
    (folder := tmp_path / "ds" / ("" if pooled else "train")).mkdir(parents=True, exist_ok=True)
    for name in classes:
        (folder / name).symlink_to(store / name)
    commonpath, compared = os.path.commonpath, []
    monkeypatch.setattr(os.path, "commonpath", lambda paths: compared.append(paths) or commonpath(paths))
    assert len(load_images(tmp_path / "ds").id2label) == len(classes)
    assert len(compared) < 10 * len(classes)


def test_the_real_places_of_images_cost_no_realpath_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image's folder was resolved by a realpath, an lstat a level: 42,000 folders of one image each, 14 deep,
    took longer than their walk. A folder is its parent's real path and its name, where it is no link."""
    for i in range(50):
        (tmp_path / "real" / f"x{i}" / "y" / "z").mkdir(parents=True)
    (tmp_path / "link").symlink_to("real")
    images = [str(tmp_path / top / f"x{i}" / "y" / "z" / "0.png") for top in ("real", "link") for i in range(50)]
    expected = [os.path.join(os.path.realpath(os.path.dirname(image)), "0.png") for image in images]
    realpath, resolved = os.path.realpath, []
    monkeypatch.setattr(os.path, "realpath", lambda path: resolved.append(path) or realpath(path))
    assert real_places(images, {}) == expected
    assert len(resolved) < 5


def test_images_in_real_folders_are_placed_with_no_path_joined_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image's place was its folder's real path joined to its name, though most folders are their own real
    path (with the columns iterated twice, 0.57 s of 100,000 images' check_read_once, now 0.25 s)."""
    (folder := tmp_path.resolve() / "real" / "a").mkdir(parents=True)
    (tmp_path / "link").symlink_to("real")
    images = [str(folder / f"{i}.png") for i in range(100)]
    linked = [str(tmp_path / "link" / "a" / f"{i}.png") for i in range(100)]
    join, joined = os.path.join, []
    monkeypatch.setattr(os.path, "join", lambda *parts: joined.append(parts) or join(*parts))
    assert real_places(images, {}) == images
    assert len(joined) < 20
    assert real_places(linked, {}) == images  # a linked folder's images lie in its real path


def test_image_files_are_told_from_file_links_by_their_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image was looked at (an lstat) to find the links among them, which the folders' listings tell: 0.15 s
    of 100,000 images. A link to another split's image is still refused (test_an_image_file_linked_to_...)."""
    split_folders(tmp_path, "train", "test")
    islink, looked = os.path.islink, []
    monkeypatch.setattr(os.path, "islink", lambda path: looked.append(path) or islink(path))
    load_images(tmp_path)
    assert not [path for path in looked if str(path).endswith(".png")]


def test_a_folder_that_split_folders_link_into_is_not_walked_through_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train -> v3/train and test -> v3/test: finding v3 no split listed every folder below it too, where finding a
    folder of images stops at its first (41,000 entries listed for a release layout became 62,000)."""
    for split in ("train", "test"):
        (tmp_path / "v3" / split).mkdir(parents=True)
        tiny_images(tmp_path / "v3" / split, ["Cat", "Dog"], 5)
        (tmp_path / split).symlink_to(f"v3/{split}")
    scandir, listed = os.scandir, []

    def counted(path: str | os.PathLike[str] = ".") -> object:
        listed.append(os.path.realpath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    load_images(tmp_path)
    assert listed.count(str(tmp_path / "v3" / "test" / "Dog")) == 2  # by the dataset's walk, and as its class


@pytest.mark.parametrize("layout", ["classes", "splits", "release", "table beside", "release named by a split",
                                    "Intel's nesting linked"])
def test_an_image_datasets_folders_are_each_listed_once_a_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The split folders' class folders were listed to tell the labelled splits, then again to read them, and the
    root's again to read its classes, or after a table beside them was found no dataset (train -> v3/train: each
    split listed twice a load). So was a release's link named by a split (test -> test_v3/test), first to tell that
    test_v3/ is read through its links; and a folder a split is linked into (seg_test/ of test ->
    seg_test/seg_test) was walked to tell it holds images only there, then again for the unused folders' warning."""
    from finetune_trainer import data

    if layout == "release":
        for split in ("train", "test"):
            split_folders(tmp_path / "v3", split)
            (tmp_path / split).symlink_to(f"v3/{split}")
    elif layout == "release named by a split":
        split_folders(tmp_path, "train")
        split_folders(tmp_path / "test_v3", "test", "validation")
        for split in ("test", "validation"):
            (tmp_path / split).symlink_to(f"test_v3/{split}")
        (tmp_path / "preview_Cat").symlink_to("train/Cat")  # a shortcut
    elif layout == "Intel's nesting linked":
        for split in ("train", "test"):
            split_folders(tmp_path / f"seg_{split}", f"seg_{split}")
            (tmp_path / split).symlink_to(f"seg_{split}/seg_{split}")
    elif layout == "splits":
        split_folders(tmp_path, "train", "test")
    else:
        cats_and_dogs(tmp_path, ".png")
    if layout == "table beside":
        (tmp_path / "sample_submission.csv").write_text("id,label\n1,Cat\n")
    iterdir, listed = Path.iterdir, []

    def counted(folder: Path) -> object:
        listed.append(folder)
        return iterdir(folder)

    linked_into, walked = data.linked_into, []

    def walks(folder: Path, targets: set[str]) -> bool:
        walked.append(folder)
        return linked_into(folder, targets)

    monkeypatch.setattr(Path, "iterdir", counted)
    monkeypatch.setattr(data, "linked_into", walks)
    assert len(load_images(tmp_path).id2label) == 2
    format_look = layout != "table beside"  # detect_format's for a folder among the root's entries, where no table
    assert listed.count(tmp_path) == 1 + format_look
    assert all(listed.count(folder) == 1 for folder in listed if folder != tmp_path)
    assert all(walked.count(folder) == 1 for folder in walked)


@pytest.mark.parametrize("layout", ["parquet splits", "image folder"])
def test_a_folder_dataset_is_walked_once_a_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The format, the splits and the parquet class names each walked the whole folder (three walks of a hub repo of
    thousands of shards on a network volume), and an ImageFolder's format two; now they filter one walk."""
    if layout == "image folder":
        cats_and_dogs(tmp_path, ".png")
    else:
        import datasets

        labels = datasets.ClassLabel(names=["a", "b"])
        features = datasets.Features({"text": datasets.Value("string"), "label": labels})
        (tmp_path / "data").mkdir()
        for name in ("train", "test"):
            rows = {"text": [f"{name} {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
            datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "data" / f"{name}.parquet")
    scandir, tops = os.scandir, []

    def counted(top: str | os.PathLike[str] = ".") -> object:
        tops.append(Path(top))  # a walk lists each folder with os.scandir
        return scandir(top)

    monkeypatch.setattr(os, "scandir", counted)
    data = (load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0) if layout == "image folder"
            else load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0))
    assert set(data.id2label.values()) == ({"Cat", "Dog"} if layout == "image folder" else {"a", "b"})
    assert tops.count(tmp_path) == 1


def refuse_listing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make listing a folder of this name raise the error os.scandir raises where the user may not read it (the
    tests run as root, whom a folder's mode lets read)."""
    import errno

    scandir = os.scandir

    def refused(path: str | os.PathLike[str] = ".") -> object:
        if Path(path).name == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)


def test_a_class_folder_the_trainer_may_not_read_is_the_users_naming_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.rglob skipped a folder it may not read: the class was dropped, warned of as a folder without images.
    The error is the one os.scandir raises, built here (the tests run as root)."""
    from finetune_trainer.errors import exit_code_of

    cats_and_dogs(tmp_path, ".png")
    refuse_listing(monkeypatch, "Dog")
    with pytest.raises(DataError, match=rf"^dataset {tmp_path}: the trainer may not read {tmp_path}/Dog "
                                        r"\(Permission denied\)") as caught:
        load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert exit_code_of(caught.value) == 1

@pytest.mark.parametrize("task", [Task.SEQUENCE_CLASSIFICATION, Task.IMAGE_CLASSIFICATION])
def test_a_volumes_lost_and_found_that_the_trainer_may_not_read_is_no_part_of_a_dataset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: Task) -> None:
    """The operator mounts a claim at its volume's root, where ext4's lost+found is root's alone (mode 0700): a
    dataset at pvc://claim/ was refused as a folder the trainer's (non-root) user may not read."""
    images = task == Task.IMAGE_CLASSIFICATION
    if images:
        cats_and_dogs(tmp_path, ".png")
    else:
        write(tmp_path, "csv")
    (tmp_path / "lost+found").mkdir()
    refuse_listing(monkeypatch, "lost+found")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)) if images else spec(tmp_path), task, 0)
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == (6 if images else 30)


def test_only_the_image_files_the_run_uses_are_opened_before_training(tmp_path: Path) -> None:
    """Every file of the folder was opened, a minutes-long read of a large dataset on a network volume, however few
    dataset.maxTrainSamples and maxEvalSamples keep; a broken file the run never reads no longer stops it."""
    from PIL import Image

    for k, name in enumerate(("Cat", "Dog")):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.new("RGB", (4, 4), (i * 20, k * 100, 0)).save(tmp_path / name / f"{i}.png")
    spec = DatasetSpec(uri=str(tmp_path), maxTrainSamples=2, maxEvalSamples=1)
    data = load_dataset(spec, Task.IMAGE_CLASSIFICATION, 0)
    used = [path for split in (data.train, data.validation, data.test) for path in split.inputs]
    assert len(used) == 4
    for path in set(map(str, tmp_path.glob("*/*.png"))) - set(used):
        Path(path).write_bytes(b"")
    assert load_dataset(spec, Task.IMAGE_CLASSIFICATION, 0) == data  # the same split, the unused files not opened
    check_images_once(data, str(tmp_path), CPU)
    Path(used[0]).write_bytes(b"")
    with pytest.raises(DataError, match=rf"1 of its 4 image files do not open as images: {used[0]} "):
        check_images_once(data, str(tmp_path), CPU)


def test_split_folders_read_as_classes_are_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Kaggle's Intel scenes: seg_train/seg_train/<class>/, seg_test/seg_test/<class>/ and seg_pred/seg_pred/ of
    images to predict. seg_pred names no split, so the three were classes, and the model learnt to tell the folders
    apart without a word; a class that merely names a split (train_station/) is no such case."""
    from PIL import Image

    for split_name in ("seg_train", "seg_test"):
        for name in ("forest", "sea"):
            (folder := tmp_path / split_name / split_name / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (4, 4), (i * 80, 0, 0)).save(folder / f"{i}.jpg")
    (tmp_path / "seg_pred" / "seg_pred").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "seg_pred" / "seg_pred" / "0.jpg")
    load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert (f"{tmp_path}: its folders seg_test, seg_train name splits, but seg_pred names none, so all are read as "
            "classes") in caplog.text
    caplog.clear()
    for name in ("train_station", "test_kitchen", "airport"):  # classes, their images in them
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (i * 80, 0, 0)).save(tmp_path / "classes" / name / f"{i}.jpg")
    load_dataset(DatasetSpec(uri=str(tmp_path / "classes")), Task.IMAGE_CLASSIFICATION, 0)
    assert "name splits" not in caplog.text


def test_causal_lm_needs_no_labels(tmp_path: Path) -> None:
    data = load_dataset(spec(write(tmp_path, "jsonl")), Task.CAUSAL_LM, 0)
    assert data.train.labels is None and data.id2label == {}


def test_missing_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no column 'sentiment' \(dataset.labelField\); it has 'text', 'label'"):
        load_dataset(DatasetSpec(uri=str(write(tmp_path, "csv")), labelField="sentiment"),
                     Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_header_that_repeats_the_label_column_is_refused_naming_it(tmp_path: Path) -> None:
    """text,label,label: pandas named the second copy 'label.1', and the first was trained on, silently, whichever
    the user meant. A repeated column that is not read is no matter."""
    rows = "".join(f"row {i},{i % 2},{i // 2 % 2},x,y\n" for i in range(20))
    for blank in ("", "\n", "\r\n  \r\n"):  # blank lines before the header, which pandas skips
        (path := tmp_path / "d.csv").write_text(f"{blank}text,label,label,note,note\n" + rows)
        with pytest.raises(DataError, match=r"d\.csv: its header repeats column 'label' \(dataset\.labelField\)"):
            load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    path.write_text("text,label,tag,note,note\n" + rows)
    assert len(labelled_rows(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0))) == 20


def test_a_split_without_the_label_column_is_unlabelled_not_used(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Kaggle's folder: train.csv (id, text, target), test.csv of the rows to predict (id, text) and
    sample_submission.csv. It was refused for the test split's missing 'target'; now that split is unused, held out
    of train as where a folder has train alone. A train split without the column is still refused."""
    pd.DataFrame({"id": range(40), "text": [f"tweet {i}" for i in range(40)], "target": [i % 2 for i in range(40)]}
                 ).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"id": range(40, 50), "text": [f"new {i}" for i in range(10)]}).to_csv(tmp_path / "test.csv",
                                                                                        index=False)
    pd.DataFrame({"id": range(40, 50), "target": 0}).to_csv(tmp_path / "sample_submission.csv", index=False)
    data = load_dataset(DatasetSpec(uri=str(tmp_path), labelField="target", testSplit=0.25),
                        Task.SEQUENCE_CLASSIFICATION, 0)
    assert len(data.test.inputs) == 10 and all(text.startswith("tweet") for text in data.test.inputs)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(
        f"tweet {i}" for i in range(40))
    assert ("its test split (test.csv) has no column 'target' (dataset.labelField), so unlabelled: not used"
            in caplog.text)
    (tmp_path / "test.csv").rename(tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"no column 'target' \(dataset.labelField\); it has 'id', 'text'$"):
        load_dataset(DatasetSpec(uri=str(tmp_path), labelField="target"), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_file_of_no_known_format_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A .txt corpus was told to set dataset.format, though no format reads plain text lines."""
    (path := tmp_path / "corpus.txt").write_text("a first text\na second\n")
    with pytest.raises(DataError, match=r"corpus.txt: cannot tell the format from the extension; set dataset.format "
                                        r"to the file's \(csv, jsonl, parquet, coco\); plain text lines are none of"):
        load_dataset(spec(path), Task.CAUSAL_LM, 0)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^dataset.uri {tmp_path}/nope.csv: {tmp_path}/nope.csv does not exist$"):
        load_dataset(spec(tmp_path / "nope.csv"), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_single_label_is_refused(tmp_path: Path) -> None:
    pd.DataFrame([{"text": f"t{i}", "label": "same"} for i in range(10)]).to_csv(path := tmp_path / "s.csv", index=False)
    with pytest.raises(DataError, match="1 distinct label"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_head_smaller_than_the_labels_is_refused() -> None:
    with pytest.raises(DataError, match="numLabels is 2 but the dataset has 3 labels"):
        check_label_count({0: "a", 1: "b", 2: "c"}, 2)
    with pytest.raises(DataError, match=r"has 30 labels \(l0, l1, l2, l3, l4, l5, l6, l7, l8, l9 and 20 more\)$"):
        check_label_count({i: f"l{i}" for i in range(30)}, 2)  # a column of scores: thousands, not on one line
    assert check_label_count({0: "a", 1: "b"}, "auto") == 2
    assert check_label_count({0: "a", 1: "b"}, 4) == 4


COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_LAYOUTS = {  # file -> rows (indices into ROWS), as datasets on the hub lay them out
    "files-named-by-split": {"train.csv": range(0, 20), "validation.csv": range(20, 25), "test.csv": range(25, 30)},
    "split-folders": {"train/part-0.jsonl": range(0, 10), "train/part-1.jsonl": range(10, 20),
                      "valid/data.jsonl": range(20, 25), "test/data.jsonl": range(25, 30)},
    "parquet-shards": {"data/train-00000-of-00002.parquet": range(0, 10),
                       "data/train-00001-of-00002.parquet": range(10, 20),
                       "data/validation-00000-of-00001.parquet": range(20, 25),
                       "data/test-00000-of-00001.parquet": range(25, 30)},
    "no-test-split": {"data/train-00000-of-00001.parquet": range(0, 25), "data/dev-00000-of-00001.parquet": range(25, 30)},
}


def hub_dataset(cache: Path, repo: str, files: dict[str, range]) -> None:
    """A dataset repo as huggingface_hub caches it: datasets--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / f"datasets--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snapshot = base / "snapshots" / COMMIT
    (snapshot / "README.md").parent.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    for name, rows in files.items():
        (path := snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame([ROWS[i] for i in rows])
        if path.suffix == ".csv":
            frame.to_csv(path, index=False)
        elif path.suffix == ".jsonl":
            path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
        else:
            frame.to_parquet(path)


@pytest.mark.parametrize("layout", list(HUB_LAYOUTS))
def test_hf_datasets_in_the_hubs_layouts_load_their_splits(layout: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real hf:// path (huggingface_hub's snapshot_download, offline, from a cache laid out as the hub
    lays it): the dataset's own validation and test splits are used as they are, and a missing one is held out."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_dataset(tmp_path / "hub", f"org/{layout}", HUB_LAYOUTS[layout])
    data = load_dataset(spec(f"hf://org/{layout}"), Task.SEQUENCE_CLASSIFICATION, seed=0)
    texts = lambda rows: {ROWS[i]["text"] for i in rows}  # noqa: E731
    given = HUB_LAYOUTS[layout]
    validation = next(rows for name, rows in given.items() if any(w in name for w in ("valid", "dev")))
    assert set(data.validation.inputs) == texts(validation)
    if layout == "no-test-split":
        assert len(data.test.inputs) == 2 and set(data.train.inputs) | set(data.test.inputs) == texts(range(25))
    else:
        assert set(data.test.inputs) == texts(range(25, 30)) and set(data.train.inputs) == texts(range(20))
    assert data.id2label == {0: "neg", 1: "neu", 2: "pos"}
    for text, label in zip(data.test.inputs, data.test.labels):
        assert data.id2label[label] == ROWS[int(text.split()[1])]["label"]


def test_a_hub_dataset_is_read_at_the_revision_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset.revision pins a hub dataset to a tag or a commit, as model.revision pins a model: unpinned, a dataset
    changed on main changed a later attempt's data, and a rerun's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_dataset(tmp_path / "hub", "org/reviews", {"train.csv": range(0, 20)})  # main
    base = tmp_path / "hub" / "datasets--org--reviews"
    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    (base / "refs" / "v1").write_text(tagged)
    (base / "snapshots" / tagged).mkdir()
    pd.DataFrame([ROWS[i] for i in range(10, 30)]).to_csv(base / "snapshots" / tagged / "train.csv", index=False)
    texts = lambda rows: {ROWS[i]["text"] for i in rows}  # noqa: E731

    def read(**revision: str) -> set[str]:
        data = load_dataset(spec("hf://org/reviews", **revision), Task.SEQUENCE_CLASSIFICATION, seed=0)
        return {*data.train.inputs, *data.validation.inputs, *data.test.inputs}

    assert read() == texts(range(0, 20))
    assert read(revision="v1") == read(revision=tagged) == texts(range(10, 30))
    with pytest.raises(DataError, match=r"dataset\.uri hf://org/reviews: not on the hub nor in the local cache"):
        read(revision="v2")


def test_a_hub_dataset_written_as_huggingface_hubs_file_system_writes_it_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf://datasets/<org>/<name>, as HfFileSystem, pandas and duckdb write a dataset, was read as the repo
    datasets/<org>: "not on the hub nor in the local cache" of a dataset that was there."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_dataset(tmp_path / "hub", "org/reviews", {"data/train.csv": range(0, 20), "data/test.csv": range(20, 30)})
    for uri in ("hf://org/reviews", "hf://datasets/org/reviews", "hf://datasets/org/reviews/data"):
        data = load_dataset(spec(uri), Task.SEQUENCE_CLASSIFICATION, seed=0)
        assert set(data.test.inputs) == {ROWS[i]["text"] for i in range(20, 30)}, uri


def test_withheld_held_out_labels_are_not_a_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """GLUE and SST-2 on the hub ship their test split with every label -1 (withheld): those rows are dropped, not
    made a class, and the emptied split is held out of train instead. Where train has -1 too, it is a class."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    base = tmp_path / "hub" / "datasets--org--sst2" / "snapshots" / COMMIT
    hub_dataset(tmp_path / "hub", "org/sst2", {})
    pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}).to_parquet(
        base / "train-00000-of-00001.parquet")
    pd.DataFrame({"text": [f"v{i}" for i in range(6)], "label": [0, 1, -1, 0, 1, 0]}).to_parquet(
        base / "validation-00000-of-00001.parquet")
    pd.DataFrame({"text": [f"x{i}" for i in range(8)], "label": [-1] * 8}).to_parquet(base / "test-00000-of-00001.parquet")
    data = load_dataset(spec("hf://org/sst2", testSplit=0.25), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "0", 1: "1"}
    assert sorted(data.validation.inputs) == ["v0", "v1", "v3", "v4", "v5"]
    assert len(data.test.inputs) == 10 and all(t.startswith("t") for t in data.test.inputs)
    assert len(data.train.inputs) == 30 and not set(data.train.inputs) & set(data.test.inputs)
    assert "dropped 8 test rows labelled -1" in caplog.text and "its test split has no usable rows" in caplog.text

    rows = [{"text": f"s{i}", "label": [-1, 0, 1][i % 3]} for i in range(30)]
    pd.DataFrame(rows).to_csv(path := tmp_path / "sentiment.csv", index=False)
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "-1", 1: "0", 2: "1"}


def test_copies_of_a_text_stay_on_one_side_of_the_split(tmp_path: Path) -> None:
    """Scraped corpora repeat texts (retweets): every copy lands on the same side, so no held-out score is taken on
    a text that trained, and no row is lost. Without copies the split is what it was."""
    rows = [{"text": f"text {i % 20}", "label": ["a", "b"][i % 2]} for i in range(60)]  # each text 3 times
    pd.DataFrame(rows).to_csv(path := tmp_path / "copies.csv", index=False)
    for seed in range(5):
        data = load_dataset(spec(path, testSplit=0.1), Task.SEQUENCE_CLASSIFICATION, seed)
        train, validation, test = set(data.train.inputs), set(data.validation.inputs), set(data.test.inputs)
        assert not train & validation and not train & test and not validation & test
        assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == 60
        assert all(len(side) % 3 == 0 for side in (data.train.inputs, data.validation.inputs, data.test.inputs))
    # A text with many copies (the corpus retweets one 303 times) is spread through its side as the seed shuffles
    # it, not a block at the start of a capped side
    rows = [{"text": "retweet" if i % 20 == 0 else f"text {i}", "label": ["a", "b"][i % 2]} for i in range(200)]
    pd.DataFrame(rows).to_csv(path, index=False)
    few_held = DatasetSpec(uri=str(path), labelField="label", validationSplit=0.05, testSplit=0.05)
    spread = []
    for seed in range(30):
        train = load_dataset(few_held, Task.SEQUENCE_CLASSIFICATION, seed).train.inputs
        if at := [i for i, text in enumerate(train) if text == "retweet"]:  # else its copies were all held out
            spread.append(at != list(range(at[0], at[0] + len(at))))
    assert len(spread) >= 5 and all(spread)
    unique = load_dataset(spec(write(tmp_path, "csv")), Task.SEQUENCE_CLASSIFICATION, 3)
    order = np.random.default_rng(3).permutation(30)
    assert unique.test.inputs == [ROWS[i]["text"] for i in order[:3]]  # the split of a corpus without copies


def test_held_out_sides_take_their_share_of_rows_however_often_texts_repeat(tmp_path: Path) -> None:
    """Inputs were placed by their earliest copy in the seed's order, which comes the earlier the more copies: a
    text 300 times in 1,000 rows was in test under every seed (test 460 rows where 100 were asked), and a corpus of
    texts twice each held out 378 and 344 rows where 200 were asked."""
    rows = ([{"text": "Great!", "label": "p"}] * 300 + [{"text": "Terrible.", "label": "n"}] * 100
            + [{"text": f"t{i}", "label": "pn"[i % 2]} for i in range(600)])
    pd.DataFrame(rows).to_csv(path := tmp_path / "skewed.csv", index=False)
    tenths = DatasetSpec(uri=str(path), labelField="label", validationSplit=0.1, testSplit=0.1)
    held_out, sizes = 0, []
    for seed in range(20):
        data = load_dataset(tenths, Task.SEQUENCE_CLASSIFICATION, seed)
        held_out += "Great!" in data.test.inputs + data.validation.inputs
        sizes += [len(data.test.inputs), len(data.validation.inputs)]
    # each side its 100 rows, past them only by the copies of the input that crossed them
    assert all(100 <= size < 400 for size in sizes) and sorted(sizes)[len(sizes) // 2] == 100
    assert held_out <= 8  # about one seed in five: the sides hold a fifth of the rows
    pd.DataFrame([{"text": f"t{i % 1000}", "label": "pn"[i % 2]} for i in range(2000)]).to_csv(path, index=False)
    for seed in range(3):
        data = load_dataset(tenths, Task.SEQUENCE_CLASSIFICATION, seed)
        assert (len(data.train.inputs), len(data.validation.inputs), len(data.test.inputs)) == (1600, 200, 200)


def test_csv_words_that_pandas_calls_missing_are_data(tmp_path: Path) -> None:
    """Only an empty cell is missing: a class named "None" or "NA", or the text "null", is kept."""
    rows = [{"text": ["null", "N/A", f"t{i}"][i % 3], "label": ["None", "NA", "positive"][i % 3]} for i in range(30)]
    pd.DataFrame(rows).to_csv(path := tmp_path / "tags.csv", index=False)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "NA", 1: "None", 2: "positive"}
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == 30
    assert "null" in data.train.inputs + data.validation.inputs + data.test.inputs


def test_labels_spelt_as_a_missing_value_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """R's write.csv writes a missing value as NA, unquoted: read as data, it made a class "NA" without a word."""
    lines = ['"","text","label"'] + [f'"{i + 1}","review {i}",' + ('"pos"', '"neg"', "NA")[i % 3] for i in range(30)]
    (path := tmp_path / "reviews.csv").write_text("\n".join(lines) + "\n")
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "NA", 1: "neg", 2: "pos"}
    assert ("column 'label' (dataset.labelField) holds labels spelt as a missing value, each a class of its own: "
            "NA (10 of 30 rows); clean the file" in caplog.text)
    # A ClassLabel's own names are no values a file spelt: tweet_eval's stance classes are none, against, favor.
    caplog.clear()
    (hub := tmp_path / "stance").mkdir()
    path = class_label_dataset(hub, "parquet", ["none", "against", "favor"], {"train": [i % 3 for i in range(30)]})
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "none", 1: "against", 2: "favor"}
    assert "spelt as a missing value" not in caplog.text


def test_a_json_array_of_records_loads(tmp_path: Path) -> None:
    (path := tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)


@pytest.mark.parametrize("indent", [2, None])
def test_a_stream_of_json_objects_loads(tmp_path: Path, indent: int | None) -> None:
    """`jq . d.jsonl > d.json` writes its objects one after another, each over lines (`jq -j -c`, on one line): read
    as JSON Lines, it was refused as "line 1 is not JSON (Expecting property name enclosed in double quotes, ...)"."""
    (path := tmp_path / "d.json").write_text("".join(json.dumps(r, indent=indent) + "\n" * bool(indent) for r in ROWS))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)


@pytest.mark.parametrize("empty", [1, 2])
def test_a_stream_of_json_objects_starting_with_empty_ones_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  empty: int) -> None:
    """jq prints an empty object on one line, "{}": a stream starting with one was taken for JSON Lines, and refused
    as "line 2 is not JSON (Expecting property name enclosed in double quotes, column 2)"."""
    (path := tmp_path / "d.json").write_text("{}\n" * empty + "".join(json.dumps(r, indent=2) + "\n" for r in ROWS))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)
    assert f"dropped {empty} train rows with an empty text or label" in caplog.text


@pytest.mark.parametrize("records", [
    [{"text": "10", "label": 1, "2": None, "f": 2.0, "b": True, "l": [1]}, {"text": None, "2": "x", "f": 1.5}],
    [{"1": "a", "2": None}, {"1": "b", "2": None}],  # names all numbers (pandas makes them ints); a column all null
    [{"text": "a", "l": [1]}, {"text": "b", "l": None}, {}],  # a null beside a list, a record of no keys
    [{"text": "great \ud83d", "label": 1}, {"text": "bad", "label": 0}],  # an emoji cut in two: pandas drops the half
])
def test_a_stream_of_json_objects_reads_as_the_array_of_them_does(records: list[dict]) -> None:
    """A stream is decoded once, by json, and made a table as pandas makes an array's: the same columns (names that
    read as numbers as those), dtypes and missing values."""
    stream = "".join(json.dumps(r, indent=2) + "\n" for r in records)
    pd.testing.assert_frame_equal(read_json(stream, "d.json"), read_json(json.dumps(records), "d.json"))


def test_a_stream_of_json_objects_is_refused_naming_the_line_of_a_bad_one(tmp_path: Path) -> None:
    """Each object is 4 lines (its text's, its label's and its braces'), 5 with the blank line after it."""
    objects = [json.dumps(r, indent=2) + "\n\n" for r in ROWS[:5]]
    (path := tmp_path / "d.json").write_text("".join([*objects[:3], '{\n  "text": "t"\n  "label": "a"\n}\n', *objects]))
    with pytest.raises(DataError, match=r"\(ValueError: d.json line 18 is not JSON \(Expecting ',' delimiter"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    (path := tmp_path / "d.json").write_text("".join([*objects[:3], "[\n  1\n]\n", *objects]))
    with pytest.raises(DataError, match=r"\(ValueError: d.json line 16 is not a JSON object"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_json_arrays_one_after_another_load_as_their_records(tmp_path: Path) -> None:
    """`cat a.json b.json` of two array files: refused as "line 63 is not JSON (Extra data, column 1)"."""
    (path := tmp_path / "d.json").write_text(json.dumps(ROWS[:15], indent=2) + "\n" + json.dumps(ROWS[15:]))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)


@pytest.mark.parametrize("layout", ["stream", "lines", "arrays"])
def test_json_nested_past_the_parsers_depth_is_refused_as_the_files_fault(tmp_path: Path, layout: str) -> None:
    """json raises RecursionError past its depth, which escaped as the pod's fault: exit 2, retried for ever."""
    deep = "[" * 5000 + "]" * 5000
    text = {"stream": '{\n  "text": "a",\n  "label": ' + deep + '\n}\n{\n  "text": "b"\n}\n',
            "lines": '{"text": "a", "label": ' + deep + '}\n', "arrays": f'[{{"text": "a", "label": {deep}}}]\n[]'}
    (path := tmp_path / "d.json").write_text(text[layout])
    with pytest.raises(DataError, match=r"d.json: cannot read it as jsonl \(RecursionError: maximum recursion depth"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_json_integer_past_64_bits_is_refused_naming_its_file(tmp_path: Path) -> None:
    """pandas refuses an integer past 64 bits in JSON Lines ("Value is too big! at position 24"): the error named no
    file, and in a folder of shards the user could not tell which one."""
    (folder := tmp_path / "shards").mkdir()
    (folder / "train-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "train-1.jsonl").write_text(json.dumps({"text": "a", "label": 2 ** 64}) + "\n")
    with pytest.raises(DataError, match=r"cannot read it as jsonl \(ValueError: train-1.jsonl: Value is too big!"):
        load_dataset(spec(folder), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize(("layout", "error"), [
    ("array", r"d.json: Value is too big!"), ("lines", r"d.json: Value is too big!"),
    ("arrays", r"d.json line 63 starts a value holding an integer past 64 bits \(18446744073709551616\): write it as "),
    ("stream", r"d.json line 81 starts a value holding an integer past 64 bits \(18446744073709551616\): write it as "),
], ids=["array", "lines", "arrays", "stream"])
def test_a_json_integer_past_64_bits_is_refused_in_every_layout(tmp_path: Path, layout: str, error: str) -> None:
    """pandas refuses it in an array or JSON Lines; a stream and joined arrays, decoded by json, read it, the same
    data read in one layout and refused in another."""
    rows = [*ROWS[:20], {"text": "big", "label": 2 ** 64}, *ROWS[21:]]  # in the second of two arrays, at line 63
    text = {"array": json.dumps(rows, indent=2), "lines": "".join(json.dumps(r) + "\n" for r in rows),
            "arrays": json.dumps(rows[:15], indent=2) + "\n" + json.dumps(rows[15:]),
            "stream": "".join(json.dumps(r, indent=2) + "\n" for r in rows)}
    (path := tmp_path / "d.json").write_text(text[layout])
    with pytest.raises(DataError, match=rf"cannot read it as jsonl \(ValueError: {error}"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_json_arrays_one_after_another_load_past_the_byte_order_mark_each_file_began_with(tmp_path: Path) -> None:
    """Windows' editors start a file with a BOM, so a join has one between arrays: refused as "line 2 is not JSON
    (Expecting value, column 1)", an invisible character's."""
    (path := tmp_path / "d.json").write_text(json.dumps(ROWS[:15]) + "\n\ufeff" + json.dumps(ROWS[15:]))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)


def test_json_arrays_one_after_another_are_refused_naming_the_line_of_a_bad_one(tmp_path: Path) -> None:
    """Each array of two records is 10 lines (4 a record, its brackets')."""
    arrays = [json.dumps(ROWS[i:i + 2], indent=2) + "\n" for i in range(0, 6, 2)]
    (path := tmp_path / "d.json").write_text("".join([*arrays[:2], '[\n  {"text": "t", "label": "a"},\n  3\n]\n']))
    with pytest.raises(DataError, match=r"\(ValueError: d.json line 21 starts an array whose record \[1\] is not a "):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    (path := tmp_path / "d.json").write_text("".join([*arrays[:2], json.dumps(ROWS[0]), "\n", arrays[2]]))
    with pytest.raises(DataError, match=r"\(ValueError: d.json line 21 is not a JSON array, as the file's first"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("body", [{"data": ROWS}, {"version": "1.0", "rows": ROWS}])
def test_a_json_object_wrapping_the_rows_is_refused_naming_its_list(tmp_path: Path, body: dict) -> None:
    """Exports wrap the rows in an object: read as one row, it was refused only as "no column 'text' ...; it has
    'data'". Its list is not read as the rows: SQuAD's "data" holds articles, not its questions."""
    (path := tmp_path / "d.json").write_text(json.dumps(body, indent=2))
    key = list(body)[-1]
    said = rf"; the file holds one record, whose key '{key}' holds a list of 30 records: .* jq -c '.{key}\[\]' does$"
    with pytest.raises(DataError, match=rf"d.json: no column 'text' \(dataset.textField\); it has .*{said}"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("text", [json.dumps([{"data": ROWS}], indent=2), json.dumps([{"data": ROWS}]) + "\n[]"],
                         ids=["array", "joined-arrays"])
def test_an_array_of_one_object_wrapping_the_rows_is_refused_naming_their_jq_path(tmp_path: Path, text: str) -> None:
    """The rows of [{"data": [...]}] are at .[].data[]: the hint said jq -c '.data[]', which jq refuses on an array
    ("Cannot index array with "data"")."""
    (path := tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError, match=re.escape("holds a list of 30 records: if those are the rows, write them one a "
                                                  "line, as jq -c '.[].data[]' does")):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_wrapped_lists_jq_quotes_a_key_that_is_no_ascii_name(tmp_path: Path) -> None:
    """jq's `.key` takes ASCII names only (`.données[]` is its syntax error), and a quote ends the shell's."""
    (path := tmp_path / "d.json").write_text(json.dumps({"it's données": ROWS}))
    with pytest.raises(DataError, match=re.escape("""as jq -c '.["it'\\''s données"][]' does""")):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("rows", [len(ROWS), 1])
def test_a_json_row_holding_a_list_of_objects_is_no_wrapper(tmp_path: Path, rows: int) -> None:
    """A row's list of objects (a chat's messages) says nothing of wrapped rows where the file has more rows, or
    where the list holds one object (rows of none)."""
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    (path := tmp_path / "d.jsonl").write_text("".join(chat + "\n" for _ in range(rows)))
    with pytest.raises(DataError, match=r"no column 'text' \(dataset.textField\); it has 'messages'$"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_json_of_columns_is_refused_saying_how_to_write_records(tmp_path: Path) -> None:
    """pandas' df.to_json() writes one object of columns, each a dict by row number: read as one row that holds
    them, it was refused only as "holds {'0': 'sample 0', ...}, not a text"."""
    pd.DataFrame(ROWS).to_json(path := tmp_path / "d.json")
    with pytest.raises(DataError, match=r"column 'text' \(dataset.textField\) holds \{'0': 'sample 0'.*, not a text; "
                                        r"the file holds a dict of rows per column .*orient=\"records\", lines=True"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_splits_without_train_are_refused(tmp_path: Path) -> None:
    import datasets

    frame = datasets.Dataset.from_pandas(pd.DataFrame(ROWS))
    datasets.DatasetDict({"test": frame, "validation": frame}).save_to_disk(tmp_path / "hf")
    with pytest.raises(DataError, match=r"its splits \(test, validation\) include no train split"):
        load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    (folder := tmp_path / "files").mkdir()
    pd.DataFrame(ROWS).to_csv(folder / "test.csv", index=False)
    with pytest.raises(DataError, match=r"the files name splits \(test\) but none is train"):
        load_dataset(spec(folder), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_damaged_save_to_disk_file_is_refused_as_the_files_fault(tmp_path: Path) -> None:
    """pyarrow raises a damaged .arrow file as an OSError of no errno ("Invalid flatbuffers message"), which escaped as
    the pod's fault (exit 2), retried for ever on a file that never reads."""
    import datasets

    datasets.Dataset.from_pandas(pd.DataFrame(ROWS)).save_to_disk(tmp_path / "hf")
    arrow = next((tmp_path / "hf").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:8] + bytes(arrow.stat().st_size - 8))
    with pytest.raises(DataError, match=r"hf: cannot read it as hf-disk \(ValueError: .*/hf: a damaged save_to_disk "
                                        r"file \(Invalid flatbuffers message"):
        load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    # its data unchecked, memory-mapped: a string not UTF-8 raised an ArrowException as the rows were read (offsets
    # past its buffers crashed the process, exit 139)
    rows = pd.DataFrame({"text": [f"t{i:02d}" for i in range(20)], "label": ["ab"[i % 2] for i in range(20)]})
    datasets.Dataset.from_pandas(rows).save_to_disk(tmp_path / "hf2")
    arrow = next((tmp_path / "hf2").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes().replace(b"t05", b"t\xff5"))
    with pytest.raises(DataError, match=r"hf2: cannot read it as hf-disk \(ValueError: .*/hf2: a damaged save_to_disk "
                                        r"file: its column text holds data not of its type"):
        load_dataset(spec(tmp_path / "hf2"), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("said", ["Memory mapping file failed: Cannot allocate memory",
                                  "Allocation error: not enough memory", "Failed to open: No such device"])
def test_an_os_fault_said_with_no_errno_is_not_a_damaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              said: str) -> None:
    """pyarrow raises a failed mmap (ENOMEM, ENODEV, vm.max_map_count) and a codec's failed allocation as an OSError of
    no errno, as it does a damaged file: called the file's fault (exit 1), a node's fault was never retried."""
    import datasets
    import pyarrow.parquet as pq

    datasets.Dataset.from_pandas(pd.DataFrame(ROWS)).save_to_disk(tmp_path / "hf")
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")

    def fails(*args: Any, **kwargs: Any) -> None:
        raise OSError(said)

    monkeypatch.setattr(datasets, "load_from_disk", fails)
    monkeypatch.setattr(pq, "read_table", fails)
    monkeypatch.setattr(pd, "read_parquet", fails)
    for path in (tmp_path / "hf", tmp_path / "d.parquet"):
        with pytest.raises(OSError, match=said) as raised:
            load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
        assert not isinstance(raised.value, DataError)


def test_a_loaders_words_of_a_missing_file_are_no_failed_read() -> None:
    """An OSError of no errno saying an OS fault is a failed read (retried); one saying a file is missing or refused
    (a loader's words, "No such file or directory") is the user's to fix, as its errno is."""
    from finetune_trainer.errors import failed_read

    assert failed_read(OSError("Memory mapping file failed: Cannot allocate memory"))
    for said in ("config.json: No such file or directory", "model.safetensors: Permission denied"):
        assert not failed_read(OSError(said))


def test_a_damaged_save_to_disk_column_the_job_never_reads_is_dropped(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A string not UTF-8 only in a column the job does not read refused the whole dataset."""
    import datasets

    rows = pd.DataFrame({"text": [f"t{i:02d}" for i in range(20)], "label": ["ab"[i % 2] for i in range(20)],
                         "notes": [f"n{i:02d}" for i in range(20)]})
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(rows)}).save_to_disk(tmp_path / "hf")
    arrow = next((tmp_path / "hf" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes().replace(b"n05", b"n\xff5"))
    with caplog.at_level(logging.WARNING):
        data = load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == list(rows["text"])
    assert "(its train split): its column notes holds data not of its type" in caplog.text


def without(key: str) -> Callable[[Any], Any]:
    return lambda value: {k: v for k, v in value.items() if k != key}


def with_value(key: str, new: Any) -> Callable[[Any], Any]:
    return lambda value: {**value, key: new}


@pytest.mark.parametrize(("file", "edit"), [
    ("state.json", lambda value: []),
    ("state.json", with_value("_data_files", [{"file": "x.arrow"}])),
    ("state.json", with_value("_format_columns", 5)),
    ("state.json", with_value("_split", 5)),
    ("state.json", without("_fingerprint")),
    ("dataset_info.json", lambda value: [1]),
    ("dataset_info.json", with_value("features", 5)),
    ("dataset_info.json", with_value("splits", 5)),
    ("dataset_info.json", lambda value: {**value, "features": {**value["features"], "label": {
        "_type": "ClassLabel", "names": [1, 2, 3]}}}),
    ("dataset_dict.json", lambda value: {}),
    ("train/state.json", with_value("_data_files", [{"file": "x.arrow"}])),
], ids=["state-a-list", "state-no-filename", "format-columns-a-number", "split-a-number", "no-fingerprint",
        "info-a-list", "features-a-number", "info-splits-a-number", "class-names-numbers", "dict-no-splits",
        "a-splits-state"])
def test_save_to_disk_metadata_of_another_shape_is_refused_naming_the_folder(tmp_path: Path, file: str,
                                                                            edit: Callable[[Any], Any]) -> None:
    """load_from_disk indexes its JSON files as it writes them: a hand-edited one of another shape raised TypeError,
    KeyError, IndexError, AttributeError or ValueError, the pod's fault (exit 2), retried for ever (a split "." recursed
    as it was checked)."""
    import datasets

    saved = datasets.Dataset.from_pandas(pd.DataFrame(ROWS).assign(label=[r["label"] == "pos" for r in ROWS]))
    folder = tmp_path / "hf"
    if file.startswith("dataset_dict") or "/" in file:
        datasets.DatasetDict({"train": saved}).save_to_disk(folder)
    else:
        saved.save_to_disk(folder)
    target = folder / file if file != "dataset_info.json" or (folder / file).is_file() else folder / "train" / file
    target.write_text(json.dumps(edit(json.loads(target.read_text()))))
    with pytest.raises(DataError, match=r"hf: cannot read it as hf-disk \(ValueError: .*/hf: its save_to_disk "
                                        r"metadata .* is not as datasets writes it: \w+Error: "):
        load_dataset(spec(folder), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_saved_split_named_dot_is_refused_naming_it(tmp_path: Path) -> None:
    """A split "." in dataset_dict.json recursed as the metadata was checked (RecursionError)."""
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(pd.DataFrame(ROWS))}).save_to_disk(tmp_path / "hf")
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["."]}))
    with pytest.raises(DataError, match=r"hf: cannot read it as hf-disk \(FileNotFoundError: .*hf/\./state.json"):
        load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_saved_split_of_no_rows_is_a_split_of_no_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """save_to_disk writes a split of no rows with no data file ("_data_files": []), which load_from_disk cannot read
    back (IndexError): it was refused as metadata "not as save_to_disk writes it", though save_to_disk wrote it."""
    import datasets

    frame = pd.DataFrame(ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame),
                          "validation": datasets.Dataset.from_pandas(frame.iloc[:0])}).save_to_disk(tmp_path / "hf")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert "its validation split has no usable rows" in caplog.text
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == len(ROWS)
    datasets.Dataset.from_pandas(frame.iloc[:0]).save_to_disk(tmp_path / "none")
    with pytest.raises(DataError) as raised:
        load_dataset(spec(tmp_path / "none"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert "save_to_disk" not in str(raised.value) and "IndexError" not in str(raised.value)


def test_saved_splits_of_one_kind_are_one_split_together(tmp_path: Path) -> None:
    """MNLI's validation_matched and validation_mismatched: a dict by kind kept only the split saved last, so the
    validation rows depended on the order of saving, where the same splits as files were read together."""
    import datasets

    frame = pd.DataFrame(ROWS)
    splits = {"train": frame, "validation_matched": frame.iloc[:5].assign(text=[f"m{i}" for i in range(5)]),
              "validation_mismatched": frame.iloc[:3].assign(text=[f"x{i}" for i in range(3)])}
    datasets.DatasetDict({name: datasets.Dataset.from_pandas(f) for name, f in splits.items()}).save_to_disk(
        tmp_path / "hf")
    data = load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.validation.inputs) == [*(f"m{i}" for i in range(5)), *(f"x{i}" for i in range(3))]


def test_saved_splits_of_no_split_name_are_said_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The hub's unsupervised (IMDB's) or a heldout split were dropped unsaid, where a folder's files of no split name
    are said."""
    import datasets

    frame = datasets.Dataset.from_pandas(pd.DataFrame(ROWS))
    datasets.DatasetDict({"train": frame, "heldout": frame, "unsupervised": frame}).save_to_disk(tmp_path / "hf")
    data = load_dataset(spec(tmp_path / "hf"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == len(ROWS)
    assert "ignoring its splits of no train, validation or test name: heldout, unsupervised" in caplog.text


def test_a_validation_split_that_shares_the_tests_inputs_selects_on_none_of_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Early stopping and the best checkpoint select on validation, and the test's scores are to come from rows that
    nothing chose by: a validation split that copied the test split (or shared some of its inputs) loaded unsaid.
    Shared inputs are left out of validation; a validation split mostly the test's is held out of train instead."""
    frame = pd.DataFrame(ROWS)  # 30 rows
    frame.iloc[:20].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[20:].to_csv(tmp_path / "test.csv", index=False)
    frame.iloc[20:].to_csv(tmp_path / "validation.csv", index=False)  # a copy
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(frame.text[20:])
    assert len(data.validation.inputs) == 4 and set(data.validation.inputs) <= set(frame.text[:20])  # 0.2 of train
    assert not set(data.train.inputs) & set(data.validation.inputs)
    assert "10 of the 10 rows of its validation split are inputs of its test split: held out of its train split" in (
        caplog.text)
    caplog.clear()
    pd.concat([frame.iloc[27:], frame.iloc[:2].assign(text=["v0", "v1"]), frame.iloc[2:7].assign(
        text=[f"v{i}" for i in range(2, 7)])]).to_csv(tmp_path / "validation.csv", index=False)  # 3 of 10 shared
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.validation.inputs) == [f"v{i}" for i in range(7)]
    assert "3 rows of its validation split are inputs of its test split too: left out of validation" in caplog.text
    caplog.clear()
    for name in ("train", "validation", "test"):  # a test split that trained is no held-out one already: as it was
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    assert len(load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0).validation.inputs) == 30
    assert "inputs of its test split are in its train split too" in caplog.text and "left out" not in caplog.text


def test_a_validation_split_of_train_inputs_selects_on_none_held_out_for_test(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A dataset with its own validation split and no test split: test is held out of train, and validation rows
    whose input went to that test (a hub's validation split shares inputs with its train split) were kept, so early
    stopping selected on test rows (8 of the 20 test inputs here)."""
    frame = pd.DataFrame([{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(200)])
    frame.to_csv(tmp_path / "train.csv", index=False)
    pd.concat([frame.iloc[:100], frame.iloc[:100].assign(text=[f"v{i}" for i in range(100)])]).to_csv(
        tmp_path / "validation.csv", index=False)  # 100 of its 200 rows train inputs
    data = load_dataset(spec(tmp_path, testSplit=0.1), Task.SEQUENCE_CLASSIFICATION, 0)
    assert len(data.test.inputs) == 20 and not set(data.test.inputs) & set(data.train.inputs)
    shared = len(set(data.test.inputs) & set(frame.text[:100]))
    assert shared and not set(data.validation.inputs) & set(data.test.inputs)
    assert len(data.validation.inputs) == 200 - shared
    assert f"{shared} rows of its validation split are inputs of the test rows held out of its train split too: " \
        "left out of validation" in caplog.text


def test_a_one_column_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    """A header with no separator (a causal LM's one column) was read with commas: 'Hello, world' was a row of two
    fields, refused with advice to quote the comma, in a .tsv."""
    (path := tmp_path / "lines.tsv").write_text("text\n" + "".join(f"Hello, world {i}\n" for i in range(40)))
    data = load_dataset(spec(path), Task.CAUSAL_LM, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(
        f"Hello, world {i}" for i in range(40))


def test_a_repo_of_subsets_needs_one_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub repo with a folder per subset (GLUE's cola/, sst2/) is refused rather than merged into one dataset;
    hf://<org>/<name>/<folder> names one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_dataset(tmp_path / "hub", "org/glue", {"cola/train-00000-of-00001.parquet": range(0, 20),
                                               "cola/test-00000-of-00001.parquet": range(20, 25),
                                               "sst2/train-00000-of-00001.parquet": range(5, 30)})
    with pytest.raises(DataError, match=r"holds 2 datasets in its folders \(cola, sst2\)"):
        load_dataset(spec("hf://org/glue"), Task.SEQUENCE_CLASSIFICATION, 0)
    data = load_dataset(spec("hf://org/glue/cola"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(ROWS[i]["text"] for i in range(20, 25))
    assert len(data.train.inputs) + len(data.validation.inputs) == 20
    with pytest.raises(DataError, match="org/glue has no folder 'mnli'"):
        load_dataset(spec("hf://org/glue/mnli"), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_held_out_file_in_a_folder_of_no_train_split_is_refused_naming_it(tmp_path: Path) -> None:
    """a/train.csv, a/test.csv and b/test.csv: the test split was a/test and b/test together, silently, where only
    the train files were held to one dataset's folder."""
    for name, rows in {"a/train.csv": range(0, 20), "a/test.csv": range(20, 25), "b/test.csv": range(25, 30)}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        pd.DataFrame([ROWS[i] for i in rows]).to_csv(tmp_path / name, index=False)
    with pytest.raises(DataError, match=r"test files outside the train split's folder \(a\): b/test\.csv; point"):
        load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    data = load_dataset(spec(tmp_path / "a"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(ROWS[i]["text"] for i in range(20, 25))


def test_an_image_folder_declared_of_a_file_is_refused_naming_the_uri(tmp_path: Path) -> None:
    """Listing the file raised NotADirectoryError: exit 2, and the operator retried what no retry mends."""
    with pytest.raises(DataError, match=r"^dataset.uri .*d.csv: a file, and dataset.format imagefolder reads a folder"):
        load_dataset(spec(write(tmp_path, "csv"), format="imagefolder"), Task.IMAGE_CLASSIFICATION, 0)


@pytest.mark.parametrize("task", [Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM])
def test_a_text_task_refuses_the_image_folder_auto_finds(tmp_path: Path, task: Task) -> None:
    """It read the images' file paths as the texts, their class folders inside them: a classifier could learn the
    labels from the paths."""
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"holds images \(imagefolder\), not texts; point dataset.uri at texts"):
        load_dataset(spec(tmp_path), task, seed=0)



@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_text_files_are_read(tmp_path: Path, suffix: str) -> None:
    """The hub's train.jsonl.gz: its folder was taken for an ImageFolder, "holds images (imagefolder), not texts"."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    (tmp_path / "data").mkdir()
    for name, rows in (("train", ROWS), ("test", ROWS[:4])):
        (tmp_path / "data" / f"{name}.jsonl{suffix}").write_bytes(compress("\n".join(map(json.dumps, rows)).encode()))
    (tmp_path / f"d.tsv{suffix}").write_bytes(compress(
        ("text\tlabel\n" + "".join(f"{r['text']}, more\t{r['label']}\n" for r in ROWS)).encode()))
    data = load_dataset(spec(tmp_path / "data"), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(r["text"] for r in ROWS[:4]) and data.id2label == {0: "neg", 1: "neu",
                                                                                                  2: "pos"}
    data = load_dataset(spec(tmp_path / f"d.tsv{suffix}"), Task.SEQUENCE_CLASSIFICATION, 0)  # read with tabs
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == 30 and len(data.id2label) == 3


def test_a_compressed_file_the_trainer_cannot_read_is_refused_naming_it(tmp_path: Path) -> None:
    from finetune_trainer.errors import exit_code_of

    (path := tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match=r"d.jsonl.zst is compressed with zstd, which the trainer does not read"):
        load_dataset(spec(path), Task.CAUSAL_LM, 0)
    (path := tmp_path / "d.csv.gz").write_bytes(b"text,label\n")
    with pytest.raises(DataError, match=r"d.csv.gz does not decompress as .gz \(Not a gzipped file") as caught:
        load_dataset(spec(path), Task.CAUSAL_LM, 0)
    assert exit_code_of(caught.value) == 1
    # bz2 raises one cut short as a ValueError, which named no file: in a folder of shards, which one?
    import bz2

    (folder := tmp_path / "shards").mkdir()
    (folder / "train-0.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "a"}\n'))
    (folder / "train-1.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "b"}\n')[:30])
    with pytest.raises(DataError, match=r"train-1.jsonl.bz2 does not decompress as .bz2 \(Compressed data ended"):
        load_dataset(spec(folder), Task.CAUSAL_LM, 0)


def test_a_folder_of_folders_of_no_images_is_no_image_folder(tmp_path: Path) -> None:
    """Any folder with a subfolder was an ImageFolder: a text task was told it "holds images (imagefolder)"."""
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b1.txt").write_text("a text\n")
    with pytest.raises(DataError, match=rf"^{tmp_path}: a folder that is neither an ImageFolder nor an HF dataset, "
                                        r"nor holds files of a format \(it holds .txt\); point dataset.uri at a file$"):
        load_dataset(spec(tmp_path), Task.CAUSAL_LM, 0)

@pytest.mark.parametrize("record", ["[1, 2]", "null", "5"])
def test_a_json_record_that_is_not_an_object_is_refused_naming_it(tmp_path: Path, record: str) -> None:
    """pandas raises a TypeError for such a record, which counted as the infrastructure's (exit 2, retried)."""
    lines = [json.dumps(r) for r in ROWS[:5]]
    (path := tmp_path / "d.jsonl").write_text("\n".join([*lines, "", record, *lines]) + "\n")
    with pytest.raises(DataError, match=r"cannot read it as jsonl \(ValueError: d.jsonl line 7 is not a JSON object"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    (path := tmp_path / "d.json").write_text(json.dumps([*ROWS[:3], json.loads(record), *ROWS[3:5]]))
    with pytest.raises(DataError, match=r"cannot read it as jsonl \(ValueError: d.json record \[3\] is not a JSON object"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_json_record_that_does_not_parse_is_refused_naming_its_line(tmp_path: Path) -> None:
    """pandas named a character offset only: 'Expected object or value at position 1437'."""
    lines = [json.dumps(r) for r in ROWS[:5]]
    (path := tmp_path / "d.jsonl").write_text("\n".join([*lines, '{"text": "t", label: "a"}', *lines]) + "\n")
    with pytest.raises(DataError, match=r"\(ValueError: d.jsonl line 6 is not JSON \(Expecting property name"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    (path := tmp_path / "d.json").write_text("[\n" + ",\n".join([*lines[:3], '{"text": "t" "label": "a"}']) + "\n]")
    with pytest.raises(DataError, match=r"\(ValueError: d.json line 5 is not JSON \(Expecting ',' delimiter"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_an_empty_text_or_label_is_missing_in_every_format(tmp_path: Path, fmt: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """As an empty CSV cell is: a label "" is no class, and a text "" or "  " is no input to learn a label from."""
    blank = [{"text": "", "label": "neg"}, {"text": "  ", "label": "pos"}, {"text": "sample 99", "label": ""},
             {"text": "sample 98", "label": " "}]
    frame = pd.DataFrame(ROWS + blank)
    if fmt == "jsonl":
        (path := tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    else:
        frame.to_parquet(path := tmp_path / "d.parquet")
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(r["text"] for r in ROWS)
    assert "dropped 4 train rows with an empty text or label" in caplog.text


def test_an_image_folder_with_folders_named_by_split_uses_them(tmp_path: Path) -> None:
    """train/<class>/*.png and test/<class>/*.png, as torchvision's and the hub's image folders lay splits out: it
    was refused as having no images in its class folders (train/ and test/)."""
    from PIL import Image

    for split, count in (("train", 10), ("test", 3)):
        for k, label in enumerate(("cat", "dog")):
            (folder := tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i, k, count)).save(folder / f"{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path), validationSplit=0.1), Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert sorted(data.test.inputs) == sorted(str(p) for p in (tmp_path / "test").rglob("*.png"))
    assert len(data.validation.inputs) == 2 and len(data.train.inputs) == 18
    for split in (data.train, data.validation, data.test):
        assert [data.id2label[label] for label in split.labels] == [Path(image).parent.name for image in split.inputs]
    (tmp_path / "train").rename(tmp_path / "val")
    with pytest.raises(DataError, match=r"its folders name splits \(test, val\) but none is train"):
        load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)


def test_image_paths_in_a_table_are_read_from_its_folder(tmp_path: Path) -> None:
    """A CSV of image paths for image-classification: a relative path was opened from the trainer's working
    directory, and a path or a value that names no image file failed at its batch with exit 2 (retried forever)."""
    from PIL import Image

    from finetune_trainer.batches import encode_images, make_collate

    (tmp_path / "images").mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    rows = pd.DataFrame({"image": [f"images/{i}.png" for i in range(20)], "label": ["cat", "dog"] * 10})
    rows.to_csv(path := tmp_path / "images.csv", index=False)
    data = load_dataset(DatasetSpec(uri=str(path), textField="image"), Task.IMAGE_CLASSIFICATION, 0)
    collate = make_collate(Task.IMAGE_CLASSIFICATION, 0, 8)
    assert collate(encode_images(data.train), [0, 1]).inputs["pixel_values"].shape == (2, 3, 8, 8)
    assert all(Path(p).is_absolute() and Path(p).parent == tmp_path / "images" for p in data.train.inputs)
    # A path that names no file stops the job as it loads, not at its batch (in an epoch of hours, say).
    rows.assign(image=[f"images/{i}.png" for i in range(19)] + ["gone/19.png"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"1 of its image paths \(column 'image', dataset.textField\) name no file, "
                                        rf"such as {tmp_path}/gone/19.png$"):
        load_dataset(DatasetSpec(uri=str(path), textField="image"), Task.IMAGE_CLASSIFICATION, 0)
    # a name longer than the filesystem takes names no file either: Path.is_file raised ENAMETOOLONG, the pod's fault
    rows.assign(image=[f"images/{i}.png" for i in range(19)] + ["x" * 300 + ".png"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"1 of its image paths .* name no file, such as {tmp_path}/x{{300}}.png$"):
        load_dataset(DatasetSpec(uri=str(path), textField="image"), Task.IMAGE_CLASSIFICATION, 0)
    (tmp_path / "images" / "0.png").unlink()  # gone after the job loaded its data
    with pytest.raises(DataError, match=rf"{tmp_path}/images/0.png: no such image file"):
        collate(encode_images(Split([str(tmp_path / "images" / "0.png")], [0])), [0])
    # the hub's Image feature in parquet: the bytes inline, no file to open
    rows.assign(image=[{"bytes": b"\x89PNG", "path": None}] * 20).to_parquet(path := tmp_path / "images.parquet")
    with pytest.raises(DataError, match=r"column 'image' \(dataset.textField\) holds \{'bytes'.* not a path"):
        load_dataset(DatasetSpec(uri=str(path), textField="image"), Task.IMAGE_CLASSIFICATION, 0)


def test_image_paths_in_tables_in_split_folders_are_read_from_the_tables_folder(tmp_path: Path) -> None:
    """The hub's image folders with metadata: train/metadata.csv names train/0.png as 0.png, and test/metadata.csv
    names test/0.png as 0.png too. They were read from the dataset's folder, where no 0.png is. A path relative to
    the dataset's folder still reads from there."""
    from PIL import Image

    for split, count in (("train", 12), ("test", 4)):
        (tmp_path / split).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i, count, 0)).save(tmp_path / split / f"{i}.png")
        names = [f"{i}.png" if i % 3 else f"{split}/{i}.png" for i in range(count)]  # relative to the dataset too
        pd.DataFrame({"file_name": names, "label": ["cat", "dog"] * (count // 2)}).to_csv(
            tmp_path / split / "metadata.csv", index=False)
    data = load_dataset(DatasetSpec(uri=str(tmp_path), textField="file_name"), Task.IMAGE_CLASSIFICATION, 0)
    assert sorted(data.test.inputs) == sorted(str(tmp_path / "test" / f"{i}.png") for i in range(4))
    assert sorted(data.train.inputs + data.validation.inputs) == sorted(
        str(tmp_path / "train" / f"{i}.png") for i in range(12))
    for split in (data.train, data.validation, data.test):
        assert [data.id2label[label] for label in split.labels] == [
            ["cat", "dog"][int(Path(image).stem) % 2] for image in split.inputs]
    with pytest.raises(DataError, match=r"no column 'text' \(dataset.textField\) in its train split; it has "
                                        r"'file_name', 'label'$"):
        load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)


def class_label_dataset(folder: Path, fmt: str, names: list[str], splits: dict[str, list[int]]) -> Path:
    """A hub dataset (parquet shards, or save_to_disk's) whose labels are a ClassLabel of `names`, with the labels
    of each split; a row's text is its split's name and its number."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    loaded = datasets.DatasetDict({name: datasets.Dataset.from_dict(
        {"text": [f"{name} {i}" for i in range(len(labels))], "label": labels}, features=features)
        for name, labels in splits.items()})
    if fmt == "hf-disk":
        loaded.save_to_disk(folder / "hf")
        return folder / "hf"
    (folder / "data").mkdir()
    for name, rows in loaded.items():
        rows.to_parquet(folder / "data" / f"{name}-00000-of-00001.parquet")
    return folder


@pytest.mark.parametrize("fmt", ["parquet", "hf-disk"])
def test_a_hub_datasets_class_names_name_its_labels(tmp_path: Path, fmt: str) -> None:
    """A ClassLabel column holds 0, 1, 2 and names them in the dataset's features (kept in the parquet files that
    `datasets` and the hub write): the labels, and so the export's id2label, were "0", "1", "2"; now they are the
    names, in the ids' order, as transformers' text-classification example takes them."""
    names = ["sadness", "joy", "love"]
    path = class_label_dataset(tmp_path, fmt, names, {"train": [i % 3 for i in range(30)]})
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == dict(enumerate(names))
    for text, label in zip(data.train.inputs, data.train.labels):
        assert label == int(text.split()[1]) % 3


@pytest.mark.parametrize(("metadata", "error"), [
    (b"{", r"its schema metadata 'huggingface' is not JSON \(Expecting property name"),
    (json.dumps({"info": {"features": {"label": {"_type": "ClassLabel", "names": {"0": "a", "1": "b"}}}}}).encode(),
     r"its schema metadata 'huggingface' gives column 'label' \(dataset.labelField\) a ClassLabel whose names are "
     r"\{'0': 'a', '1': 'b'\}, not a list of texts"),
    (json.dumps({"info": {"features": {"label": {"_type": "ClassLabel", "names": [1, None]}}}}).encode(),
     r".* a ClassLabel whose names are \[1, None\], not a list of texts"),
], ids=["not-json", "names-a-dict", "names-not-texts"])
def test_a_parquet_files_hub_metadata_of_another_shape_is_refused_naming_it(tmp_path: Path, metadata: bytes,
                                                                           error: str) -> None:
    """The class names of a parquet file's 'huggingface' schema metadata were read as datasets writes them: a value
    that is no JSON, or names of another shape, raised JSONDecodeError, KeyError or AttributeError, the pod's fault
    (exit 2, retried), where pandas had read the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    pq.write_table(table.replace_schema_metadata({b"huggingface": metadata}), path := tmp_path / "d.parquet")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + error):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    # a value of another shape where no ClassLabel is looked for is no ClassLabel: the labels are the numbers
    pq.write_table(table.replace_schema_metadata({b"huggingface": b'{"info": []}'}), path)
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "0", 1: "1"}


def test_a_class_labels_digits_other_than_ascii_are_names(tmp_path: Path) -> None:
    """A label was taken for a class number where str.isdigit() held: "²" raised int()'s ValueError, the pod's fault
    (exit 2, retried), and "١" (Arabic-Indic) was named as class 1, though label_name keeps both as names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["zero", "one"]}}}}
    table = pa.table({"text": [f"t{i}" for i in range(30)], "label": [["0", "١", "²"][i % 3] for i in range(30)]})
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(hub).encode()}),
                   path := tmp_path / "d.parquet")
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "zero", 1: "١", 2: "²"}


@pytest.mark.parametrize("fmt", ["parquet", "hf-disk"])
def test_a_class_labels_minus_one_is_no_label_in_every_split(tmp_path: Path, fmt: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A ClassLabel's -1 is the hub's mark of no label: SNLI's train has 785 such rows (no gold label). It was
    dropped only where train had none; there, it was a class "-1" of every split, in the scores and the head."""
    names = ["entailment", "neutral", "contradiction"]

    def labels(count: int, unlabelled: int) -> list[int]:
        return [-1 if i % 7 == 0 and i < 7 * unlabelled else i % 3 for i in range(count)]

    path = class_label_dataset(tmp_path, fmt, names, {"train": labels(60, 5), "validation": labels(30, 2),
                                                      "test": labels(30, 3)})
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == dict(enumerate(names))
    assert (len(data.train.inputs), len(data.validation.inputs), len(data.test.inputs)) == (55, 28, 27)
    for counted in ("5 train", "2 validation", "3 test"):
        assert (f"dropped {counted} rows labelled -1 (no label: column 'label' (dataset.labelField) is a "
                "ClassLabel" in caplog.text)


def test_an_image_folder_reads_the_images_below_its_class_folders(tmp_path: Path) -> None:
    """As torchvision's ImageFolder walks each class folder: images in a class's subfolders (cat/batch-2/*.png)
    were left out without a word."""
    from PIL import Image

    for k, label in enumerate(("cat", "dog")):
        for j, sub in enumerate(("", "batch-2", ".cache")):
            (folder := tmp_path / label / sub).mkdir(parents=True, exist_ok=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (i, k, j)).save(folder / f"{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    images = data.train.inputs + data.validation.inputs + data.test.inputs
    assert len(images) == 20 and not any("/.cache/" in image for image in images)
    for split in (data.train, data.validation, data.test):
        assert [data.id2label[label] for label in split.labels] == [
            Path(image).relative_to(tmp_path).parts[0] for image in split.inputs]


def test_folders_without_images_beside_split_folders_leave_them_split_folders(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An image dataset zipped on a Mac unpacks with a __MACOSX/ folder of ._ files beside train/ and test/ (or has
    a docs/ folder there): that folder named no split, so train/ and test/ were read as two class folders, and the
    job trained a train-versus-test classifier without a word. A folder without images decides nothing; a class
    folder without images is named in the log, since the class is missing from the model."""
    from PIL import Image

    for s, split in enumerate(("train", "test")):
        for k, label in enumerate(("cat", "dog")):
            (folder := tmp_path / split / label).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (8, 8), (i, k, s)).save(folder / f"{i}.png")
        (tmp_path / split / "bird").mkdir()
    (mac := tmp_path / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (mac / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble resource fork, not an image
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("cats and dogs")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert sorted(data.test.inputs) == sorted(str(p) for p in (tmp_path / "test").rglob("*.png"))
    assert f"{tmp_path / 'train'}: class folders without images, so not classes: bird" in caplog.text


def test_an_image_folder_reads_the_formats_torchvision_and_phones_save(tmp_path: Path) -> None:
    """torchvision's ImageFolder reads Netpbm files (GTSRB's .ppm traffic signs, the ORL faces' .pgm), and a browser
    saves JPEGs as .jfif: their class folders were refused as holding no images, or left out of the classes."""
    from PIL import Image

    from finetune_trainer.batches import encode_images, make_collate

    for label, suffix, mode in (("face", "pgm", "L"), ("sign", "ppm", "RGB"), ("photo", "jfif", "RGB"),
                                ("icon", "avif", "RGB")):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.new(mode, (8, 8)).save(tmp_path / label / f"{i}.{suffix}")
    data = load_dataset(DatasetSpec(uri=str(tmp_path), validationSplit=0.25, testSplit=0.25),
                        Task.IMAGE_CLASSIFICATION, 0)
    assert sorted(data.id2label.values()) == ["face", "icon", "photo", "sign"]
    images = encode_images(data.train)
    batch = make_collate(Task.IMAGE_CLASSIFICATION, 0, 8)(images, list(range(len(images.features))))
    assert batch.inputs["pixel_values"].shape == (8, 3, 8, 8)


def test_an_unlabelled_test_folder_beside_a_train_folder_of_classes_is_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Kaggle's layout: train/<class>/*.png and test/*.png, the images to predict, in no class folder. Since test/
    held no class folders, train/ and test/ were read as two classes, and the job trained a train-versus-test
    classifier without a word. The unlabelled split is left out (named in the log) and test rows held out of train;
    classes that are named train and test still read as classes."""
    from PIL import Image

    for k, label in enumerate(("cat", "dog")):
        (folder := tmp_path / "train" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i, k, 0)).save(folder / f"{i}.png")
    (tmp_path / "test").mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i, 0, 1)).save(tmp_path / "test" / f"{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path), validationSplit=0.1, testSplit=0.1), Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert all("/train/" in image for split in (data.train, data.validation, data.test) for image in split.inputs)
    assert (len(data.train.inputs), len(data.validation.inputs), len(data.test.inputs)) == (16, 2, 2)
    assert f"{tmp_path / 'test'}: its images are in no class folder of a split, so unlabelled: not used" in caplog.text
    (tmp_path / "samples").mkdir()  # a folder of no split name beside them is no class either
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "0.png")
    assert load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0).id2label == {0: "cat", 1: "dog"}
    assert f"{tmp_path / 'samples'}: its images are in no class folder of a split" in caplog.text
    # and Kaggle's submission table beside them is no dataset to read (it was, by its .csv: "no column 'text'")
    pd.DataFrame({"file": ["0.png"], "species": ["cat"]}).to_csv(tmp_path / "sample_submission.csv", index=False)
    assert load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0).id2label == {0: "cat", 1: "dog"}
    (tmp_path / "sample_submission.csv").unlink()
    (tmp_path / "samples" / "0.png").unlink()
    for i in range(10):  # classes named train and test, images directly in them
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / f"{i}.png")
    for label in ("cat", "dog"):
        for image in (tmp_path / "train" / label).iterdir():
            image.unlink()
        (tmp_path / "train" / label).rmdir()
    assert load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0).id2label == {0: "test", 1: "train"}


@pytest.mark.parametrize("task", [Task.CAUSAL_LM, Task.SEQUENCE_CLASSIFICATION])
def test_a_text_column_of_lists_or_records_is_refused_naming_it(tmp_path: Path, task: Task) -> None:
    """A chat dataset's messages column (a list of {role, content}) trained as its Python repr, "[{'content': ...";
    numbers are still texts."""
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
              "text": i, "label": i % 2} for i in range(20)]
    pd.DataFrame(chats).to_parquet(path := tmp_path / "chats.parquet")
    assert len(load_dataset(spec(path), task, 0).train.inputs) == 14  # the numbers in text, as texts
    with pytest.raises(DataError, match=r"column 'messages' \(dataset.textField\) holds \[\{'role': 'user'.*, not a text"):
        load_dataset(DatasetSpec(uri=str(path), textField="messages", validationSplit=0.2), task, 0)


def test_a_label_column_of_lists_is_refused_naming_it(tmp_path: Path) -> None:
    """A multi-label dataset (go_emotions' labels: [3, 27]) became a class per combination of labels, "[ 3 27]"."""
    rows = [{"text": f"t{i}", "labels": [i % 3, 3 + i % 2]} for i in range(20)]
    pd.DataFrame(rows).to_parquet(path := tmp_path / "multi.parquet")
    with pytest.raises(DataError, match=r"column 'labels' \(dataset.labelField\) holds \[0 3\], not a label"):
        load_dataset(DatasetSpec(uri=str(path), labelField="labels"), Task.SEQUENCE_CLASSIFICATION, 0)


def test_held_out_labels_that_train_lacks_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A test file that spells its labels otherwise (positive for pos) made classes that training never sees, and
    scores of 0 on them, without a word."""
    pd.DataFrame(ROWS[:20]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(ROWS[20:]).replace({"pos": "positive"}).to_csv(tmp_path / "test.csv", index=False)
    data = load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "neg", 1: "neu", 2: "pos", 3: "positive"}
    assert "labels of its test split that its train split lacks, which the model cannot learn: positive" in caplog.text


def test_a_class_the_seeded_split_holds_out_of_train_is_named(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A class of one row that the split placed in validation or test was a class training never saw, unnamed."""
    pd.DataFrame([*ROWS, {"text": "the rare one", "label": "rare"}]).to_csv(path := tmp_path / "d.csv", index=False)
    held_out = 0
    for seed in range(20):
        caplog.clear()
        data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, seed)
        named = "train split lacks, which the model cannot learn: rare" in caplog.text
        assert named == ("the rare one" not in data.train.inputs)
        held_out += named
    assert held_out


def test_labels_train_lacks_are_named_ten_at_most(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A column of scores, not classes, lacks thousands: all were named, on one line of the log."""
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["a", "b"] * 10}).to_csv(tmp_path / "train.csv",
                                                                                       index=False)
    pd.DataFrame({"text": [f"v{i}" for i in range(30)], "label": [f"new{i:02}" for i in range(30)]}).to_csv(
        tmp_path / "test.csv", index=False)
    load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0)
    named = ", ".join(f"new{i:02}" for i in range(10))
    assert f"which the model cannot learn: {named} and 20 more" in caplog.text


def test_a_held_out_split_of_copies_placed_before_it_still_gets_rows(tmp_path: Path) -> None:
    """20 rows, half of them one text: the 2 places of the validation split (10%) could both hold copies of a text the
    test split took, leaving validation empty, which the tokenizer then failed on (IndexError, retried as
    infrastructure); now it reaches to the next text not yet placed."""
    rows = [{"text": "good" if i < 10 else f"text {i}", "label": ["a", "b"][i % 2]} for i in range(20)]
    pd.DataFrame(rows).to_csv(path := tmp_path / "copies.csv", index=False)
    for seed in range(20):
        data = load_dataset(DatasetSpec(uri=str(path), labelField="label"), Task.SEQUENCE_CLASSIFICATION, seed)
        sides = [data.train.inputs, data.validation.inputs, data.test.inputs]
        assert all(sides) and sum(map(len, sides)) == 20, (seed, sides)
        assert not set(sides[0]) & set(sides[1]) and not set(sides[1]) & set(sides[2])


@pytest.mark.parametrize("layout", ["hub-shards", "csv-of-patients", "csv-of-parts"])
def test_a_table_of_image_paths_beside_folders_of_images_stays_the_dataset(
        tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    """With format auto, a table whose rows name images in two or more folders was taken for a stray table beside
    class folders, and its textField and labelField silently ignored: the hub's train/metadata.csv beside its images
    sharded into train/0000/ and train/0001/ trained classes 0000 and 0001; a CheXpert-like train.csv of
    train/<patient>/ paths a class per patient; a HAM10000-like metadata.csv of part_1/ and part_2/ two parts. A
    table with the configured textField is the dataset; one without it (sample_submission.csv) is named and left."""
    from PIL import Image

    folders, table = {"hub-shards": (["train/0000", "train/0001"], "train/metadata.csv"),
                      "csv-of-patients": ([f"train/patient{p}/study1" for p in range(4)], "train.csv"),
                      "csv-of-parts": (["part_1", "part_2"], "metadata.csv")}[layout]
    rows = []
    for k, folder in enumerate(folders):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i, k, 0)).save(image := tmp_path / folder / f"{i}.png")
            rows.append({"path": str(image.relative_to((tmp_path / table).parent)), "finding": ["cat", "dog"][i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / table, index=False)
    data = load_dataset(DatasetSpec(uri=str(tmp_path), textField="path", labelField="finding"),
                        Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == {0: "cat", 1: "dog"}
    for split in (data.train, data.validation, data.test):
        assert [data.id2label[label] for label in split.labels] == [
            ["cat", "dog"][int(Path(image).stem) % 2] for image in split.inputs]
    assert "read as an ImageFolder" not in caplog.text
    # without the configured column, the table is no dataset of these images: the folders are the classes
    load_dataset(DatasetSpec(uri=str(tmp_path), textField="image", labelField="finding"), Task.IMAGE_CLASSIFICATION, 0)
    assert (f"{tmp_path}: read as an ImageFolder of its class folders; its csv files are no dataset with a column "
            f"'image' (dataset.textField): {table}") in caplog.text


def test_a_text_datasets_tables_carry_no_folder_of_their_files(tmp_path: Path) -> None:
    """Each row of a folder's tables got the folder of its file (8b41769), which only image-classification reads
    image paths from: a corpus of short texts held a string more per row, half again its memory."""
    for split, rows in (("train", ROWS[:24]), ("test", ROWS[24:])):
        (tmp_path / split).mkdir()
        pd.DataFrame(rows).to_parquet(tmp_path / split / "part-0.parquet")
    _, _, tables = read_dataset(spec(tmp_path), "dataset", texts_only=True)  # as every task but images reads
    assert {name: list(table.columns) for name, table in tables.items()} == {"train": ["text", "label"],
                                                                               "test": ["text", "label"]}
    assert len(load_dataset(spec(tmp_path), Task.SEQUENCE_CLASSIFICATION, 0).test.inputs) == 6


def test_a_class_folder_whose_name_holds_a_split_word_stays_a_class(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Places' scene classes: train_station/ (holding platform/ and outdoor/) was read as the train split, since its
    name holds the word train, and the other classes were left out as unlabelled with only a warning. A folder is a
    split by its whole name, or by a word in it only where every folder names one (training_set/ and test_set/)."""
    from PIL import Image

    for folder in ("airport_terminal", "train_station/platform", "train_station/outdoor", "bus_station/indoor",
                   "subway_station/platform"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i, len(folder), 0)).save(tmp_path / folder / f"{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == dict(enumerate(["airport_terminal", "bus_station", "subway_station", "train_station"]))
    assert len(data.train.inputs + data.validation.inputs + data.test.inputs) == 20
    assert "unlabelled" not in caplog.text
    for s, (split, labels) in enumerate((("training_set", ("cat", "dog")), ("test_set", ("cat", "dog")))):
        for k, label in enumerate(labels):
            (tmp_path / "sets" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i, k, s)).save(tmp_path / "sets" / split / label / f"{i}.png")
    data = load_dataset(DatasetSpec(uri=str(tmp_path / "sets")), Task.IMAGE_CLASSIFICATION, 0)
    assert data.id2label == {0: "cat", 1: "dog"} and all("/test_set/" in image for image in data.test.inputs)


def test_a_labels_spaces_and_number_spelling_are_no_part_of_it(tmp_path: Path) -> None:
    """A CSV's "text, pos" and a file that writes 1.0 for 1 made classes of their own that the model split."""
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(
        f"t{i},{[' pos', 'pos ', 'neg'][i % 3]}\n" for i in range(30)))
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "neg", 1: "pos"}
    (path := tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": [1, "1.0", "1", 0.0][i % 4]})
                                                        for i in range(40)))
    assert load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label == {0: "0", 1: "1"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_true_and_false_labels_are_two_classes(tmp_path: Path, fmt: str) -> None:
    """A true/false column, which pandas reads as booleans, was refused: "holds True, not a label"."""
    table = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [i % 3 == 0 for i in range(30)]})
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: table.to_csv(path, index=False), "jsonl": lambda: table.to_json(path, orient="records", lines=True),
     "parquet": lambda: table.to_parquet(path)}[fmt]()
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "False", 1: "True"}
    rows = {text: label for split in (data.train, data.validation, data.test)
            for text, label in zip(split.inputs, split.labels)}
    assert all(label == (int(text[1:]) % 3 == 0) for text, label in rows.items())
    # Beside numbers, each is its own class, whatever comes first (True == 1 to Python).
    for mixed in ([True, 1, "1", False, 0, "0"], [1, True, "1", 0, False, "0"]):
        assert label_ids(pd.Series(mixed * 5, dtype=object))[0] == {0: "0", 1: "1", 2: "False", 3: "True"}


def test_a_whole_number_label_with_a_sign_is_that_number(tmp_path: Path) -> None:
    """A label "+1.0" was 1 but "+1" stayed "+1": a file mixing +1 and 1 trained two classes of one label."""
    labels = ["+1", "1", "1.0", "+2", "2", "-3", "-3.0", "10", "007", "-07"]
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{labels[i % 10]}\n" for i in range(60)))
    id2label = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label
    assert sorted(id2label.values()) == sorted(["1", "2", "-3", "10", "007", "-07"])  # leading zeros: a name


def test_numbers_spelt_otherwise_than_in_ascii_digits_are_labels_of_their_own() -> None:
    """float() reads 1_000, 1e3 and Arabic-Indic digits: 1_000, 1e3 and 1000 were one class, and ١ was 1."""
    id2label, ids = label_ids(pd.Series(["1_000", "1000", "1e3", "١", "1", "1.0", "+1", "2", "1000.00"]))
    assert [id2label[i] for i in ids] == ["1_000", "1000", "1e3", "١", "1", "1", "1", "2", "1000"]
    ordered = list(id2label.values())
    assert len(ordered) == 6 and ordered.index("1") < ordered.index("2") < ordered.index("1000")  # by value


def test_labels_that_differ_only_in_case_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(
        f"t{i},{['pos', 'POS', 'neg'][i % 3]}\n" for i in range(30)))
    assert len(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label) == 3
    assert "differ only in case" in caplog.text and "POS and pos" in caplog.text


def test_a_trained_head_of_labels_that_differ_only_in_case_keeps_each_ones_id(tmp_path: Path) -> None:
    """Matched in any case, pos and POS were one name: a head trained on the dataset's labels in another order was
    taken for another head's, and its POS column went on learning the dataset's pos. Exact names match first, the
    rest in any case only where one of each is left (NEG is neg), else the head names other labels."""
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(
        f"t{i},{['pos', 'POS', 'neg'][i % 3]}\n" for i in range(30)))
    id2label = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0).id2label
    head = {0: id2label[2], 1: id2label[0], 2: id2label[1]}  # the same labels in another order
    assert head_order(id2label, head) == [1, 2, 0]
    assert head_order(id2label, {i: "NEG" if name == "neg" else name for i, name in head.items()}) == [1, 2, 0]
    assert head_order(id2label, {i: {"pos": "Pos", "POS": "pOS"}.get(name, name) for i, name in head.items()}) is None


@pytest.mark.parametrize(("name", "separator"), [("d.csv", ";"), ("d.csv", "|"), ("d.tsv", "\t"), ("d.csv", "\t")])
def test_a_csv_is_read_with_its_headers_separator(tmp_path: Path, name: str, separator: str) -> None:
    """Excel's semicolons and a .tsv were read with commas: one column named 'text;label', or no format at all."""
    (path := tmp_path / name).write_text(f"text{separator}label\n" + "".join(
        f'"t{i}, with a comma"{separator}{"ab"[i % 2]}\n' for i in range(20)))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "a", 1: "b"}
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(
        f"t{i}, with a comma" for i in range(20))


def test_an_unquoted_tsvs_text_that_starts_with_a_quote_is_read_as_written(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """GLUE's SST-2 is unquoted: a text starting with `"` took in every line up to the next `"` as its text, 30 of
    40 rows read and the lines between trained under the label of the row the quote closed in."""
    rows = [(f"sentence number {i}", str(i % 2)) for i in range(40)]
    rows[10], rows[20] = ('" a dark , quirky road movie', "1"), ('the title says " enough', "0")
    (path := tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    assert labelled_rows(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)) == sorted(rows)
    assert "; reading it without quoting, as a TSV" in caplog.text  # a warning: its quotes are read as text


def test_a_tsv_of_repeated_texts_with_a_stray_quote_is_read_without_quoting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A text column whose texts repeat (an NLI premise thrice, an intent's utterances) was taken for a column of
    classes, and the quoted read kept: the rows its stray quote took in were lost (58 of 62)."""
    rows = [(f"short text {i % 10}", "ab"[i % 2]) for i in range(60)]
    rows[10], rows[30] = ('"Hi there, he said', "a"), ('and then" she left', "a")
    (path := tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert labelled_rows(data) == sorted(rows)
    assert "reading it without quoting, as a TSV" in caplog.text


def test_a_cell_over_the_field_size_limit_is_no_stray_quote(tmp_path: Path) -> None:
    """The strict parse that tells a writer's quotes from a stray one stopped at csv's 128 KiB field limit: a written
    file with a long cell whose line reads as a row ("Overall, positive") was refused."""
    rows = [(f"A fine film number {i}.", ["positive", "negative"][i % 2]) for i in range(30)]
    rows.append(("Pros: acting\nOverall, positive\n" + "x" * 150_000, "positive"))
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path := tmp_path / "d.csv", index=False)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert labelled_rows(data) == sorted(rows)


def test_a_csv_quote_that_takes_in_rows_is_refused_naming_its_lines(tmp_path: Path) -> None:
    """As in a TSV, but a CSV's quotes are its own: refused where the quoted cell's lines read as rows (end in a
    label), read where they are a text of several lines, separators and all."""
    rows = [f"t{i},{'ab'[i % 2]}" for i in range(20)]
    rows[5], rows[9] = '"he said, hi,a', 'bye " she said,b'
    (path := tmp_path / "d.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"d.csv lines 7-11: the quote that opens its cell in column 'text' takes in "
                                        r"what reads as a row \('t6,a'\); quote a text that starts with a "):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    texts = [f"line one, of {i}\nline two, or three\nend" for i in range(20)]
    (path := tmp_path / "m.csv").write_text("text,label\n" + "".join(f'"{t}",{"ab"[i % 2]}\n'
                                                                     for i, t in enumerate(texts)))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(texts)


@pytest.mark.parametrize(("name", "cell", "label"), [
    ("d.csv", "Pros: acting, music\nOverall, positive\nWould watch again.", "positive"),
    ("d.csv", "Is the sky green? Well, no\nbut at dusk it looks that way.", "negative"),
    ("d.tsv", 'Pros:\tacting\nVerdict:\tpositive\nCons: "too long"', "positive")])
def test_a_written_csvs_quoted_cell_of_lines_that_read_as_rows_is_its_text(tmp_path: Path, name: str, cell: str,
                                                                           label: str,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A writer's quotes close before a separator: a cell's line "Overall, positive" was taken for a row that a
    quote took in, the CSV refused and the TSV read without quoting, its cell split into rows of a new label."""
    rows = [(f"A fine film number {i}.", ["positive", "negative", "no"][i % 3]) for i in range(30)] + [(cell, label)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path := tmp_path / name, sep="\t" if name == "d.tsv" else ",",
                                                         index=False)
    assert labelled_rows(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)) == sorted(rows)
    assert "read as quoted, as its every quote closes where a cell ends" in caplog.text  # a stray one may, unseen


def test_a_csv_cell_over_the_csv_modules_field_size_limit_is_read_or_refused_as_another(tmp_path: Path) -> None:
    """Python's csv reads no field over 128 KiB: its error on a cell's long line, or on a long text before a row
    longer than the header, was no ValueError, so an infrastructure failure (exit 2, retried), not the file's."""
    long = "word " * 30_000
    rows = [(f"t{i}", "ab"[i % 2]) for i in range(20)] + [(f"{long}\nsecond line, a", "a")]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path := tmp_path / "d.csv", index=False)
    assert labelled_rows(load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)) == sorted(rows)
    path.write_text(f"text,label\nhello, {long},a\n" + "".join(f"hello, world {i},{'ab'[i % 2]}\n" for i in range(20)))
    with pytest.raises(DataError, match=r"d.csv a row has more fields than its header \(2\)"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


def test_a_csv_text_that_looks_like_a_number_is_the_text_written(tmp_path: Path) -> None:
    """pandas read the column as numbers, floats where a cell was empty: the text 007 trained as '7.0'."""
    texts = ["007", "1.50", "12", *(f"{i}" for i in range(20, 40))]
    (path := tmp_path / "d.csv").write_text("text,label\n,a\n" + "".join(f"{t},{'ab'[i % 2]}\n" for i, t in enumerate(texts)))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(texts)


def test_csv_rows_longer_than_the_header_are_refused_naming_the_line(tmp_path: Path) -> None:
    """Where every row had an unquoted comma, pandas read the texts' first parts as the index: a classifier trained
    on 'world' of 'hello, world' without a word."""
    rows = "".join(f"hello, world {i},{'ab'[i % 2]}\n" for i in range(20))
    (path := tmp_path / "d.csv").write_text("text,label\n" + rows)
    with pytest.raises(DataError, match=r"d.csv line 2 has more fields than its header \(2\): quote a field that "
                                        r"holds ',', or name every column in the header"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)



def test_unquoted_texts_that_start_with_a_number_and_a_comma_are_no_row_names(tmp_path: Path) -> None:
    """Their numbers were taken for R's row names and dropped: the texts trained as "apples"."""
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{i * 7}, apples,{'ab'[i % 2]}\n"
                                                                     for i in range(1, 21)))
    with pytest.raises(DataError, match=r"d.csv line 2 has more fields than its header \(2\)"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)

@pytest.mark.parametrize(("header", "row"), [("id,text,label", "{id},great acting, fun plot {i},{label}"),
                                             ("text,label", "8{i:02d},t{i} words,{label}")],
                         ids=["an-id-column-and-a-comma-in-every-text", "numbers-of-a-slice"])
def test_first_fields_that_do_not_number_the_rows_are_no_row_names(tmp_path: Path, header: str, row: str) -> None:
    """Taken for row names, a named id column with an unquoted comma in every text shifted every column: the texts
    trained as "fun plot". Unquoted numbers of a slice (801, 802, ...) read just the same, and are refused too
    (R quotes its row names: those are read)."""
    lines = [row.format(id=48213 + 7 * i, i=i, label="ab"[i % 2]) for i in range(20)]
    (path := tmp_path / "d.csv").write_text(f"{header}\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match="d.csv line 2 has more fields than its header"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("row", ['"{i}","t{i} words","{label}"', '"{shuffled}","t{i} words","{label}"',
                                 '{shuffled},t{i} words,{label}', '"8{i:02d}","t{i} words","{label}"',
                                 "t{i} words,{label},"],
                         ids=["r-row-names", "r-row-names-shuffled", "row-names-shuffled-unquoted",
                              "r-row-names-of-a-slice", "trailing-separator"])
def test_csv_rows_of_a_field_more_than_the_header_that_is_no_text_are_read(tmp_path: Path, row: str) -> None:
    """The refusal of rows longer than the header refused R's write.table (row names, unnamed in the header, quoted;
    of rows 801 on, df[801:1000, ], or shuffled, too) and rows that end with a separator, advising to quote: all had
    been read, the last as labels missing."""
    rows = "".join(row.format(i=i, shuffled=(7 * i) % 20 + 1, label="ab"[i % 2]) + "\n" for i in range(1, 21))
    (path := tmp_path / "d.csv").write_text('"text","label"\n' + rows)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "a", 1: "b"}
    assert labelled_rows(data) == sorted((f"t{i} words", "ab"[i % 2]) for i in range(1, 21))


def test_an_unquoted_csv_cells_leading_spaces_are_dropped_at_a_lines_start_too_and_quoting_keeps_them(
        tmp_path: Path) -> None:
    """The README said only spaces after a separator went: a line's indent (code in a text) is dropped as well."""
    rows = "".join(f'  t{i},a\n"  kept {i}",b\n' for i in range(10))
    (path := tmp_path / "d.csv").write_text("text,label\n" + rows)
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(
        [f"t{i}" for i in range(10)] + [f"  kept {i}" for i in range(10)])


def test_spaces_after_a_csv_separator_are_no_part_of_the_cell(tmp_path: Path) -> None:
    """A hand-written "text, label" had no column 'label' (it was ' label'), and `, "a, b"` was not quoted."""
    (path := tmp_path / "d.csv").write_text("text, label\n" + "".join(f'"hello, {i}", {"ab"[i % 2]}\n' for i in range(20)))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert data.id2label == {0: "a", 1: "b"}
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(f"hello, {i}" for i in range(20))
    (path := tmp_path / "q.csv").write_text("label,text\n" + "".join(f'{"ab"[i % 2]}, "x, {i}"\n' for i in range(20)))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(f"x, {i}" for i in range(20))


def test_whole_number_texts_beside_a_missing_one_stay_whole(tmp_path: Path) -> None:
    """pandas made a JSON or parquet column of integers and nulls floats: the text 12 trained as '12.0'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = [None, *range(10, 40)], ["ab"[i % 2] for i in range(31)]
    (path := tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in zip(texts, labels)))
    pq.write_table(pa.table({"text": pa.array(texts, pa.int64()), "label": labels}), parquet := tmp_path / "d.parquet")
    for file in (path, parquet):
        data = load_dataset(spec(file), Task.SEQUENCE_CLASSIFICATION, 0)
        assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == sorted(str(t) for t in texts[1:])


def test_a_damaged_parquet_file_is_refused_as_the_files_fault(tmp_path: Path) -> None:
    """pyarrow raises damaged thrift (or page, or codec) data as an OSError with no errno, and pandas its index metadata
    missing a key as a KeyError: both escaped as the pod's fault (exit 2), retried for ever on a file that never reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pd.DataFrame(ROWS).to_parquet(good := tmp_path / "good.parquet")
    raw = good.read_bytes()
    (damaged := tmp_path / "d.parquet").write_bytes(raw[:8] + bytes(len(raw) - 16) + raw[-8:])  # footer kept
    with pytest.raises(DataError, match=r"d.parquet: cannot read it as parquet \(ValueError: d.parquet is a damaged "
                                        r"parquet file \(.*Couldn't deserialize thrift"):
        load_dataset(spec(damaged), Task.SEQUENCE_CLASSIFICATION, 0)
    table = pa.table({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]})
    index = {"index_columns": [{"kind": "range", "name": None, "start": 0, "stop": len(ROWS)}],  # no "step"
             "column_indexes": [], "columns": [], "pandas_version": "2.2.0"}
    pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(index).encode()}), meta := tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.parquet: its pandas metadata lacks the key 'step'"):
        load_dataset(spec(meta), Task.SEQUENCE_CLASSIFICATION, 0)
    # a string that is not UTF-8 (a damaged page; bytes written as strings): pyarrow reads it unchecked, and pandas'
    # ArrowException ("Wrapping ... failed") came as the rows were read, or the file, for a list of them
    table = pa.table({"text": [f"t{i:02d}" for i in range(20)], "label": ["ab"[i % 2] for i in range(20)],
                      "tags": [[f"g{i:02d}"] for i in range(20)], "notes": [f"n{i:02d}" for i in range(20)]})
    for name, column in (("u.parquet", "text"), ("l.parquet", "tags")):
        pq.write_table(table, path := tmp_path / name, compression="none", use_dictionary=False)
        path.write_bytes(path.read_bytes().replace({"text": b"t05", "tags": b"g05", "notes": b"n05"}[column], b"t\xff5"))
        with pytest.raises(DataError, match=rf"{name} is a damaged parquet file \(column '?{column}'?: .*UTF"):
            load_dataset(spec(path, **({} if column == "text" else {"textPairField": column})),
                         Task.SEQUENCE_CLASSIFICATION, 0)


@pytest.mark.parametrize("column", ["notes", "tags"])
def test_a_string_not_utf8_in_a_parquet_column_the_job_never_reads_is_no_fault(tmp_path: Path, column: str) -> None:
    """Spark writes strings unchecked: a file whose bad UTF-8 was only in a column the job does not read (a string's,
    or a list of them) was refused whole, its valid text and labels never trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"t{i:02d}" for i in range(20)], "label": ["ab"[i % 2] for i in range(20)],
                      "tags": [[f"g{i:02d}"] for i in range(20)], "notes": [f"n{i:02d}" for i in range(20)]})
    pq.write_table(table, path := tmp_path / "d.parquet", compression="none", use_dictionary=False)
    path.write_bytes(path.read_bytes().replace({"text": b"t05", "tags": b"g05", "notes": b"n05"}[column], b"t\xff5"))
    data = load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert sorted(data.train.inputs + data.validation.inputs + data.test.inputs) == [f"t{i:02d}" for i in range(20)]


def test_too_few_rows_for_the_three_way_split_are_refused_naming_the_fields(tmp_path: Path) -> None:
    """Two distinct texts cannot be train, validation and test: the error says which fields ask for the split, and
    that a side takes every copy of a text (90 copies of one text and 5 of two others are 100 rows, and too few)."""
    (path := tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i % 2},{'ab'[i % 2]}\n" for i in range(6)))
    with pytest.raises(DataError, match=r"6 rows \(2 distinct inputs\) are too few to hold out 20% for validation "
                                        r"\(dataset.validationSplit\) and 10% for test \(dataset.testSplit\) and "
                                        r"train on the rest \(each side takes whole inputs, every copy of a text"):
        load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    (path := tmp_path / "d.csv").write_text("text,label\n" + "a,x\n" * 90 + "b,y\n" * 5 + "c,x\n" * 5)
    tenths = DatasetSpec(uri=str(path), labelField="label", validationSplit=0.1, testSplit=0.1)
    for seed in range(5):
        with pytest.raises(DataError, match=r"100 rows \(3 distinct inputs\) are too few .* every copy of a text"):
            load_dataset(tenths, Task.SEQUENCE_CLASSIFICATION, seed)


def test_a_label_column_of_scores_or_ids_is_named(tmp_path: Path, pvc_root: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A labelField naming a column of scores (the sentiment corpus' confidence) trained a head of thousands of
    classes of a row or two each, without a word."""
    pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [round(0.5 + i / 97, 4) for i in range(40)]}).to_csv(
        path := tmp_path / "d.csv", index=False)
    load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)
    assert "column 'label' (dataset.labelField) has 40 distinct labels in 40 rows" in caplog.text
    caplog.clear()
    load_dataset(DatasetSpec(uri="pvc://data/sentiment/sentiment.csv", labelField="confidence"),
                 Task.SEQUENCE_CLASSIFICATION, 0)  # values repeat: more than 2 rows a label, but a score
    assert "column 'confidence' (dataset.labelField) has" in caplog.text
    caplog.clear()
    scores = [str(round(0.5 + i / 97, 4)) for i in range(20)] * 2 + ["nan"] * 4  # 21 labels in 44 rows
    pd.DataFrame({"text": [f"t{i}" for i in range(44)], "label": scores}).to_csv(path, index=False)
    load_dataset(spec(path), Task.SEQUENCE_CLASSIFICATION, 0)  # "nan" among the scores: their missing mark
    assert "column 'label' (dataset.labelField) has 21 distinct labels in 44 rows" in caplog.text
    caplog.clear()
    load_dataset(spec(write(tmp_path, "csv")), Task.SEQUENCE_CLASSIFICATION, 0)
    assert "distinct labels" not in caplog.text


def test_an_image_folder_of_a_folder_per_image_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Images each in a folder of its own (a sample's id) are a class each; the warning named a "column 'label'
    (dataset.labelField)", which an ImageFolder has not."""
    from PIL import Image

    for i in range(12):
        (tmp_path / f"sample{i:02d}").mkdir()
        Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(tmp_path / f"sample{i:02d}" / "image.png")
    load_dataset(DatasetSpec(uri=str(tmp_path)), Task.IMAGE_CLASSIFICATION, 0)
    assert (f"dataset {tmp_path}: 12 class folders hold 12 images, such as sample00, sample01, sample02 and 9 more: "
            "a folder per class? (one per sample, or per image, is not)") in caplog.text
    assert "dataset.labelField" not in caplog.text


def test_rows_that_repeat_the_header_are_dropped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files joined with `cat`, or frames appended by to_csv(mode="a"), repeat the header mid-file: each repeat was a
    row, its label "label" a class of its own, unsaid. A joined Excel file's BOM and spaces do not hide one."""
    part = "text,label\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    (tmp_path / "train.csv").write_text(part + part.replace("text,label", "\ufefftext , label"))
    data = load_dataset(spec(str(tmp_path / "train.csv")), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert sorted(data.id2label.values()) == ["neg", "pos"]
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == 40
    assert "train.csv: dropped 1 row(s) that repeat its header (files joined with theirs?), the first after 20 data" \
        in caplog.text
    # pandas' to_csv(mode="a") writes its index, whose name is empty, first
    frame = pd.DataFrame([ROWS[i] for i in range(20)])
    frame.to_csv(appended := tmp_path / "appended.csv")
    frame.to_csv(appended, mode="a")
    data = load_dataset(spec(str(appended)), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert sorted(data.id2label.values()) == ["neg", "neu", "pos"]
    assert "appended.csv: dropped 1 row(s) that repeat its header" in caplog.text


def test_a_file_of_a_split_without_a_column_the_others_have_is_said(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """train.csv with `text` and train_extra.csv with `sentence`: the second file's rows were all dropped, said only
    as "rows with an empty text"."""
    pd.DataFrame([ROWS[i] for i in range(20)]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame([ROWS[i] for i in range(20, 30)]).rename(columns={"text": "sentence"}).to_csv(
        tmp_path / "train_extra.csv", index=False)
    load_dataset(spec(str(tmp_path)), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert (f"{tmp_path}: files of its train split lack columns that others of it have, and their rows have them "
            "empty: 'text' (1 of 2 files: train_extra.csv); 'sentence' (1 of 2 files: train.csv)") in caplog.text


def test_a_files_split_is_the_innermost_name_of_one_in_its_path(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """train_test_split/test.csv was the train split (the whole path searched, train's words first): the test rows
    trained on, and a test split held out of them, unsaid."""
    (folder := tmp_path / "train_test_split").mkdir()
    pd.DataFrame([ROWS[i] for i in range(20)]).to_csv(folder / "train.csv", index=False)
    pd.DataFrame([ROWS[i] for i in range(20, 30)]).to_csv(folder / "test.csv", index=False)
    data = load_dataset(spec(str(tmp_path)), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert set(data.test.inputs) == {ROWS[i]["text"] for i in range(20, 30)}
    assert set(data.train.inputs) | set(data.validation.inputs) == {ROWS[i]["text"] for i in range(20)}
    # Unlabelled, its test file is named as the test split's
    pd.DataFrame({"text": [ROWS[i]["text"] for i in range(20, 30)]}).to_csv(folder / "test.csv", index=False)
    load_dataset(spec(str(tmp_path)), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert "its test split (train_test_split/test.csv) has no column 'label'" in caplog.text


def test_a_csv_of_a_folder_that_does_not_parse_is_named(tmp_path: Path) -> None:
    pd.DataFrame([ROWS[i] for i in range(20)]).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "test.csv").write_text('text,label\n"an open quote,pos\nanother,neg\n')
    with pytest.raises(DataError, match=rf"^dataset {tmp_path}: cannot read it as csv \(ParserError: test\.csv: "):
        load_dataset(spec(str(tmp_path)), Task.SEQUENCE_CLASSIFICATION, seed=0)


def test_excels_line_naming_the_separator_is_read_as_its_separator(tmp_path: Path) -> None:
    """Excel writes "sep=;" as a CSV's first line where it asks which separator to read: the header was 'sep=' and
    the rows one column, "no column 'text'"."""
    (tmp_path / "train.csv").write_text("sep=;\r\ntext;label\r\n" + "".join(
        f"{ROWS[i]['text']}, more;{ROWS[i]['label']}\r\n" for i in range(30)))
    data = load_dataset(spec(str(tmp_path / "train.csv")), Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert len(data.train.inputs) + len(data.validation.inputs) + len(data.test.inputs) == 30
    assert "sample 0, more" in data.train.inputs + data.validation.inputs + data.test.inputs
    (tmp_path / "train.csv").write_text("sep=;\ntext;label\na;pos\nb;neg\nc;x;pos\n")  # errors name the file's lines
    with pytest.raises(DataError, match=r"line 5"):
        load_dataset(spec(str(tmp_path / "train.csv")), Task.SEQUENCE_CLASSIFICATION, seed=0)


def test_one_text_of_a_pair_is_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An entailment dataset (premise, hypothesis, label) with textField premise trained on the premise alone, its
    labels unlearnable, unsaid."""
    rows = [{"premise": f"a man {i}", "hypothesis": f"a person {i}", "label": i % 2} for i in range(30)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    load_dataset(DatasetSpec(uri=str(tmp_path / "train.csv"), textField="premise", labelField="label"),
                 Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert ("column 'premise' (dataset.textField) is one text of a pair with column 'hypothesis', which is not read"
            in caplog.text)
    assert "set dataset.textField to 'premise' and dataset.textPairField to 'hypothesis'" in caplog.text
    caplog.clear()
    pd.DataFrame(rows).drop(columns="hypothesis").to_csv(tmp_path / "train.csv", index=False)
    load_dataset(DatasetSpec(uri=str(tmp_path / "train.csv"), textField="premise", labelField="label"),
                 Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert "one text of a pair" not in caplog.text


def test_text_pair_field_reads_each_row_as_a_pair_kept_whole_on_one_side_of_the_split(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NLI's layout: one premise with several hypotheses. Each row is its pair of texts; the split compares pairs, so
    a premise may train with one hypothesis and be tested with another, and a repeated pair stays on one side."""
    rows = [{"premise": "a man sleeps", "hypothesis": f"a person {i}", "label": i % 3} for i in range(40)]
    rows += [{"premise": "a dog runs", "hypothesis": "an animal moves", "label": 0}] * 10
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pairs = DatasetSpec(uri=str(tmp_path / "train.csv"), textField="premise", textPairField="hypothesis",
                        labelField="label", validationSplit=0.2, testSplit=0.2)
    data = load_dataset(pairs, Task.SEQUENCE_CLASSIFICATION, seed=0)
    sides = [data.train.inputs, data.validation.inputs, data.test.inputs]
    assert sorted(map(tuple, pd.DataFrame(rows)[["premise", "hypothesis"]].values)) == sorted(sum(sides, []))
    assert all("a man sleeps" in {p for p, _ in side} for side in sides)  # one premise on every side
    assert sum(("a dog runs", "an animal moves") in side for side in sides) == 1  # the repeated pair on one alone
    assert "one text of a pair" not in caplog.text
    # One text read alone, its 50 rows are 2 distinct inputs: too few to hold out two sides.
    with pytest.raises(DataError, match=r"50 rows \(2 distinct inputs\) are too few"):
        load_dataset(pairs.model_copy(update={"text_pair_field": None}), Task.SEQUENCE_CLASSIFICATION, seed=0)


def test_a_pair_missing_its_second_text_is_dropped_and_a_missing_column_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"premise": f"p {i}", "hypothesis": "" if i < 3 else i, "label": i % 2} for i in range(30)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pairs = DatasetSpec(uri=str(tmp_path / "train.csv"), textField="premise", textPairField="hypothesis")
    data = load_dataset(pairs, Task.SEQUENCE_CLASSIFICATION, seed=0)
    assert "dropped 3 train rows with an empty premise or hypothesis or label" in caplog.text
    assert ("p 29", "29") in data.train.inputs + data.validation.inputs + data.test.inputs  # a number is a text
    with pytest.raises(DataError, match=r"no column 'sentence2' \(dataset.textPairField\); it has 'premise', "
                                        r"'hypothesis', 'label'"):
        load_dataset(pairs.model_copy(update={"text_pair_field": "sentence2"}), Task.SEQUENCE_CLASSIFICATION, seed=0)
