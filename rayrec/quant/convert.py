"""``convert(model)``: a prepared (fake-quantized) model → one that runs integer kernels on CPU.

Backend: oneDNN's static INT8 linear (``torch.ops.onednn.qlinear_pointwise``, the kernel PyTorch's
own x86 INT8 path lowers to), chosen by measurement (docs/quantization.md): uint8 activations ×
int8 per-row weights, int32 accumulation, fp32 output. Dynamic INT8 (``quantize_dynamic``)
measures its activation range at run time, so it cannot reuse the learned scales and re-scans
every input; ONNX Runtime would need a second runtime and an export of the custom attention.

Learned scales carry over exactly where the method's grid is uniform: the activation quantizer's
(scale, zero point, clip range) quantize the input, and LSQ/STE/AdaRound weights are already
``scale × integer``. APoT (powers-of-two sums) and DoReFa (tanh-normalised, half-step offset)
levels are not an int8 grid: their fake-quantized weights are re-quantized to per-row int8.
Attention scores, softmax, LayerNorm and residual additions stay fp32.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rayrec.models.seqrec import score_in_chunks
from rayrec.quant.base import ActQParams, Quantizer, symmetric_int8
from rayrec.quant.prepare import QuantLinear

# the kernel takes raw uint8; quantize_per_tensor(...).int_repr() is the fastest fused way to get
# it (5x faster than round/clamp/to in eager mode) but warns that quantized dtypes are deprecated
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")


def int8_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def vnni_available() -> bool:
    """Without VNNI (AVX2-only x86), oneDNN's uint8 x int8 kernel sums pairs of products in int16
    (vpmaddubsw) and saturates on full-range 8-bit operands: its results are then wrong, not slow."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else True


_warned_no_vnni = False


def _warn_no_vnni() -> None:
    global _warned_no_vnni
    if not _warned_no_vnni:
        warnings.warn("this CPU has no VNNI: oneDNN's INT8 kernel would saturate on 8-bit operands, so INT8 "
                      "layers run the same integer arithmetic exactly in fp32 (correct results, no INT8 speed-up)",
                      RuntimeWarning, stacklevel=3)
        _warned_no_vnni = True


class Int8Linear(nn.Module):
    """y = x W^T + b with x quantized to uint8 on a fixed grid and W stored as per-row int8."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActQParams):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("w_zero", torch.zeros(self.out_features, dtype=torch.long), persistent=False)
        self.kernel = vnni_available()
        if self.kernel:
            self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(self.qweight, None), persistent=False)
        else:
            _warn_no_vnni()
            # integers |q| <= 255 * 128 summed in fp32 stay exact up to 2^24 (in_features <= 514)
            self.register_buffer("wq_t", self.qweight.float().T.contiguous(), persistent=False)
        self.act = act
        # the clamp costs a pass over x: skip it when the grid already spans uint8 [0, 255]
        q_lo, q_hi = round(act.lo / act.scale) + act.zero_point, round(act.hi / act.scale) + act.zero_point
        self.clip = q_lo > 0 or q_hi < 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.clip:
            x2 = x2.clamp(self.act.lo, self.act.hi)
        xq = torch.quantize_per_tensor(x2.contiguous(), self.act.scale, self.act.zero_point, torch.quint8).int_repr()
        if not self.kernel:
            y = ((xq.float() - self.act.zero_point) @ self.wq_t) * (self.act.scale * self.w_scale)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*shape[:-1], self.out_features)
        y = torch.ops.onednn.qlinear_pointwise(xq, self.act.scale, self.act.zero_point, self.packed, self.w_scale,
                                               self.w_zero, self.bias, 1.0, 0, torch.float32, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, x_scale={self.act.scale:.4g}, x_zp={self.act.zero_point}"


class Int8Embedding(nn.Module):
    """The item table as int8 rows with per-row scales; ``weight`` is the dequantized table."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return F.embedding(items, self.qweight).float() * self.scale[items].unsqueeze(-1)


def _int_weight(wq: Quantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fake = wq(w)  # also initialises a weight quantizer that has not run yet
        exact = wq.int_weight(w)
        return exact if exact is not None else symmetric_int8(fake)


def _act(aq: Quantizer, where: str) -> ActQParams:
    if not bool(aq.initialized):
        raise ValueError(f"the activation quantizer of {where} never saw data: train (or run a calibration "
                         "forward with fake quantization on) before convert()")
    return aq.act_qparams()


class Int8Model(nn.Module):
    """The converted recommender: the same encoder with INT8 Linear layers, and INT8 scoring when
    the scoring matmul was quantized. Inference only (``score_last``)."""

    def __init__(self, model: nn.Module, scorer: Int8Linear | None):
        super().__init__()
        self.model, self.scorer = model, scorer

    @torch.no_grad()
    def score_last(self, items, timestamps=None, users=None) -> torch.Tensor:
        return score_in_chunks(self._score_last, items, timestamps, users, self.model.cfg.hidden)

    def _score_last(self, items, timestamps, users) -> torch.Tensor:
        m = self.model
        h = m.encode(items, timestamps, users, last=1)  # (B, 1, D)
        h_item, offset = m.user.split(h, users)
        if self.scorer is not None:
            scores = self.scorer(h_item[:, 0])  # (B, N+1), int8 x int8
        else:
            scores = m.query(h_item[:, 0]) @ m.output_embeddings().T  # model.similarity: dot or cosine
        if offset is not None:
            scores = scores + offset
        scores[:, 0] = float("-inf")
        return scores

    def forward(self, items, timestamps=None, users=None):
        return self.score_last(items, timestamps, users)


@torch.no_grad()
def convert(model: nn.Module) -> Int8Model:
    """INT8 copy of a prepared, trained model (the model itself is left as it is)."""
    if not hasattr(model, "quant_ctrl"):
        raise ValueError("convert() needs a model prepared with a quant.method (rayrec.quant.prepare)")
    if not int8_available():
        raise RuntimeError("this PyTorch build has no oneDNN INT8 kernels (torch.ops.onednn.qlinear_pointwise)")
    m = copy.deepcopy(model).eval().cpu()
    m.quant_ctrl.force_off = False
    m.quant_ctrl.step.fill_(max(int(m.quant_ctrl.step), m.quant_ctrl.start_step))
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            q, scale = _int_weight(mod.w_quant, mod.weight)
            parent_name, _, child = name.rpartition(".")
            parent = m.get_submodule(parent_name) if parent_name else m
            setattr(parent, child, Int8Linear(q, scale, mod.bias, _act(mod.a_quant, name)))
    scorer = None
    if parametrize.is_parametrized(m.item_emb, "weight"):
        tq = m.item_emb.parametrizations.weight[0].quantizer
        q, scale = _int_weight(tq, m.item_emb.parametrizations.weight.original)
        pad = m.item_emb.padding_idx
        m.item_emb = Int8Embedding(q, scale, pad)
        score_quant = getattr(m.norm, "score_quant", None)
        if score_quant is not None:
            n = m.num_items + 1
            scorer = Int8Linear(q[:n], scale[:n], None, _act(score_quant, "the scoring matmul"))
    return Int8Model(m, scorer)


def int8_state_dict(model: Int8Model) -> dict[str, torch.Tensor]:
    """What a deployed INT8 model stores (int8 weights, scales, biases, fp32 norms and positions);
    the INT8 scorer's weights are views of the item table and are rebuilt from it."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.endswith("quant_ctrl.step") and not k.startswith("scorer.")}
