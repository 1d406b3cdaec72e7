"""Which committed results can the evaluation-integrity fixes move? Per benchmark dataset:

- repeat targets (a held-out item the user already has): ``eval.repeat_targets`` decides them
  (default ``drop``; before it they were silent misses), counted here under leave-last-two-out and
  bounded for any split by the (user, item) pairs that occur more than once;
- users with fewer unmasked candidates than the largest cut-off (20): only there could the old
  ranking of a masked target have landed inside the top k;
- exact duplicate events (user, item, timestamp), which the converters and the build now drop.

No Ray, no training: the logs come from the same converters the runs use.

    python bench/integrity_recheck.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED_DATA, sha256, write_result  # noqa: E402
from rayrec.data.batches import SequenceStore  # noqa: E402

MAX_K = 20
DATASETS = {  # name: (file under shared/data, converter) -- the datasets behind bench/results
    "ml-1m": ("sasrec/ml-1m.txt.gz", "sasrec_txt"),
    "ml-1m-ts": ("ml-1m/ratings.first487650.dat.gz", "movielens"),
    "beauty": ("s3rec/Beauty.txt.gz", "s3rec_txt"),
    "ml-100k": ("ml-100k/u.data.gz", "movielens"),
}


def convert(kind: str, src: Path, out: Path) -> Path:
    import importlib

    importlib.import_module(f"data_prep.{kind}").convert(src, out)
    return out / "interactions.parquet"


def store_of(log: pa.Table) -> SequenceStore:
    """Leave-last-two-out sequences: users in id order, events by (timestamp, row order)."""
    t = log.append_column("_row", pa.array(np.arange(log.num_rows)))
    t = t.take(pc.sort_indices(t, [("user_id", "ascending"), ("timestamp", "ascending"), ("_row", "ascending")]))
    users = t["user_id"].to_numpy()
    cuts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    items = pc.index_in(t["item_id"], value_set=pc.unique(t["item_id"])).to_numpy().astype(np.int32) + 1
    return SequenceStore(user_idx=np.arange(1, len(cuts) + 1), offsets=np.r_[cuts, len(users)].astype(np.int64),
                         items=items, timestamps=t["timestamp"].to_numpy(), eval_negatives=None,
                         num_items=int(items.max()))


def recheck(name: str, log_path: Path) -> dict:
    log = pq.read_table(log_path, columns=["user_id", "item_id", "timestamp"])
    pairs = log.group_by(["user_id", "item_id"]).aggregate([([], "count_all")])
    triples = log.group_by(["user_id", "item_id", "timestamp"]).aggregate([([], "count_all")])
    store = store_of(log)
    ev = store.eval_users("test")
    # distinct items in each test history: what full ranking masks
    seen = np.array([len(np.unique(store.items[store.offsets[u]: store.offsets[u] + store.test_pos[u]])) for u in ev])
    unmasked = store.num_items - seen
    return {
        "dataset": name, "rows": log.num_rows, "users": len(store.user_idx), "items": store.num_items,
        "evaluable_users": int(len(ev)),
        "repeated_user_item_pairs": int(pairs.num_rows and (pc.sum(pc.subtract(pairs["count_all"], 1)).as_py() or 0)),
        "exact_duplicate_events": int(triples.num_rows and (pc.sum(pc.subtract(triples["count_all"], 1)).as_py() or 0)),
        "val_repeat_targets": int(store.repeat_targets("val").sum()),
        "test_repeat_targets": int(store.repeat_targets("test").sum()),
        "min_unmasked_candidates": int(unmasked.min()),
        "users_below_max_k": int((unmasked < MAX_K).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.datasets:
            rel, kind = DATASETS[name]
            src = SHARED_DATA / rel
            row = recheck(name, convert(kind, src, Path(tmp) / name))
            row.update(file=rel, sha256=sha256(src))
            rows.append(row)
    cols = ["dataset", "rows", "evaluable_users", "repeated_user_item_pairs", "exact_duplicate_events",
            "val_repeat_targets", "test_repeat_targets", "min_unmasked_candidates", "users_below_max_k"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    movable = [r["dataset"] for r in rows if r["repeated_user_item_pairs"] or r["users_below_max_k"]]
    out = write_result("integrity_recheck", {
        "script": "bench/integrity_recheck.py", "command": "python bench/integrity_recheck.py " + " ".join(argv or sys.argv[1:]),
        "dataset": ", ".join(a.datasets), "protocol": "full",
        "metrics": {"datasets_whose_results_can_move": len(movable)},
        "note": ("a committed result can move only where a user repeats an item (repeat targets) or has fewer "
                 f"than {MAX_K} unmasked candidates (the masked-target rank); datasets where either occurs: "
                 f"{movable or 'none'}"),
        "rows": rows,
    })
    print(f"datasets whose committed results can move: {movable or 'none'}\nwrote {out.relative_to(out.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
