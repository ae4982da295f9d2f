"""Turn the URIs of a FineTuneJob (pvc://, hf://, file://, absolute paths) into local paths.

`pvc://<claim>/<path>` is `$FINETUNE_PVC_ROOT/<claim>/<path>`. In a pod the operator
mounts each claim at /mnt/pvc/<claim> and sets FINETUNE_PVC_ROOT=/mnt/pvc. Without the
variable the root is the nearest `.data/pvc` folder in the working directory or above
it, which `make assets` fills in a checkout, so `finetune-trainer run` works from any
folder of the repository.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from finetune_trainer.errors import UserError, unreadable

PVC_ROOT_ENV = "FINETUNE_PVC_ROOT"
LOCAL_PVC_ROOT = Path(".data") / "pvc"

log = logging.getLogger(__name__)


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
        # The hub's progress bars are off in a pod: without a line, a download of several GB looks like a hang.
        log.info("%s %s: fetching revision %s from the hub, or its cache (HF_HOME)", kind, uri, revision or "main")
        started = time.monotonic()
        try:
            snapshot = Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type,
                                              allow_patterns=f"{folder}/**" if folder else None))
        except HFValidationError as exc:  # refused before any request: a '..' or '--' inside a name, a leading '.'
            raise error(f"{kind} {uri}: not a name the hub takes ({exc})") from exc
        except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
            if isinstance(exc, LocalEntryNotFoundError) and hub_unreachable(exc):
                raise  # as other hub errors: a later attempt may get past it
            raise error(f"{kind} {uri}: not on the hub nor in the local cache ({exc})") from exc
        if not (snapshot / folder).is_dir():
            raise error(f"{kind} {uri}: {repo_id} has no folder {folder!r}")
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
