"""Worker-side sequences: one rank's users in CSR arrays, and vectorised batches from them.

Per-epoch work (windows, left padding, negatives) is numpy over whole batches: no per-sample
Python loops. Every split is stored per user as positions into the user's items s:
training sees s[:train_len]; validation predicts s[val_pos] from s[:val_pos]; test predicts
s[test_pos] from s[:test_pos]; a position of -1 means the user is not evaluated at that stage.
The build writes these columns (rayrec/data/split.py); tables without them (older builds, hand-made
tests) get leave-last-two-out: for L >= 3, train_len = L-2, val_pos = L-2, test_pos = L-1; users
with L <= 2 train on all their items and are not evaluated (they are counted in meta.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayrec.data.log import DataError

SPLIT_COLUMNS = ("train_len", "val_pos", "test_pos")


@dataclass
class SequenceStore:
    user_idx: np.ndarray  # (U,) int64
    offsets: np.ndarray  # (U+1,) int64 into items/timestamps
    items: np.ndarray  # (total,) int32, 1..N
    timestamps: np.ndarray  # (total,) int64
    eval_negatives: np.ndarray | None  # (U, k) int32, fixed at build time
    num_items: int
    ratings: np.ndarray | None = None  # (total,) float32, when the log has a rating column
    train_len: np.ndarray | None = None  # (U,) int64 training prefix length; None = leave-last-two-out
    val_pos: np.ndarray | None = None  # (U,) int64 validation target position, -1 = none
    test_pos: np.ndarray | None = None  # (U,) int64 test target position, -1 = none

    def __post_init__(self):
        if self.train_len is None:  # leave-last-two-out from the lengths alone
            L = np.diff(self.offsets)
            ev = L >= 3
            self.train_len = np.where(ev, L - 2, L)
            self.val_pos = np.where(ev, L - 2, -1)
            self.test_pos = np.where(ev, L - 1, -1)

    @classmethod
    def from_tables(cls, tables: Iterable[pa.Table], num_items: int, rank: int = 0, world: int = 1) -> "SequenceStore":
        """Keep the users with ``user_idx % world == rank``: a shard that does not depend on block order."""
        parts = []
        for t in tables:
            if world > 1:
                t = t.filter(pa.array(t["user_idx"].to_numpy() % world == rank))
            if t.num_rows:
                parts.append(t)
        if not parts:
            raise DataError(f"rank {rank} of {world} received no users; use fewer workers than users")
        t = pa.concat_tables(parts)
        t = t.take(pc.sort_indices(t["user_idx"]))  # deterministic order whatever the block order
        items = t["items"].combine_chunks()
        stamps = t["timestamps"].combine_chunks()
        off = items.offsets.to_numpy().astype(np.int64)
        negs = None
        split = {k: t[k].to_numpy().astype(np.int64) for k in SPLIT_COLUMNS if k in t.column_names}
        if "eval_negatives" in t.column_names:
            col = t["eval_negatives"].combine_chunks()
            negs = col.flatten().to_numpy().reshape(len(t), -1).astype(np.int32)
        return cls(
            user_idx=t["user_idx"].to_numpy().astype(np.int64),
            offsets=off - off[0],
            items=items.flatten().to_numpy().astype(np.int32),
            timestamps=stamps.flatten().to_numpy().astype(np.int64),
            eval_negatives=negs,
            num_items=num_items,
            ratings=t["ratings"].combine_chunks().flatten().to_numpy().astype(np.float32) if "ratings" in t.column_names else None,
            **split,
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def train_end(self) -> np.ndarray:
        """Exclusive end of each user's training items (validation and test targets excluded)."""
        return self.offsets[:-1] + self.train_len

    def train_users(self) -> np.ndarray:
        return np.flatnonzero(self.train_end() - self.offsets[:-1] >= 2)

    def train_items(self) -> np.ndarray:
        """Every training interaction's item (validation and test items excluded)."""
        L = self.train_end() - self.offsets[:-1]
        pos = np.repeat(self.offsets[:-1] - np.r_[0, np.cumsum(L)[:-1]], L) + np.arange(L.sum())
        return self.items[pos]

    def eval_users(self, stage: str = "test") -> np.ndarray:
        """Rows evaluated at ``stage`` ('val' or 'test'); the same rows for leave-last-two-out."""
        return np.flatnonzero(self.target_pos(stage) >= 0)

    def repeat_targets(self, stage: str) -> np.ndarray:
        """(U,) bool: the user's ``stage`` target item already occurs earlier in their sequence
        (a re-purchase, a duplicated last event). Full ranking masks history items, so such a
        target cannot be recommended; ``eval.repeat_targets`` decides what that means."""
        pos = self.target_pos(stage)
        rows = np.flatnonzero(pos > 0)
        out = np.zeros(len(self.user_idx), dtype=bool)
        if not len(rows):
            return out
        stride = self.num_items + 1
        start = self.offsets[rows]
        target_keys = rows * stride + self.items[start + pos[rows]]
        L = pos[rows]
        flat = np.repeat(start - np.r_[0, np.cumsum(L)[:-1]], L) + np.arange(L.sum())
        history_keys = np.repeat(rows, L) * stride + self.items[flat]
        out[rows] = _member(target_keys, sorted_unique(history_keys))
        return out

    def target_pos(self, stage: str) -> np.ndarray:
        """Where each user's history ends: the val/test target, or 'next' = after the whole sequence."""
        if stage not in ("val", "test", "next"):
            raise ValueError(f"stage must be 'val', 'test' or 'next', got {stage!r}")
        return {"val": self.val_pos, "test": self.test_pos, "next": self.lengths}[stage]

    def forbidden_keys(self) -> np.ndarray:
        """Sorted keys row*(N+1)+item that training negatives must avoid: every history item and
        every evaluation candidate of that user."""
        stride = self.num_items + 1
        rows = np.repeat(np.arange(len(self.user_idx), dtype=np.int64), self.lengths)
        keys = [rows * stride + self.items]
        if self.eval_negatives is not None:
            r = np.repeat(np.arange(len(self.user_idx), dtype=np.int64), self.eval_negatives.shape[1])
            keys.append(r * stride + self.eval_negatives.ravel())
        return sorted_unique(np.concatenate(keys))


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` of a flat integer array. NumPy 2.3+ answers a plain ``np.unique`` with a
    hash table and then sorts it: on ML-1M's 1.6M forbidden keys that took 1.0 s of every worker's
    start, against 17 ms for a sort and a neighbour mask."""
    s = np.sort(a, axis=None)
    return s[np.r_[True, s[1:] != s[:-1]]] if s.size else s


def gather_windows(flat: np.ndarray, start: np.ndarray, end: np.ndarray, max_len: int, pad=0) -> np.ndarray:
    """Rows ``flat[start_r:end_r]``, keeping the last ``max_len`` and left-padding: (B, max_len)."""
    idx = end[:, None] - max_len + np.arange(max_len)[None, :]  # (B, T)
    valid = idx >= start[:, None]
    out = flat[np.where(valid, idx, 0)]
    out[~valid] = pad
    return out


def train_batch(store: SequenceStore, rows: np.ndarray, max_len: int, ratings: bool = False,
                trim: bool = False, end: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Inputs s[:-1] and next-item targets s[1:] of each user's training prefix, left-padded
    (with ``ratings``: the rating of each target, aligned with ``targets``). ``trim``: only as wide
    as the batch's longest prefix (at most ``max_len``); positions count back from the newest
    item, so a row's values do not depend on the width. ``end``: each row's window ends before
    this flat position instead of at its training prefix's end (``random_ends``)."""
    start = store.offsets[rows]
    end = store.train_end()[rows] if end is None else end
    if trim:
        max_len = min(max_len, max(1, int((end - 1 - start).max(initial=0))))
    b = {
        "items": gather_windows(store.items, start, end - 1, max_len),  # (B, T)
        "targets": gather_windows(store.items, start + 1, end, max_len),  # (B, T)
        "timestamps": gather_windows(store.timestamps, start, end - 1, max_len),  # (B, T)
        "user_idx": store.user_idx[rows],
    }
    if ratings:
        b["ratings"] = gather_windows(store.ratings, start + 1, end, max_len, pad=0.0)  # (B, T) float32
    return b


def random_ends(store: SequenceStore, rows: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Window ends for ``train_batch``: a ``share`` of the rows end after a uniformly random item of
    their training prefix (at least two items in, so the window has a target), the rest at its end."""
    start, end = store.offsets[rows], store.train_end()[rows]
    crop = rng.random(len(rows)) < share
    lo = np.minimum(start + 2, end)
    cut = lo + np.floor(rng.random(len(rows)) * (end - lo + 1)).astype(end.dtype)
    return np.where(crop, np.minimum(cut, end), end)


def sample_negatives(
    rng: np.random.Generator, rows: np.ndarray | None, forbidden: np.ndarray | None, num_items: int,
    shape: tuple[int, ...], rounds: int = 8, probs: np.ndarray | None = None,
) -> np.ndarray:
    """Negatives per row that avoid that row's forbidden keys; bounded work.

    Uniform over 1..N, or drawn with ``probs`` ((N+1,), probs[0] = 0) when given. Rejected draws
    are redrawn ``rounds`` times; any left (a user who has seen almost every item) are taken
    uniformly from the explicit complement, or set to 0 (padding, ignored by the loss) when the
    complement is empty, so sampling can never spin. ``rows=None``: no filtering.
    """
    if probs is None:
        def draw(size):
            return rng.integers(1, num_items + 1, size=size)
    else:
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]

        def draw(size):
            return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), num_items)

    neg = draw(shape)
    if rows is None:
        return neg
    stride = num_items + 1
    base = rows.astype(np.int64).reshape((-1,) + (1,) * (len(shape) - 1)) * stride
    bad = _member(base + neg, forbidden)
    for _ in range(rounds):
        if not bad.any():
            return neg
        neg[bad] = draw(int(bad.sum()))
        bad = _member(base + neg, forbidden)
    for r in np.unique(np.nonzero(bad)[0]):
        lo, hi = np.searchsorted(forbidden, [rows[r] * stride, (rows[r] + 1) * stride])
        allowed = np.setdiff1d(np.arange(1, stride), forbidden[lo:hi] - rows[r] * stride)
        m = bad[r]
        neg[r][m] = rng.choice(allowed, size=int(m.sum())) if allowed.size else 0
    return neg


def shared_allowed(rows: np.ndarray, negs: np.ndarray, forbidden: np.ndarray | None, num_items: int) -> np.ndarray:
    """(B, k) bool: whether shared negative j may serve batch row i (it is not one of rows[i]'s
    forbidden items). Equals ``~_member(rows[:, None] * (N+1) + negs, forbidden)``, but looks up
    each row's few forbidden items among the k negatives (sorted once) rather than every one of the
    B x k pairs among all forbidden keys (Beauty, B = 128, k = 4096: 31 -> 2.3 ms)."""
    allowed = np.ones((len(rows), len(negs)), dtype=bool)
    if forbidden is None or not len(forbidden) or not len(negs):
        return allowed
    stride = num_items + 1
    base = rows.astype(np.int64) * stride
    lo, hi = np.searchsorted(forbidden, base), np.searchsorted(forbidden, base + stride)
    row_i, items = _ranges(lo, hi)  # every (batch row, forbidden key index) pair
    items = forbidden[items] - base[row_i]
    order = np.argsort(negs, kind="stable")
    sorted_negs = negs[order]
    first, last = np.searchsorted(sorted_negs, items, "left"), np.searchsorted(sorted_negs, items, "right")
    hit_i, hit = _ranges(first, last)  # every (forbidden pair, equal negative) match
    allowed[row_i[hit_i], order[hit]] = False
    return allowed


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenation of ``arange(lo[i], hi[i])`` and, for each of its entries, its i."""
    counts = hi - lo
    owner = np.repeat(np.arange(len(lo)), counts)
    return owner, np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + lo[owner]


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def eval_batch(store: SequenceStore, rows: np.ndarray, max_len: int, stage: str, trim: bool = False) -> dict[str, np.ndarray]:
    """History window, target and seen-item positions for validation (stage='val'), test, or
    recommendation after the whole sequence (stage='next': no target, used by rayrec.infer).

    ``trim``: the window is only as wide as the batch's longest history plus one column (at most
    ``max_len``). Positions count back from the newest item and padding is masked, so scores are
    unchanged; the spare column keeps the oldest item when a masked-item head's query drops the
    first column to append its mask token. Single-step scoring only: multi-step generation
    appends several mask tokens to a full window."""
    start = store.offsets[rows]
    pos = store.target_pos(stage)[rows]
    if (pos < 0).any():
        raise ValueError(f"eval_batch: {int((pos < 0).sum())} row(s) have no {stage} target; pass store.eval_users({stage!r})")
    cut = start + pos  # history = s[:cut], target = s[cut]
    seen_len = cut - start
    seen_rows = np.repeat(np.arange(len(rows)), seen_len)
    seen_pos = np.repeat(start - np.r_[0, np.cumsum(seen_len)[:-1]], seen_len) + np.arange(seen_len.sum())
    T = min(max_len, int(seen_len.max(initial=0)) + 1) if trim else max_len
    return {
        "items": gather_windows(store.items, start, cut, T),  # (B, T)
        "timestamps": gather_windows(store.timestamps, start, cut, T),  # (B, T)
        "target": None if stage == "next" else store.items[cut].astype(np.int64),  # (B,)
        "user_idx": store.user_idx[rows],
        "seen_rows": seen_rows,  # (S,) row of each seen item in the batch
        "seen_items": store.items[seen_pos].astype(np.int64),  # (S,) the whole history, not just the window
        "negatives": None if store.eval_negatives is None else store.eval_negatives[rows].astype(np.int64),
    }
