"""Test-only fault injection, and naming the stalled rank when a collective times out.

Fault injection (for tests and drills, never set in production): the driver's environment variable

    RAYREC_FAULT="rank=1,epoch=2,kind=exit"      kind: raise | exit | hang

makes rank 1 raise :class:`InjectedFault`, hard-exit (``os._exit(17)``, like an OOM kill) or stall
forever just before its first training step of epoch 2 (1-based, as in the logs). Several faults
separated by ``;`` (``"rank=1,epoch=2,kind=raise;rank=0,epoch=3,kind=exit"``) fire one after the
other, so one run can drill a sequence of failures and restarts. ``fit`` forwards
the variable to the workers in the loop config, so it works on any cluster. A fault fires once per
run folder (a ``.rayrec_fault_*`` marker file there), so a restarted worker trains on: that is what
lets a test compare a faulted run with a clean one.

Collective timeouts: gloo reports only "Timed out waiting ... for recv", not which peer is missing.
Every rank records its (epoch, step) in the process group's key-value store before each step; when
a collective times out, the error names the ranks that fell behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rayrec.train")

ENV = "RAYREC_FAULT"
KINDS = ("raise", "exit", "hang")


class InjectedFault(RuntimeError):
    """Raised by a ``kind=raise`` fault."""


class CollectiveTimeout(RuntimeError):
    """A collective timed out: the message names this rank and the ranks that stalled."""


@dataclass(frozen=True)
class Fault:
    rank: int
    epoch: int  # 1-based
    kind: str

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        try:
            kv = dict(part.split("=", 1) for part in spec.replace(" ", "").split(",") if part)
            fault = cls(rank=int(kv.pop("rank")), epoch=int(kv.pop("epoch")), kind=kv.pop("kind", "raise"))
        except (KeyError, ValueError):
            raise ValueError(f"{ENV}={spec!r}: expected rank=R,epoch=E,kind={'|'.join(KINDS)}") from None
        if kv or fault.kind not in KINDS or fault.epoch < 1 or fault.rank < 0:
            raise ValueError(f"{ENV}={spec!r}: expected rank=R,epoch=E (>= 1),kind={'|'.join(KINDS)}; unknown: {sorted(kv)}")
        return fault

    def __str__(self) -> str:
        return f"rank={self.rank},epoch={self.epoch},kind={self.kind}"


def parse_all(spec: str) -> list[Fault]:
    """The faults of a ``;``-separated spec."""
    faults = [Fault.parse(part) for part in spec.split(";") if part.strip()]
    if not faults:
        raise ValueError(f"{ENV}={spec!r}: expected rank=R,epoch=E,kind={'|'.join(KINDS)}[;...]")
    return faults


def from_env() -> str | None:
    """The driver's fault spec (validated), to forward to the workers."""
    spec = os.environ.get(ENV) or None
    if spec:
        parse_all(spec)
    return spec


def maybe_inject(spec: str | None, rank: int, epoch: int, run_dir: Path) -> None:
    """Fire a fault if one is for this rank and (1-based) epoch and has not fired in this run folder."""
    if not spec:
        return
    for fault in parse_all(spec):
        if fault.rank == rank and fault.epoch == epoch:
            _fire(fault, rank, epoch, run_dir)


def _fire(fault: Fault, rank: int, epoch: int, run_dir: Path) -> None:
    marker = Path(run_dir) / f".rayrec_fault_{hashlib.sha256(str(fault).encode()).hexdigest()[:12]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # fired before this restart
    log.warning("%s: injecting %s on rank %d at epoch %d", ENV, fault.kind, rank, epoch)
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault ({ENV}={fault}) on rank {rank} at epoch {epoch}")
    if fault.kind == "exit":
        # a crash a moment after the last report, not in the same instant: Ray's health-check poll can
        # drop a report whose worker dies within ~2 s of it (RAY_NOTES.md), which is a different test
        time.sleep(3)
        os._exit(17)
    while True:  # hang: stall before the next collective until the run is torn down
        time.sleep(60)


class Progress:
    """Per-rank (epoch, step) in the c10d store, read back to explain a collective timeout."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.store = rank, world, None
        if world > 1:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.store = _get_default_store()
            except Exception:  # noqa: BLE001 - only the explanation is lost, never the run
                self.store = None

    def _key(self, rank: int) -> str:
        return f"rayrec/progress/{rank}"

    def mark(self, epoch: int, step: int) -> None:
        if self.store is not None:
            self.store.set(self._key(self.rank), f"{epoch}:{step}")

    def behind(self) -> dict[int, tuple[int, int] | None]:
        """Ranks behind the furthest one, with their last (epoch, step); None = never started."""
        if self.store is None:
            return {}
        seen: dict[int, tuple[int, int] | None] = {}
        for r in range(self.world):
            try:
                if self.store.check([self._key(r)]):
                    e, s = self.store.get(self._key(r)).decode().split(":")
                    seen[r] = (int(e), int(s))
                else:
                    seen[r] = None
            except Exception:  # noqa: BLE001 - the store may be gone with a dead rank 0
                return {}
        furthest = max((v for v in seen.values() if v is not None), default=None)
        return {r: v for r, v in seen.items() if v is None or (furthest is not None and v < furthest)}

    def explain(self, err: BaseException, timeout_s: float) -> CollectiveTimeout | None:
        """A named error if ``err`` is a collective timeout, else None."""
        text = str(err).lower()
        if self.world < 2 or not ("timed out" in text or "timeout" in text):
            return None
        behind = self.behind()
        where = ", ".join(f"rank {r} " + (f"last at epoch {v[0] + 1} step {v[1]}" if v else "never started")
                          for r, v in sorted(behind.items())) or "unknown ranks (progress store unreachable)"
        return CollectiveTimeout(
            f"rank {self.rank}: a collective timed out after {timeout_s:g} s (scale.timeout_s) waiting for the other "
            f"ranks; stalled: {where}. Check that rank's log for a hang (data, I/O, a deadlock); raise "
            f"scale.timeout_s only if a step legitimately takes longer. Original error: {err}")
