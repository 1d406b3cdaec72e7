"""Checks a run must pass before it costs anything: a writable run folder (before Ray starts) and
a built dataset with something to train on and someone to evaluate (before the trainer starts).

A run that fails them would otherwise train zero steps, average metrics over nobody, or die with
a traceback after Ray has started; each refusal names the counts and the fix."""
from __future__ import annotations

import errno
import uuid
from pathlib import Path

from rayrec.config import Config, ConfigError
from rayrec.data.log import DataError


def check_output_dir(cfg: Config) -> None:
    """``output_dir`` must be (or become) a folder this process can write: tried by creating it and
    writing a probe file, since permission bits alone say nothing for root or a read-only mount."""
    out = Path(cfg.output_dir).expanduser().absolute()
    for p in (out, *out.parents):  # the nearest existing ancestor must be a folder
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"output_dir={cfg.output_dir!r} cannot be created: {p} exists and is not a folder; "
                                  "choose another output_dir=...")
            break
    probe = out / f".rayrec-write-probe-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        reason = {errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on the device",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not writable ({reason}: {e.filename or out}); "
                          "choose a writable output_dir=... (runs, checkpoints and TensorBoard files go there)") from None


def check_trainable(cfg: Config, meta: dict) -> None:
    """The built sequences hold training pairs and validation and test users (after
    ``eval.repeat_targets=drop`` leaves out the users whose target they already have)."""
    split = meta.get("split", {})
    users = int(meta.get("users_out", 0))
    trainable = users - int(split.get("no_training_pair_users", 0))
    how = ("leave-last-two-out needs users with >= 3 events (>= 1 training pair, 1 validation, 1 test)"
           if cfg.data.split == "leave_last_two" else
           f"the time split holds out events after the cut (data.time_quantile={cfg.data.time_quantile})")
    where = f"data.log={cfg.data.log!r}: {users} user(s) and {meta.get('rows_out', 0)} event(s) after the filters"
    if trainable <= 0:
        raise DataError(f"{where}, and no user has two training events, so there is nothing to train on. "
                        f"{how}; use a log with longer histories or lower data.min_user_interactions")
    for stage in ("val", "test"):
        n = int(split.get(f"{stage}_users", 0))
        repeats = int(split.get(f"{stage}_repeat_targets", 0)) if cfg.eval.repeat_targets == "drop" else 0
        if n - repeats <= 0:
            extra = (f" ({repeats} of {n} have a target already in their history and eval.repeat_targets=drop leaves "
                     "them out; eval.repeat_targets=miss or rank keeps them)") if repeats else ""
            raise DataError(f"{where}, but no {'validation' if stage == 'val' else 'test'} user to evaluate{extra}, "
                            f"so every metric would be an average over nobody. {how}")
