"""LoRA's two fused forms (merged for a CPU, accumulated for a GPU): the same training as peft's own path, on the
bundled MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch

from finetune_trainer.adjust import adaptable, freeze
from finetune_trainer.config import FreezeSpec, LoraSpec, ModelSpec, Task
from finetune_trainer.lora_fused import AccumulatedLoRA, MergedLoRA, fuse
from finetune_trainer.models import load_model, load_tokenizer
from finetune_trainer.rearrange import add_adapters, merge_adapters, new_head
from finetune_trainer.structure import depth, head_name, lora_candidates

TASK = Task.SEQUENCE_CLASSIFICATION
TEXTS = ["what a lovely morning", "the train is late again and I am cold", "ok I guess", "worst service ever"]
LABELS = torch.tensor([2, 0, 1, 0])
FORMS = pytest.mark.parametrize("form", [MergedLoRA, AccumulatedLoRA], ids=["merged", "accumulated"])


def adapted(lora: LoraSpec) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """MiniLM with a 3-way head and `lora` above its 2 frozen bottom layers, adapters as if trained; the inputs
    of TEXTS."""
    spec = ModelSpec(task=TASK, uri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    layers, head = depth(model, TASK), head_name(model, TASK)
    new_head(model, head, 3, {0: "neg", 1: "neu", 2: "pos"}, reinitialize=False)
    frozen = FreezeSpec(strategy="bottom-layers", count=2)
    freeze(model, frozen, layers, head)
    model = add_adapters(model, lora, adaptable(list(lora_candidates(model, TASK)), frozen, layers, head), head)
    freeze(model, frozen, layers, head)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, where the adapters change nothing
                p.normal_(std=0.02)
    return model, dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None):
    model.train()
    model.zero_grad()
    torch.manual_seed(2)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), LABELS)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of a parameter's gradient from the reference's, over every parameter."""
    assert grads.keys() == reference.keys() and any("lora_A" in n for n in grads)
    return max(float((g - reference[n]).norm() / reference[n].norm()) for n, g in grads.items())


@FORMS
def test_the_fused_path_trains_what_peft_computes(form: type[torch.autograd.Function]) -> None:
    peft_model, batch = adapted(LoraSpec(rank=8, alpha=16, dropout=0.0))
    model = copy.deepcopy(peft_model)
    assert fuse(model, form) == sum(1 for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")) == 25
    loss, grads = step(model, batch, None)
    exact_loss, exact = step(peft_model, batch, None)
    assert loss == pytest.approx(exact_loss, rel=1e-6) and error(grads, exact) < 1e-4  # fp32: the same to rounding
    # bf16 autocast: no further from the fp32 gradients than peft's own path at bf16 (about 3% on this batch)
    bf16_loss, bf16 = step(model, batch, torch.bfloat16)
    peft_bf16_loss, peft_bf16 = step(peft_model, batch, torch.bfloat16)
    assert bf16_loss == pytest.approx(peft_bf16_loss, rel=1e-3)
    assert error(bf16, exact) < 1.5 * error(peft_bf16, exact)


@pytest.mark.parametrize("lora", [LoraSpec(dropout=0.05), LoraSpec(dropout=0.0, variant="dora")],
                         ids=["adapter-dropout", "dora"])
def test_what_is_not_one_product_keeps_the_peft_path(lora: LoraSpec) -> None:
    model, _ = adapted(lora)
    assert fuse(model, MergedLoRA) == 0


def test_a_trainable_base_bias_keeps_the_peft_path() -> None:
    """The fused backward gives the base layer nothing, so a base bias that trains (peft's bias="lora_only", or
    biases unfrozen by hand) must keep peft's path, where it gets its gradient."""
    model, _ = adapted(LoraSpec(dropout=0.0))
    query = model.get_base_model().bert.encoder.layer[2].attention.self.query
    query.base_layer.bias.requires_grad_(True)
    assert fuse(model, MergedLoRA) == 24 and query.forward.__func__ is type(query).forward


@FORMS
def test_a_fused_model_still_merges_and_switches_its_adapters_off(form: type[torch.autograd.Function]) -> None:
    model, inputs = adapted(LoraSpec(dropout=0.0))
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(**inputs).logits
        adapters = model.eval()(**inputs).logits
        fuse(model, form)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, plain)
        torch.testing.assert_close(model(**inputs).logits, adapters, atol=1e-5, rtol=1e-5)
    merged, check = merge_adapters(model, inputs)
    assert check["passed"] and merged is base
    torch.testing.assert_close(merged(**inputs).logits, adapters, atol=1e-4, rtol=1e-4)


@FORMS
def test_a_decoder_without_biases_fuses_and_trains_the_same(form: type[torch.autograd.Function]) -> None:
    """A Llama-like causal LM (bias-free projections, [batch, length, hidden] inputs) on the same footing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_adapters(model, LoraSpec(rank=4, dropout=0.0), ["q_proj", "v_proj", "down_proj"], None)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    fused = copy.deepcopy(peft_model)
    assert fuse(fused, form) == 6
    ids = torch.randint(0, 128, (3, 12))

    def lm_step(m: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = lm_step(fused)
    peft_loss, peft_grads = lm_step(peft_model)
    assert loss == pytest.approx(peft_loss, rel=1e-6) and error(grads, peft_grads) < 1e-4


@FORMS
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-needs-grad", "input-frozen"])
def test_the_weight_is_kept_for_the_backward_only_when_the_input_needs_a_gradient(
        form: type[torch.autograd.Function], input_grad: bool) -> None:
    """The first adapted module above frozen layers gets an input without a gradient: peft's path keeps no copy of
    W for it, and neither may a fused form (a weight-sized tensor per such module)."""
    torch.manual_seed(0)
    weight, a, b = torch.randn(48, 32), torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    x = torch.randn(3, 5, 32, requires_grad=input_grad)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = form.apply(x, weight, None, a, b, 2.0)
    assert (weight.shape in saved) == input_grad
    out.square().sum().backward()
    reference = x.detach().requires_grad_(input_grad)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (reference @ weight.t() + 2.0 * (reference @ a2.t()) @ b2.t()).square().sum().backward()
    for grad, exact in [(a.grad, a2.grad), (b.grad, b2.grad), *([(x.grad, reference.grad)] if input_grad else [])]:
        assert float((grad - exact).norm() / exact.norm()) < 1e-5  # fp32: the same to rounding
