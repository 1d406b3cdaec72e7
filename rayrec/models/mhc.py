"""mHC residual: n mixed residual streams (Manifold-Constrained Hyper-Connections).

mHC (DeepSeek, arXiv 2512.24880) on top of Hyper-Connections (Zhu et al., arXiv 2409.19606).
The residual is n streams ``X`` (B, T, n, D); sub-layer ``i`` reads, writes and mixes them as

    u = H_pre X                      (B, T, D)    H_pre  (B, T, n)    = (2/n) sigmoid(a_pre  * d_pre  + b_pre)
    X' = H_res X + H_post^T f(u)     (B, T, n, D) H_post (B, T, n)    = 2 sigmoid(a_post * d_post + b_post)
                                                  H_res  (B, T, n, n) = Sinkhorn(a_res * d_res + b_res)

``b_*`` are static learned logits, ``d_*`` the dynamic per-token part: one bias-free linear map of
the RMS-normalised, flattened streams (n*D -> 2n + n^2), and ``a_*`` scalar gates initialised to
0.01 so that training starts close to the static (input-independent) connection, as in the paper.

Why these choices:
  * H_pre carries a 2/n factor (not in the paper): at the static init ``b_pre = 0`` every weight is
    2 sigmoid(0)/n = 1/n, so the sub-layer reads the streams' mean, and with n = 1 it is exactly 1.
    Sub-layers are Pre-LN, so this constant rescale costs nothing.
  * H_res starts near the identity (logits 0 on the diagonal, -4 off it) and is doubly stochastic,
    so it preserves the streams' mean exactly; with H_post = 2 sigmoid(0) = 1 writing f(u) to every
    stream, the mean stream follows the plain residual ``x + f(x)`` at init (up to the 0.01 gates).
  * Static logits and the expansion are stored as 1-D tensors: the optimizer decays only >= 2-D
    weights, and decaying them would pull H_res towards the uniform 1/n matrix and the streams
    towards identical copies.
  * All mixing runs in float32 with autocast off: the streams are the residual path, and bf16
    matmuls (which autocast would pick for einsum) would round them at every sub-layer. Only the
    sub-layer itself runs under the caller's autocast.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rayrec.models.attention import AttnContext

_RES_OFF_DIAGONAL = -4.0  # static H_res logit off the diagonal: n = 4 starts at diag 0.95, off 0.017
_GATE_INIT = 0.01  # the paper's small init of the dynamic gates alpha
_EXPAND_STD = 0.1  # spread of the per-stream, per-channel expansion scales around 1


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(..., n, n) logits -> doubly stochastic (..., n, n) float32, non-negative.

    Sinkhorn-Knopp on exp(logits): alternately normalise rows and columns, ``iters`` times (columns
    last, so they sum to 1 to rounding and rows to the convergence tolerance). Written in the log
    domain (subtracting a logsumexp is dividing by a sum), which is the same map but cannot
    overflow or divide 0/0 when a row's logits are far below the rest. Always float32, even under
    autocast: 2 x iters reductions in bf16 would not stay doubly stochastic.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = logits.float()
        for _ in range(iters):
            log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
            log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
        return log_p.exp()


def _rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # eps keeps padding (all-zero streams) at 0 instead of 0/0 = NaN, which keep * NaN would not hide
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Connection(nn.Module):
    """One sub-layer's H_pre, H_post, H_res: static logits + gated dynamic part."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.n = n
        self.dynamic = nn.Linear(n * d, 2 * n + n * n, bias=False)  # -> (pre n, post n, res n*n)
        self.gate = nn.Parameter(torch.full((3,), _GATE_INIT))  # alpha_pre, alpha_post, alpha_res
        self.pre = nn.Parameter(torch.zeros(n))  # 2/n sigmoid(0) = 1/n: read the streams' mean
        self.post = nn.Parameter(torch.zeros(n))  # 2 sigmoid(0) = 1: write f(u) to every stream
        eye = torch.eye(n)
        self.res = nn.Parameter((_RES_OFF_DIAGONAL * (1 - eye)).flatten())  # near-identity H_res

    def forward(self, streams: torch.Tensor, iters: int):
        """(B, T, n, D) float32 -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n)."""
        n = self.n
        dyn = self.dynamic(_rms_norm(streams.flatten(-2)))  # (B, T, 2n + n^2)
        d_pre, d_post, d_res = dyn.split([n, n, n * n], dim=-1)
        h_pre = (2.0 / n) * torch.sigmoid(self.gate[0] * d_pre + self.pre)
        h_post = 2.0 * torch.sigmoid(self.gate[1] * d_post + self.post)
        h_res = sinkhorn((self.gate[2] * d_res + self.res).unflatten(-1, (n, n)), iters)
        return h_pre, h_post, h_res


class MHCResidual(nn.Module):
    """n residual streams mixed by doubly stochastic H_res (see the module docstring).

    With n = 1 and the gates at 0 (``MHCResidual.off``) every H is exactly 1 and each step is
    exactly PlainResidual's Pre-LN ``x + f(x)`` at real positions (padding is zeroed here);
    expand and reduce are identities.
    """

    def __init__(self, cfg, d: int, num_sublayers: int, streams: int | None = None):
        super().__init__()
        n = cfg.mhc_streams if streams is None else streams
        self.n, self.iters = n, cfg.mhc_sinkhorn_iters
        # Expansion: stream k = x * (1 + e_k), a learned per-stream, per-channel scale. Identical
        # copies would stay identical under any doubly stochastic mix plus a shared write (the
        # known bug of naive ports), so the e_k start random; they are centred over the streams so
        # the streams' mean is exactly x (what H_pre and reduce read at init), and n = 1 gives
        # e = 0, the identity. A scale, not a shift, keeps padding (x = 0) at zero.
        e = _EXPAND_STD * torch.randn(n, d)
        self.expand_scale = nn.Parameter((1.0 + (e - e.mean(0))).flatten())  # (n*D,)
        self.connections = nn.ModuleList(_Connection(n, d) for _ in range(num_sublayers))
        # Reduce: a learned weighted sum over the streams, starting at the mean (1/n each): the
        # final LayerNorm makes the overall scale irrelevant, and n = 1 gives weight 1, the identity.
        self.reduce_weight = nn.Parameter(torch.full((n,), 1.0 / n))

    @classmethod
    def off(cls, cfg, d: int, num_sublayers: int) -> MHCResidual:
        """The exact plain-residual point: one stream, identity mixing, dynamic gates 0 (tests)."""
        m = cls(dataclasses.replace(cfg, mhc_streams=1), d, num_sublayers)
        with torch.no_grad():
            for c in m.connections:
                c.gate.zero_()
        return m

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, n, D)."""
        return x.unsqueeze(-2) * self.expand_scale.view(self.n, -1)

    def connect(self, i: int, x: torch.Tensor, sublayer: nn.Module, ctx: AttnContext) -> torch.Tensor:
        """Streams (B, T, n, D) through sub-layer ``i`` -> streams (B, T, n, D); zero at padding."""
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            streams = x.float()
            h_pre, h_post, h_res = self.connections[i](streams, self.iters)
            u = torch.einsum("btn,btnd->btd", h_pre, streams)  # (B, T, D)
        y = sublayer(u.to(dtype), ctx)  # (B, Tq, D), under the caller's autocast; Tq < T: last queries only
        q = y.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            mixed = torch.einsum("btkn,btnd->btkd", h_res[:, -q:], streams[:, -q:])  # (B, Tq, n, D)
            out = mixed + h_post[:, -q:].unsqueeze(-1) * y.float().unsqueeze(-2)
            return (out * ctx.keep[:, -q:].unsqueeze(-1)).to(dtype)  # keep (B, Tq, 1, 1)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n, D) -> (B, T, D): weighted sum over the streams."""
        return (x * self.reduce_weight.to(x.dtype).view(self.n, 1)).sum(-2)
