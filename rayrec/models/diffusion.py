"""DiffSASRec: LLaDA-style masked diffusion over item sequences (``head: masked_diffusion``).

The encoder is the usual stack with ``attention: bidirectional``; item N+1 is the mask token.
Training batches keep the next-item format of ``rayrec/data/batches.py``: the head rebuilds each
training window from (inputs, targets) and corrupts it itself (``corrupt``, called by
``SeqRec.forward`` before encoding), so no data format changes and the split stays the store's.

- Pre-training: t ~ U(eps, 1) per sequence; every real position is masked with probability t;
  cross-entropy over the real items on masked positions, weighted 1/t and normalised by the
  sequence's length (Nie et al., "Large Language Diffusion Models", 2025). Its expectation over
  the masks is the mean per-item cross-entropy of the sequence.
  ``diffusion_schedule: fixed`` masks every position with the fixed probability
  ``diffusion_mask_prob`` (BERT4Rec's masked-item objective; the same estimator at a constant t), and
  ``diffusion_last_prob`` of the sequences are masked at their final position(s) only: the next-item
  query inside pre-training (``diffusion_last_positions`` > 1: the final m ~ U{1..it} positions, the
  next items after a history, as multi-step inference asks).
- SFT (``train.stage: sft``): only the final ``diffusion_sft_positions`` positions are masked: the
  next-item objective, in exactly the form single-step inference queries.
- Single-step inference (``query``, used by ``SeqRec.score_last`` and so by the shared evaluation
  path): the history followed by one mask token; the mask position's scores over real items.
- Multi-step inference (``generate``): K mask tokens, unmasked over at most K passes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rayrec.models.softmax_ce import softmax_ce_sum


def training_sequence(items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last T items of each training prefix, left-padded: (B, T).

    ``items`` is s[:-1] and ``targets`` s[1:] of the same window, so dropping the oldest input and
    appending the newest target gives the window s[-T:] (it keeps s[0] for short users).
    """
    return torch.cat([items[:, 1:], targets[:, -1:]], dim=1)


def random_mask(seq: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's forward process: t ~ U(eps, 1) per row, each real position masked with prob. t.
    Returns (mask (B, T) bool, t (B,))."""
    B, T = seq.shape
    t = eps + (1.0 - eps) * torch.rand(B, device=seq.device)  # (B,)
    mask = (torch.rand(B, T, device=seq.device) < t[:, None]) & (seq != 0)  # (B, T)
    return mask, t


def fixed_mask(seq: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real position masked with the fixed probability p: (mask (B, T) bool, t (B,) = p)."""
    mask = (torch.rand(seq.shape, device=seq.device) < p) & (seq != 0)  # (B, T)
    return mask, torch.full(seq.shape[:1], p, device=seq.device)


def final_mask(seq: torch.Tensor, positions: int) -> torch.Tensor:
    """The last ``positions`` real positions of every row (rows are left-padded): (B, T) bool."""
    T = seq.shape[1]
    return (torch.arange(T, device=seq.device) >= T - positions)[None, :] & (seq != 0)


class MaskedDiffusionHead(nn.Module):
    needs_negatives = False
    needs_ratings = False

    def __init__(self, cfg, num_items: int):
        super().__init__()
        self.eps, self.sft_positions = cfg.diffusion_eps, cfg.diffusion_sft_positions
        self.schedule, self.mask_prob, self.last_prob = cfg.diffusion_schedule, cfg.diffusion_mask_prob, cfg.diffusion_last_prob
        self.last_positions = cfg.diffusion_last_positions
        self.mask_token = num_items + 1
        self.stage = "pretrain"  # the training loop sets this from train.stage (a training, not model, setting)

    def corrupt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model input with masked positions replaced by the mask token, plus what the loss needs."""
        seq = training_sequence(batch["items"], batch["targets"])  # (B, T)
        length = (seq != 0).sum(1)  # (B,)
        if self.stage == "sft":
            mask = final_mask(seq, self.sft_positions)
            row_weight = 1.0 / mask.sum(1).clamp(min=1)  # mean over the masked final positions
        else:
            mask, t = fixed_mask(seq, self.mask_prob) if self.schedule == "fixed" else random_mask(seq, self.eps)
            row_weight = 1.0 / (t * length.clamp(min=1))  # 1/t, normalised by the sequence length
            if self.last_prob > 0:  # a share of rows asks the next-item query instead
                last = torch.rand(seq.shape[0], device=seq.device) < self.last_prob  # (B,)
                final = final_mask(seq, self.sft_positions)
                if self.last_positions > 1:  # the final 1..last_positions positions: the next items after a history
                    m = torch.randint(1, self.last_positions + 1, (seq.shape[0], 1), device=seq.device)  # (B, 1)
                    T, length = seq.shape[1], (seq != 0).sum(1, keepdim=True)  # (B, 1)
                    pos = torch.arange(T, device=seq.device)[None, :]
                    final = (pos >= T - torch.minimum(m, (length - 1).clamp(min=1))) & (seq != 0)  # keeps a history item
                mask = torch.where(last[:, None], final, mask)
                row_weight = torch.where(last, 1.0 / final.sum(1).clamp(min=1), row_weight)
        out = {k: v for k, v in batch.items() if k != "timestamps"}  # bidirectional attention reads no times
        out.update(items=seq.masked_fill(mask, self.mask_token), diffusion_targets=seq, diffusion_mask=mask,
                   diffusion_weight=row_weight, diffusion_rows=length > 0)
        return out

    def query(self, items: torch.Tensor) -> torch.Tensor:
        """Single-step inference input: the newest T-1 items and one mask token: (B, T)."""
        return torch.cat([items[:, 1:], torch.full_like(items[:, :1], self.mask_token)], dim=1)

    def forward(self, h, emb, batch, offset=None):
        # the per-user offset of ssept is constant over items, to which a softmax is invariant
        mask = batch["diffusion_mask"]  # (B, T)
        y = batch["diffusion_targets"][mask] - 1  # (M,) class index among the real items 1..N
        w = batch["diffusion_weight"][:, None].expand_as(mask)[mask]  # (M,)
        items = emb[1:]  # (N, D): padding is never a class, and emb holds no mask-token row
        chunk = max(32, (1 << 20) // items.shape[0])
        loss = softmax_ce_sum(h[mask], items, y, chunk, item_block=1 << 15, weight=w.detach())
        return loss, batch["diffusion_rows"].sum()


@torch.no_grad()
def generate(model, items: torch.Tensor, k: int, *, users: torch.Tensor | None = None,
             seen_rows: torch.Tensor | None = None, seen_items: torch.Tensor | None = None,
             threshold: float = 0.9, decay: float = 0.9, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-step inference: K distinct items per history, in list order: (B, K), 0 = none left.

    The newest T-K items are followed by K mask tokens. Each pass predicts every still-masked
    position over the items not yet banned (padding, the mask token, the seen items
    ``(seen_rows, seen_items)``, and items already chosen); positions whose confidence (the top
    probability) reaches the row's threshold are accepted. A row where none does lowers its
    threshold by ``decay`` until its most confident position passes, so every pass accepts at
    least one position per row and K passes always finish. Two positions predicting one item in
    the same pass: the more confident one keeps it, the other waits for the next pass. Greedy
    (deterministic) at ``temperature`` 0; otherwise Gumbel sampling from ``generator``.
    """
    B, T = items.shape
    n = model.num_items
    mask_token = n + 1
    x = torch.cat([items[:, k:], torch.full_like(items[:, :k], mask_token)], dim=1)  # (B, T)
    banned = torch.zeros(B, n + 1, dtype=torch.bool, device=items.device)  # (B, N+1)
    banned[:, 0] = True
    if seen_rows is not None:
        banned[seen_rows, seen_items] = True
    chosen = torch.zeros(B, k, dtype=torch.long, device=items.device)  # (B, K)
    done = torch.zeros(B, k, dtype=torch.bool, device=items.device)  # (B, K)
    thr = torch.full((B,), threshold, dtype=torch.float32, device=items.device)
    emb = model.output_embeddings()  # (N+1, D): the mask token can never be recommended
    pos = torch.arange(k, device=items.device)
    for _ in range(k):
        active = ~done.all(1) & ~banned.all(1)  # (B,)
        if not active.any():
            break
        h, _ = model.user.split(model.encode(x, None, users, last=k), users)  # (B, K, D)
        logits = (h @ emb.T).float().masked_fill(banned[:, None, :], float("-inf"))  # (B, K, N+1)
        if temperature > 0:
            u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
            logits = logits / temperature - torch.log(-torch.log(u))
        conf, item = torch.softmax(logits, dim=-1).max(-1)  # (B, K)
        conf = conf.masked_fill(done | ~active[:, None], -1.0)
        best = conf.max(1).values  # (B,)
        low = active & (best < thr)
        # the smallest number of decays that lets the best position pass (min() absorbs rounding)
        steps = torch.ceil(torch.log(best.clamp(min=1e-30) / thr) / math.log(decay))
        thr = torch.where(low, torch.minimum(thr * decay ** steps, best), thr)
        accept = conf >= thr[:, None]  # (B, K)
        same = (item[:, :, None] == item[:, None, :]) & accept[:, None, :]  # (B, K, K): [i, j] j wants i's item
        ahead = (conf[:, None, :] > conf[:, :, None]) | ((conf[:, None, :] == conf[:, :, None]) & (pos[None, :] < pos[:, None]))
        accept &= ~(same & ahead).any(-1)
        chosen = torch.where(accept, item, chosen)
        done |= accept
        x[:, T - k:] = torch.where(accept, item, x[:, T - k:])
        banned.scatter_(1, torch.where(accept, item, 0), True)  # index 0 is banned already
    return chosen
