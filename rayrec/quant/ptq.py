"""AdaRound as a post-training pass (Nagel et al., 2020, section 4): for each quantized Linear of a
trained model, learn the rounding V that best reconstructs the layer's float output on
calibration inputs, ``min_V ||W x - W_tilde(V) x||^2 + lambda f_reg(V)``, beta annealed 20 → 2
after a 20% warm start, then round hard. Weights and biases do not change. The reconstruction
error is divided by round-to-nearest's and f_reg is a mean, so one lambda fits every layer.

Inputs are those of the float model (the paper's basic form, not the asymmetric variant that
feeds each layer the quantized model's inputs). Activation ranges (min/max) are calibrated on
the same inputs.
"""
from __future__ import annotations

from typing import Iterable

import torch

from rayrec.quant.adaround import AdaRound
from rayrec.quant.prepare import QuantLinear, set_fake_quant

LAMBDA = 1.0  # on the mean f_reg next to the relative error (the paper: 0.01 on a sum next to an absolute one)


@torch.no_grad()
def _collect_inputs(model, layers, batches, max_rows: int) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen[name].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for name, m in layers]
    set_fake_quant(model, False)
    try:
        for b in batches:
            model.encode(b["items"], b.get("timestamps"), b.get("user_idx"))
    finally:
        set_fake_quant(model, True)
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        out[name] = x[torch.randperm(len(x), generator=g)[:max_rows]] if len(x) > max_rows else x
    return out


def adaround_ptq(model, batches: Iterable[dict], iters: int | None = None, lr: float = 1e-2, batch_rows: int = 256,
                 max_rows: int = 8192, reg: float = LAMBDA) -> dict[str, dict[str, float]]:
    """Round every AdaRound-quantized Linear of ``model`` (prepared with quant.method=adaround, float
    weights loaded) by layer-wise reconstruction. Returns per-layer reconstruction errors of
    round-to-nearest and of the learned rounding, and the fraction of weights rounded away from nearest."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and isinstance(m.w_quant, AdaRound)]
    if not layers:
        raise ValueError("adaround_ptq needs a model prepared with quant.method=adaround")
    model.eval()
    ctrl = model.quant_ctrl
    ctrl.step.fill_(max(int(ctrl.step), ctrl.start_step))  # quantization on from here
    batches = list(batches)
    inputs = _collect_inputs(model, layers, batches, max_rows)
    g = torch.Generator().manual_seed(0)
    report = {}
    for name, layer in layers:
        x, w, wq = inputs[name], layer.weight.detach(), layer.w_quant
        iters_ = iters or wq.steps
        with torch.no_grad():
            layer.a_quant(x)  # calibrates the input range on the first call
            xq = layer.a_quant(x)
            target = x @ w.T  # the float layer's output (bias cancels)
            wq(w)  # initialises s and V (h(V) = fractional part: starts at round-to-nearest's neighbourhood)
            nearest = wq.s * torch.clamp(torch.round(w / wq.s), wq.qn, wq.qp)
            err_nearest = (xq @ nearest.T - target).pow(2).sum(1).mean().item()
        wq.train()
        qat_steps, wq.steps = wq.steps, iters_  # the annealing schedule spans this pass
        opt = torch.optim.Adam([wq.V], lr=lr)
        for t in range(iters_):
            wq.t = t
            idx = torch.randint(0, len(x), (min(batch_rows, len(x)),), generator=g)
            # relative to round-to-nearest's error, so lambda means the same for every layer size and scale
            rec = (xq[idx] @ wq.quantize(w).T - target[idx]).pow(2).sum(1).mean() / max(err_nearest, 1e-12)
            beta = wq.beta()
            loss = rec if beta is None else rec + reg * wq.round_loss(beta) / w.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        wq.eval()
        wq.t, wq.steps = None, qat_steps
        with torch.no_grad():
            hard = wq.quantize(w)
            report[name] = {"rec_nearest": err_nearest, "rec_adaround": (xq @ hard.T - target).pow(2).sum(1).mean().item(),
                            "flipped": (hard != nearest).float().mean().item()}
    _calibrate_rest(model, batches)
    return report


@torch.no_grad()
def _calibrate_rest(model, batches: list[dict]) -> None:
    """Quantizers no Linear owns (the item table's, the scoring input's with quant.embedding /
    quant.scoring) initialise on one pass over all calibration windows, the Linears now rounded."""
    if not batches:
        return
    keys = [k for k in ("items", "timestamps", "user_idx") if batches[0].get(k) is not None]
    b = {k: torch.cat([x[k] for x in batches]) for k in keys}
    model.encode(b["items"], b.get("timestamps"), b.get("user_idx"))
