"""Each stage on its own, on tiny real models (BERT and GPT-2 built from configs, a torchvision ResNet)."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from finetune_trainer import export, pipeline
from finetune_trainer.adjust import (adaptable, freeze, freeze_checked, lora_targets, merging_picks_targets,
                                     param_groups)
from finetune_trainer.analyze import analyze, fail_on_fatal, summary
from finetune_trainer.batches import (Batch, Encoded, encode_causal, encode_images, encode_text, epoch_batches,
                                      eval_batches, make_collate)
from finetune_trainer.config import (AdjustSpec, FreezeSpec, LoraSpec, Metric, ModelSpec, Task, TrainerConfig,
                                     TrainingSpec)
from finetune_trainer.data import Split
from finetune_trainer.distributed import World
from finetune_trainer.errors import ConfigError, DataError, FatalFinding
from finetune_trainer.evaluate import evaluate, macro_f1
from finetune_trainer.export import export_model, loss_curve
from finetune_trainer.models import load_model, load_tokenizer, load_vision_model, logits_of
from finetune_trainer.rearrange import add_adapters, merge_adapters, new_head
from finetune_trainer.structure import canonical, depth, head_name, lora_candidates
from finetune_trainer.train import steps_per_epoch

from tiny import TINY_BERT, TINY_GPT2, bpe_tokenizer, card_model, tiny_classifier_doc, unreadable_tokenizer

CPU = World(rank=0, size=1, device=torch.device("cpu"))
TEXTS = ["a fine day", "this is awful and slow", "ok", "I love the new self driving cars so much", "meh"] * 4


def text_model(task: Task, config: dict, architecture: str):
    spec = ModelSpec(task=task, architecture=architecture, config=config, tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    return load_model(spec, tokenizer, seed=0), tokenizer


@pytest.fixture
def bert():
    return text_model(Task.SEQUENCE_CLASSIFICATION, TINY_BERT, "bert")


def as_if_trained(wrapped: nn.Module) -> None:
    """Adapters that change the output: LoRA's B starts at zero."""
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def text_batches(tokenizer, task: Task, labels: list[int] | None = None):
    data = encode_text(Split(TEXTS, labels if task != Task.CAUSAL_LM else None), tokenizer, 16)
    collate = make_collate(task, tokenizer.pad_token_id, 32)
    return data, collate, [collate(data, idx) for idx in epoch_batches(data.lengths, 8, seed=0, epoch=0, bucketed=True)]


def test_batches_pad_to_the_longest_and_bucket_by_length(bert) -> None:
    _, tokenizer = bert
    data = encode_text(Split(TEXTS * 10, [0] * 200), tokenizer, 16)
    collate = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 32)
    bucketed = [collate(data, idx) for idx in epoch_batches(data.lengths, 8, seed=0, epoch=0, bucketed=True)]
    plain = [collate(data, idx) for idx in epoch_batches(data.lengths, 8, seed=0, epoch=0, bucketed=False)]
    padded = lambda batches: sum(b.inputs["input_ids"].numel() - b.tokens for b in batches)  # noqa: E731
    assert padded(bucketed) < padded(plain) / 2
    assert sum(b.samples for b in bucketed) == 200
    halves = [epoch_batches(data.lengths, 8, seed=0, epoch=0, bucketed=True, rank=r, world_size=2) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) and not set(sum(halves[0], [])) & set(sum(halves[1], []))
    assert epoch_batches(data.lengths, 8, seed=0, epoch=1, bucketed=True) != epoch_batches(
        data.lengths, 8, seed=0, epoch=0, bucketed=True)


@pytest.mark.parametrize("bucketed", [False, True])
def test_no_training_batch_holds_one_sample_and_the_step_count_agrees(bucketed: bool) -> None:
    """No batch holds one sample but at batchSize 1 (batch norm cannot train on one), every sample trains an epoch
    whatever the workers (a few of them twice where too few fill every worker's batches: fewer than 2 a worker), and
    steps_per_epoch, which sizes the schedule and the report, counts the steps every worker's loop takes."""
    for samples, batch_size, workers, accumulation in itertools.product(range(2, 30), range(1, 6), (1, 2, 3), (1, 2)):
        lengths = [1 + i % 7 for i in range(samples)]
        ranks = [epoch_batches(lengths, batch_size, seed=0, epoch=0, bucketed=bucketed, rank=r, world_size=workers)
                 for r in range(workers)]
        spec = TrainingSpec(batchSize=batch_size, gradientAccumulation=accumulation)
        world = World(rank=0, size=workers, device=torch.device("cpu"))
        case = (samples, batch_size, workers, accumulation)
        if samples < workers:  # a worker would have no sample
            with pytest.raises(DataError, match="fewer than the 3 workers"):
                steps_per_epoch(Encoded([], None, lengths), spec, world)
            continue
        assert steps_per_epoch(Encoded([], None, lengths), spec, world) == math.ceil(len(ranks[0]) / accumulation), case
        assert len({len(batches) for batches in ranks}) == 1, case
        assert batch_size == 1 or min(len(b) for batches in ranks for b in batches) > 1, case
        trained = sorted(sum(sum(ranks, []), []))
        assert set(trained) == set(range(samples)) and len(trained) - samples < 2 * workers, case


@pytest.mark.parametrize("bucketed", [False, True])
def test_every_row_trains_every_epoch_on_any_number_of_workers_in_batches_of_at_most_batch_size(bucketed: bool) -> None:
    """Ranks take whole batches, as many each: the last batch_count % workers batches were cut from every epoch, up to
    workers x batchSize - 1 rows (72 of 200 at batchSize 16 on 8 workers). The epoch's rows are spread over as many
    batches as make batchSize rounded up for every worker instead, so none goes untrained and none holds more than the
    batchSize a worker's memory was sized for: at batchSize 1 or 2 too, where a few rows go twice (fewer than 2 a
    worker), and a repeated row is never in one batch with its copy."""
    for samples, batch_size, workers in ((200, 16, 8), (1000, 32, 8), (120, 8, 4), (5003, 64, 8), (104, 8, 2),
                                         (10, 1, 4), (100_003, 1, 8), (1004, 2, 8), (10, 4, 8), (9, 2, 8)):
        lengths = [1 + i % 13 for i in range(samples)]
        ranks = [epoch_batches(lengths, batch_size, seed=0, epoch=3, bucketed=bucketed, rank=r, world_size=workers)
                 for r in range(workers)]
        case = (samples, batch_size, workers)
        trained = sorted(i for batches in ranks for batch in batches for i in batch)
        assert set(trained) == set(range(samples)) and len(trained) - samples < 2 * workers, case
        # a row repeated is never in a batch twice (bucketed, it was sorted beside itself: a batch of one row)
        assert all(len(set(batch)) == len(batch) for batches in ranks for batch in batches), case
        assert len({len(batches) for batches in ranks}) == 1, case
        assert max(len(batch) for batches in ranks for batch in batches) <= batch_size, case
        world = World(rank=0, size=workers, device=torch.device("cpu"))
        assert steps_per_epoch(Encoded([], None, lengths), TrainingSpec(batchSize=batch_size), world) == len(ranks[0])


def test_causal_lm_texts_end_with_eos_and_long_ones_are_chunked_not_cut(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", uri=f"file://{bpe_tokenizer(tmp_path / 'tok')}"))
    long, short = "this is awful and slow " * 6, "a fine day"
    data = encode_causal(Split([long, short], None), tokenizer, 8)
    tokens = tokenizer(long)["input_ids"] + [tokenizer.eos_token_id]
    assert len(tokens) > 16 and max(data.lengths) == 8
    *chunks, last = data.features
    assert last == tokenizer(short)["input_ids"] + [tokenizer.eos_token_id]
    assert chunks[0] + [t for c in chunks[1:] for t in c[1:]] == tokens  # one token of overlap, nothing dropped
    batch = make_collate(Task.CAUSAL_LM, tokenizer.pad_token_id, 0)(data, list(range(len(chunks))))
    assert batch.targets == len(tokens) - 1  # every token after the first is predicted once


def test_a_causal_lms_long_document_is_chunked_without_transformers_false_alarm(
        caplog: pytest.LogCaptureFixture) -> None:
    """Tokenized whole before chunking, each document over the model's 512 tokens had transformers warn that running
    it through the model will result in indexing errors, though its chunks are within maxLength."""
    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", tokenizerUri="pvc://models/all-MiniLM-L6-v2",
                                         architecture="gpt2", config=TINY_GPT2))  # fresh: transformers says it once
    transformers_log = logging.getLogger("transformers")  # which does not propagate to the root's handlers
    transformers_log.addHandler(caplog.handler)
    try:
        data = encode_causal(Split(["word " * 600], None), tokenizer, 128)
    finally:
        transformers_log.removeHandler(caplog.handler)
    assert max(data.lengths) == 128 and sum(data.lengths) > 512
    assert "indexing errors" not in caplog.text


@pytest.mark.parametrize(("architecture", "config", "tokenizer"), [
    ("gpt2", TINY_GPT2, "minilm"),  # tiny-causal-lm's: BERT's tokenizer ends each text with [SEP], it has no eos
    ("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, "bpe"),
])
def test_a_causal_lm_built_from_its_config_ends_generation_at_its_tokenizers_eos(
        architecture: str, config: dict, tokenizer: str, tmp_path: Path) -> None:
    """The config's defaults are another vocabulary's: GPT-2's eos 50256 lies beyond a 30k vocabulary, and Llama's 2
    is some BPE merge, so the exported model's generate() never stopped at the end its texts trained to (or at 2)."""
    from transformers import GenerationConfig

    uri = "pvc://models/all-MiniLM-L6-v2" if tokenizer == "minilm" else f"file://{bpe_tokenizer(tmp_path / 'tok')}"
    spec = ModelSpec(task="causal-lm", architecture=architecture, config=config, tokenizerUri=uri)
    tok = load_tokenizer(spec)
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    assert encode_causal(Split(["a fine day"], None), tok, 16).features[0][-1] == end  # what training ends texts with
    load_model(spec, tok, seed=0).save_pretrained(tmp_path / "out")
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == end


def test_a_causal_lm_loaded_from_model_uri_also_ends_generation_where_its_texts_ended(tmp_path: Path) -> None:
    """A checkpoint kept its generation config's eos: none for BERT, whose texts trained to end with [SEP], and
    generate() went on into a new text; a base model's eos under a tokenizer that ends texts with another. The end
    trained to is added, the checkpoint's kept."""
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    spec = ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2")
    tok = load_tokenizer(spec)
    load_model(spec, tok, seed=0).save_pretrained(tmp_path / "bert")
    assert GenerationConfig.from_pretrained(tmp_path / "bert").eos_token_id == tok.sep_token_id
    bpe = bpe_tokenizer(tmp_path / "tok")
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2, eos_token_id=3, bos_token_id=3)).save_pretrained(tmp_path / "base")
    spec = ModelSpec(task="causal-lm", uri=f"file://{tmp_path / 'base'}", tokenizerUri=f"file://{bpe}")
    tok = load_tokenizer(spec)
    assert tok.eos_token_id not in (None, 3)
    load_model(spec, tok, seed=0).save_pretrained(tmp_path / "gpt2")
    assert GenerationConfig.from_pretrained(tmp_path / "gpt2").eos_token_id == [3, tok.eos_token_id]


@pytest.mark.parametrize("saved", [False, True])
def test_an_encoder_trained_as_a_causal_lm_does_not_see_the_tokens_it_predicts(saved: bool, tmp_path: Path) -> None:
    """BERT loaded for causal-lm (from its config, or a checkpoint such as the bundled MiniLM) attended both ways:
    position t saw token t+1, the one it was scored on predicting."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2"))
    if saved:
        BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **TINY_BERT)).save_pretrained(tmp_path)
    source = {"uri": f"file://{tmp_path}"} if saved else {"architecture": "bert", "config": TINY_BERT}
    model = load_model(ModelSpec(task="causal-lm", tokenizerUri="pvc://models/all-MiniLM-L6-v2", **source),
                       tokenizer, seed=0).eval()
    assert_causal(model, tokenizer)


def assert_causal(model: nn.Module, tokenizer) -> None:
    """The logits at the first 3 positions are the same whatever the tokens after them."""
    ids = torch.tensor([tokenizer("a fine day for it")["input_ids"]])
    later_changed = ids.clone()
    later_changed[0, 3:] = tokenizer.convert_tokens_to_ids("awful")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, {"input_ids": ids})[0, :3],
                                   logits_of(model, {"input_ids": later_changed})[0, :3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"hidden_dropout_prob": 0.05}])
def test_the_card_of_an_encoders_causal_adapters_loads_it_causal(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 overrides: dict[str, float]) -> None:
    """BERT trained as a causal LM with its adapters kept apart: the card loaded model.uri's base, whose config.json
    says is_decoder false, so the model a user rebuilt attended both ways under adapters trained with a causal mask
    (with model.config's overrides too, which the card passes through AutoConfig with is_decoder).
    A head asked for is said to be ignored (a causal LM has none), where it was ignored without a word."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2"))
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **TINY_BERT)).save_pretrained(tmp_path / "base")
    doc = tiny_classifier_doc(tmp_path / "out", maxSteps=1)
    doc["model"] = {"task": "causal-lm", "uri": str(tmp_path / "base"), "tokenizerUri": "pvc://models/all-MiniLM-L6-v2",
                    "config": overrides}
    doc["dataset"] |= {"maxTrainSamples": 16, "maxEvalSamples": 8}
    doc["evaluation"] = {"metrics": ["loss"], "baseline": False}
    doc["rearrange"] = {"lora": {"rank": 2}, "mergeOnExport": False, "head": {"numLabels": 3}}
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert "rearrange.head: a causal-lm has no classification head" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()
    assert_causal(card_model(card, tmp_path / "out").eval(), tokenizer)
    # The card generates from a prompt: the tokenizer it saved gives no token_type_ids (generate(**tokenizer(...))
    # refused them), and the prompt does not end with the [SEP] every trained text ended with.
    from transformers import AutoTokenizer

    assert "token_type_ids" not in AutoTokenizer.from_pretrained(tmp_path / "out")("the car")
    assert card_model(card, tmp_path / "out", "generate")("the car", max_new_tokens=3).startswith("the car")


def test_the_lm_head_transform_a_base_checkpoint_lacks_trains_whole_and_the_tie_stays(tmp_path: Path) -> None:
    """MiniLM (a BertModel checkpoint) loaded for causal-lm lacks its LM head: the decoder is tied to the embeddings,
    but the transform's dense and LayerNorm are random, and under LoRA they stayed so, with a low-rank change."""
    from transformers import AutoModelForCausalLM

    from finetune_trainer.models import new_modules

    spec = ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    new = new_modules(model)
    assert new == ("cls.predictions.transform.LayerNorm", "cls.predictions.transform.dense")
    lora = LoraSpec(rank=2)
    layers, freeze_spec = depth(model, Task.CAUSAL_LM), FreezeSpec()
    wrapped = add_adapters(model, lora, lora_targets(model, lora, Task.CAUSAL_LM, freeze_spec, layers, None), None, new)
    trained = {canonical(n) for n, p in wrapped.named_parameters() if p.requires_grad and "cls." in n}
    assert trained == {f"{m}.{w}" for m in new for w in ("weight", "bias")}
    with torch.no_grad():  # as training would move it
        wrapped.get_submodule("base_model.model.cls.predictions.transform.dense").weight.mul_(2)
    inputs = {"input_ids": torch.tensor([tokenizer("a fine day for it")["input_ids"]])}
    merged, check = merge_adapters(wrapped, inputs)
    assert check["passed"] and merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    doc = tiny_classifier_doc(tmp_path) | {"model": spec.model_dump(by_alias=True, exclude_none=True)}
    export_model(merged, tokenizer, {}, TrainerConfig.model_validate(doc), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, inputs), logits_of(merged.eval(), inputs))


def test_the_modules_a_causal_checkpoint_lacks_take_the_head_rate_and_all_but_head_says_they_alone_train(
        caplog) -> None:
    """MiniLM loaded for causal-lm has no head but a random LM head transform: adjust.headLearningRate was not
    applied to it ('not used: the model has no task head'), and all-but-head trained it alone (148,608 parameters) without
    a word."""
    from finetune_trainer.models import new_modules

    spec = ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2")
    model = load_model(spec, load_tokenizer(spec), seed=0)
    new, layers = new_modules(model), depth(model, Task.CAUSAL_LM)
    groups = param_groups(model, AdjustSpec(learningRate=1e-3, headLearningRate=1e-2), layers, None, new)
    rate_of = {canonical(n): g["lr"] for g in groups for n in g["param_names"]}
    assert rate_of["cls.predictions.transform.dense.weight"] == 1e-2 > rate_of["bert.encoder.layer.5.output.dense.bias"]
    assert "is not used" not in caplog.text
    freeze_checked(model, FreezeSpec(strategy="all-but-head"), layers, None, new)
    assert {canonical(n) for n, p in model.named_parameters() if p.requires_grad} == {
        f"{m}.{w}" for m in new for w in ("weight", "bias")}
    assert "only the modules the checkpoint lacks train, 148,608 parameters: cls.predictions.transform" in caplog.text


def test_an_untied_lm_head_the_checkpoint_lacks_trains_whole(tmp_path: Path, caplog) -> None:
    """A base BERT checkpoint loaded for causal-lm with tie_word_embeddings false: its output layer is random, yet was
    left out of the new modules (as a tied one must be), so under LoRA or a freeze it stayed random."""
    from transformers import BertConfig, BertModel

    from finetune_trainer.models import new_modules

    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", uri="pvc://models/all-MiniLM-L6-v2"))
    BertModel(BertConfig(vocab_size=len(tokenizer), **TINY_BERT)).save_pretrained(tmp_path)
    spec = ModelSpec(task="causal-lm", uri=str(tmp_path), config={"tie_word_embeddings": False})
    model = load_model(spec, tokenizer, seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert new_modules(model) == ("cls.predictions",)
    # LoRA leaves the new module's own layers out of the adapted ones (peft skips them inside modules_to_save, yet
    # they were counted), trains the module whole, and says so when the targets name only what lies inside it.
    new, layers = new_modules(model), depth(model, Task.CAUSAL_LM)
    with pytest.raises(ConfigError, match="trains whole"):
        add_adapters(model, LoraSpec(rank=2), lora_targets(model, LoraSpec(rank=2, targetModules=["transform.dense"]),
                                                           Task.CAUSAL_LM, FreezeSpec(), layers, None, new), None, new)
    targets = lora_targets(model, LoraSpec(rank=2), Task.CAUSAL_LM, FreezeSpec(), layers, None, new)
    with caplog.at_level("INFO", logger="finetune_trainer.rearrange"):
        wrapped = add_adapters(model, LoraSpec(rank=2), targets, None, new)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    assert f"lora adapters (r=2) on {len(adapted)} modules" in caplog.text
    decoder = wrapped.get_parameter("base_model.model.cls.predictions.modules_to_save.default.decoder.weight")
    before = decoder.detach().clone()
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(before, decoder)


def test_a_vocabulary_smaller_than_the_tokenizers_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    """model.config vocab_size 1000 beside a 30k tokenizer failed in the embedding with an IndexError, which exits
    2 and is retried: it is the config's mistake, said before anything trains."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.errors import ConfigError, exit_code_of
    from finetune_trainer.telemetry import TERMINATION_ENV

    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination"))
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"]["vocab_size"] = 1000
    with pytest.raises(ConfigError, match=r"beyond the 1000 rows of the model's embeddings") as caught:
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert exit_code_of(caught.value) == 1 and json.loads((tmp_path / "termination").read_text())["exitCode"] == 1


def test_a_vocabulary_without_the_pad_token_is_a_model_error() -> None:
    """Llama's embedding asserts that its padding index fits: an AssertionError, which exited 2 and was retried."""
    from finetune_trainer.errors import ModelError

    spec = ModelSpec(task="causal-lm", architecture="llama", tokenizerUri="pvc://models/all-MiniLM-L6-v2",
                     config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 64, "vocab_size": 100})
    tokenizer = load_tokenizer(spec)
    tokenizer.pad_token = "[SEP]"  # id 102, as a decoder's tokenizer pads with its end-of-text token
    with pytest.raises(ModelError, match="Padding_idx must be within num_embeddings"):
        load_model(spec, tokenizer, seed=0)

def test_a_tokenizer_json_the_tokenizers_library_cannot_read_is_a_model_error(tmp_path: Path) -> None:
    """The tokenizers library raises a bare Exception for a tokenizer.json it cannot parse: it exited 2, retried."""
    from finetune_trainer.errors import ModelError, exit_code_of

    folder = unreadable_tokenizer(tmp_path / "tok")
    with pytest.raises(ModelError, match=rf"^model.tokenizerUri {folder}: {folder}/tokenizer.json cannot be read by "
                                         r"the installed tokenizers \d") as caught:
        load_tokenizer(ModelSpec(task="sequence-classification", architecture="bert", tokenizerUri=str(folder)))
    assert exit_code_of(caught.value) == 1


def test_a_slow_tokenizer_that_will_not_convert_is_a_model_error_of_its_own_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' convert_slow_tokenizer raises bare Exceptions too, for a folder without tokenizer.json: the error
    blamed a tokenizer.json that is not there, and the installed tokenizers."""
    from transformers import AutoTokenizer

    from finetune_trainer.errors import ModelError

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"a BPE model")
    said = "You're trying to run a `Unigram` model but you're file was trained with a different algorithm"

    def unconvertible(*args: Any, **kwargs: Any) -> None:
        raise Exception(said)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unconvertible)
    with pytest.raises(ModelError, match=rf"^model.tokenizerUri {folder}: cannot load it from {folder} "
                                         rf"\({re.escape(said)}\)$"):
        load_tokenizer(ModelSpec(task="sequence-classification", architecture="bert", tokenizerUri=str(folder)))


def test_model_config_cannot_turn_on_a_model_repositorys_own_code(tmp_path: Path) -> None:
    """model.config went as keyword arguments to AutoConfig.from_pretrained, so trust_remote_code: true there imported
    and ran the Python files of the model's folder or hub repository (its config.json's auto_map) in the trainer."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune_trainer.errors import ConfigError, exit_code_of

    model, ran = tmp_path / "model", tmp_path / "ran"
    BertForSequenceClassification(BertConfig(vocab_size=100, **TINY_BERT)).save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoConfig": "custom.CustomConfig"}}))
    (model / "custom.py").write_text(f"from pathlib import Path\nPath({str(ran)!r}).touch()\n"
                                     "from transformers import BertConfig as CustomConfig\n")
    spec = ModelSpec(uri=f"file://{model}", task="sequence-classification", config={"trust_remote_code": True})
    with pytest.raises(ConfigError, match=r"model\.config\.trust_remote_code") as caught:
        load_model(spec, None, seed=0)
    assert exit_code_of(caught.value) == 1 and not ran.exists()



@pytest.mark.parametrize("key, value", [("revision", "v2"), ("return_unused_kwargs", True), ("subfolder", "base")])
def test_model_config_refuses_from_pretrained_s_own_arguments(tmp_path: Path, key: str, value: Any) -> None:
    """model.config reached AutoConfig.from_pretrained as keyword arguments, where these are how it reads, not config
    values: a revision was silently ignored against the fetched folder (the model loaded was model.revision's),
    return_unused_kwargs made the config a tuple (an AttributeError, retried), subfolder read another config."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune_trainer.errors import ConfigError, exit_code_of

    BertForSequenceClassification(BertConfig(vocab_size=100, **TINY_BERT)).save_pretrained(tmp_path)
    spec = ModelSpec(uri=f"file://{tmp_path}", task="sequence-classification", config={key: value})
    with pytest.raises(ConfigError, match=rf"model\.config\.{key}: an argument of from_pretrained") as caught:
        load_model(spec, None, seed=0)
    assert exit_code_of(caught.value) == 1

def test_analyze_reports_structure_candidates_and_head(bert) -> None:
    model, tokenizer = bert
    _, _, batches = text_batches(tokenizer, Task.SEQUENCE_CLASSIFICATION, [0, 1, 2, 0, 1] * 4)
    report = analyze(model, batches[:2], Task.SEQUENCE_CLASSIFICATION, num_labels=3, adapters=True)
    assert report.total_parameters == sum(p.numel() for p in model.parameters())
    assert sum(m.total for m in report.modules) == report.total_parameters
    assert "classifier" not in report.lora_candidates and "bert.encoder.layer.0.attention.self.query" in report.lora_candidates
    assert report.lora_candidates["bert.encoder.layer.0.intermediate.dense"] == [64, 32]
    assert report.head == {"name": "classifier", "out_features": 2, "dataset_labels": 3}
    assert [f.code for f in report.findings if f.severity != "info"] == []
    assert "HeadMismatch" in [f.code for f in report.findings]
    flops = report.flops
    assert flops["rule"] == "4N per token (adapters)" and 0.8 < flops["measured_over_estimate"] < 2
    assert report.memory["activations"] > 0 and report.memory["optimizer"] == 2 * report.memory["gradients"]
    assert "LoRA candidates" in summary(report)
    json.dumps(report.to_dict())  # it goes into report.json as it is
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no trace


def test_analyze_finds_broken_tied_and_gradless_weights() -> None:
    model, tokenizer = text_model(Task.CAUSAL_LM, TINY_GPT2, "gpt2")
    _, _, batches = text_batches(tokenizer, Task.CAUSAL_LM)
    model.transformer.unused = nn.Linear(4, 4)  # registered, never called: it gets no gradient
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    report = analyze(model, batches[:1], Task.CAUSAL_LM, num_labels=0, adapters=False)
    codes = {f.code: f.severity for f in report.findings}
    assert codes["NonFiniteWeights"] == "fatal" and codes["TiedWeights"] == "info" and codes["NoGradient"] == "warning"
    assert ["transformer.wte.weight", "lm_head.weight"] in report.tied_weights
    # the tied weight counted once: the rows by type add up to the model's parameters
    assert sum(t["parameters"] for t in report.layer_types.values()) == sum(p.numel() for p in model.parameters())
    assert "transformer.unused.weight" in report.no_grad_parameters
    assert "lm_head" not in report.lora_candidates  # the output embeddings
    with pytest.raises(FatalFinding, match="c_fc.weight has 1 NaN/Inf"):
        fail_on_fatal(report)


def test_the_probe_for_adapters_computes_no_weight_gradient_and_runs_at_the_run_precision() -> None:
    """A LoRA job's weights never train: the probe must not allocate their gradients (a large model's would not fit
    in memory beside it), yet still find the weights no gradient reaches; and it measures at the run's precision."""
    model, tokenizer = text_model(Task.CAUSAL_LM, TINY_GPT2, "gpt2")
    _, _, batches = text_batches(tokenizer, Task.CAUSAL_LM)
    model.transformer.unused = nn.Linear(4, 4)  # registered, never called
    full = analyze(model, batches[:1], Task.CAUSAL_LM, num_labels=0, adapters=False)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    got_gradient: list[torch.Tensor] = []
    for p in matrices:
        p.register_post_accumulate_grad_hook(got_gradient.append)
    lora = analyze(model, batches[:1], Task.CAUSAL_LM, num_labels=0, adapters=True)
    assert got_gradient == []
    assert lora.no_grad_parameters == full.no_grad_parameters == ["transformer.unused.weight", "transformer.unused.bias"]
    assert lora.memory["probe_model"] < full.memory["probe_model"] - sum(p.numel() * 4 for p in matrices) / 2
    assert lora.flops["measured_per_sample"] < 0.8 * full.flops["measured_per_sample"]  # no weight-gradient matmuls
    bf16 = analyze(model, batches[:1], Task.CAUSAL_LM, num_labels=0, adapters=False, dtype=torch.bfloat16)
    # At bf16 the step also saves autocast's bf16 copy of each weight for the backward, which fp32 needs none of:
    # the output embedding's (1.95 MB) outweighs the halving of this short batch's hidden states (0.2 MB).
    assert bf16.memory["activations"] - full.memory["activations"] > model.lm_head.weight.numel() * 2 * 0.75


@pytest.mark.parametrize("build", [lambda: tiny_vit(), lambda: tiny_swin()], ids=["vit", "swin"])  # defined below
def test_the_probe_for_adapters_reaches_the_layers_their_owner_reads_itself(build: Callable[[], nn.Module]) -> None:
    """nn.MultiheadAttention reads its out_proj's weight without calling it (torchvision's ViT), Swin's attention its
    qkv and proj: the probe, which marks a matrix reached by its module's forward, said they get no gradient and
    cannot learn (a Warning in the job's status, and DDP's search for unused parameters at every step)."""
    from finetune_trainer.batches import Batch
    from finetune_trainer.structure import unread_layers

    torch.manual_seed(0)
    model = build()
    batch = Batch({"pixel_values": torch.randn(2, 3, 32, 32)}, torch.tensor([0, 1]), 2, 0, 2)
    assert unread_layers(model)
    report = analyze(model, [batch], Task.IMAGE_CLASSIFICATION, num_labels=3, adapters=True)
    assert report.no_grad_parameters == []


def test_a_freeze_count_or_pattern_without_its_strategy_is_warned_of(bert, caplog: pytest.LogCaptureFixture) -> None:
    """The strategy defaults to none: {freeze: {count: 2}} froze nothing, the log saying only 'froze 0 parameters'."""
    model, _ = bert
    layers, head = depth(model, Task.SEQUENCE_CLASSIFICATION), head_name(model, Task.SEQUENCE_CLASSIFICATION)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.adjust"):
        freeze_checked(model, FreezeSpec(count=2), layers, head)
        freeze_checked(model, FreezeSpec(strategy="all-but-head", pattern="embeddings"), layers, head)
    assert "adjust.freeze.count is read only with strategy bottom-layers, and the strategy is none: ignored" in caplog.text
    assert "adjust.freeze.pattern is read only with strategy regex, and the strategy is all-but-head" in caplog.text


def test_freeze_strategies_and_layerwise_decay(bert) -> None:
    model, _ = bert
    layers, head = depth(model, Task.SEQUENCE_CLASSIFICATION), head_name(model, Task.SEQUENCE_CLASSIFICATION)
    assert layers.units == ["bert.encoder.layer.0", "bert.encoder.layer.1"] and head == "classifier"
    freeze(model, FreezeSpec(strategy="bottom-layers", count=1), layers, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for n in trainable)
    assert any(n.startswith("bert.encoder.layer.1.") for n in trainable) and "classifier.weight" in trainable
    groups = param_groups(model, AdjustSpec(learningRate=1e-3, layerwiseDecay=0.5, headLearningRate=5e-3), layers, head)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert lr_of["classifier.weight"] == 5e-3 and lr_of["bert.pooler.dense.weight"] == 1e-3
    assert lr_of["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(5e-4)
    assert decay_of["bert.encoder.layer.1.attention.self.query.weight"] == 0.01
    assert decay_of["bert.encoder.layer.1.attention.self.query.bias"] == 0.0
    assert decay_of["bert.encoder.layer.1.output.LayerNorm.weight"] == 0.0




def test_the_mfu_gauge_counts_the_flops_of_the_step_that_trains_not_of_every_weight(tmp_path: Path, gauged) -> None:
    """The analysis probes every weight as trainable (freezing comes after it). The gauge took that figure, so with
    all but the head frozen, where a step computes no weight gradient below the head and no input gradient at all,
    MFU read about 3x what the step did."""
    probes, step_flops = gauged
    gauged, analysed = {}, {}
    for strategy in ("none", "all-but-head"):
        doc = tiny_classifier_doc(tmp_path / strategy, maxSteps=2)
        doc["adjust"]["freeze"] = {"strategy": strategy}
        report = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / strategy)
        (flops,) = set(step_flops)
        (probe,) = probes.pop()  # the doc probes one batch
        gauged[strategy] = flops.flops * probe.padded_tokens / probe.samples  # per padded token: per sample
        analysed[strategy] = report["analysis"]["flops"]["training_per_sample"]
        step_flops.clear()
    assert analysed["none"] == analysed["all-but-head"]  # the model as loaded: every weight trains
    assert gauged["none"] == pytest.approx(analysed["none"], rel=1e-3)  # the same, but for the new head's 3rd class
    assert gauged["all-but-head"] < 0.5 * gauged["none"]  # the forward, and the head's own gradients


def test_the_mfu_gauge_does_not_scale_with_the_length_of_the_seeds_probe_batch(tmp_path: Path, gauged) -> None:
    """The gauge took FLOPs per sample of the first probe batch, whose padded length the seed draws: seeds 5 and 1
    probe batches of 24 and 41 tokens here (seeds 2 and 3 drew 18 and 36 before the split kept frequent texts out of
    test, and MFU read 2.3x higher with one than the other at the same speed). Per padded token they differ by
    attention's part alone (quadratic in the length, large in a model this narrow)."""
    probes, step_flops = gauged
    flops_per_second, lengths = [], []
    for seed in (5, 1):
        doc = tiny_classifier_doc(tmp_path / str(seed), seed=seed, maxSteps=1)
        doc["dataset"]["maxLength"] = 64
        doc["evaluation"] = {"baseline": False}
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / str(seed))
        (probe,) = probes.pop()
        lengths.append(probe.inputs["input_ids"].shape[1])
        # at one speed, the run's: 400 samples/s of 25 padded tokens
        flops_per_second.append(step_flops.pop().per_second(samples_per_second=400.0, padded_tokens_per_second=1e4))
    assert max(lengths) > 1.5 * min(lengths)
    assert flops_per_second[1] == pytest.approx(flops_per_second[0], rel=0.2)


def test_what_counts_layers_is_refused_on_a_model_whose_layers_parts_sit_in_parallel_lists() -> None:
    """XLM keeps its layers' attentions, FFNs and two norms in four lists of one length: layer_norm2, the last by
    name, was taken for the layers, so bottom-layers froze every attention and FFN (depth 0, as embeddings) and
    layer-wise decay gave them all the lowest rate. Both are refused naming the field; a job that counts no layers
    trains everything at its rate. BART's encoder and decoder, lists of one length in two modules, stay two stacks."""
    from transformers import BartConfig, BartForSequenceClassification, XLMConfig, XLMForSequenceClassification

    from finetune_trainer.structure import layer_units

    task = Task.SEQUENCE_CLASSIFICATION
    model = XLMForSequenceClassification(XLMConfig(vocab_size=100, emb_dim=32, n_layers=2, n_heads=2, num_labels=2))
    assert_counting_layers_refused(
        model, task, r"XLMForSequenceClassification keeps each layer's parts in parallel lists \(transformer.attentions, ")
    bart = BartForSequenceClassification(BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32))
    assert layer_units(bart, task) == ["model.encoder.layers.0", "model.encoder.layers.1"]


def test_freezing_more_bottom_layers_than_the_model_has_freezes_its_stack_only(bert) -> None:
    """count 3 on 2 layers: the pooler and the head, which the dataset's labels fit already, still train."""
    model, _ = bert
    layers, head = depth(model, Task.SEQUENCE_CLASSIFICATION), head_name(model, Task.SEQUENCE_CLASSIFICATION)
    freeze(model, FreezeSpec(strategy="bottom-layers", count=3), layers, head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def token_batch() -> Batch:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros(2, dtype=torch.long), 2, 14, 2)


def test_opts_final_norm_and_output_projection_sit_above_its_layers_though_registered_before_them() -> None:
    """OPT's decoder registers final_layer_norm and project_out before its layers: taken in that order they sat below
    the stack, as embeddings do, so bottom-layers 1 froze them and layer-wise decay gave the final norm the lowest
    rate. The forward reads them after the last layer; project_in, read before the first, stays below."""
    from transformers import OPTConfig, OPTForSequenceClassification

    model = OPTForSequenceClassification(OPTConfig(
        vocab_size=100, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=4, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, do_layer_norm_before=True, pad_token_id=1))
    task = Task.SEQUENCE_CLASSIFICATION
    model.model.decoder.layers[0].eval()  # held in eval, as a frozen part may be
    layers, head = depth(model, task, token_batch()), head_name(model, task)
    # each module's mode put back after the eval forward
    assert model.training and not model.model.decoder.layers[0].training and model.model.decoder.layers[1].training
    freeze(model, FreezeSpec(strategy="bottom-layers", count=1), layers, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = "model.decoder."
    assert {decoder + n for n in ("final_layer_norm.weight", "final_layer_norm.bias", "project_out.weight")} <= trainable
    assert not trainable & {decoder + n for n in ("embed_tokens.weight", "embed_positions.weight", "project_in.weight")}
    groups = param_groups(model, AdjustSpec(learningRate=1e-3, layerwiseDecay=0.5, headLearningRate=5e-3), layers, head)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lr_of[decoder + "final_layer_norm.weight"] == lr_of[decoder + "project_out.weight"] == 1e-3
    assert lr_of[decoder + "layers.3.fc1.weight"] == pytest.approx(5e-4)


def test_debertas_relative_embeddings_every_layer_reads_sit_below_its_layers_though_registered_after_them() -> None:
    """DeBERTa-v2's encoder registers rel_embeddings, the LayerNorm it applies to them and the conv after its layers,
    so they sat above the stack: bottom-layers 1 left them training though every frozen layer's attention reads
    them, and layer-wise decay gave them the top rate. The encoder reads them before its last layer starts."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm",
        conv_kernel_size=3, pos_att_type=["p2c", "c2p"], position_biased_input=False))
    task = Task.SEQUENCE_CLASSIFICATION
    layers, head = depth(model, task, token_batch()), head_name(model, task)
    groups = param_groups(model, AdjustSpec(learningRate=1e-3, layerwiseDecay=0.5), layers, head)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    encoder = "deberta.encoder."
    assert lr_of[encoder + "rel_embeddings.weight"] == lr_of["deberta.embeddings.word_embeddings.weight"] == 1e-3 / 16
    freeze(model, FreezeSpec(strategy="bottom-layers", count=1), layers, head)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {encoder + n for n in ("rel_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias", "conv.conv.weight")
            } <= frozen
    assert not any(n.startswith(encoder + "layer.1.") for n in frozen)


@pytest.mark.parametrize("build", ["bert", "gpt2", "llama", "vit", "resnet18"])
def test_what_a_forward_reads_before_the_layers_is_what_is_registered_before_them_where_the_two_agree(
        build: str) -> None:
    """BERT, GPT-2, Llama, ViT (its class token and position embedding bare parameters, not modules) and a ResNet's
    stem: read in the order they are registered, so a forward places them as the registration order did."""
    import torchvision
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM)

    from finetune_trainer.models import ImageClassifier

    text = {"bert": lambda: BertForSequenceClassification(BertConfig(vocab_size=100, **TINY_BERT)),
            "gpt2": lambda: GPT2ForSequenceClassification(GPT2Config(vocab_size=100, pad_token_id=0, **TINY_GPT2)),
            "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          num_key_value_heads=1))}
    if build in text:
        model, batch = text[build](), token_batch()
        task = Task.CAUSAL_LM if build == "llama" else Task.SEQUENCE_CLASSIFICATION
    else:
        model = tiny_vit() if build == "vit" else ImageClassifier(torchvision.models.resnet18(num_classes=3), build)
        batch = Batch({"pixel_values": torch.randn(2, 3, 32, 32)}, torch.zeros(2, dtype=torch.long), 2, 0, 2)
        task = Task.IMAGE_CLASSIFICATION
    assert depth(model, task, batch).below == depth(model, task).below != set()


@pytest.mark.parametrize(("build", "head", "trained"), [
    ("bert", "classifier", "classifier"), ("gpt2", "score", "score"), ("llama", "score", "score"),
    ("deberta-v2", "classifier", "classifier"),  # its pooler is beside the head, at the root: not the head's
    ("roberta", "classifier.out_proj", "classifier"), ("electra", "classifier.out_proj", "classifier"),
    ("vit", "net.heads.head", "net.heads.head"), ("resnet18", "net.fc", "net.fc"),
])
def test_what_trains_as_the_head_is_a_task_head_module_or_else_the_head_linear(build: str, head: str,
                                                                               trained: str) -> None:
    """RoBERTa's and ELECTRA's classifier (dense + out_proj) is the head as a whole; where the head Linear sits at the
    root (BERT, GPT-2, Llama, DeBERTa) or in a torchvision network, which has no base model, it is the Linear."""
    import torchvision
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from finetune_trainer.models import ImageClassifier
    from finetune_trainer.structure import head_module

    settings = {"gpt2": TINY_GPT2 | {"pad_token_id": 0},
                "llama": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0},
                "electra": TINY_BERT | {"embedding_size": 16}}
    if build == "vit":
        model = tiny_vit()
    elif build == "resnet18":
        model = ImageClassifier(torchvision.models.resnet18(num_classes=3), build)
    else:
        config = AutoConfig.for_model(build, vocab_size=100, num_labels=3, **settings.get(build, TINY_BERT))
        model = AutoModelForSequenceClassification.from_config(config)
    task = Task.IMAGE_CLASSIFICATION if build in ("vit", "resnet18") else Task.SEQUENCE_CLASSIFICATION
    assert head_name(model, task) == head
    assert head_module(model, head) == trained
    assert head_module(model, None) is None


@pytest.mark.parametrize("task, architecture, config, units, below", [
    ("sequence-classification", "bert", TINY_BERT | {"num_hidden_layers": 1}, ["bert.encoder.layer.0"],
     {f"bert.embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                       "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}),
    ("causal-lm", "gpt2", TINY_GPT2 | {"n_layer": 1}, ["transformer.h.0"], {"transformer.wte.weight",
                                                                          "transformer.wpe.weight"}),
])
def test_a_model_of_one_layer_has_that_layer_as_its_stack(task: str, architecture: str, config: dict,
                                                          units: list[str], below: set[str]) -> None:
    """A one-layer model built from a config: its layer is the stack (it was its embeddings', or its attention and
    MLP), and pruning it is refused as pruning every layer is."""
    from finetune_trainer.config import PruneSpec
    from finetune_trainer.errors import ConfigError
    from finetune_trainer.prune import chosen_layers, importance

    model, tokenizer = text_model(Task(task), config, architecture)
    layers = depth(model, Task(task))
    assert layers.units == units and layers.below == below
    _, _, batches = text_batches(tokenizer, Task(task), [0, 1] * 10)
    scores = importance(model, batches[:1], Task(task), labels_fit=False)["layers"]["scores"]
    with pytest.raises(ConfigError, match="would remove all 1 layers"):
        chosen_layers(scores, PruneSpec(count=1))

def test_all_but_head_and_regex(bert) -> None:
    model, _ = bert
    layers, head = depth(model, Task.SEQUENCE_CLASSIFICATION), "classifier"
    freeze(model, FreezeSpec(strategy="regex", pattern=r"attention\."), layers, head)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "attention." in n)
    freeze(model, FreezeSpec(strategy="all-but-head"), layers, head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_regex_freezing_keeps_adapters_off_the_frozen_modules(bert) -> None:
    model, _ = bert
    task = Task.SEQUENCE_CLASSIFICATION
    layers, head = depth(model, task), head_name(model, task)
    spec = FreezeSpec(strategy="regex", pattern=r"attention\.")
    candidates = list(lora_candidates(model, task))
    kept = adaptable(candidates, spec, layers, head)
    assert not any("attention." in n for n in kept) and "bert.encoder.layer.0.intermediate.dense" in kept
    freeze(model, spec, layers, head)
    wrapped = add_adapters(model, LoraSpec(rank=4), kept, head)
    adapters = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert adapters and not any("attention." in n for n in adapters)
    freeze(wrapped, spec, layers, head)  # as the pipeline does after rearranging: nothing placed is frozen again
    assert all(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" in n)


TINY_DISTILBERT = {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2, "max_position_embeddings": 64}


def distilbert_adapted(targets: list[str], merging: bool,
                       base: Path | None = None) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    """A tiny DistilBERT (pre_classifier, then the classifier head), saved into `base` where given, with adapters on
    `targets`, a step's gradients, adapters as if trained, and a batch."""
    model, tokenizer = text_model(Task.SEQUENCE_CLASSIFICATION, TINY_DISTILBERT, "distilbert")
    if base is not None:
        model.save_pretrained(base)
    task, lora = Task.SEQUENCE_CLASSIFICATION, LoraSpec(rank=2, targetModules=targets)
    head = head_name(model, task)
    targeted = lora_targets(model, lora, task, FreezeSpec(), depth(model, task), head, merging=merging)
    wrapped = add_adapters(model, lora, targeted, head)
    _, _, batches = text_batches(tokenizer, task, [0, 1] * 10)
    logits_of(wrapped.train(), batches[0].inputs).sum().backward()
    as_if_trained(wrapped)
    return wrapped, tokenizer, batches[0].inputs


def trained_whole_names(wrapped: nn.Module) -> set[str]:
    return {canonical(n) for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n}


def test_distilberts_pre_classifier_is_not_taken_for_its_head_and_its_adapters_kept_apart_load(tmp_path: Path) -> None:
    """peft keeps whole every module whose name ends with the head's: DistilBERT's pre_classifier ends with
    classifier, and trained whole unasked. The head alone trains whole; pre_classifier stays frozen, and is saved
    with the adapters as it was, since PeftModel.from_pretrained takes it for the head too and loads it from them."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    wrapped, tokenizer, inputs = distilbert_adapted(["q_lin", "v_lin"], merging=False, base=tmp_path / "base")
    assert trained_whole_names(wrapped) == {"classifier.weight", "classifier.bias"}
    logits = logits_of(wrapped.eval(), inputs)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["rearrange"] = {"lora": {"rank": 2}, "mergeOnExport": False}
    export_model(wrapped, tokenizer, {0: "neg", 1: "pos"}, TrainerConfig.model_validate(doc), tmp_path / "out")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(logits_of(loaded, inputs), logits)


def test_distilberts_pre_classifier_takes_an_adapter_where_the_export_merges_it(tmp_path: Path, caplog) -> None:
    """Adapted, pre_classifier cannot be kept whole as well: peft raised TypeError (exit 2, retried). It trains its
    adapter and merges; kept apart, the adapters would not load (peft wraps it as the head), so it is left out."""
    from transformers import AutoModelForSequenceClassification

    wrapped, tokenizer, inputs = distilbert_adapted(["q_lin", "pre_classifier"], merging=True)
    assert trained_whole_names(wrapped) == {"classifier.weight", "classifier.bias"}
    assert any(n.startswith("base_model.model.pre_classifier.lora_A") for n, p in wrapped.named_parameters()
               if p.requires_grad)
    logits = logits_of(wrapped.eval(), inputs)
    merged, check = merge_adapters(wrapped, inputs)
    assert check["passed"]
    export_model(merged, tokenizer, {0: "neg", 1: "pos"}, TrainerConfig.model_validate(tiny_classifier_doc(tmp_path)),
                 tmp_path)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(exported, inputs), logits, atol=1e-5, rtol=1e-4)
    with caplog.at_level(logging.WARNING):
        apart, _, _ = distilbert_adapted(["q_lin", "pre_classifier"], merging=False)
    assert "no adapters on 1 of the 3 modules named, which peft takes for a module trained whole" in caplog.text
    assert not any("pre_classifier.lora_" in n for n, _ in apart.named_parameters())
    with pytest.raises(ConfigError, match=r"^rearrange.lora.targetModules \['pre_classifier'\]: peft takes the "
                                          r"modules they name \(pre_classifier, ...\) for a module trained whole"):
        distilbert_adapted(["pre_classifier"], merging=False)


def test_the_modules_peft_takes_for_the_head_are_found_by_one_scan_adapted_or_not() -> None:
    """keep_whole (the unadapted, kept frozen) and stranded_apart (the adapted) each scanned the model for the modules
    peft takes for one trained whole; they share mistaken_for_whole, which tells the two apart."""
    from finetune_trainer.rearrange import mistaken_for_whole, stranded_apart

    for targets, adapted in ((["q_lin", "v_lin"], False), (["q_lin", "pre_classifier"], True)):
        wrapped, _, _ = distilbert_adapted(targets, merging=adapted)
        assert mistaken_for_whole(wrapped, ("classifier",)) == {"pre_classifier": adapted}
        assert stranded_apart(wrapped) == (["pre_classifier"] if adapted else [])


def test_a_failed_merge_check_still_merges_adapters_that_would_not_load_apart(tmp_path: Path, caplog,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """pre_classifier adapted (the export was to merge), and a merge check that fails: the export fell back to the
    adapters apart, which PeftModel.from_pretrained cannot load (TypeError). It merges all the same and says so."""
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer import rearrange

    wrapped, tokenizer, inputs = distilbert_adapted(["q_lin", "pre_classifier"], merging=True)
    monkeypatch.setattr(rearrange, "MERGE_ATOL", -1.0)  # any difference fails the check, as a drift would
    with caplog.at_level(logging.WARNING):
        merged, check = merge_adapters(wrapped, inputs)
    assert not hasattr(merged, "peft_config") and not check["passed"] and check["merged"]
    assert "exported merged all the same, as the adapters kept apart would not load (peft takes pre_classifier" in (
        caplog.text)
    assert "over the merge check's tolerance" in export.merge_note(check)
    export_model(merged, tokenizer, {0: "neg", 1: "pos"}, TrainerConfig.model_validate(tiny_classifier_doc(tmp_path)),
                 tmp_path)
    AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_merge_on_export_is_in_the_fingerprint_only_where_it_picks_the_adapted_modules(tmp_path: Path, caplog) -> None:
    """DistilBERT's pre_classifier takes an adapter only where the export merges: mergeOnExport, listed as bookkeeping,
    was flipped on a retry (as the warnings suggest), the checkpoint no longer fitted, and it was discarded as another
    trainer version's. Now the flip is another run, said so; where the flag picks nothing, it stays bookkeeping."""
    model, _ = text_model(Task.SEQUENCE_CLASSIFICATION, TINY_DISTILBERT, "distilbert")
    task, lora = Task.SEQUENCE_CLASSIFICATION, LoraSpec()
    assert merging_picks_targets(model, lora, task, head_name(model, task))
    bert, _ = text_model(Task.SEQUENCE_CLASSIFICATION, TINY_BERT, "bert")
    assert not merging_picks_targets(bert, lora, task, head_name(bert, task))
    doc = tiny_classifier_doc(tmp_path, maxSteps=2, checkpointEverySteps=1)
    doc["model"] = {"task": "sequence-classification", "architecture": "distilbert", "config": dict(TINY_DISTILBERT),
                    "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
    doc["dataset"] |= {"maxTrainSamples": 32, "maxEvalSamples": 16}
    doc["evaluation"] = {"baseline": False}
    doc["rearrange"] = {"lora": {"rank": 2}}
    fingerprints = {}
    for merging in (True, False):
        doc["rearrange"]["mergeOnExport"] = merging
        cfg = TrainerConfig.model_validate(doc)
        fingerprints[merging] = pipeline.fingerprinted(cfg, 1, merge_picks=True, defaults=True)
        # not in the short form: an earlier trainer's folder, whose fingerprint lacks it, is this run's (filled)
        assert "mergeOnExport" not in json.dumps(pipeline.fingerprinted(cfg, 1, merge_picks=True))
        assert pipeline.fingerprinted(cfg, 1) == pipeline.fingerprinted(cfg.model_copy(update={"rearrange": (
            cfg.rearrange.model_copy(update={"merge_on_export": not merging}))}), 1)
        with caplog.at_level(logging.WARNING):
            pipeline.run(cfg, tmp_path)
    assert [fingerprints[m]["rearrange"]["mergeOnExport"] for m in (True, False)] == [True, False]
    assert "another version" not in caplog.text
    assert re.search(r"made with other settings that change the optimisation; training starts afresh\. Changed: "
                     r"rearrange.mergeOnExport", caplog.text)


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_a_classifier_exports_the_single_label_problem_it_trained_on(problem: str, tmp_path: Path) -> None:
    """A base saved multi-label (or for regression) exported so: transformers' pipeline scored the classes with
    sigmoids (0.51, 0.50, 0.49), and its loss refused one label a row."""
    from transformers import AutoModelForSequenceClassification

    from tiny import saved_bert

    base = saved_bert(tmp_path / "base", {0: "a", 1: "b", 2: "c"}, problem_type=problem)
    spec = ModelSpec(task="sequence-classification", uri=f"file://{base}")
    tokenizer = load_tokenizer(ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2"))
    model = load_model(spec, tokenizer, seed=0)
    new_head(model, "classifier", 3, {0: "neg", 1: "neu", 2: "pos"}, reinitialize=False)
    model.save_pretrained(tmp_path / "out")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    inputs = tokenizer(["a fine day", "a bad one"], return_tensors="pt", padding=True)
    loss = exported(**inputs, labels=torch.tensor([0, 2])).loss
    expected = nn.functional.cross_entropy(exported(**inputs).logits, torch.tensor([0, 2]))
    torch.testing.assert_close(loss, expected)


def test_new_head_lora_and_a_checked_merge(bert, tmp_path: Path) -> None:
    model, tokenizer = bert
    _, _, batches = text_batches(tokenizer, Task.SEQUENCE_CLASSIFICATION, [0, 1, 2, 0, 1] * 4)
    assert new_head(model, "classifier", 3, {0: "neg", 1: "neu", 2: "pos"}, reinitialize=False)
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "pos"
    candidates = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    wrapped = add_adapters(model, LoraSpec(rank=4, variant="dora"), candidates, "classifier")
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert any("modules_to_save" in n and "classifier" in n for n in trainable)
    assert not any("attention.self.key" in n for n in trainable)
    as_if_trained(wrapped)
    before = logits_of(wrapped.eval(), batches[0].inputs)
    merged, check = merge_adapters(wrapped, batches[0].inputs)
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-4
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(logits_of(merged, batches[0].inputs), before, atol=1e-4, rtol=1e-4)
    files = export_model(merged, tokenizer, {0: "neg", 1: "neu", 2: "pos"}, _cfg(tmp_path), tmp_path / "out")
    assert {"model.safetensors", "config.json", "labels.json", "tokenizer.json"} <= set(files)
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits_of(reloaded.eval(), batches[0].inputs), before, atol=1e-4, rtol=1e-4)


def test_the_model_cards_code_loads_adapters_kept_apart_and_merged_weights(bert, tmp_path: Path) -> None:
    """Adapters kept apart from a published base need that base with a head of the job's size: the card says so in
    code that runs. Merged, the folder alone loads."""
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.export import model_card

    model, tokenizer = bert
    model.save_pretrained(tmp_path / "base")  # model.uri: a checkpoint with its own 2-label head
    _, _, batches = text_batches(tokenizer, Task.SEQUENCE_CLASSIFICATION, [0, 1, 2, 0, 1] * 4)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    new_head(model, "classifier", 3, labels, reinitialize=True)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["bert.encoder.layer.1.output.dense"], "classifier")
    as_if_trained(wrapped)
    logits = logits_of(wrapped.eval(), batches[0].inputs)
    doc = tiny_classifier_doc(tmp_path / "apart")
    doc["model"] = {"task": "sequence-classification", "uri": str(tmp_path / "base")}
    doc["rearrange"] = {"lora": {"rank": 4}, "mergeOnExport": False}
    cfg = TrainerConfig.model_validate(doc)
    report = {"evaluation": {"baseline": {}, "final": {}, "delta": {}}, "labels": labels,
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1}}
    merged = copy.deepcopy(wrapped).merge_and_unload()
    export_model(wrapped, tokenizer, labels, cfg, tmp_path / "apart")
    card = model_card(cfg, report, adapters_apart=True)
    assert "num_labels=3" in card and str(tmp_path / "base") in card
    torch.testing.assert_close(logits_of(card_model(card, tmp_path / "apart").eval(), batches[0].inputs), logits)
    export_model(merged, tokenizer, labels, cfg, tmp_path / "merged")
    card = model_card(cfg, report)
    torch.testing.assert_close(logits_of(card_model(card, tmp_path / "merged").eval(), batches[0].inputs), logits,
                               atol=1e-5, rtol=1e-4)


def test_the_model_cards_code_loads_adapters_kept_apart_onto_the_base_model_config_made(tmp_path: Path) -> None:
    """The job builds its base from model.uri with model.config's overrides (3 of MiniLM's 6 layers); adapters kept
    apart were to be loaded onto model.uri's base as published, 6 layers, which gave other logits. A key the card sets
    itself (num_labels: the head's size) is said once; one BERT's config lacks (GPT-2's n_layer), which the job
    drops, and one no keyword argument can be (global), are taken as the job took them."""
    from finetune_trainer.export import model_card

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "sequence-classification", "uri": "pvc://models/all-MiniLM-L6-v2",
                    "config": {"num_hidden_layers": 3, "num_labels": 2, "n_layer": 1, "global": "it's"}}
    doc["rearrange"] = {"lora": {"rank": 4}, "mergeOnExport": False}
    cfg = TrainerConfig.model_validate(doc)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, seed=0)
    assert len(model.bert.encoder.layer) == 3
    labels = {0: "neg", 1: "neu", 2: "pos"}
    new_head(model, "classifier", 3, labels, reinitialize=True)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["bert.encoder.layer.2.output.dense"], "classifier")
    as_if_trained(wrapped)
    _, _, batches = text_batches(tokenizer, Task.SEQUENCE_CLASSIFICATION, [0, 1, 2, 0, 1] * 4)
    logits = logits_of(wrapped.eval(), batches[0].inputs)
    export_model(wrapped, tokenizer, labels, cfg, tmp_path / "out")
    report = {"evaluation": {"baseline": {}, "final": {}, "delta": {}}, "labels": labels,
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1}}
    loaded = card_model(model_card(cfg, report, adapters_apart=True), tmp_path / "out").eval()
    assert len(loaded.base_model.model.bert.encoder.layer) == 3
    torch.testing.assert_close(logits_of(loaded, batches[0].inputs), logits)


def test_a_causal_lms_card_counts_chunks_not_samples(tmp_path: Path) -> None:
    """A language model's texts are cut into chunks of maxLength tokens, and the report counts those: its card
    said 466 training samples of a job of maxTrainSamples 128, as if the bound were ignored."""
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.export import model_card

    doc = tiny_classifier_doc(tmp_path) | {"model": {"task": "causal-lm", "architecture": "gpt2",
                                                     "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}}
    report = {"evaluation": {"baseline": {}, "final": {}, "delta": {}}, "labels": {},
              "training": {"train_samples": 466, "validation_samples": 246, "test_samples": 250, "steps": 1,
                           "seconds": 1, "samples_per_second": 9.5}}
    card = model_card(TrainerConfig.model_validate(doc), report)
    assert "(466 training, 246 validation, 250 test chunks of up to 32 tokens, cut from its texts)" in card
    assert "9.5 chunks/s" in card and "samples" not in card
    assert "250 test samples" in model_card(_cfg(tmp_path), report)


def _cfg(tmp_path: Path):
    from finetune_trainer.config import TrainerConfig

    return TrainerConfig.model_validate(tiny_classifier_doc(tmp_path))


def test_evaluate_classification_and_lm_metrics(bert) -> None:
    model, tokenizer = bert
    labels = [0, 1, 2, 0, 1] * 4
    new_head(model, "classifier", 3, {}, reinitialize=False)
    data, collate, _ = text_batches(tokenizer, Task.SEQUENCE_CLASSIFICATION, labels)
    got = evaluate(model, data, collate, Task.SEQUENCE_CLASSIFICATION, [Metric.ACCURACY, Metric.F1, Metric.LOSS],
                   8, CPU, num_labels=3)
    predictions = []
    with torch.no_grad():
        for idx in eval_batches(data.lengths, 8):
            predictions += [(i, int(p)) for i, p in zip(idx, logits_of(model.eval(), collate(data, idx).inputs).argmax(-1))]
    from sklearn.metrics import accuracy_score, f1_score

    truth = [labels[i] for i, _ in predictions]
    guess = [p for _, p in predictions]
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, guess))
    assert got["f1"] == pytest.approx(f1_score(truth, guess, average="macro"))
    assert macro_f1(torch.tensor([[2.0, 0.0], [0.0, 2.0]])) == 1.0
    lm, lm_tok = text_model(Task.CAUSAL_LM, TINY_GPT2, "gpt2")
    lm_data, lm_collate, _ = text_batches(lm_tok, Task.CAUSAL_LM)
    lm_metrics = evaluate(lm, lm_data, lm_collate, Task.CAUSAL_LM, [Metric.LOSS, Metric.PERPLEXITY], 8, CPU, 0)
    assert lm_metrics["perplexity"] == pytest.approx(torch.tensor(lm_metrics["loss"]).exp().item())
    assert 9 < lm_metrics["loss"] < 11  # a random model over a 30k vocabulary: about ln(30522) = 10.3


def test_image_model_and_batches(pvc_root: Path, tmp_path: Path) -> None:
    from finetune_trainer.data import load_dataset
    from finetune_trainer.config import DatasetSpec

    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=16), Task.IMAGE_CLASSIFICATION, 0)
    encoded = encode_images(data.train)
    batch = make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)(encoded, list(range(8)))
    assert batch.inputs["pixel_values"].shape == (8, 3, 32, 32)
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    assert head_name(model, Task.IMAGE_CLASSIFICATION) == "net.fc"
    assert new_head(model, "net.fc", 10, data.id2label, reinitialize=False)
    assert logits_of(model.eval(), batch.inputs).shape == (8, 10)
    layers = depth(model, Task.IMAGE_CLASSIFICATION)
    assert "net.layer4" in layers.units and layers.of("net.conv1.weight") == 0
    loss_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], [{"step": 2, "metrics": {"accuracy": 0.5}}],
               tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("task", [Task.IMAGE_CLASSIFICATION, Task.OBJECT_DETECTION])
def test_an_image_that_does_not_decode_is_the_users_naming_its_file(task: Task, tmp_path: Path) -> None:
    """A scraped .jpg that is an HTML page, or a file cut short by its upload, opens (or not) only when its batch is
    made: that is the dataset's fault (exit 1, naming the file), not the infrastructure's (exit 2, retried)."""
    import io

    from PIL import Image

    from finetune_trainer.detection.coco import Annotated
    from finetune_trainer.errors import DataError, exit_code_of

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, "JPEG")
    (cut := tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (page := tmp_path / "page.jpg").write_bytes(b"<html>Not found</html>")
    collate = make_collate(task, 0, 32)
    for broken in (cut, page):
        item = Annotated(str(broken), 64, 64) if task == Task.OBJECT_DETECTION else str(broken)
        with pytest.raises(DataError, match=f"{broken}: cannot read it as an image") as raised:
            collate(encode_images(Split([item], [0])), [0])
        assert exit_code_of(raised.value) == 1


@pytest.mark.parametrize("suffix, mode", [(".png", "I;16"), (".pgm", "I")])
def test_a_16_bit_grey_image_keeps_its_shades(tmp_path: Path, suffix: str, mode: str) -> None:
    """PIL's convert("RGB") clips a 16-bit PNG or PGM (medical, satellite scans) at 255: all but its darkest 1/256
    came out white. Scaled to 8 bits as torchvision scales 16-bit pixels, it is the image its 8-bit copy is."""
    import numpy as np
    from PIL import Image

    wide = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(wide).save(deep := tmp_path / f"deep{suffix}")
    Image.fromarray((wide / 257).round().astype(np.uint8)).save(flat := tmp_path / "flat.png")
    assert Image.open(deep).mode == mode
    collate = make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)
    pixels = collate(encode_images(Split([str(deep), str(flat)], [0, 0])), [0, 1]).inputs["pixel_values"]
    torch.testing.assert_close(pixels[0], pixels[1])


def test_a_floating_point_image_is_refused_naming_its_file(tmp_path: Path) -> None:
    """A 32-bit float TIFF (mode F, often 0..1) has no set range of colours: convert("RGB") clipped it at 0..255 and
    it trained as a black image, without a word."""
    import numpy as np
    from PIL import Image

    from finetune_trainer.errors import DataError, exit_code_of

    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(floating := tmp_path / "scan.tif")
    assert Image.open(floating).mode == "F"
    with pytest.raises(DataError, match=f"{floating}: a 32-bit floating-point image") as raised:
        make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)(encode_images(Split([str(floating)], [0])), [0])
    assert exit_code_of(raised.value) == 1


@pytest.mark.parametrize("architecture, units, below", [
    ("resnet18", [f"net.layer{i}" for i in range(1, 5)], {"net.conv1.weight", "net.bn1.weight", "net.bn1.bias"}),
    ("mobilenet_v3_small", [f"net.features.{i}" for i in range(13)], set()),
    ("vit", [f"net.encoder.layers.encoder_layer_{i}" for i in range(3)],
     {"net.class_token", "net.conv_proj.weight", "net.conv_proj.bias", "net.encoder.pos_embedding"}),
    ("maxvit_t", [f"net.blocks.{i}" for i in range(4)],  # its stages, not the third stage's 5 layers
     {"net.stem.0.0.weight", "net.stem.0.1.weight", "net.stem.0.1.bias", "net.stem.1.0.weight", "net.stem.1.0.bias"}),
])
def test_torchvision_layers_are_the_networks_blocks(architecture: str, units: list[str], below: set[str]) -> None:
    """ResNet's stages (not its stem's norm), MobileNet's features (not the classifier around its head), ViT's
    encoder layers (not the whole encoder): bottom-layers freezing counts them, and the head always trains."""
    import torchvision

    from finetune_trainer.models import ImageClassifier

    model = (tiny_vit() if architecture == "vit"
             else ImageClassifier(torchvision.models.get_model(architecture, num_classes=3), architecture))
    layers, head = depth(model, Task.IMAGE_CLASSIFICATION), head_name(model, Task.IMAGE_CLASSIFICATION)
    assert layers.units == units and layers.below == below
    freeze(model, FreezeSpec(strategy="bottom-layers", count=1), layers, head)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == below | {n for n, _ in model.named_parameters() if n.startswith(units[0] + ".")}



def tiny_vit():
    import torchvision

    from finetune_trainer.models import ImageClassifier

    return ImageClassifier(torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                                hidden_dim=16, mlp_dim=32, num_classes=3), "vit")


def tiny_swin():
    import torchvision

    from finetune_trainer.models import ImageClassifier

    net = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                             window_size=[2, 2], num_classes=3)
    return ImageClassifier(net, "swin")


@pytest.mark.parametrize(("build", "dropped", "first"), [  # of the 6 modules named, those never called, and the first
    (tiny_vit, 3, "net.encoder.layers.encoder_layer_0.self_attention.out_proj"),
    (tiny_swin, 4, "net.features.1.0.attn.qkv")])
def test_every_adapter_on_the_default_candidates_of_a_vit_or_swin_gets_a_gradient(build: Any, dropped: int, first: str,
                                                                                   caplog) -> None:
    """nn.MultiheadAttention (ViT's) reads its out_proj's weight and Swin's attention its qkv's and proj's without
    calling them, so their adapters got no gradient, and the trainable count held them. They are no candidates,
    and naming them is warned of, or refused where nothing else is named."""
    task = Task.IMAGE_CLASSIFICATION
    model = build()
    layers, head = depth(model, task), head_name(model, task)
    new_head(model, head, 3, {}, reinitialize=True)  # ViT's own is zeros, which pass no gradient down
    targets = lora_targets(model, LoraSpec(rank=2), task, FreezeSpec(), layers, head)
    wrapped = add_adapters(model, LoraSpec(rank=2, dropout=0), targets, head)
    logits_of(wrapped.train(), {"pixel_values": torch.randn(2, 3, 32, 32)}).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.any() for g in grads.values())
    named = LoraSpec(rank=2, targetModules=["out_proj", "qkv", "proj", "mlp.0"])
    assert all(t.endswith("mlp.0") for t in lora_targets(build(), named, task, FreezeSpec(), layers, head))
    assert ("finetune_trainer.adjust", logging.WARNING, f"rearrange.lora.targetModules: no adapters on {dropped} of "
            "the 6 modules named, whose weights their attention reads without calling them, so an adapter gets no "
            f"gradient ({first}, ...)") in caplog.record_tuples
    with pytest.raises(ConfigError, match=re.escape(
            f"rearrange.lora.targetModules ['out_proj', 'qkv']: their attention reads the weights of the modules they "
            f"name ({first}, ...) without calling them, so an adapter there gets no gradient; name others (the MLP's "
            "Linear layers)")):
        lora_targets(build(), LoraSpec(rank=2, targetModules=["out_proj", "qkv"]), task, FreezeSpec(), layers, head)


def test_an_adapter_on_the_stem_is_as_deep_as_the_stem() -> None:
    """ViT's patch projection sits below the stack: its adapters train at the stem's decayed rate (1e-3 x 0.5^4,
    not 1e-3) and a bottom-layers freeze covers them, as it covers the projection itself."""
    task = Task.IMAGE_CLASSIFICATION
    model = tiny_vit()
    layers, head = depth(model, task), head_name(model, task)
    wrapped = add_adapters(model, LoraSpec(rank=2), list(lora_candidates(model, task)), head)
    groups = param_groups(wrapped, AdjustSpec(learningRate=1e-3, layerwiseDecay=0.5), layers, head)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lr_of["base_model.model.net.conv_proj.lora_A.default.weight"] == pytest.approx(1e-3 * 0.5**4)
    frozen = FreezeSpec(strategy="bottom-layers", count=1)
    freeze(wrapped, frozen, layers, head)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if ".conv_proj." in n)
    assert any(p.requires_grad for n, p in wrapped.named_parameters() if ".encoder_layer_1." in n and "lora_" in n)



def test_vits_position_embedding_and_class_token_get_no_weight_decay() -> None:
    """Parameters held beside submodules are embeddings, as BERT's nn.Embedding ones are: they were decayed."""
    model = tiny_vit()
    layers, head = depth(model, Task.IMAGE_CLASSIFICATION), head_name(model, Task.IMAGE_CLASSIFICATION)
    groups = param_groups(model, AdjustSpec(weightDecay=0.01), layers, head)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay_of["net.encoder.pos_embedding"] == decay_of["net.class_token"] == 0.0
    assert decay_of["net.conv_proj.weight"] == decay_of["net.encoder.layers.encoder_layer_0.mlp.0.weight"] == 0.01
    # The attention's query-key-value projection is held beside its output projection, and is a layer's weight.
    assert decay_of["net.encoder.layers.encoder_layer_0.self_attention.in_proj_weight"] == 0.01

def test_lora_on_the_default_candidates_of_a_network_with_depthwise_convolutions_trains_and_merges() -> None:
    """MobileNet's depthwise convolutions are no candidates: peft refused them at rank 4 (groups=16), which failed
    every job with rearrange.lora and no targetModules on MobileNet, ConvNeXt, EfficientNet or RegNet."""
    task = Task.IMAGE_CLASSIFICATION
    model = load_model(ModelSpec(task="image-classification", architecture="mobilenet_v3_small"), None, seed=0)
    candidates = lora_candidates(model, task)
    assert "net.features.0.0" in candidates and "net.features.1.block.0.0" not in candidates  # the stem; depthwise
    wrapped = add_adapters(model, LoraSpec(rank=4), list(candidates), head_name(model, task))
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    logits_of(wrapped.train(), inputs).sum().backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_" in n)
    as_if_trained(wrapped)
    _, check = merge_adapters(wrapped, inputs)
    assert check["passed"]

def test_named_grouped_convolutions_take_no_adapters_where_the_export_merges_them(tmp_path: Path, caplog) -> None:
    """peft adapts a grouped convolution named in targetModules (at a rank divisible by its groups) but cannot merge
    it: the export rearrange.mergeOnExport asks for raised NotImplementedError after all of training, every retry."""
    task = Task.IMAGE_CLASSIFICATION
    model = load_model(ModelSpec(task="image-classification", architecture="mobilenet_v3_small"), None, seed=0)
    head, layers = head_name(model, task), depth(model, task)

    def targets(names: list[str], merging: bool) -> list[str]:
        lora = LoraSpec(rank=16, targetModules=names)
        return lora_targets(model, lora, task, FreezeSpec(), layers, head, merging=merging)

    grouped = "features.1.block.0.0"  # depthwise: 16 groups
    with pytest.raises(ConfigError, match=rf"^rearrange.lora.targetModules \['{grouped}'\]: they name grouped "
                                          rf"convolutions \(net.{grouped}, ...\), whose adapters peft cannot merge"):
        targets([grouped], merging=True)
    with caplog.at_level(logging.WARNING):
        assert targets([grouped, "features.0.0"], merging=True) == ["net.features.0.0"]
    assert f"no adapters on 1 of the 2 modules named, grouped convolutions, whose adapters peft cannot merge as " \
           f"rearrange.mergeOnExport asks (net.{grouped}, ...)" in caplog.text
    assert targets([grouped], merging=False) == [f"net.{grouped}"]  # exported apart: never merged
    doc = {"model": {"task": "image-classification", "architecture": "mobilenet_v3_small"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 32, "maxTrainSamples": 8, "maxEvalSamples": 8},
           "rearrange": {"lora": {"rank": 16, "targetModules": [grouped]}}, "evaluation": {"baseline": False},
           "training": {"maxSteps": 1, "batchSize": 4}, "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=r"rearrange.mergeOnExport false$"):
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")


def test_an_exported_image_classifier_loads_again_as_model_uri(pvc_root: Path, tmp_path: Path) -> None:
    """The export's config.json says how many labels its head has and which network it is, so the folder loads as
    model.uri (to fine-tune further or evaluate), with or without model.architecture, instead of failing on a
    1000-class head (or a resnet18) that its weights do not fit."""
    from finetune_trainer.config import DatasetSpec, TrainerConfig
    from finetune_trainer.data import load_dataset

    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=16), Task.IMAGE_CLASSIFICATION, 0)
    batch = make_collate(Task.IMAGE_CLASSIFICATION, 0, 32)(encode_images(data.train), list(range(8)))
    spec = ModelSpec(task="image-classification", architecture="mobilenet_v3_small")
    model = load_model(spec, None, seed=0)
    new_head(model, "net.classifier.3", 10, data.id2label, reinitialize=False)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "output": {"uri": str(tmp_path / "out")}})
    export_model(model, None, data.id2label, cfg, tmp_path / "out")
    for named in (spec, ModelSpec(task="image-classification", uri=str(tmp_path / "out"))):
        reloaded = load_vision_model(named.model_copy(update={"uri": str(tmp_path / "out")}))
        assert reloaded.architecture == "mobilenet_v3_small" and reloaded.net.classifier[3].out_features == 10
        torch.testing.assert_close(logits_of(reloaded.eval(), batch.inputs), logits_of(model.eval(), batch.inputs))


def test_an_exported_image_classifiers_head_keeps_its_classes_when_the_dataset_numbers_them_otherwise(
        pvc_root: Path, tmp_path: Path) -> None:
    """An export of ours fine-tuned again on data that numbers its classes in another order (a hub dataset's
    ClassLabel order, then an image folder's sorted names): the head was kept as it was, so its class 0 trained and
    scored as the dataset's class 0, another class. As for a text classifier, the data takes the head's ids by name,
    from the export's labels.json."""
    from finetune_trainer.config import DatasetSpec, TrainerConfig
    from finetune_trainer.data import load_dataset
    from finetune_trainer.pipeline import trained_head_order

    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=16), Task.IMAGE_CLASSIFICATION, 0)
    reversed_names = {i: data.id2label[9 - i] for i in range(10)}
    spec = ModelSpec(task="image-classification", architecture="mobilenet_v3_small")
    model = load_model(spec, None, seed=0)
    new_head(model, "net.classifier.3", 10, reversed_names, reinitialize=False)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "output": {"uri": str(tmp_path)}})
    export_model(model, None, reversed_names, cfg, tmp_path)
    reloaded = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    assert reloaded.labels == reversed_names
    assert trained_head_order(reloaded, data.id2label, 10, reinitialize=False) == list(range(9, -1, -1))
    assert trained_head_order(reloaded, data.id2label, 10, reinitialize=True) is None
    assert trained_head_order(load_model(spec, None, seed=0), data.id2label, 10, reinitialize=False) is None


def test_an_image_classifier_with_a_head_wider_than_its_labels_loads_again(tmp_path: Path) -> None:
    """rearrange.head.numLabels may exceed the dataset's labels; config.json's numLabels is the head's size, which
    the weights have, not the label count."""
    from finetune_trainer.config import TrainerConfig

    labels = {0: "a", 1: "b", 2: "c"}
    spec = ModelSpec(task="image-classification", architecture="resnet18")
    model = load_model(spec, None, seed=0)
    new_head(model, "net.fc", 5, labels, reinitialize=False)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "rearrange": {"head": {"numLabels": 5}}, "output": {"uri": str(tmp_path)}})
    export_model(model, None, labels, cfg, tmp_path)
    reloaded = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(logits_of(reloaded.eval(), {"pixel_values": pixels}),
                               logits_of(model.eval(), {"pixel_values": pixels}))


def test_a_new_head_on_an_exported_image_classifier_has_its_own_names_and_size(tmp_path: Path) -> None:
    """An export of ours loads with its labels.json's names and its builder's num_classes; a head new_head puts in
    their place had them still: models.head_labels read the old classes (cat, dog, old_spare) for a fresh head, and
    a distillation's teacher naming the job's spare class otherwise was refused (or matched to a stale name)."""
    from finetune_trainer.data import by_number
    from finetune_trainer.distill import label_columns
    from finetune_trainer.models import ImageClassifier, head_labels

    spec = ModelSpec(task="image-classification", architecture="resnet18")
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "output": {"uri": str(tmp_path)}})
    first = load_model(spec, None, seed=0)
    new_head(first, "net.fc", 3, {0: "cat", 1: "dog", 2: "old_spare"}, reinitialize=False)
    export_model(first, None, {0: "cat", 1: "dog", 2: "old_spare"}, cfg, tmp_path / "first")
    exported = ModelSpec(task="image-classification", uri=str(tmp_path / "first"))
    student = load_vision_model(exported)
    assert head_labels(student) == ({0: "cat", 1: "dog", 2: "old_spare"}, 3)

    assert new_head(student, "net.fc", 3, {0: "x", 1: "y"}, reinitialize=True)
    assert head_labels(student) == ({0: "x", 1: "y", 2: "LABEL_2"}, 3)
    teacher = ImageClassifier(torchvision_resnet18(3), "resnet18", {"num_classes": 3}, {0: "x", 1: "y", 2: "bird"})
    assert label_columns(teacher, {0: "x", 1: "y"}, 3, "t", by_number(head_labels(student)[0])) is None

    student = load_vision_model(exported)
    assert new_head(student, "net.fc", 4, {0: "x", 1: "y"}, reinitialize=False)
    assert head_labels(student) == ({0: "x", 1: "y", 2: "LABEL_2", 3: "LABEL_3"}, 4)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "rearrange": {"head": {"numLabels": 4}}, "output": {"uri": str(tmp_path)}})
    export_model(student, None, {0: "x", 1: "y"}, cfg, tmp_path / "second")
    written = json.loads((tmp_path / "second" / "config.json").read_text())
    assert (written["config"].get("num_classes"), written["numLabels"]) == (4, 4)
    assert json.loads((tmp_path / "second" / "labels.json").read_text()) == {"0": "x", "1": "y"}
    assert head_labels(load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path / "second")))) == \
        ({0: "x", 1: "y"}, 4)


def torchvision_resnet18(classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


def test_an_image_classifiers_adapters_kept_apart_reload_on_the_base_exported_beside_them(tmp_path: Path) -> None:
    """A torchvision network built from its config (random weights) with adapters not merged: the export holds the
    network as config.json and model.safetensors, which load_vision_model reads and peft's adapters go onto."""
    from peft import PeftModel

    from finetune_trainer.config import TrainerConfig

    labels = {0: "a", 1: "b", 2: "c"}
    spec = ModelSpec(task="image-classification", architecture="resnet18")
    model = load_model(spec, None, seed=0)
    new_head(model, "net.fc", 3, labels, reinitialize=False)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["net.layer4.1.conv2"], "net.fc")
    as_if_trained(wrapped)
    pixels = {"pixel_values": torch.rand(2, 3, 32, 32)}
    logits = logits_of(wrapped.eval(), pixels)
    merged = copy.deepcopy(wrapped).merge_and_unload()  # the export takes the adapters out of `wrapped`
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                        "rearrange": {"mergeOnExport": False, "lora": {"rank": 4}},
                                        "output": {"uri": str(tmp_path)}})
    export_model(wrapped, None, labels, cfg, tmp_path)
    base = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, pixels), logits)

    # The same job again with mergeOnExport (its default), into the same folder: the adapters are in the weights
    # now, and the old adapter/ is gone (publish removes it), so nothing can apply them a second time.
    with export.staging(tmp_path) as staged:
        export.publish(staged, tmp_path, json.dumps({"files": export_model(merged, None, labels, cfg, staged)}))
    assert not (tmp_path / "adapter").exists()
    reloaded = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path))).eval()
    torch.testing.assert_close(logits_of(reloaded, pixels), logits)


def test_an_image_classifier_fine_tuned_again_from_its_export_keeps_its_builder_settings(tmp_path: Path) -> None:
    """A job whose model.uri is an export (model.config unset) builds the network with the settings that export's
    config.json records; its own export records them again, else that one builds another network."""
    from finetune_trainer.config import TrainerConfig

    labels = {i: str(i) for i in range(10)}
    pixels = {"pixel_values": torch.rand(2, 3, 32, 32)}
    spec = ModelSpec(task="image-classification", architecture="mobilenet_v3_small",
                     config={"reduced_tail": True, "num_classes": 10})
    for out in (tmp_path / "first", tmp_path / "second"):
        model = load_model(spec, None, seed=0)
        cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "dataset": {"uri": "pvc://data/digits"},
                                            "output": {"uri": str(out)}})
        export_model(model, None, labels, cfg, out)
        spec = ModelSpec(task="image-classification", uri=str(out))
        reloaded = load_vision_model(spec)
        torch.testing.assert_close(logits_of(reloaded.eval(), pixels), logits_of(model.eval(), pixels))



@pytest.mark.parametrize("architecture", ["googlenet", "inception_v3"])
def test_an_image_classifier_with_side_heads_trains_and_loads_again_as_exported(architecture: str,
                                                                                 tmp_path: Path) -> None:
    """GoogLeNet's and Inception v3's side classifiers kept 1000 outputs beside a new head of 3, where the export's
    reload builds them with its numLabels (3): the export did not load. They are dropped where the network is built,
    so training, the export and its reload have the same network, which gives logits alone in train mode too."""
    labels = {0: "a", 1: "b", 2: "c"}
    spec = ModelSpec(task="image-classification", architecture=architecture)
    model = load_model(spec, None, seed=0)
    new_head(model, head_name(model, Task.IMAGE_CLASSIFICATION), 3, labels, reinitialize=False)
    pixels = {"pixel_values": torch.rand(2, 3, 80, 80)}
    assert logits_of(model.train(), pixels).shape == (2, 3)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "output": {"uri": str(tmp_path)},
                                        "dataset": {"uri": "pvc://data/digits", "imageSize": 80}})
    export_model(model, None, labels, cfg, tmp_path)
    reloaded = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    torch.testing.assert_close(logits_of(reloaded.eval(), pixels), logits_of(model.eval(), pixels))


def test_torchvision_weights_of_googlenet_take_inputs_at_the_scale_they_were_trained_on(tmp_path: Path) -> None:
    """torchvision builds GoogLeNet and Inception v3 with transform_input for its weights, which turns ImageNet's
    normalisation into the [-1, 1] they were trained on; built with weights=None it was off, and a torchvision weights
    file trained on inputs at another scale. The export records the setting, so its reload is the same network; an
    export of ours is built as it records (here without it)."""
    import torchvision

    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    (tmp_path / "tv").mkdir()
    torch.save(net.state_dict(), tmp_path / "tv" / "model.pth")
    spec = ModelSpec(task="image-classification", architecture="googlenet", uri=str(tmp_path / "tv"))
    model = load_vision_model(spec)
    cfg = TrainerConfig.model_validate({"model": spec.to_wire(), "output": {"uri": str(tmp_path / "out")},
                                        "dataset": {"uri": "pvc://data/digits", "imageSize": 64}})
    export_model(model, None, {}, cfg, tmp_path / "out")
    reloaded = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path / "out")))
    assert model.net.transform_input and reloaded.net.transform_input
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps(config | {"config": {}}))
    assert not load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path / "out"))).net.transform_input


def test_the_weights_a_step_saves_for_its_backward_are_no_activations() -> None:
    """A Linear saves Wᵀ, a view of its weight, for the backward: counted as an activation it doubled the weights
    in the memory model (4.2 MB of "activations" here, where a batch of 2 saves 16 KB of inputs)."""
    from finetune_trainer.analyze import measure_step

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    model = Net()
    batch = Batch({"x": torch.randn(2, 1024)}, torch.zeros(2, dtype=torch.long), 2, 2, 2)
    probe = measure_step(model, lambda b: model(**b.inputs).logsumexp(-1).mean(), [batch], None)
    assert probe["activations"] < 64 * 1024, probe

MEMORY_PROBE = """
import json, sys, torch
from finetune_trainer.analyze import analyze
from finetune_trainer.batches import Batch
from finetune_trainer.config import ModelSpec, Task
from finetune_trainer.models import load_model, load_tokenizer
task = Task(sys.argv[1])
if task == Task.CAUSAL_LM:  # a small GPT-2 with a 30k vocabulary: the logits and their gradient dominate
    spec = ModelSpec(task=task, architecture="gpt2", config={"n_layer": 2, "n_head": 4, "n_embd": 128},
                     tokenizerUri="pvc://models/all-MiniLM-L6-v2")
else:
    spec = ModelSpec(uri="pvc://models/all-MiniLM-L6-v2", task=task)
model = load_model(spec, load_tokenizer(spec), 0)
ids = torch.randint(1000, 2000, (32, 48))
labels = ids if task == Task.CAUSAL_LM else ids[:, 0] % 2  # a class per sample
batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, 32, 1536, 1536)
print(json.dumps(analyze(model, [batch], task, 2, adapters=False).memory))
"""


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_the_memory_model_matches_the_measured_peak_of_a_real_step(task: str) -> None:
    """A 32 x 48-token step in a fresh process, as in a job: the modelled memory of the probe (weights,
    gradients, saved activations, the backward's transient) against its measured peak (peak RSS on a CPU)."""
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, task], capture_output=True, text=True, timeout=300,
                          check=True)
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    assert memory["measured_by"] == "weights + peak RSS rise"
    assert 0.8 < memory["measured_probe_peak"] / memory["probe_model"] < 1.25, memory


def test_a_trained_head_keeps_its_labels_when_the_dataset_orders_them_otherwise(tmp_path: Path) -> None:
    """A fine-tuned classifier (roberta-large-mnli: CONTRADICTION, NEUTRAL, ENTAILMENT) on a dataset whose sorted
    labels put them in another order: the head was kept as it was and the dataset's ids given to it, so its
    POSITIVE output scored as negative (a baseline of noise, and training had to swap the outputs back). Now the
    dataset's labels take the head's ids, as transformers' run_glue maps them."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import DatasetSpec, TrainerConfig
    from finetune_trainer.data import load_dataset

    model, tokenizer = text_model(Task.SEQUENCE_CLASSIFICATION, TINY_BERT, "bert")
    new_head(model, "classifier", 3, {0: "POSITIVE", 1: "NEGATIVE", 2: "NEUTRAL"}, reinitialize=True)
    with torch.no_grad():  # a head that answers POSITIVE whatever the text
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    model.save_pretrained(tmp_path / "model")
    doc = tiny_classifier_doc(tmp_path / "out", maxSteps=1)
    doc["model"] = {"task": "sequence-classification", "uri": str(tmp_path / "model"),
                    "tokenizerUri": "pvc://models/all-MiniLM-L6-v2"}
    doc["adjust"]["learningRate"] = 1e-9
    cfg = TrainerConfig.model_validate(doc)
    report = pipeline.run(cfg, tmp_path / "out")
    data = load_dataset(cfg.dataset, Task.SEQUENCE_CLASSIFICATION, 0)
    test_labels = [data.id2label[label] for label in data.test.labels]
    assert report["evaluation"]["baseline"]["accuracy"] == pytest.approx(test_labels.count("positive") / len(test_labels))
    assert report["labels"] == {"0": "positive", "1": "negative", "2": "neutral"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == report["labels"]


def test_a_frozen_image_backbone_keeps_its_batchnorm_statistics(tmp_path: Path) -> None:
    """adjust.freeze all-but-head on a trained ResNet (a linear probe): its frozen batch norm layers ran in training
    mode, so each step moved their running statistics towards the new data's batches, and the export's backbone
    was no longer the one loaded, nor the one the baseline scored. Frozen, they keep their statistics too."""
    from safetensors.torch import save_file

    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig

    trained = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0).net
    save_file(trained.state_dict(), tmp_path / "model.safetensors")
    doc = {"model": {"task": "image-classification", "architecture": "resnet18", "uri": str(tmp_path)},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16, "maxTrainSamples": 32, "maxEvalSamples": 16},
           "analyze": {"probeBatches": 1}, "adjust": {"freeze": {"strategy": "all-but-head"}},
           "evaluation": {"baseline": False}, "training": {"maxSteps": 2, "batchSize": 8},
           "output": {"uri": str(tmp_path / "out")}}
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    exported = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path / "out"))).net.state_dict()
    for name, value in trained.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(exported[name], value), name


def test_an_exported_image_classifier_says_how_its_input_is_made(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits example trains at 16x16 pixels; its export's config.json and card said nothing of the input, so a
    user fed it 224-pixel images (or unnormalised ones) and got noise. config.json records the size and the
    normalisation, and the card's code makes the input from image files as training did."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.data import load_dataset

    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16, "maxTrainSamples": 32, "maxEvalSamples": 16},
           "analyze": {"probeBatches": 1}, "evaluation": {"baseline": False},
           "training": {"maxSteps": 1, "batchSize": 8}, "output": {"uri": str(tmp_path / "out")}}
    cfg = TrainerConfig.model_validate(doc)
    pipeline.run(cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["imageSize"], config["mean"], config["std"]) == (16, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    code = (tmp_path / "out" / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    card: dict = {}
    monkeypatch.chdir(tmp_path / "out")
    exec(code, card)  # what a user pastes, run from the export's folder
    test = load_dataset(cfg.dataset, Task.IMAGE_CLASSIFICATION, 0).test
    batch = make_collate(Task.IMAGE_CLASSIFICATION, 0, 16)(encode_images(test), [0, 1])
    inputs = card["preprocess"](test.inputs[:2])
    torch.testing.assert_close(inputs["pixel_values"], batch.inputs["pixel_values"])
    model = card["model"]
    assert not model.training  # as transformers' from_pretrained gives it: batch norm on its statistics
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[:1], model(**card["preprocess"](test.inputs[:1])))


def test_an_image_classifier_fine_tuned_again_at_another_size_than_its_export_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The digits export (16 pixels) given as model.uri without dataset.imageSize, which the CRD defaults to 224,
    scored chance at its baseline (0.08, not 0.88) with no word of why; the log says what to set."""
    from finetune_trainer.models import check_image_size

    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16}, "output": {"uri": str(tmp_path)}}
    export_model(load_model(ModelSpec.model_validate(doc["model"]), None, seed=0), None, {},
                 TrainerConfig.model_validate(doc), tmp_path)
    model = load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    with caplog.at_level("WARNING", logger="finetune_trainer.models"):
        check_image_size(model, 16)
        assert not caplog.records
        check_image_size(model, 224)
    assert "trained on 16x16 images (its config.json imageSize) and dataset.imageSize 224" in caplog.text
    assert "set dataset.imageSize 16" in caplog.text


def test_an_image_size_the_network_cannot_take_is_the_users_naming_the_field(tmp_path: Path) -> None:
    """ViT-B/16 takes 224x224 images only: at dataset.imageSize 32 its first forward (in the analysis) raised torch's
    AssertionError, an infrastructure failure (exit 2) that the operator retried. It is a mistake of the spec's."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.errors import ConfigError, exit_code_of

    doc = {"model": {"task": "image-classification", "architecture": "vit_b_16"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 32, "maxTrainSamples": 16, "maxEvalSamples": 8},
           "training": {"maxSteps": 1, "batchSize": 8}, "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=r"dataset.imageSize 32: model vit_b_16 cannot take 32x32 images "
                                          r"\(AssertionError: Wrong image height! .*\); 224 fits") as raised:
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert exit_code_of(raised.value) == 1


def test_batches_of_one_image_that_a_training_batch_norm_cannot_take_are_refused_naming_the_fields(
        tmp_path: Path) -> None:
    """ResNet shrinks 16x16 images to 1x1 before its last batch norms, which cannot normalise one value per channel:
    training.batchSize 1 raised torch's ValueError at the first step (exit 2, retried). Frozen, they take one."""
    from finetune_trainer import pipeline
    from finetune_trainer.errors import exit_code_of
    from finetune_trainer.models import check_one_sample_batches

    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16, "maxTrainSamples": 8, "maxEvalSamples": 8},
           "evaluation": {"baseline": False}, "training": {"maxSteps": 1, "batchSize": 1},
           "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=r"^training.batchSize 1: model resnet18 cannot train on one 16x16 image at "
                                          r"a time \(dataset.imageSize; Expected more than 1 value per channel") as raised:
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert exit_code_of(raised.value) == 1 and not (tmp_path / "out" / "model.safetensors").exists()
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    check_one_sample_batches(model, 64, 1, 8)  # 2x2 at the last batch norms: four values per channel
    freeze(model, FreezeSpec(strategy="all-but-head"), depth(model, Task.IMAGE_CLASSIFICATION), "net.fc")
    check_one_sample_batches(model, 16, 1, 8)
    assert model.training


def test_a_training_split_of_one_image_is_refused_where_a_batch_norm_cannot_take_it(tmp_path: Path) -> None:
    """One training sample at training.batchSize 4 makes a batch of one (epoch_batches has no row to join it to):
    ResNet's batch norms at 16 pixels raised torch's ValueError at the first step (exit 2, retried). Two samples, or
    five at 4 (the last one joins the batch before it), make no batch of one."""
    from finetune_trainer.errors import exit_code_of
    from finetune_trainer.models import check_one_sample_batches

    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16, "maxTrainSamples": 1, "maxEvalSamples": 8},
           "evaluation": {"baseline": False}, "training": {"maxSteps": 1, "batchSize": 4},
           "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=r"^training.batchSize 4: 1 training sample makes a batch of one: model "
                                          r"resnet18 cannot train on one 16x16 image at a time \(dataset.imageSize; "
                                          r"Expected more than 1 value .*dataset.maxTrainSamples") as raised:
        pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert exit_code_of(raised.value) == 1
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    for samples in (2, 5):
        check_one_sample_batches(model, 16, 4, samples)
    # at batchSize 1 both are named: a larger batchSize alone, or more samples alone, is refused again
    with pytest.raises(ConfigError, match=r"^training.batchSize 1: 1 training sample makes a batch of one: .*"
                                          r"train on 2 samples or more \(.*\) and set training.batchSize 2 or more"):
        check_one_sample_batches(model, 16, 1, 1)


@pytest.mark.parametrize("form", ["MergedLoRA", "AccumulatedLoRA"])
def test_batches_of_one_image_are_taken_by_a_network_with_fused_lora_and_no_batch_norm_that_trains(form: str) -> None:
    """ConvNeXt with LoRA, dropout 0 (adapters fused, lora_fused): the meta-device forward of the batch-size-1 check
    raised in compute_dtype (no autocast state on meta), and that RuntimeError was taken for a batch norm's refusal,
    though ConvNeXt's layer norms train on one image. Only the batch norm's own error refuses."""
    from finetune_trainer import lora_fused
    from finetune_trainer.models import check_one_sample_batches

    model = load_model(ModelSpec(task="image-classification", architecture="convnext_tiny"), None, seed=0)
    task, spec = Task.IMAGE_CLASSIFICATION, LoraSpec(dropout=0.0)
    head, layers = head_name(model, task), depth(model, task)
    wrapped = add_adapters(model, spec, lora_targets(model, spec, task, FreezeSpec(), layers, head), head)
    assert lora_fused.fuse(wrapped, getattr(lora_fused, form)) > 0
    check_one_sample_batches(wrapped, 32, 1, 8)


class ClampedByValue(nn.Module):
    """A module whose forward reads a value (as a data-dependent branch does): the meta device has none to give."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.abs().max().item() < 1e4 else x.clamp(-1e4, 1e4)


def test_batches_of_one_image_are_refused_only_for_a_batch_norms_own_error() -> None:
    """Another error of the one-image forward on the meta device (here a value read, which meta cannot give) says
    nothing of batch norms: it was refused as if one could not train on one image, though the network has none."""
    from finetune_trainer.models import ImageClassifier, check_one_sample_batches

    net = nn.Sequential(nn.Conv2d(3, 4, 3), ClampedByValue(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    check_one_sample_batches(ImageClassifier(net, "clamped"), 8, 1, 8)
    net.insert(3, nn.BatchNorm2d(4))  # after the pooling: one value per channel
    net.pop(1)
    with pytest.raises(ConfigError, match="Expected more than 1 value per channel when training"):
        check_one_sample_batches(ImageClassifier(net, "pooled-then-normed"), 8, 1, 8)


def test_an_image_classifiers_adapters_kept_apart_load_on_model_uris_base_as_the_card_says(tmp_path: Path) -> None:
    """LoRA on a MobileNet given as a plain state dict (model.uri, model.architecture), mergeOnExport false: the
    card's code loaded model.uri without its architecture (so as a ResNet-18, which the weights do not fit) and with
    the base's 1000-class head, which the adapter's 10-class head does not fit. It loads the model that was scored."""
    from safetensors.torch import save_file

    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.data import load_dataset

    spec = ModelSpec(task="image-classification", architecture="mobilenet_v3_small")
    (tmp_path / "base").mkdir()
    save_file(load_model(spec, None, seed=0).net.state_dict(), tmp_path / "base" / "model.safetensors")
    doc = {"model": spec.to_wire() | {"uri": str(tmp_path / "base")},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 32, "maxTrainSamples": 32, "maxEvalSamples": 16},
           "analyze": {"probeBatches": 1}, "rearrange": {"lora": {"rank": 4}, "mergeOnExport": False},
           "evaluation": {"metrics": ["loss", "accuracy"], "baseline": False},
           "training": {"maxSteps": 2, "batchSize": 8}, "output": {"uri": str(tmp_path / "out")}}
    cfg = TrainerConfig.model_validate(doc)
    report = pipeline.run(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "adapter").is_dir() and not (tmp_path / "out" / "model.safetensors").exists()
    model = card_model((tmp_path / "out" / "README.md").read_text(), tmp_path / "out")
    test = encode_images(load_dataset(cfg.dataset, Task.IMAGE_CLASSIFICATION, 0).test)
    scores = evaluate(model, test, make_collate(Task.IMAGE_CLASSIFICATION, 0, 32), Task.IMAGE_CLASSIFICATION,
                      cfg.evaluation_metrics, 8, CPU, 10)
    assert scores == pytest.approx(report["evaluation"]["final"], rel=1e-5)


def test_an_image_classifier_sees_a_photo_upright_as_its_exif_orientation_turns_it(tmp_path: Path) -> None:
    """A phone stores a portrait photo sideways and says in its EXIF orientation how to turn it, as every viewer
    (and the hub's datasets, and transformers' load_image) does: such photos trained on their side, unlike the
    ones stored upright, and unlike what a server that loads images upright feeds the export."""
    from PIL import Image

    upright = Image.new("RGB", (4, 8), (255, 255, 255))
    upright.paste((0, 0, 0), (0, 0, 4, 4))  # black on top
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 turns back: 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "sideways.png", exif=exif)
    collate = make_collate(Task.IMAGE_CLASSIFICATION, 0, 8)
    pixels = collate(encode_images(Split([str(tmp_path / "upright.png"), str(tmp_path / "sideways.png")], [0, 0])),
                     [0, 1]).inputs["pixel_values"]
    torch.testing.assert_close(pixels[1], pixels[0])


def test_an_image_classifier_sees_transparent_pixels_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """Two PNG icons alike to the eye, their transparent pixels hiding black in one and noise in the other (as
    editors leave them): RGB conversion showed the hidden colours, a background that differed from file to file
    for the model to learn. Over white, as transformers' image processors put them, they are the same image; a
    palette image's transparent colour too."""
    import numpy as np
    from PIL import Image

    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:6, 2:6] = 255  # a red square on a transparent background
    hidden = {"black": np.zeros((8, 8, 3), np.uint8),
              "noise": np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)}
    for name, rgb in hidden.items():
        rgb = rgb.copy()
        rgb[2:6, 2:6] = (255, 0, 0)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / f"{name}.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (2, 2, 6, 6))
    palette.save(tmp_path / "palette.png", transparency=0)
    shown = np.full((8, 8, 3), 255, np.uint8)
    shown[2:6, 2:6] = (255, 0, 0)
    Image.fromarray(shown).save(tmp_path / "shown.png")
    paths = [str(tmp_path / f"{name}.png") for name in ("shown", "black", "noise", "palette")]
    pixels = make_collate(Task.IMAGE_CLASSIFICATION, 0, 8)(encode_images(Split(paths, [0] * 4)), [0, 1, 2, 3])
    for other in pixels.inputs["pixel_values"][1:]:
        torch.testing.assert_close(other, pixels.inputs["pixel_values"][0])


def test_weights_that_do_not_fit_the_image_network_say_what_to_set(tmp_path: Path) -> None:
    """A torchvision state dict as model.uri: without model.architecture it was tried as a ResNet-18, and a checkpoint
    of one's own with a 10-class head did not fit the builder's 1000; torch's message lists every key and says
    neither. The message names the field to set."""
    from safetensors.torch import save_file

    from finetune_trainer.errors import ModelError

    net = load_model(ModelSpec(task="image-classification", architecture="mobilenet_v3_small",
                               config={"num_classes": 10}), None, seed=0).net
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"do not fit resnet18, which model.architecture \(not set\) defaults to: set "
                                         r"it to the network they are for \(Error"):
        load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))
    with pytest.raises(ModelError, match=r"do not fit mobilenet_v3_small: their head \(classifier.3\) has 10 classes; "
                                         r"set model.config num_classes: 10 \(Error"):
        load_vision_model(ModelSpec(task="image-classification", architecture="mobilenet_v3_small", uri=str(tmp_path)))
    reloaded = load_vision_model(ModelSpec(task="image-classification", architecture="mobilenet_v3_small",
                                           config={"num_classes": 10}, uri=str(tmp_path)))
    assert reloaded.net.classifier[3].out_features == 10
    # a ResNet-18 of one's own, model.architecture not set: resnet18 is right, the head is what to set
    resnet = load_model(ModelSpec(task="image-classification", architecture="resnet18", config={"num_classes": 10}),
                        None, seed=0).net
    save_file(resnet.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"do not fit resnet18: their head \(fc\) has 10 classes; set model.config "
                                         r"num_classes: 10 \(Error"):
        load_vision_model(ModelSpec(task="image-classification", uri=str(tmp_path)))


def test_a_transformers_image_model_is_refused_by_name(tmp_path: Path) -> None:
    """The hub's ViT as model.uri did not fit resnet18, and the message told to set model.architecture, which no
    torchvision network satisfies; it is named as what the trainer does not load."""
    from transformers import ViTConfig, ViTForImageClassification

    from finetune_trainer.errors import ModelError

    ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=16, image_size=16, patch_size=8)).save_pretrained(tmp_path)
    for architecture in (None, "vit_b_16"):
        with pytest.raises(ModelError, match=r"a transformers model \(ViTForImageClassification\), which "
                                             r"image-classification does not load: it fine-tunes a torchvision network"):
            load_vision_model(ModelSpec(task="image-classification", architecture=architecture, uri=str(tmp_path)))


def test_a_checkpoint_of_torchvisions_reference_scripts_loads_as_model_uri(tmp_path: Path) -> None:
    """torchvision's references/classification/train.py saves {"model": ..., "optimizer": ..., "args": Namespace}: the
    Namespace stopped torch.load(weights_only=True) with UnpicklingError, an infrastructure failure (exit 2) that was
    retried, and its weights under "model" were never looked for. A whole pickled model is refused as the user's."""
    import argparse

    from finetune_trainer.errors import ModelError, exit_code_of

    net = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0).net
    torch.save({"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "epoch": 89, "args": argparse.Namespace(model="resnet18", lr=0.1)}, tmp_path / "checkpoint.pth")
    loaded = load_vision_model(ModelSpec(task="image-classification", architecture="resnet18",
                                         uri=str(tmp_path / "checkpoint.pth")))
    for name, value in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[name], value), name
    # and weights saved through nn.DataParallel or DDP ("module.conv1.weight"), and torch.compile ("_orig_mod.")
    torch.save({f"_orig_mod.module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "wrapped.pth")
    loaded = load_vision_model(ModelSpec(task="image-classification", architecture="resnet18",
                                         uri=str(tmp_path / "wrapped.pth")))
    torch.testing.assert_close(loaded.net.state_dict(), net.state_dict())
    torch.save(net, tmp_path / "whole.pth")
    with pytest.raises(ModelError, match=r"whole.pth: holds Python objects besides tensors .* save its state_dict\(\) "
                                         r"instead \(.*Unsupported global: GLOBAL torchvision.models.resnet.ResNet"
                       ) as raised:
        load_vision_model(ModelSpec(task="image-classification", architecture="resnet18", uri=str(tmp_path / "whole.pth")))
    assert exit_code_of(raised.value) == 1


def test_named_lora_targets_keep_off_what_the_freeze_freezes(bert, caplog) -> None:
    """rearrange.lora.targetModules once bypassed the freeze: all-but-head with targetModules [query, value] put
    adapters everywhere, the freeze then froze them all, and the job trained the head alone, merging adapters
    that had not moved."""
    model, _ = bert
    task = Task.SEQUENCE_CLASSIFICATION
    layers, head = depth(model, task), head_name(model, task)
    lora = LoraSpec(rank=2, targetModules=["query"])
    with pytest.raises(ConfigError, match=re.escape(
            "rearrange.lora.targetModules ['query']: adjust.freeze (strategy all-but-head) freezes every module they "
            "name that would take an adapter, so no adapter would train; freeze less or name modules that train")):
        lora_targets(model, lora, task, FreezeSpec(strategy="all-but-head"), layers, head)
    spec = FreezeSpec(strategy="bottom-layers", count=1)
    targets = lora_targets(model, lora, task, spec, layers, head)
    assert targets == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(1, layers.layers)]
    assert ("finetune_trainer.adjust", logging.WARNING, f"rearrange.lora.targetModules: no adapters on 1 of the "
            f"{layers.layers} modules named, which adjust.freeze (strategy bottom-layers) freezes "
            "(bert.encoder.layer.0.attention.self.query, ...)") in caplog.record_tuples
    freeze(model, spec, layers, head)
    wrapped = add_adapters(model, lora, targets, head)
    freeze(wrapped, spec, layers, head)  # as the pipeline does after rearranging
    adapters = {n: p.requires_grad for n, p in wrapped.named_parameters() if "lora_" in n}
    assert adapters and all(adapters.values())


def test_named_lora_targets_that_train_whole_are_not_said_to_be_frozen(bert, caplog) -> None:
    """A module the checkpoint lacks (RoBERTa's classifier.dense; the pooler here) trains whole though the pattern
    covers it, yet was listed among the named modules the freeze leaves without adapters; a list naming only the
    head was refused as 'adjust.freeze freezes every LoRA candidate' though nothing froze."""
    model, _ = bert
    task, new = Task.SEQUENCE_CLASSIFICATION, ("bert.pooler.dense",)
    layers, head = depth(model, task), head_name(model, task)
    spec, lora = FreezeSpec(strategy="regex", pattern="pooler"), LoraSpec(rank=2, targetModules=["dense"])
    targets = lora_targets(model, lora, task, spec, layers, head, new)
    assert "no adapters" not in caplog.text and targets[-1] == "bert.pooler.dense"
    wrapped = add_adapters(model, lora, targets, head, new)
    assert "bert.pooler.dense" in wrapped.peft_config["default"].modules_to_save
    only_head = LoraSpec(rank=2, targetModules=["classifier"])
    with pytest.raises(ConfigError, match="no layer is left to adapt: classifier trains whole"):
        add_adapters(model, only_head, lora_targets(model, only_head, task, FreezeSpec(), layers, head), head)


def test_a_freeze_pattern_that_matches_nothing_is_warned_of(bert, caplog) -> None:
    """A typo in adjust.freeze.pattern (`layers` for BERT's `layer`) froze nothing and trained every weight, the log
    saying only 'froze 0 parameters (regex)'."""
    model, _ = bert
    task = Task.SEQUENCE_CLASSIFICATION
    layers, head = depth(model, task), head_name(model, task)
    freeze_checked(model, FreezeSpec(strategy="regex", pattern=r"encoder\.layers\.0\."), layers, head)
    assert all(p.requires_grad for p in model.parameters())
    assert "adjust.freeze.pattern 'encoder\\\\.layers\\\\.0\\\\.' matches no parameter name (such as " \
           "bert.encoder.layer.0.attention.self.query.weight)" in caplog.text
    caplog.clear()
    freeze_checked(model, FreezeSpec(strategy="regex", pattern=r"encoder\.layer\.0\."), layers, head)
    assert "matches no parameter" not in caplog.text and not model.bert.encoder.layer[0].output.dense.weight.requires_grad


def test_doras_magnitudes_get_no_weight_decay_on_a_convolution_either() -> None:
    """A linear layer's DoRA magnitude is 1-D, so exempt; a convolution's is 4-D, and weight decay pulled it (each
    output channel's norm) toward zero."""
    task = Task.IMAGE_CLASSIFICATION
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    layers, head = depth(model, task), head_name(model, task)
    wrapped = add_adapters(model, LoraSpec(rank=2, variant="dora"), ["net.layer4.1.conv2"], head)
    decay_of = {canonical(n): g["weight_decay"] for g in param_groups(wrapped, AdjustSpec(weightDecay=0.01), layers, head)
                for n in g["param_names"]}
    assert decay_of["net.layer4.1.conv2.lora_magnitude_vector.default.weight"] == 0.0
    assert decay_of["net.layer4.1.conv2.lora_A.default.weight"] == decay_of["net.fc.weight"] == 0.01


def test_a_failed_merge_check_is_a_warning_naming_merge_on_export(caplog) -> None:
    """An adapter on GPT-2's input embedding, tied to its output: merged, it changes the output layer too. The
    check kept the adapters apart, which only an INFO line said, though rearrange.mergeOnExport asked to merge."""
    model, tokenizer = text_model(Task.CAUSAL_LM, TINY_GPT2, "gpt2")
    _, _, batches = text_batches(tokenizer, Task.CAUSAL_LM)
    wrapped = add_adapters(model, LoraSpec(rank=2), ["transformer.wte"], None)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_embedding_" in name:  # peft starts A at zero here, B random
                p.normal_(std=0.1)
    kept, check = merge_adapters(wrapped, batches[0].inputs)
    assert not check["passed"] and hasattr(kept, "peft_config")
    assert any(r.levelname == "WARNING" and "rearrange.mergeOnExport" in r.message for r in caplog.records)


def test_a_head_learning_rate_without_a_head_is_warned_of(caplog) -> None:
    """A causal-lm job has no task head: adjust.headLearningRate trained nothing at its rate, without a word."""
    model, _ = text_model(Task.CAUSAL_LM, TINY_GPT2, "gpt2")
    layers = depth(model, Task.CAUSAL_LM)
    groups = param_groups(model, AdjustSpec(learningRate=1e-3, headLearningRate=1e-2), layers, None)
    assert max(g["lr"] for g in groups) == 1e-3
    assert "adjust.headLearningRate 0.01 is not used: the model has no task head" in caplog.text


def tiny_run(tmp_path: Path, adjust: dict, rearrange: dict, **config: int) -> Path:
    """A few steps of the whole pipeline on the tiny BERT (with `config` over it): what rearrange does reaches the
    freezes after it only there."""
    doc = tiny_classifier_doc(tmp_path)
    doc["model"]["config"] |= config
    doc["dataset"] |= {"maxTrainSamples": 16, "maxEvalSamples": 16}
    doc["evaluation"] = {"baseline": False}
    doc["adjust"] |= adjust
    doc["rearrange"] = rearrange
    pipeline.run(TrainerConfig.model_validate(doc), tmp_path)
    return tmp_path


@pytest.mark.parametrize("count", [3, 5])
def test_a_bottom_layers_count_beyond_the_layers_is_warned_of_once(count: int, tmp_path: Path, caplog) -> None:
    """count 3 of 4 layers, 2 of them pruned, froze the whole stack without a word; count 5 was warned of twice,
    before pruning and after."""
    tiny_run(tmp_path, {"freeze": {"strategy": "bottom-layers", "count": count}}, {"prune": {"count": 2}},
             num_hidden_layers=4)
    layers = 2 if count == 3 else 4
    warnings = [r.getMessage() for r in caplog.records if "exceeds" in r.getMessage()]
    assert warnings == [f"adjust.freeze.count {count} exceeds the model's {layers} layers: all of them are frozen, "
                        "and only what sits above them (a pooler, a final norm, the head) trains"]


@pytest.mark.parametrize(("pattern", "cause"), [(r"layer\.3\.", "pruning removed the layers it matched"),
                                              (r"layers\.0\.", "nothing is frozen")])
def test_a_freeze_pattern_that_pruning_empties_is_warned_of_once(pattern: str, cause: str, tmp_path: Path,
                                                                 caplog) -> None:
    """`layer\\.3\\.` froze 8,544 parameters of the 4 layers; pruning removed layers 0 and 3, and the freeze after
    it, 'froze 0 parameters (regex)', trained everything without a word. A pattern that matched nothing as loaded is
    warned of before pruning only."""
    tiny_run(tmp_path, {"freeze": {"strategy": "regex", "pattern": pattern}}, {"prune": {"count": 2}},
             num_hidden_layers=4)
    warnings = [r.getMessage() for r in caplog.records if "matches no parameter" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith(cause)  # not read as a typo when pruning brought it about


def test_a_freeze_pattern_names_the_layers_as_loaded_whatever_pruning_removed(tmp_path: Path, caplog) -> None:
    """Pruning removes layers 0 and 3 of 4 and renumbers 1 and 2 to 0 and 1: `layer\\.[12]\\.`, written against
    the names as loaded (analysis.json's), froze only loaded layer 2 after it and left loaded layer 1 training."""
    caplog.set_level(logging.INFO, logger="finetune_trainer.adjust")
    out = tiny_run(tmp_path, {"freeze": {"strategy": "regex", "pattern": r"layer\.[12]\."}}, {"prune": {"count": 2}},
                   num_hidden_layers=4)
    assert json.loads((out / "report.json").read_text())["pruning"]["removed_layers"] == [0, 3]
    froze = [r.getMessage() for r in caplog.records if r.getMessage().startswith("froze ")]
    assert froze == ["froze 17,088 parameters (regex)"] * 2  # both kept layers, before pruning and after
    assert "matches no parameter" not in caplog.text


def test_a_new_head_trains_under_lora_though_the_pattern_covers_it(tmp_path: Path) -> None:
    """A pattern that covers the head froze the loaded one (2 outputs); the freeze after LoRA froze the new one (the
    dataset's 3 labels) too, so with adapters a random head stayed random, where without them it trained."""
    out = tiny_run(tmp_path, {"freeze": {"strategy": "regex", "pattern": "classifier"}}, {"lora": {"rank": 2}})
    head = load_file(out / "model.safetensors")
    assert head["classifier.weight"].shape[0] == 3 and head["classifier.bias"].abs().min() > 0  # it started at zero


def test_a_kept_head_stays_frozen_under_lora_when_the_pattern_covers_it(tmp_path: Path) -> None:
    """The same with a head already the dataset's size (3 labels): rearrange keeps it, so the pattern freezes it."""
    out = tiny_run(tmp_path, {"freeze": {"strategy": "regex", "pattern": "classifier"}}, {"lora": {"rank": 2}},
                   num_labels=3)
    assert load_file(out / "model.safetensors")["classifier.bias"].abs().max() == 0  # as it started


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 90868376\n")


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "pytorch_model.bin"])
def test_a_weights_file_that_is_none_is_the_users_naming_it(name: str, tmp_path: Path) -> None:
    """A git-lfs pointer never pulled (a git clone without git-lfs), a page saved as the file: SafetensorError or
    UnpicklingError, which read as infrastructure (exit 2, retried); a .pt that was no pickle got the advice to save
    a state_dict instead of a whole model."""
    from finetune_trainer.errors import ModelError, exit_code_of
    from finetune_trainer.models import read_state_dict

    (tmp_path / name).write_text(LFS_POINTER)
    kind = "safetensors" if name.endswith(".safetensors") else "torch"
    with pytest.raises(ModelError, match=rf"{name}: not a {kind} weights file \(a git-lfs pointer") as caught:
        read_state_dict(tmp_path / name)
    assert exit_code_of(caught.value) == 1 and "state_dict() instead" not in str(caught.value)


def test_a_torch_file_cut_short_or_of_no_state_dict_is_the_users(tmp_path: Path) -> None:
    from finetune_trainer.errors import ModelError
    from finetune_trainer.models import read_state_dict

    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:4000])
    with pytest.raises(ModelError, match=r"cut.pt: not a torch weights file .*PytorchStreamReader"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list.pt: holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_a_text_models_weights_file_that_is_none_is_the_users(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from finetune_trainer.errors import ModelError

    AutoConfig.for_model("bert", **TINY_BERT).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_text(LFS_POINTER)
    tokenizer = load_tokenizer(ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2"))
    with pytest.raises(ModelError, match=r"cannot load it as sequence-classification \(.*header"):
        load_model(ModelSpec(task="sequence-classification", uri=str(tmp_path)), tokenizer, seed=0)


@pytest.mark.parametrize("architecture", ["squeezenet1_0", "squeezenet1_1"])
def test_an_image_network_whose_classifier_is_no_linear_layer_is_refused_naming_the_field(architecture: str) -> None:
    """SqueezeNet's classifier is a 1x1 convolution: with no head to resize, a job failed late (the baseline's
    confusion matrix, the export's get_submodule(None)), exit 2 and retried."""
    with pytest.raises(ConfigError, match=rf"^model.architecture {architecture}: its classifier ends in no Linear "):
        load_vision_model(ModelSpec(task="image-classification", architecture=architecture))


@pytest.mark.parametrize(("config", "says"), [({"num_classes": -1}, "negative dimension"),
                                              ({"num_classes": "3"}, "size")])
def test_an_image_network_that_cannot_take_model_config_names_model_config(config: dict, says: str) -> None:
    """A negative size was a RuntimeError (exit 2, retried), and a quoted number blamed model.architecture, which
    was right."""
    from finetune_trainer.detection.models import load_detector
    from finetune_trainer.errors import ModelError

    refused = rf"^model.config {re.escape(str(config))}: resnet18 does not take it \(.*{says}"
    with pytest.raises(ModelError, match=refused):
        load_vision_model(ModelSpec(task="image-classification", architecture="resnet18", config=config))
    with pytest.raises(ModelError, match=r"^model.architecture 'resnet1': not a torchvision classifier; e.g. "):
        load_vision_model(ModelSpec(task="image-classification", architecture="resnet1"))
    if config["num_classes"] == -1:
        with pytest.raises(ModelError, match=r"^model.config .*: ssdlite320_mobilenet_v3_large does not take it"):
            load_detector(ModelSpec(task="object-detection", architecture="ssdlite320_mobilenet_v3_large",
                                    config=config), 64)


def test_a_read_the_volume_failed_is_infrastructure_however_a_loader_wrapped_it(monkeypatch) -> None:
    """An EIO from a flaky network volume reading model.uri or the tokenizer was reported as the spec's mistake
    (InvalidModel, exit 1: never retried). The errors are built here, as the tests cannot make a volume fail."""
    import errno
    import os

    from transformers import AutoTokenizer

    from finetune_trainer.errors import failed_read

    eio = OSError(errno.EIO, os.strerror(errno.EIO), "config.json")
    try:
        raise OSError("Can't load the configuration of 'x'") from eio  # as transformers wraps it
    except OSError as wrapped:
        assert failed_read(wrapped)
    assert not failed_read(FileNotFoundError(errno.ENOENT, "No such file or directory", "config.json"))
    assert not failed_read(PermissionError(errno.EACCES, "Permission denied", "config.json"))
    assert not failed_read(OSError("x does not appear to have a file named config.json"))  # no errno: a missing file
    assert failed_read(RuntimeError("Error while deserializing header: I/O error (os error 5)"))  # safetensors' Rust
    assert not failed_read(RuntimeError("Error while deserializing header: HeaderTooLarge"))

    def flaky(*_: object, **__: object) -> None:
        raise eio

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        load_tokenizer(ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2"))


def test_the_head_of_a_model_that_registers_its_classifier_before_its_base_is_the_classifier() -> None:
    """XLM-R and CamemBERT register `classifier` before `roberta`: the last Linear was the top encoder layer's
    output.dense, which new_head replaced with a 3-way layer, and the forward failed on its shape."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    task = Task.SEQUENCE_CLASSIFICATION
    model = XLMRobertaForSequenceClassification(XLMRobertaConfig(vocab_size=100, **TINY_BERT))
    assert head_name(model, task) == "classifier.out_proj"
    new_head(model, head_name(model, task), 3, {0: "neg", 1: "neu", 2: "pos"}, False)
    ids = torch.randint(3, 100, (2, 8))
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)


def test_a_kept_head_wider_than_the_datasets_labels_gives_each_label_the_id_its_name_has() -> None:
    """A head of negative, neutral, positive kept (numLabels 3) for data of negative and positive: head_order gave up
    on the sizes, so positive trained as id 1, the head's neutral, and the export renamed the head's outputs
    negative, positive, LABEL_2. Each label takes its name's id; the unused output keeps its own name."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune_trainer.data import LabelledData, in_head_order
    from finetune_trainer.pipeline import trained_head_order

    head = {0: "negative", 1: "neutral", 2: "positive"}
    model = BertForSequenceClassification(BertConfig(vocab_size=100, **TINY_BERT, id2label=head,
                                                     label2id={v: k for k, v in head.items()}))
    ours = {0: "negative", 1: "positive"}
    order = trained_head_order(model, ours, 3, reinitialize=False)
    assert order == [0, 2]
    data = in_head_order(LabelledData(Split(["a", "b"], [0, 1]), Split(["c"], [1]), Split(["d"], [0]), ours), order)
    assert data.train.labels == [0, 2] and data.id2label == {0: "negative", 2: "positive"}
    assert not new_head(model, "classifier", 3, data.id2label, reinitialize=False)
    assert model.config.id2label == head
    other = {0: "bad", 1: "good"}  # names the head does not have: the head is kept, named by the data
    assert trained_head_order(model, other, 3, reinitialize=False) is None
    new_head(model, "classifier", 3, other, reinitialize=False)
    assert model.config.id2label == {0: "bad", 1: "good", 2: "LABEL_2"}


def test_what_counts_layers_is_refused_on_an_encoder_decoder() -> None:
    """BART's and T5's stack was their encoder's layers: every decoder layer sat above it, so layer-wise decay gave
    each the full rate and bottom-layers never froze one. Both are refused naming the field, as for XLM's parallel
    lists; a job that counts no layers trains everything at its rate."""
    from transformers import BartConfig, BartForSequenceClassification, T5Config, T5ForSequenceClassification

    task = Task.SEQUENCE_CLASSIFICATION
    bart = BartForSequenceClassification(BartConfig(vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3))
    t5 = T5ForSequenceClassification(T5Config(vocab_size=100, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                                              num_labels=3))
    for model in (bart, t5):
        assert_counting_layers_refused(model, task, rf"{type(model).__name__} is an encoder-decoder")


def assert_counting_layers_refused(model: nn.Module, task: Task, why: str) -> None:
    """bottom-layers and a layer-wise decay are refused naming their field and `why`; a job that counts no layers
    trains every parameter at its rate."""
    layers, head = depth(model, task), head_name(model, task)
    with pytest.raises(ConfigError, match=rf"^adjust.freeze \(strategy bottom-layers\): {why}"):
        freeze(model, FreezeSpec(strategy="bottom-layers", count=1), layers, head)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=rf"^adjust.layerwiseDecay 0.5: {why}"):
        param_groups(model, AdjustSpec(learningRate=1e-3, layerwiseDecay=0.5), layers, head)
    groups = param_groups(model, AdjustSpec(learningRate=1e-3), layers, head)
    assert {g["lr"] for g in groups} == {1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
