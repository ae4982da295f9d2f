"""Read a COCO-format detection dataset, check every record, and split it like the other tasks.

A dataset is an annotations JSON (`images`, `annotations` with `bbox` [x, y, width, height]
in pixels, `categories`) plus its images. `dataset.uri` names the JSON, or a folder holding
annotations.json, or one JSON per split named by split (train.json, val.json, test.json).
An image's `file_name` is relative to the JSON's folder or to its images/ folder, or, as COCO lays
them out, to the folder the JSON names beside annotations/ (annotations/instances_train2017.json,
train2017/).

Each record is checked on load: an annotation whose box leaves its image, names an unknown
category or image, an image without its file or of another size than declared, a file listed as two images: the error
names the record (exit 1), as does a file whose boxes all look normalised to 0..1. Crowd
annotations (iscrowd 1) are checked alike but not trained on, as torchvision's detectors cannot
learn from them; the evaluation keeps them as COCO's does, a region where a detection counts
neither way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Container
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import (FLOAT_IMAGE, TEST, TRAIN, VALIDATION, WIDE_IMAGE, LabelledData, Split,
                                   beyond_16_bits, decode_errors, draft, drop_empty_splits, image_fault, int_range,
                                   listed, names_file, open_image, read_text, split, split_of)
from finetune_trainer.errors import DataError, unreadable
from finetune_trainer.uris import fetch

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations.json"
EDGE_TOLERANCE = 1.0  # pixels a box may overhang its image (rounding in exporters); it is clipped
# A box's least side, a share of its image's: narrower (an exporter's 2e-5 px in 2,000), its edges met in the
# batches' float32, resized and flipped, and torchvision's detectors raised mid-epoch ("All bounding boxes should
# have positive height and width"). A share, as float32's precision is: this one is 160 times it.
MIN_SHARE = 1e-5
SHOWN_PROBLEMS = 5
# Boxes normalised to 0..1 (a YOLO-style converter's mistake) read as pixels lie in each image's top-left pixel.
# Every box of a file there (1.01: a converter's rounding) is refused where its images have 16 pixels a side or
# more: a real dataset's boxes, however small, spread over images that large; in smaller ones it cannot be told.
NORMALISED_EXTENT = 1.01
NORMALISED_MIN_SIDE = 16
TURNED = {5, 6, 7, 8}  # EXIF orientations that turn an image by 90 degrees, swapping its width and height


@dataclass
class Annotated:
    """One image and its boxes, [x0, y0, x1, y1] in pixels, with class ids 1..K (0 is the background)."""

    path: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd_boxes: list[list[float]] = field(default_factory=list)  # iscrowd 1: scored as COCO does, never trained
    crowd_labels: list[int] = field(default_factory=list)


@dataclass
class CocoData(LabelledData):
    category_ids: dict[int, int] = field(default_factory=dict)  # each class id's category_id in the annotations


def load_coco(spec: DatasetSpec, seed: int) -> CocoData:
    """The train, validation and test splits (Split.inputs hold `Annotated` records), the label map
    {class id: category name}, class ids 1..K in the order of the category ids, and each class id's category_id."""
    path = fetch(spec.uri, kind="dataset.uri", repo_type="dataset", error=DataError)
    files = annotation_files(path)
    docs = {name: read_json(file, answers=name == TRAIN) for name, file in files.items()}
    categories = category_names(docs, files)
    class_of = {cid: i + 1 for i, cid in enumerate(sorted(categories))}
    # a detector's images are decoded whole at dataset.imageSize (its only augmentation is a flip)
    oriented: list[str] = []
    records = {name: records_of(docs[name], files[name], categories, class_of, spec.image_size, oriented)
               for name in files}
    warn_oriented(spec.uri, oriented)
    warn_boxless_categories(spec.uri, records, categories, class_of)
    if not records[TRAIN]:
        raise DataError(f"dataset {spec.uri}: {files[TRAIN]} lists no image")
    for name in (VALIDATION, TEST):  # a competition's test.json, its answers withheld: no row to score on
        if name in records and not any(r.boxes for r in records[name]):  # crowds are scored neither way
            log.warning("%s: its %d images hold no box, so every score on them would be mAP 0", files[name],
                        len(records[name]))
            records[name] = []
    drop_empty_splits(records, spec.uri)
    train, validation, test, given = split(records, dict.fromkeys(records), spec, seed, images=True)
    id2label = {class_of[cid]: categories[cid] for cid in sorted(categories)}
    boxes = sum(len(r.boxes) for r in train.inputs)
    if not boxes:  # every step would teach "background", every score would be mAP 0
        raise DataError(f"dataset {spec.uri}: its {len(train.inputs)} training images hold no box to learn from "
                        f"({'crowd annotations only' if any(r.crowd_boxes for r in train.inputs) else 'no annotation'} "
                        f"in {files[TRAIN]})")
    for name, held in ((VALIDATION, validation), (TEST, test)):
        refuse_boxless(name, held, name in given, spec)
    log.info("dataset %s (coco; splits given: %s): %d train images (%d boxes), %d validation, %d test, %d categories",
             spec.uri, ", ".join(files), len(train.inputs), boxes, len(validation.inputs), len(test.inputs),
             len(id2label))
    return CocoData(train=train, validation=validation, test=test, id2label=id2label,
                    category_ids={class_of[cid]: cid for cid in sorted(categories)})


def warn_oriented(uri: str, oriented: list[str]) -> None:
    """Warn of images whose EXIF orientation has a viewer show them turned or mirrored: a tool that showed them so
    had every box drawn there, and read in the pixels as stored each lies turned (180 degrees, for a phone held upside
    down), silently. Those of a size that only the turn explains were refused (image_record)."""
    if oriented:
        log.warning("dataset %s: %d image(s) with an EXIF orientation other than 1, shown turned or mirrored by a "
                    "viewer (%s): their boxes are read in the pixels as stored; if they were drawn on the images as "
                    "shown, write the pixels as shown (PIL.ImageOps.exif_transpose) and declare the size that leaves",
                    uri, len(oriented), listed(oriented, most=2))


def warn_boxless_categories(uri: str, records: dict[str, list[Annotated]], categories: dict[int, str],
                            class_of: dict[int, int]) -> None:
    """Warn of categories that no box of any split has, crowds aside (Roboflow's exports list the dataset's name as
    category 0): each stays a class of the head, learnt as never present, as dropping it would renumber the class
    ids after it (an export's labels and categoryIds follow the category ids)."""
    boxed = {label for held in records.values() for r in held for label in r.labels}
    missing = [f"{cid} ({categories[cid]!r})" for cid in sorted(categories) if class_of[cid] not in boxed]
    if missing:
        log.warning("dataset %s: %d of its %d categories without a box in any split: %s; each stays a class the "
                    "detector learns as never present", uri, len(missing), len(categories), ", ".join(missing))


def refuse_boxless(name: str, held: Split, given: bool, spec: DatasetSpec) -> None:
    """Refuse a held-out split whose images hold no box: every score on it is mAP 0, which reads as a score, and
    early stopping on it keeps the first weights. A split file without a box was held out of train instead
    (load_coco); what is left is a split held out of train images that hold few boxes, or the prefix of a split,
    given or held out, that dataset.maxEvalSamples evaluates."""
    if any(r.boxes for r in held.inputs):  # crowds are scored neither way
        return
    if given:
        field, advice = f"dataset.maxEvalSamples {spec.max_eval_samples}", "raise it"
    else:
        key, fraction = (("validationSplit", spec.validation_split) if name == VALIDATION
                         else ("testSplit", spec.test_split))
        field, advice = f"dataset.{key} {fraction}", f"raise it, or give the dataset a {name} JSON with boxes"
        if spec.max_eval_samples is not None:
            advice += (f" (dataset.maxEvalSamples {spec.max_eval_samples} evaluates only its first "
                       f"{spec.max_eval_samples}: raise that too)")
    raise DataError(f"{field}: the {len(held.inputs)} images of the {name} split of {spec.uri} hold no box, so "
                    f"every score on them would be mAP 0; {advice}")


def renumbered(data: CocoData, order: list[int]) -> CocoData:
    """`data` with class id c renumbered order[c - 1] (`pipeline.trained_head_order`)."""
    def moved(split: Split) -> Split:
        return Split([replace(r, labels=[order[c - 1] for c in r.labels],
                              crowd_labels=[order[c - 1] for c in r.crowd_labels]) for r in split.inputs], split.labels)

    return CocoData(moved(data.train), moved(data.validation), moved(data.test),
                    dict(sorted((order[c - 1], name) for c, name in data.id2label.items())),
                    dict(sorted((order[c - 1], cid) for c, cid in data.category_ids.items())))


def annotation_files(path: Path) -> dict[str, Path]:
    """The annotations JSON of each split the dataset names (train first)."""
    if path.is_file():
        return {TRAIN: path}
    if (path / ANNOTATIONS).is_file():
        return {TRAIN: path / ANNOTATIONS}
    by_split: dict[str, Path] = {}
    # COCO's own folder holds captions_, instances_ and person_keypoints_train2017.json: the boxes are instances_'
    for file in sorted(path.glob("*.json"), key=lambda f: (not f.name.startswith("instances_"), f.name)):
        if (name := split_of(file.name)) and name not in by_split:
            if not file.is_file():  # read, it raised IsADirectoryError (FileNotFoundError, ELOOP's OSError), the
                raise DataError(f"dataset {path}: {file.name}, its {name} split's annotations JSON, "  # pod's fault
                                f"{not_a_file(file)}; make it the JSON file, or remove it")
            by_split[name] = file
    if TRAIN not in by_split:
        raise DataError(f"dataset {path}: no {ANNOTATIONS} and no train JSON (train.json, val.json, test.json) "
                        "in the folder; point dataset.uri at the annotations JSON")
    return {name: by_split[name] for name in (TRAIN, VALIDATION, TEST) if name in by_split}


def not_a_file(path: Path) -> str:
    """What a path that is no regular file is."""
    if path.is_dir():
        return "is a folder"
    if path.is_symlink() and not path.exists():
        return "is a link to nothing (or to itself)"
    return "is no regular file"


def read_json(file: Path, answers: bool = True) -> dict[str, Any]:
    """A COCO annotations file; without `answers` (a held-out split) it may have no annotations at all, as COCO's
    own image_info_test2017.json, its answers withheld: it is then a split of no box (load_coco)."""
    try:
        doc = json.loads(read_text(file))  # a byte order mark too, as the text formats are read
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past json's depth, the file's fault too
        raise DataError(f"{file}: not valid JSON ({exc})") from exc
    except PermissionError as exc:
        raise DataError(f"dataset.uri: {unreadable(exc)}") from exc
    if not answers and isinstance(doc, dict) and "annotations" not in doc:
        doc["annotations"] = []
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(doc, dict)
               or not isinstance(doc.get(key), list)]
    if missing:
        raise DataError(f"{file}: not a COCO annotations file: no list {', '.join(map(repr, missing))}")
    return doc


def category_names(docs: dict[str, dict[str, Any]], files: dict[str, Path]) -> dict[int, str]:
    """Category id -> name; every split must list the same categories (a class id must mean one thing)."""
    seen: dict[int, str] | None = None
    for name, doc in docs.items():
        categories: dict[int, str] = {}
        for i, cat in enumerate(doc["categories"]):
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
                raise DataError(f"{files[name]}: categories[{i}] needs an integer id and a name, got {cat!r}")
            if categories.get(cat["id"], cat["name"]) != cat["name"]:  # two files' categories joined naively
                raise DataError(f"{files[name]}: categories[{i}] ({cat['name']!r}) has the id of "
                                f"{categories[cat['id']]!r} too ({cat['id']}), so their boxes cannot be told apart")
            same = next((k for k, v in categories.items() if v == cat["name"] and k != cat["id"]), None)
            if same is not None:  # an export's labels and the per-class AP know a class by its name
                raise DataError(f"{files[name]}: categories[{i}] (id {cat['id']}) has the name of id {same} too "
                                f"({cat['name']!r}), so an exported head's labels and the per-class AP would take "
                                "them for one class; rename one, or merge them into one id")
            categories[cat["id"]] = cat["name"]
        if not categories:
            raise DataError(f"{files[name]}: no categories")
        if seen is not None and categories != seen:
            raise DataError(f"{files[name]}: its categories differ from those of {files[TRAIN]}")
        seen = categories
    assert seen is not None
    return seen


def records_of(doc: dict[str, Any], file: Path, categories: dict[int, str], class_of: dict[int, int],
               at_least: int, oriented: list[str]) -> list[Annotated]:
    """The images with their boxes, each checked as a batch decodes it for `at_least` (data.draft); every problem
    found is collected, the first few raised together. The paths of those loaded that a viewer shows turned or
    mirrored (their EXIF orientation) are added to `oriented`."""
    problems: list[str] = []
    images: dict[int, Annotated] = {}
    ids: dict[str, int] = {}  # each image file's first image id
    bad: set[Any] = set()  # images already reported: their annotations would only repeat the problem
    for i, image in enumerate(doc["images"]):
        record = image_record(image, i, file, problems, at_least, oriented)
        if record is None:
            if isinstance(image, dict) and isinstance(image.get("id"), int):  # ids of other types name no image
                bad.add(image["id"])
        elif image["id"] in images:  # two files joined naively: its boxes would mix
            problems.append(f"image {image['id']} ({image['file_name']!r}): the id of an earlier image too "
                            f"({images[image['id']].path})")
        # two annotation passes merged naively (one boxed the cats, the other the dogs): each record would teach the
        # other's boxes as background, and score a right detection of them as a false positive. By the path the file
        # name resolves to, links not followed: a hub cache links byte-identical images to one blob
        elif (first := ids.setdefault(os.path.normpath(record.path), image["id"])) != image["id"]:
            problems.append(f"image {image['id']} ({image['file_name']!r}): the file of image {first} too "
                            f"({record.path}); merge their annotations into one image")
            bad.add(image["id"])
        else:
            images[image["id"]] = record
    crowd = 0
    for i, ann in enumerate(doc["annotations"]):
        if isinstance(ann, dict) and is_int_in(ann.get("image_id"), bad):
            continue
        crowd += add_box(ann, i, images, categories, class_of, problems)
    if problems:
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(f"{file}: {len(problems)} bad record(s){more}: " + "; ".join(problems[:SHOWN_PROBLEMS]))
    refuse_normalised(file, list(images.values()))
    if crowd:
        log.warning("%s: %d crowd annotation(s) (iscrowd 1) not trained on; a detection in one counts neither way "
                    "in mAP", file, crowd)
    return list(images.values())


def refuse_normalised(file: Path, records: list[Annotated]) -> None:
    """Refuse a file whose every box lies within [0, NORMALISED_EXTENT] of images NORMALISED_MIN_SIDE pixels a side
    or more: it trained on sub-pixel boxes to mAP 0, and the anchors' warning blamed dataset.imageSize."""
    boxed = [r for r in records if r.boxes or r.crowd_boxes]
    boxes = [b for r in boxed for b in r.boxes + r.crowd_boxes]
    least = min((min(r.width, r.height) for r in boxed), default=0)
    if least < NORMALISED_MIN_SIDE or any(max(b[2], b[3]) > NORMALISED_EXTENT for b in boxes):
        return
    raise DataError(f"{file}: bbox: its {len(boxes)} boxes all lie within [0, {NORMALISED_EXTENT}] of images of "
                    f"{least} pixels or more a side: they look normalised (0..1, as YOLO's labels are), but COCO's "
                    "bbox is [x, y, width, height] in pixels; multiply x and width by the image's width, y and "
                    "height by its height")


def is_int_in(value: Any, ids: Container[int]) -> bool:
    """Whether `value` is one of these integer ids; a list or an object in its place (unhashable) is none."""
    return isinstance(value, int) and value in ids


def image_record(image: Any, i: int, file: Path, problems: list[str], at_least: int,
                 oriented: list[str]) -> Annotated | None:
    if not (isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)):
        problems.append(f"images[{i}] needs an integer id and a file_name")
        return None
    where = f"image {image['id']} ({image['file_name']!r})"
    candidates = [file.parent / image["file_name"], file.parent / "images" / image["file_name"]]
    # COCO's: annotations/instances_val2017.json (person_keypoints_val2017, image_info_test2017) beside val2017/
    if file.parent.name == "annotations" and "_" in file.stem:
        candidates.append(file.parent.parent / file.stem.rsplit("_", 1)[1] / image["file_name"])
    path = next((p for p in candidates if names_file(p)), None)
    if path is None:
        problems.append(f"{where}: no file at {' or '.join(map(str, candidates))}")
        return None
    try:
        with open_image(path) as opened:
            size = opened.size  # as stored: draft may set a JPEG's smaller
            draft(opened, at_least)
            mode, wide = opened.mode, beyond_16_bits(int_range(opened))
            # what a viewer shows, on which boxes were drawn
            swapped = size[0] != size[1] and (image.get("width"), image.get("height")) == size[::-1]
            turn = orientation(opened, whole=swapped)
    except decode_errors() as exc:  # a Netpbm's damaged header raises ValueError, no OSError
        problems.append(f"{where}: cannot read it as an image ({image_fault(exc)})")
        return None
    if mode == "F" or wide:
        problems.append(f"{where}: {WIDE_IMAGE if wide else FLOAT_IMAGE}")
        return None
    declared = (image.get("width", size[0]), image.get("height", size[1]))
    if declared != size:
        why = ""
        if turn in TURNED:
            why = (f": its EXIF orientation tag ({turn}) has it shown turned, {size[1]}x{size[0]}, but its "
                   "boxes are read in its pixels as stored; write the pixels upright (PIL's ImageOps.exif_transpose) "
                   "or declare the stored size, with the boxes in the stored pixels")
        problems.append(f"{where}: declared {declared[0]!r}x{declared[1]!r} but the file is {size[0]}x{size[1]}{why}")
        return None
    if turn != 1:
        oriented.append(str(path))
    return Annotated(str(path), size[0], size[1])


def orientation(image: Image.Image, whole: bool) -> int:
    """The EXIF orientation of an opened image, 2 to 8 where a viewer turns or mirrors it, else 1; from what its
    header held, nothing decoded (a JPEG's EXIF is in its header; Pillow read it opening it). A PNG's EXIF may follow
    its pixels, which Pillow reads only by decoding them all: read so only with `whole`, else taken as 1. A damaged
    EXIF, which does not stop the pixels decoding, says none."""
    from PIL import ExifTags

    if image.format == "PNG" and "exif" not in image.info and not whole:
        return 1
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, ValueError, struct.error):  # Pillow's, parsing a damaged EXIF
        return 1
    return value if value in range(2, 9) else 1  # what a viewer ignores too (ImageOps.exif_transpose)


def add_box(ann: Any, i: int, images: dict[int, Annotated], categories: dict[int, str], class_of: dict[int, int],
            problems: list[str]) -> bool:
    """Add the annotation's box to its image, or its problem to `problems`; whether it was a crowd's."""
    if not isinstance(ann, dict):
        problems.append(f"annotations[{i}] is not an object")
        return False
    where = f"annotation {ann.get('id', f'[{i}]')} (image {ann.get('image_id')!r})"  # a string id "1" shown as one
    image = images[ann["image_id"]] if is_int_in(ann.get("image_id"), images) else None
    if image is None:
        problems.append(f"{where}: no image with that id")
        return False
    if not is_int_in(ann.get("category_id"), categories):
        known = ", ".join(f"{k} ({v})" for k, v in sorted(categories.items()))
        problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}; the categories are {known}")
        return False
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        problems.append(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        return False
    try:
        x, y, w, h = map(float, bbox)
    except OverflowError:  # an integer past float's range (json reads any): escaped as the pod's fault, retried
        x = y = w = h = math.inf
    if not all(map(math.isfinite, (x, y, w, h))):  # a NaN passes every comparison below
        problems.append(f"{where}: bbox {bbox} is not a finite box")
        return False
    if w <= 0 or h <= 0:
        problems.append(f"{where}: bbox {bbox} has no area")
        return False
    t = EDGE_TOLERANCE
    if x < -t or y < -t or x + w > image.width + t or y + h > image.height + t:
        problems.append(f"{where}: bbox {bbox} lies outside its {image.width}x{image.height} image")
        return False
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height)
    # also where it overhangs by less than the tolerance, not inside
    if x1 - x0 < MIN_SHARE * image.width or y1 - y0 < MIN_SHARE * image.height:
        problems.append(f"{where}: bbox {bbox} has no area inside its {image.width}x{image.height} image (a side "
                        f"under {MIN_SHARE:g} of the image's)")
        return False
    crowd = ann.get("iscrowd") == 1
    (image.crowd_boxes if crowd else image.boxes).append([x0, y0, x1, y1])
    (image.crowd_labels if crowd else image.labels).append(class_of[ann["category_id"]])
    return crowd
