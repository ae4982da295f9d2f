"""Why a run stopped, as the operator must see it: the exit code and a reason word.

Exit codes are the contract with the operator (DESIGN §4): 0 success; 1 a user error
that a retry cannot fix (bad config, data or model, a diverging loss); 143 a checkpoint
was saved on SIGTERM (the attempt may be resumed); anything else an infrastructure
failure that a new attempt may get past.

Under torchrun the container's exit code is torchrun's, which is 1 for any failed worker, so
the termination message carries the trainer's own `exitCode` as well (`exit_code_of`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_INFRASTRUCTURE = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class UserError(Exception):
    """The job cannot succeed as written; the message says what to change."""

    reason = "InvalidInput"
    exit_code = EXIT_USER_ERROR


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


class Terminated(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run stops so that a later attempt resumes."""

    reason = "Terminated"
    exit_code = EXIT_TERMINATED


def exit_code_of(exc: BaseException) -> int:
    """The exit code the trainer gives for what stopped it."""
    return getattr(exc, "exit_code", EXIT_INFRASTRUCTURE)
