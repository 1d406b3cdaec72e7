"""AdaRound (Nagel et al., ICML 2020): learn whether each weight rounds up or down.

    w_tilde = s * clip(floor(w / s) + h(V), Q_N, Q_P),   h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (rectified sigmoid) and V initialised so h(V) = w/s - floor(w/s).
The regulariser ``f_reg = sum 1 - |2 h(V) - 1|^beta`` (here a mean, times ``adaround_reg``) pushes
h to 0 or 1 while beta anneals from 20 to 2 after a warm start without it. In eval mode the
rounding is hard (h = [V >= 0]). During QAT the weights train too (floor is straight-through);
``adaround_ptq`` (rayrec/quant/ptq.py) runs the paper's post-training, layer-by-layer pass.
Activations are quantized with the STE min/max quantizer.
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.quant.base import Quantizer, exact_grid, floor_ste

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRound(Quantizer):
    is_weight = True

    def __init__(self, bits: int, per_channel: bool, shape: tuple[int, int], reg: float = 0.01,
                 beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, steps: int = 2000):
        super().__init__(bits, True, per_channel)
        self.reg, self.beta_range, self.warmup, self.steps = reg, beta, warmup, steps
        self.V = nn.Parameter(torch.zeros(shape))
        self.register_buffer("s", torch.ones(shape[0], 1) if per_channel else torch.ones(()))
        self.t: int | None = None  # PTQ sets its own iteration (and self.steps); QAT reads the control's step

    def init_from(self, w: torch.Tensor) -> None:
        amax = w.abs().amax(dim=1, keepdim=True) if self.per_channel else w.abs().max()
        self.s.copy_((amax / self.qp).clamp(min=1e-8))
        rest = (w / self.s - torch.floor(w / self.s)).clamp(0.01, 0.99)  # h(V) = rest; finite V
        self.V.data.copy_(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V) if self.training else (self.V >= 0).to(self.V.dtype)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self.s * torch.clamp(floor_ste(w / self.s) + self.h(), self.qn, self.qp)

    def beta(self) -> float | None:
        """None during the warm start; then linear from beta_start to beta_end."""
        t = self.t if self.t is not None else (self.ctrl[0].steps_on() if self.ctrl else 0)
        start = self.warmup * self.steps
        if t < start:
            return None
        rel = min(1.0, (t - start) / max(1.0, self.steps - start))
        b0, b1 = self.beta_range
        return b1 + (b0 - b1) * (1 - rel)

    def round_loss(self, beta: float) -> torch.Tensor:
        """The paper's f_reg: sum of 1 - |2 h(V) - 1|^beta (0 once every h is 0 or 1)."""
        return (1 - (2 * rectified_sigmoid(self.V) - 1).abs().pow(beta)).sum()

    def penalty(self):
        if not (self.reg and self.enabled() and bool(self.initialized)):
            return 0.0
        b = self.beta()
        # a mean, so the weight of the term next to the recommender's mean loss does not grow with layer size
        return 0.0 if b is None else self.reg * self.round_loss(b) / self.V.numel()

    def int_weight(self, w):
        return exact_grid(self.quantize(w).detach(), self.s)
