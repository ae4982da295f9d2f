"""Why a run stopped, as the operator must see it: the exit code and a reason word.

Exit codes are the contract with the operator (the README's trainer contract): 0 success; 1 a user error
that a retry cannot fix (bad config, data or model, a diverging loss), and nothing else;
143 this process got SIGTERM and stopped cleanly, its progress in a checkpoint (or none made
yet); anything else an infrastructure failure that a new attempt may get past.

A mistake of the user's is classified where it is detected, by raising a `UserError`; any
other exception, whatever library raised it, counts as infrastructure. Under torchrun the
container's exit code is torchrun's, which is 1 for any failed worker (a SIGKILL too), so the
termination message carries the trainer's own `exitCode` and `reason` (`exit_code_of`,
`reason_of`), and a missing message means the process died without a word: infrastructure.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_INFRASTRUCTURE = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class UserError(Exception):
    """The job cannot succeed as written; the message says what to change."""

    reason = "InvalidInput"
    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """Fields that validate one by one but cannot work together on this model (the message names them)."""

    reason = "InvalidConfig"


class DataError(UserError):
    reason = "InvalidDataset"


class ModelError(UserError):
    reason = "InvalidModel"


class FatalFinding(UserError):
    """The structure analysis found something that makes training pointless (e.g. NaN weights)."""

    reason = "FatalAnalysisFinding"


class LossNotFinite(UserError):
    """The loss became NaN or Inf; a retry with the same settings would diverge again."""

    reason = "LossNotFinite"


class CheckpointMismatch(UserError):
    """A checkpoint in the output folder does not fit the model: tensors of other shapes under the same fingerprint,
    which hashes the config, not what its URIs hold (the dataset changed at the same URI, its labels giving another
    head; a model of another width at the same URI), or it is damaged. One that another trainer version laid out
    otherwise (other names of what trains, other optimizer groups) is trained afresh."""

    reason = "CheckpointMismatch"


class Terminated(Exception):
    """SIGTERM arrived; what training had done is in a checkpoint and the run stops so that a later attempt resumes."""

    reason = "Terminated"
    exit_code = EXIT_TERMINATED


class NoSpaceLeft(Exception):
    """The output's volume is full: a new attempt gets past it once space is freed (it removes the torn files)."""

    reason = "NoSpaceLeft"
    exit_code = EXIT_INFRASTRUCTURE


class GPUsNotVisible(Exception):
    """The worker was granted GPUs and CUDA sees none (a driver or device plugin fault on its node): training on the
    CPU instead would take days, unsaid; a new attempt may land on a node whose GPUs work."""

    reason = "GPUsNotVisible"
    exit_code = EXIT_INFRASTRUCTURE


# The trainer's own exceptions, which carry their reason and exit code. Others may have attributes of those names
# (UnicodeDecodeError's reason is its text, URLError's an exception; click's errors have an exit_code): none is ours.
OURS = (UserError, Terminated, NoSpaceLeft, GPUsNotVisible)

# torch.save says only "unexpected pos ..." on a full disk; with less than this left, that is why its write failed.
FULL_BELOW_BYTES = 1 << 20
TORCH_SAVE_FAILED = ("unexpected pos", "inline_container")
# safetensors' error is no OSError: it carries the text of Rust's, which ends "(os error 28)" (122: a quota).
RUST_FULL = tuple(f"(os error {code})" for code in (errno.ENOSPC, errno.EDQUOT))


def chain_of(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from or while handling, all the way down."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


# A file the pod may not read (its mode): the data's owner's to fix, not a retry's.
UNREADABLE = {errno.EACCES, errno.EPERM}
# A file that is not there either (or a name too long for one, or a loop of links): the spec's to fix.
NOT_THERE_OR_REFUSED = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP} | UNREADABLE


def unreadable(exc: PermissionError) -> str:
    return f"the trainer may not read {exc.filename or 'it'} ({exc.strerror}): make it readable by the trainer's user"


# What a library's error of no errno says when the node failed, not the file: pyarrow's "Memory mapping file failed:
# Cannot allocate memory" (ENOMEM, ENODEV, vm.max_map_count), a codec's "Allocation error: not enough memory",
# libavif's "Out of memory" (Pillow's RuntimeError), and the OS's own text of an errno it carries as words only.
# Left out: errnos whose text a damaged file's error may say in its own words ("Invalid argument", "Bad message"),
# and a missing or refused file's (NOT_THERE_OR_REFUSED), the user's to fix: a loader's words of one, such as
# "No such file or directory", are no fault of the node's.
NOT_THE_FILES = ("Memory mapping file failed", "Allocation error", "out of memory", "Out of memory",
                 "No codec available", "Can't allocate decoder") + tuple(
    os.strerror(code) for code in errno.errorcode
    if code not in {errno.EINVAL, errno.EBADMSG, errno.EILSEQ, errno.ERANGE, errno.EDOM, errno.EOVERFLOW,
                    errno.EPROTO} | NOT_THERE_OR_REFUSED and not os.strerror(code).startswith("Unknown error"))


def says_not_the_files(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, says a fault of the node or the volume (NOT_THE_FILES)."""
    return any(cause in str(e) for e in chain_of(exc) for cause in NOT_THE_FILES)


def damaged_file(exc: OSError) -> bool:
    """Whether a reader's OSError says the file it read is damaged, the data's fault (exit 1): pyarrow raises a
    damaged file's thrift, page, codec or flatbuffers data with no errno ("Couldn't deserialize thrift", "Invalid
    flatbuffers message"). One with an errno (EIO, ESTALE), or of no errno but saying an OS fault (NOT_THE_FILES:
    an mmap or an allocation that failed), is the node's or the volume's: infrastructure, retried."""
    return exc.errno is None and not says_not_the_files(exc)


def failed_read(exc: BaseException) -> bool:
    """Whether a read failed in the volume (EIO, a stale NFS handle, a timeout): an OSError in the chain with an
    errno that is none of a missing or refused file, or of no errno saying an OS fault (NOT_THE_FILES), or Rust's
    text of one from safetensors. Infrastructure, to be retried, however a loader wrapped it."""
    chain = chain_of(exc)
    if any(isinstance(e, OSError) and e.errno is not None and e.errno not in NOT_THERE_OR_REFUSED for e in chain):
        return True
    if any(isinstance(e, OSError) and e.errno is None and says_not_the_files(e) for e in chain):
        return True
    return any("(os error " in str(e) and not any(f"(os error {code})" in str(e) for code in NOT_THERE_OR_REFUSED)
               for e in chain)


def device_fault(exc: BaseException) -> bool:
    """Whether torch's error says the node failed, not what it read: out of memory (the host's or the GPU's), a CUDA
    error. Torch raises them as RuntimeErrors, as it does a damaged file's."""
    import torch

    return says_not_the_files(exc) or any(
        isinstance(e, (torch.OutOfMemoryError, torch.AcceleratorError)) or "CUDA error" in str(e)
        for e in chain_of(exc))


def out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a write into `folder` failed for want of space (a quota too), whatever library wrote."""
    chain = chain_of(exc)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    if any(code in str(e) for e in chain for code in RUST_FULL):
        return True
    if not any(isinstance(e, RuntimeError) and any(t in str(e) for t in TORCH_SAVE_FAILED) for e in chain):
        return False  # any other failure is what it says, however little space is left
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def no_space_in(folder: Path, exc: BaseException, what: str = "") -> NoSpaceLeft | None:
    """The error to raise in place of `exc` when it failed to write (`what`) into `folder` for want of space; None
    when it failed otherwise, or was classified where it was raised (a NoSpaceLeft saying more, a user error)."""
    if isinstance(exc, OURS) or not out_of_space(exc, folder):
        return None
    return NoSpaceLeft(f"no space left in {folder}{f' for {what}' if what else ''}: free space on the output volume "
                       "(output.uri) or give it more")


DISTRIBUTED_FAILURE = "DistributedFailure"  # the reason of a rank whose peer died: the peer's is the cause
# Gloo (CPU jobs) raises a lost peer or a timeout as a plain RuntimeError, no DistError, at any collective and in DDP's
# backward. Its transport's errors name their source file ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by
# peer", ".../unbound_buffer.cc:78] Timed out waiting 1000ms for recv"); a pair a timeout closed says only that.
GLOO_TRANSPORT = ("gloo/transport/", "Application timeout caused pair closure")


def exit_code_of(exc: BaseException) -> int:
    """The exit code the trainer gives for what stopped it."""
    return exc.exit_code if isinstance(exc, OURS) else EXIT_INFRASTRUCTURE


def reason_of(exc: BaseException) -> str:
    """The CamelCase reason of the termination message; the exception's type goes into the message instead."""
    if isinstance(exc, OURS):
        return exc.reason
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "OutOfMemory"
    if peer_lost(exc):
        return DISTRIBUTED_FAILURE
    return "InfrastructureFailure"


def peer_lost(exc: BaseException) -> bool:
    """Whether a collective raised `exc` because a peer died, or the network failed or timed out: a DistError (nccl,
    the store), or gloo's transport's RuntimeError (`GLOO_TRANSPORT`) in a group of several ranks."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return (isinstance(exc, RuntimeError) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1 and any(text in str(exc) for text in GLOO_TRANSPORT))


def describe(exc: BaseException) -> str:
    """The termination message's text: a user error's own words; otherwise the type too, for whoever debugs it."""
    if isinstance(exc, OURS):
        return str(exc) or exc.reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
