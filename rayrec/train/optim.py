"""The optimizer, and the row-sparse item table that keeps a step's cost off the catalogue size.

A dense item table costs every step a (N+1, D) gradient, its all-reduce and an Adam pass over
every row, whatever the batch touched: at 10^6 items and D = 64 that is 256 MB per step. With
``train.item_grad=sparse`` the table's gradient holds only the rows the step looked up (history
items, targets, negatives): DDP all-reduces it as a sparse tensor (gloo gathers indices and
values, so the traffic follows the touched rows) and ``RowSparseAdamW`` updates those rows only
(lazy Adam: a row's moments and weights move when the row is touched, as in TorchRec's and
TensorFlow's sparse Adam). It needs a head that looks rows up (not full-catalogue CE or the
masked-diffusion head), no whole-table penalty (``train.l2_emb``), no item-table quantizer, and a
backend with sparse all-reduce (gloo; NCCL has none).
"""
from __future__ import annotations

import math

import torch

from rayrec.config import Config, sparse_item_blockers
from rayrec.quant import is_quant_param


def use_sparse_items(cfg: Config, num_items: int) -> bool:
    """``train.item_grad``: dense, sparse, or auto = sparse from ``train.sparse_min_items`` items on,
    where nothing blocks it (load_config refuses an explicit sparse that something blocks)."""
    mode = cfg.train.item_grad
    if mode != "auto":
        return mode == "sparse"
    return num_items >= cfg.train.sparse_min_items and not sparse_item_blockers(cfg)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; decoupled decay on matrices only (not embeddings, norms or biases). Parameters whose
    gradient arrives sparse (the row-sparse item table) get lazy row updates."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name and not is_quant_param(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return RowSparseAdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW for dense gradients; for a sparse (row) gradient, Adam on the touched rows only.

    Same state as AdamW (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move freely between
    a dense and a sparse run. A touched row gets exactly AdamW's update with the parameter's step
    count; rows not touched keep their weights and moments (dense Adam would keep moving them on
    momentum). With only dense gradients this is AdamW."""

    @torch.no_grad()
    def step(self, closure=None):
        sparse = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.is_sparse]
        for p, _ in sparse:
            p.grad = None  # AdamW skips it; updated below
        try:
            loss = super().step(closure)
        finally:
            for p, grad in sparse:
                p.grad = grad
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._sparse_step(p, p.grad, group)
        return loss

    def _sparse_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        grad = grad.coalesce()  # one entry per row: DDP's all-reduce may leave duplicates
        rows, g = grad.indices()[0], grad.values()  # (R,), (R, D)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m = state["exp_avg"][rows].lerp_(g, 1 - beta1)  # (R, D)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        w = p[rows]
        if wd:
            w.mul_(1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        p[rows] = w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes sparse gradients (the norm of a sparse gradient is that
    of its coalesced values; torch's foreach norm refuses sparse tensors)."""
    params = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    norms = [(p.grad.values() if p.grad.is_sparse else p.grad).norm(2) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad.values().mul_(coef)
        else:
            p.grad.mul_(coef)
    return total
