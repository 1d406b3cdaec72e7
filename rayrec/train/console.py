"""The one line per epoch that a run prints (rank 0): the same in a terminal, in a redirected file
and in ``ray job logs``. Ray's own per-report and per-checkpoint lines are off unless
RAYREC_VERBOSE=1 (rayrec/ray_env.py)."""
from __future__ import annotations

import math
import time


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochClock:
    """Time left at the mean pace (training, validation and checkpoints) of the epochs this call ran.
    An upper bound when early stopping (train.patience) may end the run sooner."""

    def __init__(self, first_epoch: int, epochs: int):
        self.t0, self.first_epoch, self.epochs = time.perf_counter(), first_epoch, epochs

    def eta_s(self, done: int) -> float:
        ran = done - self.first_epoch
        return (time.perf_counter() - self.t0) / ran * (self.epochs - done) if ran > 0 else math.nan


def epoch_line(metrics: dict, epochs: int, metric: str, eta_s: float) -> str:
    """``epoch 3/30  loss 1.2664  521 seq/s  val_ndcg_10 0.0705  eta 6m12s``; the validation metric
    only for an epoch that was evaluated (train.eval_every)."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}", f"loss {metrics['train_loss']:.4f}",
             f"{metrics['seq_per_s']:.0f} seq/s"]
    if metric in metrics:
        parts.append(f"{metric} {metrics[metric]:.4f}")
    parts.append(f"eta {duration(eta_s)}")
    return "  ".join(parts)
