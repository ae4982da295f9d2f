"""Resumable checkpoints, written so that a resume never reads a half-written one.

A checkpoint is a folder `step-<N>`: what trains (and every buffer) as safetensors, the
weights of the best evaluation so far when early stopping keeps them, the optimizer and
scheduler, each rank's RNG state and the loop's position as JSON. It is
written into `.tmp-step-<N>`, flushed to disk, given a COMMITTED marker, and only then
renamed into place by rank 0 (a rename is atomic); the last `keep` are kept. Resume takes
the newest folder in rank 0's listing (`listed`) that has the marker, and every rank can read (one torn after its
flush, or damaged, is set aside, `.unreadable-step-<N>`; one a rank does not see fails the attempt). A step written
again (its evaluation came after it) moves the old folder aside to `.old-step-<N>` until the new one is in place:
a crash between the two renames leaves it there, still the step's checkpoint (`complete`), and `run_folder` puts it back.
Ranks must share the checkpoint folder (a PVC).

The checkpoints of one run live in `<output>/checkpoints/<fingerprint>` (`run_folder`): the
hash of what changes the optimisation, world size included, written beside them in
fingerprint.json with a digest of the data (`batches.digest`): data changed at the same paths
trains afresh in the same folder. A folder an earlier version named otherwise (before a field this
version adds at its default) is this run's, resumed in place, when its fingerprint, read with this
run's defaults (`filled`), is this run's: an upgrade keeps the run, and a rollback finds it. A run
never resumes another's; the folders of other fingerprints and
half-written `.tmp-*` ones are stale and removed when a run starts, renamed to `.tmp-<name>` first (`remove`: cut
short, nothing a run reads is left torn), as is one with checkpoints but no fingerprint.json (an earlier trainer's
removal in place, cut short). A run whose config differs
from a checkpointed one only in its world size is refused: the global batch, the split of the
data and the schedule's length would all change under the saved optimizer. A checkpoint of the same
fingerprint that another version of the trainer laid out otherwise (what trains, the optimizer's groups) is
removed too, with a warning, and training starts afresh (`misfits`).

A pruned run that heals keeps the healed layers in the same folder (`healed.safetensors`, with
healing's figures), so that a resumed run loads them instead of healing again: LoRA's
checkpoints hold the adapters, not the layers under them. The baseline's scores are kept there too
(`baseline.json`, and a distillation teacher's `teacher.json`), so that an attempt that resumes does not score
the test split again. The layers a pruned run removes are in its fingerprint; a later attempt of the run removes
the same ones (`earlier_choice`), whatever its own scores say.

Checkpoints hold what trains, not the frozen base under it, which each attempt loads from model.uri again: the
fingerprint's `base` says which base that was, compared as the data is (a base changed at the same uri trains afresh
in the same folder, the kept baseline scored again). A hub repo at a branch by the commit the run's first attempt
resolved it to (`uris.pinned`), which a later attempt of the run loads again (`earlier_base`), whatever the branch's
head is by then; a model's folder or weights file (file://, pvc://, a path) and a distillation teacher's by
`files_identity`, which reads a little of each file (not a hash of many GB each attempt).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from finetune_trainer.distributed import World
from finetune_trainer.errors import (OURS, CheckpointMismatch, ConfigError, chain_of, device_fault, failed_read,
                                     no_space_in)

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
PREFIX = "step-"
ASIDE = ".old-"  # a step's checkpoint while save writes that step again
BEST = "best.safetensors"
HEALED = "healed.safetensors"
BASELINE = "baseline.json"
TEACHER = "teacher.json"  # training.distillation's teacher's test scores
FINGERPRINT = "fingerprint.json"
BASE = "base"  # the fingerprint's key for the base the run trains on (`files_identity`, the hub commits pinned)
TRAINED, OPTIMIZER, STATE = "trained.safetensors", "optimizer.pt", "state.json"  # a checkpoint's files, rank 0's
CHECKPOINT_FILES = (TRAINED, OPTIMIZER, STATE)

# What reading a checkpoint's files raises where their bytes are damaged (a byte flipped on the volume, a file cut
# short), by where the damage lands: torch's zip records and storage sizes (RuntimeError: "PytorchStreamReader failed
# ...", "record size ... does not match", "Trying to resize storage ..."), the pickle's opcodes and what they build
# (UnpicklingError, a string's UTF-8 (a ValueError), KeyError, IndexError, TypeError, AttributeError, and
# AssertionError and struct.error: weights_only's unpickler asserts, and unpacks numbers), its end (EOFError),
# safetensors' header, the JSON's text. Which of them says damage, `damaged` tells.
DAMAGED = (RuntimeError, SafetensorError, EOFError, ValueError, pickle.UnpicklingError, LookupError, TypeError,
           AttributeError, AssertionError, struct.error)


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes while training: trainable parameters and all buffers (BatchNorm statistics)."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(dict(model.named_buffers()))
    return tensors


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`trained`, copied to the CPU (one copy, on any device), so that the result stays as it is while training goes
    on."""
    return {n: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for n, t in trained(model).items()}


def rng_state() -> dict[str, Any]:
    """Every generator's state, in types `torch.load(weights_only=True)` reads back (numpy's key as a tensor)."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Set every generator to `state` (`rng_state`'s), which is left as it was: `takes` tries it first."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(numpy | {"state": numpy["state"] | {"key": numpy["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_tree(folder: Path, recursive: bool = False) -> None:
    """Flush `folder`'s files and the folder itself to disk (with `recursive`, its folders' too)."""
    for path in [*folder.iterdir(), folder]:
        if recursive and path != folder and path.is_dir() and not path.is_symlink():
            fsync_tree(path, recursive)
        else:
            fsync(path)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's names (not its files), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
         loop_state: dict[str, Any], world: World, keep: int, best: dict[str, torch.Tensor] | None = None) -> Path:
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    try:
        torch.save(rng_state(), tmp / f"rng-{world.rank}.pt")
        if world.main:
            save_file(trained_tensors(model), tmp / TRAINED)
            if best is not None:
                save_file(best, tmp / BEST)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict()}, tmp / OPTIMIZER)  # fp16's loss scale: {} when off
            (tmp / STATE).write_text(json.dumps(loop_state))
    except Exception as exc:
        written = sum(f.stat().st_size for f in tmp.iterdir()) >> 20
        what = (f"the checkpoint of step {step} (more than {written} MiB; the newest {keep} are kept "
                "(training.keepCheckpoints), and one more while it is written)")
        if full := no_space_in(root, exc, what):
            raise full from exc
        raise
    world.barrier()
    if world.main:
        (tmp / MARKER).write_text(str(step))
        fsync_tree(tmp)
        aside = root / f"{ASIDE}{final.name}"
        # Written again: os.replace takes no folder that is not empty, and one deleted first left a crash no
        # complete checkpoint of the step. Set aside, it is the step's until the new one takes the name.
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)  # a torn one, of a crash after the step was in place
            os.replace(final, aside)
            fsync(root)
        os.replace(tmp, final)
        fsync_tree(root)
        shutil.rmtree(aside, ignore_errors=True)
        for old in complete(root)[:-keep]:
            remove(old)
        log.info("checkpoint %s", final)
    world.barrier()
    return final


def run_folder(parent: Path, identity: dict[str, Any], world: World, full: dict[str, Any] | None = None) -> Path:
    """The checkpoint folder of the run `identity` describes (what changes its optimisation, with `worldSize`: the
    values that are not their defaults; `full` spells the defaults out too, names the folder, and saved fingerprints
    are compared in it, see `filled`); see the module docstring for what it refuses and removes. Rank 0 looks and
    chooses, and every rank follows: a shared volume's listing may differ between ranks (`listed`), and ranks that
    each chose resumed different folders, or raised on some ranks alone while the others waited."""
    full = identity if full is None else full
    chosen = chosen_folder(parent, identity, full, world.size) if world.main else None
    name, refused = world.broadcast((chosen[0].name, chosen[2]) if chosen else None)
    if refused:
        raise ConfigError(refused)
    root = parent / name
    if chosen:
        for stale in chosen[1]:
            log.info("removing stale checkpoints %s", stale)
            remove(stale)
        for torn in [*root.glob(".tmp-*"), *parent.glob(".tmp-*")]:  # save's, remove's, and save_healed's file
            if torn.is_dir():
                shutil.rmtree(torn, ignore_errors=True)
            else:
                torn.unlink(missing_ok=True)
        for aside in root.glob(f"{ASIDE}*"):  # a step save wrote again: the old one back, unless the new is in place
            final = root / aside.name.removeprefix(ASIDE)
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, final)
        root.mkdir(parents=True, exist_ok=True)
        # Through a temporary file: cut short in place, an empty one lost the earlier attempt's pruning choice. With
        # its defaults: a default a later version changes is a change, and the version before this one (which
        # compares fingerprints with its defaults) reads the run as its own after a rollback.
        text = json.dumps(full, indent=2, sort_keys=True)
        replace_atomically(root, FINGERPRINT, lambda tmp: tmp.write_text(text))
    world.barrier()
    return root


def chosen_folder(parent: Path, identity: dict[str, Any], full: dict[str, Any],
                  world_size: int) -> tuple[Path, list[Path], str | None]:
    """Rank 0's choice for `run_folder`: the run's folder, the stale folders to remove, and why the run is refused
    (checkpoints of this job made by another number of processes), saying in the log what it does not resume."""
    root = parent / folder_name(full)
    others = [p for p in run_folders(parent) if p != root]
    # Kept, a resumed optimizer trained on other data (or adapters on another base), and the kept baseline had scored
    # another test split (or model). (The folder's name is the rest of the full fingerprint.)
    other_data = (saved := read_full(root, identity, full)) is not None and not same_run(saved, full)
    if other_data and BASE in saved and saved[BASE] != full.get(BASE):
        log.warning("not resuming what %s holds: the base model changed since it was made (its files replaced at the "
                    "same uri, or another commit of its hub repo); training starts afresh. Changed: %s", root,
                    "; ".join(differences(saved[BASE], full.get(BASE) or {}, f"{BASE}.")))
    if other_data and "data" in saved and saved["data"] != full.get("data"):
        log.warning("not resuming what %s holds: the data changed since it was made (the dataset or the tokenizer, at "
                    "the same paths); training starts afresh", root)
    # What an earlier trainer's removal, deleting in place, left when cut short: checkpoints whose weights may be
    # gone, or healed layers and a baseline of another run
    unnamed = root.is_dir() and not (root / FINGERPRINT).exists() and any(root.iterdir())
    if unnamed:
        log.warning("not resuming what %s holds: its %s is gone (a removal cut short); training starts afresh", root,
                    FINGERPRINT)
    # This run's, under the name an earlier version of the trainer gave it (without a field added since at its
    # default): resumed, not trained again from step 0 after an upgrade (nor healed, nor scored again); in place, so
    # that the version before, rolled back to, still finds it.
    found = {other: (complete(other), read_full(other, identity, full)) for other in others}  # each read once
    earlier = None if root.exists() else max(
        (other for other, (steps, saved) in found.items()
         if (steps or kept(other)) and saved is not None and same_run(saved, full)),
        key=lambda other: len(found[other][0]), default=None)
    others = [other for other in others if other != earlier]
    if not complete(root) and earlier is None:
        for other in others:
            steps, saved = found[other]
            if not steps or saved is None:
                continue
            if same_run(saved, full, "worldSize"):
                return root, [], (
                    f"{other} holds checkpoints of this job made by {saved['worldSize']} processes; this run has "
                    f"{world_size}. The global batch, the data's split and the schedule would change under the saved "
                    f"optimizer, so they are not resumed: run on {saved['worldSize']} processes again "
                    f"(runtime.workers x processesPerWorker), or remove {other} to start afresh")
            # else a job edited between attempts trains from step 0 again without a word why
            log.warning("not resuming the checkpoints in %s, made with other settings that change the optimisation; "
                        "training starts afresh. Changed: %s", other, "; ".join(differences(saved, full)))
    if earlier is not None:
        root = earlier
        log.info("resuming what %s holds, a folder an earlier version of the trainer named", root)
    return root, [*others, *([root] if other_data or unnamed else [])], None


def save_healed(root: Path, layers: nn.Module, figures: dict[str, float], world: World) -> None:
    """Keep healing's result (the layer stack's weights) and its figures in the run's folder, atomically."""
    if world.main:
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in layers.state_dict().items()}
        replace_atomically(root, HEALED, lambda tmp: save_file(tensors, tmp, metadata={"figures": json.dumps(figures)}))
    world.barrier()


UNREADABLE_PREFIX = ".unreadable-"  # a committed checkpoint a rank could not read, kept out of `complete`'s sight


def set_aside(checkpoint: Path) -> Path | None:
    """Move a checkpoint that cannot be read where no resume looks, keeping what can be read of it (its weights, where
    its optimizer state is what was torn); an earlier one set aside gives way. Removed (None) where a later one is set
    aside already, or where it cannot be moved."""
    aside = checkpoint.with_name(f"{UNREADABLE_PREFIX}{checkpoint.name}")
    kept = list(checkpoint.parent.glob(f"{UNREADABLE_PREFIX}*"))  # one kept at most, the newest: the volume was
    if any(step_of(k) > step_of(checkpoint) for k in kept):  # sized for `keep`; `load` sets them aside newest first
        remove(checkpoint)
        return None
    for earlier in kept:
        shutil.rmtree(earlier, ignore_errors=True)
    try:
        os.replace(checkpoint, aside)
    except OSError:
        remove(checkpoint)
        return None
    fsync(checkpoint.parent)
    return aside


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(UNREADABLE_PREFIX).removeprefix(ASIDE).removeprefix(PREFIX))


def remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder (or a run's folder of them) under a `.tmp-` name: cut short (a SIGTERM, a SIGKILL),
    a folder deleted in place could keep its marker without its weights (and a run's, without its fingerprint), still
    listed as complete, and every later attempt failed loading it or resumed stale weights. A `.tmp-` one is what
    save clears before it writes that step again, and `run_folder` when a run starts."""
    doomed = checkpoint.with_name(f".tmp-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)  # a torn one of its own: a folder is not replaced unless empty
    try:
        os.replace(checkpoint, doomed)
    except OSError:  # gone already, or a torn one NFS keeps open files of: in place then, never failing the save
        doomed = checkpoint
        unmark(checkpoint)
    else:
        fsync(checkpoint.parent)  # the new name on disk before any delete: a crash never shows the old one torn
    shutil.rmtree(doomed, ignore_errors=True)


def unmark(folder: Path) -> None:
    """Before a folder is deleted in place: its markers and its fingerprint first, on disk before the rest goes, so
    a removal cut short leaves nothing a later run resumes."""
    for marker in [folder / MARKER, *folder.glob(f"*/{MARKER}"), folder / FINGERPRINT]:
        with contextlib.suppress(OSError):
            marker.unlink()
            fsync(marker.parent)


def replace_atomically(root: Path, name: str, write: Callable[[Path], object]) -> None:
    """Write `name` in `root` through a temporary file (`write` given its path), synced before it takes the name and
    the folder's names after: a crash leaves the old file or the new, never a torn or empty one (the next attempt
    would read it). Nothing else in `root` is opened: the output folder may hold what the pod cannot read (another
    uid's 0600 file), a FIFO, or large files of others."""
    tmp = root / f".tmp-{name}"
    write(tmp)
    fsync(tmp)
    os.replace(tmp, root / name)
    fsync(root)


def healed_kept(root: Path) -> bool:
    """Whether an earlier attempt of this run kept its healed layers here (`load_healed` reads them)."""
    return (root / HEALED).exists()


def load_healed(root: Path, layers: nn.Module) -> dict[str, float]:
    """Load the healed layers an earlier run of this job kept (`healed_kept`), and return its healing's figures."""
    path = root / HEALED
    with safe_open(path, "pt") as f:
        figures = json.loads(f.metadata()["figures"])
    device = next(layers.parameters()).device
    layers.load_state_dict(load_file(path, device=str(device)))  # strict: the same layers, or refuse
    log.info("loaded the healed layers from %s (healing ran in an earlier attempt)", path)
    return figures | {"reloaded": True}


def save_scores(root: Path, name: str, kept: dict[str, Any], world: World) -> None:
    """Keep test scores (`name`: BASELINE, TEACHER) in the run's folder, atomically and synced (`load_scores` reads
    them)."""
    if world.main:
        replace_atomically(root, name, lambda tmp: tmp.write_text(json.dumps(kept)))
    world.barrier()


def load_scores(root: Path, name: str) -> dict[str, Any] | None:
    """The scores `name` an earlier attempt of this run kept; None when none."""
    try:
        return json.loads((root / name).read_text())
    except FileNotFoundError:
        return None


def kept(folder: Path) -> bool:
    """Whether a run's folder keeps results of its own besides checkpoints: healed layers, test scores."""
    return any((folder / name).exists() for name in (HEALED, BASELINE, TEACHER))


def folder_name(identity: dict[str, Any]) -> str:
    """The hash of the identity but its `data` and its `base` (which `run_folder` compares itself, to say why it starts
    afresh)."""
    named = {k: v for k, v in identity.items() if k not in ("data", BASE)}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]


def run_folders(parent: Path) -> list[Path]:
    """The run folders in `parent`, less those `remove` was deleting (torn when cut short: never read)."""
    return [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")] if parent.is_dir() else []


def read_identity(folder: Path) -> dict[str, Any] | None:
    """A run folder's fingerprint; None where there is none, or an empty or torn one (an earlier trainer wrote it in
    place: the folder's name still says the run). Another read error raises, and the attempt is retried: read as
    none, a transient one (an NFS ESTALE) had the run's checkpoints removed as a removal's leftovers."""
    try:
        return json.loads((folder / FINGERPRINT).read_text())
    except (FileNotFoundError, ValueError):
        return None


def read_full(folder: Path, identity: dict[str, Any], full: dict[str, Any]) -> dict[str, Any] | None:
    """`folder`'s fingerprint in the full form of this run's (`filled`); None when it has none."""
    saved = read_identity(folder)
    return None if saved is None else filled(saved, full, identity)


def filled(saved: dict[str, Any], full: dict[str, Any], sparse: dict[str, Any]) -> dict[str, Any]:
    """A saved fingerprint with this run's defaults (what `full` has and `sparse` leaves out) where it has no value, at
    any depth. One that leaves out its own defaults, or that an earlier version wrote with its defaults or before a
    field was added (at a default that keeps the old behaviour), then reads as this run's `full` when it is the
    same run, and `differences` names what changed in values."""
    out = dict(saved)
    for key, value in full.items():
        if key not in out:
            if key not in sparse:
                out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = filled(out[key], value, sparse.get(key, {}))
    return out


def earlier_choice(parent: Path, identity: dict[str, Any], key: str, full: dict[str, Any] | None = None,
                   same: Callable[[dict[str, Any]], bool] | None = None) -> Any:
    """`key`'s value in the fingerprint of an earlier attempt of the run `identity` describes (the same in all but
    `key`, compared in `full` as `run_folder` does, or as `same` says), the one with the most checkpoints; None when
    there is none."""
    full = identity if full is None else full
    earlier = [(len(complete(folder)), saved[key]) for folder in run_folders(parent)
               if (saved := read_full(folder, identity, full)) is not None and key in saved
               and (same(saved) if same else same_run(saved, full, key))]
    return max(earlier, key=lambda found: found[0])[1] if earlier else None


def earlier_base(parent: Path, identity: dict[str, Any], full: dict[str, Any]) -> dict[str, Any] | None:
    """The base (BASE) an earlier attempt of the job `identity` describes (`full` its full form, as `run_folder` takes
    them, but without the data, the pruned layers and the base, which are known only once the model is loaded) trained
    on: that of the folder of the job with the most checkpoints; None when there is none. Read before the model loads,
    so that its hub commits are loaded again (`uris.pin`). Of any world size: `chosen_folder` refuses a run on another
    number of processes by the rest of the fingerprint, its base too, which a branch's new head would change."""
    def job(fingerprint: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in fingerprint.items() if k not in ("data", "prunedLayers", BASE, "worldSize")}
        if isinstance(out.get("rearrange"), dict):  # counted where it picks the adapters' modules, found at load
            out["rearrange"] = {k: v for k, v in out["rearrange"].items() if k != "mergeOnExport"}
        return out

    return earlier_choice(parent, identity, BASE, full,
                          lambda saved: isinstance(saved[BASE], dict) and job(saved) == job(full))


def note_base(root: Path, base: dict[str, Any], world: World) -> None:
    """Record `base` in the run's fingerprint (a hub commit resolved after `run_folder` wrote it: a distillation
    teacher's, loaded after it), atomically; the next attempt reads it back (`earlier_base`)."""
    if world.main:
        saved = read_identity(root) or {}
        if saved.get(BASE) != base:
            text = json.dumps(saved | {BASE: base}, indent=2, sort_keys=True)
            replace_atomically(root, FINGERPRINT, lambda tmp: tmp.write_text(text))
    world.barrier()


SAMPLE, SAMPLES = 1 << 16, 16  # what files_identity reads of a large file: 16 pieces of 64 KiB, 1 MiB in all


def files_identity(path: Path) -> str | None:
    """A cheap identity of the model files at `path` (a folder's files, not its subfolders; or one weights file), to
    tell files replaced at the same uri: the hash of each one's name and size, and of its bytes where it is small
    (config.json, a tokenizer's files, a shard index) or of 16 pieces of 64 KiB spread over it from its first byte to
    its last (a safetensors header among them) where it is larger. A retrained or other model of the same shapes has
    the same names, sizes and config (a size alone misses it), and other bytes nearly everywhere; a hash of every
    byte would read many GB at each attempt's start. A change confined to a few small tensors may go unseen. None
    where `path` is not there (a teacher gone since)."""
    try:
        files = (sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()) if path.is_dir()
                 else [path] if path.is_file() else None)
    except OSError:
        return None
    if files is None:
        return None
    found = hashlib.sha256()
    for file in files:
        try:
            size = file.stat().st_size
            found.update(f"{file.name}\0{size}\0".encode())
            with file.open("rb") as f:
                if size <= SAMPLE * SAMPLES:
                    found.update(f.read())
                    continue
                for i in range(SAMPLES):
                    f.seek((size - SAMPLE) * i // (SAMPLES - 1))
                    found.update(f.read(SAMPLE))
        except OSError:  # a file the trainer may not read (another uid's, beside the model's): its name stands
            found.update(f"{file.name}\0unreadable\0".encode())
    return found.hexdigest()[:16]


def same_run(saved: dict[str, Any], identity: dict[str, Any], *but: str) -> bool:
    """Whether a saved fingerprint and `identity` agree in all but the keys `but`. One a trainer from before the data
    digest wrote (none in it) is taken as of this data: a job retried across the upgrade resumes, and its fingerprint
    gets the digest (`run_folder`). So is one from before the base's identity (BASE)."""
    ignored = {*but, *(key for key in ("data", BASE) if key not in saved)}
    return ({k: v for k, v in saved.items() if k not in ignored}
            == {k: v for k, v in identity.items() if k not in ignored})


def differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields whose values differ between two identities, as `section.field: saved -> now`."""
    found = []
    for key in sorted(saved.keys() | now.keys()):
        before, after = saved.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            found.append(f"{prefix}{key}: {shown(before)} -> {shown(after)}")
    return found


def shown(value: Any) -> str:
    """A fingerprint's value; none is the default (a sparse fingerprint leaves defaults out, `to_wire` unset ones)."""
    return "the default" if value is None else json.dumps(value)


def complete(root: Path) -> list[Path]:
    """Committed checkpoints, oldest first: a step's folder, or its old one set aside where a crash came between
    save's two renames (until `run_folder` puts it back, the folder of another fingerprint is judged by it too)."""
    if not root.is_dir():
        return []
    candidates = [*root.glob(f"{ASIDE}{PREFIX}*"), *root.glob(f"{PREFIX}*")]  # a step's own folder last: it wins
    found = {step_of(p): p for p in candidates if committed(p)}
    return [found[step] for step in sorted(found)]


def committed(checkpoint: Path) -> bool:
    """Its marker, and beside it what a resume reads: an earlier trainer's removal, deleting in place, could be cut
    short after the weights and before the marker, and every later attempt failed loading them."""
    return all((checkpoint / name).exists() for name in (MARKER, *CHECKPOINT_FILES))


def listed(root: Path, world: World) -> list[Path]:
    """`complete(root)` as rank 0 lists it, on every rank (`World.main_look`)."""
    return [root / name for name in world.main_look(lambda: [p.name for p in complete(root)])]


def finished(root: Path, total: int, world: World) -> bool:
    """Rank 0's `ended`, on every rank: ranks that differed (`listed`) loaded the teacher on some alone."""
    return world.main_look(ended, root, total)


def ended(root: Path, total: int) -> bool:
    """Whether the newest committed checkpoint ends the training: at step `total`, or stopped early (a loop that
    resumes it makes no step)."""
    found = complete(root)
    if not found:
        return False
    try:
        saved = json.loads((found[-1] / STATE).read_text())
    except ValueError:  # torn after its flush: the loop's `load` sets it aside and resumes the one before
        return False
    return saved["step"] >= total or saved.get("stopped_early", False)


def load(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
         world: World) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """Restore the newest committed checkpoint of `root` in place; returns the loop's saved position and, on rank 0
    alone (`train_loop`), the best weights if it kept them. None when there is none, or it was laid out for another
    model or optimizer (`misfits`): the run's checkpoints are then removed. One that a rank cannot read though
    committed (a file torn after its flush: a volume's fault, a copy cut short; a byte flipped, its pickle decoding to
    an error or to an object without what is restored; a pickle of code weights_only refuses, never run) is set
    aside, with a warning, and the one before it, which keepCheckpoints kept, is restored: every retry failed on it.
    Where the one before fails alike (`same_fault`), the reader is at fault, not the files: raised, every one kept.
    A read the volume failed (EIO), or the node (out of memory, a CUDA error), is raised: retried, the checkpoint
    kept (`damaged`). The ranks agree on each, in rank 0's list (`listed`); one a rank does not see fails the attempt
    (infrastructure: retried)."""
    before: Exception | None = None  # what the last one that could not be read raised here
    unread: list[Path] = []  # set aside once the reader's fault is ruled out (`same_fault`): a checkpoint was read
    for folder in reversed(listed(root, world)):
        rng_file, best_file = folder / f"rng-{world.rank}.pt", folder / BEST
        try:  # all of it read before anything is restored
            tensors = load_file(folder / TRAINED)
            saved = torch.load(folder / OPTIMIZER, map_location=world.device, weights_only=True)  # no pickled code
            # looked up here, where a damaged pickle that decoded without them is a damaged checkpoint: after, each
            # retry raised on it
            optimizer_state, scheduler_state, scaler_state = states(saved)
            found = misfits(model, tensors, optimizer, optimizer_state)
            state = json.loads((folder / STATE).read_text())
            # a run resumed on more ranks than it was saved with starts the new ranks' RNG afresh
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
            if not found:  # one another trainer laid out is discarded below, not tried
                takes(optimizer, optimizer_state, scheduler, scheduler_state, rng)
            best = load_file(best_file) if world.main and best_file.exists() else None
            torn = unseen = False
        except FileNotFoundError as exc:
            # Rank 0 listed it: a file gone from rank 0's own view since (deleted) is a torn checkpoint; from another
            # rank's, that rank's view of the volume may lag (a cached listing), which fails the attempt, not it.
            log.warning("cannot find %s, which rank 0 lists: %s", folder, exc)
            torn, unseen = world.main, not world.main
        except DAMAGED as exc:
            if not damaged(exc):
                raise
            if before is not None and same_fault(before, exc):
                raise RuntimeError(f"{folder} cannot be read, as the checkpoint after it could not, with the same "
                                   f"error ({type(exc).__name__}: {exc}): the same damage in two is unlikely, so it "
                                   "is taken for a fault of this trainer or its libraries, not of the files, and "
                                   "every checkpoint is kept") from exc
            before = exc
            log.warning("cannot read %s: %s", folder, exc)
            torn, unseen = True, False  # not the exception: its traceback holds what the reader had loaded
        if world.any(torn):
            tensors = saved = optimizer_state = best = None  # not held on the device while the one before is read
            unread.append(folder)
            continue
        set_all_aside(unread, world)
        if world.any(unseen):  # not torn: set aside, a good checkpoint's steps were lost to a view a moment old
            raise FileNotFoundError(f"{folder}, the newest checkpoint rank 0 lists, is not there for every rank (the "
                                    "volume's views differ, as an NFS client's cached listing does): a new attempt "
                                    "reads it again")
        if found:
            discard(folder, found, world)
            return None
        restore(model, tensors, folder)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        if scaler_state:  # else the loss scale would start again at 2**16 and skip steps it skipped before
            scaler.load_state_dict(scaler_state)
        if rng is not None:
            set_rng_state(rng)
        log.info("resumed from %s", folder)
        return state, best
    set_all_aside(unread, world)
    return None


def set_all_aside(unread: list[Path], world: World) -> None:
    """Set aside (rank 0) the checkpoints a rank could not read, newest first."""
    for folder in unread if world.main else ():
        aside = set_aside(folder)
        log.warning("not resuming %s, which cannot be read (the log of the rank that could not says why): %s; "
                    "resuming from the checkpoint before it, if any", folder,
                    f"moved to {aside}, where what can be read of it stays" if aside else
                    "removed (a later one is set aside already, or it could not be moved)")


def damaged(exc: Exception) -> bool:
    """Whether what reading a checkpoint raised (one of DAMAGED) says its bytes are damaged: not a read the volume
    failed (EIO, ESTALE), nor the node (out of memory, a CUDA error: torch's RuntimeErrors too), nor a SIGTERM a library
    wrapped, each raised again: retried, the checkpoint kept."""
    return not (failed_read(exc) or device_fault(exc) or any(isinstance(e, OURS) for e in chain_of(exc)))


def same_fault(before: Exception, exc: Exception) -> bool:
    """Whether two checkpoints failed to read alike where damage would read otherwise: a byte flipped in each raises
    of other keys or values, while a fault of the reader (an upgraded library, a bug of ours) raises the same in
    every one, and setting each aside in turn would leave none (`set_aside` keeps the newest). A file cut short reads
    the same in each (a copy of the folder cut short), and is set aside."""
    cut_short = (EOFError, SafetensorError, json.JSONDecodeError)
    return (type(before) is type(exc) and str(before) == str(exc) and not isinstance(exc, cut_short)
            and "PytorchStreamReader" not in str(exc))


def states(saved: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The optimizer's, the scheduler's and the loss scaler's states in what an optimizer file holds, the optimizer's
    with the keys its load_state_dict looks up; a KeyError (or a TypeError) where a damaged pickle decoded as another
    object (a byte of a key's name flipped)."""
    optimizer = saved["optimizer"]
    if missing := {"state", "param_groups"} - optimizer.keys():
        raise KeyError(f"the optimizer's state lacks {sorted(missing)}")
    return optimizer, saved["scheduler"], saved.get("scaler")


def takes(optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], scheduler: Any,
          scheduler_state: dict[str, Any], rng: dict[str, Any] | None) -> None:
    """Raise where the optimizer, the scheduler or the generators would not take a checkpoint's states: a damaged
    pickle can decode to states of other keys or sizes (a byte of "step" flipped, of a length), which load_state_dict
    or set_rng_state raised after the weights were restored, on every retry. Tried on copies of the optimizer and the
    scheduler (theirs stay; the scheduler's load pops from the dict it is given), and on the generators, put back
    after."""
    copy.copy(optimizer).load_state_dict(optimizer_state)
    copy.copy(scheduler).load_state_dict(dict(scheduler_state))
    if rng is not None:
        now = rng_state()
        try:
            set_rng_state(rng)
        finally:
            set_rng_state(now)


def misfits(model: nn.Module, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
            saved: dict[str, Any]) -> list[str]:
    """How a checkpoint's layout differs from what this trainer built for the same fingerprint: the names of what
    trains, and the parameters of each optimizer group. Another version of the trainer (the operator's image, after
    an upgrade) may lay out the same job otherwise: a head kept whole beside LoRA, a parameter in another group.
    Loading would fail for good (CheckpointMismatch) or on every retry (torch's ValueError), or pair the saved
    moments with other parameters."""
    found = []
    names = trained_names(model)
    if names != set(tensors):
        found.append(f"what trains: {sorted(names - set(tensors))[:3]} here, {sorted(set(tensors) - names)[:3]} saved")
    if (here := layout(optimizer.param_groups)) != (there := layout(saved["param_groups"])):
        found.append(f"the optimizer's groups: {len(here)} of {[len(g) for g in here]} parameters here, "
                     f"{len(there)} of {[len(g) for g in there]} saved")
    return found


def layout(groups: list[dict[str, Any]]) -> list[list[str] | list[int]]:
    """Each optimizer group's parameters: by name where it has them (adjust.param_groups names them), else counted."""
    return [g.get("param_names", list(range(len(g["params"])))) for g in groups]


def discard(folder: Path, found: list[str], world: World) -> None:
    """Remove the checkpoints of a run `folder` no longer fits (`misfits`), so that training starts afresh."""
    if world.main:
        log.warning("not resuming %s: a trainer that lays out this job otherwise (another version) wrote it; "
                    "training starts afresh from step 0. Differs: %s", folder, "; ".join(found))
    world.barrier()  # every rank has read it before rank 0 removes it
    if world.main:
        for old in complete(folder.parent):
            remove(old)
    world.barrier()


def restore(model: nn.Module, tensors: dict[str, torch.Tensor], source: object) -> None:
    """Copy `tensors` (as `trained_tensors` took them) into the model in place; they must be exactly what trains
    and every buffer, or the model would go on with a mix of restored and fresh weights."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unexpected, missing = set(tensors) - set(own), trained_names(model) - set(tensors)
    if unexpected or missing:
        raise CheckpointMismatch(f"{source}: does not fit the model (it lacks {sorted(missing)[:5]}, and has "
                                 f"{sorted(unexpected)[:5]} the model lacks); remove it or use another output.uri")
    # copy_ would broadcast a [1] into a [32], and fail on other shapes as a RuntimeError (exit 2, retried)
    if other := [f"{n}: {list(t.shape)} saved, {list(own[n].shape)} in the model"
                 for n, t in tensors.items() if t.shape != own[n].shape]:
        raise CheckpointMismatch(f"{source}: does not fit the model ({'; '.join(other[:5])}); remove it or use "
                                 "another output.uri")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def trained_names(model: nn.Module) -> set[str]:
    """The names `trained_tensors` takes."""
    return set(trained(model))
