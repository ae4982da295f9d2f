"""pvc:// and hf:// URIs. The hub is unreachable here, so hf:// runs its real code path
(huggingface_hub's snapshot_download) offline against a cache laid out as the hub lays it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer.errors import UserError
from finetune_trainer.uris import LOCAL_PVC_ROOT, PVC_ROOT_ENV, fetch, local_path, pvc_root

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_pvc_uri_resolves_under_the_root(pvc_root: Path) -> None:
    assert local_path("pvc://data/sentiment/sentiment.csv") == pvc_root / "data/sentiment/sentiment.csv"
    assert fetch("pvc://models/all-MiniLM-L6-v2", kind="model").joinpath("config.json").exists()


def test_without_the_env_the_nearest_checkout_root_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / LOCAL_PVC_ROOT).mkdir(parents=True)
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    monkeypatch.delenv(PVC_ROOT_ENV)
    monkeypatch.chdir(tmp_path / "sub" / "dir")
    assert pvc_root() == tmp_path.resolve() / LOCAL_PVC_ROOT
    monkeypatch.chdir("/")
    with pytest.raises(UserError, match="make assets"):
        pvc_root()


def test_missing_local_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        fetch(f"file://{tmp_path}/nothing", kind="model")



def test_a_folder_the_trainer_may_not_enter_is_a_user_error_naming_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's Path.exists raises a PermissionError for a path under a folder the user may not enter: it was
    an infrastructure failure (exit 2, retried). The error is the one os.stat raises, built here (tests run as root)."""
    import errno

    from finetune_trainer.errors import DataError, exit_code_of

    def refused(path: Path) -> bool:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(DataError, match=rf"^dataset {tmp_path}/locked/s.csv: the trainer may not read "
                                        rf"{tmp_path}/locked/s.csv \(Permission denied\)") as caught:
        fetch(f"{tmp_path}/locked/s.csv", kind="dataset", error=DataError)
    assert exit_code_of(caught.value) == 1


def test_a_missing_tokenizer_is_named_by_its_field(tmp_path: Path, pvc_root: Path) -> None:
    """It was "tokenizer <uri>", where the job has model.tokenizerUri to fix."""
    from finetune_trainer.config import ModelSpec
    from finetune_trainer.errors import ModelError
    from finetune_trainer.models import load_tokenizer

    spec = ModelSpec(task="sequence-classification", uri="pvc://models/all-MiniLM-L6-v2", tokenizerUri=f"{tmp_path}/t")
    with pytest.raises(ModelError, match=rf"^model.tokenizerUri {tmp_path}/t: {tmp_path}/t does not exist$"):
        load_tokenizer(spec)

@pytest.mark.parametrize("uri", ["hf://org..x/name", "hf://org--x/name", "hf://.org/name", "hf://org/name."])
def test_a_name_the_hub_refuses_is_a_user_error(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names the spec's pattern lets through but huggingface_hub refuses before any request (a '..' or '--' inside a
    name, a leading or trailing '.'): its HFValidationError, a ValueError, exited 2 and every attempt was retried."""
    from finetune_trainer.errors import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=f"model {uri}: not a name the hub takes"):
        fetch(uri, kind="model", error=ModelError)


def hub_cache(root: Path, repo: str, source: Path) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, base / "snapshots" / COMMIT, symlinks=False, ignore=shutil.ignore_patterns("1_Pooling"))


def test_hf_uri_loads_from_the_hub_cache_offline(tmp_path: Path, pvc_root: Path) -> None:
    hub_cache(tmp_path / "hub", "local-org/minilm", local_path("pvc://models/all-MiniLM-L6-v2").resolve())
    script = """
import logging
from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import UserError
from finetune_trainer.models import load_model, load_tokenizer
logging.basicConfig(level=logging.INFO, format="%(message)s")
spec = ModelSpec(uri="hf://local-org/minilm", task="sequence-classification")
model = load_model(spec, load_tokenizer(spec), seed=0)
print("loaded", type(model).__name__, model.config.hidden_size)
try:
    load_tokenizer(ModelSpec(uri="hf://local-org/absent", task="sequence-classification"))
except UserError as exc:
    print("refused", exc)
"""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded BertForSequenceClassification 384" in out.stdout
    assert "refused tokenizer hf://local-org/absent: not on the hub nor in the local cache" in out.stdout
    # A download of several GB shows no progress bar in a pod: the log says what it fetches, and when it has it.
    assert "model hf://local-org/minilm: fetching revision main from the hub, or its cache" in out.stderr
    assert f"model hf://local-org/minilm: at {tmp_path / 'hub'}" in out.stderr


def test_a_hub_that_cannot_be_reached_is_no_user_error(tmp_path: Path) -> None:
    """huggingface_hub reports a hub it could not reach (here a port where nothing listens; a timeout or a 5xx go
    the same way) as a cache miss, LocalEntryNotFoundError: that was read as the user's (exit 1, never retried),
    though a later attempt gets past it."""
    from tiny import free_port

    script = """
from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import UserError
from finetune_trainer.models import load_model, load_tokenizer
from finetune_trainer.uris import fetch
spec = ModelSpec(uri="hf://local-org/minilm", task="sequence-classification")
for load in (lambda: fetch(spec.uri, kind="model"), lambda: load_tokenizer(spec), lambda: load_model(spec, None, 0)):
    try:
        load()
    except UserError as exc:
        print("user error", exc)
    except Exception as exc:
        print("infrastructure", type(exc).__name__)
"""
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["infrastructure LocalEntryNotFoundError"] * 3, out.stdout


def test_the_model_cards_code_puts_adapters_kept_apart_on_the_revision_they_adapt(tmp_path: Path) -> None:
    """A causal LM on hf://local-org/gpt at model.revision v1 with mergeOnExport false: the card loaded the base of
    the hub's main, another model, and put the adapters on it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import TINY_GPT2, bpe_tokenizer

    tokenizer = bpe_tokenizer(tmp_path / "tok")
    for seed, ref, commit in ((0, "main", COMMIT), (1, "v1", COMMIT[::-1])):  # two bases: main, and revision v1
        torch.manual_seed(seed)
        snapshot = tmp_path / "hub/models--local-org--gpt/snapshots" / commit
        GPT2LMHeadModel(GPT2Config(vocab_size=400, **TINY_GPT2)).save_pretrained(snapshot)
        shutil.copytree(tokenizer, snapshot, dirs_exist_ok=True)
        (tmp_path / "hub/models--local-org--gpt/refs").mkdir(exist_ok=True)
        (tmp_path / "hub/models--local-org--gpt/refs" / ref).write_text(commit)
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from finetune_trainer.config import LoraSpec, ModelSpec, Task, TrainerConfig
from finetune_trainer.export import export_model, model_card
from finetune_trainer.models import load_model, load_tokenizer, logits_of
from finetune_trainer.rearrange import add_adapters
from finetune_trainer.structure import lora_candidates
from tiny import card_model, tiny_classifier_doc
out = Path({str(tmp_path / "out")!r})
doc = tiny_classifier_doc(out)
doc["model"] = {{"task": "causal-lm", "uri": "hf://local-org/gpt", "revision": "v1"}}
doc["rearrange"] = {{"lora": {{"rank": 4}}, "mergeOnExport": False}}
cfg = TrainerConfig.model_validate(doc)
tokenizer = load_tokenizer(cfg.model)
model = load_model(cfg.model, tokenizer, seed=0)
wrapped = add_adapters(model, cfg.rearrange.lora, list(lora_candidates(model, Task.CAUSAL_LM)), None)
with torch.no_grad():
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.1)
inputs = {{"input_ids": torch.tensor([tokenizer("a fine day")["input_ids"]])}}
logits = logits_of(wrapped.eval(), inputs)
export_model(wrapped, tokenizer, {{}}, cfg, out)
report = {{"evaluation": {{"baseline": {{}}, "final": {{}}, "delta": {{}}}}, "labels": {{}},
          "training": {{"train_samples": 1, "validation_samples": 1, "test_samples": 1, "steps": 1, "seconds": 1,
                       "samples_per_second": 1}}}}
card = model_card(cfg, report, adapters_apart=True)
print("difference", float((logits_of(card_model(card, out).eval(), inputs) - logits).abs().max()))
"""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("difference ")[-1]) < 1e-5, out.stdout


def test_the_card_puts_an_image_classifiers_adapters_kept_apart_on_the_revision_they_adapt() -> None:
    """The card's code for an image classifier's adapters kept apart built the base's spec without model.revision,
    so it loaded the hub's main, another model, under adapters trained on v1."""
    from finetune_trainer.config import ModelSpec, TrainerConfig
    from finetune_trainer.export import loading_lines

    cfg = TrainerConfig.model_validate({
        "model": {"task": "image-classification", "architecture": "mobilenet_v3_small", "uri": "hf://local-org/net",
                  "revision": "v1"},
        "dataset": {"uri": "pvc://data/digits"}, "rearrange": {"lora": {"rank": 4}, "mergeOnExport": False},
        "output": {"uri": "pvc://out/net"}})
    line = next(line for line in loading_lines(cfg, 10, adapters_apart=True) if line.startswith("spec = "))
    spec = eval(line.removeprefix("spec = "), {"ModelSpec": ModelSpec})  # the card's own expression
    assert (spec.uri, spec.revision) == ("hf://local-org/net", "v1")


@pytest.mark.parametrize("task", ["image-classification", "object-detection"])
def test_a_torchvision_model_on_the_hub_loads_at_its_revision(tmp_path: Path, task: str) -> None:
    """model.revision reached the hub for text models only: an image classifier or detector on hf:// at v1 loaded
    the hub's main, another model's weights, without a word."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    architecture = "mobilenet_v3_small" if task == "image-classification" else "ssdlite320_mobilenet_v3_large"
    for seed, ref, commit in ((0, "main", COMMIT), (1, "v1", COMMIT[::-1])):
        torch.manual_seed(seed)
        backbone = {"weights_backbone": None} if task == "object-detection" else {}
        net = torchvision.models.get_model(architecture, weights=None, **backbone)
        snapshot = tmp_path / "hub/models--local-org--net/snapshots" / commit
        snapshot.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, snapshot / "model.safetensors")
        (tmp_path / "hub/models--local-org--net/refs").mkdir(exist_ok=True)
        (tmp_path / "hub/models--local-org--net/refs" / ref).write_text(commit)
    script = f"""
import torch
from safetensors.torch import load_file
from finetune_trainer.config import ModelSpec
from finetune_trainer.detection.models import load_detector
from finetune_trainer.models import load_model
spec = ModelSpec(task={task!r}, uri="hf://local-org/net", revision="v1", architecture={architecture!r})
model = load_model(spec, None, 0) if spec.task.value == "image-classification" else load_detector(spec, 320)
ours = {{k.split(".", 1)[1] if k.startswith("net.") else k: v for k, v in model.state_dict().items()}}
v1 = load_file({str(tmp_path / "hub/models--local-org--net/snapshots" / COMMIT[::-1] / "model.safetensors")!r})
name = next(k for k in v1 if k.endswith("weight") and k in ours)
print("same", bool(torch.equal(ours[name], v1[name])), name)
"""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("same True"), out.stdout
