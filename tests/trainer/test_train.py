"""The training loop in process: the pipeline's report, token-normalised accumulation,
a NaN loss, early stopping, and checkpoint/resume giving the same weights."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import pickle
import shutil
import signal
import struct
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune_trainer import checkpoints, export, pipeline
from finetune_trainer.batches import IGNORE_INDEX, encode_text, make_collate
from finetune_trainer.config import (EarlyStoppingSpec, LoraSpec, Metric, ModelSpec, Precision, Task, TrainerConfig,
                                     TrainingSpec)
from finetune_trainer.data import Split
from finetune_trainer.distill import Teacher
from finetune_trainer.distributed import World
from finetune_trainer.errors import CheckpointMismatch, ConfigError, LossNotFinite, Terminated
from finetune_trainer.evaluate import evaluate
from finetune_trainer.models import load_model, load_tokenizer
from finetune_trainer.rearrange import add_adapters, new_head
from finetune_trainer.structure import within
from finetune_trainer.telemetry import TERMINATION_ENV
from finetune_trainer.train import (Hooks, LoopState, SigtermFlag, autocast_dtype, cpu_computes_bf16, make_scheduler,
                                   train_loop)
from tiny import (COMMIT, LATER, SENTIMENT, TINY_BERT, TINY_GPT2, card_model, hub_bert, on_base, saved_bert,
                  tiny_classifier_doc)

CPU = World(rank=0, size=1, device=torch.device("cpu"))
TEXTS = [f"sample number {i} " + "word " * (i % 13) for i in range(64)]
NO_DROPOUT_GPT2 = TINY_GPT2 | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def test_pipeline_report_has_the_contracted_shape(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_cfg.training.eval_every_steps = 4
    scored = []
    real = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda model, split, *a: scored.append(split) or real(model, split, *a))
    report = pipeline.run(tiny_cfg, tmp_path / "out")
    baseline_split, *during, final_split = scored  # selection on validation, the scores on test
    assert final_split is baseline_split and len(during) == 2 and not {id(s) for s in during} & {id(final_split)}
    assert not set(map(tuple, during[0].features)) & set(map(tuple, final_split.features))
    assert set(report["evaluation"]) == {"baseline", "final", "delta"}
    assert set(report["evaluation"]["final"]) == {"accuracy", "f1"}
    baseline, final = report["evaluation"]["baseline"], report["evaluation"]["final"]
    assert report["evaluation"]["delta"] == {k: final[k] - baseline[k] for k in final}  # the fine-tuning's gain
    training = report["training"]
    assert training["steps"] == 8 and training["samples_per_second"] > 0 and training["tokens_per_second"] > 0
    assert 0 < training["cpu_seconds"] and [e["cpu_seconds_since_train_start"] > 0 for e in training["evals"]] == [True] * 2
    assert set(training["history"][0]) == {"step", "seconds_since_train_start", "loss", "lr", "grad_norm"}
    assert all(0 < h["grad_norm"] < float("inf") for h in training["history"])
    assert [e["step"] for e in training["evals"]] == [4, 8]
    assert training["validation_samples"] == training["test_samples"] == 64
    resolved = autocast_dtype(tiny_cfg.training.precision, CPU.device, tiny_cfg.model.task)
    assert training["precision"] == ("bf16" if resolved == torch.bfloat16 else "fp32")
    assert report["analysis"]["head"]["dataset_labels"] == 3
    out = tmp_path / "out"
    for name in ("model.safetensors", "config.json", "labels.json", "tokenizer.json", "report.json", "README.md",
                 "loss_curve.png", "analysis.json"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "| accuracy |" in card
    loaded = card_model(card, out)  # the card's loading code, pasted
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.config.num_labels == 3


def test_only_what_changes_the_optimisation_starts_afresh(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.checkpoint_every_steps = 4
    out = tmp_path / "out"
    pipeline.run(tiny_cfg, out)
    (first,) = (out / "checkpoints").iterdir()
    (first / ".tmp-step-00000006").mkdir()  # a save that died half-way
    tiny_cfg.training.keep_checkpoints = 5  # bookkeeping: the same run, resumed
    tiny_cfg.evaluation.baseline = False
    pipeline.run(tiny_cfg, out)
    assert "resumed from" in caplog.text and not (first / ".tmp-step-00000006").exists()
    caplog.clear()
    tiny_cfg.adjust.learning_rate = 5e-4  # a different run: its own checkpoints, trained afresh
    pipeline.run(tiny_cfg, out)
    assert "resumed from" not in caplog.text
    assert f"not resuming the checkpoints in {first}" in caplog.text  # and why
    assert "training starts afresh. Changed: adjust.learningRate: 0.001 -> 0.0005\n" in caplog.text
    (second,) = (out / "checkpoints").iterdir()  # the first run's are stale: they can never be resumed
    assert second != first and json.loads((second / "fingerprint.json").read_text())["adjust"]["learningRate"] == 5e-4


def test_a_field_an_upgrade_adds_at_its_default_resumes_the_run(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Only values that are not their defaults name the run's folder: a trainer that adds a field, at a default that
    keeps the old behaviour, resumes a run checkpointed before the upgrade (it had moved it to a new folder, from
    step 0). A value set to its default is the same run as one left unset."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.checkpoint_every_steps = 4
    out = tmp_path / "out"
    pipeline.run(tiny_cfg, out)
    (folder,) = (out / "checkpoints").iterdir()
    newest = checkpoints.complete(folder)[-1]
    real = TrainerConfig.to_wire

    def upgraded(self: TrainerConfig, *defaults: bool) -> dict:  # a trainer with training.labelSmoothing, 0.0 unless set
        wire = real(self, *defaults)
        if not defaults or defaults[0]:
            wire["training"]["labelSmoothing"] = 0.0
        return wire

    monkeypatch.setattr(TrainerConfig, "to_wire", upgraded)
    tiny_cfg.training.max_grad_norm = 1.0  # its default, now set
    caplog.clear()
    pipeline.run(tiny_cfg, out)
    assert f"resumed from {newest}" in caplog.text
    assert list((out / "checkpoints").iterdir()) == [folder]


def test_a_run_an_earlier_version_checkpointed_with_its_defaults_resumes(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A trainer before this one, without a field this version added at its default (training.maxGradNorm here), named
    its folder otherwise: a job retried across the upgrade resumes that folder, in place (so that a rollback to it
    still finds it), where it removed it and trained from step 0."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.checkpoint_every_steps = 4
    out = tmp_path / "out"
    pipeline.run(tiny_cfg, out)
    (folder,) = (out / "checkpoints").iterdir()
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    written = pipeline.fingerprinted(tiny_cfg, 1, data=fingerprint["data"], defaults=True)
    del written["training"]["maxGradNorm"]
    earlier = folder.rename(folder.with_name(checkpoints.folder_name(written)))
    (earlier / "fingerprint.json").write_text(json.dumps(written))
    caplog.clear()
    pipeline.run(tiny_cfg, out)
    assert f"resuming what {earlier} holds, a folder an earlier version of the trainer named" in caplog.text
    assert f"resumed from {checkpoints.complete(earlier)[-1]}" in caplog.text
    assert list((out / "checkpoints").iterdir()) == [earlier]
    assert json.loads((earlier / "fingerprint.json").read_text()) == fingerprint


def test_a_compiled_run_trains_as_the_eager_one_and_an_eager_rerun_resumes_it(tiny_cfg: TrainerConfig,
                                                                             tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """`training.compile` trains through torch.compile: the eager run's losses to rounding (no dropout, fp32, so no
    random stream or precision differs), and checkpoints under the model's own names, which a rerun without compile
    resumes (compile is bookkeeping to the fingerprint)."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.model.config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    tiny_cfg.training.precision = Precision.FP32
    tiny_cfg.training.checkpoint_every_steps = 4
    tiny_cfg.evaluation.baseline = False
    eager = pipeline.run(tiny_cfg, tmp_path / "eager")
    assert "torch.compile" not in caplog.text
    tiny_cfg.training.compile = True
    compiled = pipeline.run(tiny_cfg, tmp_path / "compiled")
    assert "training through torch.compile" in caplog.text

    def losses(report: dict) -> list[float]:
        return [h["loss"] for h in report["training"]["history"]]

    assert len(losses(eager)) > 1 and losses(compiled) == pytest.approx(losses(eager), rel=1e-3)
    assert compiled["evaluation"]["final"]["accuracy"] == pytest.approx(eager["evaluation"]["final"]["accuracy"])
    assert load_file(tmp_path / "compiled" / "model.safetensors").keys() == load_file(
        tmp_path / "eager" / "model.safetensors").keys()
    caplog.clear()
    tiny_cfg.training.compile = False
    pipeline.run(tiny_cfg, tmp_path / "compiled")
    (folder,) = (tmp_path / "compiled" / "checkpoints").iterdir()
    assert f"resumed from {checkpoints.complete(folder)[-1]}" in caplog.text


def trained_once(cfg: TrainerConfig, out: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Run `cfg` into `out` without a baseline; the exported weights and the run's checkpoint folder."""
    cfg.evaluation.baseline = False
    pipeline.run(cfg, out)
    (folder,) = (out / "checkpoints").iterdir()
    return load_file(out / "model.safetensors"), folder


def test_compile_without_a_compiler_is_refused_before_anything_loads(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An image without g++ (as the trainer's was): torch.compile failed at the first step, after the model loaded and
    the baseline ran, and every retry did the same. Now a ConfigError names the field first (exit 1, no retry)."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    tiny_cfg.training.compile = True
    with pytest.raises(ConfigError, match=r"^training\.compile: inductor needs a C\+\+ compiler \(g\+\+\)"):
        pipeline.run(tiny_cfg, tmp_path / "out")
    assert "stage Loading" not in caplog.text
    from finetune_trainer.train import compiler_missing

    assert compiler_missing(torch.device("cuda")).startswith("Triton needs a C compiler (gcc or clang, or $CC)")
    monkeypatch.setenv("CC", "/opt/toolchain/bin/cc")  # Triton takes $CC as it is
    assert compiler_missing(torch.device("cuda")) is None


def test_a_new_evaluation_cadence_resumes_unless_early_stopping_depends_on_it(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Evaluations every 2 steps, the run killed after step 4's checkpoint and resumed with evaluations every 5: it
    continues from step 4 and ends with the weights of the run never stopped, evaluated at the new cadence."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.eval_every_steps = 2
    tiny_cfg.training.checkpoint_every_steps = 2
    tiny_cfg.training.keep_checkpoints = 10
    out = tmp_path / "out"
    reference, folder = trained_once(tiny_cfg, out)
    for later in checkpoints.complete(folder)[2:]:  # as if killed right after step 4's checkpoint
        shutil.rmtree(later)
    tiny_cfg.training.eval_every_steps = 5
    report = pipeline.run(tiny_cfg, out)
    assert f"resumed from {folder / 'step-00000004'}" in caplog.text
    assert [e["step"] for e in report["training"]["evals"]] == [2, 4, 5, 8]
    resumed = load_file(out / "model.safetensors")
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    tiny_cfg.training.early_stopping = EarlyStoppingSpec(patience=2)  # then when it evaluates changes the weights
    every_5 = pipeline.fingerprinted(tiny_cfg, 1)
    tiny_cfg.training.eval_every_steps = 2
    assert pipeline.fingerprinted(tiny_cfg, 1) != every_5


def test_data_changed_at_the_same_path_is_trained_afresh_with_a_new_baseline(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The dataset file replaced at its path and the job run again: it resumed the old run's optimizer at its step on
    the new data (a plan of another length, the old schedule), and reported the baseline an earlier attempt scored
    on another test split beside a final score on the new one."""
    import csv

    from finetune_trainer.uris import local_path

    caplog.set_level(logging.INFO, logger="finetune_trainer")
    rows = list(csv.DictReader(local_path(tiny_cfg.dataset.uri).open(encoding="utf-8", errors="replace")))
    data = tmp_path / "sentiment.csv"

    def write(chosen: list[dict[str, str]]) -> None:
        with data.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(chosen)

    write(rows[0::10])
    tiny_cfg.dataset.uri = str(data)
    tiny_cfg.training.checkpoint_every_steps = 4
    out = tmp_path / "out"
    pipeline.run(tiny_cfg, out)
    (folder,) = (out / "checkpoints").iterdir()
    for saved in checkpoints.complete(folder)[1:]:  # stopped after its first checkpoint
        shutil.rmtree(saved)
    # Made by a trainer from before the digest: taken as of this data, resumed (not thrown away at the upgrade).
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    (folder / "fingerprint.json").write_text(json.dumps({k: v for k, v in fingerprint.items() if k != "data"}))
    caplog.clear()
    pipeline.run(tiny_cfg, out)
    assert f"resumed from {folder / 'step-00000004'}" in caplog.text and "the data changed" not in caplog.text
    assert json.loads((folder / "fingerprint.json").read_text()) == fingerprint
    for saved in checkpoints.complete(folder)[1:]:
        shutil.rmtree(saved)
    write(rows[5::10])  # as many rows, other ones
    caplog.clear()
    again = pipeline.run(tiny_cfg, out)
    assert f"not resuming what {folder} holds: the data changed since it was made" in caplog.text
    assert "resumed from" not in caplog.text and "the baseline was measured by an earlier attempt" not in caplog.text
    assert again["training"]["history"][0]["step"] == 1
    caplog.clear()
    assert pipeline.run(tiny_cfg, out)["evaluation"] == again["evaluation"]  # the same data again: resumed, as before
    assert "the baseline was measured by an earlier attempt" in caplog.text and "the data changed" not in caplog.text


def test_a_base_replaced_at_the_same_uri_trains_afresh_and_scores_its_baseline_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints hold what trains, not the frozen base: a model folder whose files were replaced between attempts
    (another model of the same shapes, config and file sizes) resumed the old adapters on the new base and reported
    the baseline the old base had scored."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    base, out = tmp_path / "base", tmp_path / "out"
    torch.manual_seed(0)
    saved_bert(base, SENTIMENT)
    cfg = TrainerConfig.model_validate(on_base(out, str(base)))
    first = pipeline.run(cfg, out)
    torch.manual_seed(1)
    saved_bert(base, SENTIMENT)
    caplog.clear()
    again = pipeline.run(cfg, out)
    assert again["evaluation"]["baseline"] != first["evaluation"]["baseline"]  # the new base's, measured
    assert "resumed from" not in caplog.text and "the baseline was measured by an earlier attempt" not in caplog.text
    (folder,) = (out / "checkpoints").iterdir()
    assert f"not resuming what {folder} holds: the base model changed since it was made" in caplog.text
    assert "Changed: base.files.model.uri: " in caplog.text and "the data changed" not in caplog.text
    caplog.clear()
    assert pipeline.run(cfg, out)["evaluation"] == again["evaluation"]  # the same base again: resumed
    assert "the baseline was measured by an earlier attempt" in caplog.text and "base model changed" not in caplog.text


def test_a_retry_loads_a_hub_base_at_the_commit_its_first_attempt_resolved(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """hf:// without model.revision: each attempt downloaded the branch's head of the moment. A push between attempts
    had the retry resume adapters trained on the old base onto the new one, report the old base's baseline, and name
    the new commit in the adapters' config. The retry loads the commit the first attempt did, and says so."""
    from huggingface_hub import constants

    caplog.set_level(logging.INFO, logger="finetune_trainer")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub's cache, laid out as the hub lays it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = hub_bert(tmp_path / "hub")
    out = tmp_path / "out"
    cfg = TrainerConfig.model_validate(on_base(out, "hf://org/tiny-bert"))
    first = pipeline.run(cfg, out)
    (folder,) = (out / "checkpoints").iterdir()
    (repo / "refs" / "main").write_text(LATER)  # pushed after the first attempt
    caplog.clear()
    again = pipeline.run(cfg, out)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["revision"] == COMMIT
    assert again["evaluation"] == first["evaluation"]
    assert f"resumed from {checkpoints.complete(folder)[-1]}" in caplog.text
    assert (f"hf://org/tiny-bert: at commit {COMMIT}, which an earlier attempt of this run resolved it to"
            in caplog.text)
    assert json.loads((folder / "fingerprint.json").read_text())["base"] == {"hub": {"hf://org/tiny-bert": COMMIT}}
    assert list((out / "checkpoints").iterdir()) == [folder]
    caplog.clear()
    fresh = pipeline.run(cfg, tmp_path / "fresh")  # another run: the branch's head
    assert json.loads((tmp_path / "fresh" / "adapter" / "adapter_config.json").read_text())["revision"] == LATER
    assert fresh["evaluation"]["baseline"] != first["evaluation"]["baseline"]


def test_a_resumed_run_keeps_the_baseline_an_earlier_attempt_measured(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Every attempt scored the test split again for its baseline (minutes on a large one), a retry after training
    too. An attempt killed after the baseline, before its first checkpoint: the next one keeps that baseline and
    trains to the weights of a run never stopped."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    out = tmp_path / "out"
    first = pipeline.run(tiny_cfg, out)
    reference = load_file(out / "model.safetensors")
    (folder,) = (out / "checkpoints").iterdir()
    for saved in checkpoints.complete(folder):
        shutil.rmtree(saved)
    caplog.clear()
    again = pipeline.run(tiny_cfg, out)
    assert "the baseline was measured by an earlier attempt of this run" in caplog.text
    assert again["evaluation"]["baseline"] == first["evaluation"]["baseline"]
    resumed = load_file(out / "model.safetensors")
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name


def test_a_checkpoint_another_trainer_laid_out_is_trained_afresh(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """An attempt resumed by a trainer of another version (the operator's image, upgraded) that lays out the same
    job otherwise: a parameter in another optimizer group (DoRA's magnitudes moved out of weight decay), or another
    name for what trains (a head kept whole beside LoRA). Loading failed the job on every retry (torch's ValueError)
    or for good (CheckpointMismatch); it now warns, and trains afresh to the weights of a run never stopped."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.checkpoint_every_steps = 4
    out = tmp_path / "out"
    reference, folder = trained_once(tiny_cfg, out)
    for laid_out in ("groups", "names"):
        written, later = checkpoints.complete(folder)
        shutil.rmtree(later)  # killed after step 4's checkpoint, written by the other trainer:
        if laid_out == "groups":
            saved = torch.load(written / "optimizer.pt", weights_only=True)
            first, second = saved["optimizer"]["param_groups"][:2]
            for key in ("params", "param_names"):  # its first group's last parameter in the second group
                second[key].insert(0, first[key].pop())
            torch.save(saved, written / "optimizer.pt")
        else:
            tensors = load_file(written / "trained.safetensors")
            tensors["classifier.original_module.weight"] = tensors.pop("classifier.weight")
            save_file(tensors, written / "trained.safetensors")
        caplog.clear()
        report = pipeline.run(tiny_cfg, out)
        assert "resumed from" not in caplog.text
        assert (f"not resuming {written}: a trainer that lays out this job otherwise (another version) wrote it; "
                "training starts afresh from step 0") in caplog.text
        assert report["training"]["steps"] == 8
        assert [p.name for p in checkpoints.complete(folder)] == ["step-00000004", "step-00000008"]  # this trainer's
        assert_same(load_file(out / "model.safetensors"), reference)


def test_a_checkpoint_of_another_world_size_is_refused(tiny_cfg: TrainerConfig, tmp_path: Path) -> None:
    tiny_cfg.training.checkpoint_every_steps = 4
    pipeline.run(tiny_cfg, tmp_path / "out")
    (saved,) = (tmp_path / "out" / "checkpoints").iterdir()

    def on_two(data: str) -> str | None:  # rank 0's choice, as the pipeline asks: the short form and the full one
        return checkpoints.chosen_folder(tmp_path / "out" / "checkpoints", pipeline.fingerprinted(tiny_cfg, 2, data=data),
                                         pipeline.fingerprinted(tiny_cfg, 2, data=data, defaults=True), 2)[2]

    refused = on_two(json.loads((saved / "fingerprint.json").read_text())["data"])  # the same data
    assert refused and refused.startswith(f"{saved} holds checkpoints of this job made by 1 processes; this run has 2")
    # as one a trainer from before the data digest wrote: refused the same, not thrown away
    fingerprint = json.loads((saved / "fingerprint.json").read_text())
    (saved / "fingerprint.json").write_text(json.dumps({k: v for k, v in fingerprint.items() if k != "data"}))
    assert "made by 1 processes; this run has 2" in (on_two("x") or "")
    assert checkpoints.complete(saved)  # kept for a run on 1 process


def lm_setup(seed: int = 0):
    spec = ModelSpec(task="causal-lm", architecture="gpt2", config=NO_DROPOUT_GPT2,
                     tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed)
    data = encode_text(Split(TEXTS, None), tokenizer, 32)
    return model, data, make_collate(Task.CAUSAL_LM, tokenizer.pad_token_id, 0)


def sgd_step(batch_size: int, accumulation: int, teacher: Teacher | None = None) -> dict[str, torch.Tensor]:
    model, data, collate = lm_setup()
    # fp32: the two gradients are equal in exact arithmetic, and bf16's rounding of different batch shapes differs.
    spec = TrainingSpec(batchSize=batch_size, gradientAccumulation=accumulation, maxSteps=1, batching="dynamic",
                        warmupRatio=0, schedule="constant", maxGradNorm=1e9, precision="fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_loop(model, optimizer, make_scheduler(optimizer, spec, 1), data, collate, spec, Task.CAUSAL_LM, CPU,
               teacher=teacher)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_warmup_starts_at_zero_and_reaches_the_peak_linearly() -> None:
    spec = TrainingSpec(warmupRatio=0.2, schedule="linear")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, spec, 20)
    used = []
    for _ in range(20):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # 4 warmup steps, then the peak
    assert all(a > b for a, b in zip(used[4:], used[5:])) and used[-1] == pytest.approx(1 / 16)
    # A run of a few steps (a smoke test) whose warmup would round to all of them still trains at the peak at last
    for total in (1, 2, 3):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, TrainingSpec(warmupRatio=0.6, schedule="constant"), total)
        for _ in range(total - 1):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == 1.0, total


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu(precision: str) -> None:
    """bf16 autocast, and fp16 with its GradScaler: a step whose gradient overflows is skipped, and the schedule
    waits for it (the learning rate of the next step is the skipped one's)."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=4, precision=precision, schedule="linear", warmupRatio=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtypes, snapshots = set(), []
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    weight = model.transformer.h[0].mlp.c_fc.weight
    overflow = weight.register_hook(lambda grad: grad * float("inf") if len(snapshots) == 1 and precision == "fp16"
                                    else grad)  # step 2's gradient overflows
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 4), data, collate, spec, Task.CAUSAL_LM, CPU,
                       Hooks(on_step=lambda state, total: snapshots.append(weight.detach().clone())))
    overflow.remove()
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float16}
    norms = [h["grad_norm"] for h in state.history]
    lrs = [h["lr"] for h in state.history]
    taken = [n < float("inf") for n in norms]
    if precision == "fp16":  # the scaler starts at 2**16 and may skip the first step by itself, too
        assert not taken[1] and torch.equal(snapshots[0], snapshots[1])
    else:
        assert all(taken)
    assert lrs == [1e-3 * (1 - sum(taken[:i]) / 4) for i in range(4)]  # only steps taken advance the schedule
    assert taken[3] and not torch.equal(snapshots[2], snapshots[3])


def test_a_bf16_checkpoint_trains_fp32_weights(tmp_path: Path) -> None:
    """Llama, Qwen and SmolLM publish bf16 weights, which transformers 5 loads as bf16: AdamW's steps of lr 1e-5
    were rounded away (after a step, 16% of a layer's weights had moved), and precision fp32 ran in bf16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=30522, **NO_DROPOUT_GPT2)).to(torch.bfloat16).save_pretrained(tmp_path)
    spec = ModelSpec(task="causal-lm", uri=f"file://{tmp_path}", tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weight = model.transformer.h[0].mlp.c_fc.weight
    before = weight.detach().clone()
    training = TrainingSpec(batchSize=8, maxSteps=1, precision="fp32", warmupRatio=0, maxGradNorm=1e9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    train_loop(model, optimizer, make_scheduler(optimizer, training, 1), encode_text(Split(TEXTS, None), tokenizer, 32),
               make_collate(Task.CAUSAL_LM, tokenizer.pad_token_id, 0), training, Task.CAUSAL_LM, CPU)
    assert bool((weight.detach() != before).all())  # Adam's first step moves every weight by about lr


@pytest.mark.parametrize(("flags", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16", True),  # Cooper Lake, Zen 4
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq", False),  # Skylake: AVX-512, bf16 emulated
    ("Features\t: fp asimd sve bf16 i8mm", True),  # Neoverse V1
    ("Features\t: fp asimd", False),
    ("processor\t: 0", False),
])
def test_a_cpu_computes_bf16_only_with_bf16_instructions(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: x\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert cpu_computes_bf16(cpuinfo) is native


def test_auto_precision_on_the_cpu_is_bf16_for_text_models_where_it_computes_bf16(tmp_path: Path) -> None:
    """This machine's own answer decides `auto` for a text model on its CPU; a convolutional model keeps fp32 there;
    explicit precisions are kept as written."""
    assert cpu_computes_bf16(tmp_path / "absent") is False  # no /proc/cpuinfo (not Linux): no claim of bf16
    cpu, text, images = torch.device("cpu"), Task.SEQUENCE_CLASSIFICATION, Task.IMAGE_CLASSIFICATION
    assert autocast_dtype(Precision.AUTO, cpu, text) == (torch.bfloat16 if cpu_computes_bf16() else None)
    assert autocast_dtype(Precision.AUTO, cpu, Task.CAUSAL_LM) == autocast_dtype(Precision.AUTO, cpu, text)
    assert autocast_dtype(Precision.AUTO, cpu, images) is None
    assert autocast_dtype(Precision.AUTO, cpu, Task.OBJECT_DETECTION) is None
    assert autocast_dtype(Precision.FP32, cpu, text) is None
    assert autocast_dtype(Precision.BF16, cpu, images) == torch.bfloat16


@pytest.mark.parametrize(("gpu", "bf16"), [("A100", True), ("T4", False)])
def test_auto_precision_on_a_gpu_is_bf16_where_it_computes_bf16(gpu: str, bf16: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 or V100 (compute capability 7) supports bf16 only by emulation, slower than fp32: `auto` keeps fp32.
    torch answers for the device it is asked about; here the answers of each GPU stand in for one."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    expected = torch.bfloat16 if bf16 else None
    assert autocast_dtype(Precision.AUTO, torch.device("cuda"), Task.SEQUENCE_CLASSIFICATION) == expected, gpu


def test_a_causal_lm_scores_each_position_on_the_next_token_and_never_a_padded_one() -> None:
    """Each position's logits are scored on the token after it, the last position and the padding on none: the
    loss and gradient of the logits shifted against the labels, which the trainer now gets by shifting the labels."""
    from finetune_trainer.train import loss_sum

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, IGNORE_INDEX, IGNORE_INDEX]])  # the second row padded
    loss = loss_sum(logits, labels, Task.CAUSAL_LM)
    loss.backward()
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE_INDEX]
    assert len(pairs) == 6
    expected = -sum(torch.log_softmax(logits[b, t].detach(), -1)[labels[b, t + 1]] for b, t in pairs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    scored = torch.zeros(2, 5, dtype=torch.bool)
    for b, t in pairs:
        scored[b, t] = True
    assert bool((logits.grad.abs().sum(-1) > 0).eq(scored).all())  # no gradient where nothing is predicted


@pytest.mark.parametrize("distilled", [False, True])
def test_accumulation_gives_the_gradient_of_the_whole_batch(distilled: bool) -> None:
    """Micro-batches with different token counts: the loss is normalised by the step's tokens, not averaged per batch,
    a teacher's soft targets (training.distillation) as the labels' loss."""
    teacher = Teacher(lm_setup(seed=1)[0].eval().requires_grad_(False), 2.0, 0.5) if distilled else None
    whole, accumulated = sgd_step(16, 1, teacher), sgd_step(4, 4, teacher)
    if distilled:  # the teacher moved the student otherwise than the labels alone
        assert any(not torch.allclose(value, plain) for value, plain in zip(whole.values(), sgd_step(16, 1).values()))
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_a_micro_batch_s_logits_are_gone_before_the_next_one_s_forward() -> None:
    """Under gradient accumulation the previous micro-batch's logits, the student's and the teacher's, stayed
    referenced through the next one's forward and backward: two [batch, tokens, vocabulary] tensors more at the peak."""
    model, data, collate = lm_setup()
    teacher = Teacher(lm_setup(seed=1)[0].eval().requires_grad_(False), 2.0, 0.5)
    outputs: list[weakref.ref] = []
    alive: list[int] = []
    model.register_forward_pre_hook(lambda *_: alive.append(sum(ref() is not None for ref in outputs)))
    for net in (model, teacher.model):
        net.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out.logits)))
    spec = TrainingSpec(batchSize=4, gradientAccumulation=4, maxSteps=2, precision="fp32", batching="dynamic")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_loop(model, optimizer, make_scheduler(optimizer, spec, 2), data, collate, spec, Task.CAUSAL_LM, CPU,
               teacher=teacher)
    assert len(outputs) == 2 * 8 and alive == [0] * 8


def test_a_distilled_run_makes_no_step_without_its_teacher() -> None:
    """The pipeline loads no teacher where the newest checkpoint ends the training; where that checkpoint was not
    resumed after all (a misfit, removed), the loop stops rather than train on the labels alone."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=1, distillation={"teacher": {"uri": "/models/teacher"}})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(RuntimeError, match=r"^training\.distillation: no teacher for steps 1 to 1"):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 1), data, collate, spec, Task.CAUSAL_LM, CPU)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_loss_stops_before_the_weights_change_naming_its_step_and_the_fields(precision: str) -> None:
    """A weight broken after step 2 makes step 3's loss NaN: the message names step 3, and advises fp32 only to a
    run not in fp32 already."""
    model, data, collate = lm_setup()
    weight = model.transformer.h[0].attn.c_attn.weight
    seen: dict[str, torch.Tensor] = {}

    def break_after_2(state: LoopState, total: int) -> None:
        if state.step == 2:
            with torch.no_grad():
                model.transformer.wpe.weight[0, 0] = float("nan")
            seen["before"] = weight.detach().clone()

    spec = TrainingSpec(batchSize=8, maxSteps=4, precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(LossNotFinite) as caught:
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 4), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(on_step=break_after_2))
    assert str(caught.value).startswith("the training loss is nan at step 3: lower adjust.learningRate")
    assert ("training.precision: fp32" in str(caught.value)) == (precision != "fp32")
    assert torch.equal(weight, seen["before"])


def test_an_overflowing_gradient_without_a_scaler_stops_before_the_weights_change() -> None:
    model, data, collate = lm_setup()
    weight = model.transformer.h[0].mlp.c_fc.weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    spec = TrainingSpec(batchSize=8, maxSteps=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(LossNotFinite, match="the gradient norm is inf at step 1 "):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 3), data, collate, spec, Task.CAUSAL_LM, CPU)
    assert torch.equal(weight, before)


def test_an_fp16_run_whose_gradients_never_become_finite_stops_once_its_loss_scale_is_below_1() -> None:
    """GradScaler skips each such step and halves its scale: the run skipped them all and exported untrained weights
    with exit 0. From 2**16, the 17th skip takes the scale below 1: that step stops it, the weights untouched."""
    model, data, collate = lm_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def overflow(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: g * float("inf"))

    model.lm_head.register_forward_hook(overflow)
    spec = TrainingSpec(batchSize=8, maxSteps=40, precision="fp16", warmupRatio=0, schedule="constant")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(LossNotFinite, match=r"^the gradient norm is (inf|nan) at step 17 .*loss scale halved down to "
                                            r"0\.5 .*training\.precision: bf16 or fp32$"):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 40), data, collate, spec, Task.CAUSAL_LM, CPU)
    assert_same(weights(model), before)


class Scripted:
    """An evaluation hook that reports the given losses in turn and snapshots the weights it was shown."""

    def __init__(self, model: torch.nn.Module, losses: list[float]) -> None:
        self.model, self.losses, self.seen = model, iter(losses), []

    def __call__(self, before_batch: object) -> dict[str, float]:
        self.seen.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return {"loss": next(self.losses)}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_early_stopping_restores_the_best_weights() -> None:
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=20, evalEverySteps=2, earlyStopping={"patience": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    evaluate = Scripted(model, [1.0, 0.5, 0.9, 0.8])  # best at step 4, then two evaluations without gain
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=evaluate))
    assert state.stopped_early and state.step == 8 and len(state.evals) == 4
    assert state.best_step == 4 and state.restored_best
    assert_same(weights(model), evaluate.seen[1])
    assert any(not torch.equal(evaluate.seen[1][n], evaluate.seen[3][n]) for n in evaluate.seen[1])  # it did train on


def test_a_loss_that_diverges_after_a_best_evaluation_stops_early_with_its_weights(tmp_path: Path) -> None:
    """Early stopping held the best weights (step 4's) in rank 0's memory alone: a NaN loss at step 7 raised through,
    and the job failed with them lost (a new run, with a lower rate, starts a new folder). Now training stops there as
    by patience: the best weights put back, evaluated and exported by the pipeline, the divergence said; a resumed
    attempt finds the stop in its checkpoint and trains no more."""
    model, data, collate = lm_setup()

    def break_after_6(state: LoopState, total: int) -> None:
        if state.step == 6:
            with torch.no_grad():
                model.transformer.wpe.weight[0, 0] = float("nan")

    spec = TrainingSpec(batchSize=8, maxSteps=20, evalEverySteps=2, earlyStopping={"patience": 3},
                        checkpointEverySteps=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    evaluate = Scripted(model, [1.0, 0.5, 0.9])  # best at step 4
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=evaluate, on_step=break_after_6, checkpoint_dir=tmp_path))
    assert state.stopped_early and state.step == 6 and state.best_step == 4 and state.restored_best
    assert state.diverged and state.diverged.startswith("the training loss is nan at step 7: lower adjust.learningRate")
    assert_same(weights(model), evaluate.seen[1])
    resumed, _, _ = lm_setup()
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    again = train_loop(resumed, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=Scripted(resumed, []), checkpoint_dir=tmp_path))
    assert again.stopped_early and again.step == 6 and again.diverged == state.diverged
    assert_same(weights(resumed), evaluate.seen[1])
    # Without early stopping no best weights are kept: the divergence fails the run, as before
    model, data, collate = lm_setup()
    plain = TrainingSpec(batchSize=8, maxSteps=20, evalEverySteps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(LossNotFinite, match="at step 7"):
        train_loop(model, optimizer, make_scheduler(optimizer, plain, 20), data, collate, plain, Task.CAUSAL_LM, CPU,
                   Hooks(evaluate=Scripted(model, [1.0, 0.5, 0.9]), on_step=break_after_6))


def test_a_metric_that_is_not_finite_is_never_the_best() -> None:
    """A NaN first validation loss was best for good (every comparison with NaN is False): early stopping ended the
    run two evaluations later on its weights."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=20, evalEverySteps=2, earlyStopping={"patience": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    evaluate = Scripted(model, [float("nan"), 1.0, float("inf"), 2.0])  # no gain, best, no gain twice
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=evaluate))
    assert state.stopped_early and state.step == 8 and state.best == 1.0 and state.best_step == 4
    assert_same(weights(model), evaluate.seen[1])


def test_the_cpu_clock_counts_the_steps_not_the_evaluations() -> None:
    """Both clocks cover the steps alone: an evaluation that burns CPU for 0.2 s adds to neither."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=4, evalEverySteps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    burned = []

    def busy_evaluation(before_batch: object) -> dict[str, float]:
        start = time.process_time()
        while time.process_time() - start < 0.2:
            pass
        burned.append(time.process_time() - start)
        return {"loss": 1.0}

    start = time.process_time()
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 4), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=busy_evaluation))
    whole = time.process_time() - start
    assert len(burned) == 4 and 0 < state.cpu_seconds <= whole - sum(burned)
    cpu = [e["cpu_seconds_since_train_start"] for e in state.evals]
    assert cpu == sorted(cpu) and cpu[-1] == state.cpu_seconds


def test_the_best_weights_survive_a_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run dies after the step-6 checkpoint; the resumed run still ends on step 4's weights. It reports its
    latest validation as it resumes (the gauge had none until the next evaluation, an epoch away at the default)."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    spec = TrainingSpec(batchSize=8, maxSteps=20, evalEverySteps=2, checkpointEverySteps=2,
                        earlyStopping={"patience": 2})

    def stop_at_7(state: LoopState, total: int) -> None:
        if state.step == 7:
            raise KeyboardInterrupt

    model, data, collate = lm_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = Scripted(model, [1.0, 0.5, 0.9])
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(evaluate=first, on_step=stop_at_7, checkpoint_dir=tmp_path))
    model, data, collate = lm_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reported: list[tuple[int, int]] = []
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 20), data, collate, spec, Task.CAUSAL_LM, CPU,
                       Hooks(evaluate=Scripted(model, [0.8]), checkpoint_dir=tmp_path,
                             on_eval=lambda s: reported.append((s.step, s.evals[-1]["step"]))))
    assert state.step == 8 and state.stopped_early and state.best_step == 4
    assert reported == [(6, 6), (8, 8)]
    assert f"resumed from {tmp_path / 'step-00000006'}" in caplog.text
    assert_same(weights(model), first.seen[1])


def classifier_run(checkpoint_dir: Path, stop_at: int | None = None, lora: bool = False) -> dict[str, torch.Tensor]:
    """8 steps of a tiny BERT with dropout on (so the RNG matters), checkpointing every 3 steps; with `lora`,
    adapters (with dropout) and the head train instead of the weights."""
    spec = ModelSpec(task="sequence-classification", architecture="bert", config=TINY_BERT,
                     tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    new_head(model, "classifier", 3, {}, reinitialize=True)
    if lora:
        model = add_adapters(model, LoraSpec(rank=4, dropout=0.1), ["query", "value"], "classifier")
    data = encode_text(Split(TEXTS, [i % 3 for i in range(64)]), tokenizer, 32)
    train = TrainingSpec(batchSize=8, epochs=1, checkpointEverySteps=3, keepCheckpoints=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def on_step(state, total):
        if state.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, handled between steps

    torch.manual_seed(1)
    train_loop(model, optimizer, make_scheduler(optimizer, train, 8), data,
               make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0), train,
               Task.SEQUENCE_CLASSIFICATION, CPU, Hooks(on_step=on_step, checkpoint_dir=checkpoint_dir))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_sigterm_gives_the_uninterrupted_weights(lora: bool, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint wrongly discarded would train afresh to the same weights: the log tells a resume."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    reference = classifier_run(tmp_path / "reference", lora=lora)
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 5"):
        classifier_run(tmp_path / "interrupted", stop_at=4, lora=lora)  # seen at the next step
    saved = checkpoints.complete(tmp_path / "interrupted")
    assert [p.name for p in saved] == ["step-00000003", "step-00000005"]
    (tmp_path / "interrupted" / ".tmp-step-00000007").mkdir()  # a half-written one is never read
    resumed = classifier_run(tmp_path / "interrupted", lora=lora)
    assert f"resumed from {saved[-1]}" in caplog.text
    assert any("lora_A" in n for n in resumed) == lora
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    # every 3 steps and at the end, the last two kept
    assert [p.name for p in checkpoints.complete(tmp_path / "reference")] == ["step-00000006", "step-00000008"]


def lm_run(checkpoint_dir: Path, sigterm_at: int | None = None) -> tuple[LoopState, list[int], dict]:
    """8 steps of a tiny GPT-2, evaluated every 2 steps (by a score of its weights), checkpointed only at the end
    and on SIGTERM; returns the state, the steps of the evaluations reported (a resumed run's latest first) and the
    weights."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=8, evalEverySteps=2, checkpointEverySteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps: list[int] = []

    def score(before_batch: object) -> dict[str, float]:
        return {"loss": float(model.transformer.h[0].attn.c_attn.weight.detach().sum())}

    def on_step(state: LoopState, total: int) -> None:
        if state.step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # seen at the end of the next step

    hooks = Hooks(evaluate=score, on_step=on_step, on_eval=lambda state: steps.append(state.evals[-1]["step"]),
                  checkpoint_dir=checkpoint_dir)
    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 8), data, collate, spec, Task.CAUSAL_LM,
                       CPU, hooks)
    return state, steps, weights(model)


def test_sigterm_at_a_due_evaluation_saves_first_and_the_resumed_run_evaluates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The grace period is for the checkpoint; the evaluation due at that step runs when the run resumes, so the
    resumed run ends with the weights and the evaluations of one never stopped."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    reference, reference_steps, reference_weights = lm_run(tmp_path / "reference")
    assert reference_steps == [2, 4, 6, 8]
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 4"):
        lm_run(tmp_path / "stopped", sigterm_at=3)
    assert [p.name for p in checkpoints.complete(tmp_path / "stopped")] == ["step-00000004"]
    resumed, steps, resumed_weights = lm_run(tmp_path / "stopped")
    assert f"resumed from {tmp_path / 'stopped' / 'step-00000004'}" in caplog.text
    assert steps == [2, 4, 6, 8]  # step 2's evaluation came with the checkpoint (reported as it resumes); 4's runs
    assert [(e["step"], e["metrics"]) for e in resumed.evals] == [(e["step"], e["metrics"]) for e in reference.evals]
    assert_same(resumed_weights, reference_weights)


@pytest.mark.parametrize("total, loss, stops", [(20, 2.0, True), (4, 0.5, False)], ids=["early-stop", "last-step"])
def test_a_resumed_run_s_first_evaluation_is_checkpointed_when_no_step_follows(tmp_path: Path, total: int,
                                                                              loss: float, stops: bool) -> None:
    """SIGTERM at a step due for evaluation saves it first; the resumed run evaluates there, and that evaluation stops
    early or is the last step's: no step follows, so that step's checkpoint is written again with it. Else a retry
    (of the final evaluation or the export) evaluated again, and found the training unfinished (a teacher loaded)."""
    spec = TrainingSpec(batchSize=8, maxSteps=total, evalEverySteps=2, checkpointEverySteps=100,
                        earlyStopping={"patience": 1})

    def run(losses: list[float], sigterm_at: int | None = None) -> LoopState:
        model, data, collate = lm_setup()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        hooks = Hooks(evaluate=Scripted(model, losses), checkpoint_dir=tmp_path,  # a further evaluation: StopIteration
                      on_step=lambda state, _: state.step == sigterm_at and os.kill(os.getpid(), signal.SIGTERM))
        return train_loop(model, optimizer, make_scheduler(optimizer, spec, total), data, collate, spec,
                          Task.CAUSAL_LM, CPU, hooks)

    with pytest.raises(Terminated, match="stopped by SIGTERM at step 4"):
        run([1.0], sigterm_at=3)  # seen at the end of step 4, saved before its evaluation
    resumed = run([loss])  # worse than step 2's: early stopping (patience 1); better: the best weights change
    assert resumed.step == 4 and resumed.stopped_early == stops and resumed.best_step == (2 if stops else 4)
    (newest,) = checkpoints.complete(tmp_path)
    saved = json.loads((newest / "state.json").read_text())
    assert newest.name == "step-00000004" and [e["step"] for e in saved["evals"]] == [2, 4]
    assert saved["stopped_early"] == stops and saved["best_step"] == resumed.best_step
    assert checkpoints.finished(tmp_path, total, CPU) and not [p.name for p in tmp_path.glob(".*")]
    best, trained = load_file(newest / checkpoints.BEST), load_file(newest / "trained.safetensors")
    assert all(torch.equal(best[n], trained[n]) for n in trained) != stops  # step 2's weights, or step 4's
    again = run([])  # a retry: resumed where training ended, with nothing to evaluate
    assert again.evals == resumed.evals and again.best_step == resumed.best_step


def test_a_step_written_again_is_never_lost_to_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written again for its step is moved aside until the new one is in place: a crash between the two
    renames leaves it aside, and the next attempt's run_folder puts it back; a save that completes leaves none."""
    one = {"run": 1, "worldSize": 1}
    root = checkpoints.run_folder(tmp_path, one, CPU)
    model, _, _ = lm_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(optimizer, TrainingSpec(batchSize=8, maxSteps=4), 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def save(evals: int) -> Path:
        state = {"step": 4, "evals": [{}] * evals}
        return checkpoints.save(root, 4, model, optimizer, scheduler, scaler, state, CPU, keep=2)

    def evals() -> int:
        (newest,) = checkpoints.complete(root)
        return len(json.loads((newest / "state.json").read_text())["evals"])

    save(1)
    real = os.replace

    def crash_placing_the_new_one(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # as a SIGKILL would, with the old one aside
        real(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", crash_placing_the_new_one)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    # Aside, it is still the step's checkpoint: a run of another fingerprint judges this folder by it (workers edited:
    # refused, not removed as empty), and the next attempt of this one puts it back.
    assert checkpoints.complete(root) == [root / ".old-step-00000004"] and evals() == 1
    with pytest.raises(ConfigError, match="made by 1 processes"):
        checkpoints.run_folder(tmp_path, {"run": 1, "worldSize": 2}, CPU)
    assert checkpoints.run_folder(tmp_path, one, CPU) == root and evals() == 1
    assert checkpoints.complete(root) == [root / "step-00000004"]
    assert save(2) == root / "step-00000004" and evals() == 2
    assert sorted(p.name for p in root.iterdir()) == ["fingerprint.json", "step-00000004"]


def committed(checkpoint: Path) -> None:
    """A checkpoint's folder as save leaves it: its files (stand-ins), and its marker."""
    checkpoint.mkdir(parents=True)
    for name in checkpoints.CHECKPOINT_FILES:
        (checkpoint / name).write_text(name)
    (checkpoint / checkpoints.MARKER).write_text(checkpoint.name.removeprefix(checkpoints.PREFIX))


def test_a_stale_run_folder_cut_short_in_its_removal_is_never_resumed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """run_folder removes another fingerprint's folder as `remove` does a checkpoint, renamed first: deleted in place,
    a SIGTERM or SIGKILL could leave its step's marker and fingerprint without the weights, which an attempt whose
    config is edited back resumed (failing to load on every retry)."""
    one, two = {"run": 1, "worldSize": 1}, {"run": 2, "worldSize": 1}
    root = checkpoints.run_folder(tmp_path, one, CPU)
    committed(root / "step-00000004")
    real = shutil.rmtree

    def cut_short(path: Path, ignore_errors: bool = False) -> None:  # killed once the weights are gone
        if (Path(path) / checkpoints.FINGERPRINT).exists():
            (Path(path) / "step-00000004" / "trained.safetensors").unlink()
            raise KeyboardInterrupt
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.run_folder(tmp_path, two, CPU)
    monkeypatch.undo()
    assert checkpoints.run_folder(tmp_path, one, CPU) == root and checkpoints.complete(root) == []
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # the torn one cleared


def test_checkpoints_whose_fingerprint_is_gone_are_not_resumed(tmp_path: Path) -> None:
    """What an earlier trainer's removal in place left, cut short: a step's marker without its weights, and no
    fingerprint. Kept, every attempt failed loading it, or resumed weights trained on other data."""
    one = {"run": 1, "worldSize": 1, "data": "new"}
    root = tmp_path / checkpoints.folder_name(one)
    committed(root / "step-00000004")
    (root / "step-00000004" / checkpoints.TRAINED).unlink()
    assert checkpoints.run_folder(tmp_path, one, CPU) == root and checkpoints.complete(root) == []
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
    assert [p.name for p in root.iterdir()] == [checkpoints.FINGERPRINT]


def test_a_fingerprint_an_earlier_version_wrote_is_read_with_this_runs_defaults(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Saved with its defaults and without a field added since at its default, an earlier version's fingerprint is
    this run's: its pruning choice is taken again, another world size refused, its folder taken over; and what a run
    changes reads as values."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")

    def now(pruned: list[int], world_size: int = 1, defaults: bool = False, seed: int = 0) -> dict:
        training = {"rate": 1} | ({"seed": seed} if defaults or seed else {}) | ({"added": 0} if defaults else {})
        return {"training": training, "worldSize": world_size, "prunedLayers": pruned, "data": "d"}

    earlier = checkpoints.run_folder(tmp_path, {"training": {"rate": 1, "seed": 0}, "worldSize": 1,
                                                "prunedLayers": [1], "data": "d"}, CPU)
    committed(earlier / "step-00000004")
    assert checkpoints.earlier_choice(tmp_path, now([2]), "prunedLayers", now([2], defaults=True)) == [1]
    assert "made by 1 processes; this run has 2" in (
        checkpoints.chosen_folder(tmp_path, now([1], 2), now([1], 2, defaults=True), 2)[2] or "")
    root = checkpoints.run_folder(tmp_path, now([1]), CPU, now([1], defaults=True))
    assert root == earlier  # resumed in place
    assert checkpoints.complete(root) == [root / "step-00000004"]
    assert checkpoints.read_identity(root) == now([1], defaults=True)  # saved with its defaults
    checkpoints.run_folder(tmp_path, now([1], seed=1), CPU, now([1], defaults=True, seed=1))
    assert "Changed: training.seed: 0 -> 1\n" in caplog.text  # its value, saved with the defaults


def test_a_default_a_later_version_changes_is_a_change_and_the_old_value_set_is_the_same_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fingerprint in the folder held only the values that are not defaults: a job that left a default a new
    version changes (a warmup, a schedule) resumed under it, and one that set the old default explicitly started
    afresh, told "the default -> 0.06". It holds them all, and they name the folder."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")

    def v1_run() -> Path:
        root = checkpoints.run_folder(tmp_path, {"worldSize": 1}, CPU, {"training": {"warmup": 0.06}, "worldSize": 1})
        committed(root / "step-00000004")
        return root

    root = v1_run()
    unset = checkpoints.run_folder(tmp_path, {"worldSize": 1}, CPU, {"training": {"warmup": 0.1}, "worldSize": 1})
    assert not root.exists() and checkpoints.complete(unset) == []
    assert "optimisation; training starts afresh. Changed: training.warmup: 0.06 -> 0.1" in caplog.text
    shutil.rmtree(unset)
    root = v1_run()
    explicit = {"training": {"warmup": 0.06}, "worldSize": 1}
    kept = checkpoints.run_folder(tmp_path, explicit, CPU, explicit)
    assert kept == root and checkpoints.complete(kept) == [kept / "step-00000004"]


def test_an_earlier_version_s_folder_of_healed_layers_and_scores_alone_is_this_run_s(tmp_path: Path) -> None:
    """Cut short after healing and the baseline, before its first checkpoint: an earlier version's folder, named
    otherwise, was removed as another run's, and healing (thousands of steps on a large model) and the baseline ran
    again. Of two such folders the one with checkpoints is taken."""
    earlier = {"training": {"rate": 1}, "worldSize": 1}
    scored = checkpoints.run_folder(tmp_path, earlier, CPU)
    (scored / checkpoints.HEALED).write_text("healed layers")
    sparse, full = {"worldSize": 1}, {"training": {"rate": 1, "added": 0}, "worldSize": 1}
    assert checkpoints.run_folder(tmp_path, sparse, CPU, full) == scored and (scored / checkpoints.HEALED).exists()
    other = tmp_path / "0123456789ab"
    shutil.copytree(scored, other)
    committed(other / "step-00000002")
    assert checkpoints.run_folder(tmp_path, sparse, CPU, full) == other and not scored.exists()


def test_a_fingerprint_that_cannot_be_read_now_is_retried_and_an_empty_one_trusts_the_folder_s_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient read error (an NFS ESTALE) read as no fingerprint: the run's checkpoints were removed as what a
    removal cut short left. And an empty one, which an earlier trainer writing it in place left, had them removed
    too, though the folder's name says the run."""
    one = {"run": 1, "worldSize": 1}
    root = checkpoints.run_folder(tmp_path, one, CPU)
    committed(root / "step-00000004")
    real = Path.read_text

    def stale(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == checkpoints.FINGERPRINT:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", stale)
    with pytest.raises(OSError, match="Stale file handle"):
        checkpoints.run_folder(tmp_path, one, CPU)
    monkeypatch.undo()
    assert checkpoints.complete(root) == [root / "step-00000004"]
    (root / checkpoints.FINGERPRINT).write_text("")
    assert checkpoints.run_folder(tmp_path, one, CPU) == root
    assert checkpoints.complete(root) == [root / "step-00000004"]


def test_what_a_removal_cut_short_leaves_is_never_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's marker without its weights (an earlier trainer deleting in place), healed layers without a
    fingerprint, and a removal in place (its rename refused) cut short: none is resumed or reused."""
    one = {"run": 1, "worldSize": 1}
    root = checkpoints.run_folder(tmp_path, one, CPU)
    committed(root / "step-00000004")
    (root / "step-00000004" / checkpoints.TRAINED).unlink()
    assert checkpoints.complete(root) == []
    (root / checkpoints.FINGERPRINT).unlink()
    (root / checkpoints.HEALED).write_text("layers of another run")
    assert checkpoints.run_folder(tmp_path, one, CPU) == root and not (root / checkpoints.HEALED).exists()
    committed(root / "step-00000008")
    monkeypatch.setattr(checkpoints.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("busy")))
    real = shutil.rmtree

    def cut_short(path: Path, ignore_errors: bool = False) -> None:
        if Path(path) == root:
            raise KeyboardInterrupt
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.remove(root)
    monkeypatch.undo()
    assert checkpoints.complete(root) == [] and not (root / checkpoints.FINGERPRINT).exists()


def test_sigterm_in_the_last_step_stops_after_its_checkpoint(tmp_path: Path) -> None:
    """The loop ends after its last step, but the SIGTERM that came during it still stops the run: the pod is going
    away, so it must not go on into the final evaluation and export (the kubelet would kill it there)."""
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 8"):
        lm_run(tmp_path / "stopped", sigterm_at=8)  # after the last step began: its evaluation still runs
    assert [p.name for p in checkpoints.complete(tmp_path / "stopped")] == ["step-00000008"]


def test_a_sigterm_after_the_loop_s_last_look_goes_to_the_handler_outside() -> None:
    """One that comes between the loop's last check and the end of training is not lost in a flag nobody reads: the
    pipeline's own handler gets it (a lost one ran on until the kubelet's SIGKILL, with no termination message)."""
    seen: list[str] = []
    outside = signal.signal(signal.SIGTERM, lambda *_: seen.append("outside"))
    try:
        with SigtermFlag() as flag:
            signal.raise_signal(signal.SIGTERM)
            assert flag.raised and not seen
        assert seen == ["outside"]
        with pytest.raises(Terminated), SigtermFlag():  # one the loop answered is not passed on
            signal.raise_signal(signal.SIGTERM)
            raise Terminated("stopped by SIGTERM at step 1")
        assert seen == ["outside"]
    finally:
        signal.signal(signal.SIGTERM, outside)


def test_sigterm_during_a_step_saves_right_after_it(tmp_path: Path) -> None:
    """The step under way when SIGTERM comes is the last: its checkpoint is written right after it, as the log
    says, not after one more step that the grace period may not hold."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=8, checkpointEverySteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    done: list[int] = []

    def in_forward(*_: object) -> None:
        if len(done) == 3:  # step 4's forward
            os.kill(os.getpid(), signal.SIGTERM)

    model.transformer.h[0].register_forward_hook(in_forward)
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 4"):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 8), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(on_step=lambda state, total: done.append(state.step), checkpoint_dir=tmp_path))
    assert done == [1, 2, 3, 4] and [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000004"]


@pytest.mark.parametrize("during", ["checkpoint", "evaluation"])
def test_sigterm_during_a_checkpoint_or_an_evaluation_stops_right_after_it(
        during: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One that comes while step 2's checkpoint is written, or after its evaluation's last look: the run went on to
    step 3 and wrote its checkpoint too, which the grace period may not hold. It stops at step 2, which is saved."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=8, checkpointEverySteps=2 if during == "checkpoint" else 100,
                        evalEverySteps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    written: list[int] = []
    save = checkpoints.save

    def sigterm_in_save(root: Path, step: int, *args: Any) -> None:
        written.append(step)
        if during == "checkpoint":
            os.kill(os.getpid(), signal.SIGTERM)
        save(root, step, *args)

    def sigterm_in_evaluation(before_batch: Callable[[], None]) -> dict[str, float]:
        before_batch()
        if during == "evaluation":
            os.kill(os.getpid(), signal.SIGTERM)  # after its last batch began
        return {"loss": 1.0}

    monkeypatch.setattr(checkpoints, "save", sigterm_in_save)
    done: list[int] = []
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 2"):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 8), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(evaluate=sigterm_in_evaluation, on_step=lambda state, total: done.append(state.step),
                         checkpoint_dir=tmp_path))
    assert done == [1, 2] and written == [2]
    (newest,) = checkpoints.complete(tmp_path)
    assert [e["step"] for e in json.loads((newest / "state.json").read_text())["evals"]] == [2]


def test_a_sigterm_as_the_loop_asks_whether_one_came_before_it_is_kept(tmp_path: Path) -> None:
    """The loop's flag is up when it asks the pipeline about a SIGTERM before it: one that came just then was set by
    the flag's handler, and the pipeline's answer (none) overwrote it, so the run trained on until the SIGKILL."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=8, checkpointEverySteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def none_before() -> bool:
        os.kill(os.getpid(), signal.SIGTERM)  # taken by the loop's flag, which is up
        return False

    with pytest.raises(Terminated, match="stopped by SIGTERM at step 1"):
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 8), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(checkpoint_dir=tmp_path, sigterm_before=none_before))
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000001"]


def validated_run(checkpoint_dir: Path, sigterm_at: int | None = None,
                  forwards: list[int] | None = None) -> tuple[LoopState, dict]:
    """8 steps of a tiny GPT-2 validated every 2 steps by the real evaluation (16 batches of 4); no evaluation after
    the first gains minDelta 100, so early stopping ends it at step 6 on step 2's weights. SIGTERM comes in the
    evaluation's forward pass number `sigterm_at` (counted over the run, from 1), and `forwards` gets them all."""
    model, data, collate = lm_setup()
    spec = TrainingSpec(batchSize=8, maxSteps=8, evalEverySteps=2, checkpointEverySteps=100,
                        earlyStopping={"patience": 2, "minDelta": 100})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forwards = [] if forwards is None else forwards

    def in_evaluation(module: torch.nn.Module, *_: object) -> None:
        if not module.training:
            forwards.append(len(forwards) + 1)
            if len(forwards) == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

    model.register_forward_hook(in_evaluation)

    def validate(before_batch: Callable[[], None]) -> dict[str, float]:
        return evaluate(model, data, collate, Task.CAUSAL_LM, [Metric.LOSS], 4, CPU, 0, before_batch=before_batch)

    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 8), data, collate, spec, Task.CAUSAL_LM,
                       CPU, Hooks(evaluate=validate, checkpoint_dir=checkpoint_dir))
    return state, weights(model)


def test_sigterm_during_an_evaluation_stops_it_at_the_next_batch_and_the_resumed_run_evaluates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An evaluation of a large validation split may outlast the grace period: SIGTERM stops it at its next batch and
    the checkpoint is written as if SIGTERM had come before it; the resumed run evaluates, and early stopping and
    the best weights end as in a run never stopped."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    reference, reference_weights = validated_run(tmp_path / "reference")
    assert [e["step"] for e in reference.evals] == [2, 4, 6] and reference.stopped_early
    assert reference.best_step == 2 and reference.restored_best
    forwards: list[int] = []
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 4; a checkpoint holds it"):
        validated_run(tmp_path / "stopped", sigterm_at=16 + 3, forwards=forwards)  # in step 4's third batch
    assert len(forwards) == 16 + 3  # not one batch more
    (saved,) = checkpoints.complete(tmp_path / "stopped")
    assert saved.name == "step-00000004" and [e["step"] for e in json.loads((saved / "state.json").read_text())[
        "evals"]] == [2]
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 4"):  # in the resumed run's first evaluation
        validated_run(tmp_path / "stopped", sigterm_at=2)
    assert checkpoints.complete(tmp_path / "stopped") == [saved]
    caplog.clear()
    resumed, resumed_weights = validated_run(tmp_path / "stopped")
    assert f"resumed from {saved}" in caplog.text
    assert [(e["step"], e["metrics"]) for e in resumed.evals] == [(e["step"], e["metrics"]) for e in reference.evals]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]
    assert resumed.stopped_early and resumed.step == 6 and resumed.best_step == 2 and resumed.restored_best
    assert_same(resumed_weights, reference_weights)


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The GradScaler's scale is in the checkpoint: a resumed fp16 run skips the steps the uninterrupted one skips,
    and no others (restarting at 2**16 it skipped them all again), and ends with its weights."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    def fp16_run(checkpoint_dir: Path, sigterm_at: int | None = None) -> tuple[list[int], dict]:
        model, data, collate = lm_setup()
        def amplify(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:  # large gradients: the scale must come down from 2**16, step by step
                out.register_hook(lambda g: g * 20)

        model.lm_head.register_forward_hook(amplify)
        spec = TrainingSpec(batchSize=8, maxSteps=12, checkpointEverySteps=100, precision="fp16", warmupRatio=0,
                            schedule="constant", batching="dynamic")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        hooks = Hooks(on_step=lambda state, total: state.step == sigterm_at and os.kill(os.getpid(), signal.SIGTERM),
                      checkpoint_dir=checkpoint_dir)
        state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 12), data, collate, spec,
                           Task.CAUSAL_LM, CPU, hooks)
        return [h["step"] for h in state.history if not h["grad_norm"] < float("inf")], weights(model)

    skipped, reference = fp16_run(tmp_path / "reference")
    assert 1 in skipped and 12 not in skipped  # the scale came down, and steps were taken after it did
    with pytest.raises(Terminated):
        fp16_run(tmp_path / "stopped", sigterm_at=6)
    resumed_skipped, resumed = fp16_run(tmp_path / "stopped")
    assert f"resumed from {tmp_path / 'stopped' / 'step-00000007'}" in caplog.text and resumed_skipped == skipped
    assert_same(resumed, reference)


def test_a_checkpoint_from_before_padded_tokens_resumes_with_its_tokens_in_their_place(tmp_path: Path) -> None:
    """A checkpoint saved before LoopState counted padded tokens: the resumed run's MFU, from the run's padded tokens
    over its seconds at the resume's report, read 0, the padded count starting again under all the earlier seconds."""
    def run(sigterm_at: int | None = None) -> list[LoopState]:
        model, data, collate = lm_setup()
        spec = TrainingSpec(batchSize=8, maxSteps=6, checkpointEverySteps=100, warmupRatio=0, schedule="constant")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        seen: list[LoopState] = []
        def on_step(state: LoopState, total: int) -> None:
            seen.append(replace(state))
            if state.step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
        train_loop(model, optimizer, make_scheduler(optimizer, spec, 6), data, collate, spec, Task.CAUSAL_LM, CPU,
                   Hooks(on_step=on_step, checkpoint_dir=tmp_path))
        return seen

    with pytest.raises(Terminated):
        run(sigterm_at=3)
    state_file = next(tmp_path.glob("step-*/state.json"))
    saved = json.loads(state_file.read_text())
    assert saved["padded_tokens"] >= saved["tokens"] > 0
    state_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "padded_tokens"}))
    resumed = run()
    assert resumed[0].step == saved["step"] and resumed[0].padded_tokens == saved["tokens"]
    assert resumed[-1].padded_tokens > saved["tokens"]


def test_a_checkpoint_a_newer_trainer_wrote_resumes_without_the_state_it_adds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a rollback, a state.json with a field this LoopState lacks raised a TypeError (exit 2), every retry."""
    def run(sigterm_at: int | None = None) -> LoopState:
        model, data, collate = lm_setup()
        spec = TrainingSpec(batchSize=8, maxSteps=4, checkpointEverySteps=100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        hooks = Hooks(checkpoint_dir=tmp_path,
                      on_step=lambda state, _: state.step == sigterm_at and os.kill(os.getpid(), signal.SIGTERM))
        return train_loop(model, optimizer, make_scheduler(optimizer, spec, 4), data, collate, spec, Task.CAUSAL_LM,
                          CPU, hooks)

    with pytest.raises(Terminated):
        run(sigterm_at=1)
    state_file = next(tmp_path.glob("step-*/state.json"))
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"tokens_a_newer_trainer_counts": 1}))
    resumed = run()
    assert resumed.step == 4 and len(resumed.history) == 4  # the two steps saved, and two more
    assert "holds tokens_a_newer_trainer_counts, which this trainer does not know" in caplog.text


def test_sigterm_after_training_resumes_without_training_again(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    tiny_cfg.training.checkpoint_every_steps = 100  # 8 steps: only the checkpoint at the end of training
    out = tmp_path / "out"

    def sigterm(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "export_model", sigterm)
    with pytest.raises(Terminated, match="in stage Exporting; the trained weights are in a checkpoint"):
        pipeline.run(tiny_cfg, out)
    (saved,) = (out / "checkpoints").iterdir()
    assert [p.name for p in checkpoints.complete(saved)] == ["step-00000008"]
    monkeypatch.undo()
    monkeypatch.setenv(TERMINATION_ENV, str(message := tmp_path / "termination-log"))
    report = pipeline.run(tiny_cfg, out)
    assert f"resumed from {saved / 'step-00000008'}" in caplog.text
    assert report["training"]["steps"] == 8 and (out / "model.safetensors").exists()
    # No step is made after the resume, and the attempt still reports where training is (metrics and message).
    assert json.loads(message.read_text())["progress"]["step"] == 8


class _SigtermInADel:
    """Sends SIGTERM while Python runs its __del__: the handler's Terminated raised there is printed and dropped."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped Terminated, printed
@pytest.mark.parametrize(("where", "stopped"), [
    ("evaluate", "stopped by SIGTERM in stage Baseline$"),  # the first evaluation, the baseline's
    ("make_optimizer", "stopped by SIGTERM at step 1; a checkpoint holds it"),  # before the loop's own flag
    ("export_model", "stopped by SIGTERM in stage Exporting; the trained weights are in a checkpoint"),
])
def test_a_sigterm_whose_terminated_python_dropped_still_stops_the_run(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, where: str,
                                                                       stopped: str) -> None:
    """The kubelet sends one SIGTERM. Landing in a __del__ (a data loader's, a file's), its Terminated was lost and
    SIGTERM was ignored from then on: the run went on, deaf, until the SIGKILL, with no checkpoint of its steps and
    no termination message. It now stops at an evaluation's next batch, the loop's next step or before it says
    Succeeded."""
    module = export if where == "export_model" else pipeline
    real = getattr(module, where)

    def dropped_then_real(*args: object, **kwargs: object) -> object:
        _SigtermInADel()  # collected at once, and the exception raised in its __del__ goes nowhere
        return real(*args, **kwargs)

    monkeypatch.setattr(module, where, dropped_then_real)
    monkeypatch.setenv(TERMINATION_ENV, str(message := tmp_path / "termination-log"))
    found = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match=stopped):
        pipeline.run(tiny_cfg, tmp_path / "out")
    assert json.loads(message.read_text())["exitCode"] == 143
    assert signal.getsignal(signal.SIGTERM) is found  # the run put back what it found
    if where == "evaluate":  # stopped within it, at its next batch: no baseline was kept
        assert not list((tmp_path / "out" / "checkpoints").glob(f"*/{checkpoints.BASELINE}"))


def test_an_error_a_library_made_of_a_sigterm_is_reported_as_the_sigterm(tiny_cfg: TrainerConfig, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers catches Exception while it loads, and raises OSError("Can't load tokenizer ...") of whatever
    came: a pod stopped in that moment said InvalidModel, exit 1, and its job failed for good."""
    real = pipeline.make_optimizer

    def loading(*args: object, **kwargs: object) -> object:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        except Exception as exc:  # as the library does
            raise OSError("Can't load tokenizer for 'x'") from exc

    monkeypatch.setattr(pipeline, "make_optimizer", loading)
    monkeypatch.setenv(TERMINATION_ENV, str(message := tmp_path / "termination-log"))
    with pytest.raises(Terminated, match="stopped by SIGTERM in stage Training$"):
        pipeline.run(tiny_cfg, tmp_path / "out")
    said = json.loads(message.read_text())
    assert (said["exitCode"], said["reason"]) == (143, "Terminated")


def test_restore_refuses_tensors_that_do_not_fit() -> None:
    model, _, _ = lm_setup()
    saved = checkpoints.trained_tensors(model)
    del saved["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointMismatch, match=r"it lacks \['transformer.h.1.mlp.c_fc.weight'\]"):
        checkpoints.restore(model, saved, "step-8")


def test_restore_refuses_tensors_of_other_shapes() -> None:
    """A checkpoint of the same names and other shapes (its dataset had another label count, at the same URI):
    the user's to resolve, never retried; a shape that broadcasts is no fit either."""
    model, _, _ = lm_setup()
    saved = checkpoints.trained_tensors(model)
    saved["transformer.h.0.ln_1.bias"] = saved["transformer.h.0.ln_1.bias"][:16]
    with pytest.raises(CheckpointMismatch, match=r"transformer.h.0.ln_1.bias: \[16\] saved, \[32\] in the model"):
        checkpoints.restore(model, saved, "step-8")
    saved = checkpoints.trained_tensors(model)
    saved["transformer.h.0.ln_1.bias"] = saved["transformer.h.0.ln_1.bias"][:1]
    with pytest.raises(CheckpointMismatch, match=r"\[1\] saved, \[32\] in the model"):
        checkpoints.restore(model, saved, "step-8")


def two_checkpoints(root: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """Checkpoints of steps 2 and 4 in `root`, and what `checkpoints.load` restores them into. A step is made first,
    so that the optimizer file holds tensors (its moments), each a record of its own in the zip."""
    model, _, _ = lm_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler, scaler = make_scheduler(optimizer, TrainingSpec(), 10), torch.amp.GradScaler("cpu", enabled=False)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    for step in (2, 4):
        checkpoints.save(root, step, model, optimizer, scheduler, scaler, {"step": step}, CPU, keep=2)
    return model, optimizer, scheduler, scaler


def test_a_checkpoint_runs_no_pickled_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A committed checkpoint whose pickle weights_only refuses (code: tampered with, or damaged into it) is never
    run: set aside as one that cannot be read, naming why, and the one before it resumed (raised, every retry failed
    on it)."""
    model, optimizer, scheduler, scaler = two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"optimizer": Payload()}, tmp_path / "step-00000004" / "optimizer.pt")
    state, _ = checkpoints.load(tmp_path, model, optimizer, scheduler, scaler, CPU)
    assert not marker.exists()
    assert state["step"] == 2 and (tmp_path / ".unreadable-step-00000004" / "optimizer.pt").exists()
    assert f"cannot read {tmp_path / 'step-00000004'}: Weights only load failed" in caplog.text
    assert "Unsupported global" in caplog.text


def pickle_start(path: Path) -> int:
    """Where a torch.save file's data.pkl starts: stored uncompressed, after its zip local header (30 bytes, then its
    name and its extra field, whose lengths are the header's last four bytes)."""
    with zipfile.ZipFile(path) as archive:
        header = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl")).header_offset
    with path.open("rb") as f:
        f.seek(header + 26)
        name, extra = struct.unpack("<HH", f.read(4))
    return header + 30 + name + extra


def flip_byte(path: Path, offset: int) -> Path:
    """Flip one bit of the byte at `offset`, as a volume's fault does: torch checks no CRC, so the zip still opens."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(raw)
    return path


def flip_an_opcode(path: Path) -> Path:
    """The pickle's third byte, `}` (EMPTY_DICT, after PROTO 2), becomes `|`: an opcode weights_only does not know."""
    return flip_byte(path, pickle_start(path) + 2)


def flip_a_key(key: bytes) -> Callable[[Path], Path]:
    """A damage that flips `key`'s second byte where the pickle first has it ("optimizer" becomes "oqtimizer"): the
    pickle decodes, to states without what is restored."""
    return lambda path: flip_byte(path, path.read_bytes().index(key, pickle_start(path)) + 1)


def shorten_a_tensor(path: Path) -> Path:
    """One tensor's record four bytes short, the zip whole: torch's "record size ... does not match"."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    shortened = next(name for name, data in records if "/data/" in name and len(data) > 4)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, data[:-4] if name == shortened else data)
    return path


def restored(file: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `file` holds as load did before it tried the states in its guarded read (on a copy of the
    optimizer): what a damaged one raised on every retry."""
    saved = torch.load(file, weights_only=True)
    if file.name == checkpoints.OPTIMIZER:
        copy.copy(optimizer).load_state_dict(saved["optimizer"])
    else:
        checkpoints.set_rng_state(saved)


@pytest.mark.parametrize(("file", "damage", "raised"), [
    ("optimizer.pt", flip_an_opcode, pickle.UnpicklingError),
    ("optimizer.pt", flip_a_key(b"optimizer"), KeyError),
    ("optimizer.pt", flip_a_key(b"step"), KeyError),  # a parameter's: AdamW's load_state_dict looks it up
    ("optimizer.pt", shorten_a_tensor, RuntimeError),
    ("rng-0.pt", flip_an_opcode, pickle.UnpicklingError),
    ("rng-0.pt", flip_a_key(b"python"), KeyError),
], ids=["optimizer-opcode", "optimizer-key", "optimizer-state-key", "optimizer-record", "rng-opcode", "rng-key"])
def test_a_committed_checkpoint_damaged_on_the_volume_gives_way_to_the_one_before_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, file: str, damage: Callable[[Path], Path],
        raised: type[Exception]) -> None:
    """A byte flipped in a committed checkpoint's pickle, or a tensor's record cut short, the zip still opening: torch
    raises what the damage decodes to (UnpicklingError, KeyError, a RuntimeError of no "PytorchStreamReader"), or the
    pickle decodes to states without what is restored. Raised, it failed every retry (exit 2) and the checkpoint was
    never set aside; it is now, with a warning, and the one before it resumed."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    model, optimizer, scheduler, scaler = two_checkpoints(tmp_path)
    damaged = damage(tmp_path / "step-00000004" / file)
    with pytest.raises(raised):  # the damage is what the case says
        restored(damaged, optimizer)
    state, _ = checkpoints.load(tmp_path, model, optimizer, scheduler, scaler, CPU)
    assert state["step"] == 2 and (tmp_path / ".unreadable-step-00000004" / file).exists()
    assert f"cannot read {tmp_path / 'step-00000004'}: " in caplog.text
    assert f"not resuming {tmp_path / 'step-00000004'}, which cannot be read" in caplog.text
    assert f"resumed from {tmp_path / 'step-00000002'}" in caplog.text


def test_a_reader_that_fails_alike_on_two_checkpoints_sets_none_aside(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault of the reader (a library upgraded under the trainer, a bug of ours) raises the same in every
    checkpoint: each was set aside in turn, and `set_aside` keeps one at most, so every checkpoint but the newest was
    deleted and the run restarted from step 0. Two failing alike are taken for the reader's fault: raised (retried),
    all kept."""
    model, optimizer, scheduler, scaler = two_checkpoints(tmp_path)

    def broken(*_: object) -> None:
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(checkpoints, "takes", broken)
    with pytest.raises(RuntimeError, match=r"step-00000002 cannot be read, as the checkpoint after it could not, with "
                                           r"the same error \(TypeError: 'NoneType' object is not subscriptable\)"):
        checkpoints.load(tmp_path, model, optimizer, scheduler, scaler, CPU)
    assert not list(tmp_path.glob(".unreadable-*"))
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000002", "step-00000004"]


def test_a_models_weights_file_damaged_as_a_checkpoint_can_be_is_the_users(tmp_path: Path) -> None:
    """model.uri's torch weights with a tensor's record cut short, the zip whole (torch's "record size ... does not
    match"): exit 2, retried on a file that will never read, where a file cut short was the user's to replace
    (read_state_dict refuses what checkpoints.load sets aside as damaged)."""
    from finetune_trainer.errors import EXIT_USER_ERROR, ModelError, exit_code_of
    from finetune_trainer.models import read_state_dict

    torch.save({"weight": torch.ones(8, 8), "bias": torch.zeros(8)}, tmp_path / "model.pt")
    with pytest.raises(ModelError, match=r"model.pt: not a torch weights file ") as refused:
        read_state_dict(shorten_a_tensor(tmp_path / "model.pt"))
    assert exit_code_of(refused.value) == EXIT_USER_ERROR


def caused_by(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("fault", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12 "
                 "(Cannot allocate memory)"),
    OSError(errno.EIO, os.strerror(errno.EIO), "optimizer.pt"),
    RuntimeError("Error while deserializing header: I/O error (os error 5)"),  # safetensors' EIO
    caused_by(KeyError("a library's"), Terminated("stopped by SIGTERM")),
], ids=["cuda-oom", "cuda-error", "host-oom", "eio", "safetensors-eio", "sigterm"])
def test_a_checkpoint_whose_read_the_node_or_the_volume_failed_is_kept_and_the_error_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception) -> None:
    """Not a damaged checkpoint: the read is retried by a new attempt, the checkpoint kept."""
    model, optimizer, scheduler, scaler = two_checkpoints(tmp_path)

    def failing(*_: object, **__: object) -> None:
        raise fault

    monkeypatch.setattr(checkpoints, "load_file", failing)
    with pytest.raises(type(fault)):
        checkpoints.load(tmp_path, model, optimizer, scheduler, scaler, CPU)
    assert not list(tmp_path.glob(".unreadable-*"))
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000002", "step-00000004"]


def test_a_checkpoint_whose_file_went_after_it_was_listed_gives_way_to_the_one_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file gone from rank 0's own view of a checkpoint it listed is a torn checkpoint, set aside, not a view of
    another rank's that lags, which fails the attempt: on one process every retry failed on it (exit 2)."""
    model, optimizer, scheduler, scaler = two_checkpoints(tmp_path)
    listed = checkpoints.listed

    def listed_then_gone(root: Path, world: World) -> list[Path]:
        found = listed(root, world)
        (found[-1] / checkpoints.TRAINED).unlink()
        return found

    monkeypatch.setattr(checkpoints, "listed", listed_then_gone)
    state, _ = checkpoints.load(tmp_path, model, optimizer, scheduler, scaler, CPU)
    assert state["step"] == 2 and (tmp_path / ".unreadable-step-00000004").is_dir()


def test_a_committed_checkpoint_that_cannot_be_read_gives_way_to_the_one_before_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The newest checkpoint's optimizer.pt cut short after its marker: every retry failed on it, though
    keepCheckpoints kept the one before. That one is resumed, and the run ends as one never interrupted."""
    caplog.set_level(logging.INFO, logger="finetune_trainer")

    def run() -> tuple[LoopState, dict[str, torch.Tensor]]:
        model, data, collate = lm_setup()
        spec = TrainingSpec(batchSize=8, maxSteps=4, checkpointEverySteps=2, keepCheckpoints=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 4), data, collate, spec,
                           Task.CAUSAL_LM, CPU, Hooks(checkpoint_dir=tmp_path))
        return state, weights(model)

    reference, reference_weights = run()
    optimizer_file = tmp_path / "step-00000004" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:1000])
    resumed, resumed_weights = run()
    assert f"not resuming {tmp_path / 'step-00000004'}, which cannot be read" in caplog.text
    assert (tmp_path / ".unreadable-step-00000004" / "trained.safetensors").exists()  # its weights kept
    assert f"resumed from {tmp_path / 'step-00000002'}" in caplog.text
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]
    assert_same(resumed_weights, reference_weights)
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000002", "step-00000004"]
    assert torch.load(optimizer_file, weights_only=True)  # written again whole
    # A torn state.json is no finished run (pipeline asks before the loop: every retry failed on it, exit 2), and
    # one checkpoint set aside is kept at most (the volume was sized for keepCheckpoints).
    state_file = tmp_path / "step-00000004" / "state.json"
    state_file.write_text(state_file.read_text()[:20])
    assert not checkpoints.finished(tmp_path, 4, CPU)
    run()
    assert sorted(p.name for p in tmp_path.glob(".unreadable-*")) == [".unreadable-step-00000004"]
    assert json.loads(state_file.read_text())["step"] == 4
    # Both torn: the newest set aside is the one kept (load sets them aside newest first), the other removed, as said
    for step in ("step-00000004", "step-00000002"):
        (tmp_path / step / "state.json").write_text("{")
    caplog.clear()
    run()
    assert sorted(p.name for p in tmp_path.glob(".unreadable-*")) == [".unreadable-step-00000004"]
    assert f"not resuming {tmp_path / 'step-00000002'}, which cannot be read (the log of the rank that could not " \
        "says why): removed (a later one is set aside already" in caplog.text


def test_a_checkpoint_removal_cut_short_leaves_nothing_a_resume_trusts(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted in place, a rotation cut short (SIGTERM, SIGKILL) could leave a folder with its COMMITTED marker and
    without its weights: still listed as complete, and every later attempt failed loading it."""
    model, _, _ = lm_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(optimizer, TrainingSpec(), 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first = checkpoints.save(tmp_path, 1, model, optimizer, scheduler, scaler, {"step": 1}, CPU, keep=1)
    real = shutil.rmtree

    def cut_short(path: Path, ignore_errors: bool = False) -> None:
        if Path(path).name.endswith("00000001") and (Path(path) / "trained.safetensors").exists():
            (Path(path) / "trained.safetensors").unlink()
            raise Terminated("stopped by SIGTERM")
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", cut_short)
    with pytest.raises(Terminated):  # rotating step 1 out after step 2 is written
        checkpoints.save(tmp_path, 2, model, optimizer, scheduler, scaler, {"step": 2}, CPU, keep=1)
    monkeypatch.undo()
    assert checkpoints.complete(tmp_path) == [tmp_path / "step-00000002"] and not first.exists()
    again = checkpoints.save(tmp_path, 1, model, optimizer, scheduler, scaler, {"step": 1}, CPU, keep=2)
    assert checkpoints.complete(tmp_path) == [again, tmp_path / "step-00000002"]  # its torn folder was cleared


def test_the_best_weights_bring_their_batchnorm_statistics(pvc_root: Path) -> None:
    """Early stopping on a ResNet: the running statistics of the best evaluation come back with its weights."""
    from finetune_trainer.batches import encode_images
    from finetune_trainer.config import DatasetSpec
    from finetune_trainer.data import load_dataset

    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=160), Task.IMAGE_CLASSIFICATION, 0)
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    new_head(model, "net.fc", 10, data.id2label, reinitialize=False)
    spec = TrainingSpec(batchSize=16, maxSteps=10, evalEverySteps=2, earlyStopping={"patience": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    statistics: list[dict[str, torch.Tensor]] = []
    losses = iter([1.0, 0.5, 0.9, 0.8])

    def evaluate(before_batch: object) -> dict[str, float]:
        statistics.append({n: b.clone() for n, b in model.named_buffers()})
        return {"loss": next(losses)}

    state = train_loop(model, optimizer, make_scheduler(optimizer, spec, 10), encode_images(data.train),
                       make_collate(Task.IMAGE_CLASSIFICATION, 0, 16), spec, Task.IMAGE_CLASSIFICATION, CPU,
                       Hooks(evaluate=evaluate))
    assert state.restored_best and state.best_step == 4
    best, last = statistics[1], statistics[3]
    assert not torch.equal(best["net.bn1.running_mean"], last["net.bn1.running_mean"])
    for name, value in model.named_buffers():
        assert torch.equal(value, best[name]), name


TINY_BASES = {"roberta": TINY_BERT | {"max_position_embeddings": 66, "pad_token_id": 0},
              "electra": TINY_BERT | {"embedding_size": 16},
              "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
              "bert": TINY_BERT}


@pytest.mark.parametrize(("architecture", "outputs"), [("roberta", 2), ("electra", 3)])
def test_a_classifier_checkpoints_head_module_trains_as_its_head(architecture: str, outputs: int, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """RoBERTa's and ELECTRA's head is a module of its own (classifier: dense + out_proj, a *ClassificationHead).
    From a checkpoint that already is a classifier, only out_proj counted as the head: all-but-head froze
    classifier.dense, LoRA put an adapter on it, and it took the top layer's learning rate, not headLearningRate.
    Whether its out_proj is replaced (2 outputs for the data's 3 labels) or kept, the whole classifier is the head;
    the adapters kept apart load as the card says, with the whole classifier saved beside them."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, uri="pvc://models/all-MiniLM-L6-v2"))
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), num_labels=outputs,
                                  **TINY_BASES[architecture])
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "classifier")
    head_size = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "classifier", num_labels=3, ignore_mismatched_sizes=True).classifier.parameters())

    def run(name: str, adjust: dict, rearrange: dict) -> Path:
        caplog.clear()
        doc = tiny_classifier_doc(tmp_path / name)
        doc["model"] = {"task": "sequence-classification", "uri": str(tmp_path / "classifier"),
                        "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
        doc["dataset"] |= {"maxTrainSamples": 32, "maxEvalSamples": 16}
        doc["evaluation"] = {"baseline": False}
        doc["adjust"] |= {"headLearningRate": 0.01} | adjust
        doc["rearrange"] = rearrange
        with caplog.at_level(logging.INFO, logger="finetune_trainer.adjust"):
            pipeline.run(TrainerConfig.model_validate(doc), tmp_path / name)
        return tmp_path / name

    def at_head_rate() -> int:  # the parameters of the param groups at headLearningRate, as logged
        return sum(int(m.split(" tensors, ")[1].split(" parameters")[0].replace(",", "")) for r in caplog.records
                   if (m := r.getMessage()).startswith("param group lr=0.01 "))

    probe = run("probe", {"freeze": {"strategy": "all-but-head"}}, {})
    assert json.loads((probe / "report.json").read_text())["parameters"]["trainable"] == head_size
    assert at_head_rate() == head_size
    apart = run("apart", {}, {"lora": {"rank": 2}, "mergeOnExport": False})
    assert at_head_rate() == head_size
    adapter = json.loads((apart / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]
    assert not any(m.startswith("classifier") for m in adapter["target_modules"])
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        reloaded = card_model((apart / "README.md").read_text(), apart).eval()
        assert reloaded(**batch).logits.shape == (4, 3)


@pytest.mark.parametrize(("architecture", "head"), [
    ("roberta", {"classifier.dense", "classifier.out_proj"}),
    ("distilbert", {"pre_classifier", "classifier"}),
    ("bert", {"classifier"}),  # MiniLM's: its pooler is the checkpoint's, so it keeps adapters
])
def test_the_task_head_a_base_checkpoint_lacks_trains_whole(architecture: str, head: set[str], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A base (AutoModel's) checkpoint lacks all of the classification head, which transformers initialises at random:
    RoBERTa's classifier.dense beside its out_proj, DistilBERT's pre_classifier. Only the last Linear trained whole,
    so a linear probe (all-but-head) ran on a random projection, and LoRA put a low-rank change on it."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, uri="pvc://models/all-MiniLM-L6-v2"))
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), **TINY_BASES[architecture])
    AutoModel.from_config(config).save_pretrained(tmp_path / "base")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    head_size = sum(p.numel() for m in head for p in classifier.get_submodule(m).parameters())

    def run(name: str, adjust: dict, rearrange: dict) -> Path:
        doc = tiny_classifier_doc(tmp_path / name)
        doc["model"] = {"task": "sequence-classification", "uri": str(tmp_path / "base"),
                        "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
        doc["dataset"] |= {"maxTrainSamples": 32, "maxEvalSamples": 16}
        doc["evaluation"] = {"baseline": False}
        doc["adjust"] |= adjust
        doc["rearrange"] = rearrange
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / name)
        return tmp_path / name

    probe = run("probe", {"freeze": {"strategy": "all-but-head"}}, {})
    assert json.loads((probe / "report.json").read_text())["parameters"]["trainable"] == head_size
    lora = {"lora": {"rank": 2}}
    apart = run("apart", {}, lora | {"mergeOnExport": False})
    adapter = json.loads((apart / "adapter" / "adapter_config.json").read_text())
    assert all(within(m, tuple(adapter["modules_to_save"])) for m in head)  # RoBERTa's whole classifier
    assert not any(within(m, tuple(head)) for m in adapter["target_modules"])
    caplog.clear()
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    merged = run("merged", {}, lora)  # the same training: the merged weights give the adapters' logits
    # Each weight once: the head trained whole was counted again as peft's frozen original_module, and the log said so
    parameters = json.loads((merged / "report.json").read_text())["parameters"]
    assert f"{parameters['trainable']:,} of {parameters['total']:,} parameters train" in caplog.text
    exported = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(merged).parameters())
    assert parameters["total"] - parameters["trainable"] == exported - head_size
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = card_model((apart / "README.md").read_text(), apart).eval()(**batch).logits
        got = AutoModelForSequenceClassification.from_pretrained(merged).eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
