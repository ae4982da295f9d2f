"""Layer and head importance on real batches, and pruning: the chosen layers go, the rest stay as they were, and
the exported model reloads with the standard transformers classes and gives the same logits."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from finetune_trainer import prune
from finetune_trainer.batches import Batch, Encoded, encode_causal, encode_text, epoch_batches, make_collate
from finetune_trainer.adjust import freeze_checked, lora_targets
from finetune_trainer.config import FreezeSpec, HealSpec, LoraSpec, ModelSpec, PruneSpec, Task, TrainerConfig
from finetune_trainer.data import Split
from finetune_trainer.errors import ConfigError
from finetune_trainer.export import export_model
from finetune_trainer.models import checkpoint_layers, load_model, load_tokenizer, logits_of
from finetune_trainer.pipeline import run
from finetune_trainer.structure import depth, pruned_depth

from tiny import TINY_BERT, TINY_GPT2, tiny_classifier_doc, tiny_pair_classifier_doc

TEXTS = ["a fine day", "this is awful and slow", "ok", "I love the new self driving cars so much", "meh"] * 4
LABELS = [0, 1, 2, 0, 1] * 4


@pytest.fixture(scope="module")
def minilm():
    """The bundled all-MiniLM-L6-v2 (6 layers, 12 heads) as a 3-way classifier, and batches of real text."""
    spec = ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, uri="pvc://models/all-MiniLM-L6-v2", config={"num_labels": 3})
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0).eval()
    data = encode_text(Split(TEXTS, LABELS), tokenizer, 16)
    collate = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 32)
    batches = [collate(data, idx) for idx in epoch_batches(data.lengths, 8, seed=0, epoch=0, bucketed=True)]
    return model, tokenizer, batches


def test_heads_are_scored_by_the_task_loss_only_through_a_head_the_checkpoint_trained(minilm) -> None:
    """MiniLM is a base checkpoint: its 3-way classifier is initialised at random, and the task's loss through it
    (labelled "task") scored the heads by noise, no better than the label-free probe."""
    from finetune_trainer.analyze import analyze

    model, _, batches = minilm
    assert analyze(model, batches, Task.SEQUENCE_CLASSIFICATION, 3, False).importance["heads"]["loss"] == (
        "label-free probe")
    trained = copy.deepcopy(model)
    trained.new_modules = ()  # as a checkpoint that had the head
    assert analyze(trained, batches, Task.SEQUENCE_CLASSIFICATION, 3, False).importance["heads"]["loss"] == "task"


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(minilm) -> None:
    model, _, batches = minilm
    model = copy.deepcopy(model)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    got_gradient: list[torch.Tensor] = []
    for p in weights:
        p.register_post_accumulate_grad_hook(got_gradient.append)
    scores = prune.importance(model, batches, Task.SEQUENCE_CLASSIFICATION, labels_fit=True)
    assert got_gradient == [] and all(p.requires_grad for p in model.parameters())  # only the head gates got one
    assert scores["layers"]["measure"].startswith("block-influence")
    # The same measure from transformers' own hidden states (the input of layer i is hidden_states[i]).
    turned, tokens = torch.zeros(6, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
            mask = batch.inputs["attention_mask"].float()
            for i in range(6):
                turned[i] += ((1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)) * mask).sum()
            tokens += int(mask.sum())
    torch.testing.assert_close(torch.tensor(scores["layers"]["scores"], dtype=torch.float64), turned / tokens)
    heads = torch.tensor(scores["heads"]["scores"])
    assert heads.shape == (6, 12) and (heads >= 0).all() and heads.std() > 0 and scores["heads"]["loss"] == "task"


def test_a_head_whose_output_is_zero_scores_zero(minilm) -> None:
    """Michel et al.'s importance is the loss's sensitivity to a head's gate: a head that outputs nothing has none."""
    model, _, batches = minilm
    model = copy.deepcopy(model)
    value = model.bert.encoder.layer[2].attention.self.value
    with torch.no_grad():  # head 5 of layer 2 (32 dims of 384): its values, hence its output, are zero
        value.weight[5 * 32:6 * 32] = 0
        value.bias[5 * 32:6 * 32] = 0
    heads = prune.importance(model, batches, Task.SEQUENCE_CLASSIFICATION, labels_fit=False)["heads"]["scores"]
    assert heads[2][5] == 0 and min(h for row in heads for h in row if h != heads[2][5]) > 0


def test_a_layer_that_passes_its_input_on_scores_zero_not_below() -> None:
    """A tiny BERT whose matrices are all zero (a real run's checkpoint): each layer gives back its input, and
    1 - cos came out a few 1e-9 below zero by float error, which the job's status showed as layerImportance -0.0."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune_trainer.batches import Batch

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY_BERT | {"num_hidden_layers": 4})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name:
                p.zero_()
    ids = torch.randint(5, 100, (4, 12))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros(4, dtype=torch.long),
                  4, 48, 4)
    scores = prune.importance(model, [batch], Task.SEQUENCE_CLASSIFICATION, labels_fit=False)["layers"]["scores"]
    assert all(0 <= s < 1e-7 for s in scores)
    assert json.dumps([round(s, 4) for s in scores]) == "[0.0, 0.0, 0.0, 0.0]"  # as the termination message has them


@pytest.mark.parametrize(("spec", "expected"), [
    ({"count": 2}, [1, 3]),
    ({"fraction": 0.25}, [1, 3]),  # a quarter of 6 layers is 1.5: rounded half up
    ({"fraction": 0.1}, [3]),
    ({"threshold": 0.25}, [1, 2, 3]),
])
def test_the_lowest_scoring_layers_are_chosen(spec: dict, expected: list[int]) -> None:
    scores = [0.3, 0.05, 0.2, 0.01, 0.5, 0.9]
    assert prune.chosen_layers(scores, PruneSpec.model_validate(spec)) == expected


@pytest.mark.parametrize(("fraction", "layers", "removed"), [(0.29, 50, 15), (0.25, 6, 2), (0.1, 5, 1), (0.35, 10, 4)])
def test_a_fraction_of_the_layers_is_rounded_half_up_as_written(fraction: float, layers: int, removed: int) -> None:
    """0.29 of 50 layers is 14.5, documented to round up to 15: the float product 14.4999... rounded to 14."""
    assert len(prune.chosen_layers([0.1 * (i + 1) for i in range(layers)], PruneSpec(fraction=fraction))) == removed


@pytest.mark.parametrize("spec", [{"count": 6}, {"threshold": 1.0}])
def test_pruning_every_layer_is_refused_naming_the_field(spec: dict) -> None:
    with pytest.raises(ConfigError, match=f"rearrange.prune.{next(iter(spec))}.*all 6 layers"):
        prune.chosen_layers([0.3, 0.05, 0.2, 0.01, 0.5, 0.9], PruneSpec.model_validate(spec))


@pytest.mark.parametrize("layers", [2, 3, 6, 7, 12, 32])
def test_a_fraction_that_rounds_to_no_layer_is_refused_naming_the_field_and_the_least_that_removes_one(
        layers: int) -> None:
    """count 0 is refused, but a fraction of a few layers rounding to 0 (0.05 of 6) pruned nothing with no word: the
    job reported a pruning of no layer. The fraction the message offers removes one."""
    scores = [0.1 * (i + 1) for i in range(layers)]
    with pytest.raises(ConfigError, match=rf"^rearrange.prune.fraction 0.01 of {layers} layers rounds to no layer; "
                                          r"a fraction of at least \S+ removes one$") as refused:
        prune.chosen_layers(scores, PruneSpec(fraction=0.01))
    least = float(str(refused.value).rsplit(" ", 3)[-3])
    assert prune.chosen_layers(scores, PruneSpec(fraction=least)) == [0]


def test_a_model_without_one_layer_count_is_refused_naming_the_field_and_left_whole() -> None:
    """Funnel's layers sit in blocks that pool between them: its config has no settable layer count, which raised
    NotImplementedError (exit 2, retried) after its layer list was already shortened."""
    from transformers import FunnelConfig, FunnelForSequenceClassification

    model = FunnelForSequenceClassification(FunnelConfig(vocab_size=100, block_sizes=[2, 2], d_model=32, n_head=2,
                                                         d_head=16, d_inner=64, num_labels=3))
    blocks = model.funnel.encoder.blocks
    with pytest.raises(ConfigError, match=r"rearrange.prune: FunnelForSequenceClassification cannot be pruned by "
                                          r"layers \(This model does not support the setting of `num_hidden_layers`"):
        prune.remove_layers(model, Task.SEQUENCE_CLASSIFICATION, [1])
    assert model.funnel.encoder.blocks is blocks and len(blocks) == 2


def test_pruning_removes_exactly_the_chosen_layers_and_the_export_reloads_with_the_same_logits(minilm,
                                                                                               tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, batches = minilm
    model = copy.deepcopy(model)
    layers = list(model.bert.encoder.layer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = prune.parameters(model)
    prune.remove_layers(model, Task.SEQUENCE_CLASSIFICATION, [1, 3])
    assert list(model.bert.encoder.layer) == [layers[0], layers[2], layers[4], layers[5]]
    assert model.config.num_hidden_layers == 4
    assert before - prune.parameters(model) == 2 * sum(p.numel() for p in layers[1].parameters())
    for new, old in enumerate([0, 2, 4, 5]):  # the kept layers' weights are untouched
        prefix = f"bert.encoder.layer.{new}."
        for key, value in model.state_dict().items():
            if key.startswith(prefix):
                assert torch.equal(value, state[f"bert.encoder.layer.{old}." + key.removeprefix(prefix)])
    logits = logits_of(model, batches[0].inputs)
    export_model(model, tokenizer, {0: "neg", 1: "neu", 2: "pos"},
                 TrainerConfig.model_validate(tiny_classifier_doc(tmp_path)), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert len(reloaded.bert.encoder.layer) == 4 and prune.parameters(reloaded) == prune.parameters(model)
    torch.testing.assert_close(logits_of(reloaded, batches[0].inputs), logits, atol=1e-5, rtol=1e-5)


def test_a_freeze_pattern_and_lora_targets_name_the_layers_as_loaded_after_pruning(minilm) -> None:
    """adjust.freeze.pattern and rearrange.lora.targetModules are written against the names as loaded (analysis.json
    lists them). With MiniLM's layers 1 and 2 pruned, `encoder\\.layer\\.[01]\\.` froze loaded layers 0 and 3
    (renumbered 0 and 1), and layer 3's query took its adapter in loaded layer 5; one that pruning removed, in
    loaded layer 4."""
    model, _, batches = minilm
    model, task = copy.deepcopy(model), Task.SEQUENCE_CLASSIFICATION
    layers = list(model.bert.encoder.layer)
    loaded = depth(model, task, batches[0])
    prune.remove_layers(model, task, [1, 2])
    pruned = pruned_depth(depth(model, task, batches[0]), loaded, [1, 2])
    freeze_checked(model, FreezeSpec(strategy="regex", pattern=r"encoder\.layer\.[01]\."), pruned, "classifier",
                   (), loaded)
    assert [i for i, layer in enumerate(layers) if not next(layer.parameters()).requires_grad] == [0]

    def targets(name: str) -> list[str]:
        return lora_targets(model, LoraSpec(target_modules=[name]), task, FreezeSpec(), pruned, "classifier")

    assert targets("encoder.layer.3.attention.self.query") == ["bert.encoder.layer.1.attention.self.query"]
    with pytest.raises(ConfigError, match=r"^rearrange.lora.targetModules \['encoder.layer.2.attention.self.query'\]: "
                                          "no module that rearrange.prune kept is named so"):
        targets("encoder.layer.2.attention.self.query")


def test_a_pruned_models_adapters_kept_apart_reload_on_the_pruned_base_exported_beside_them(minilm,
                                                                                             tmp_path: Path) -> None:
    """mergeOnExport false (or a failed merge check) exports the adapters alone; the base they adapt is no longer
    model.uri's (its layers pruned and renumbered, healed), so the export holds it too. On model.uri's base the
    adapters loaded onto other layers with only a warning."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer.config import LoraSpec
    from finetune_trainer.rearrange import add_adapters

    model, tokenizer, batches = minilm
    model = copy.deepcopy(model)
    prune.remove_layers(model, Task.SEQUENCE_CLASSIFICATION, [1, 3])
    wrapped = add_adapters(model, LoraSpec(rank=4), ["query", "value"], "classifier")
    with torch.no_grad():  # as if trained
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.1)
    logits = logits_of(wrapped.eval(), batches[0].inputs)
    doc = tiny_classifier_doc(tmp_path) | {"rearrange": {"mergeOnExport": False, "lora": {"rank": 4},
                                                         "prune": {"count": 2}}}
    files = export_model(wrapped, tokenizer, {0: "neg", 1: "neu", 2: "pos"}, TrainerConfig.model_validate(doc),
                         tmp_path / "out")
    assert {"adapter/adapter_model.safetensors", "model.safetensors", "config.json"} <= set(files)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, batches[0].inputs), logits, atol=1e-5, rtol=1e-5)
    # Their config names no base: peft's AutoPeftModel loaded model.uri's, unpruned, under them without a word
    adapter_config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None


def test_healing_trains_the_kept_layers_back_towards_the_unpruned_models_hidden_states(minilm) -> None:
    model, _, batches = minilm
    teacher = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    prune.remove_layers(pruned, Task.SEQUENCE_CLASSIFICATION, [1, 2])
    pruned.bert.embeddings.requires_grad_(False)  # as a freeze would leave them: healing must not change that
    untouched = {k: v.clone() for k, v in pruned.state_dict().items() if not k.startswith("bert.encoder.")}
    healed = prune.heal(pruned, teacher, Task.SEQUENCE_CLASSIFICATION, batches * 3, HealSpec(steps=8))
    assert healed["steps"] == 8
    assert healed["cosine_after"] > healed["cosine_before"] + 0.03, healed
    target = prune.last_hidden(teacher, batches[0].inputs)
    assert prune.agreement(pruned, batches[0], target) == pytest.approx(healed["cosine_after"], abs=1e-4)
    for key, value in pruned.state_dict().items():  # only the layers train: embeddings, pooler and head stay
        if key in untouched:
            assert torch.equal(value, untouched[key]), key
    assert not any(p.requires_grad for p in pruned.bert.embeddings.parameters())
    assert all(p.requires_grad for p in pruned.bert.encoder.parameters())
    for key, value in teacher.state_dict().items():  # the target is left as it was
        assert torch.equal(value, model.state_dict()[key]), key


def test_healing_checkpoints_the_layers_where_training_does(minilm) -> None:
    """Healing trains in eval mode, where transformers checkpoints no layer: a job that turned
    training.gradientCheckpointing on to fit kept every layer's activations there and ran out of memory. Checkpointed,
    it saves a fraction of the bytes for the backward, and heals to the same weights."""
    model, _, batches = minilm
    healed, saved = [], []
    for on in (False, True):
        pruned = copy.deepcopy(model)
        prune.remove_layers(pruned, Task.SEQUENCE_CLASSIFICATION, [1, 2])
        if on:
            checkpoint_layers(pruned)
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: nbytes.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            prune.heal(pruned, model, Task.SEQUENCE_CLASSIFICATION, batches, HealSpec(steps=1))
        assert not any(m.training for m in pruned.modules())  # the layers' flags put back
        healed.append(pruned.state_dict())
        saved.append(sum(nbytes))
    assert 0 < 2 * saved[1] < saved[0], saved
    for key, value in healed[0].items():
        torch.testing.assert_close(healed[1][key], value, msg=key)


def fp16_heal(teacher: torch.nn.Module, pruned: torch.nn.Module, batches: list[Batch], steps: int) -> dict[str, float]:
    return prune.heal(pruned, teacher, Task.SEQUENCE_CLASSIFICATION, batches * 3, HealSpec(steps=steps), torch.float16)


def test_fp16_healing_scales_its_loss_so_that_small_gradients_do_not_underflow(minilm) -> None:
    """Healing's gradients pass through fp16 activations under fp16 autocast: a small loss (a model near its target,
    or many tokens a batch) gave gradients below fp16's least: a third of the layers' linear weights got exactly zero
    (AdamW never moved them). Scaled by the training loop's GradScaler, none underflow."""
    model, _, batches = minilm
    teacher = copy.deepcopy(model)
    prune.remove_layers(teacher, Task.SEQUENCE_CLASSIFICATION, [1, 2])
    pruned = copy.deepcopy(teacher)
    with torch.no_grad():  # a little off its target: a loss near 1e-8
        pruned.bert.encoder.layer[0].attention.self.query.weight.mul_(1.001)
    weights = [m.weight for m in pruned.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    zeros = []
    hook = register_optimizer_step_pre_hook(lambda *_: zeros.append(
        sum(int((w.grad == 0).sum()) for w in weights) / sum(w.numel() for w in weights)))
    try:
        healed = fp16_heal(teacher, pruned, batches, 1)
    finally:
        hook.remove()
    assert len(zeros) == 1 and zeros[0] < 0.01, zeros
    assert healed["steps"] == 1 and healed["skipped_steps"] == 0, healed


def test_an_fp16_healing_step_whose_gradients_overflow_is_skipped_and_counted(minilm) -> None:
    """As in the training loop, fp16's GradScaler skips a step whose gradients are not finite (and lowers its
    scale): the weights are those of the steps before it, not NaN."""
    model, _, batches = minilm
    teacher = copy.deepcopy(model)
    healed = []
    for steps in (1, 2):
        pruned = copy.deepcopy(model)
        prune.remove_layers(pruned, Task.SEQUENCE_CLASSIFICATION, [1, 2])
        backward = iter(range(steps))
        overflow = pruned.bert.encoder.layer[0].intermediate.dense.weight.register_hook(
            lambda grad: grad * float("inf") if next(backward) == 1 else grad)  # the second step's gradient
        healed.append((fp16_heal(teacher, pruned, batches, steps), pruned.state_dict()))
        overflow.remove()
    (one, once), (two, twice) = healed
    for key, value in twice.items():
        assert torch.equal(value, once[key]), key
    assert (one["steps"], one["skipped_steps"], two["steps"], two["skipped_steps"]) == (1, 0, 2, 1), healed
    from finetune_trainer.export import heal_lines

    assert "skipped" not in heal_lines(one)[1] and "2 steps, 1 of them skipped by fp16's loss scaling" in heal_lines(two)[1]


def test_an_attempt_that_resumes_loads_the_healed_layers_instead_of_healing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """LoRA's checkpoints hold the adapters, not the healed layers under them: the run keeps those beside its
    checkpoints, and the attempt that resumes loads them and ends with the weights of a run never stopped."""
    import os
    import signal

    from safetensors.torch import load_file

    from finetune_trainer import export
    from finetune_trainer.errors import Terminated

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 4, "learningRate": 1e-3}}, "lora": {"rank": 4}}
    cfg = TrainerConfig.model_validate(doc)
    healed: list[int] = []
    real_heal = prune.heal
    monkeypatch.setattr(prune, "heal", lambda *args, **kw: healed.append(1) or real_heal(*args, **kw))
    copies: list[int] = []  # healing's target, a copy of the whole unpruned model
    real_target = prune.healing_target
    monkeypatch.setattr(prune, "healing_target", lambda model: copies.append(1) or real_target(model))
    reference = run(cfg, tmp_path / "reference")
    real_export = export.export_model

    def sigterm(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "export_model", sigterm)
    with pytest.raises(Terminated, match="in stage Exporting"):
        run(cfg, tmp_path / "out")
    (folder,) = (tmp_path / "out" / "checkpoints").iterdir()
    assert len(healed) == 2 and (folder / "healed.safetensors").exists()
    (folder / ".tmp-healed.safetensors").write_bytes(b"half written")  # a crash mid-save leaves a file, not a folder
    monkeypatch.setattr(export, "export_model", real_export)
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    resumed = run(cfg, tmp_path / "out")
    assert f"resumed from {folder / 'step-'}" in caplog.text  # not trained afresh, to the same weights
    assert len(healed) == 2  # not a third time
    assert len(copies) == 2  # and no copy of the unpruned model to heal towards
    assert not (folder / ".tmp-healed.safetensors").exists()
    figures = {k: v for k, v in reference["pruning"]["heal"].items() if k != "seconds"}
    assert {k: v for k, v in resumed["pruning"]["heal"].items() if k != "seconds"} == figures | {"reloaded": True}
    assert resumed["evaluation"]["final"] == reference["evaluation"]["final"]
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_attempt_whose_scores_choose_other_layers_removes_the_earlier_attempts_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another node (other hardware, bf16 where the first computed fp32) can order a near-tie of the scores
    otherwise. The attempt removed other layers, discarded the earlier one's checkpoints and healed layers, and
    trained from step 0; it removes the layers the earlier attempt removed and resumes its training."""
    import os
    import signal

    from finetune_trainer import checkpoints, export
    from finetune_trainer.errors import Terminated

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2}}, "lora": {"rank": 4}}
    cfg = TrainerConfig.model_validate(doc)
    real_export = export.export_model
    monkeypatch.setattr(export, "export_model", lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Terminated, match="in stage Exporting"):
        run(cfg, tmp_path / "out")
    (folder,) = (tmp_path / "out" / "checkpoints").iterdir()
    identity = checkpoints.read_identity(folder)
    assert identity is not None
    earlier = identity["prunedLayers"]
    monkeypatch.setattr(export, "export_model", real_export)
    other = [next(i for i in range(3) if i not in earlier)]
    monkeypatch.setattr(prune, "chosen_layers", lambda scores, spec: other)  # what the other node's scores choose
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    resumed = run(cfg, tmp_path / "out")
    assert f"would remove layers {other}; an earlier attempt of this run removed {earlier}" in caplog.text
    assert resumed["pruning"]["removed_layers"] == earlier
    assert f"resumed from {folder / 'step-'}" in caplog.text and resumed["pruning"]["heal"]["reloaded"]
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == [folder.name]


def test_a_pruned_decoder_renumbers_its_layers_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = TINY_GPT2 | {"n_layer": 3}
    spec = ModelSpec(task=Task.CAUSAL_LM, architecture="gpt2", config=config,
                     tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0).eval()
    data = encode_causal(Split(TEXTS, None), tokenizer, 16)
    batch = make_collate(Task.CAUSAL_LM, tokenizer.pad_token_id, 32)(data, list(range(8)))
    scores = prune.importance(model, [batch], Task.CAUSAL_LM, labels_fit=True)
    assert len(scores["layers"]["scores"]) == 3 and len(scores["heads"]["scores"][0]) == 2
    kept = model.transformer.h[2]
    prune.remove_layers(model, Task.CAUSAL_LM, [0, 1])
    assert list(model.transformer.h) == [kept] and kept.attn.layer_idx == 0 and model.config.n_layer == 1
    logits = logits_of(model, batch.inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, batch.inputs), logits, atol=1e-5, rtol=1e-5)


def test_a_pruned_gpt2_scaling_attention_by_its_layers_index_scales_as_it_reloads(tmp_path: Path, caplog) -> None:
    """GPT-2 with scale_attn_by_inverse_layer_idx divides its attention's scaling by layer_idx + 1 when built: without
    layer 0 the kept layers kept their old scaling in memory, and the export reloaded with that of their new
    places, another model (logits up to 0.1 apart)."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec(task=Task.CAUSAL_LM, architecture="gpt2",
                     config=TINY_GPT2 | {"n_layer": 4, "scale_attn_by_inverse_layer_idx": True},
                     tokenizerUri="pvc://models/all-MiniLM-L6-v2")
    model = load_model(spec, load_tokenizer(spec), seed=0).eval()
    with torch.no_grad():  # attention sharp enough for its scaling to matter
        for layer in model.transformer.h:
            layer.attn.c_attn.weight.mul_(8)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.prune"):
        prune.remove_layers(model, Task.CAUSAL_LM, [0])
    inputs = {"input_ids": torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(model, inputs), atol=1e-5, rtol=1e-5)
    assert [layer.attn.scaling for layer in model.transformer.h] == [0.25 / n for n in (1, 2, 3)]
    assert "the kept layers' attn.scaling follow their new places" in caplog.text


def test_a_pruned_gpt_neo_renumbers_the_layer_ids_its_cache_is_indexed_by() -> None:
    """GPT-Neo's attention keeps its layer's index in layer_id, not layer_idx: without layer 1 of 4 its kept layers
    said [0, 2, 3] and updated a cache of 3 layers at index 3, an IndexError on every forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neo", vocab_size=100, hidden_size=32, num_layers=4, num_heads=2,
                                  attention_types=[[["global", "local"], 2]], window_size=8, max_position_embeddings=64,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prune.remove_layers(model, Task.CAUSAL_LM, [1])
    assert [[m.layer_id for m in (layer.attn, layer.attn.attention)] for layer in model.transformer.h] == [
        [0, 0], [1, 1], [2, 2]]
    assert_generation_step_matches(model, torch.randint(0, 100, (2, 12)))


def assert_generation_step_matches(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """A generation step on the cache of all but the last token scores that token as the whole forward does."""
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cached = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=ids[:, -1:], past_key_values=cached, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], whole[:, -1], atol=1e-5, rtol=1e-5)


def test_a_pruned_models_per_layer_config_lists_follow_the_kept_layers(tmp_path: Path) -> None:
    """SmolLM3 says in no_rope_layers which layers use rotary positions: the export kept the unpruned list, so the
    reloaded model put them on the wrong layers (logits 1.5e-3 apart on random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("smollm3", vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                                  no_rope_layers=[1, 0, 1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prune.remove_layers(model, Task.CAUSAL_LM, [0])
    assert model.config.no_rope_layers == [0, 1, 0] and len(model.config.layer_types) == 3
    inputs = {"input_ids": torch.randint(0, 100, (2, 12))}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(model, inputs), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("model_type, extra, key, drop, expected", [
    ("llama4_text", {"num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size_mlp": 64,
                     "interleave_moe_layer_step": 2, "attention_chunk_size": 4}, "moe_layers", [0], [0, 2]),
    ("llama4_text", {"num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size_mlp": 64,
                     "interleave_moe_layer_step": 1, "attention_chunk_size": 4}, "moe_layers", [1], [0, 1, 2]),
    ("qwen3_moe", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16, "mlp_only_layers": [0],
                   "decoder_sparse_step": 1}, "mlp_only_layers", [0], []),
])
def test_a_pruned_models_config_lists_of_layer_indices_are_renumbered_to_the_kept_layers(
        model_type: str, extra: dict, key: str, drop: list[int], expected: list[int], tmp_path: Path) -> None:
    """Llama-4's moe_layers and Qwen3-MoE's mlp_only_layers say by index which layers are of a kind: they were
    filtered by position when as long as the layer list ([0, 1, 2, 3] without layer 1 said [0, 2, 3]), else kept as
    they were, so the pruning was refused as one whose config builds its layers by their index."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prune.remove_layers(model, Task.CAUSAL_LM, drop)
    assert getattr(model.config, key) == expected and model.config.num_hidden_layers == 4 - len(drop)
    inputs = {"input_ids": torch.randint(3, 100, (2, 12))}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(model, inputs), atol=1e-5, rtol=1e-5)


def test_a_model_whose_config_places_its_layers_by_index_is_pruned_only_where_it_reloads(tmp_path: Path) -> None:
    """Qwen2-MoE with decoder_sparse_step 2 has a dense MLP on even layers and experts on odd ones, by index: without
    layer 0 the export reloaded every layer as the other kind, with fresh weights and only a warning. Refused (the
    model left whole) unless the kept layers fall where their kind is, as without layers 0 and 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2_moe", vocab_size=100, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                                  num_experts_per_tok=2, decoder_sparse_step=2, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layers = list(model.model.layers)
    with pytest.raises(ConfigError, match=r"^rearrange.prune: without layers \[0\], Qwen2MoeForCausalLM would not "
                                          r"reload as trained \(model.layers.\S+ and \d+ more differ\): its config "
                                          r"builds its layers by their index"):
        prune.remove_layers(model, Task.CAUSAL_LM, [0])
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    prune.remove_layers(model, Task.CAUSAL_LM, [0, 1])
    inputs = {"input_ids": torch.randint(0, 100, (2, 12))}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(model, inputs), atol=1e-5, rtol=1e-5)


def test_pruning_a_hybrid_models_every_attention_layer_is_refused_naming_the_field_and_left_whole() -> None:
    """NemotronH "M-*-" has one attention layer, 2, among Mamba and MLP ones: without it the pruning was accepted,
    and the first evaluation's cached forward failed ("get_seq_length can only be called on Attention layers"),
    exit 2, retried only to fail the same way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("nemotron_h", vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  hybrid_override_pattern="M-*-", mamba_num_heads=4, mamba_head_dim=8,
                                  ssm_state_size=8, n_groups=1, chunk_size=8, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layers = list(model.model.layers)
    with pytest.raises(ConfigError, match=r"^rearrange.prune: without layers \[2\], NemotronHForCausalLM cannot run "
                                          r"a cached forward"):
        prune.remove_layers(model, Task.CAUSAL_LM, [2])
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    assert model.config.hybrid_override_pattern == "M-*-" and layers[2].mixer.layer_idx == 2
    prune.remove_layers(model, Task.CAUSAL_LM, [1])
    assert_generation_step_matches(model, torch.randint(3, 100, (2, 12)))


@pytest.mark.parametrize("merge", [True, False])
def test_a_pruned_job_reports_scores_size_and_latency_before_and_after(merge: bool, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """The whole pipeline with rearrange.prune on a 3-layer BERT: the analysis scores the layers, one goes before
    training, and the report, the termination message and the model card say what it cost and saved. Adapters kept
    apart (mergeOnExport false) are counted apart from the base exported: counted with it, and with peft's copy of
    the head as loaded, the pruned model's parameters looked more than they are."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 3}}, "lora": {"rank": 4}, "mergeOnExport": merge}
    termination = tmp_path / "termination"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(termination))
    report = run(TrainerConfig.model_validate(doc), tmp_path / "out")
    scores = report["analysis"]["importance"]["layers"]["scores"]
    pruning = report["pruning"]
    assert pruning["removed_layers"] == [min(range(3), key=scores.__getitem__)]
    assert pruning["layers_before"] == 3 and pruning["layers_after"] == 2
    assert pruning["after"]["parameters"] < pruning["before"]["parameters"]
    assert pruning["before"]["latency_ms"] > 0 and pruning["after"]["latency_ms"] > 0
    assert set(pruning["before"]) >= {"accuracy", "f1"} and pruning["after"]["accuracy"] == report["evaluation"]["final"]["accuracy"]
    message = json.loads(termination.read_text())
    assert message["pruning"]["removedLayers"] == pruning["removed_layers"]
    assert message["pruning"]["parameters"] == {"before": pruning["before"]["parameters"],
                                                "after": pruning["after"]["parameters"]}
    assert message["analysis"]["layerImportance"] == [round(s, 4) for s in scores]
    assert pruning["heal"]["steps"] == 3 and -1 <= pruning["heal"]["cosine_before"] <= 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Pruning" in card and "Healed in 3 steps" in card
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 2 and prune.parameters(reloaded) == pruning["after"]["parameters"]
    adapters = 0 if merge else sum(t.numel() for name, t in
                                   load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors").items()
                                   if "lora_" in name)
    assert pruning["after"].get("adapter_parameters", 0) == adapters
    assert (f"| adapter parameters (kept apart, adapter/) | - | {adapters:,} |" in card) == (not merge)


def test_a_threshold_below_every_layers_score_removes_none_and_heals_nothing(tmp_path: Path, monkeypatch,
                                                                            caplog) -> None:
    """A threshold is the analysis' call, which may be none: the job trains the model whole, with a warning. It
    copied the whole model and healed it towards that copy of itself (loss 0, steps for nothing), and the card said
    'Removed 0 of 3 layers (, counted from 0 at the bottom)'. It measured the FLOPs of the model it had not pruned
    again, a probe step for nothing."""
    from finetune_trainer import analyze

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"threshold": 1e-9, "heal": {"steps": 3}}}
    copies: list[int] = []
    real_target = prune.healing_target
    monkeypatch.setattr(prune, "healing_target", lambda model: copies.append(1) or real_target(model))
    probes: list[int] = []
    real_probe = analyze.probe_step
    monkeypatch.setattr(analyze, "probe_step", lambda *a: probes.append(1) or real_probe(*a))
    with caplog.at_level("WARNING", logger="finetune_trainer.prune"):
        report = run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert "rearrange.prune.threshold 1e-09 removes no layer" in caplog.text
    assert report["pruning"]["removed_layers"] == [] and report["pruning"]["layers_after"] == 3
    assert "heal" not in report["pruning"] and copies == []
    assert len(probes) == 1  # the analysis' own
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Removed none of the 3 layers: none scored below the threshold" in card and "Healed" not in card


def test_a_pruned_jobs_mfu_counts_the_flops_of_a_step_of_the_pruned_model(tmp_path: Path, gauged) -> None:
    """The MFU gauge took the analysis' FLOPs per sample, measured on the model as loaded: a third of the layers
    pruned, it read 1.5x what the pruned model did. It takes those of a step of the model that trains, which the
    export (the same shapes) measures again."""
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer import analyze

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1}}
    probes, flops = gauged
    report = run(TrainerConfig.model_validate(doc), tmp_path / "out")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert flops and set(flops) == {analyze.step_flops(exported, probes[0], None)}
    pruned = analyze.probe_step(exported, probes[0][:1], Task.SEQUENCE_CLASSIFICATION, False, None)[1]["flops"]
    assert pruned < report["analysis"]["flops"]["training_per_sample"]


def heal_texts_file(folder: Path) -> Path:
    """Unlabelled text from the end of the sentiment CSV (the tiny job trains on 128 of its rows), under a column
    of another name, in another format: a JSONL of texts only."""
    import pandas as pd

    from finetune_trainer.uris import local_path

    texts = pd.read_csv(local_path("pvc://data/sentiment/sentiment.csv"), encoding="latin-1")["text"].tail(48)
    path = folder / "unlabelled.jsonl"
    pd.DataFrame({"tweet": texts}).to_json(path, orient="records", lines=True)
    return path


def test_healing_on_a_dataset_of_texts_reads_them_tokenized_as_the_training_data(tmp_path: Path,
                                                                                monkeypatch) -> None:
    """rearrange.prune.heal.dataset: healing's batches are that file's texts (not the training split's), tokenized
    to dataset.maxLength as the training texts are, and the pruned model moves towards the unpruned one."""
    from finetune_trainer.data import load_texts

    path = heal_texts_file(tmp_path)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 6, "learningRate": 1e-3, "dataset": {
        "uri": str(path), "textField": "tweet"}}}, "lora": {"rank": 4}}
    cfg = TrainerConfig.model_validate(doc)
    seen: list[list[int]] = []
    real_heal = prune.heal

    def spy(model, teacher, task, batches, spec, dtype=None):
        def recorded():
            for batch in batches:
                seen.extend(ids[mask.bool()].tolist() for ids, mask in
                            zip(batch.inputs["input_ids"], batch.inputs["attention_mask"]))
                yield batch
        return real_heal(model, teacher, task, recorded(), spec, dtype)

    monkeypatch.setattr(prune, "heal", spy)
    report = run(cfg, tmp_path / "out")
    heal = report["pruning"]["heal"]
    assert heal["steps"] == 6 and heal["cosine_after"] > heal["cosine_before"], heal
    tokenizer = load_tokenizer(cfg.model)
    texts = load_texts(cfg.rearrange.prune.heal.dataset, "rearrange.prune.heal.dataset")
    expected = tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    assert len(texts) == 48 and len(seen) >= 6 * 16
    assert all(row in expected for row in seen)  # every healing row is one of the file's texts, truncated to 32


@pytest.mark.parametrize("dataset, message", [
    ({"uri": "/nonexistent/unlabelled.csv"}, r"rearrange.prune.heal.dataset.uri /nonexistent/unlabelled.csv: .* does not exist"),
    ({"textField": "body"}, r"no column 'body' \(rearrange.prune.heal.dataset.textField\); it has 'tweet'"),
])
def test_a_missing_healing_file_or_column_is_refused_naming_the_field(tmp_path: Path, dataset: dict,
                                                                      message: str) -> None:
    """Before the model loads (no output written), with the user-error exit code."""
    from finetune_trainer.errors import DataError, EXIT_USER_ERROR, exit_code_of

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2, "dataset": {
        "uri": str(heal_texts_file(tmp_path)), "textField": "tweet"} | dataset}}}
    with pytest.raises(DataError, match=message) as refused:
        run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert exit_code_of(refused.value) == EXIT_USER_ERROR
    assert not (tmp_path / "out" / "analysis.json").exists()


def heal_pairs_doc(folder: Path, suffix: str = ".csv", **heal_dataset: str) -> dict:
    """tiny_pair_classifier_doc with 3 layers, one pruned and healed for 2 steps on folder/unlabelled.csv's (or
    .jsonl's) pairs (a blank text and a missing one among them), read as `heal_dataset` says."""
    rows = [("the sky", "is blue"), (" ", "a blank first text"), ("rain", None), ("an old car", "the car"),
            ("a text", "")]
    table = pd.DataFrame(rows, columns=["premise", "hypothesis"])
    path = folder / f"unlabelled{suffix}"
    if suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_json(path, orient="records", lines=True)
    doc = tiny_pair_classifier_doc(folder, maxSteps=2)
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2, "dataset": {
        "uri": str(path), "textField": "premise"} | heal_dataset}}}
    return doc


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])  # JSON keeps "" and " ", where CSV reads a blank cell as none
def test_a_pair_classifier_heals_on_its_datasets_pairs_encoded_as_the_training_pairs(tmp_path: Path,
                                                                                     suffix: str) -> None:
    """heal.dataset.textPairField: each row's two texts are a pair, with segment ids, as the training split's
    (rows lacking either text left out): healing on the premises alone fitted the layers to inputs the model never
    classifies."""
    from finetune_trainer.pipeline import healing_texts

    cfg = TrainerConfig.model_validate(heal_pairs_doc(tmp_path, suffix, textPairField="hypothesis"))
    tokenizer = load_tokenizer(cfg.model)
    healing = healing_texts(cfg, tokenizer, Encoded([], [], []), ())  # not the training split's
    expected = tokenizer(["the sky", "an old car"], ["is blue", "the car"], truncation=True, max_length=32)
    assert healing.features == expected["input_ids"] and healing.segments == expected["token_type_ids"]
    assert all(1 in row for row in healing.segments)  # each second text is segment 1


def training_pairs_heal_doc(folder: Path) -> dict:
    """tiny_pair_classifier_doc with 3 layers, one pruned and healed for 2 steps on the training split's pairs."""
    doc = tiny_pair_classifier_doc(folder, maxSteps=2)
    doc["model"]["config"] = TINY_BERT | {"num_hidden_layers": 3}
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2}}}
    return doc


@pytest.mark.parametrize("make_doc", [training_pairs_heal_doc,
                                      lambda folder: heal_pairs_doc(folder, textPairField="hypothesis")],
                         ids=["training-pairs", "heal-dataset-pairs"])
def test_a_one_segment_pair_classifier_heals_without_segment_ids(tmp_path: Path,
                                                                 make_doc: Callable[[Path], dict]) -> None:
    """A RoBERTa-kind model (one segment) of pairs heals on the training pairs, or heal.dataset's, without the BERT
    tokenizer's segment 1, which indexes past its table (training dropped them; healing did not)."""
    doc = make_doc(tmp_path)
    doc["model"]["config"] |= {"type_vocab_size": 1}
    report = run(TrainerConfig.model_validate(doc), tmp_path / "out")
    assert report["pruning"]["heal"]["steps"] == 2


@pytest.mark.parametrize("heal_dataset, message", [
    ({}, r"dataset.textPairField classifies pairs of texts: heal it on pairs too"),
    ({"textPairField": "premise"}, r"textPairField names the same column as textField"),
])
def test_a_pair_classifiers_healing_texts_are_refused_unless_pairs_of_two_columns(heal_dataset: dict, message: str,
                                                                                   tmp_path: Path) -> None:
    """A classifier of pairs heals on pairs: its premises alone, or one column read twice, are refused."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate(heal_pairs_doc(tmp_path, **heal_dataset))


def test_healing_on_the_jobs_own_dataset_leaves_out_its_validation_and_test_texts(tmp_path: Path, monkeypatch,
                                                                                   caplog) -> None:
    """heal.dataset.uri the job's dataset.uri: load_texts reads every split of the file, so healing fitted the layers
    to the texts early stopping selects on and the final scores are of. They are left out, saying how many."""
    from finetune_trainer import pipeline
    from finetune_trainer.data import load_dataset

    path = tmp_path / "data.csv"
    pd.DataFrame({"text": [f"sentence number {n}" for n in range(60)],
                  "sentiment": ["negative", "positive", "neutral"] * 20}).to_csv(path, index=False)
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["dataset"]["uri"] = str(path)
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2, "dataset": {"uri": str(path), "textField": "text"}}}}
    cfg = TrainerConfig.model_validate(doc)
    healed: list[Encoded] = []
    real = pipeline.healing_texts

    class Read(BaseException):  # what healing reads is all this test needs: the model is not loaded
        pass

    def spy(*args):
        healed.append(real(*args))
        raise Read

    monkeypatch.setattr(pipeline, "healing_texts", spy)
    with pytest.raises(Read):
        run(cfg, tmp_path / "out")
    data = load_dataset(cfg.dataset, Task.SEQUENCE_CLASSIFICATION, seed=0)
    held_out = data.validation.inputs + data.test.inputs
    tokenizer = load_tokenizer(cfg.model)
    expected = tokenizer(data.train.inputs, truncation=True, max_length=32)["input_ids"]
    assert held_out and sorted(healed[0].features) == sorted(expected)
    assert (f"rearrange.prune.heal.dataset.uri {path}: left out {len(held_out)} of its 60 texts that are in the job's "
            "validation or test split") in caplog.text


def test_healing_pairs_are_left_out_as_pairs_and_texts_that_are_all_evaluated_are_refused_naming_the_field() -> None:
    """A pair is the job's only where both its texts are (a premise may be tested with another hypothesis); a file of
    nothing but evaluated texts leaves healing none."""
    from finetune_trainer.errors import DataError
    from finetune_trainer.pipeline import unevaluated

    evaluated = (Split([("a premise", "its hypothesis")], [0]), Split([("a test", "pair")], [1]))
    pairs = [("a premise", "its hypothesis"), ("a premise", "another"), ("a test", "pair")]
    assert unevaluated(pairs, evaluated, "u.csv") == [("a premise", "another")]
    with pytest.raises(DataError, match=r"^rearrange.prune.heal.dataset.uri u.csv: each of its texts is one of the "
                                        r"job's validation or test split's"):
        unevaluated(["a", "b"], (Split(["b"], [0]), Split(["a"], [1])), "u.csv")


def test_a_classifier_of_single_texts_is_refused_healing_pairs(tmp_path: Path) -> None:
    """Pairs heal only a classifier of pairs: a causal LM's or a single-text classifier's inputs are one text."""
    from pydantic import ValidationError

    doc = tiny_classifier_doc(tmp_path / "out")
    doc["rearrange"] = {"prune": {"count": 1, "heal": {"steps": 2, "dataset": {
        "uri": str(heal_texts_file(tmp_path)), "textField": "tweet", "textPairField": "reply"}}}}
    with pytest.raises(ValidationError, match=r"this job's inputs are single texts \(no dataset.textPairField\): heal on single texts"):
        TrainerConfig.model_validate(doc)


def test_texts_that_turn_out_to_be_images_are_refused_naming_the_field(tmp_path: Path) -> None:
    """`format: auto` on a folder of class folders finds an ImageFolder: refused as the user's error, not read."""
    from finetune_trainer.config import TextsSpec
    from finetune_trainer.data import load_texts
    from finetune_trainer.errors import DataError, EXIT_USER_ERROR, exit_code_of

    (tmp_path / "images" / "cats").mkdir(parents=True)
    (tmp_path / "images" / "cats" / "0.png").write_bytes(b"\x89PNG")  # a folder of folders without images is none
    with pytest.raises(DataError, match=r"^rearrange.prune.heal.dataset .*images: holds images \(imagefolder\), "
                       r"not texts; point rearrange.prune.heal.dataset.uri at texts$") as refused:
        load_texts(TextsSpec(uri=str(tmp_path / "images")), "rearrange.prune.heal.dataset")
    assert exit_code_of(refused.value) == EXIT_USER_ERROR


def test_a_layer_list_that_is_no_stack_of_hidden_states_gets_no_scores() -> None:
    """A model whose longest ModuleList does not pass hidden states along: no score rather than a wrong one (and
    pruning then says it found no stack of layers)."""
    from torch import nn

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(8, 4) for _ in range(3))
            self.classifier = nn.Linear(12, 2)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = input_ids.float()
            return self.classifier(torch.cat([b(x) for b in self.branches], -1)).mean(1)

    from finetune_trainer.batches import Batch

    ids = torch.ones(2, 5, 8, dtype=torch.long)
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones(2, 5)}, torch.tensor([0, 1]), 2, 10, 2)
    assert prune.importance(Branches(), [batch], Task.SEQUENCE_CLASSIFICATION, labels_fit=True) is None


def tiny_xlm() -> torch.nn.Module:
    """A 4-layer XLM classifier: each layer's attention, FFN and two norms sit in four parallel lists."""
    from transformers import XLMConfig, XLMForSequenceClassification

    torch.manual_seed(0)
    return XLMForSequenceClassification(XLMConfig(vocab_size=100, emb_dim=32, n_layers=4, n_heads=2,
                                                   num_labels=2)).eval()


def test_a_model_whose_layers_parts_sit_in_parallel_lists_gets_no_scores_and_is_refused_pruning_left_whole() -> None:
    """XLM's layers are spread over attentions, ffns, layer_norm1 and layer_norm2, of one length: the last by name,
    layer_norm2, was taken for the layers, and pruning shortened it alone (an IndexError at the next forward, retried
    for ever). Refused naming the field and the lists, the model left whole."""
    from finetune_trainer.errors import EXIT_USER_ERROR, exit_code_of

    model = tiny_xlm()
    ids = torch.randint(5, 100, (2, 7))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 1]), 2, 14, 2)
    assert prune.importance(model, [batch], Task.SEQUENCE_CLASSIFICATION, labels_fit=True) is None
    parts = "transformer.attentions, transformer.ffns, transformer.layer_norm1, transformer.layer_norm2"
    for field in ("rearrange.prune", "rearrange.prune.heal"):
        with pytest.raises(ConfigError, match=rf"^{field}: XLMForSequenceClassification keeps each layer's parts in "
                                              rf"parallel lists \({parts}\)") as refused:
            prune.stack_for(model, Task.SEQUENCE_CLASSIFICATION, field)
        assert exit_code_of(refused.value) == EXIT_USER_ERROR
    with pytest.raises(ConfigError, match="^rearrange.prune: XLMForSequenceClassification keeps"):
        prune.remove_layers(model, Task.SEQUENCE_CLASSIFICATION, [1])
    assert model.config.n_layers == 4 and all(len(getattr(model.transformer, n)) == 4
                                              for n in ("attentions", "ffns", "layer_norm1", "layer_norm2"))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_a_list_that_holds_a_part_of_each_layer_is_not_taken_as_rebuilt() -> None:
    """check_rebuilt compared the list pruned alone: XLM's layer_norm2 without layer 1 matched what its config of 3
    layers builds there, though the other lists of 4 parts each would reload as 3. The whole model is compared."""
    model = tiny_xlm()
    with pytest.raises(ConfigError, match=r"^rearrange.prune: without layers \[1\], XLMForSequenceClassification "
                                          r"would not reload as trained \(transformer.attentions.3.\S+ and \d+ more "
                                          r"differ\): its config builds its layers by their index, or "
                                          r"transformer.layer_norm2 holds only a part of each"):
        prune.check_rebuilt(model, "transformer.layer_norm2", model.transformer.layer_norm2, [1])


def test_a_pruned_job_on_a_model_whose_layers_parts_sit_in_parallel_lists_is_refused_saying_why(
        tmp_path: Path) -> None:
    """The pipeline's analysis gets no scores for XLM; the job is refused naming rearrange.prune and the lists, not
    as a model without a stack of layers."""
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] |= {"architecture": "xlm", "config": {"emb_dim": 32, "n_layers": 2, "n_heads": 2}}
    doc["rearrange"] = {"prune": {"count": 1}}
    with pytest.raises(ConfigError, match=r"^rearrange.prune: XLMForSequenceClassification keeps each layer's parts "
                                          r"in parallel lists"):
        run(TrainerConfig.model_validate(doc), tmp_path / "out")


def test_healings_target_keeps_no_key_value_cache_and_the_pruned_model_still_does() -> None:
    """Healing's target (the unpruned copy) runs a no_grad forward a step, which for a causal LM kept every layer's
    keys and values to its end, as a teacher's did; the pruned model's export still says use_cache, for generate()."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, **TINY_GPT2))
    target = prune.healing_target(model)
    with torch.no_grad():
        assert target(input_ids=torch.tensor([[1, 2, 3]])).past_key_values is None
        assert model(input_ids=torch.tensor([[1, 2, 3]])).past_key_values is not None


def tiny_albert() -> tuple[torch.nn.Module, Batch]:
    """ALBERT built from a config: one layer whose weights a forward runs 6 times (num_hidden_layers), and a batch."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=97, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, max_position_embeddings=64, num_labels=3))
    ids = torch.randint(5, 97, (3, 12))
    return model, Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 1, 2]), 3, 36, 3)


def test_a_layer_whose_weights_run_several_times_per_forward_is_scored_per_run_and_refused_pruning(caplog) -> None:
    """ALBERT's one layer runs 6 times per forward: its Block Influence summed the 6 runs (beyond the documented 2),
    pruning it was refused as removing 'all 1 layers', a bottom-layers count of 4 'exceeds the model's 1 layers',
    and the 6N rule counted its weights once (FlopsOffEstimate, 5.6x)."""
    from finetune_trainer.adjust import freeze_checked
    from finetune_trainer.analyze import analyze

    model, batch = tiny_albert()
    task = Task.SEQUENCE_CLASSIFICATION
    runs: list[float] = []

    def turn(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        runs.append(float((1 - F.cosine_similarity(args[0], output, dim=-1)).mean()))

    handle = model.albert.encoder.albert_layer_groups[0].register_forward_hook(turn)
    with torch.no_grad():
        model.eval()(**batch.inputs)
    handle.remove()
    scores = prune.importance(model, [batch], task, labels_fit=True)["layers"]["scores"]
    assert len(runs) == 6 and scores == pytest.approx([sum(runs) / 6])
    layers = depth(model, task, batch)
    assert layers.runs == 6
    with pytest.raises(ConfigError, match=r"^rearrange.prune: the model has 1 layers \(each run 6 times per forward, "
                                          r"its weights shared across the runs\)"):
        prune.check_unshared(layers)
    freeze_checked(model, FreezeSpec(strategy="bottom-layers", count=4), layers, "classifier")
    assert "adjust.freeze.count 4 exceeds the model's 1 layers (each run 6 times per forward" in caplog.text
    report = analyze(model, [batch], task, 3, adapters=False)
    assert 0.5 < report.flops["measured_over_estimate"] < 1.5
    assert "FlopsOffEstimate" not in [f.code for f in report.findings]


def test_a_pruned_job_on_a_model_whose_layers_share_their_weights_is_refused_saying_so(tmp_path: Path) -> None:
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] |= {"architecture": "albert", "config": TINY_BERT | {"embedding_size": 16, "num_hidden_layers": 4}}
    doc["rearrange"] = {"prune": {"count": 1}}
    with pytest.raises(ConfigError, match=r"^rearrange.prune: the model has 1 layers \(each run 4 times per forward"):
        run(TrainerConfig.model_validate(doc), tmp_path / "out")
