"""Two workers under torchrun (gloo on the CPU): the same pipeline, the data split between
them, one report from rank 0; the same losses as one process with the same global batch; and
a run whose worker is killed resumes to the weights of a run never interrupted."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_operator.outcome import parse_message
from finetune_trainer import pipeline
from finetune_trainer.checkpoints import complete
from finetune_trainer.config import TrainerConfig, TrainingSpec
from finetune_trainer.telemetry import TERMINATION_ENV
from tiny import (EVALUATING, LATER, free_port, hub_bert, on_base, saved_bert, seconds_between,
                  tiny_classifier_doc)

pytestmark = pytest.mark.slow
STEPS = 30  # 480 samples / (8 per rank x 2 ranks)


def ddp_doc(out: Path, **training: Any) -> dict[str, Any]:
    """LoRA on a tiny BERT without dropout (ranks draw different masks) and without length bucketing (which
    groups samples by the batch size), so that 2 x 8 samples are exactly one process's 16."""
    doc = tiny_classifier_doc(out, batchSize=8, checkpointEverySteps=5, batching="dynamic", **training)
    doc["model"]["config"] |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    doc["dataset"]["maxTrainSamples"] = 480
    doc["rearrange"] = {"lora": {"rank": 4, "dropout": 0.0}}
    return doc


def torchrun(config: Path, log: Path, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "finetune_trainer.cli", "run", str(config)]
    with log.open("a") as out:  # two ranks on two cores
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"OMP_NUM_THREADS": "1"} | env)


JOIN_AND_LEAVE = """
import torch.distributed as dist
from finetune_trainer import distributed
world = distributed.join()
backend = dist.distributed_c10d._get_default_group()._get_backend(world.device)
print(f"rank {world.rank}: collectives wait {backend.options._timeout.total_seconds():.0f} s", flush=True)
distributed.leave()
print(f"rank {world.rank}: in a group {dist.is_initialized()}", flush=True)
"""


def test_the_ranks_wait_an_hour_for_each_other_and_leave_the_group_at_the_end(tmp_path: Path) -> None:
    """Rank 0 alone writes the checkpoints and the export while the others wait at a barrier: NCCL's default watchdog
    (10 minutes) aborted them on a large model. The group is torn down after the last collective, as NCCL's
    communicators left to the interpreter's exit can crash or hang there."""
    (script := tmp_path / "join.py").write_text(JOIN_AND_LEAVE)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
                          capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: collectives wait 3600 s" in done.stdout
        assert f"rank {rank}: in a group False" in done.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-process run; its output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    (config := tmp / "job.json").write_text(json.dumps(ddp_doc(tmp / "out")))
    assert torchrun(config, tmp / "run.log").wait(timeout=600) == 0, (tmp / "run.log").read_text()[-4000:]
    return tmp / "out"


def test_two_process_ddp_run(reference: Path) -> None:
    log = (reference.parent / "run.log").read_text()
    assert "[rank 1]" in log and "[rank 0]" in log
    report = json.loads((reference / "report.json").read_text())
    training = report["training"]
    assert training["workers"] == 2 and training["steps"] == STEPS
    assert training["samples_per_second"] > 0 and len(training["history"]) == STEPS
    assert report["merge_check"]["passed"]
    (saved,) = (reference / "checkpoints").iterdir()  # one config, one folder
    assert [p.name for p in complete(saved)] == ["step-00000025", "step-00000030"]
    assert {"accuracy", "f1"} == set(report["evaluation"]["final"])


def test_ddp_equals_one_process_with_the_same_global_batch(reference: Path, tmp_path: Path) -> None:
    """One process accumulating 2 micro-batches of 8 sees the micro-batches the two ranks see; the token-normalised
    loss and DDP's gradient average must then give the same trajectory, up to float summation order."""
    cfg = TrainerConfig.model_validate(ddp_doc(tmp_path / "out", gradientAccumulation=2))
    single = pipeline.run(cfg, tmp_path / "out")["training"]["history"]
    ddp = json.loads((reference / "report.json").read_text())["training"]["history"]
    losses = torch.tensor([[h["loss"] for h in single], [h["loss"] for h in ddp]])
    difference = float((losses[0] - losses[1]).abs().max())
    print(f"DDP vs one process: max |loss difference| over {STEPS} steps {difference:.2e}, "
          f"loss {losses[0, 0]:.4f} -> {losses[0, -1]:.4f}")
    # Every step trained (a tiny random BERT's loss barely moves in 30 steps, so its last batch's loss against its
    # first says nothing: with the split of 2026-12-02 it ended 0.008 above, at the same 0 difference between them)
    assert losses.shape == (2, STEPS) and all(h["grad_norm"] > 0 and h["lr"] > 0 for h in single[1:])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_file(reference / "model.safetensors"),
                               load_file(tmp_path / "out" / "model.safetensors"), rtol=1e-3, atol=1e-5)


def test_a_distilled_ddp_run_equals_one_process_with_the_same_global_batch(reference: Path, tmp_path: Path) -> None:
    """training.distillation on two ranks: each loads its own teacher (its head naming the labels in another order
    than the job's, so each maps its columns) and blends its soft targets into its micro-batch's summed loss, which
    the step's targets over both ranks normalise. The trajectory is then one process's accumulating the same two
    micro-batches, as without a teacher; and the teacher mattered: the losses are not those of `reference`, the same
    run without it, and the head leans to the class the teacher favours, not the labels' majority. A retry after the
    last step loads no teacher on either rank."""
    teacher = saved_bert(tmp_path / "teacher", {0: "positive", 1: "negative", 2: "neutral"})
    from transformers import AutoModelForSequenceClassification

    confident = AutoModelForSequenceClassification.from_pretrained(teacher)
    with torch.no_grad():  # it calls every text positive, which most labels are not
        confident.classifier.weight.zero_()
        confident.classifier.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))
    confident.save_pretrained(teacher)
    distillation = {"teacher": {"uri": str(teacher)}, "weight": 1.0, "temperature": 2.0}
    (config := tmp_path / "job.json").write_text(json.dumps(ddp_doc(tmp_path / "ddp", distillation=distillation)))
    log = tmp_path / "run.log"
    assert torchrun(config, log).wait(timeout=600) == 0, log.read_text()[-4000:]
    assert len(re.findall(rf"\[rank [01]\].*distilling from {re.escape(str(teacher))}", log.read_text())) == 2
    cfg = TrainerConfig.model_validate(ddp_doc(tmp_path / "one", gradientAccumulation=2, distillation=distillation))
    one = pipeline.run(cfg, tmp_path / "one")
    single = one["training"]["history"]
    ddp, alone = ([h["loss"] for h in json.loads((out / "report.json").read_text())["training"]["history"]]
                  for out in (tmp_path / "ddp", reference))
    losses = torch.tensor([[h["loss"] for h in single], ddp, alone])
    print(f"distilled DDP vs one process: max |loss difference| over {STEPS} steps "
          f"{float((losses[0] - losses[1]).abs().max()):.2e}; vs no teacher: min "
          f"{float((losses[1] - losses[2]).abs().min()):.2e}")
    assert losses.shape == (3, STEPS) and all(h["grad_norm"] > 0 and h["lr"] > 0 for h in single[1:])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_file(tmp_path / "ddp" / "model.safetensors"),
                               load_file(tmp_path / "one" / "model.safetensors"), rtol=1e-3, atol=1e-5)
    scores = json.loads((tmp_path / "ddp" / "report.json").read_text())["evaluation"]["final"]
    assert scores.keys() == one["evaluation"]["final"].keys()
    torch.testing.assert_close(scores, one["evaluation"]["final"], rtol=1e-3, atol=1e-5)
    # A retry after the training ended (the newest checkpoint is the last step's): neither rank loads the teacher,
    # gone since, and both go on to the same collectives of the evaluation and the export
    shutil.rmtree(teacher)
    assert torchrun(config, log).wait(timeout=600) == 0, log.read_text()[-4000:]
    assert len(re.findall(r"\[rank [01]\].*the teacher is not loaded", log.read_text())) == 2
    assert json.loads((tmp_path / "ddp" / "report.json").read_text())["evaluation"]["final"] == scores
    # The teacher mattered: its soft targets, not the labels (few positive), moved the student's head towards
    # "positive", through the column each rank mapped its "positive" to; without it the head leans elsewhere (to
    # "negative" or "neutral", as the seed's split draws the 480 rows)
    assert bool(((losses[1] - losses[2]).abs() > 1e-2).all())
    names = json.loads((tmp_path / "ddp" / "config.json").read_text())["id2label"]
    favoured = {out.name: names[str(int(load_file(out / "model.safetensors")["classifier.bias"].argmax()))]
                for out in (tmp_path / "ddp", reference)}
    assert favoured["ddp"] == "positive" and favoured[reference.name] != "positive"


def workers(launcher: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started."""
    children = [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    ranks = {}
    for pid in children:
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        ranks[int(environ["RANK"])] = pid
    return ranks


def test_a_compiled_ddp_run_trains_as_the_eager_one(reference: Path, tmp_path: Path) -> None:
    """`training.compile` compiles the DDP module: dynamo splits the graph at DDP's gradient buckets, and the two
    ranks' losses are the eager run's, to rounding."""
    (config := tmp_path / "job.json").write_text(json.dumps(ddp_doc(tmp_path / "out", compile=True)))
    log = tmp_path / "run.log"
    assert torchrun(config, log).wait(timeout=600) == 0, log.read_text()[-4000:]
    assert "training through torch.compile" in log.read_text()
    compiled, eager = ([h["loss"] for h in json.loads((out / "report.json").read_text())["training"]["history"]]
                       for out in (tmp_path / "out", reference))
    assert len(compiled) == STEPS
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-5)


def test_a_ddp_run_whose_worker_is_killed_resumes_to_the_same_weights(reference: Path, tmp_path: Path) -> None:
    """An OOM kill or a lost node, as torchrun sees it: SIGKILL to one worker. torchrun exits 1 whatever happened,
    so the termination message must not say 1 (a user error, never retried); the next attempt resumes."""
    (config := tmp_path / "job.json").write_text(json.dumps(ddp_doc(tmp_path / "out")))
    termination = tmp_path / "termination-log"
    run = torchrun(config, tmp_path / "run.log", **{TERMINATION_ENV: str(termination)})
    deadline = time.monotonic() + 300
    saved = tmp_path / "out" / "checkpoints"
    while not any(complete(folder) for folder in (saved.iterdir() if saved.is_dir() else [])):
        assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-4000:]
        time.sleep(0.05)
    os.kill(workers(run.pid)[1], signal.SIGKILL)
    assert run.wait(timeout=300) == 1  # torchrun's code for any failed worker
    # Read as the operator reads it: the surviving rank may be SIGKILLed by torchrun while it writes, which
    # leaves the file empty, and an empty or missing message means infrastructure.
    sent = parse_message(termination.read_text()) if termination.exists() else {}
    assert sent.get("exitCode") != 1, sent  # missing (infrastructure), 2 or 143: all retried
    (folder,) = saved.iterdir()
    assert complete(folder)[-1].name < f"step-{STEPS:08d}"  # killed before the end
    assert torchrun(config, tmp_path / "run.log", **{TERMINATION_ENV: str(termination)}).wait(timeout=600) == 0
    assert "resumed from" in (tmp_path / "run.log").read_text()
    assert json.loads(termination.read_text())["exitCode"] == 0
    resumed, uninterrupted = load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_ranks_heal_a_pruned_model_alike_and_a_rerun_loads_what_they_healed(tmp_path: Path) -> None:
    """Both ranks heal (the same batches, so the same weights) and rank 0 keeps the result; a second attempt,
    resuming after training, has every rank load it instead of healing, and exports the same weights."""
    doc = ddp_doc(tmp_path / "out")
    # Weights large enough that a layer matters (at BERT's 0.02 the last one's block influence is 0.0000, and the
    # pruned model already agrees with the unpruned one: nothing to heal, and any healing looks the same).
    doc["model"]["config"] |= {"num_hidden_layers": 3, "initializer_range": 0.2}
    doc["dataset"]["maxTrainSamples"] = 160  # 10 steps
    doc["rearrange"]["prune"] = {"count": 1, "heal": {"steps": 3, "learningRate": 1e-3}}
    (config := tmp_path / "job.json").write_text(json.dumps(doc))
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    assert torchrun(config, first).wait(timeout=600) == 0, first.read_text()[-4000:]
    exported = load_file(tmp_path / "out" / "model.safetensors")
    healed = {rank: (float(before), float(after)) for rank, before, after in re.findall(
        r"\[rank (\d)\].*healed the pruned model in 3 steps .*hidden states (\S+) -> (\S+)", first.read_text())}
    assert healed.keys() == {"0", "1"} and healed["0"] == healed["1"], healed  # the same batches, the same healing
    assert healed["0"][1] > healed["0"][0] + 0.05, healed  # towards the unpruned model's hidden states
    (folder,) = (tmp_path / "out" / "checkpoints").iterdir()
    assert (folder / "healed.safetensors").exists()
    assert torchrun(config, second).wait(timeout=600) == 0, second.read_text()[-4000:]
    log = second.read_text()
    assert "healed the pruned model" not in log and log.count("loaded the healed layers") == 2
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


# A near-tie that each rank's analysis ordered its own way (as a GPU's non-deterministic kernels can).
RANK_SCORES = [[0.3, 0.1, 0.1 + 1e-6, 0.5], [0.3, 0.1 + 1e-6, 0.1, 0.5]]


def choose_layers(rank: int) -> tuple[list[int], list[float]]:
    """One of two ranks choosing the layers to prune from its own analysis' scores."""
    from finetune_trainer.analyze import StructureReport
    from finetune_trainer.config import PruneSpec
    from finetune_trainer.distributed import World

    report = StructureReport("BertModel", 0, 0, 0, [], {}, {}, None, [], [], {}, {},
                             importance={"layers": {"measure": "block-influence", "scores": RANK_SCORES[rank]}})
    drop = pipeline.pruned_layers(report, PruneSpec(count=1), World(rank, 2, torch.device("cpu")))
    return drop, report.importance["layers"]["scores"]


def in_group(target: Callable[[int], Any], rank: int, port: int, queue: Any) -> None:
    """`target(rank)` as one of two ranks of a gloo group, its value put on `queue` as (rank, value)."""
    import datetime

    import torch.distributed as dist
    from finetune_trainer import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    queue.put((rank, target(rank)))  # a tensor would go by shared memory: values are lists
    distributed.leave()
    # Whatever gloo still holds goes with the process, not with the interpreter's finalisation, where a rank aborted
    # now and then ("terminate called without an active exception") after its value was put and the group destroyed.
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def two_ranks(target: Callable[[int], Any], exits: tuple[int, int] = (0, 0)) -> dict[int, Any]:
    """What `target(rank)` gave in each of two spawned processes, ranks of one gloo group, which end with `exits`
    (a rank whose target exits on its own gives nothing)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=in_group, args=(target, rank, port, queue)) for rank in range(2)]
    for p in ranks:
        p.start()
    values = dict(queue.get(timeout=120) for code in exits if code == 0)
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == list(exits)
    return values


def test_every_rank_prunes_the_layers_rank_0_chose() -> None:
    """Each rank scored the layers on its own and chose by its own scores, so ranks whose scores ordered a near-tie
    differently cut different layers, and DDP then failed on shapes or averaged different layers' gradients."""
    from finetune_trainer.config import PruneSpec
    from finetune_trainer.prune import chosen_layers

    ours = chosen_layers(RANK_SCORES[0], PruneSpec(count=1))
    assert ours != chosen_layers(RANK_SCORES[1], PruneSpec(count=1))  # the ranks' own choices differ
    assert two_ranks(choose_layers) == {0: (ours, RANK_SCORES[0]), 1: (ours, RANK_SCORES[0])}


def errors_of_a_lost_peer(rank: int) -> list[tuple[str, str, int, str]]:
    """Rank 0 waiting in collectives while rank 1 dies without a word (os._exit, as a killed or crashed worker does):
    each collective's (name, reason_of, exit_code_of, text) of what it raised on rank 0. One on a group of a 1 s
    timeout times out first, while rank 1 still lives; then a training step's backward (DDP's allreduce) waits for
    rank 1 as it dies."""
    from datetime import timedelta

    import torch.distributed as dist
    from finetune_trainer.distributed import World
    from finetune_trainer.errors import exit_code_of, reason_of

    short = dist.new_group(timeout=timedelta(seconds=1))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    if rank == 1:
        time.sleep(3)  # past rank 0's timeout on `short`
        os._exit(1)
    world = World(rank, 2, torch.device("cpu"))
    collectives = {"timeout": lambda: dist.all_reduce(torch.ones(1), group=short),
                   "after a timeout": lambda: dist.all_reduce(torch.ones(1), group=short),
                   "backward": lambda: model(torch.ones(2, 4)).sum().backward(),
                   "all_reduce": lambda: world.sum([1.0]), "barrier": world.barrier,
                   "broadcast": lambda: world.broadcast(1)}
    raised = []
    for name, collective in collectives.items():
        try:
            collective()
        except RuntimeError as exc:
            raised.append((name, reason_of(exc), exit_code_of(exc), str(exc)))
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x4 and 3x2)")  # a bug's, in the same group
    return raised + [("other", reason_of(other), exit_code_of(other), str(other))]


def test_a_rank_whose_peer_died_reports_a_distributed_failure() -> None:
    """Gloo raises a lost peer as a plain RuntimeError ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by
    peer"), no DistError, so rank 0 reported an InfrastructureFailure: the operator then took it for the attempt's
    cause, not a knock-on of rank 1's, and a user error on rank 1 (never retried) was retried as a counted
    infrastructure failure. A RuntimeError of anything else stays an infrastructure failure."""
    raised = two_ranks(errors_of_a_lost_peer, exits=(0, 1))[0]
    names = ["timeout", "after a timeout", "backward", "all_reduce", "barrier", "broadcast", "other"]
    assert [name for name, *_ in raised] == names, raised
    for name, reason, code, text in raised[:-1]:
        assert (reason, code) == ("DistributedFailure", 2), (name, text)
    assert raised[-1][1:3] == ("InfrastructureFailure", 2)


def refusal_as_rank(doc: dict[str, Any], rank: int) -> str:
    """Why `doc`'s run, as one of two ranks (torchrun's environment), was refused; "" where it ran."""
    from finetune_trainer.errors import ConfigError

    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2"}
    try:
        pipeline.run(TrainerConfig.model_validate(doc), Path(doc["output"]["uri"]))
    except ConfigError as exc:
        return str(exc)
    return ""


def test_a_job_on_more_workers_is_refused_though_its_hub_branch_moved(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.workers edited between attempts of a job on a hub model at a branch: the earlier attempt's commit was
    looked up at the new world size, found nowhere, and the branch resolved again; its head had moved, so the earlier
    folder read as of other settings (its base), was removed and the run trained from step 0 unrefused."""
    from huggingface_hub import constants

    repo = hub_bert(hub := tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # this process's, read at import; the ranks' by their env
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    doc = on_base(out := tmp_path / "out", "hf://org/tiny-bert")
    pipeline.run(TrainerConfig.model_validate(doc), out)  # one process
    (folder,) = (out / "checkpoints").iterdir()
    made = complete(folder)
    (repo / "refs" / "main").write_text(LATER)  # pushed after the first attempt
    refused = two_ranks(partial(refusal_as_rank, doc))
    for rank in (0, 1):
        assert f"{folder} holds checkpoints of this job made by 1 processes; this run has 2" in refused[rank], refused
    assert complete(folder) == made


def verdicts_on_images(folder: str, rank: int) -> list[str]:
    """What one of two ranks raises checking the run's images as the pipeline does, where the one file that is no
    image, then the one whose read fails (/proc/self/mem: EIO at its start), is in rank 1's share (the odd places)."""
    from finetune_trainer.data import LabelledData, Split
    from finetune_trainer.distributed import World

    world = World(rank, 2, torch.device("cpu"))
    verdicts = []
    for odd in (f"{folder}/bad.png", "/proc/self/mem"):
        files = [f"{folder}/good.png", odd, f"{folder}/good2.png"]
        data = LabelledData(Split(files[:2], [0, 0]), Split([], []), Split(files[2:], [0]), {0: "a"})
        try:
            pipeline.check_images_once(data, folder, world)
            verdicts.append("none")
        except Exception as exc:  # noqa: BLE001 (what each rank raises is the result)
            verdicts.append(f"{type(exc).__name__}: {exc}")
    return verdicts


def test_each_rank_opens_its_share_of_the_image_files_and_every_rank_stops_on_the_verdict(tmp_path: Path) -> None:
    """Every rank opened every image file of the dataset (each file read from the one volume once per rank), then
    rank 0 alone did, holding the others in the collective past NCCL's timeout on a large dataset: now each opens
    its share, and a bad file or a failed read in one rank's share stops every rank alike."""
    from PIL import Image

    for name in ("good.png", "good2.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"")
    verdicts = two_ranks(partial(verdicts_on_images, str(tmp_path)))
    said = f"DataError: dataset {tmp_path}: 1 of its 3 image files do not open as images: {tmp_path}/bad.png "
    assert verdicts[0] == verdicts[1]
    assert verdicts[0][0].startswith(said)
    assert verdicts[0][1].startswith("OSError: [Errno 5] Input/output error")  # the volume's: raised on rank 0 too


def test_sigterm_during_a_long_evaluation_stops_both_ranks_at_one_batch(tmp_path: Path) -> None:
    """torchrun passes the kubelet's SIGTERM on to each rank: the ranks agree before each evaluation batch, so both
    leave step 3's evaluation at the same one (neither waits in a collective the other never makes), write the
    checkpoint as if SIGTERM had come before it, and the resumed run ends as one never stopped."""

    def job(name: str) -> tuple[Path, Path]:
        """6 steps validated at steps 3 and 6 one row at a time on 2,461 rows, each rank half of them."""
        doc = ddp_doc(tmp_path / name, evalEverySteps=3)
        doc["training"]["checkpointEverySteps"] = 3
        doc["dataset"] |= {"maxTrainSamples": 96, "maxEvalSamples": None, "validationSplit": 0.05, "testSplit": 0.005}
        doc["evaluation"] = {"baseline": False, "batchSize": 1}
        (config := tmp_path / f"{name}.json").write_text(json.dumps(doc))
        return config, tmp_path / name

    config, reference = job("reference")
    assert torchrun(config, tmp_path / "reference.log").wait(timeout=600) == 0
    log = (tmp_path / "reference.log").read_text()
    evaluating = seconds_between(log, EVALUATING, "validation at step 3")  # step 3's evaluation alone

    config, out = job("stopped")
    termination = tmp_path / "termination-log"
    run = torchrun(config, tmp_path / "stopped.log", **{TERMINATION_ENV: str(termination)})
    while EVALUATING not in (tmp_path / "stopped.log").read_text():  # step 3's evaluation has begun
        assert run.poll() is None
        time.sleep(0.02)
    (folder,) = (out / "checkpoints").iterdir()
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)  # as the kubelet does to the container's first process
    while not complete(folder):  # cut short, as the log below says (a bound of the reference's time was load's)
        assert time.monotonic() - sent < 300, "no checkpoint"
        time.sleep(0.02)
    saved = time.monotonic() - sent
    run.wait(timeout=600)
    print(f"an evaluation takes {evaluating:.1f} s; checkpoint {saved:.1f} s after SIGTERM, torchrun's exit "
          f"{time.monotonic() - sent:.1f} s")
    assert parse_message(termination.read_text())["exitCode"] == 143
    log = (tmp_path / "stopped.log").read_text()
    assert all(f"[rank {rank}] WARNING finetune_trainer.train: SIGTERM: left the evaluation at step 3 unfinished"
               in log for rank in (0, 1))
    (checkpoint,) = complete(folder)
    assert checkpoint.name == "step-00000003" and json.loads((checkpoint / "state.json").read_text())["evals"] == []

    assert torchrun(config, tmp_path / "stopped.log").wait(timeout=600) == 0
    resumed, uninterrupted = (json.loads((o / "report.json").read_text()) for o in (out, reference))
    assert [(e["step"], e["metrics"]) for e in resumed["training"]["evals"]] == [
        (e["step"], e["metrics"]) for e in uninterrupted["training"]["evals"]]
    assert resumed["evaluation"]["final"] == uninterrupted["evaluation"]["final"]
    torch.testing.assert_close(load_file(out / "model.safetensors"), load_file(reference / "model.safetensors"),
                               rtol=1e-5, atol=1e-6)


def test_the_reported_test_scores_are_those_of_the_exported_model(tmp_path: Path) -> None:
    """Each rank's last training forward moves its own BatchNorm statistics after DDP broadcast rank 0's, so without
    a common set the ranks scored the test split with models other than rank 0's, the one exported."""
    from finetune_trainer.batches import encode_images, make_collate
    from finetune_trainer.config import Task
    from finetune_trainer.data import load_dataset
    from finetune_trainer.distributed import World
    from finetune_trainer.evaluate import evaluate
    from finetune_trainer.models import load_vision_model

    doc = {"model": {"task": "image-classification", "architecture": "resnet18"},
           "dataset": {"uri": "pvc://data/digits", "imageSize": 16, "maxTrainSamples": 64, "maxEvalSamples": 32},
           "analyze": {"probeBatches": 1}, "evaluation": {"metrics": ["loss", "accuracy"], "baseline": False},
           "training": {"maxSteps": 4, "batchSize": 8, "batching": "dynamic"}, "output": {"uri": str(tmp_path / "out")}}
    (config := tmp_path / "job.json").write_text(json.dumps(doc))
    assert torchrun(config, tmp_path / "run.log").wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    reported = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]["final"]
    cfg = TrainerConfig.model_validate(doc)
    exported = load_vision_model(cfg.model.model_copy(update={"uri": str(tmp_path / "out")}))
    test = encode_images(load_dataset(cfg.dataset, Task.IMAGE_CLASSIFICATION, 0).test)
    alone = evaluate(exported, test, make_collate(Task.IMAGE_CLASSIFICATION, 0, 16), Task.IMAGE_CLASSIFICATION,
                     cfg.evaluation_metrics, 8, World(0, 1, torch.device("cpu")), 10)
    assert reported == pytest.approx(alone, rel=1e-6)


class Dropped(torch.nn.Module):
    """Embeddings through dropout to two logits; it keeps the dropout masks its training forwards drew."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.drop, self.out = torch.nn.Embedding(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
        self.masks: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dropped = self.drop(self.embed(input_ids))
        if self.training:
            self.masks.append(dropped == 0)
        return self.out(dropped.mean(1))


def train_with_dropout(rank: int) -> list:
    """One of two ranks training `Dropped` for two steps, seeded alike as `load_model` seeds every rank."""
    from finetune_trainer.batches import Encoded, make_collate
    from finetune_trainer.config import Task, TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.train import make_scheduler, train_loop

    torch.manual_seed(0)
    model = Dropped()
    data = Encoded([[1, 2, 3, 4]] * 16, [0, 1] * 8, [4] * 16)
    spec = TrainingSpec(batchSize=4, maxSteps=2, batching="dynamic", precision="fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_loop(torch.nn.parallel.DistributedDataParallel(model), optimizer, make_scheduler(optimizer, spec, 2), data,
               make_collate(Task.SEQUENCE_CLASSIFICATION, 0, 0), spec, Task.SEQUENCE_CLASSIFICATION,
               World(rank, 2, torch.device("cpu")))
    return torch.stack(model.masks).tolist()


def test_ranks_draw_their_own_dropout_masks() -> None:
    """Every rank seeds its RNG alike (so that fresh weights agree), and training went on from that state: each
    rank's dropout dropped the same units of its own batch, a global batch of 2 x 4 regularised as one of 4. Nor
    may a rank reseed to the seed that drew the fresh weights: its masks would replay that stream."""
    masks = two_ranks(train_with_dropout)
    first, second = (torch.tensor(masks[rank]) for rank in (0, 1))
    assert first.shape == second.shape == (2, 4, 4, 16)  # two steps of a batch of 4 texts of 4 tokens
    assert not torch.equal(first, second)
    torch.manual_seed(TrainingSpec().seed)
    replayed = torch.nn.functional.dropout(torch.ones(4, 4, 16), 0.5) == 0  # the first mask drawn from that seed
    assert not torch.equal(first[0], replayed) and not torch.equal(second[0], replayed)


def stop_early(rank: int, restore_fails: bool = False) -> tuple[Any, ...]:
    """One of two ranks training `Dropped` for four steps with early stopping, whose evaluations are best at step 2;
    with the CPU copies of the weights it made. With `restore_fails`, rank 0's restore of the best weights raises:
    what each rank raised instead, and whether its DDP module was freed once that was handled."""
    from finetune_trainer import checkpoints
    from finetune_trainer.batches import Encoded, make_collate
    from finetune_trainer.config import Task, TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.errors import CheckpointMismatch
    from finetune_trainer.train import Hooks, make_scheduler, train_loop

    copies: list[int] = []
    copy = checkpoints.trained_tensors
    checkpoints.trained_tensors = lambda model: copies.append(1) or copy(model)  # this spawned process's alone
    if restore_fails:
        def mismatch(*_: Any) -> None:
            raise CheckpointMismatch("best.safetensors: does not fit")

        checkpoints.restore = mismatch
    torch.manual_seed(0)
    model = Dropped()
    spec = TrainingSpec(batchSize=4, maxSteps=4, evalEverySteps=1, earlyStopping={"patience": 10},
                        batching="dynamic", precision="fp32")
    losses, weights = iter([0.5, 0.4, 0.6, 0.7]), []

    def evaluate(_: Any) -> dict[str, float]:
        weights.append({n: t.tolist() for n, t in model.state_dict().items()})
        return {"loss": next(losses)}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    freed = weakref.ref(wrapped)
    gc.disable()  # what a failure leaves in a reference cycle stays until a collection
    said = None
    try:
        state = train_loop(wrapped, optimizer, make_scheduler(optimizer, spec, 4),
                           Encoded([[1, 2, 3, 4]] * 16, [0, 1] * 8, [4] * 16),
                           make_collate(Task.SEQUENCE_CLASSIFICATION, 0, 0), spec, Task.SEQUENCE_CLASSIFICATION,
                           World(rank, 2, torch.device("cpu")), Hooks(evaluate=evaluate))
    except CheckpointMismatch as exc:
        said = str(exc)
    if said is not None:
        del wrapped
        return said, freed() is None
    return (state.best_step, state.restored_best, {n: t.tolist() for n, t in model.state_dict().items()}, weights[1],
            weights[-1], len(copies))


def test_rank_0_alone_keeps_the_best_weights_and_every_rank_ends_with_them() -> None:
    """Every rank kept a CPU copy of the best weights, which DDP keeps the same on every rank: a large model's full
    fine-tune held one per GPU in the node's memory. Rank 0 alone keeps it, and the others take rank 0's at the end."""
    ran = two_ranks(stop_early)
    for rank in (0, 1):
        best_step, restored, final, at_best, at_last, _ = ran[rank]
        assert best_step == 2 and restored and final == at_best != at_last
    assert ran[1][2] == ran[0][2]
    assert ran[0][5] == 2 and ran[1][5] == 0  # the first two evaluations each improved
    # Rank 0 failing to put them back fails every rank, where the others waited in the broadcast of its weights.
    # Neither rank's failure keeps the model (nor, under DDP, its process group) once it is handled.
    assert two_ranks(partial(stop_early, restore_fails=True)) == {
        0: ("best.safetensors: does not fit", True),
        1: ("rank 0 could not put the best weights back (its log says why)", True)}


def resume_in_own_view(roots: tuple[str, str], stale: bool, rank: int) -> tuple[bool, int, list[float]]:
    """One of two ranks asking, as the pipeline does, whether the checkpoints of `roots[rank]` end a training of 4
    steps, and resuming `Dropped` from them: what it answered, the step it resumed and its restored weights. With
    `stale`, rank 1's listing of the folder lacks its newest checkpoint, whose files it still reads."""
    from finetune_trainer import checkpoints
    from finetune_trainer.config import TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.train import make_scheduler

    if stale and rank == 1:
        listing = checkpoints.complete
        checkpoints.complete = lambda root: listing(root)[:-1]  # this spawned process's alone
    world, root, model = World(rank, 2, torch.device("cpu")), Path(roots[rank]), Dropped()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ended = checkpoints.finished(root, 4, world)
    try:
        state, _ = checkpoints.load(root, model, optimizer, make_scheduler(optimizer, TrainingSpec(), 4),
                                    torch.amp.GradScaler("cpu", enabled=False), world)
    except FileNotFoundError as exc:
        return ended, -1, [Path(str(exc).split(",")[0]).name]
    return ended, state["step"], model.out.weight.unique().tolist()


@pytest.mark.parametrize("stale", [True, False], ids=["a stale listing", "a folder it cannot see"])
def test_every_rank_resumes_the_checkpoint_rank_0_lists(stale: bool, tmp_path: Path) -> None:
    """Each rank listed the shared checkpoint folder itself: where a rank's view lacked the newest checkpoint (NFS's
    cached attributes, one committed a moment before it listed), the ranks resumed different steps, and the run went
    on with diverged replicas (or waited in different numbers of collectives). They follow rank 0's list; one a rank
    does not see fails the attempt on every rank (a retry reads it again: set aside, its steps would be lost)."""
    from finetune_trainer import checkpoints
    from finetune_trainer.config import TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.train import make_scheduler

    model, shared = Dropped(), tmp_path / "shared"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, scaler = make_scheduler(optimizer, TrainingSpec(), 4), torch.amp.GradScaler("cpu", enabled=False)
    for step in (2, 4):
        with torch.no_grad():
            model.out.weight.fill_(step)
        checkpoints.save(shared, step, model, optimizer, scheduler, scaler, {"step": step},
                         World(0, 1, torch.device("cpu")), keep=2)
    seen = shared
    if not stale:  # rank 1's view of the volume: the folder without the newest checkpoint
        shutil.copytree(shared, seen := tmp_path / "seen")
        shutil.rmtree(seen / "step-00000004")
    unseen = (True, -1, ["step-00000004"])
    assert two_ranks(partial(resume_in_own_view, (str(shared), str(seen)), stale)) == (
        {0: (True, 4, [4]), 1: (True, 4, [4])} if stale else {0: unseen, 1: unseen})
    assert checkpoints.complete(shared)[-1].name == "step-00000004"  # kept


# A run's fingerprint, and the same run as an earlier version of the trainer named its folder (without its defaults)
EARLIER = {"training": {"rate": 1}, "worldSize": 2, "data": "d"}
FULL = EARLIER | {"training": {"rate": 1, "seed": 0}}


def run_folder_in_own_view(parent: str, rank: int) -> str:
    """The run folder one of two ranks takes, where rank 1's listing of the shared folder lacks the earlier version's
    folder (NFS's cached attributes)."""
    from finetune_trainer import checkpoints
    from finetune_trainer.distributed import World

    if rank == 1:
        checkpoints.run_folders = lambda parent: []  # this spawned process's alone
    return checkpoints.run_folder(Path(parent), EARLIER, World(rank, 2, torch.device("cpu")), FULL).name


def test_every_rank_takes_the_run_folder_rank_0_chose(tmp_path: Path) -> None:
    """Each rank chose the run's folder from its own listing: a rank that did not see the folder an earlier version of
    the trainer named resumed nothing, beside rank 0 resuming it (diverged replicas)."""
    from finetune_trainer import checkpoints
    from finetune_trainer.distributed import World

    one = World(0, 1, torch.device("cpu"))
    earlier = checkpoints.run_folder(tmp_path, EARLIER, one)  # named by the sparse fingerprint, as before
    model = Dropped()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints.save(earlier, 4, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                     torch.amp.GradScaler("cpu", enabled=False), {"step": 4}, one, keep=1)
    assert earlier.name != checkpoints.folder_name(FULL)
    assert two_ranks(partial(run_folder_in_own_view, str(tmp_path))) == {0: earlier.name, 1: earlier.name}


def scores_in_own_view(roots: tuple[str, str], rank: int) -> dict[str, float]:
    """The baseline one of two ranks takes, as the pipeline asks, where the run's folder is `roots[rank]`."""
    from finetune_trainer import checkpoints
    from finetune_trainer.distributed import World

    return pipeline.scores_once(checkpoints.BASELINE, lambda: {"accuracy": -1.0}, {}, Path(roots[rank]),
                                World(rank, 2, torch.device("cpu")))


def test_every_rank_takes_the_baseline_rank_0_reads() -> None:
    """Each rank read the baseline an earlier attempt kept in the shared folder: a rank whose view lacked it measured
    the baseline again, alone, beside ranks that did not (different collectives: a hang, or diverged scores)."""
    import tempfile

    from finetune_trainer import checkpoints
    from finetune_trainer.distributed import World

    with tempfile.TemporaryDirectory() as shared, tempfile.TemporaryDirectory() as seen:
        checkpoints.save_scores(Path(shared), checkpoints.BASELINE, {"scores": {"accuracy": 0.5}, "per_class": None},
                                World(0, 1, torch.device("cpu")))
        assert two_ranks(partial(scores_in_own_view, (shared, seen))) == {0: {"accuracy": 0.5}, 1: {"accuracy": 0.5}}


def pruning_in_own_view(doc: dict[str, Any], parents: tuple[str, str], rank: int) -> list[int]:
    """The layers one of two ranks prunes, as the pipeline asks, where its scores would drop layer 2."""
    from finetune_trainer.distributed import World

    return pipeline.earlier_pruning(Path(parents[rank]), TrainerConfig.model_validate(doc),
                                    World(rank, 2, torch.device("cpu")), [2], "d", False)


def test_every_rank_prunes_again_what_the_earlier_attempt_rank_0_sees_pruned(tmp_path: Path) -> None:
    """Each rank read the earlier attempt's pruning choice from the shared folder itself: a rank whose view lacked
    that run's folder pruned the layers its own scores chose, beside ranks pruning the earlier ones."""
    from finetune_trainer import checkpoints
    from finetune_trainer.distributed import World

    doc = tiny_classifier_doc(tmp_path / "out") | {"rearrange": {"prune": {"count": 1}}}
    cfg = TrainerConfig.model_validate(doc)
    identity, full = (pipeline.fingerprinted(cfg, 2, [1], "d", defaults, False) for defaults in (False, True))
    checkpoints.run_folder(shared := tmp_path / "shared", identity, World(0, 1, torch.device("cpu")), full)
    (seen := tmp_path / "seen").mkdir()  # rank 1's view: the earlier run's folder not there yet
    assert two_ranks(partial(pruning_in_own_view, doc, (str(shared), str(seen)))) == {0: [1], 1: [1]}


class Timed(torch.nn.Module):
    """A forward that takes 10 ms and notes when it ran (the system's monotonic clock, comparable across ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.ran: list[tuple[float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.monotonic()
        time.sleep(0.01)
        self.ran.append((start, time.monotonic()))
        return x * self.weight


def measure_footprint(rank: int) -> list[tuple[float, float]]:
    """One of two ranks measuring the unpruned model's footprint, as `prune_layers` does."""
    from finetune_trainer.batches import Batch
    from finetune_trainer.distributed import World

    world = World(rank, 2, torch.device("cpu"))
    model = Timed()
    serving = [Batch({"x": torch.ones(2)}, torch.zeros(2), 2, 2, 2)] * 4
    world.barrier()  # as the collectives before it leave the ranks
    pipeline.footprint_alone(model, serving, world)
    return model.ran


def test_rank_0_measures_the_latency_before_pruning_alone() -> None:
    """Every rank measured the latency before pruning at once, on the same cores, and rank 0 alone the one after
    it (in the export, while the others wait): a CPU job on 2 ranks reported 3-4x the speedup of one process."""
    ran = two_ranks(measure_footprint)
    start, end = min(s for s, _ in ran[0]), max(e for _, e in ran[0])
    assert len(ran[0]) > 4  # a warm-up and rounds over the 4 batches
    assert not [(s, e) for s, e in ran[1] if s < end and e > start], "rank 1 ran forwards while rank 0 measured"
