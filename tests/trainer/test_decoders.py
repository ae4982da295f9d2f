"""Decoder-only models (GPT-2, Llama): their pad token, as a classifier pools by it, and their export."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from torch import nn

from finetune_trainer.batches import encode_causal, encode_text, make_collate
from finetune_trainer.config import LoraSpec, Metric, ModelSpec, Task, TrainerConfig
from finetune_trainer.data import Split
from finetune_trainer import rearrange
from finetune_trainer.export import as_published, export_model, model_card, published_dtype
from finetune_trainer.models import load_model, load_tokenizer, logits_of
from finetune_trainer.rearrange import CHANGE_KEPT, add_adapters, merge_adapters, merge_measured, new_head
from tiny import TINY_GPT2, bpe_tokenizer, card_model, tiny_classifier_doc


@pytest.mark.parametrize("config_pad", [None, 5])
def test_a_decoder_classifier_pads_with_the_id_it_pools_by(config_pad: int | None, tmp_path: Path) -> None:
    """The classifier pools the last token that is not its pad id. GPT-2 and Llama checkpoints have none (None); a
    config may name one its tokenizer does not pad with (5 here; Llama-2's names its unk, 0, and its tokenizer has no
    pad, so the trainer pads with eos), and then it pooled the padding of every row shorter than the batch's longest."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=300, pad_token_id=config_pad, **TINY_GPT2)  # 5: a token, not the tokenizer's eos
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    spec = ModelSpec(uri=f"file://{tmp_path / 'gpt2'}", task="sequence-classification",
                     tokenizerUri=f"file://{bpe_tokenizer(tmp_path / 'tok')}")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0).eval()
    data = encode_text(Split(["a fine day indeed", "ok"], [0, 1]), tokenizer, 16)
    batch = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0)(data, [0, 1])
    assert batch.inputs["attention_mask"][1].sum() < batch.inputs["attention_mask"][0].sum()  # row 1 is padded
    with torch.no_grad():
        together = logits_of(model, batch.inputs)
        alone = logits_of(model, {"input_ids": torch.tensor([data.features[1]])})
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)
    assert model.config.pad_token_id == tokenizer.pad_token_id  # as exported, beside the tokenizer


@pytest.mark.parametrize(("config_pad", "outputs"), [(None, 3), (5, 3), (None, 5)])
def test_the_card_of_a_decoder_classifiers_adapters_loads_the_model_that_trained(
        config_pad: int | None, outputs: int, tmp_path: Path) -> None:
    """Adapters kept apart load onto model.uri's base, whose config has no pad id (GPT-2's: the card's model refused
    a batch of two, 'Cannot handle batch sizes > 1') or another (Llama-2's: it pooled the padding); the card's code
    gives it the pad of the tokenizer exported beside the adapters, which the batches were padded with. And a head of
    the size trained: rearrange.head.numLabels 5 for 3 labels gave the base 3 outputs, which the adapters' head of
    5 did not load into (a size mismatch). And the names of its classes: the base's config said LABEL_0, LABEL_1..."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    base = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(vocab_size=300, pad_token_id=config_pad, **TINY_GPT2)).save_pretrained(base)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "sequence-classification", "uri": str(base),
                    "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'tok')}"}
    doc["rearrange"] = {"head": {"numLabels": outputs}, "lora": {"rank": 4}, "mergeOnExport": False}
    cfg = TrainerConfig.model_validate(doc)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, seed=0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    new_head(model, "score", outputs, labels, reinitialize=True)
    wrapped = add_adapters(model, LoraSpec(rank=4), ["transformer.h.1.mlp.c_fc"], "score")
    data = encode_text(Split(["a fine day indeed", "ok"], [0, 1]), tokenizer, 16)
    batch = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0)(data, [0, 1])  # row 1 padded
    with torch.no_grad():
        logits = logits_of(wrapped.eval(), batch.inputs)
    export_model(wrapped, tokenizer, labels, cfg, tmp_path / "out")
    report = {"evaluation": {"baseline": {}, "final": {}, "delta": {}}, "labels": labels,
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1}}
    loaded = card_model(model_card(cfg, report, adapters_apart=True), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, batch.inputs), logits)
    # the head's classes by name, as a merged export's config.json has them (the base's config said LABEL_0, ...)
    assert loaded.config.id2label == model.config.id2label and loaded.config.label2id == model.config.label2id
    assert loaded.config.id2label[2] == "pos"
    # model.uri as published is their base: peft's own loaders find it where the config names it
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base)


def test_a_bf16_checkpoint_is_exported_in_bf16(tmp_path: Path) -> None:
    """Llama, Qwen and SmolLM publish bf16 weights, which train in fp32: the export was written in fp32, twice the
    size of the model fine-tuned, and from_pretrained (dtype auto) loaded it at fp32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=300, **TINY_GPT2)).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "causal-lm", "uri": str(tmp_path / "base"),
                    "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'tok')}"}
    cfg = TrainerConfig.model_validate(doc)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, seed=0)
    assert model.dtype == torch.float32  # as it trains
    export_model(model, tokenizer, {}, cfg, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_what_transformers_keeps_in_fp32_stays_fp32_in_a_bf16_export(tmp_path: Path) -> None:
    """An MoE's router (dots.llm1's gate weight and its score correction bias), which transformers loads and saves in
    fp32 beside bf16 weights: the export cast it to bf16 with the rest."""
    from safetensors import safe_open
    from transformers import Dots1Config, Dots1ForCausalLM

    config = Dots1Config(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    Dots1ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "causal-lm", "uri": str(tmp_path / "base"),
                    "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'tok')}"}
    cfg = TrainerConfig.model_validate(doc)
    tokenizer = load_tokenizer(cfg.model)
    export_model(load_model(cfg.model, tokenizer, seed=0), tokenizer, {}, cfg, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    router = {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert {dtypes[name] for name in router} == {"F32"}
    assert {dtype for name, dtype in dtypes.items() if name not in router} == {"BF16"}


@pytest.mark.parametrize("size", [1e-3, 3e-2])
def test_a_bf16_export_says_how_much_of_the_adapters_change_it_keeps(size: float, tmp_path: Path, caplog) -> None:
    """The merge is checked and the model evaluated in fp32, then written in the checkpoint's bf16, which rounds away
    a change below half a bf16 step of a weight: adapters changing the weights by 0.1% kept about 40% of their
    effect, unsaid. The merge check says the share of the change the export keeps, the exported weights' own, and
    a share under CHANGE_KEPT is warned of and on the card."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "causal-lm", "uri": str(tmp_path / "base"),
                    "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'tok')}"}
    doc["rearrange"] = {"lora": {"rank": 4}}
    cfg = TrainerConfig.model_validate(doc)
    tokenizer = load_tokenizer(cfg.model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = add_adapters(load_model(cfg.model, tokenizer, seed=0), LoraSpec(rank=4), targets, None)
    with torch.no_grad():  # adapters as after training: |BA| about `size` x |W| element by element
        for layer in (m for m in wrapped.modules() if hasattr(m, "lora_B") and "default" in m.lora_B):
            layer.lora_B["default"].weight.normal_()
            change = layer.get_delta_weight("default")
            layer.lora_B["default"].weight.mul_(size * layer.base_layer.weight.std() / change.std())
    inputs = {"input_ids": torch.randint(0, 300, (2, 8))}
    merged, check = merge_adapters(wrapped, inputs, published_dtype(wrapped))
    assert check["passed"] and check["dtype"] == "bfloat16"
    trained = {n: t.clone() for n, t in merged.state_dict().items()}
    export_model(merged, tokenizer, {}, cfg, tmp_path / "out")
    base, exported = (load_file(tmp_path / folder / "model.safetensors") for folder in ("base", "out"))
    assert check["change_kept"] == pytest.approx(share_kept(base, trained, exported), rel=1e-4)
    lost = check["change_kept"] < CHANGE_KEPT
    assert lost == (size < 1e-2) and ("keeps" in caplog.text) == lost
    report = {"evaluation": {"baseline": {}, "final": {}, "delta": {}}, "labels": {}, "merge_check": check,
              "training": {"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                           "samples_per_second": 1}}
    assert f"written in bfloat16, which keeps {check['change_kept']:.1%}" in model_card(cfg, report)


def share_kept(base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
               exported: dict[str, torch.Tensor]) -> float:
    """The exported weights' change from the base projected on the trained (merged) weights', over its square."""
    changed = [n for n in base if not torch.equal(trained[n].float(), base[n].float())]
    along = sum(float(((exported[n].float() - base[n].float()) * (trained[n] - base[n].float())).sum())
                for n in changed)
    return along / sum(float((trained[n] - base[n].float()).square().sum()) for n in changed)


def small_adapters(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def test_an_fp16_export_counts_the_weights_it_keeps_in_fp32_as_keeping_their_change() -> None:
    """T5 keeps its feed-forward output `wo` in fp32 at fp16 (_keep_in_fp32_modules), and so does the export; `wo` is
    a default LoRA target. The merge counted its change as rounded to fp16 (53% kept here, 20% with adapters on `wo`
    alone, warned of) where the export keeps all of it. The share is the exported weights' own, names matched
    through peft's wrapping."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    model = T5ForSequenceClassification(T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                 d_kv=16, num_labels=2))
    with torch.no_grad():  # an fp16 checkpoint's weights
        for param in model.parameters():
            param.copy_(param.half().float())
    model.config.dtype = torch.float16
    base = {n: t.clone() for n, t in model.state_dict().items()}
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q", "wo"]))
    small_adapters(wrapped, 2e-5)
    with torch.no_grad():
        kept = merge_measured(wrapped, torch.float16)
    trained = {n: t.clone() for n, t in wrapped.unload().state_dict().items()}
    exported = as_published(model).state_dict()
    assert exported["transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert kept == pytest.approx(share_kept(base, trained, exported), rel=1e-4)


def test_adapters_on_multihead_attention_are_measured_where_they_merge(monkeypatch) -> None:
    """peft's layer on nn.MultiheadAttention has no base `.weight`: its merge changes in_proj_weight and its
    out_proj's weight (a tuner layer within it), and was left out of the share. A weight is measured MERGE_CHUNK
    elements at a time (small here), as a large one is."""
    from peft import LoraConfig, get_peft_model

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16)

    torch.manual_seed(0)
    model = Attention()
    with torch.no_grad():  # a bf16 checkpoint's weights, large enough that a bf16 step is near the change
        for name, param in model.named_parameters():
            param.copy_(param.mul(300 if name.endswith("weight") else 1).bfloat16().float())
    base = {n: t.clone() for n, t in model.state_dict().items()}
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["attn", "fc"]))
    small_adapters(wrapped, 0.05)
    monkeypatch.setattr(rearrange, "MERGE_CHUNK", 100)
    with torch.no_grad():
        kept = merge_measured(wrapped, torch.bfloat16)
    trained = wrapped.unload().state_dict()
    exported = {n: t.bfloat16() for n, t in trained.items()}
    assert {n for n in base if not torch.equal(trained[n], base[n])} == {
        "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    assert kept == pytest.approx(share_kept(base, trained, exported), rel=1e-4)


def test_a_merge_warns_of_adapters_on_tied_weights_as_peft_does() -> None:
    """merge_measured merges a layer at a time, and skipped what peft's merge_adapter checks first: an adapter on an
    embedding tied to the output layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    wrapped = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with torch.no_grad(), pytest.warns(UserWarning, match="tie_word_embeddings"):
        merge_measured(wrapped, None)


TINY_LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 32}


def test_a_pad_borrowed_from_eos_is_no_padding_row_of_the_embedding(tmp_path: Path) -> None:
    """A decoder's tokenizer has no pad, so batches are padded with its eos; given to the model's config before it
    was built, the eos became the embedding's padding_idx: its row took no gradient (a separator such as
    `<|endoftext|>` inside a text, a bos that is the eos), and in a model built from its config it stayed zero. Our
    own exports name the eos their pad, so a second fine-tune of one froze it too. A pad of its own (BERT's [PAD])
    stays the padding row, and RoBERTa's positions, which count from the pad, still do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_uri = f"file://{bpe_tokenizer(tmp_path / 'tok')}"
    for config_pad in (None, 0):  # a hub checkpoint's (none), an export's (the eos, 0 in this vocabulary)
        LlamaForCausalLM(LlamaConfig(vocab_size=400, pad_token_id=config_pad, **TINY_LLAMA)).save_pretrained(
            tmp_path / f"llama-{config_pad}")
    for spec in (*(ModelSpec(uri=str(tmp_path / f"llama-{pad}"), task="causal-lm", tokenizerUri=tokenizer_uri)
                   for pad in (None, 0)),
                 ModelSpec(architecture="llama", config=TINY_LLAMA, task="causal-lm", tokenizerUri=tokenizer_uri)):
        tokenizer = load_tokenizer(spec)
        eos = tokenizer.eos_token_id
        assert tokenizer.pad_token_id == eos == 0
        model = load_model(spec, tokenizer, seed=0)
        embedding = model.get_input_embeddings()
        assert embedding.padding_idx is None, spec
        assert spec.uri or embedding.weight[eos].abs().sum() > 0  # drawn as the other rows are, not zero
        model(input_ids=torch.tensor([[eos, 5, eos, 7]])).logits.sum().backward()
        assert embedding.weight.grad[eos].abs().sum() > 0
        # as batched (a classifier pools by it), exported, and given to generate()
        assert model.config.pad_token_id == model.generation_config.pad_token_id == eos
    roberta = ModelSpec(architecture="roberta", task="sequence-classification", tokenizerUri=tokenizer_uri,
                        config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 32, "max_position_embeddings": 40})
    model = load_model(roberta, load_tokenizer(roberta), seed=0)
    assert model.get_input_embeddings().padding_idx is None and model.roberta.embeddings.padding_idx == 0
    model(input_ids=torch.tensor([[5, 6, 7]]))  # positions count from the pad: 1, 2, 3
    # A model that reads no token embedding (CANINE reads characters' hashes) has none to take the pad off.
    canine = ModelSpec(architecture="canine", task="sequence-classification", tokenizerUri=tokenizer_uri,
                       config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 32})
    load_model(canine, load_tokenizer(canine), seed=0)  # raised NotImplementedError, retried as infrastructure
    bert = TrainerConfig.model_validate(tiny_classifier_doc(tmp_path / "out")).model  # MiniLM's tokenizer
    tokenizer = load_tokenizer(bert)
    model = load_model(bert, tokenizer, seed=0)
    assert model.get_input_embeddings().padding_idx == tokenizer.pad_token_id != tokenizer.unk_token_id


def test_an_evaluation_keeps_no_key_value_cache_and_the_export_still_generates_with_one(tmp_path: Path) -> None:
    """A causal LM's forward under no_grad kept every layer's keys and values to its end (past_key_values), for a
    next token an evaluation never asks: memory that a large model's evaluation batch did not have. Its config still
    says use_cache after, which the export writes for generate()."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune_trainer.distributed import World
    from finetune_trainer.evaluate import evaluate

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, **TINY_GPT2))
    tokenizer = load_tokenizer(ModelSpec(task="causal-lm", architecture="gpt2",
                                         tokenizerUri=f"file://{bpe_tokenizer(tmp_path / 'tok')}"))
    data = encode_causal(Split(["a fine day indeed", "this is awful and slow"], None), tokenizer, 16)
    caches = []
    model.register_forward_hook(lambda _module, _args, out: caches.append(out.past_key_values))
    scores = evaluate(model, data, make_collate(Task.CAUSAL_LM, tokenizer.pad_token_id, 0), Task.CAUSAL_LM,
                      [Metric.LOSS], 2, World(0, 1, torch.device("cpu")), 0)
    assert scores["loss"] > 0 and caches == [None]
    assert model.config.use_cache
    with torch.no_grad():
        assert model(**tokenizer("a fine", return_tensors="pt")).past_key_values is not None


def test_held_at_casts_only_frozen_linear_weights_it_can_widen_back_exactly() -> None:
    """A bf16 checkpoint's frozen Linear weights (widened at load) go to bf16 and back bit for bit; a weight tied to
    the embeddings, a trained one and one with fp32 digits stay fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.models import held_at, widened

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, tie_word_embeddings=True, **TINY_LLAMA)).to(
        torch.bfloat16).float()
    layer = model.model.layers[0]
    model.requires_grad_(False)
    layer.mlp.down_proj.weight.requires_grad_(True)
    with torch.no_grad():
        layer.mlp.up_proj.weight[0, 0] = 1 / 3  # no bf16 number
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = held_at(model, torch.bfloat16, Task.CAUSAL_LM)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        f"model.layers.0.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj")}
    assert model.lm_head.weight is model.model.embed_tokens.weight and dtypes["model.embed_tokens.weight"] == torch.float32
    assert held_at(model, None, Task.CAUSAL_LM) == []
    widened(held)
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_bf16_base_under_lora_trains_held_in_bf16_to_the_same_results(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Llama published in bf16, LoRA on it under bf16 autocast: its frozen Linear weights are held in bf16 while it
    trains (the memory model counts them at 2 bytes, and no copy of them among the activations), and the run's
    scores and its merged export are bit for bit those of the run that held them in fp32."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer import pipeline

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=400, **TINY_LLAMA)).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    doc = tiny_classifier_doc(tmp_path / "out", precision="bf16", batchSize=8)
    doc["model"] = {"task": "causal-lm", "uri": str(tmp_path / "base"),
                    "tokenizerUri": f"file://{bpe_tokenizer(tmp_path / 'tok')}"}
    doc["dataset"] |= {"maxTrainSamples": 32, "maxEvalSamples": 16}
    doc["rearrange"] = {"lora": {"rank": 4, "dropout": 0.0}, "mergeOnExport": True}
    held = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    monkeypatch.setattr(pipeline, "held_at", lambda model, dtype, task: [])  # as before: every weight in fp32
    doc["output"]["uri"] = str(tmp_path / "fp32")
    plain = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "fp32")
    linear = 4 * 16 * 16 + 3 * 16 * 32 + 400 * 16  # the frozen Linear weights: attention, MLP, output layer
    memory = {name: run["memory_after_rearrange"] for name, run in (("plain", plain), ("held", held))}
    # autocast's bf16 copies, which the held layers no longer make (the probe, before the freeze, made them)
    assert memory["plain"]["weights"] - memory["held"]["weights"] == linear * 2
    assert memory["plain"]["activations"] - memory["held"]["activations"] == linear * 2
    assert held["evaluation"] == plain["evaluation"]
    exported = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(tmp_path / "fp32" / "model.safetensors")
    assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in reference)
