"""`finetune-trainer run <FineTuneJob manifest or config JSON> [--output DIR]`.

Runs the pipeline in this process (or in each process torchrun starts), prints a summary
table of baseline against fine-tuned, and exits 0 on success, 1 on a user error (bad
config, data or model; a diverging loss), 143 after a checkpoint on SIGTERM or Ctrl-C, and 2 on
anything else (an infrastructure failure that a new attempt may get past).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from finetune_trainer.errors import EXIT_OK, EXIT_USER_ERROR, Terminated, UserError, exit_code_of
from finetune_trainer.torchrun import rank, world_size

log = logging.getLogger("finetune_trainer")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2, which the operator reads as infrastructure
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="finetune-trainer", description="Fine-tune a model: analyze, adjust, rearrange, train, "
                                                         "evaluate, export.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="run the pipeline of a FineTuneJob manifest or a trainer config")
    run.add_argument("config", type=Path, help="FineTuneJob YAML or trainer config JSON")
    run.add_argument("--output", type=Path, help="output folder, in place of the config's output.uri (and as it: no "
                                                 "space in the path)")
    return parser.parse_args(argv)


def setup_logging() -> None:
    prefix = f"[rank {rank()}] " if world_size() > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load reports repeat what our analysis says, in less detail
    hf_logging.disable_progress_bar()
    # Deprecation notices between transformers and peft: nothing a user of the trainer can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: spinning threads wait actively for each other, which on a CPU shared with
    # other processes made every matmul about 3x slower (measured on 2 cores); waiting passively costs little.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse(argv)
    try:
        return start(args)
    except Exception as exc:  # before the pipeline took over (a broken install, say): never 1, which means the user
        log.exception("infrastructure failure")
        with contextlib.suppress(Exception):
            from finetune_trainer.config import Stage
            from finetune_trainer.telemetry import write_failure

            write_failure(Stage.STARTING, exc)
        return exit_code_of(exc)


def start(args: argparse.Namespace) -> int:
    setup_logging()
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.rules import error_lines

    try:
        # an absolute --output: output.uri takes no relative path
        cfg = TrainerConfig.from_file(args.config, os.path.abspath(args.output) if args.output else None)
    except ValidationError as exc:
        problem = f"{args.config} is not a valid config:\n  " + "\n  ".join(error_lines(exc))
        if args.output and "output.uri" in problem:
            problem += f"\n  (output.uri is --output {args.output} here)"
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problem = f"cannot read {args.config}: {exc}"
    else:
        return execute(cfg)
    return refuse(problem)


def refuse(problem: str) -> int:
    """A config the trainer cannot run, before the pipeline starts: said, and in the termination message."""
    from finetune_trainer.config import Stage
    from finetune_trainer.telemetry import write_termination

    log.error("%s", problem)
    write_termination({"stage": Stage.STARTING.value, "reason": "InvalidConfig", "message": problem,
                       "exitCode": EXIT_USER_ERROR})
    return EXIT_USER_ERROR


def execute(cfg: Any) -> int:
    from finetune_trainer import pipeline
    from finetune_trainer.uris import local_path

    try:
        out = local_path(cfg.output.uri)
    except UserError as exc:  # hf://, which the operator refuses at admission; here, without --output
        return refuse(f"output.uri: {exc}; give a local one, or --output")
    try:
        report = pipeline.run(cfg, out)
    except Exception as exc:  # the same exit code the termination message already carries
        if isinstance(exc, UserError):
            log.error("%s: %s", exc.reason, exc)
        elif isinstance(exc, Terminated):
            log.warning("%s", exc)
        else:
            log.exception("infrastructure failure")
        return exit_code_of(exc)
    if rank() == 0:
        print(summary_table(report, out))
    return EXIT_OK


def summary_table(report: dict[str, Any], out: Path) -> str:
    from finetune_trainer.config import Task
    from finetune_trainer.export import fmt, rows_of  # as the model card says them

    evaluation = report["evaluation"]
    training = report["training"]
    teacher = evaluation.get("teacher")  # a distilled job's, measured with the baseline
    rows = [("metric", "baseline", "fine-tuned", "delta", *(("teacher",) if teacher else ()))]
    for metric, value in evaluation["final"].items():
        base = evaluation["baseline"].get(metric)
        delta = evaluation["delta"].get(metric)
        rows.append((metric, fmt(base), fmt(value), fmt(delta, "+"), *((fmt(teacher.get(metric)),) if teacher else ())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{training['steps']} steps in {training['seconds']:.1f} s "
                 f"({training['samples_per_second']:.1f} {rows_of(Task(report['config']['model']['task']))}/s); "
                 f"report: {out / 'report.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
