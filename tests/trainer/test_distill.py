"""training.distillation: the blended loss, a student that learns its teacher's predictions without the labels, and
teachers that cannot teach the job refused naming the field."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from finetune_trainer import distill, pipeline
from finetune_trainer.batches import IGNORE_INDEX, eval_batches
from finetune_trainer.config import ModelSpec, Task, TrainerConfig
from finetune_trainer.distill import Teacher, load_teacher
from finetune_trainer.errors import ConfigError, ModelError
from finetune_trainer.models import load_model, load_tokenizer, logits_of
from finetune_trainer.pipeline import fingerprinted
from finetune_trainer.rules import error_lines
from finetune_trainer.train import distilled_loss_sum, loss_sum, soft_loss_sum

from tiny import (TINY_BERT, TINY_GPT2, saved_bert, tiny_classifier_doc, tiny_pair_classifier_doc,
                  unreadable_tokenizer)

SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}
MINILM = "pvc://models/all-MiniLM-L6-v2"


def distilled(doc: dict[str, Any], teacher: Path | str, **spec: Any) -> TrainerConfig:
    doc = copy.deepcopy(doc)
    doc["training"]["distillation"] = {"teacher": {"uri": str(teacher)}, **spec}
    return TrainerConfig.model_validate(doc)


# ---- the loss -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM])
def test_weight_zero_is_the_labels_loss_and_a_teacher_that_agrees_adds_nothing(task: Task) -> None:
    torch.manual_seed(0)
    if task == Task.CAUSAL_LM:
        logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        labels[1, 3:] = IGNORE_INDEX  # padding
    else:
        logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    teacher = torch.randn_like(logits)
    hard = loss_sum(logits, labels, task)
    assert torch.equal(distilled_loss_sum(logits, teacher, labels, task, 2.0, 0.0), hard)
    assert soft_loss_sum(logits, logits.clone(), labels, task, 2.0).abs() < 1e-6
    torch.testing.assert_close(distilled_loss_sum(logits, logits.clone(), labels, task, 2.0, 0.3), 0.7 * hard)
    assert soft_loss_sum(logits, teacher, labels, task, 2.0) > 0


def test_the_soft_targets_pull_the_student_towards_the_teacher() -> None:
    """With weight 1 the gradient of the summed loss on each row's logits is T (softmax(s/T) - softmax(t/T)) (T^2 x
    the KL's 1/T): a step against it moves the student's softened distribution towards the teacher's."""
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    temperature = 2.0
    distilled_loss_sum(student, teacher, labels, Task.SEQUENCE_CLASSIFICATION, temperature, 1.0).backward()
    expected = temperature * (torch.softmax(student.detach() / temperature, -1) - torch.softmax(teacher / temperature, -1))
    torch.testing.assert_close(student.grad, expected)
    before = soft_loss_sum(student.detach(), teacher, labels, Task.SEQUENCE_CLASSIFICATION, temperature)
    after = soft_loss_sum(student.detach() - 0.5 * student.grad, teacher, labels, Task.SEQUENCE_CLASSIFICATION,
                          temperature)
    assert after < before


def test_a_causal_lm_is_taught_at_the_positions_its_loss_scores() -> None:
    """Position t predicts token t+1, as loss_sum shifts the labels: the last position and those before padding
    are no target, so a teacher that differs only there teaches nothing and gives them no gradient."""
    torch.manual_seed(0)
    student = torch.randn(1, 4, 7, requires_grad=True)
    labels = torch.tensor([[3, 1, 5, IGNORE_INDEX]])  # targets: positions 0 (-> 1) and 1 (-> 5)
    teacher = student.detach().clone()
    teacher[0, 2:] = torch.randn(2, 7)  # position 2 predicts padding, 3 nothing
    assert soft_loss_sum(student, teacher, labels, Task.CAUSAL_LM, 2.0).abs() < 1e-6
    teacher[0, :2] = torch.randn(2, 7)
    distilled_loss_sum(student, teacher, labels, Task.CAUSAL_LM, 2.0, 1.0).backward()
    assert student.grad[0, :2].abs().sum() > 0 and student.grad[0, 2:].abs().sum() == 0


class Fixed(torch.nn.Module):
    """A model whose logits are given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.given = logits

    def forward(self, **_: torch.Tensor) -> torch.Tensor:
        return self.given


def test_vocabularies_padded_past_the_tokenizer_are_compared_over_its_ids() -> None:
    """Rows past the tokenizer (Qwen2.5-7B's 152,064 against 0.5B's 151,936, for 151,665 ids) are no token's,
    whichever model has more: the teacher keeps its columns of the tokenizer's ids, and gives the student's rows past
    them no probability. The loss is then the one over the ids alone, with a student that all but never emits the
    others; and a student that does is taught not to."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    exact = soft_loss_sum(student, teacher, labels, Task.CAUSAL_LM, 2.0)
    never = torch.full((2, 5, 3), -1e4)  # a trained model's logits for rows no token uses
    padded = Teacher(Fixed(torch.cat([teacher, torch.randn(2, 5, 3)], -1)), 2.0, 1.0, width=11)
    assert torch.equal(padded.logits({}), teacher)
    torch.testing.assert_close(soft_loss_sum(student, padded.logits({}), labels, Task.CAUSAL_LM, 2.0), exact)
    wider = torch.cat([student, never], -1).requires_grad_()
    torch.testing.assert_close(soft_loss_sum(wider, teacher, labels, Task.CAUSAL_LM, 2.0), exact)
    eager = torch.cat([student, torch.zeros(2, 5, 3)], -1).requires_grad_()
    soft_loss_sum(eager, teacher, labels, Task.CAUSAL_LM, 2.0).backward()
    spare = eager.grad[..., 11:]  # pushed down where scored (the last position predicts nothing)
    assert torch.isfinite(eager.grad).all() and (spare >= 0).all() and (spare[:, :-1] > 0).all()


# ---- end to end -----------------------------------------------------------------------------------------------------

def predictions(model: torch.nn.Module, split: Any, collate: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([logits_of(model, collate(split, idx).inputs).argmax(-1)
                          for idx in eval_batches(split.lengths, 64)])


def test_a_student_taught_by_the_teacher_alone_comes_to_agree_with_it(tmp_path: Path, monkeypatch, caplog) -> None:
    """A teacher that calls every text positive, which the labels do not teach (most are negative), its head naming
    the labels in another order than the job's. A 1-layer student with weight 1 never sees a label, yet on the test
    split its predictions come to agree with the teacher's, more than before training and more than the same
    student's trained on the labels alone. The scores stay on the labels; the report and the card name the
    teacher, and give its own test scores on the job's labels: those of calling every text positive."""
    folder = saved_bert(tmp_path / "teacher", {0: "positive", 1: "negative", 2: "neutral"})
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))
    teacher.save_pretrained(folder)
    real = pipeline.evaluate

    positive: list[float] = []  # the share of the test split's texts labelled positive

    def agreement(weight: float) -> tuple[list[float], dict[str, Any]]:
        found: list[float] = []

        def scored(model, split, collate, *args):  # the baseline and the final scores are on the test split
            if not found:
                positive.append(sum(SENTIMENT[label] == "positive" for label in split.labels) / len(split.labels))
            ours = [SENTIMENT[int(i)] for i in predictions(model, split, collate)]
            theirs = [teacher.config.id2label[int(i)] for i in predictions(teacher, split, collate)]
            found.append(sum(a == b for a, b in zip(ours, theirs)) / len(ours))
            return real(model, split, collate, *args)

        monkeypatch.setattr(pipeline, "evaluate", scored)
        doc = tiny_classifier_doc(tmp_path / f"student-{weight}")
        doc["model"]["config"] |= {"num_hidden_layers": 1}
        report = pipeline.run(distilled(doc, folder, weight=weight, temperature=2.0), tmp_path / f"student-{weight}")
        return found, report

    labels_alone, _ = agreement(0.0)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.distill"):
        taught_alone, report = agreement(1.0)
    assert taught_alone[-1] > taught_alone[0] and taught_alone[-1] > labels_alone[-1]
    assert f"distilling from {folder}" in caplog.text and "0 x the labels' cross-entropy" in caplog.text
    assert set(report["evaluation"]["final"]) == {"accuracy", "f1"}
    assert report["evaluation"]["teacher"]["accuracy"] == pytest.approx(positive[-1]) and 0 < positive[-1] < 0.5
    assert report["distillation"] == {"teacher": str(folder), "revision": None, "temperature": 2.0, "weight": 1.0}
    out = tmp_path / "student-1.0"
    assert json.loads((out / "report.json").read_text())["distillation"] == report["distillation"]
    card = (out / "README.md").read_text()
    assert (f"- Distilled from {folder}: 1 of the loss its soft targets at temperature 2, 0 the labels'; the "
            f"teacher's own test scores: accuracy {report['evaluation']['teacher']['accuracy']:.4f}, f1 ") in card


def test_a_causal_lm_and_an_image_classifier_train_with_a_teacher(tmp_path: Path) -> None:
    """The other tasks distillation serves run a step each with a teacher of their kind (an export of ours); the
    image teacher's own test scores are measured with the baseline, and without one none are."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(ModelSpec(task=Task.CAUSAL_LM, uri=MINILM))
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=len(tokenizer))).save_pretrained(tmp_path / "gpt2")
    lm = {"model": {"task": "causal-lm", "architecture": "gpt2", "config": dict(TINY_GPT2), "tokenizerUri": MINILM},
          "dataset": {"uri": "pvc://data/sentiment/sentiment.csv", "maxTrainSamples": 32, "maxEvalSamples": 16,
                      "maxLength": 32},
          "analyze": {"probeBatches": 1}, "training": {"maxSteps": 2, "batchSize": 8},
          "evaluation": {"baseline": False}, "output": {"uri": str(tmp_path / "lm")}}
    report = pipeline.run(distilled(lm, tmp_path / "gpt2"), tmp_path / "lm")
    assert report["training"]["steps"] == 2 and report["distillation"]["weight"] == 0.5
    assert "teacher" not in report["evaluation"] and "teacher" not in json.loads(
        (tmp_path / "lm" / "report.json").read_text())["evaluation"]

    images = {"model": {"task": "image-classification", "architecture": "mobilenet_v3_small"},
              "dataset": {"uri": "pvc://data/digits", "maxTrainSamples": 16, "maxEvalSamples": 8, "imageSize": 32},
              "analyze": {"probeBatches": 1}, "training": {"maxSteps": 1, "batchSize": 8},
              "evaluation": {"baseline": False}, "output": {"uri": str(tmp_path / "cnn-teacher")}}
    pipeline.run(TrainerConfig.model_validate(images), tmp_path / "cnn-teacher")
    images["output"] = {"uri": str(tmp_path / "cnn")}
    images["evaluation"] = {"baseline": True}
    report = pipeline.run(distilled(images, tmp_path / "cnn-teacher", weight=1.0), tmp_path / "cnn")
    assert report["training"]["steps"] == 1 and report["training"]["history"][0]["loss"] > 0
    assert report["evaluation"]["teacher"].keys() == report["evaluation"]["final"].keys()


def test_the_teacher_teaches_in_eval_mode_after_its_own_test_scores(tmp_path: Path, monkeypatch) -> None:
    """Its test scores went through a wrapper whose mode, a new module's training mode, the evaluation put back: the
    teacher's dropout was on for every training step after, its soft targets noisy, and a retried attempt (which
    reads the kept scores) taught otherwise than the first."""
    modes: list[bool] = []
    logits = Teacher.logits

    def noted(self: Teacher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        modes.append(self.model.training)
        return logits(self, inputs)

    monkeypatch.setattr(Teacher, "logits", noted)
    folder = saved_bert(tmp_path / "teacher", SENTIMENT)
    report = pipeline.run(distilled(tiny_classifier_doc(tmp_path / "out", maxSteps=2), folder), tmp_path / "out")
    assert "teacher" in report["evaluation"] and len(modes) > 2 and not any(modes)


def test_a_teacher_is_held_in_the_autocast_dtype(tmp_path: Path, monkeypatch) -> None:
    """No optimizer updates the teacher: at bf16 its weights are bf16 (half of fp32's memory), and training runs;
    the student's stay fp32, which AdamW updates."""
    folder = saved_bert(tmp_path / "teacher", SENTIMENT)
    loaded: list[Teacher] = []
    real = distill.load_teacher
    monkeypatch.setattr(distill, "load_teacher", lambda *args: loaded.append(real(*args)) or loaded[-1])
    cfg = distilled(tiny_classifier_doc(tmp_path / "out", maxSteps=2, precision="bf16"), folder)
    report = pipeline.run(cfg, tmp_path / "out")
    assert {p.dtype for p in loaded[0].model.parameters()} == {torch.bfloat16}
    assert report["training"]["steps"] == 2 and all(math.isfinite(h["loss"]) for h in report["training"]["history"])
    assert report["training"]["precision"] == "bf16"


def test_a_bf16_teacher_keeps_its_rope_frequencies_and_an_fp16_one_stays_fp32(tmp_path: Path, student) -> None:
    """Module.to(bf16) cast the buffers too: a Llama teacher's RoPE inv_freq (fp32 in transformers) lost the angles
    of its positions. Under fp16 the weights stay fp32: fp16 would put the residual stream in fp16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = student
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder)
    spec = ModelSpec(task=Task.CAUSAL_LM, uri=str(folder))
    held = load_model(spec, tokenizer, seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    assert {b.dtype for name, b in held.named_buffers() if name.endswith("inv_freq")} == {torch.float32}
    cfg = distilled(tiny_classifier_doc(tmp_path / "out"), saved_bert(tmp_path / "teacher", SENTIMENT))
    teacher = load_teacher(cfg, tokenizer, student[1], SENTIMENT, 3, torch.device("cpu"), torch.float16)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.float32}


def test_a_causal_lm_teacher_keeps_no_key_value_cache(tmp_path: Path) -> None:
    """A causal LM's forward kept every layer's keys and values for a next token that never comes: about 2 GiB more
    at the peak for an 8B teacher at 8 x 2048 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = minilm_tokenizer()
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=len(tokenizer))).save_pretrained(tmp_path / "gpt2")
    spec = ModelSpec(task=Task.CAUSAL_LM, architecture="gpt2", config=dict(TINY_GPT2), tokenizerUri=MINILM)
    lm = {"model": spec.model_dump(by_alias=True, exclude_none=True), "training": {},
          "dataset": {"uri": "pvc://data/sentiment", "maxLength": 32}, "output": {"uri": str(tmp_path / "lm")}}
    teacher = load_teacher(distilled(lm, tmp_path / "gpt2"), tokenizer, load_model(spec, tokenizer, seed=0), {}, 0,
                           torch.device("cpu"))
    outputs: list[Any] = []
    teacher.model.register_forward_hook(lambda module, args, output: outputs.append(output))
    teacher.logits({"input_ids": torch.tensor([[1, 2, 3]])})
    assert outputs[0].past_key_values is None


def test_an_output_that_is_the_models_or_the_teachers_folder_by_another_name_is_refused(tmp_path: Path) -> None:
    """The CRD refuses output.uri equal to model.uri or the teacher's, literally; another spelling of the folder
    (file:// and a path, '/./', a link) got through, and the export overwrote the model the run read."""
    folder = saved_bert(tmp_path / "teacher", SENTIMENT)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (tmp_path / "link").symlink_to(folder)
    cfg = distilled(tiny_classifier_doc(tmp_path / "out"), folder)
    with pytest.raises(ConfigError, match=r"output.uri \(or --output\): .* is the folder of "
                                          r"training.distillation.teacher.uri"):
        pipeline.run(cfg, tmp_path / "link")
    doc = tiny_classifier_doc(tmp_path / "out")
    doc["model"] = {"task": "sequence-classification", "uri": f"file://{folder}"}
    with pytest.raises(ConfigError, match=r"is the folder of model.uri file://"):
        pipeline.run(TrainerConfig.model_validate(doc), folder / ".")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("field", ["model.uri", "training.distillation.teacher.uri"])
def test_an_output_that_holds_the_weights_file_read_is_refused(field: str, tmp_path: Path) -> None:
    """A weights file as model.uri (or the teacher's) in the output folder: the literal rule compares strings and the
    folder check skipped files, so the export overwrote the weights the run read, and a retry fine-tuned the export."""
    from safetensors.torch import save_file

    folder = tmp_path / "det"
    folder.mkdir()
    net = load_model(ModelSpec(task=Task.IMAGE_CLASSIFICATION, architecture="resnet18"), None, seed=0).net
    save_file(net.state_dict(), folder / "model.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 32, "maxTrainSamples": 8, "maxEvalSamples": 8},
           "training": {"maxSteps": 1, "batchSize": 4}, "output": {"uri": str(folder)}}
    if field == "model.uri":
        doc["model"]["uri"] = f"file://{folder}/model.safetensors"
    else:
        doc["training"]["distillation"] = {"teacher": {"uri": str(folder / "model.safetensors")}}
    with pytest.raises(ConfigError, match=rf"^output.uri \(or --output\): {folder} is the folder of {field} "):
        pipeline.run(TrainerConfig.model_validate(doc), folder)
    assert (folder / "model.safetensors").read_bytes() == before


def test_a_weights_file_is_refused_where_the_export_writes_its_name_and_followed_through_links(tmp_path: Path) -> None:
    """A file in the output folder whose name no export writes (torchvision's resnet18-f37072fd.pth) was refused,
    though the export leaves it alone; a link elsewhere to the output's model.safetensors was accepted, and the export
    overwrote what the run read."""
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    other.mkdir()
    for name in ("resnet18-f37072fd.pth", "model.safetensors"):
        (out / name).write_bytes(b"weights")
        (other / name).symlink_to(out / name)

    def reads(path: Path) -> TrainerConfig:
        return TrainerConfig.model_validate({"model": {"task": "image-classification", "architecture": "resnet18",
                                                       "uri": str(path)},
                                             "dataset": {"uri": "pvc://data/digits"}, "output": {"uri": str(out)}})

    pipeline.check_output_apart(reads(out / "resnet18-f37072fd.pth"), out)
    pipeline.check_output_apart(reads(other / "resnet18-f37072fd.pth"), out)
    for read in (out / "model.safetensors", other / "model.safetensors"):
        with pytest.raises(ConfigError, match=rf"^output.uri \(or --output\): {out} is the folder of model.uri "
                                              rf"{read}:"):
            pipeline.check_output_apart(reads(read), out)
    (other / "weights.pth").write_bytes(b"weights")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(other / "weights.pth")  # replaced by the export, then read by a retry
    with pytest.raises(ConfigError, match="is the folder of model.uri"):
        pipeline.check_output_apart(reads(out / "model.safetensors"), out)


def test_a_model_uri_inside_a_folder_the_export_writes_is_refused(tmp_path: Path) -> None:
    """model.uri in the output's adapter/ (a run's adapters, or a file of them) was taken: the export replaces that
    folder whole, removing what the run reads. A folder of another name there the export leaves alone."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    for folder in ("adapter", "base"):
        (out / folder).mkdir(parents=True)
        save_file({"weight": torch.zeros(2)}, out / folder / "adapter_model.safetensors")
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    def reads(uri: str) -> TrainerConfig:
        return TrainerConfig.model_validate({"model": {"task": "image-classification", "architecture": "resnet18",
                                                       "uri": uri}, "dataset": {"uri": "pvc://data/digits"},
                                             "training": {"maxSteps": 1}, "output": {"uri": str(out)}})

    pipeline.check_output_apart(reads(str(out / "base")), out)
    pipeline.check_output_apart(reads(str(out / "base" / "adapter_model.safetensors")), out)
    (tmp_path / "link").symlink_to(out / "adapter")
    for uri in (f"file://{out}/adapter", str(out / "adapter" / "adapter_model.safetensors"),
                str(tmp_path / "link" / "adapter_model.safetensors")):
        with pytest.raises(ConfigError, match=rf"^output.uri \(or --output\): {out} is the folder of model.uri "
                                              rf"{uri}:"):
            pipeline.run(reads(uri), out)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_model_folder_whose_files_link_to_what_the_export_writes_is_refused(tmp_path: Path) -> None:
    """models/m/ whose model.safetensors (or adapter file) links to the output's was taken: the export replaced the
    target, and a retry read the export, or a broken link. A link to a file the export leaves alone is taken."""
    out, models = tmp_path / "out", tmp_path / "models"
    (out / "adapter").mkdir(parents=True)
    for name in ("model.safetensors", "resnet18-f37072fd.pth", "adapter/adapter_model.safetensors"):
        (out / name).write_bytes(b"weights")

    def reads(folder: Path) -> TrainerConfig:
        return TrainerConfig.model_validate({"model": {"task": "image-classification", "architecture": "resnet18",
                                                       "uri": str(folder)},
                                             "dataset": {"uri": "pvc://data/digits"}, "output": {"uri": str(out)}})

    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "resnet18-f37072fd.pth"):
        folder = models / name.replace("/", "-")
        folder.mkdir(parents=True)
        (folder / Path(name).name).symlink_to(out / name)
        if name == "resnet18-f37072fd.pth":
            pipeline.check_output_apart(reads(folder), out)
        else:
            with pytest.raises(ConfigError, match=rf"^output.uri \(or --output\): {out} is the folder of model.uri "):
                pipeline.check_output_apart(reads(folder), out)
    looped = models / "looped"  # links the model never reads: followed, they raised RuntimeError (exit 2, retried)
    looped.mkdir()
    (looped / "a").symlink_to("b")
    (looped / "b").symlink_to("a")
    pipeline.check_output_apart(reads(looped), out)
    pipeline.check_output_apart(reads(looped / "a"), out)  # so did a model.uri that is one


# ---- teachers refused -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student() -> tuple[Any, torch.nn.Module]:
    spec = ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, architecture="bert", config=dict(TINY_BERT), tokenizerUri=MINILM)
    tokenizer = load_tokenizer(spec)
    return tokenizer, load_model(spec, tokenizer, seed=0)


def taught(tmp_path: Path, student: tuple[Any, torch.nn.Module], teacher: Path | str) -> Teacher:
    tokenizer, model = student
    cfg = distilled(tiny_classifier_doc(tmp_path / "out"), teacher)
    return load_teacher(cfg, tokenizer, model, SENTIMENT, 3, torch.device("cpu"))


def test_a_teacher_of_the_same_labels_in_another_order_is_read_in_the_students(tmp_path: Path, student) -> None:
    folder = saved_bert(tmp_path / "teacher", {0: "Positive", 1: "negative", 2: "neutral"})
    teacher = taught(tmp_path, student, folder)
    assert teacher.columns.tolist() == [1, 2, 0] and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert {p.dtype for p in teacher.model.parameters()} == {torch.float32}  # an fp32 run's: no autocast dtype
    inputs = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    torch.testing.assert_close(teacher.logits(inputs), logits_of(teacher.model, inputs)[:, [1, 2, 0]])


@pytest.mark.parametrize(("labels", "columns"), [
    ({0: "pos", 1: "POS", 2: "neg"}, None),
    ({0: "POS", 1: "neg", 2: "pos"}, [2, 0, 1]),
    ({0: "neg", 1: "Pos", 2: "POS"}, [1, 2, 0]),  # pos in another case: the one such label left
])
def test_labels_that_differ_only_in_case_are_each_read_from_their_own_teacher_column(
        labels: dict[int, str], columns: list[int] | None) -> None:
    """pos and POS are two classes (data.warn_labels_differing_in_case), which matching in any case read from one
    teacher column: a teacher of the job's own labels gave columns [1, 1, 2]. Exact names match first; the rest in
    any case only where one of each is left, else the teacher is refused."""
    from transformers import BertConfig, BertForSequenceClassification

    job = {0: "pos", 1: "POS", 2: "neg"}
    teacher = BertForSequenceClassification(BertConfig(vocab_size=100, id2label=labels, **TINY_BERT))
    found = distill.label_columns(teacher, job, 3, "t")
    assert (found if found is None else found.tolist()) == columns
    teacher.config.id2label = {0: "Pos", 1: "pOS", 2: "neg"}
    with pytest.raises(ConfigError, match=r"^training\.distillation\.teacher t: its labels \(Pos, pOS, neg\) do not "
                                          r"name pos, POS of the job's \(pos, POS, neg\)"):
        distill.label_columns(teacher, job, 3, "t")


@pytest.mark.parametrize(("labels", "columns"), [
    ({0: "negative", 1: "positive", 2: "fear", 3: "love"}, [0, 1, 3, 2]),  # the spare classes in another order
    ({0: "positive", 1: "LABEL_1", 2: "negative", 3: "Fear"}, [2, 0, 1, 3]),  # love to the one left unnamed
    ({0: "negative", 1: "positive", 2: "LABEL_2", 3: "LABEL_3"}, None),  # none named: in order
])
def test_a_students_spare_classes_are_read_from_the_teachers_of_their_names_unnamed_ones_in_order(
        tmp_path: Path, labels: dict[int, str], columns: list[int] | None) -> None:
    """A kept head of 4 classes (rearrange.head.numLabels 4) for data of 2 keeps its own names for the other 2
    (rearrange.new_head): they were matched to the teacher's columns left in order, names ignored, so the teacher's
    fear taught the student's love. Two different names are refused."""
    from transformers import BertConfig, BertForSequenceClassification

    names = {0: "negative", 1: "positive", 2: "love", 3: "fear"}
    tokenizer = minilm_tokenizer()
    model = saved_bert(tmp_path / "student", names)  # a student whose head names its spare classes
    student = load_model(ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, uri=str(model)), tokenizer, seed=0)
    cfg = distilled(tiny_classifier_doc(tmp_path / "out"), saved_bert(tmp_path / "teacher", labels))
    teacher = load_teacher(cfg, tokenizer, student, {0: "negative", 1: "positive"}, 4, torch.device("cpu"))
    assert (teacher.columns if teacher.columns is None else teacher.columns.tolist()) == columns
    refused = {0: "negative", 1: "positive", 2: "anger", 3: "fear"}
    with pytest.raises(ConfigError, match=r"^training\.distillation\.teacher t: its classes beyond the job's labels "
                                          r"are not the student's \(rearrange\.head\.numLabels 4\): it would teach "
                                          r"anger as love; a teacher must name them as the student's head does"):
        distill.label_columns(BertForSequenceClassification(BertConfig(vocab_size=100, id2label=refused, **TINY_BERT)),
                              {0: "negative", 1: "positive"}, 4, "t", names)


@pytest.mark.parametrize(("labels", "config", "error"), [
    ({0: "cat", 1: "dog", 2: "neutral"}, {}, r"its labels \(cat, dog, neutral\) do not name negative, positive"),
    ({0: "negative", 1: "positive"}, {}, r"its head scores 2 classes, the student's 3"),
    (SENTIMENT, {"vocab_size": 1000}, r"its vocabulary has 1000 tokens .*, the student's 30522"),
])
def test_a_teacher_that_cannot_teach_the_job_is_refused_naming_the_field(
        tmp_path: Path, student, labels: dict[int, str], config: dict[str, Any], error: str) -> None:
    folder = saved_bert(tmp_path / "teacher", labels, **config)
    with pytest.raises(ConfigError, match=rf"^training\.distillation\.teacher {folder}: {error}"):
        taught(tmp_path, student, folder)


def minilm_tokenizer() -> Any:
    return load_tokenizer(ModelSpec(task=Task.SEQUENCE_CLASSIFICATION, uri=MINILM))


def test_a_teacher_with_its_own_tokenizer_is_checked_token_by_token(tmp_path: Path, student) -> None:
    """Equal sizes said nothing of the tokens (Llama 2's and Mistral's 32,000 are not the same), and a teacher whose
    table is padded past the tokenizer to another size than the student's was refused. With a tokenizer saved
    beside it, the teacher must give every token the student's id and have a row for each."""
    tokenizer = minilm_tokenizer()
    padded = saved_bert(tmp_path / "padded", SENTIMENT, vocab_size=len(tokenizer) + 64)
    tokenizer.save_pretrained(padded)
    assert taught(tmp_path, student, padded).columns is None
    small = saved_bert(tmp_path / "small", SENTIMENT, vocab_size=1000)
    tokenizer.save_pretrained(small)
    with pytest.raises(ConfigError, match=rf"^training\.distillation\.teacher {small}: its embeddings have 1000 input "
                                          r"rows, fewer than the tokenizer's 30522 token ids"):
        taught(tmp_path, student, small)
    swapped = saved_bert(tmp_path / "swapped", SENTIMENT)
    tokenizer.save_pretrained(swapped)
    saved = json.loads((swapped / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    first, second = (token for token, i in vocab.items() if i in (2000, 2001))
    vocab[first], vocab[second] = vocab[second], vocab[first]  # the same size, two tokens' ids exchanged
    (swapped / "tokenizer.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^training\.distillation\.teacher {swapped}: its tokenizer gives 2 of the "
                                          r"student's 30522 tokens another id or none \(such as '"):
        taught(tmp_path, student, swapped)


def test_a_teachers_tokenizer_json_the_tokenizers_library_cannot_read_is_a_model_error(tmp_path: Path,
                                                                                         student) -> None:
    folder = unreadable_tokenizer(saved_bert(tmp_path / "teacher", SENTIMENT))
    with pytest.raises(ModelError, match=rf"^training\.distillation\.teacher {folder}: tokenizer {folder}: "
                                         rf"{folder}/tokenizer.json cannot be read by the installed tokenizers"):
        taught(tmp_path, student, folder)


def test_the_columns_compared_are_the_tokenizers_ids_or_the_narrower_students() -> None:
    """The width the teacher's logits keep: the tokenizer's ids where the tables differ (a student padded wider
    gets its spare rows scored against no probability); a student narrower than the ids (made from a config) bounds
    it, where a width past its table failed the first step on the shapes; equal tables keep them all."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = minilm_tokenizer()
    ids = max(tokenizer.get_vocab().values()) + 1

    def gpt2(rows: int) -> torch.nn.Module:
        return GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=rows))

    assert distill.shared_vocabulary(gpt2(ids + 64), gpt2(ids), tokenizer, tokenizer, "t") == ids
    assert distill.shared_vocabulary(gpt2(ids), gpt2(ids + 64), tokenizer, tokenizer, "t") == ids
    assert distill.shared_vocabulary(gpt2(ids + 64), gpt2(ids - 10), tokenizer, tokenizer, "t") == ids - 10
    assert distill.shared_vocabulary(gpt2(ids + 64), gpt2(ids + 64), tokenizer, tokenizer, "t") is None


def test_a_causal_lm_distils_from_a_teacher_whose_vocabulary_is_padded(tmp_path: Path) -> None:
    """The student's table has the tokenizer's rows, the teacher's 64 more: the job trains, and the teacher's own
    test scores (loss, perplexity) are measured beside the baseline's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = minilm_tokenizer()
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=len(tokenizer) + 64)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    lm = {"model": {"task": "causal-lm", "architecture": "gpt2", "config": dict(TINY_GPT2), "tokenizerUri": MINILM},
          "dataset": {"uri": "pvc://data/sentiment/sentiment.csv", "maxTrainSamples": 32, "maxEvalSamples": 16,
                      "maxLength": 32},
          "analyze": {"probeBatches": 1}, "training": {"maxSteps": 2, "batchSize": 8},
          "output": {"uri": str(tmp_path / "lm")}}
    report = pipeline.run(distilled(lm, tmp_path / "gpt2"), tmp_path / "lm")
    assert report["training"]["steps"] == 2 and all(math.isfinite(h["loss"]) for h in report["training"]["history"])
    teacher = report["evaluation"]["teacher"]
    assert set(teacher) == {"loss", "perplexity"} and teacher["perplexity"] == pytest.approx(math.exp(teacher["loss"]))


def test_a_pretrained_model_whose_head_is_not_trained_is_no_teacher(tmp_path: Path, student) -> None:
    """The bundled MiniLM has no classifier: loaded as one, its head would be random, and so its soft targets."""
    with pytest.raises(ConfigError, match=rf"^training\.distillation\.teacher {MINILM}: its checkpoint lacks "
                                          r"classifier, which would be random"):
        taught(tmp_path, student, MINILM)


def test_a_teacher_that_is_not_there_is_the_users_naming_the_field(tmp_path: Path, student) -> None:
    with pytest.raises(ModelError, match=rf"^training\.distillation\.teacher {tmp_path}/none: model .* does not exist"):
        taught(tmp_path, student, tmp_path / "none")


def test_a_job_refuses_a_teacher_before_the_baseline_and_training(tmp_path: Path, monkeypatch) -> None:
    """The teacher loads after the structure analysis (whose measured peak memory is the student's alone), before
    the baseline's evaluation and the first checkpoint."""
    folder = saved_bert(tmp_path / "teacher", {0: "a", 1: "b", 2: "c"})
    monkeypatch.setattr(pipeline, "evaluate", lambda *args: pytest.fail("evaluated with a teacher refused"))
    with pytest.raises(ConfigError, match=r"^training\.distillation\.teacher .*: its labels \(a, b, c\)"):
        pipeline.run(distilled(tiny_classifier_doc(tmp_path / "out"), folder), tmp_path / "out")
    assert (tmp_path / "out" / "analysis.json").exists()
    assert not list((tmp_path / "out").glob("checkpoints/*/step-*"))


def test_a_finished_training_is_evaluated_and_exported_without_its_teacher(tmp_path: Path, caplog) -> None:
    """An attempt retried after the training ended (SIGTERM in the final evaluation or the export) resumes the
    checkpoint of its last step and makes no step: it loads no teacher, so one gone since does not stop it."""
    folder = saved_bert(tmp_path / "teacher", SENTIMENT)
    cfg = distilled(tiny_classifier_doc(tmp_path / "out", maxSteps=2), folder)
    first = pipeline.run(cfg, tmp_path / "out")
    shutil.rmtree(folder)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.pipeline"):
        again = pipeline.run(cfg, tmp_path / "out")
    assert "the teacher is not loaded, the newest checkpoint" in caplog.text
    assert again["training"]["steps"] == first["training"]["steps"] == 2
    assert again["evaluation"]["final"] == first["evaluation"]["final"]
    assert again["evaluation"]["teacher"] == first["evaluation"]["teacher"]  # kept by the first attempt


def test_a_teacher_replaced_at_its_uri_or_moved_on_at_the_hub_is_not_mixed_with_the_old_ones_training(
        tmp_path: Path, caplog, monkeypatch) -> None:
    """The student's checkpoints and the kept teacher scores were made with the teacher of the first attempt: a
    teacher folder whose files were replaced trains afresh and is scored again; a hub teacher at a branch is loaded at
    the commit the first attempt loaded, recorded once it loaded (after the checkpoint folder was chosen)."""
    from huggingface_hub import constants

    caplog.set_level(logging.INFO, logger="finetune_trainer")
    torch.manual_seed(0)
    folder = saved_bert(tmp_path / "teacher", SENTIMENT)
    cfg = distilled(tiny_classifier_doc(tmp_path / "out", maxSteps=2), folder)
    first = pipeline.run(cfg, tmp_path / "out")
    torch.manual_seed(1)
    saved_bert(folder, SENTIMENT)  # another teacher of the same shapes and file sizes
    caplog.clear()
    again = pipeline.run(cfg, tmp_path / "out")
    assert "the base model changed since it was made" in caplog.text
    assert again["evaluation"]["teacher"] != first["evaluation"]["teacher"]  # scored again, not the kept scores
    assert "the teacher was measured by an earlier attempt" not in caplog.text

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--teacher"
    commits = ["0" * 40, "1" * 40]
    for seed, commit in enumerate(commits):
        torch.manual_seed(seed)
        saved_bert(repo / "snapshots" / commit, SENTIMENT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    cfg = distilled(tiny_classifier_doc(tmp_path / "hubbed", maxSteps=2), "hf://org/teacher")
    first = pipeline.run(cfg, tmp_path / "hubbed")
    (run,) = (tmp_path / "hubbed" / "checkpoints").iterdir()
    assert json.loads((run / "fingerprint.json").read_text())["base"] == {"hub": {"hf://org/teacher": commits[0]}}
    for step in run.glob("step-*"):  # cut short before its first checkpoint: the retry loads the teacher, trains
        shutil.rmtree(step)
    (repo / "refs" / "main").write_text(commits[1])
    caplog.clear()
    again = pipeline.run(cfg, tmp_path / "hubbed")
    losses = [[h["loss"] for h in report["training"]["history"]] for report in (first, again)]
    assert losses[1] == losses[0] and again["evaluation"]["final"] == first["evaluation"]["final"]  # the same teacher
    assert f"hf://org/teacher: at commit {commits[0]}, which an earlier attempt" in caplog.text
    assert "the teacher is not loaded" not in caplog.text


@pytest.mark.parametrize("pvc", [False, True])
def test_a_teacher_that_keeps_its_adapters_apart_is_refused_before_anything_loads(tmp_path: Path, monkeypatch,
                                                                                   student, pvc: bool) -> None:
    """An export with mergeOnExport: false holds the adapters in adapter/, and its model.safetensors lacks them:
    loaded as it is, the teacher would be the model before its fine-tune."""
    folder = saved_bert(tmp_path / "claim" / "teacher", SENTIMENT)
    (folder / "adapter").mkdir()
    uri = str(folder)
    if pvc:
        monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path))
        uri = "pvc://claim/teacher"
    refused = (rf"^training\.distillation\.teacher {uri}: it keeps its LoRA adapters apart .*: export the teacher "
               r"merged \(rearrange\.mergeOnExport: true\)$")
    with pytest.raises(ConfigError, match=refused):
        taught(tmp_path, student, uri)
    cfg = distilled(tiny_classifier_doc(tmp_path / "out"), uri)
    monkeypatch.setattr(pipeline, "load_dataset", lambda *args: pytest.fail("loaded the data"))
    with pytest.raises(ConfigError, match=refused):
        pipeline.run(cfg, tmp_path / "out")


def test_a_detector_is_refused_distillation_naming_the_field() -> None:
    doc = {"model": {"task": "object-detection", "architecture": "fasterrcnn_mobilenet_v3_large_fpn"},
           "dataset": {"uri": "pvc://data/shapes"}, "evaluation": {"metrics": ["map"]}, "output": {"uri": "/tmp/out"},
           "training": {"distillation": {"teacher": {"uri": "/tmp/detector"}}}}
    with pytest.raises(ValidationError) as refused:
        TrainerConfig.model_validate(doc)
    assert [line.split(":")[0] for line in error_lines(refused.value)] == ["training.distillation"]


def test_another_teacher_or_blend_is_another_run_for_the_checkpoints(tmp_path: Path) -> None:
    """A resume with another teacher, temperature or weight would mix two trainings in one: the fingerprint, which
    names the checkpoints' folder, tells them apart."""
    doc = tiny_classifier_doc(tmp_path / "out")
    base = fingerprinted(distilled(doc, "/models/a"), 1)
    for other in (distilled(doc, "/models/b"), distilled(doc, "/models/a", temperature=3.0),
                  distilled(doc, "/models/a", weight=0.9), TrainerConfig.model_validate(doc)):
        assert fingerprinted(other, 1) != base
    revised = copy.deepcopy(doc)
    revised["training"]["distillation"] = {"teacher": {"uri": "hf://org/teacher", "revision": "v2"}}
    assert fingerprinted(TrainerConfig.model_validate(revised), 1) != fingerprinted(
        distilled(doc, "hf://org/teacher"), 1)


def test_a_one_segment_teacher_teaches_a_pair_classifier(tmp_path: Path) -> None:
    """textPairField: a BERT student's batches give a pair's second text segment 1, which a RoBERTa-kind teacher of
    the same vocabulary (type_vocab_size 1) indexed past its table: the job failed at the teacher's test scores."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=30522, type_vocab_size=1, **TINY_BERT | {"max_position_embeddings": 66}, id2label=SENTIMENT,
        label2id={v: k for k, v in SENTIMENT.items()})).save_pretrained(tmp_path / "teacher")
    doc = tiny_pair_classifier_doc(tmp_path, maxSteps=2)
    report = pipeline.run(distilled(doc, tmp_path / "teacher"), tmp_path / "out")
    assert report["training"]["steps"] == 2 and "accuracy" in report["evaluation"]["teacher"]
