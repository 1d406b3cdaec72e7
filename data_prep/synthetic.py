"""A synthetic interaction log with real sequential structure, for tests and the offline demo.

Each item has a few preferred successors; a user's next item follows one of the current item's
successors with probability ``follow`` and is otherwise drawn from a Zipf popularity law. A model
that reads the sequence can therefore beat a most-popular ranking by a wide margin, and a model
that ignores order cannot.

    python -m data_prep.synthetic --out data/synthetic --users 2000 --items 500
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from data_prep.common import DataPrepError, run_cli, write_log


@dataclass
class SyntheticSpec:
    users: int = 2000
    items: int = 500
    mean_len: int = 30
    min_len: int = 5
    successors: int = 3
    follow: float = 0.8
    zipf: float = 1.1
    seed: int = 0


def generate(spec: SyntheticSpec) -> pa.Table:
    """Return the log as a table sorted by timestamp (stable), like a real event log.

    Users never repeat an item (as in MovieLens), so a full-ranking evaluation that masks seen
    items can still reach every target.
    """
    if spec.users < 1 or spec.items < spec.successors + 1 or spec.min_len < 1 or spec.mean_len < spec.min_len:
        raise DataPrepError(f"bad synthetic spec {spec}: need users>=1, items>successors, mean_len>=min_len>=1")
    if not 0.0 <= spec.follow <= 1.0:
        raise DataPrepError(f"follow must be in [0, 1], got {spec.follow}")
    rng = np.random.default_rng(spec.seed)
    pop = 1.0 / np.arange(1, spec.items + 1) ** spec.zipf
    pop /= pop.sum()
    item_ids = rng.permutation(spec.items) + 1  # popularity rank is unrelated to the raw id
    # successors are uniform, so the sequential signal is distinct from popularity
    succ = (np.arange(spec.items)[:, None] + rng.integers(1, spec.items, size=(spec.items, spec.successors))) % spec.items
    lengths = np.minimum(np.maximum(spec.min_len, rng.poisson(spec.mean_len, size=spec.users)), spec.items)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    items = np.empty(int(lengths.sum()), dtype=np.int64)
    chunk = max(1, 50_000_000 // spec.items)  # bounds the (users x items) seen matrix
    for lo in range(0, spec.users, chunk):
        users = np.arange(lo, min(spec.users, lo + chunk))
        seen = np.zeros((users.size, spec.items), dtype=bool)
        cur = rng.choice(spec.items, size=users.size, p=pop)
        for step in range(int(lengths[users].max())):
            active = np.flatnonzero(lengths[users] > step)
            if step > 0:
                follow = rng.random(active.size) < spec.follow
                nxt = np.where(follow, succ[cur[active], rng.integers(0, spec.successors, size=active.size)],
                               rng.choice(spec.items, size=active.size, p=pop))
                for _ in range(4):  # seen already: jump by popularity instead
                    again = seen[active, nxt]
                    if not again.any():
                        break
                    nxt[again] = rng.choice(spec.items, size=int(again.sum()), p=pop)
                again = seen[active, nxt]
                if again.any():  # still seen: the most popular unseen item
                    rows = active[again]
                    nxt[again] = np.argmax(~seen[rows], axis=1)
                cur[active] = nxt
            seen[active, cur[active]] = True
            items[starts[users[active]] + step] = cur[active]
    user = np.repeat(np.arange(1, spec.users + 1, dtype=np.int64), lengths)
    t0 = rng.integers(1_500_000_000, 1_600_000_000, size=spec.users)
    gaps = rng.integers(1, 86_400, size=items.size)
    gaps[starts] = 0
    csum = np.cumsum(gaps)
    ts = t0[user - 1] + csum - np.repeat(csum[starts], lengths)  # per-user running time
    order = np.argsort(ts, kind="stable")
    rating = rng.integers(1, 6, size=items.size).astype(np.float32)
    return pa.table(
        {
            "user_id": user[order],
            "item_id": item_ids[items[order]],
            "timestamp": ts[order].astype(np.int64),
            "rating": rating[order],
        }
    )


def generate_large(spec: SyntheticSpec) -> pa.Table:
    """The same kind of log as ``generate`` at catalogues of 10^5-10^7 items, in time and memory that
    follow the events, not users x items: popularity draws by inverse CDF, no per-user seen matrix.
    A user's repeated items are dropped after generation (first kept), so histories hold distinct
    items as in ``generate`` and can come out a few events shorter than drawn."""
    if spec.users < 1 or spec.items < spec.successors + 1 or spec.min_len < 1 or spec.mean_len < spec.min_len:
        raise DataPrepError(f"bad synthetic spec {spec}: need users>=1, items>successors, mean_len>=min_len>=1")
    rng = np.random.default_rng(spec.seed)
    cdf = np.cumsum(1.0 / np.arange(1, spec.items + 1) ** spec.zipf)
    cdf /= cdf[-1]
    item_ids = rng.permutation(spec.items) + 1

    def popular(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), spec.items - 1)

    succ = (np.arange(spec.items)[:, None] + rng.integers(1, spec.items, size=(spec.items, spec.successors))) % spec.items
    lengths = np.minimum(np.maximum(spec.min_len, rng.poisson(spec.mean_len, size=spec.users)), spec.items)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    items = np.empty(int(lengths.sum()), dtype=np.int64)
    cur = popular(spec.users)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)
        if step > 0:
            follow = rng.random(active.size) < spec.follow
            nxt = popular(active.size)
            nxt[follow] = succ[cur[active[follow]], rng.integers(0, spec.successors, size=int(follow.sum()))]
            cur[active] = nxt
        items[starts[active] + step] = cur[active]
    user = np.repeat(np.arange(spec.users, dtype=np.int64), lengths)
    first = np.zeros(items.size, dtype=bool)
    first[np.unique(user * spec.items + items, return_index=True)[1]] = True  # a user's first use of an item
    user, items = user[first], items[first]
    lengths = np.bincount(user, minlength=spec.users)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    t0 = rng.integers(1_500_000_000, 1_600_000_000, size=spec.users)
    gaps = rng.integers(1, 86_400, size=items.size)
    gaps[starts[lengths > 0]] = 0
    csum = np.cumsum(gaps)
    ts = t0[user] + csum - np.repeat(csum[starts], lengths)
    order = np.argsort(ts, kind="stable")
    return pa.table({"user_id": user[order] + 1, "item_id": item_ids[items[order]], "timestamp": ts[order].astype(np.int64)})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for interactions.parquet + meta.json")
    for f, v in asdict(SyntheticSpec()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = SyntheticSpec(**{f: getattr(a, f) for f in asdict(SyntheticSpec())})
    write_log(generate(spec), a.out, source="synthetic", extra={"synthetic_spec": asdict(spec)})


if __name__ == "__main__":
    run_cli(main)
