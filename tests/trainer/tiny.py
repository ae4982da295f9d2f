"""Tiny configs shared by the trainer tests: a 2-layer BERT or GPT-2 built from a config with
the MiniLM tokenizer trains in seconds on two cores."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

# free_port: one outside the kernel's ephemeral range (deploy/local/ports.py), for torchrun's and the metrics' servers
sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy" / "local"))
from ports import free_port  # noqa: E402,F401

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def tiny_classifier_doc(output: Path, **training: Any) -> dict[str, Any]:
    """A bare config: a 2-layer BERT classifying the sentiment CSV, small enough to train in seconds."""
    return {
        "model": {"task": "sequence-classification", "architecture": "bert", "config": dict(TINY_BERT),
                  "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"},
        "dataset": {"uri": "pvc://data/sentiment/sentiment.csv", "textField": "text", "labelField": "sentiment",
                    "maxTrainSamples": 128, "maxEvalSamples": 64, "maxLength": 32},
        "analyze": {"probeBatches": 1},
        "adjust": {"learningRate": 1e-3},
        "training": {"epochs": 1, "batchSize": 16, "seed": 0, **training},
        "output": {"uri": str(output)},
    }


def tiny_pair_classifier_doc(folder: Path, **training: Any) -> dict[str, Any]:
    """tiny_classifier_doc on pairs of texts (dataset.textPairField), written to folder/pairs.csv: a short text, the
    same led by "the", and a sentiment; the export goes to folder/out."""
    texts = ["a fine day", "an awful car", "I love it", "slow and dull", "the new cars", "so so"] * 8
    (folder / "pairs.csv").write_text("text,other,sentiment\n" + "".join(
        f"{t},the {t},{['negative', 'neutral', 'positive'][i % 3]}\n" for i, t in enumerate(texts)))
    doc = tiny_classifier_doc(folder / "out", **training)
    doc["dataset"] |= {"uri": str(folder / "pairs.csv"), "textPairField": "other"}
    return doc


def saved_bert(folder: Path, labels: dict[int, str], **config: Any) -> Path:
    """A tiny BERT classifier saved whole (no weight missing when it loads), with the MiniLM tokenizer's vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    settings = TINY_BERT | {"vocab_size": 30522, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    BertForSequenceClassification(BertConfig(**settings | config)).save_pretrained(folder)
    return folder


SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LATER = "89abcdef0123456789abcdef0123456789abcdef"  # a commit pushed after it


def hub_bert(hub: Path) -> Path:
    """The hub's cache at `hub` (HF_HUB_CACHE, offline) holding org/tiny-bert, a sentiment classifier, at COMMIT and
    at LATER (other weights), its main branch at COMMIT; the repo's folder."""
    import torch

    repo = hub / "models--org--tiny-bert"
    for seed, commit in enumerate((COMMIT, LATER)):
        torch.manual_seed(seed)
        saved_bert(repo / "snapshots" / commit, SENTIMENT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def on_base(out: Path, uri: str) -> dict[str, Any]:
    """tiny_classifier_doc on the classifier at `uri`, its adapters kept apart (their config names the base's commit)."""
    doc = tiny_classifier_doc(out)
    doc["model"] = {"task": "sequence-classification", "uri": uri, "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
    doc["rearrange"] = {"lora": {"rank": 4, "dropout": 0.0}, "mergeOnExport": False}
    doc["evaluation"] = {"metrics": ["loss", "accuracy"]}  # the loss tells two random bases apart
    return doc


def unreadable_tokenizer(folder: Path) -> Path:
    """MiniLM's tokenizer saved into `folder` with a tokenizer.json of a model type the installed tokenizers does not
    know (a newer format)."""
    from finetune_trainer.config import ModelSpec
    from finetune_trainer.models import load_tokenizer

    spec = ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2")
    load_tokenizer(spec).save_pretrained(folder)
    saved = json.loads((folder / "tokenizer.json").read_text())
    saved["model"]["type"] = "FutureModel"
    (folder / "tokenizer.json").write_text(json.dumps(saved))
    return folder


def trainer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune_trainer.cli", *args]


# The trainer's line as an evaluation during training begins: a test that stops the trainer mid-evaluation waits for
# it, rather than guessing with a sleep how long the steps before it take on a loaded machine.
EVALUATING = "evaluating on the validation split"


def seconds_between(log: str, first: str, then: str) -> float:
    """The seconds between the trainer's first lines in `log` holding `first` and `then` (their time of day, to the
    second)."""
    def at(text: str) -> datetime:
        return datetime.strptime(next(line for line in log.splitlines() if text in line)[:8], "%H:%M:%S")

    return (at(then) - at(first)).total_seconds() % 86400  # across midnight too


def bpe_tokenizer(folder: Path, eos: str | None = "<|endoftext|>") -> Path:
    """A byte-level BPE tokenizer as GPT-2's is (an eos token, no pad, no unk), trained in milliseconds on a few
    sentences; with eos=None it has no special token at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a fine day", "this is awful and slow", "I love the new cars"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos).save_pretrained(folder)
    return folder


def card_model(card: str, folder: Path, name: str = "model") -> Any:
    """The `model` (or another `name`) that the model card's Python block makes, run from the export's folder as the
    card says."""
    import os

    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    here = Path.cwd()
    os.chdir(folder)
    try:
        exec(code, namespace)  # the card's own code: what a user pastes
    finally:
        os.chdir(here)
    return namespace[name]
