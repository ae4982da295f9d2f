"""The export's files on disk (finetune_trainer/export.py), beyond what loads them back (test_stages.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import export, pipeline
from finetune_trainer.config import LoraSpec, ModelSpec, Task, TrainerConfig
from finetune_trainer.errors import Terminated
from finetune_trainer.export import export_model
from finetune_trainer.models import load_model, load_tokenizer
from finetune_trainer.rearrange import add_adapters, new_head
from finetune_trainer.structure import head_name
from finetune_trainer.uris import hub_parts

from tiny import (TINY_BERT, TINY_GPT2, bpe_tokenizer, card_model, saved_bert, tiny_classifier_doc,
                  tiny_pair_classifier_doc)

TOKENIZER = "pvc://models/all-MiniLM-L6-v2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LATER = "89abcdef0123456789abcdef0123456789abcdef"  # a commit pushed after it


def test_the_exported_weights_are_as_readable_as_the_other_files(tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask: a pod of another uid in the output claim's fsGroup (a server of
    the model) read config.json and the tokenizer but not the weights."""
    spec = ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, architecture="bert", config=TINY_BERT, tokenizerUri=TOKENIZER)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    new_head(model, "classifier", 3, labels, reinitialize=True)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["bert.encoder.layer.1.output.dense"], "classifier")
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = spec.to_wire()  # no model.uri: the base goes along with the adapters kept apart
    doc["rearrange"] = {"lora": {"rank": 4}, "mergeOnExport": False}
    export_model(wrapped, tokenizer, labels, TrainerConfig.model_validate(doc), tmp_path / "out")
    modes = {str(p.relative_to(tmp_path / "out")): p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")
             if p.is_file()}
    assert {"model.safetensors", "adapter/adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {modes["config.json"]}, modes


def test_adapters_kept_apart_leave_no_merged_weights_of_an_earlier_export(tmp_path: Path) -> None:
    """mergeOnExport changes no weight, so flipping it to false and running again into the same folder resumes and
    exports again: the adapters went to adapter/, and the first run's merged model.safetensors stayed beside them,
    which `from_pretrained(out)` loaded as this run's model. Publishing the new export removes them (an earlier
    trainer's, cut short, listed them in no report)."""
    spec = ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, architecture="bert", config=TINY_BERT, tokenizerUri=TOKENIZER)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    new_head(model, "classifier", 3, labels, reinitialize=True)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = spec.to_wire() | {"uri": TOKENIZER}  # the base is model.uri's: the card loads it from there
    doc["rearrange"] = {"lora": {"rank": 4}}
    export_model(model, tokenizer, labels, TrainerConfig.model_validate(doc), tmp_path / "out")  # as if merged
    assert (tmp_path / "out" / "model.safetensors").exists()
    wrapped = add_adapters(model, LoraSpec(rank=4), ["bert.encoder.layer.1.output.dense"], "classifier")
    doc["rearrange"]["mergeOnExport"] = False
    with export.staging(tmp_path / "out") as staged:
        files = export_model(wrapped, tokenizer, labels, TrainerConfig.model_validate(doc), staged)
        export.publish(staged, tmp_path / "out", json.dumps({"files": files}))
    assert "adapter/adapter_model.safetensors" in files
    assert not list((tmp_path / "out").glob("model*")), files
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_the_card_of_adapters_kept_apart_names_a_wider_heads_spare_outputs_as_the_merged_export_does(
        tmp_path: Path) -> None:
    """A kept head wider than the dataset (rearrange.head.numLabels) keeps the base's names for the outputs no label
    uses ("mixed"), as the merged export's config.json says; the card's code for adapters kept apart rebuilt the names
    from labels.json alone, and called that output LABEL_1."""
    base = saved_bert(tmp_path / "base", {0: "positive", 1: "mixed", 2: "negative", 3: "neutral"})
    maps = {}
    for merged in (True, False):
        out = tmp_path / f"out-{merged}"
        doc = tiny_classifier_doc(out, maxSteps=2)
        doc["model"] = {"task": "sequence-classification", "uri": str(base), "tokenizerUri": TOKENIZER}
        doc["rearrange"] = {"head": {"numLabels": 4}, "lora": {"rank": 4}, "mergeOnExport": merged}
        pipeline.run(TrainerConfig.model_validate(doc), out)
        maps[merged] = card_model((out / "README.md").read_text(), out).config.id2label
    assert json.loads((tmp_path / "out-True" / "config.json").read_text())["id2label"] == {
        "0": "positive", "1": "mixed", "2": "negative", "3": "neutral"}
    assert maps[False] == maps[True] == {0: "positive", 1: "mixed", 2: "negative", 3: "neutral"}


@pytest.mark.parametrize(("task", "config", "named"), [
    ("sequence-classification", {}, True),  # model.uri as published: peft's own loaders find their base there
    ("sequence-classification", {"num_hidden_layers": 2}, False),  # model.config's base: 2 of MiniLM's 6 layers
    ("sequence-classification", {"hidden_dropout_prob": 0.2}, True),  # dropout does not act at inference
    ("causal-lm", {}, False),  # an encoder made causal: model.uri's config.json attends both ways
])
def test_adapters_kept_apart_name_model_uri_as_their_base_only_where_it_is(task: str, config: dict, named: bool,
                                                                           tmp_path: Path) -> None:
    """peft's AutoPeftModel loads the base the adapters' config names: model.uri's path, also where the job changed
    it (model.config, a causal switch; pruning's, test_prune), and it loaded the other model under them without a
    word. Named nowhere, it fails; the card's code builds the base they trained on."""
    spec = ModelSpec(task=task, uri=TOKENIZER, config=config)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    head = "classifier" if task == "sequence-classification" else None
    if head:
        new_head(model, head, 3, {0: "neg", 1: "neu", 2: "pos"}, reinitialize=True)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["query", "value"], head)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = spec.to_wire()
    doc["rearrange"] = {"lora": {"rank": 4}, "mergeOnExport": False}
    export_model(wrapped, tokenizer, {}, TrainerConfig.model_validate(doc), tmp_path / "out")
    base = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == (str(export.local_path(TOKENIZER)) if named else None)


def bos_tokenizer(folder: Path) -> Path:
    """`bpe_tokenizer` that starts each text with a bos token of its own, as Llama's does: an empty prompt is [bos]."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer(folder))
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(folder)
    return folder


def causal_apart(tmp_path: Path, uri: str, tokenizer: Path, revision: str | None = None) -> tuple[Any, str]:
    """A GPT-2 loaded from model.uri `uri` (at model.revision `revision`) with LoRA on its MLPs, exported with its
    adapters apart into tmp_path/out: the model as trained, and the export's card."""
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "causal-lm", "uri": uri, "revision": revision, "tokenizerUri": f"file://{tokenizer}"}
    doc["rearrange"] = {"lora": {"rank": 4}, "mergeOnExport": False}
    cfg = TrainerConfig.model_validate(doc)
    tok = load_tokenizer(cfg.model)
    wrapped = add_adapters(load_model(cfg.model, tok, seed=0), LoraSpec(rank=4), ["c_fc"], None)
    export_model(wrapped, tok, {}, cfg, tmp_path / "out")
    report = {"evaluation": {"baseline": {}, "final": {"loss": 5.0}, "delta": {}}, "labels": {},
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1.0}}
    return wrapped, export.model_card(cfg, report, adapters_apart=True, written_in=export.written_dtype(wrapped, cfg),
                                      revision=export.loaded_revision(wrapped, cfg))


def saved_gpt2(folder: Path, dtype: torch.dtype = torch.float32, **config: Any) -> Path:
    """A tiny GPT-2 saved with its weights in `dtype` (a published checkpoint's bf16: config.json says it too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=400, **TINY_GPT2 | config)).to(dtype).save_pretrained(folder)
    return folder


def test_the_card_of_adapters_kept_apart_generates_with_the_stops_training_taught(tmp_path: Path) -> None:
    """A causal LM stops where its training texts ended (models.stops_where_texts_end adds the tokenizer's eos to the
    checkpoint's own, 399 here); with the adapters apart no generation_config.json was exported, and the card's model
    read model.uri's, which stops at 399 alone, and generated on past the end of a text."""
    base = saved_gpt2(tmp_path / "base", bos_token_id=399, eos_token_id=399)
    trained, card = causal_apart(tmp_path, str(base), bpe_tokenizer(tmp_path / "tok"))
    assert trained.generation_config.eos_token_id == [399, 0]
    assert card_model(card, tmp_path / "out").generation_config.eos_token_id == [399, 0]


def test_the_card_says_how_peft_autopeftmodel_gets_the_stops_training_taught(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's AutoPeftModelForCausalLM loads the base the adapters' config names with that base's generation config
    (neither peft nor transformers reads one beside the adapters), which stops at 399 alone: the card says so, with
    the code that sets the exported one."""
    from peft import AutoPeftModelForCausalLM
    from transformers import GenerationConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft looks for the adapters' tokenizer on the hub otherwise
    base = saved_gpt2(tmp_path / "base", bos_token_id=399, eos_token_id=399)
    _, card = causal_apart(tmp_path, str(base), bpe_tokenizer(tmp_path / "tok"))
    monkeypatch.chdir(tmp_path / "out")
    model = AutoPeftModelForCausalLM.from_pretrained("adapter")
    assert model.generation_config.eos_token_id == 399  # peft's: while it holds, the card needs its word
    said = next(line for line in card.splitlines() if "AutoPeftModelForCausalLM" in line)
    exec(said.split("`")[3], {"model": model, "GenerationConfig": GenerationConfig})  # its code, as a user runs it
    assert model.generation_config.eos_token_id == [399, 0]


def test_the_card_of_adapters_kept_apart_loads_the_base_in_fp32_as_it_was_scored(tmp_path: Path) -> None:
    """A bf16 base under adapters kept apart: nothing is written in 16 bits, so the card had no word on the dtype, and
    its from_pretrained(model.uri) loaded the base in bf16, where the scores it shows were the fp32 model's."""
    base = saved_gpt2(tmp_path / "base", torch.bfloat16)
    _, card = causal_apart(tmp_path, str(base), bpe_tokenizer(tmp_path / "tok"))
    assert card_model(card, tmp_path / "out").dtype == torch.float32


@pytest.mark.parametrize("tokenizer", [bos_tokenizer, bpe_tokenizer], ids=["adds-bos", "adds-nothing"])
def test_the_cards_generate_takes_an_empty_prompt(tokenizer: Callable[[Path], Path], tmp_path: Path) -> None:
    """generate() stripped a prompt's last token where it was any special token, for the [SEP] a BERT tokenizer ends
    each text with: a Llama-style tokenizer's empty prompt is [bos], stripped to nothing, and generate failed. A
    GPT-2-style tokenizer adds nothing: its empty prompt is nothing already."""
    _, card = causal_apart(tmp_path, str(saved_gpt2(tmp_path / "base")), tokenizer(tmp_path / "tok"))
    generate = card_model(card, tmp_path / "out", "generate")
    assert isinstance(generate("", max_new_tokens=2), str)
    assert generate("a fine", max_new_tokens=2).startswith("a fine")


@pytest.mark.parametrize(("uri", "revision", "named"), [
    ("hf://org/tiny-gpt2", None, ("org/tiny-gpt2", COMMIT)),  # the commit loaded, where model.revision names none
    ("hf://org/tiny-gpt2", "v2", ("org/tiny-gpt2", COMMIT)),  # a branch moves: the commit it was at
    ("hf://org/tiny-gpt2/small", None, (None, None)),  # peft loads a repo's root: another model, or none
])
def test_adapters_kept_apart_name_a_hub_base_by_its_repo_and_commit(uri: str, revision: str | None, named: tuple,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """peft names the base by the model's own path: for an hf:// model.uri, the pod's hub cache snapshot, which loads
    nowhere else, and no revision, so AutoPeftModel would load the repo's main of the day. The card's code loaded
    model.revision, none or a branch, which moved on after the job: the commit loaded is pinned there too."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny-gpt2"
    for commit in (COMMIT, LATER):
        saved_gpt2(repo / "snapshots" / commit / hub_parts(uri)[1], snapshot=commit)
    (repo / "refs").mkdir()
    ref = repo / "refs" / (revision or "main")
    ref.write_text(COMMIT)
    _, card = causal_apart(tmp_path, uri, bpe_tokenizer(tmp_path / "tok"), revision)
    ref.write_text(LATER)  # the branch, after the job
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == named
    assert card_model(card, tmp_path / "out").get_base_model().config.snapshot == COMMIT


def test_the_card_and_the_cli_show_a_small_change_as_one(tmp_path: Path) -> None:
    """A detector's first mAPs (7.1e-05, then 1.5e-04) read 0.0001 before and after with a delta of +0.0001, and a
    perplexity of 1e30 took 36 characters: four significant digits where four decimals show fewer or too many."""
    from finetune_trainer.cli import summary_table
    from finetune_trainer.export import model_card

    report = {"evaluation": {"baseline": {"map": 7.054e-05, "perplexity": 1.0e30, "accuracy": 0.36458},
                             "final": {"map": 1.4968e-04, "perplexity": 16953.2165, "accuracy": 0.38542},
                             "delta": {"map": 7.914e-05, "perplexity": 16953.2165 - 1.0e30, "accuracy": 0.02084}},
              "labels": {}, "config": {"model": {"task": "sequence-classification"}},
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1.0}}
    card = model_card(TrainerConfig.model_validate(tiny_classifier_doc(tmp_path)), report)
    assert "| map | 7.054e-05 | 0.0001497 | +7.914e-05 |" in card
    assert "| perplexity | 1e+30 | 16953.2165 | -1e+30 |" in card
    assert "| accuracy | 0.3646 | 0.3854 | +0.02084 |" in card
    assert "map         7.054e-05   0.0001497  +7.914e-05" in summary_table(report, tmp_path)
    report["evaluation"]["teacher"] = {"accuracy": 0.41}  # a distilled job's teacher: a column of its own
    assert summary_table(report, tmp_path).splitlines()[0].split() == ["metric", "baseline", "fine-tuned", "delta",
                                                                        "teacher"]
    assert summary_table(report, tmp_path).splitlines()[-3].split() == ["accuracy", "0.3646", "0.3854", "+0.02084",
                                                                        "0.4100"]


def test_the_cli_counts_a_causal_lms_chunks_per_second_as_its_card_does(tmp_path: Path) -> None:
    """The CLI's last line said '37.6 samples/s' of a causal LM whose card said '37.6 chunks/s' (texts cut in
    chunks)."""
    from finetune_trainer.cli import summary_table

    training = {"steps": 4, "seconds": 1.7, "samples_per_second": 37.6}
    report = {"evaluation": {"baseline": {}, "final": {"loss": 9.7}, "delta": {}}, "training": training,
              "config": {"model": {"task": "causal-lm"}}}
    assert "(37.6 chunks/s)" in summary_table(report, tmp_path)
    report["config"]["model"]["task"] = "sequence-classification"
    assert "(37.6 samples/s)" in summary_table(report, tmp_path)


def test_the_card_of_a_run_that_stopped_early_says_whose_weights_it_holds(tmp_path: Path) -> None:
    """A run with early stopping (a real one: maxSteps 200, patience 1) stopped at step 62 and exported the weights of
    step 60, the best validation loss; its card said only '62 steps', as if they were step 62's of a run that ended."""
    from finetune_trainer.export import model_card

    doc = tiny_classifier_doc(tmp_path, maxSteps=200, evalEverySteps=2, earlyStopping={"patience": 1})
    doc["evaluation"] = {"metrics": ["loss", "accuracy"]}
    training = {"steps": 62, "total_steps": 200, "seconds": 1.3, "samples_per_second": 790.3, "train_samples": 128,
                "validation_samples": 64, "test_samples": 64, "stopped_early": True, "restored_best_step": 60}
    report = {"evaluation": {"baseline": {"loss": 1.1}, "final": {"loss": 1.069}, "delta": {"loss": -0.031}},
              "labels": {"0": "negative"}, "training": training}
    card = model_card(TrainerConfig.model_validate(doc), report)
    assert ("- Training: 62 steps in 1 s, 790.3 samples/s, seed 0; stopped early (200 planned); the weights are "
            "step 60's, the best validation loss\n") in card
    card = model_card(TrainerConfig.model_validate(doc), report | {"training": training | {
        "steps": 200, "stopped_early": False, "restored_best_step": None}})
    assert "- Training: 200 steps in 1 s, 790.3 samples/s, seed 0\n" in card
    # The recipe two runs of the same data differ by (two cards with equal scores and times were the same text)
    assert "- Recipe: learning rate 0.001, batches of 16 per process\n" in card
    doc["adjust"] |= {"headLearningRate": 0.01}
    doc["training"] |= {"gradientAccumulation": 4}
    assert ("- Recipe: learning rate 0.001 (the head's 0.01), batches of 16 x 4 accumulated per process\n"
            in model_card(TrainerConfig.model_validate(doc), report))
    # Stopped where the loss diverged (train_loop's diverged_early): the card and the status line say so
    nan = "the training loss is nan at step 63: lower adjust.learningRate, check the data for broken rows"
    diverged = report | {"training": training | {"diverged": nan}}
    assert (f"stopped early (200 planned, {nan}); the weights are step 60's, the best validation loss\n"
            in model_card(TrainerConfig.model_validate(doc), diverged))
    from finetune_trainer.pipeline import outcome

    assert outcome(diverged) == f"62 steps; test loss 1.1 -> 1.069; stopped early with the best validation's weights: {nan}"
    assert outcome(report) == "62 steps; test loss 1.1 -> 1.069"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_card_of_an_fp32_export_scored_under_autocast_says_how_to_score_it_alike(precision: str,
                                                                                    tmp_path: Path) -> None:
    """An fp32 export scored under bf16 autocast (precision auto on a CPU that has bf16) said nothing of it: reloaded
    in fp32, it scored slightly otherwise than its card showed, with no word of why or how to score it alike."""
    from finetune_trainer.export import model_card

    training = {"steps": 8, "total_steps": 8, "seconds": 1.3, "samples_per_second": 790.3, "train_samples": 128,
                "validation_samples": 64, "test_samples": 64, "precision": precision}
    report = {"evaluation": {"baseline": {"loss": 1.1}, "final": {"loss": 1.069}, "delta": {"loss": -0.031}},
              "labels": {"0": "negative"}, "training": training}
    card = model_card(TrainerConfig.model_validate(tiny_classifier_doc(tmp_path)), report)
    said = [line for line in card.splitlines() if line.startswith("- Precision:")]
    if precision == "fp32":
        assert not said
        return
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert said == [f"- Precision: the scores below were measured under {precision} autocast (the run's precision), on "
                    "fp32 weights; loaded in fp32 and run without autocast, the model scores slightly otherwise "
                    "(rounding may flip a near-tie). To reproduce them exactly, load it in fp32 and run its forward "
                    f"inside `torch.autocast(device_type, dtype=torch.{dtype})`, on the kind of device the run used"]


@pytest.mark.parametrize(("precision", "measured"), [
    ("fp32", "in fp32"), ("bf16", "on the fp32 weights under bf16 autocast")])
def test_the_card_of_a_bf16_checkpoint_fine_tuned_whole_says_its_weights_are_bf16_and_how_they_were_scored(
        tmp_path: Path, precision: str, measured: str) -> None:
    """The export is written in the dtype of the checkpoint's config (export.as_published), and the card said so only
    of merged adapters: a model fine-tuned whole went out in bf16 under scores its fp32 weights had. Then it said the
    scores were measured in fp32 where bf16 autocast computed them (`auto` on a CPU that has bf16)."""
    from safetensors import safe_open

    doc = tiny_classifier_doc(tmp_path / "out", maxSteps=2, precision=precision)
    doc["model"]["config"] = TINY_BERT | {"dtype": "bfloat16"}
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert (f"- Weights: written in bfloat16, the checkpoint's dtype; the scores below were measured {measured}, "
            "before the cast\n") in card


def exported(out: Path) -> dict[str, str]:
    """The export in `out` as each file's digest (not the run's checkpoints and analysis, which the next attempt
    rewrites before it exports)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] not in ("checkpoints", "analysis.json")}


def assert_loads_whole(out: Path, learning_rate: float) -> None:
    """`out` holds one export, whole: its report lists its files (the learning rate this run had), and transformers'
    Auto classes load the model and tokenizer and classify with them; no staging folder is left."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["adjust"]["learningRate"] == learning_rate
    assert set(report["files"]) == set(exported(out)) | {"analysis.json"}
    # every name the export wrote is one export.EXPORTED has, which the next export's publish may replace or remove
    assert all(export.of_an_export(p) for p in out.iterdir() if p.name not in ("checkpoints", "analysis.json"))
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        assert model(**tokenizer(["a fine day"], return_tensors="pt")).logits.shape == (1, 3)
    assert not list(out.glob(".export*")) and not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("cut", ["sigterm", "error"])
def test_an_export_cut_short_leaves_the_earlier_one_whole_and_the_next_attempt_puts_its_own(
        cut: str, tiny_doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export was written in place: cut short (SIGTERM, a failed write), the folder held this run's weights,
    config and tokenizer beside the earlier run's report, card and curve, which said the export was done."""
    out = tmp_path / "out"
    pipeline.run(TrainerConfig.model_validate(tiny_doc), out)
    earlier = exported(out)
    tiny_doc["adjust"]["learningRate"] = 3e-3  # trains afresh: other weights, another report
    cfg = TrainerConfig.model_validate(tiny_doc)

    def cut_short(*_: object) -> None:  # the weights, config, tokenizer and labels are written by now
        if cut == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(export, "loss_curve", cut_short)
    with pytest.raises(Terminated if cut == "sigterm" else OSError):
        pipeline.run(cfg, out)
    assert exported(out) == earlier  # the earlier export, whole, and nothing of this one
    assert not list(out.glob(".export*"))
    monkeypatch.undo()
    (killed := out / ".export-killed").mkdir()  # one a SIGKILL left mid-write: no report, so never put in place
    (killed / "model.safetensors").write_bytes(b"half written")
    pipeline.run(cfg, out)
    assert exported(out).keys() == earlier.keys() and exported(out)["model.safetensors"] != earlier["model.safetensors"]
    assert_loads_whole(out, 3e-3)


class Killed(BaseException):
    """The pod's SIGKILL (OOM, a lost node): nothing after it runs, in the trainer or in its cleanup."""


@pytest.mark.parametrize("stop", ["sigterm", "kill"])
def test_an_export_stopped_while_it_is_put_in_place_is_whole_at_once_or_by_the_next_attempts_start(
        stop: str, tiny_doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM between the renames that put a written export in place waits for the last of them. Killed there, the
    folder holds some of each export and no report.json says it is whole; the next attempt's first act puts the
    rest of the written one in place."""
    out = tmp_path / "out"
    pipeline.run(TrainerConfig.model_validate(tiny_doc), out)
    earlier = exported(out)
    tiny_doc["adjust"]["learningRate"] = 3e-3
    cfg = TrainerConfig.model_validate(tiny_doc)
    real_replace = os.replace
    placed: list[str] = []

    def stopped_after_two(src: Any, dst: Any) -> None:
        moving = Path(dst).parent == out and Path(src).parent.name.startswith(".export-")  # not analysis.json's
        if moving and len(placed) == 2:
            if stop == "kill":
                raise Killed
            os.kill(os.getpid(), signal.SIGTERM)
        real_replace(src, dst)
        if moving:
            placed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", stopped_after_two)
    with pytest.raises(Killed if stop == "kill" else Terminated):
        pipeline.run(cfg, out)
    monkeypatch.undo()
    if stop == "sigterm":
        assert_loads_whole(out, 3e-3)
        return
    assert not (out / "report.json").exists()  # some of each export: nothing says it is whole
    now = exported(out)
    assert placed == ["README.md", "config.json"] and now["README.md"] != earlier["README.md"]
    assert now["model.safetensors"] == earlier["model.safetensors"]
    (staged,) = out.glob(".export-*")
    assert (staged / "report.json").exists()  # written whole: the next attempt puts it in place
    real_load = pipeline.load_tokenizer
    finished: list[dict[str, str]] = []

    def whole_first(*args: Any, **kwargs: Any) -> Any:  # the next attempt, as it starts loading
        assert_loads_whole(out, 3e-3)
        finished.append(exported(out))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_tokenizer", whole_first)
    pipeline.run(cfg, out)  # which goes on: resumed after training, it exports again
    assert finished and exported(out).keys() == finished[0].keys()
    assert_loads_whole(out, 3e-3)


def test_a_published_export_replaces_what_the_earlier_one_had_and_leaves_the_runs_files(tmp_path: Path) -> None:
    """What the earlier export listed, and any weights of an export an older trainer cut short (no report to list
    them), goes where the new export has no file of that name; the checkpoints, the analysis and files the export
    never wrote stay."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "additional_chat_templates").mkdir()  # a tokenizer's named templates, which from_pretrained would read
    (out / "checkpoints" / "run").mkdir(parents=True)
    for name in ("adapter/adapter_model.safetensors", "vocab.txt", "model-00001-of-00002.safetensors",
                 "checkpoints/run/COMMITTED", "analysis.json", "notes.txt", "config.json",
                 "additional_chat_templates/tool.jinja"):
        (out / name).write_text("earlier")
    (out / "report.json").write_text(json.dumps({"files": ["adapter/adapter_model.safetensors", "vocab.txt",
                                                           "config.json", "analysis.json", "../outside",
                                                           "additional_chat_templates/tool.jinja"]}))
    (tmp_path / "outside").write_text("not the export's")
    with export.staging(out) as staged:
        (staged / "config.json").write_text("new")
        (staged / "model.safetensors").write_text("new")
        export.publish(staged, out, json.dumps({"files": ["config.json", "model.safetensors", "report.json"]}))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "analysis.json", "checkpoints/run/COMMITTED", "config.json", "model.safetensors", "notes.txt", "report.json"]
    assert (out / "config.json").read_text() == "new" and (out / "analysis.json").read_text() == "earlier"
    assert (tmp_path / "outside").exists()


def test_a_published_export_leaves_what_an_older_trainers_report_listed_that_no_export_writes(tmp_path: Path) -> None:
    """Before exports were staged, report.json's `files` listed everything in the output folder but checkpoints/ (a
    dataset in the same claim, a user's notes, another job's export in a folder); the next export took every top-level
    name there for the earlier export's and deleted it, folders whole. Only the names an export writes go."""
    out = tmp_path / "out"
    earlier = ["data/train.csv", "notes.txt", "other-job/model.safetensors", "other-job/config.json",
               "labels.json", "tokenizer.json", "adapter/adapter_model.safetensors", "README.md", "report.json"]
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier")
    (out / "report.json").write_text(json.dumps({"files": earlier}))
    with export.staging(out) as staged:
        (staged / "config.json").write_text("new")
        (staged / "model.safetensors").write_text("new")
        export.publish(staged, out, json.dumps({"files": ["config.json", "model.safetensors", "report.json"]}))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "config.json", "data/train.csv", "model.safetensors", "notes.txt", "other-job/config.json",
        "other-job/model.safetensors", "report.json"]


def test_a_file_replaced_atomically_in_the_output_folder_opens_nothing_else_there(tmp_path: Path) -> None:
    """analysis.json is put in the output folder through a temporary file; flushing it opened and synced every entry
    of the folder, twice: one the pod may not read (another uid's 0600 file) failed the run, a FIFO hung it, and a
    large file of someone else's was written out for nothing. The file and the folder's names are what it flushes."""
    import threading

    from finetune_trainer.checkpoints import replace_atomically

    os.mkfifo(fifo := tmp_path / "a-fifo")  # opening it to read waits for a writer
    done = threading.Event()

    def replace() -> None:
        replace_atomically(tmp_path, "analysis.json", lambda tmp: tmp.write_text("{}"))
        done.set()

    threading.Thread(target=replace, daemon=True).start()
    finished = done.wait(20)
    if not finished:  # let the open of the FIFO return, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished, "replace_atomically opened the FIFO beside the file it replaced"
    assert (tmp_path / "analysis.json").read_text() == "{}" and not list(tmp_path.glob(".tmp-*"))


def test_report_json_writes_a_number_that_is_not_finite_as_null() -> None:
    """An fp16 step that GradScaler skipped has an infinite gradient norm in the history: report.json held Infinity,
    which JSON.parse, Go's decoder and jq refuse or misread."""
    from finetune_trainer.export import json_text

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    history = [{"step": 1, "grad_norm": float("inf")}, {"step": 2, "grad_norm": 3.5}]
    report = {"training": {"history": history, "where": Path("/out")}, "scores": (float("nan"), 0.5)}
    assert json.loads(json_text(report), parse_constant=strict) == {
        "training": {"history": [{"step": 1, "grad_norm": None}, {"step": 2, "grad_norm": 3.5}], "where": "/out"},
        "scores": [None, 0.5]}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_card_of_a_pair_classifier_classifies_a_pair_as_it_trained(family: str, tmp_path: Path) -> None:
    """textPairField: the card's classify(first, second) gives the export's model the ids training gave it (BERT's
    pair with segment ids; a GPT-2 tokenizer's, its second text led by its eos), and the logits with them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_trainer.batches import encode_text, make_collate
    from finetune_trainer.data import Split

    words = ["a fine day", "an awful car", "the new cars", "slow and awful", "I love this"]
    rows = [{"first": a, "second": b if k % 2 else a, "same": k % 2 == 0} for k, (a, b) in
            enumerate((a, b) for a in words for b in words if a != b)]
    (tmp_path / "pairs.csv").write_text("first,second,same\n" + "".join(
        f"{r['first']},{r['second']},{r['same']}\n" for r in rows))
    doc = tiny_classifier_doc(tmp_path / "out", maxSteps=2)
    doc["dataset"] |= {"uri": str(tmp_path / "pairs.csv"), "textField": "first", "textPairField": "second",
                       "labelField": "same"}
    if family == "gpt2":
        doc["model"] |= {"architecture": "gpt2", "config": dict(TINY_GPT2),
                         "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'bpe')}"}
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "def classify(first, second):  # a pair's logits: its first, then its second" in card
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    trained = encode_text(Split([("a fine day", "I love this")], [0]), tokenizer, doc["dataset"]["maxLength"])
    batch = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0)(trained, [0])
    assert ("token_type_ids" in batch.inputs) == (family == "bert")
    with torch.no_grad():
        expected = model(**batch.inputs).logits
    assert torch.allclose(card_model(card, tmp_path / "out", "classify")("a fine day", "I love this"), expected)


@pytest.mark.parametrize("mplconfigdir", [None, "mine"])
def test_the_loss_curve_and_detection_scores_go_without_a_warning_where_home_cannot_be_written(
        tmp_path: Path, mplconfigdir: str | None) -> None:
    """A non-root pod's HOME often cannot be written: matplotlib made a temporary folder for its config and font
    cache itself, warning in every job's log that it had ("Matplotlib created a temporary cache directory ...").
    An MPLCONFIGDIR the user set is matplotlib's to use."""
    (home := tmp_path / "home").write_text("")  # a file: nothing can be made under it, by root either
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env |= {"HOME": str(home)} | ({"MPLCONFIGDIR": str(tmp_path / mplconfigdir)} if mplconfigdir else {})
    # A detector's evaluation imports matplotlib first (torchmetrics' detection metrics do), before the curve
    code = ("import sys\nfrom pathlib import Path\nfrom finetune_trainer.detection.metrics import coco_scorer\n"
            "from finetune_trainer.export import loss_curve\ncoco_scorer()\n"
            "loss_curve([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}], [], Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "curve.png")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "matplotlib" not in done.stderr.lower(), done.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not mplconfigdir or (tmp_path / mplconfigdir).is_dir()


def test_a_pair_classifier_of_one_segment_takes_no_segment_ids(tmp_path: Path) -> None:
    """RoBERTa's kind has one segment (type_vocab_size 1): with a BERT tokenizer (model.tokenizerUri), a pair's
    second text is segment 1, and the first step failed indexing past the table (IndexError, or a device assert);
    then the card's classify did, with the export's tokenizer."""
    doc = tiny_pair_classifier_doc(tmp_path, maxSteps=2)
    doc["model"] |= {"architecture": "roberta", "config": TINY_BERT | {"type_vocab_size": 1,
                                                                       "max_position_embeddings": 66}}
    report = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert report["training"]["steps"] == 2
    # and the export's tokenizer gives none either: the card's classify failed so, as transformers' pipeline would
    card = (tmp_path / "out" / "README.md").read_text()
    assert card_model(card, tmp_path / "out", "classify")("a fine day", "the a fine day").shape == (1, 3)


@pytest.mark.parametrize(("architecture", "positions"), [("bert", 64), ("roberta", 66)])
def test_the_exported_tokenizer_truncates_to_the_positions_a_model_built_from_its_config_has(
        architecture: str, positions: int, tmp_path: Path) -> None:
    """A model built from model.config (64 positions; RoBERTa's 66, less its offset of 2) kept its tokenizer's 512:
    transformers' pipeline truncated a long text to 512 tokens, and the model's position table refused them."""
    from transformers import pipeline as hf_pipeline

    spec = ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, architecture=architecture,
                     config=TINY_BERT | {"max_position_embeddings": positions}, tokenizerUri=TOKENIZER)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    labels = {0: "neg", 1: "pos"}
    new_head(model, head_name(model, Task.SEQUENCE_CLASSIFICATION), 2, labels, reinitialize=True)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = spec.to_wire()
    export_model(model, tokenizer, labels, TrainerConfig.model_validate(doc), tmp_path / "out")
    classify = hf_pipeline("text-classification", model=str(tmp_path / "out"))
    assert classify("word " * 100, truncation=True)[0]["label"] in labels.values()
