"""What every quantizer shares: straight-through helpers, integer ranges, lazy data-driven
initialisation that is identical on every DDP rank, and the hooks ``convert`` reads.

A quantizer is an ``nn.Module`` mapping a float tensor to its fake-quantized value. Its learnable
parameters exist from construction (``prepare`` runs before the optimizer is built); only their
*values* are set from the first tensor it sees while enabled, then averaged over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, g * grad backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) as signed integers: [-2^(b-1), 2^(b-1) - 1] or [0, 2^b - 1]."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def sync_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average an initial value over DDP ranks: ranks see different first batches, and DDP only
    broadcasts parameters when it wraps the model, so unsynchronised inits would diverge."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


@dataclass
class ActQParams:
    """uint8 activation grid that reproduces a fake quantizer: q = clamp(round(clamp(x, lo, hi) / scale) + zp)."""

    scale: float
    zero_point: int
    lo: float
    hi: float


class QuantControl(nn.Module):
    """The step counter every quantizer of a model reads (one per model, saved in checkpoints):
    fake quantization is on from ``start_step`` training steps, unless switched off for a float
    comparison."""

    def __init__(self, start_step: int):
        super().__init__()
        self.start_step = start_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.force_off = False

    def enabled(self) -> bool:
        return not self.force_off and int(self.step) >= self.start_step

    def steps_on(self) -> int:
        return int(self.step) - self.start_step


class Quantizer(nn.Module):
    """Base: ``forward`` fakes quantization when the control says so, after a one-off init."""

    is_weight = False

    def __init__(self, bits: int, signed: bool = True, per_channel: bool = False):
        super().__init__()
        self.bits, self.signed, self.per_channel = bits, signed, per_channel
        self.qn, self.qp = int_range(bits, signed)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.ctrl: list[QuantControl] = []  # a list, so the shared control is not registered twice

    def attach(self, ctrl: QuantControl) -> "Quantizer":
        self.ctrl = [ctrl]
        return self

    def enabled(self) -> bool:
        return not self.ctrl or self.ctrl[0].enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled():
            return x
        if not bool(self.initialized):
            with torch.no_grad():
                self.init_from(x.detach())
                for p in self.parameters():
                    sync_mean_(p.data)
            self.initialized.fill_(True)
        return self.quantize(x)

    # --- what a method defines -------------------------------------------------------------
    def init_from(self, x: torch.Tensor) -> None:
        """Set learnable values from the first tensor (data-driven initialisation)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | float:
        """Term added to the training loss (PACT's L2 on alpha, AdaRound's rounding regulariser)."""
        return 0.0

    # --- what convert reads ----------------------------------------------------------------
    def act_qparams(self) -> ActQParams:
        """Activations: the uint8 grid equal to this quantizer (exact for uniform grids)."""
        raise NotImplementedError(f"{type(self).__name__} has no uniform activation grid")

    def int_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Weights: (int8 (out, in), scale (out,)) equal to ``quantize(w)``, or None when the
        levels are not a uniform integer grid (convert then re-quantizes the fake-quant weight)."""
        return None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={self.per_channel}"


def symmetric_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of a float matrix: (q (out, in) int8, scale (out,))."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def exact_grid(wq: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8, per-row scale) of a fake-quant weight known to be ``scale * integer``."""
    scale = scale.reshape(-1)
    scale = scale.expand(wq.shape[0]) if scale.numel() == 1 else scale
    return torch.round(wq / scale[:, None]).clamp(-128, 127).to(torch.int8), scale.clone()
