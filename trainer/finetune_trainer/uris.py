"""Turn the URIs of a FineTuneJob (pvc://, hf://, file://, absolute paths) into local paths.

`pvc://<claim>/<path>` is `$FINETUNE_PVC_ROOT/<claim>/<path>`. In a pod the operator
mounts each claim at /mnt/pvc/<claim> and sets FINETUNE_PVC_ROOT=/mnt/pvc. Without the
variable the root is the nearest `.data/pvc` folder in the working directory or above
it, which `make assets` fills in a checkout, so `finetune-trainer run` works from any
folder of the repository.

Within `pinned` (a run), a hub model repo asked for at a branch (model.revision unset: the default branch) is fetched
at one commit: the one an earlier attempt of the run resolved it to (`pin`), else the one its first fetch in this
attempt resolved; `current_pins` are what the run's checkpoint folder records. A retry after an upstream push loads
the base its checkpoints (which hold only what trains) and kept baseline were made on, not the branch's new head.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from finetune_trainer.errors import UserError, unreadable

PVC_ROOT_ENV = "FINETUNE_PVC_ROOT"
LOCAL_PVC_ROOT = Path(".data") / "pvc"

log = logging.getLogger(__name__)

# The commits hub model repos are pinned at within a run (`pinned`), by `pin_key`; None outside one.
PINS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("finetune_hub_pins", default=None)
COMMIT = re.compile(r"[0-9a-f]{40}")


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """A run's scope for hub pins: within it, `fetch` takes a hub model repo asked for at a branch at the commit it is
    pinned at (`pin`), and pins it at the commit its first fetch resolved where it has none (`current_pins`)."""
    token = PINS.set({})
    try:
        yield
    finally:
        PINS.reset(token)


def pin(earlier: dict[str, str]) -> None:
    """Pin the run's hub model repos at the commits an earlier attempt of it resolved (`current_pins` of that
    attempt); each is logged. Nothing outside `pinned`."""
    pins = PINS.get()
    if pins is None:
        return
    for key, commit in earlier.items():
        log.info("%s: at commit %s, which an earlier attempt of this run resolved it to (its checkpoints and kept "
                 "scores were made on it; the branch may have moved on since)", key, commit)
    pins.update(earlier)


def current_pins() -> dict[str, str]:
    """The run's pins so far (a copy); none outside `pinned`."""
    return dict(PINS.get() or {})


def pin_key(repo_id: str, revision: str | None) -> str:
    """How a pin names a repo at a branch: hf://<org>/<name>, with @<branch> where model.revision names one."""
    return f"hf://{repo_id}" + (f"@{revision}" if revision else "")


def pvc_root() -> Path:
    if root := os.environ.get(PVC_ROOT_ENV):
        return Path(root)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / LOCAL_PVC_ROOT).is_dir():
            return folder / LOCAL_PVC_ROOT
    raise UserError(
        f"pvc:// URIs need a root: set {PVC_ROOT_ENV}, or run `make assets` in the repository "
        f"(it fills {LOCAL_PVC_ROOT}) and start from inside it"
    )


def local_path(uri: str) -> Path:
    """Where a pvc://, file:// or absolute URI lives on this machine (it may not exist yet)."""
    if uri.startswith("pvc://"):
        return pvc_root() / uri.removeprefix("pvc://")
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("/"):
        return Path(uri)
    raise UserError(f"{uri}: not a local URI (expected pvc://, file:// or an absolute path)")


def fetch(uri: str, *, kind: str, revision: str | None = None, repo_type: str = "model",
          error: type[UserError] = UserError) -> Path:
    """A local folder or file holding what `uri` names; hf:// is downloaded into the hub cache (only the folder
    named after <org>/<name>, when one is).

    `kind` names it in messages: the config field where the caller knows it (dataset.uri). `error` is the UserError
    subclass raised when it is not there (its reason tells data from model).

    hf:// goes through huggingface_hub's cache, so HF_HOME, HF_HUB_OFFLINE and a cache
    prepared ahead of time (an air-gapped cluster) work as they do for transformers.
    """
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        repo_id, folder = hub_parts(uri, repo_type)
        # A model repo at a branch, within a run: at the commit the run first resolved it to (a commit is fixed; a
        # dataset's changes are the data digest's to catch)
        pins = PINS.get() if repo_type == "model" and not COMMIT.fullmatch(revision or "") else None
        key = pin_key(repo_id, revision)
        at = pins.get(key) if pins is not None else None
        # The hub's progress bars are off in a pod: without a line, a download of several GB looks like a hang.
        log.info("%s %s: fetching revision %s from the hub, or its cache (HF_HOME)", kind, uri,
                 f"{at} (the commit {revision or 'main'} was at when this run first loaded it)" if at else
                 revision or "main")
        started = time.monotonic()
        try:
            snapshot = Path(snapshot_download(repo_id, revision=at or revision, repo_type=repo_type,
                                              allow_patterns=f"{folder}/**" if folder else None))
        except HFValidationError as exc:  # refused before any request: a '..' or '--' inside a name, a leading '.'
            raise error(f"{kind} {uri}: not a name the hub takes ({exc})") from exc
        except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
            if isinstance(exc, LocalEntryNotFoundError) and hub_unreachable(exc):
                raise  # as other hub errors: a later attempt may get past it
            gone = (f" at commit {at}, which an earlier attempt of this run loaded (remove the output's checkpoints "
                    "folder to start afresh at the branch's head)") if at else ""
            raise error(f"{kind} {uri}: not on the hub nor in the local cache{gone} ({exc})") from exc
        if not (snapshot / folder).is_dir():
            raise error(f"{kind} {uri}: {repo_id} has no folder {folder!r}")
        if pins is not None and at is None and snapshot.parent.name == "snapshots":
            pins[key] = snapshot.name  # the cache's snapshots/<commit>
        log.info("%s %s: at %s after %.1f s", kind, uri, snapshot / folder, time.monotonic() - started)
        return snapshot / folder
    path = local_path(uri)
    try:
        if not path.exists():
            raise error(f"{kind} {uri}: {path} does not exist")
    except PermissionError as exc:  # a folder on the way that the trainer's user may not enter: the owner's to fix
        raise error(f"{kind} {uri}: {unreadable(exc)}") from exc
    return path


def hub_parts(uri: str, repo_type: str = "model") -> tuple[str, str]:
    """hf://<org>/<name>/<folder in the repo>: the repo id and the folder ('' for the whole repo). A dataset's may be
    written hf://datasets/<org>/<name>, as huggingface_hub's HfFileSystem, pandas and duckdb write it: its repo id
    was read as datasets/<org>, "not on the hub"."""
    parts = uri.removeprefix("hf://").split("/")
    if repo_type == "dataset" and parts[0] == "datasets" and len(parts) > 2:
        parts = parts[1:]
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_unreachable(exc: BaseException) -> bool:
    """Whether huggingface_hub's cache miss stands for a hub it could not reach (no connection, a timeout, a 5xx:
    the cause it attaches), not for a repository absent with HF_HUB_OFFLINE set."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    return exc.__cause__ is not None and not isinstance(exc.__cause__, OfflineModeIsEnabled)
