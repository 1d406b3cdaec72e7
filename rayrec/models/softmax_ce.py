"""Full-catalogue softmax cross-entropy computed block by block, never holding all the logits.

The plain form materialises a (targets x items) logit matrix, then its log-softmax and its
gradient: for ML-1M at batch 128 that is three ~230 MB passes through memory per step, and it
grows with the catalogue. Here rows are taken in chunks; each chunk is scored, reduced to its loss
and turned into its gradient while still in cache, and the gradients are kept for backward (the
loss is a plain sum, so backward only rescales them).

When the catalogue is too large for one chunk of rows x all items, items are taken in blocks too:
a first pass keeps a running log-sum-exp per row (online softmax), a second pass recomputes each
block's logits to form its share of the gradient. That costs a second matmul but keeps memory at
O(row chunk x item block) whatever the number of items.
"""
from __future__ import annotations

import torch


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, item_block: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        # h: (V, D) hidden states, w: (N, D) item embeddings, y: (V,) targets in [0, N)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(torch.promote_types(h.dtype, w.dtype), torch.float32)  # bf16/fp16 -> fp32
        hf, wf = h.to(dtype), w.to(dtype)
        grad_h = torch.empty_like(hf) if need_h else None
        grad_w = torch.zeros_like(wf) if need_w else None
        loss = hf.new_zeros(())
        N = wf.shape[0]
        for s in range(0, hf.shape[0], chunk):
            hc, yc = hf[s : s + chunk], y[s : s + chunk]  # (c, D), (c,)
            wc = None if weight is None else weight[s : s + chunk].to(dtype)  # (c,) per-row loss weight
            rows = torch.arange(len(yc), device=hc.device)
            target = (hc * wf[yc]).sum(-1)  # (c,)
            if item_block >= N:  # one block: logits computed once
                logits = hc @ wf.T  # (c, N)
                lse = torch.logsumexp(logits, dim=-1)
                blocks = [(0, logits)]
            else:  # pass 1: online log-sum-exp over item blocks
                lse = torch.full((len(yc),), float("-inf"), dtype=dtype, device=hc.device)
                for j in range(0, N, item_block):
                    lse = torch.logaddexp(lse, torch.logsumexp(hc @ wf[j : j + item_block].T, dim=-1))
                blocks = None
            loss += (lse - target).sum() if wc is None else (wc * (lse - target)).sum()
            if not (need_h or need_w):
                continue
            if need_h:
                grad_h[s : s + chunk] = 0.0
            for j, logits in blocks or ((j, hc @ wf[j : j + item_block].T) for j in range(0, N, item_block)):
                p = logits.sub_(lse[:, None]).exp_()  # softmax of this block, in place: (c, b)
                hit = (yc >= j) & (yc < j + p.shape[1])
                p[rows[hit], yc[hit] - j] -= 1.0  # d loss / d logits
                if wc is not None:
                    p.mul_(wc[:, None])
                if need_h:
                    grad_h[s : s + chunk].addmm_(p, wf[j : j + p.shape[1]])
                if need_w:
                    grad_w[j : j + p.shape[1]].addmm_(p.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None


def softmax_ce_sum(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 256,
                   item_block: int | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``softmax(h @ w.T)`` against class indices ``y``.

    Equals ``F.cross_entropy(h @ w.T, y, reduction="sum")`` (values and gradients). ``chunk`` rows
    at a time; ``item_block`` items at a time (default: all items in one block). ``weight`` (V,), a constant
    (no gradient), multiplies each row's loss.
    """
    if h.shape[0] == 0:
        return (h.sum() + w.sum()) * 0.0  # keeps the graph (and DDP's hooks) connected
    return _ChunkedSoftmaxCE.apply(h, w, y, chunk, item_block or w.shape[0], weight)


class _ChunkedSharedSampledSoftmax(torch.autograd.Function):
    """Softmax over each row's target and k negatives shared by the batch, fused like the full
    softmax above: rows in chunks, each chunk's logits turned into its gradient while in cache."""

    @staticmethod
    def forward(ctx, h, pos_w, neg_w, allowed, row_of, pos_ids, neg_ids, bias_pos, bias_neg, chunk: int):
        # h, pos_w: (V, D) hidden states and target embeddings; neg_w: (k, D) negative embeddings;
        # allowed: (B, k) per batch row; row_of: (V,) batch row of each position; pos_ids (V,) and
        # neg_ids (k,): item ids (a negative equal to the row's target is masked); biases: added to the logits, or None
        dtype = torch.promote_types(torch.promote_types(h.dtype, neg_w.dtype), torch.float32)
        hf, pf, nf = h.to(dtype), pos_w.to(dtype), neg_w.to(dtype)
        grad_h, grad_p, grad_n = torch.empty_like(hf), torch.empty_like(pf), torch.zeros_like(nf)
        loss = hf.new_zeros(())
        for s in range(0, hf.shape[0], chunk):
            hc, pc = hf[s: s + chunk], pf[s: s + chunk]
            pos = (hc * pc).sum(-1)  # (c,)
            neg = hc @ nf.T  # (c, k)
            if bias_pos is not None:
                pos = pos + bias_pos[s: s + chunk].to(dtype)
                neg += bias_neg.to(dtype)
            keep = allowed[row_of[s: s + chunk]] & (neg_ids[None, :] != pos_ids[s: s + chunk, None])
            neg.masked_fill_(~keep, float("-inf"))
            lse = torch.logaddexp(pos, torch.logsumexp(neg, dim=-1))  # (c,)
            loss += (lse - pos).sum()
            p_neg = neg.sub_(lse[:, None]).exp_()  # d loss / d negative logits: (c, k)
            g_pos = torch.exp(pos - lse) - 1.0  # d loss / d target logit: (c,)
            grad_h[s: s + chunk] = torch.addmm(g_pos[:, None] * pc, p_neg, nf)
            grad_p[s: s + chunk] = g_pos[:, None] * hc
            grad_n.addmm_(p_neg.T, hc)
        ctx.save_for_backward(grad_h, grad_p, grad_n)
        ctx.dtypes = (h.dtype, pos_w.dtype, neg_w.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(g * grad_out).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None)


def shared_sampled_softmax_sum(h: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor, allowed: torch.Tensor,
                               row_of: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor,
                               bias_pos: torch.Tensor | None = None, bias_neg: torch.Tensor | None = None,
                               chunk: int | None = None) -> torch.Tensor:
    """Summed ``-log softmax([h.pos_w + bias_pos, h @ neg_w.T + bias_neg])[0]`` over the V rows,
    where a negative takes no part in row v's softmax if ``allowed[row_of[v], j]`` is False or it is
    the row's target (``neg_ids[j] == pos_ids[v]``).

    Equals building the (V, 1+k) logits and taking ``F.log_softmax`` (values and gradients), without
    holding them: ``chunk`` rows at a time (default: ~1M logits per chunk).
    """
    if h.shape[0] == 0:
        return (h.sum() + pos_w.sum() + neg_w.sum()) * 0.0  # keeps the graph (and DDP's hooks) connected
    chunk = chunk or max(32, (1 << 20) // max(1, neg_w.shape[0]))
    return _ChunkedSharedSampledSoftmax.apply(h, pos_w, neg_w, allowed, row_of, pos_ids, neg_ids, bias_pos, bias_neg, chunk)
