"""Checks of the log's events that the sequence build counts or refuses: exact duplicate events,
held-out targets that repeat an earlier item of the user, and timestamps in mixed units.

All work on rows sorted by (user, timestamp, log row) and described by per-user run ``lengths``
(as split.py), with numpy, never a loop over users.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_prep.common import time_units, units_message
from rayrec.data.log import DataError


def _run_of_row(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths)), lengths)


def duplicates(lengths: np.ndarray, stamps: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True for each row that repeats an earlier row of its user with the same item and timestamp.

    Rows of equal (user, timestamp) are in log order, so the first occurrence is the one kept."""
    n = len(stamps)
    if n < 2:
        return np.zeros(n, bool)
    run = _run_of_row(lengths)
    order = np.lexsort((np.arange(n), items, stamps, run))  # stable: log order inside equal keys
    same = (run[order][1:] == run[order][:-1]) & (stamps[order][1:] == stamps[order][:-1]) \
        & (items[order][1:] == items[order][:-1])
    dup = np.zeros(n, bool)
    dup[order[1:][same]] = True
    return dup


def per_user(lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How many rows of each user ``mask`` marks."""
    return np.bincount(_run_of_row(lengths), weights=mask, minlength=len(lengths)).astype(np.int64)


def repeat_targets(kept_len: np.ndarray, items: np.ndarray, target_pos: np.ndarray) -> np.ndarray:
    """Per user: the item at ``target_pos`` already occurs earlier in the stored sequence
    (``s[pos] in s[:pos]``); False where ``target_pos`` is -1. ``items`` are the stored rows."""
    U = len(kept_len)
    out = np.zeros(U, bool)
    if not len(items):
        return out
    run = _run_of_row(kept_len)
    starts = np.cumsum(kept_len) - kept_len
    pos = np.arange(len(items)) - starts[run]
    order = np.lexsort((pos, items, run))  # each (user, item) group starts at its first position
    new = np.r_[True, (run[order][1:] != run[order][:-1]) | (items[order][1:] != items[order][:-1])]
    first_pos = np.empty(len(items), np.int64)
    first_pos[order] = pos[order][np.maximum.accumulate(np.where(new, np.arange(len(items)), 0))]
    has = target_pos >= 0
    rows = starts[has] + target_pos[has]
    out[has] = first_pos[rows] < target_pos[has]
    return out


class UnitCensus:
    """Counts, over the whole log, of timestamps that are plausible dates in each unit, with the
    first example rows of each: a log mixing seconds and milliseconds is refused."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, t: pa.Table) -> None:
        ts = t["timestamp"].to_numpy() if isinstance(t["timestamp"], pa.Array) else \
            t["timestamp"].combine_chunks().to_numpy(zero_copy_only=False)
        for unit, mask in time_units(ts).items():
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            self.count[unit] = self.count.get(unit, 0) + len(idx)
            ex = self.examples.setdefault(unit, [])
            for i in idx[: max(0, 2 - len(ex))]:
                r = t.slice(int(i), 1).to_pylist()[0]
                ex.append(f"log row {r['row']}: user {r['user_id']!r}, timestamp {r['timestamp']}")

    def check(self, where: str) -> None:
        if len(self.count) > 1:
            found = {u: (n, self.examples[u]) for u, n in self.count.items()}
            raise DataError(units_message(found, where) + ", then rebuild (data_prep converters take --time-unit)")
