"""The export's files on disk (finetune_trainer/export.py), beyond what loads them back (test_stages.py)."""

from __future__ import annotations

from pathlib import Path

from finetune_trainer.config import LoraSpec, ModelSpec, Task, TrainerConfig
from finetune_trainer.export import export_model
from finetune_trainer.models import load_model, load_tokenizer
from finetune_trainer.rearrange import add_adapters, new_head

from tiny import TINY_BERT, tiny_classifier_doc

TOKENIZER = "pvc://models/all-MiniLM-L6-v2"


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
    which `from_pretrained(out)` loaded as this run's model."""
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
    files = export_model(wrapped, tokenizer, labels, TrainerConfig.model_validate(doc), tmp_path / "out")
    assert "adapter/adapter_model.safetensors" in files
    assert not [f for f in files if f.startswith("model") and f.endswith((".safetensors", ".json"))], files


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
