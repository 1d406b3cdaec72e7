"""A batch's scores over the catalogue met a piece at a time: ranks, top-k and gathers without a
(B, N+1) matrix, so evaluation and recommendation memory stays batch x chunk at any catalogue size.

Models with ``score_query`` (``SeqRec``) are scored tile by tile from their query vectors; any
other model (the popularity baseline, an INT8 model, anything with only ``score_last``) gives its
dense matrix, cut into the same pieces. Every reduction here is exact over pieces: counts add up,
and the running top-k keeps a total order (score, then lower item index first), so the result is
the same floats and items for every chunk size, a chunk of the whole catalogue included.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from rayrec.models.seqrec import SCORE_TILE, tile_scores

# eval.chunk_items=0: pieces of at most this many bytes of float scores per batch
CHUNK_BUDGET_BYTES = 64 * 2 ** 20
NEG_INF = float("-inf")


def chunk_size(chunk_items: int, batch: int) -> int:
    """Items per piece: ``eval.chunk_items``, or (0) as many as the memory budget allows."""
    return chunk_items if chunk_items > 0 else max(1, CHUNK_BUDGET_BYTES // (4 * max(1, batch)))


def batch_tensors(b: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(b["items"]).long().to(device), torch.from_numpy(b["timestamps"]).to(device),
            torch.from_numpy(b["user_idx"]).long().to(device))


class ItemScores:
    """The float32 scores of one batch, (B, N+1), produced one aligned tile at a time; the last
    tile is kept, so a catalogue of one tile is scored once however many passes read it."""

    def __init__(self, tile: Callable[[int], torch.Tensor], n: int, width: int):
        self._tile, self.n, self.width = tile, n, width
        self._lo, self._cached = -1, None

    @classmethod
    def of(cls, model, b: dict, device: torch.device) -> "ItemScores":
        if hasattr(model, "score_query"):
            q, offset = model.score_query(*batch_tensors(b, device))
            emb = model.output_embeddings()
            return cls(lambda lo: tile_scores(q, offset, emb, lo).float(), emb.shape[0], SCORE_TILE)
        from rayrec.eval.evaluate import score_batch  # a model without query vectors: its dense scores

        dense = score_batch(model, b, device)
        return cls(lambda lo: dense, dense.shape[1], dense.shape[1])

    @torch.no_grad()
    def tile(self, lo: int) -> torch.Tensor:
        if lo != self._lo:
            self._lo, self._cached = lo, None  # free the old tile before the new one is made
            self._cached = self._tile(lo)
        return self._cached

    def scan(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over every tile: the scores at ``cols`` (B, M) of each row, and which rows
        scored NaN anywhere."""
        rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)
        out = torch.empty(cols.shape, dtype=torch.float32, device=cols.device)
        nan = torch.zeros(cols.shape[0], dtype=torch.bool, device=cols.device)
        for lo in range(0, self.n, self.width):
            s = self.tile(lo)
            nan |= torch.isnan(s).any(dim=1)
            inside = (cols >= lo) & (cols < lo + s.shape[1])
            out[inside] = s[rows[inside], cols[inside] - lo]
        return out, nan

    def pieces(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first item, (B, piece) view) over the whole catalogue, no piece wider than ``chunk``."""
        for lo in range(0, self.n, self.width):
            s = self.tile(lo)
            for a in range(0, s.shape[1], chunk):
                yield lo + a, s[:, a: a + chunk]


class SeenMask:
    """(row, item) pairs that score -inf, sorted by item so that a piece finds its own by bisection."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor):
        items, order = items.long().sort(stable=True)
        self.rows, self.items = rows.long()[order], items

    @classmethod
    def of(cls, b: dict, device: torch.device) -> "SeenMask":
        return cls(torch.from_numpy(b["seen_rows"]).to(device), torch.from_numpy(b["seen_items"]).to(device))

    def apply(self, piece: torch.Tensor, lo: int) -> torch.Tensor:
        """The piece with its seen items at -inf (a copy; the piece itself is left as it is)."""
        bounds = torch.tensor([lo, lo + piece.shape[1]], device=self.items.device)
        a, z = torch.searchsorted(self.items, bounds).tolist()
        if a == z:
            return piece
        out = piece.clone()
        out[self.rows[a:z], self.items[a:z] - lo] = NEG_INF
        return out


def topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row, by score and then lower column first: (B, C) → two (B, k).

    ``torch.topk`` leaves open which of several equal scores it keeps and in which order (a
    popularity count or an INT8 model ties often), which would make the result depend on how the
    catalogue was cut. NaN counts as -inf."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        vals, cols = scores.topk(k + 1, dim=1)  # (B, k+1), descending
        if torch.isnan(vals).any():  # topk ranks NaN first, so any NaN shows here
            return topk_stable(scores.nan_to_num(nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF), k)
        tie = vals[:, k - 1] == vals[:, k]  # rows whose k-th place is shared with a column left out
        vals, cols = _by_score_then_column(vals[:, :k], cols[:, :k])
        if tie.any():
            r = tie.nonzero().squeeze(1)
            vals[r], cols[r] = _lowest_columns_of_ties(scores[r], k)
        return vals, cols
    return _lowest_columns_of_ties(scores.nan_to_num(nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF), k)


def _by_score_then_column(vals: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cols, order = cols.sort(dim=1)
    vals = vals.gather(1, order)
    order = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, order), cols.gather(1, order)


def _lowest_columns_of_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_stable`` where the k-th score may be shared: the lowest tied columns get the places."""
    kth = scores.topk(k, dim=1).values[:, -1:]  # (B, 1): the k-th score, whichever tied column topk took
    above, tied = scores > kth, scores == kth
    tied &= tied.cumsum(dim=1, dtype=torch.int32) <= (k - above.sum(dim=1, keepdim=True))
    cols = (above | tied).nonzero()[:, 1].reshape(-1, k)  # (B, k) ascending column
    return _by_score_then_column(scores.gather(1, cols), cols)


class RunningTopK:
    """``topk_stable`` over pieces met in increasing item order."""

    def __init__(self, k: int):
        self.k, self.values, self.items = k, None, None

    def add(self, piece: torch.Tensor, lo: int) -> None:
        vals, cols = topk_stable(piece, self.k)
        if self.values is None:
            self.values, self.items = vals, cols + lo
            return
        # every kept item precedes the piece's, and stable sorting keeps that order among equal scores
        vals, items = torch.cat([self.values, vals], 1), torch.cat([self.items, cols + lo], 1)
        order = vals.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        self.values, self.items = vals.gather(1, order), items.gather(1, order)


def top_items(src: ItemScores, seen: SeenMask | None, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best items (seen ones at -inf): scores and item indices, (B, k) each."""
    top = RunningTopK(k)
    for lo, piece in src.pieces(chunk):
        top.add(seen.apply(piece, lo) if seen is not None else piece, lo)
    return top.values, top.items


def count_against(src: ItemScores, target_scores: torch.Tensor, seen: SeenMask | None, chunk: int,
                  top: RunningTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """(above, equal): items scored strictly above / exactly at each row's target score, with the
    seen items at -inf; the running top-k is fed the same pieces."""
    t = target_scores[:, None]
    above = torch.zeros(len(t), dtype=torch.int64, device=t.device)
    equal = torch.zeros_like(above)
    for lo, piece in src.pieces(chunk):
        s = seen.apply(piece, lo) if seen is not None else piece
        above += (s > t).sum(dim=1)
        equal += (s == t).sum(dim=1)
        top.add(s, lo)
    return above, equal
