"""(g) How fast the trainer's input makes image batches: in line against made ahead by threads.

An image classifier's (and a detector's) batch is decoded from its files and resized when it is made. Made in line,
the loop waits for it every step; on a GPU, whose step takes a few milliseconds, the decoding is most of the step.
`batches.collated` makes `loader_threads` batches ahead in threads. Both sides here are the trainer's own
`collated` over the same plan of batches, with `ahead` 0 (in line, as before) and `loader_threads(image task)`; no
model consumes them, so the figure is the ceiling an input-bound step meets: images a second, and its ratio.

The images are JPEG photos (quality 90, 640x427 and smaller crops, mirrored by turns) cut from the two photos
scikit-learn ships, so that they decode like a camera's files; the batch is resized to `--image-size` square.
Rounds alternate which side goes first, because the machine is shared and its speed drifts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, clean_commit, command_line, machine, result_stem, write_results


def write_photos(folder: Path, count: int) -> list[str]:
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(pixels) for pixels in load_sample_images().images]  # 640x427 each
    paths = []
    for i in range(count):
        image = sources[i % 2]
        cut = i % 5 * 24  # every fifth the whole photo, else a crop up to 96 pixels smaller each way
        image = image.crop((cut, cut // 2, image.width - cut, image.height - cut // 2))
        path = folder / f"{i:05d}.jpg"
        (ImageOps.mirror(image) if i % 3 == 0 else image).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_side(data: Any, plan: list[list[int]], image_size: int, ahead: int) -> dict[str, float]:
    from finetune_trainer.batches import collate_images, collated

    started, cpu = time.perf_counter(), time.process_time()
    images = sum(b.samples for b in collated(data, lambda d, idx: collate_images(d, idx, image_size), plan, ahead))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "images_per_second": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder other than bench/results for a trial")
    args = parser.parse_args()
    if args.out.resolve() == RESULTS.resolve():
        clean_commit()

    import torch

    from finetune_trainer.batches import encode_images, loader_threads
    from finetune_trainer.config import Task
    from finetune_trainer.data import Split

    info = machine()
    threads = loader_threads(Task.IMAGE_CLASSIFICATION, torch.device("cuda"))  # as many as on this machine's GPU
    sides = {"in line": 0, f"ahead ({threads} threads)": threads}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photos(Path(folder), args.images)
        data = encode_images(Split(paths, [0] * len(paths)))
        plan = [list(range(i, min(i + args.batch_size, len(paths)))) for i in range(0, len(paths), args.batch_size)]
        run_side(data, plan[:1], args.image_size, 0)  # the files into the page cache, Pillow's decoders loaded
        rounds = []
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            rounds.append({name: run_side(data, plan, args.image_size, sides[name]) for name in order})
    names = list(sides)
    ratios = [rnd[names[0]]["seconds"] / rnd[names[1]]["seconds"] for rnd in rounds]
    rates = {name: statistics.median(rnd[name]["images_per_second"] for rnd in rounds) for name in names}
    lines = [
        f"# Image batches made in line against ahead ({info['started_utc']})", "",
        f"Command `{command_line()}` at `{info['git_commit']}`; {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['loadavg_at_start'][0]:.1f} at the start; {args.images} JPEG photos, batches of {args.batch_size}, "
        f"resized to {args.image_size}; {args.rounds} rounds, the sides' order alternating.", "",
        "| side | images/s (median over rounds) | CPU s per round (median) |", "|---|---|---|",
        *(f"| {name} | {rates[name]:.0f} | {statistics.median(rnd[name]['cpu_seconds'] for rnd in rounds):.2f} |"
          for name in names), "",
        f"Speed-up of the input, in line seconds / ahead seconds: median **{statistics.median(ratios):.2f}×**, "
        f"range {min(ratios):.2f}–{max(ratios):.2f} over the rounds.", ""]
    payload = {"machine": info, "command": command_line(), "args": {k: str(v) for k, v in vars(args).items()},
               "loader_threads": threads, "rounds": rounds, "ratios": ratios, "images_per_second": rates}
    print(write_results(result_stem("loader", info), payload, "\n".join(lines), args.out).read_text())


if __name__ == "__main__":
    main()
