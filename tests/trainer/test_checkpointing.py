"""training.gradientCheckpointing: the same step for less activation memory, where a model has layers to recompute."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from finetune_trainer import pipeline
from finetune_trainer.analyze import probe_step
from finetune_trainer.batches import Batch
from finetune_trainer.config import LoraSpec, ModelSpec, Task, TrainerConfig
from finetune_trainer.errors import ConfigError
from finetune_trainer.lora_fused import FORMS, fuse
from finetune_trainer.models import checkpoint_layers, load_model, load_tokenizer, load_vision_model, logits_of
from finetune_trainer.rearrange import add_adapters
from finetune_trainer.rules import error_lines
from finetune_trainer.train import loss_sum
from tiny import tiny_classifier_doc

TINY_LLAMA = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def token_batch(vocab: int, rows: int = 4, length: int = 48) -> Batch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, length), generator=generator)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids, rows, ids.numel(), ids.numel())


def step(model: nn.Module, batch: Batch, task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward: the loss and the gradient of each weight that trains."""
    model.train()
    loss = loss_sum(logits_of(model, batch.inputs), batch.labels, task)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(plain: nn.Module, checkpointed: nn.Module, batch: Batch, task: Task) -> None:
    loss, grads = step(plain, batch, task)
    loss_on, grads_on = step(checkpointed, batch, task)
    torch.testing.assert_close(loss_on, loss)
    assert grads_on.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_on[name], grad, msg=name)


def test_a_checkpointed_lora_causal_lm_steps_as_one_that_is_not() -> None:
    """Loss and adapter gradients equal, through the fused LoRA of the CPU, with the embeddings frozen: the
    non-reentrant form needs no gradient on the layers' input for the adapters in them to get theirs."""
    checkpointed = tiny_llama()
    checkpoint_layers(checkpointed)  # at load, as the pipeline does: adapters come later
    models = []
    for model in (tiny_llama(), checkpointed):
        torch.manual_seed(2)  # the same adapters on both
        wrapped = add_adapters(model, LoraSpec(rank=4, alpha=8, dropout=0, targetModules=["q_proj", "v_proj"]),
                               ["q_proj", "v_proj"], None)
        for name, p in wrapped.named_parameters():  # B starts at zero, and so would A's gradient
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
        assert fuse(wrapped, FORMS["cpu"]) == 2 * TINY_LLAMA["num_hidden_layers"]
        models.append(wrapped)
    plain, checkpointed = models
    assert not checkpointed.get_input_embeddings().weight.requires_grad
    assert_same_step(plain, checkpointed, token_batch(TINY_LLAMA["vocab_size"]), Task.CAUSAL_LM)
    assert checkpointed.config.use_cache  # what the export writes; the layers' forward kept none


def test_checkpointed_adapters_on_the_top_layers_take_no_gradient_through_the_frozen_bottom_ones() -> None:
    """peft's wrapper turns back on the hook giving the embeddings' output a gradient, which checkpointing's
    reentrant form needs: with it each step recomputed the frozen bottom layers and took their input gradients
    (half as many FLOPs again on a tiny Llama). Without it the adapters' gradients are those of a run unchecked."""
    top = [f"model.layers.{i}.self_attn.q_proj" for i in (2, 3)]
    checkpointed = tiny_llama()
    checkpoint_layers(checkpointed)
    models = []
    for model in (tiny_llama(), checkpointed):
        torch.manual_seed(2)
        wrapped = add_adapters(model, LoraSpec(rank=4, alpha=8, dropout=0, targetModules=top), top, None)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
        models.append(wrapped)
    plain, checkpointed = models
    graded = []
    checkpointed.get_input_embeddings().register_forward_hook(lambda m, i, out: graded.append(out.requires_grad))
    assert_same_step(plain, checkpointed, token_batch(TINY_LLAMA["vocab_size"]), Task.CAUSAL_LM)
    assert graded == [False]


def test_a_checkpointed_minilm_classifier_steps_as_one_that_is_not(pvc_root: Path) -> None:
    spec = ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2",
                     config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    plain = load_model(spec, load_tokenizer(spec), seed=0)
    checkpointed = copy.deepcopy(plain)
    checkpoint_layers(checkpointed)
    batch = token_batch(plain.config.vocab_size, length=24)
    batch = Batch(batch.inputs, torch.tensor([0, 1, 0, 1]), 4, batch.tokens, 4)
    assert_same_step(plain, checkpointed, batch, Task.SEQUENCE_CLASSIFICATION)


def test_checkpointing_keeps_a_fraction_of_the_activations_and_the_probe_measures_it() -> None:
    """The analysis probe's activations (the memory model's) are measured at the run's setting: with the layers
    checkpointed, what autograd saves outside them and the inputs they keep for their recompute."""
    batch = token_batch(TINY_LLAMA["vocab_size"], length=64)
    measured = {}
    for on in (False, True):
        model = tiny_llama()
        if on:
            checkpoint_layers(model)
        measured[on] = probe_step(model, [batch], Task.CAUSAL_LM, adapters=True, dtype=None)[1]["activations"]
        assert all(m.training == model.training for m in model.modules())  # the layers' flags put back
    assert 0 < 3 * measured[True] < measured[False]


def test_a_model_without_layers_to_checkpoint_is_refused_naming_the_field(tmp_path: Path) -> None:
    doc = tiny_classifier_doc(tmp_path, gradientCheckpointing=True)
    doc["model"] = {"task": "image-classification", "architecture": "resnet18"}
    doc["dataset"] = {"uri": "pvc://data/digits", "format": "imagefolder"}
    with pytest.raises(ValidationError) as refused:
        TrainerConfig.model_validate(doc)
    assert error_lines(refused.value) == [
        "training.gradientCheckpointing: gradientCheckpointing recomputes a transformer's layers: it is for "
        "sequence-classification and causal-lm"]
    with pytest.raises(ConfigError, match="^training.gradientCheckpointing: ImageClassifier has no layers"):
        checkpoint_layers(load_vision_model(ModelSpec(task="image-classification", architecture="resnet18")))


def test_a_checkpointed_causal_lm_trains_and_exports_a_model_that_caches(
        pvc_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the pipeline; a validation during training counts the causal LM's chunks, as its card does."""
    doc = tiny_classifier_doc(tmp_path / "out", gradientCheckpointing=True, maxSteps=2, evalEverySteps=1)
    doc["model"] = {"task": "causal-lm", "architecture": "gpt2", "tokenizerUri": "pvc://models/all-MiniLM-L6-v2",
                    "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    doc["dataset"] |= {"maxTrainSamples": 32, "maxEvalSamples": 16}
    with caplog.at_level(logging.INFO, logger="finetune_trainer.pipeline"):
        report = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert report["training"]["steps"] == 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    chunks = report["training"]["validation_samples"]
    assert f"evaluating on the validation split ({chunks} chunks)" in caplog.text


def test_turning_checkpointing_on_resumes_the_run(tmp_path: Path) -> None:
    """The same weights at every step: a job that ran out of memory, retried with it, resumes from its checkpoint."""
    doc = tiny_classifier_doc(tmp_path)
    on = TrainerConfig.model_validate(tiny_classifier_doc(tmp_path, gradientCheckpointing=True))
    for defaults in (False, True):
        assert pipeline.fingerprinted(on, 1, defaults=defaults) == pipeline.fingerprinted(
            TrainerConfig.model_validate(doc), 1, defaults=defaults)


def test_layers_checkpointed_in_eval_mode_drop_nothing_out() -> None:
    """The probe and healing checkpoint the layers in eval mode. They did by setting each layer's `training` flag,
    which OPT's and BART's layers also read to drop out: the probe measured, and healing trained, with dropout. The
    layers now go through their checkpoint function as they are: the outputs are eval mode's, and the activations
    a fraction."""
    from transformers import OPTConfig, OPTForCausalLM

    from finetune_trainer.models import checkpointing_in_eval

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                     dropout=0.5)).eval()
    checkpoint_layers(model)
    ids = torch.randint(3, 100, (2, 16))

    def forward() -> tuple[torch.Tensor, int]:
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            logits = model(input_ids=ids).logits
        return logits.detach(), sum(saved)

    plain, kept = forward()
    with checkpointing_in_eval(model) as layers:
        first, fewer = forward()
        again, _ = forward()
    assert len(layers) == 4 and not any("forward" in layer.__dict__ for layer in layers)  # the class's again
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert 0 < 2 * fewer < kept, (fewer, kept)
