"""Permanent failures stop a run at once; transient ones get Ray's retries (``scale.max_failures``).

A retry helps when a worker was killed or the network blinked. It cannot help when the run folder
cannot be written (permission denied, read-only filesystem, disk full) or when the config, the
data or the checkpoint to resume from is refused: each retry would restart the worker group, redo
the epochs since the last checkpoint and fail the same way. Ray Train V2 builds its failure policy
itself (``DefaultFailurePolicy`` retries every worker error), so :class:`StopOnPermanent`, a
controller callback, turns a retry of a permanent failure into a stop: it raises from the hook Ray
calls before executing a failure decision, and Ray ends the run with that error instead.
"""
from __future__ import annotations

import errno

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from rayrec.config import ConfigError
from rayrec.data.log import DataError
from rayrec.train.checkpoint import CheckpointError

# errors whose own message names the problem and the fix: raised to the user as they are
CLEAR = (ConfigError, DataError, CheckpointError)
PERMANENT_ERRNO = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only filesystem",
    errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a path component is a file",
    errno.EISDIR: "a folder where a file belongs",
}


class PermanentError(RuntimeError):
    """A failure no retry can fix: the message names the rank, the error and the fix."""


def permanent_reason(err: BaseException) -> str | None:
    """Why ``err`` is permanent, or None for a failure a retry may fix (a killed worker, a network
    error: pyarrow's S3 errors carry no errno, so they stay retryable)."""
    if isinstance(err, CLEAR):
        return type(err).__name__
    if isinstance(err, OSError) and err.errno in PERMANENT_ERRNO:
        return PERMANENT_ERRNO[err.errno]
    return None


def stop_error(err: BaseException, rank: int | None = None) -> BaseException:
    """The error to stop the run with: ``err`` itself when its message is the whole story, else a
    :class:`PermanentError` naming what failed where."""
    if isinstance(err, CLEAR):
        return err
    where = f"rank {rank}" if rank is not None else "the Ray Train controller"
    return PermanentError(
        f"training stopped without retrying: {where} failed with {type(err).__name__}: {err} "
        f"({permanent_reason(err)}; a retry would redo the epochs since the last checkpoint and fail the same "
        "way). Fix the run folder or storage (permissions, free space, a writable mount), then rerun with "
        "resume=true")


def unwrap(error: BaseException) -> BaseException | None:
    """The permanent failure inside Ray's ``WorkerGroupError`` / ``ControllerError``, else None."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, ControllerError):
        cause = error.controller_failure  # StopOnPermanent's error, or the controller's own write failing
        if isinstance(cause, (PermanentError,) + CLEAR):
            return cause
        return stop_error(cause) if permanent_reason(cause) else None
    if isinstance(error, WorkerGroupError):  # no retries were left (or scale.max_failures=0)
        for rank, err in sorted(error.worker_failures.items()):
            if permanent_reason(err):
                return stop_error(err, rank)
    return None


class StopOnPermanent(WorkerGroupCallback, ControllerCallback):
    """Ray Train callback (controller process): no retry after a permanent worker failure."""

    def __init__(self):
        self._stop: BaseException | None = None

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = worker_group_status.errors
        if errors:
            self._stop = next((stop_error(e, r) for r, e in sorted(errors.items()) if permanent_reason(e)), None)

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        stop, self._stop = self._stop, None
        if stop is not None and failure_decision.value == "RETRY":
            raise stop  # Ray wraps it in a ControllerError, which its failure policy never retries
