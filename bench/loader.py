"""(g) How fast the trainer's input makes image batches: the whole photo decoded in line, as it was; decoded at a
reduced scale in line, as on a CPU now; and that made ahead by threads, as on a GPU now.

An image classifier's (and a detector's) batch is decoded from its files and resized when it is made. Made in line,
the loop waits for it every step; on a GPU, whose step takes a few milliseconds, that wait is the step's pace.
`batches.collated` makes `loader_threads` batches ahead in threads, and `batches.open_rgb` decodes a JPEG at the
smallest of 1/2, 1/4, 1/8 scale that is still as large as the batch's size. Every side makes the same batches of the
same files, of the same size; no model takes them, so the figure is the ceiling an input-bound step meets.

The images are JPEG photos (quality 90) cut from the two 640x427 photos scikit-learn ships, by turns mirrored, whole
or cropped by up to 96 pixels each way, then scaled by `--photo-scale` (3 makes them 1920x1281 or smaller, as a
camera's photos resized for the web). Rounds rotate the sides' order, because the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import RESULTS, command_line, machine, refuse_dirty_tree, result_stem, write_results


def write_photos(folder: Path, count: int, scale: float = 1.0) -> list[str]:
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(pixels) for pixels in load_sample_images().images]  # 640x427 each
    paths = []
    for i in range(count):
        image = sources[i % 2]
        cut = i % 5 * 24  # every fifth the whole photo, else a crop up to 96 pixels smaller each way
        image = image.crop((cut, cut // 2, image.width - cut, image.height - cut // 2))
        if scale != 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        (ImageOps.mirror(image) if i % 3 == 0 else image).save(path, quality=90)
        paths.append(str(path))
    return paths


def whole_decode(data: Any, idx: list[int], image_size: int) -> Any:
    """The batch as `collate_images` made it before the reduced-scale decode: each photo decoded whole."""
    import torch
    from PIL import Image
    from torchvision.transforms import functional as F

    from finetune_trainer.batches import IMAGENET_MEAN, IMAGENET_STD, Batch, open_rgb

    pixels = [F.normalize(F.pil_to_tensor(open_rgb(data.features[i], as_shown=True).resize(
        (image_size, image_size), Image.BILINEAR)).float() / 255, IMAGENET_MEAN, IMAGENET_STD) for i in idx]
    return Batch({"pixel_values": torch.stack(pixels)}, torch.tensor([data.labels[i] for i in idx]), len(idx), 0,
                 len(idx))


def run_side(data: Any, plan: list[list[int]], collate: Callable[[Any, list[int]], Any], ahead: int
             ) -> dict[str, float]:
    from finetune_trainer.batches import collated

    started, cpu = time.perf_counter(), time.process_time()
    images = sum(b.samples for b in collated(data, collate, plan, ahead))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "images_per_second": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--photo-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder other than bench/results for a trial")
    args = parser.parse_args()
    refuse_dirty_tree(args.out)

    import torch

    from finetune_trainer.batches import collate_images, encode_images, loader_threads
    from finetune_trainer.config import Task
    from finetune_trainer.data import Split

    info = machine()
    threads = loader_threads(Task.IMAGE_CLASSIFICATION, torch.device("cuda"))  # as many as on this machine's GPU
    size = args.image_size
    now = lambda data, idx: collate_images(data, idx, size)  # noqa: E731
    sides: dict[str, tuple[Callable[[Any, list[int]], Any], int]] = {
        "whole, in line (before)": (lambda data, idx: whole_decode(data, idx, size), 0),
        "reduced, in line (CPU)": (now, 0),
        f"reduced, ahead by {threads} threads (GPU)": (now, threads)}
    names = list(sides)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photos(Path(folder), args.images, args.photo_scale)
        data = encode_images(Split(paths, [0] * len(paths)))
        plan = [list(range(i, min(i + args.batch_size, len(paths)))) for i in range(0, len(paths), args.batch_size)]
        for collate, _ in sides.values():  # the files into the page cache, the decoders loaded
            run_side(data, plan[:1], collate, 0)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append({name: run_side(data, plan, *sides[name]) for name in order})
    rates = {name: statistics.median(rnd[name]["images_per_second"] for rnd in rounds) for name in names}
    ratios = {name: [rnd[names[0]]["seconds"] / rnd[name]["seconds"] for rnd in rounds] for name in names[1:]}
    lines = [
        f"# Image batches: decoded whole in line, at a reduced scale, and ahead ({info['started_utc']})", "",
        f"Command `{command_line()}` at `{info['git_commit']}`; {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['loadavg_at_start'][0]:.1f} at the start; {args.images} JPEG photos scaled by {args.photo_scale:g}, "
        f"batches of {args.batch_size}, resized to {size}; {args.rounds} rounds, the sides' order rotating.", "",
        "| side | images/s (median over rounds) | CPU s per round (median) | speed-up over the first side, median "
        "[range] |", "|---|---|---|---|",
        *(f"| {name} | {rates[name]:.0f} | {statistics.median(rnd[name]['cpu_seconds'] for rnd in rounds):.2f} | "
          + (f"{statistics.median(ratios[name]):.2f}× [{min(ratios[name]):.2f}, {max(ratios[name]):.2f}]"
             if name in ratios else "—") + " |" for name in names), ""]
    payload = {"machine": info, "command": command_line(), "args": {k: str(v) for k, v in vars(args).items()},
               "loader_threads": threads, "rounds": rounds, "ratios": ratios, "images_per_second": rates}
    print(write_results(result_stem("loader", info), payload, "\n".join(lines), args.out).read_text())


if __name__ == "__main__":
    main()
