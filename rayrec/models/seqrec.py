"""The sequential recommender assembled from its axes:
user-perturbed ids → embeddings (+ positions, + user) → residual stream through the blocks'
sub-layers → final norm → head (training) or scores over the catalogue (evaluation)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.models.attention import AttentionKind
from rayrec.models.dropout import Dropout


def emb_init_std(cfg, item_dim: int) -> tuple[float, float]:
    """Init std of the item and position tables (and of SSE-PT's user table, at its own width).

    Next-item models start small (GPT-2's 0.02): with unit-variance item inputs (std 1/sqrt(d)
    before the sqrt(d) input scale) and N(0, 1) positions, the SASRec paper config sat on a plateau
    for ~11 epochs (ML-1M sampled NDCG@10 0.24 at epoch 10 against 0.44; CE full NDCG@10 0.079
    against 0.134). Masked-item pre-training went the other way (its test model fell from clearly
    above popularity to 1.2x it in the same epochs), so it keeps the unit-variance init."""
    if cfg.emb_init_std > 0:
        return cfg.emb_init_std, cfg.emb_init_std
    if cfg.head == "masked_diffusion":
        return 1.0 / math.sqrt(item_dim), 1.0
    return 0.02, 0.02


# glibc gives blocks above its mmap threshold (32 MiB at most) back to the OS when they are freed,
# so a forward whose activations are larger page-faults them in again on every call: at batch 256
# x 50 positions x hidden 256 that was a third of fp32 scoring time and half of INT8's. CPU
# scoring therefore runs in equal row chunks whose widest activation (the fused q/k/v projection,
# rows x T x 3D floats) stays under this budget; smaller chunks also keep more of it in cache.
CPU_SCORE_CHUNK_BYTES = 8 * 2 ** 20


def score_in_chunks(score, items: torch.Tensor, timestamps, users, width: int):
    """``score(items, timestamps, users)`` over row chunks on CPU (one call elsewhere); ``score`` may
    return a tensor or a tuple of tensors (or None), each concatenated over the chunks."""
    B, T = items.shape
    rows = max(1, CPU_SCORE_CHUNK_BYTES // (T * 3 * width * 4))
    if items.device.type != "cpu" or rows >= B or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return score(items, timestamps, users)
    n = math.ceil(B / rows)
    rows = math.ceil(B / n)

    def part(t, lo):
        return None if t is None else t[lo: lo + rows]

    outs = [score(items[lo: lo + rows], part(timestamps, lo), part(users, lo)) for lo in range(0, B, rows)]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


# Catalogue items per scoring matmul. BLAS rounds a dot product differently with the width of the
# matmul it is part of (MKL: 1 in ~10 scores moves by an ulp between widths 1000 and 5001), so
# every path scores the catalogue in these fixed tiles, aligned at multiples of it: the full matrix,
# the chunked evaluation and the chunked top-k then see the very same floats whatever their chunk
# size, and a catalogue up to this size is one matmul, as it always was.
SCORE_TILE = 32768
L2_EPS = 1e-6  # model.similarity=cosine: the authors' (HSTU) l2_norm_eps


def tile_scores(q: torch.Tensor, offset: torch.Tensor | None, emb: torch.Tensor, lo: int) -> torch.Tensor:
    """Scores of the ``SCORE_TILE``-aligned tile of items starting at ``lo``: (B, Di), (B,) or None,
    (N+1, Di) → (B, tile), the padding item 0 = -inf."""
    scores = q @ emb[lo: lo + SCORE_TILE].T  # (B, tile)
    if offset is not None:
        scores = scores + offset[:, None]
    if lo == 0:
        scores[:, 0] = float("-inf")
    return scores


def all_scores(q: torch.Tensor, offset: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    """Every item's score, tile by tile: (B, N+1)."""
    n = emb.shape[0]
    if n <= SCORE_TILE:
        return tile_scores(q, offset, emb, 0)
    out = None
    for lo in range(0, n, SCORE_TILE):
        tile = tile_scores(q, offset, emb, lo)
        if out is None:  # written in place: the tiles never exist beside the whole matrix
            out = tile.new_empty(tile.shape[0], n)
        out[:, lo: lo + tile.shape[1]] = tile
    return out


class SparseRows:
    """The item table as a lookup-only head sees it when its gradient is row-sparse
    (``train.item_grad``): ``table[ids]`` goes through ``F.embedding(sparse=True)``, so backward
    yields the looked-up rows only. Whole-table access (slices, ``.T``) is not offered: a head that
    needs it scores the whole catalogue and keeps a dense table."""

    def __init__(self, weight: torch.Tensor, normalize: bool = False):
        self.weight, self.normalize = weight, normalize

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError("a row-sparse item table is looked up by index tensors only; heads that read the "
                            "whole table need train.item_grad=dense")
        rows = F.embedding(ids, self.weight, sparse=True)  # (*ids.shape, D)
        return F.normalize(rows, dim=-1, eps=L2_EPS) if self.normalize else rows


class SeqRec(nn.Module):
    def __init__(self, cfg, num_items: int, attention: AttentionKind, blocks: list[nn.Module],
                 residual: nn.Module, user: nn.Module, head: nn.Module):
        super().__init__()
        d = cfg.hidden
        self.cfg, self.num_items, self.attention = cfg, num_items, attention
        self.user = user
        di = user.item_dim
        # 0 = padding, 1..N items, N+1 = mask token (reserved so every model shares one vocab)
        self.item_emb = nn.Embedding(num_items + 2, di, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d) if attention.input_positions else None
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.residual = residual
        self.norm = nn.LayerNorm(d, eps=1e-8) if cfg.norm_first else nn.Identity()
        self.head = head
        self.scale = math.sqrt(di)
        item_std, pos_std = emb_init_std(cfg, di)
        nn.init.normal_(self.item_emb.weight, std=item_std)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=pos_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def sublayers(self):
        return [s for b in self.blocks for s in b.sublayers]

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor | None = None,
               users: torch.Tensor | None = None, last: int = 0) -> torch.Tensor:
        """Hidden state at every position: (B, T) item ids → (B, T, D); zero at padding.

        ``last=k`` returns the last k positions only, (B, k, D), equal to ``encode(...)[:, -k:]``:
        every position is still needed up to the final layer's keys and values, but the final
        layer's queries, its feed-forward and the final norm run on k rows, not T (scoring reads
        the last row: a third less work with 2 layers)."""
        T = items.shape[1]
        ctx = self.attention.context(items, timestamps, self.cfg)
        items, users = self.user.perturb(items, users)
        x = self.user.embed(self.item_emb(items) * self.scale, users)  # (B, T, D)
        if self.pos_emb is not None:
            # positions count back from the newest item, so left padding never shifts a real item's position
            x = x + self.pos_emb(torch.arange(T - 1, -1, -1, device=items.device))
        x = self.residual.expand(self.emb_drop(x) * ctx.keep)
        subs = self.sublayers()
        cut = len(subs) - len(self.blocks[-1].sublayers) if 0 < last < T else -1  # the final attention
        for i, sub in enumerate(subs):
            if i == cut:
                ctx.queries = last
            x = self.residual.connect(i, x, sub, ctx)
            if i == cut:
                ctx = ctx.last_rows(last)
        return self.norm(self.residual.reduce(x)) * ctx.keep  # (B, T, D) or (B, last, D)

    def output_embeddings(self) -> torch.Tensor:
        """Item embeddings used for scoring (tied with the input table): (N+1, Di), row 0 = padding;
        unit rows with ``model.similarity=cosine`` (the padding row stays 0)."""
        emb = self.item_emb.weight[: self.num_items + 1]
        return F.normalize(emb, dim=-1, eps=L2_EPS) if self.cfg.similarity == "cosine" else emb

    def query(self, h_item: torch.Tensor) -> torch.Tensor:
        """What scores the items: ``h_item`` itself, or with ``model.similarity=cosine`` its unit vector over
        the temperature, so a score is cos / temperature (HSTU's training logit; the ranking is the cosine's)."""
        if self.cfg.similarity == "cosine":
            return F.normalize(h_item, dim=-1, eps=L2_EPS) / self.cfg.temperature
        return h_item

    def forward(self, batch: dict[str, torch.Tensor]):
        """Training objective: (loss_sum, count) over non-padding targets."""
        if hasattr(self.head, "corrupt"):  # masked-item heads choose which inputs the model sees
            batch = self.head.corrupt(batch)
        users = batch.get("user_idx")
        h = self.encode(batch["items"], batch.get("timestamps"), users)  # (B, T, D)
        h_item, offset = self.user.split(h, users)
        cosine = self.cfg.similarity == "cosine"
        table = SparseRows(self.item_emb.weight, cosine) if self.item_emb.sparse else self.output_embeddings()
        return self.head(self.query(h_item), table, batch, offset)

    @torch.no_grad()
    def score_last(self, items: torch.Tensor, timestamps: torch.Tensor | None = None,
                   users: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for the next position after each history: (B, N+1), padding = -inf."""
        q, offset = self.score_query(items, timestamps, users)
        return all_scores(q, offset, self.output_embeddings())

    @torch.no_grad()
    def score_query(self, items: torch.Tensor, timestamps: torch.Tensor | None = None,
                    users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the next position's scores are made of: item i scores ``q . E[i] + offset`` with
        ``E = output_embeddings()``: q (B, Di), offset (B,) or None. Large catalogues are scored
        from it tile by tile (``tile_scores``), never as a (B, N+1) matrix."""
        return score_in_chunks(self._score_query, items, timestamps, users, self.cfg.hidden)

    def _score_query(self, items, timestamps, users):
        if hasattr(self.head, "query"):  # masked-item heads read the next item off an appended mask token
            items, timestamps = self.head.query(items), None
        h = self.encode(items, timestamps, users, last=1)  # (B, 1, D): histories are left-padded
        h_item, offset = self.user.split(h, users)  # (B, 1, Di), (B, 1) or None
        return self.query(h_item[:, 0]), (None if offset is None else offset[:, 0])
