"""Min-interaction filters for users and items (optionally iterated to a k-core), with counts.

Counting streams the validated log block by block to the driver and keeps only value counts, so
driver memory grows with the number of distinct users and items, not with the number of rows.
Every step reports rows, users and items after it (``steps`` in meta.json / data_report.json).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger("rayrec.data")


def _merge(parts: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(parts).group_by("v").aggregate([("n", "sum")]).rename_columns(["v", "n"])


class Counts:
    """Value counts of one column, merged as blocks stream in."""

    def __init__(self):
        self.parts: list[pa.Table] = []

    def add(self, col) -> None:
        vc = pc.value_counts(col)
        self.parts.append(pa.table({"v": vc.field("values"), "n": vc.field("counts")}))
        if len(self.parts) > 64:
            self.parts = [_merge(self.parts)]

    def table(self, value_type: pa.DataType) -> pa.Table:
        if not self.parts:
            return pa.table({"v": pa.array([], value_type), "n": pa.array([], pa.int64())})
        return _merge(self.parts)


def scan(ds, columns: list[str], progress: str | None = None):
    """The dataset's blocks as pyarrow tables on the driver, with a progress bar when asked."""
    it = ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=progress, unit="block", leave=False, mininterval=2.0)
    yield from it


def row_mask(t: pa.Table, keep_users: pa.Array | None, keep_items: pa.Array | None):
    mask = None
    if keep_users is not None:
        mask = pc.is_in(t["user_id"], value_set=keep_users)
    if keep_items is not None:
        m = pc.is_in(t["item_id"], value_set=keep_items)
        mask = m if mask is None else pc.and_(mask, m)
    return mask


def count_pass(ds, keep_users=None, keep_items=None, progress: str | None = None) -> tuple[pa.Table, pa.Table]:
    """(user counts, item counts) over the rows whose user and item are kept."""
    cu, ci = Counts(), Counts()
    for t in scan(ds, ["user_id", "item_id"], progress):
        m = row_mask(t, keep_users, keep_items)
        if m is not None:
            t = t.filter(m)
        cu.add(t["user_id"])
        ci.add(t["item_id"])
    schema = ds.schema().base_schema
    return cu.table(schema.field("user_id").type), ci.table(schema.field("item_id").type)


@dataclass
class FilterResult:
    items: pa.Table  # kept items: v (raw id), n (count after filtering), sorted by v
    keep_users: pa.Array | None  # kept raw user ids; None = every user with a kept item
    steps: list[dict] = field(default_factory=list)


def _step(name: str, users: pa.Table, items: pa.Table) -> dict:
    return {"step": name, "rows": int(pc.sum(items["n"]).as_py() or 0), "users": users.num_rows, "items": items.num_rows}


def apply_filters(ds, user_counts: pa.Table, item_counts: pa.Table, min_user: int, min_item: int, kcore: bool,
                  progress: bool = False) -> FilterResult:
    """Items with >= ``min_item`` events, then users with >= ``min_user`` events among kept items;
    with ``kcore`` both are repeated until they hold at once (the unique maximal such subset)."""
    steps = [_step("input", user_counts, item_counts)]
    keep_users = None
    users, items = user_counts, item_counts
    bar = "counting" if progress else None
    rnd = 0
    while True:
        rnd += 1
        changed = False
        sfx = f" (k-core round {rnd})" if kcore else ""
        if min_item > 1:
            kept = items.filter(pc.greater_equal(items["n"], min_item))
            if kept.num_rows < items.num_rows:
                changed = True
                users, items = count_pass(ds, keep_users, kept["v"], bar)
            if changed or rnd == 1:
                steps.append(_step(f"min_item_interactions>={min_item}{sfx}", users, items))
        if min_user > 1:
            kept = users.filter(pc.greater_equal(users["n"], min_user))
            if kept.num_rows < users.num_rows:
                changed = True
                keep_users = kept["v"]
                users, items = count_pass(ds, keep_users, items["v"], bar)
                steps.append(_step(f"min_user_interactions>={min_user}{sfx}", users, items))
            elif rnd == 1:
                steps.append(_step(f"min_user_interactions>={min_user}{sfx}", users, items))
        if not kcore or not changed:
            break
    if kcore:
        log.info("k-core reached after %d round(s): %d users, %d items", rnd, users.num_rows, items.num_rows)
    items = items.filter(pc.greater(items["n"], 0))
    items = items.take(pc.sort_indices(items["v"]))
    return FilterResult(items, keep_users, steps)
