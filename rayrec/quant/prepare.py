"""``prepare(model, cfg)``: the one transform that turns a float model into a fake-quantized one.

Applied once, right after ``build_model`` and before a checkpoint is loaded, DDP wraps the model
and the optimizer is built, so every quantizer parameter (LSQ steps, PACT/APoT clip levels,
AdaRound's V) is an ordinary parameter the optimizer updates and the checkpoint saves.

- every ``nn.Linear`` whose name matches ``quant.include`` and no ``quant.exclude`` pattern becomes
  a :class:`QuantLinear` (same ``weight``/``bias`` keys, plus ``w_quant.*`` / ``a_quant.*``);
- ``quant.embedding``: the item table is parametrized (``item_emb.parametrizations.weight``), so
  both the input lookup and the tied scoring matrix read the quantized table;
- ``quant.scoring``: the final norm's output, the left input of the scoring matmul, is quantized;
- ``model.quant_ctrl`` counts training steps; quantization is on from ``quant.start_step``.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rayrec.config import Config, ConfigError, QuantConfig
from rayrec.quant.adaround import AdaRound
from rayrec.quant.apot import APoTAct, APoTWeight
from rayrec.quant.base import QuantControl, Quantizer
from rayrec.quant.dorefa import DoReFaAct, DoReFaWeight
from rayrec.quant.lsq import LSQ
from rayrec.quant.pact import PACT
from rayrec.quant.ste import STEAct, STEWeight


def weight_quantizer(q: QuantConfig, shape: tuple[int, int]) -> Quantizer:
    b, pc = q.weight_bits, q.granularity == "per_channel"
    if q.method == "lsq":
        return LSQ(b, True, pc, is_weight=True, channels=shape[0])
    if q.method == "adaround":
        return AdaRound(b, pc, shape, q.adaround_reg, q.adaround_beta, q.adaround_warmup, q.adaround_steps)
    if q.method == "apot":
        return APoTWeight(b)
    if q.method in ("dorefa", "pact"):  # PACT's paper quantizes weights with DoReFa
        return DoReFaWeight(b)
    if q.method == "ste":
        return STEWeight(b, pc, shape[0], learned=q.ste_observer == "learned")
    raise ConfigError(f"quant.method={q.method!r} has no weight quantizer")


def act_quantizer(q: QuantConfig, signed: bool) -> Quantizer:
    b = q.act_bits
    if q.method == "lsq":
        return LSQ(b, signed)
    if q.method == "pact":
        return PACT(b, signed, q.pact_init, q.pact_l2)
    if q.method == "apot":
        return APoTAct(b, signed)
    if q.method == "dorefa":
        return DoReFaAct(b, signed)
    if q.method in ("ste", "adaround"):  # AdaRound rounds weights; its activations use min/max
        return STEAct(b, signed, q.ema, learned=q.method == "ste" and q.ste_observer == "learned")
    raise ConfigError(f"quant.method={q.method!r} has no activation quantizer")


class QuantLinear(nn.Linear):
    """A Linear whose weight and input are fake-quantized while the control says so."""

    def __init__(self, linear: nn.Linear, w_quant: Quantizer, a_quant: Quantizer):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.w_quant, self.a_quant = w_quant, a_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_quant.enabled():
            return F.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)
        y = F.linear(x, self.weight, self.bias)
        if self.training:
            # before start_step the quantizer parameters are idle; DDP needs every parameter in the
            # graph (find_unused_parameters=False), and + 0 * p leaves y exactly as it was
            for p in (*self.w_quant.parameters(), *self.a_quant.parameters()):
                y = y + 0.0 * p.sum()
        return y


class _TableQuant(nn.Module):
    """Parametrization of the item table: the weight quantizer applied on every access."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer(w)


def _count_step(model, inputs, output):
    if model.training:
        model.quant_ctrl.step.add_(1)


def _quantize_scores(norm, inputs, output):
    return norm.score_quant(output)


def _after_relu(parent: nn.Module, child: str) -> bool:
    """True when a Linear's input comes out of a ReLU (unsigned grid), e.g. the FFN's second layer."""
    if not isinstance(parent, nn.Sequential):
        return False
    names = list(parent._modules)
    for prev in reversed(names[: names.index(child)]):
        m = parent._modules[prev]
        if "Dropout" in type(m).__name__:
            continue
        return isinstance(m, nn.ReLU)
    return False


def quant_targets(model: nn.Module, q: QuantConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
    picked = [n for n in names if any(fnmatch.fnmatch(n, p) for p in q.include)
              and not any(fnmatch.fnmatch(n, p) for p in q.exclude)]
    if not picked:
        raise ConfigError(f"quant.include={q.include} / quant.exclude={q.exclude} match no Linear layer; "
                          f"the model's Linear layers are: {names}")
    return picked


def prepare(model: nn.Module, cfg: Config | QuantConfig) -> nn.Module:
    """Fake-quantize ``model`` in place (and return it); ``quant.method=none`` leaves it untouched."""
    q = cfg.quant if isinstance(cfg, Config) else cfg
    if q.method == "none":
        return model
    if hasattr(model, "quant_ctrl"):
        raise ValueError("prepare() was already applied to this model")
    model.quant_ctrl = ctrl = QuantControl(q.start_step)
    model.register_forward_hook(_count_step)
    for name in quant_targets(model, q):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = parent.get_submodule(child)
        wq = weight_quantizer(q, tuple(lin.weight.shape)).attach(ctrl)
        aq = act_quantizer(q, signed=not _after_relu(parent, child)).attach(ctrl)
        setattr(parent, child, QuantLinear(lin, wq, aq))
    if q.embedding:
        table = model.item_emb.weight
        # registering evaluates the parametrization once (a shape check): with the control on, a
        # data-initialised quantizer (LSQ's step, AdaRound's scale) would take its values from the
        # table as built, not from the weights loaded next
        ctrl.force_off = True
        parametrize.register_parametrization(
            model.item_emb, "weight", _TableQuant(weight_quantizer(q, tuple(table.shape)).attach(ctrl)))
        ctrl.force_off = False
    if q.scoring:
        model.norm.score_quant = act_quantizer(q, signed=True).attach(ctrl)
        model.norm.register_forward_hook(_quantize_scores)
    return model


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def quant_penalty(model: nn.Module) -> torch.Tensor | float:
    """Sum of the quantizers' loss terms (PACT's L2, AdaRound's regulariser); 0.0 for a float model."""
    return sum((q.penalty() for q in quantizers(model)), 0.0)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization off (float forward of the same weights) or back on."""
    ctrl = getattr(model, "quant_ctrl", None)
    if ctrl is not None:
        ctrl.force_off = not enabled


def is_quant_param(name: str) -> bool:
    """Quantizer parameters (steps, clip levels, V) get no weight decay."""
    return "_quant." in name or "score_quant." in name or ".parametrizations.weight.0." in name


def load_float_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a float checkpoint into a prepared model (e.g. for AdaRound's post-training pass):
    quantizer values stay uninitialised and are set from the loaded weights on first use."""
    if parametrize.is_parametrized(model.item_emb, "weight") and "item_emb.weight" in state:
        state = dict(state)
        state["item_emb.parametrizations.weight.original"] = state.pop("item_emb.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    for qz in quantizers(model):  # whatever ran before, values come from these weights on first use
        qz.initialized.fill_(False)
    missing = [k for k in missing if not (k.startswith("quant_ctrl.") or "_quant." in k or "score_quant." in k
                                          or ".parametrizations.weight.0." in k)]
    if missing or unexpected:
        raise ValueError(f"float checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")


def init_from_float(model: nn.Module, path: str) -> None:
    """Start QAT from the best-on-validation weights of a trained float run (``quant.init_from``)."""
    from rayrec.eval.offline import find_checkpoint
    from rayrec.train import checkpoint as ckpt

    load_float_weights(model, ckpt.load_weights(find_checkpoint(path), best=True))
