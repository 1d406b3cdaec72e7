"""Rank-0 TensorBoard logging with a step axis that continues across a resume."""
from __future__ import annotations

import math
import numbers
from pathlib import Path


def check_scalars(metrics: dict) -> dict[str, float]:
    """Metrics as plain numbers; anything else (a tensor, a list, a string) raises here, at report
    time, instead of vanishing from TensorBoard or breaking a Tune scheduler later."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            hint = " (call .item() on a 0-d tensor)" if hasattr(v, "item") else ""
            raise TypeError(f"metric {k!r} is {type(v).__name__}, not a scalar; report numbers only{hint}")
        out[k] = v if isinstance(v, (int, float)) else float(v)
    return out


class TBLogger:
    def __init__(self, logdir: str | Path | None, start_step: int = 0):
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps
            self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, metrics: dict[str, float], step: int, prefix: str = "") -> None:
        metrics = check_scalars(metrics)  # on every rank, not only where a writer exists
        if self.writer is None:
            return
        for k, v in metrics.items():
            if math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        """Called before each checkpoint: events up to a checkpoint survive a SIGKILL (the writer
        otherwise buffers up to two minutes), and a resume purges only what came after it."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
