"""Evaluation splits as per-user positions, computed with numpy inside each user bucket.

A built user row stores its kept items s and three positions (rayrec/data/batches.py reads them):
training sees s[:train_len]; validation predicts s[val_pos] from s[:val_pos]; test predicts
s[test_pos] from s[:test_pos]; -1 = not evaluated at that stage.

- ``leave_last_two``: the user's most recent ``max_history`` events; for L >= 3, validation is
  s[L-2] and test s[L-1]; shorter users only train.
- ``time`` (the global time split of DiffSASRec): ``cut`` is the ``time_quantile`` of every
  input timestamp; events with timestamp < cut are *pre-cut*. Training uses pre-cut events only.
  Test: the first post-cut event whose item occurs in the (filtered) pre-cut log, for users with at
  least one pre-cut event, later post-cut events tried in order; its input is the whole pre-cut
  history, never the post-cut events before it. Validation: the last pre-cut event of users with
  >= 3 pre-cut events (so a validated user keeps at least one training pair), predicted from the
  events before it. Post-cut events other than the holdout are dropped and counted; users with no
  pre-cut event are dropped and counted. ``max_history`` keeps the most recent pre-cut events.

Both functions work on rows sorted by (user, timestamp, log row) and described by per-user run
``lengths``; they never loop over users in Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_LIMIT = np.iinfo(np.int64).max


@dataclass
class SplitSpec:
    kind: str  # "leave_last_two" | "time"
    max_history: int = 0  # 0 = keep every event
    cut: int = 0  # time: first post-cut timestamp
    pre_items: np.ndarray | None = None  # time: (N+1,) bool, item index occurs before the cut

    @property
    def limit(self) -> int:
        return self.max_history or NO_LIMIT


def _runs(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run start of each user, user of each row, position of each row inside its user's run)."""
    starts = (np.cumsum(lengths) - lengths).astype(np.int64)
    user = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - starts[user]
    return starts, user, pos


def _first_where(mask: np.ndarray, pos: np.ndarray, user: np.ndarray, n_users: int) -> np.ndarray:
    """Per user, the smallest ``pos`` where ``mask`` holds; -1 when none."""
    first = np.full(n_users, NO_LIMIT, dtype=np.int64)
    np.minimum.at(first, user[mask], pos[mask])
    return np.where(first == NO_LIMIT, -1, first)


def block_keep(lengths: np.ndarray, stamps: np.ndarray, items: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """Rows of one input block that can still matter once every block of the user is merged.

    The user's global most recent ``max_history`` (pre-cut) events are among the union of each
    block's most recent ones, and the global first eligible post-cut event is among the blocks'
    first ones; so a user with millions of events sends at most ``max_history + 1`` rows per
    block to its bucket. A user keeps at least one row per block, which carries the block's drop
    counts (see ``positions``).
    """
    starts, user, pos = _runs(lengths)
    L = lengths[user]
    if spec.kind == "leave_last_two":
        return L - pos <= spec.limit
    pre = stamps < spec.cut
    n_pre = np.bincount(user, weights=pre, minlength=len(lengths)).astype(np.int64)
    keep = pre & (n_pre[user] - pos <= spec.limit)  # pre-cut rows form a prefix of the sorted run
    first = _first_where(~pre & spec.pre_items[items], pos, user, len(lengths))
    keep |= (pos == first[user])
    has = np.bincount(user, weights=keep, minlength=len(lengths)) > 0
    keep |= (~has[user]) & (pos == 0)
    return keep


@dataclass
class Positions:
    keep_row: np.ndarray  # (n,) bool: rows stored in the user's sequence
    keep_user: np.ndarray  # (U,) bool
    train_len: np.ndarray  # (U,) int32
    val_pos: np.ndarray
    test_pos: np.ndarray
    truncated: np.ndarray  # (U,) rows dropped by max_history (incl. earlier block-level drops)
    unused_post: np.ndarray  # (U,) post-cut rows that are not the holdout


def positions(lengths: np.ndarray, stamps: np.ndarray, items: np.ndarray, spec: SplitSpec,
              skip_pre: np.ndarray | None = None, skip_post: np.ndarray | None = None) -> Positions:
    """Select the stored rows of each user and place the split; ``skip_*`` are per-row counts of
    rows already dropped by ``block_keep`` (pre-cut/truncated and post-cut)."""
    U = len(lengths)
    starts, user, pos = _runs(lengths)
    L = lengths.astype(np.int64)
    sp = np.zeros(U, np.int64) if skip_pre is None else np.bincount(user, weights=skip_pre, minlength=U).astype(np.int64)
    spost = np.zeros(U, np.int64) if skip_post is None else np.bincount(user, weights=skip_post, minlength=U).astype(np.int64)
    if spec.kind == "leave_last_two":
        keep_row = L[user] - pos <= spec.limit
        k = np.minimum(L, spec.limit)
        ev = k >= 3
        train_len, val_pos, test_pos = np.where(ev, k - 2, k), np.where(ev, k - 2, -1), np.where(ev, k - 1, -1)
        keep_user = np.ones(U, bool)
        truncated, unused = L - k + sp, spost
    else:
        pre = stamps < spec.cut
        n_pre = np.bincount(user, weights=pre, minlength=U).astype(np.int64)
        keep_user = n_pre >= 1
        first = _first_where(~pre & spec.pre_items[items], pos, user, U)
        has_test = keep_user & (first >= 0)
        k = np.minimum(n_pre, spec.limit)
        keep_row = (pre & (n_pre[user] - pos <= spec.limit)) | (has_test[user] & (pos == first[user]))
        keep_row &= keep_user[user]
        ev = k >= 3
        train_len, val_pos, test_pos = np.where(ev, k - 1, k), np.where(ev, k - 1, -1), np.where(has_test, k, -1)
        truncated = n_pre - k + sp
        unused = (L - n_pre) - has_test + spost
    return Positions(keep_row, keep_user, train_len.astype(np.int32), val_pos.astype(np.int32), test_pos.astype(np.int32),
                     truncated, unused)


def exact_quantile(scan, n: int, q: float, lo: int, hi: int, bins: int = 1 << 16) -> int:
    """The timestamp at rank floor(q * n) (0-based) of all ``n`` timestamps, exactly, in bounded memory.

    ``scan()`` yields numpy int64 timestamp chunks. Each pass histograms the values in [lo, hi] and
    narrows to the bin holding the rank (a range of 2^64 needs at most 4 passes), so no pass
    holds more than ``bins`` counters whatever the log size.
    """
    k = min(n - 1, int(np.floor(q * n)))
    hi = hi + 1  # exclusive
    while hi - lo > 1:
        width = -(-(hi - lo) // bins)
        hist = np.zeros(bins, np.int64)
        below = 0
        for ts in scan():
            below += int((ts < lo).sum())
            inside = ts[(ts >= lo) & (ts < hi)]
            hist += np.bincount(((inside - lo) // width).astype(np.int64), minlength=bins)[:bins]
        csum = np.cumsum(hist)
        b = int(np.searchsorted(csum, k - below, side="right"))
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width)
    return int(lo)
