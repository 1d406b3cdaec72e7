"""Sequence build at scale: a generated log of many Parquet files through the Ray Data build, next to a
single-process pyarrow build of the same sequences, with peak memory of the whole process tree.

    python bench/data.py --rows 10000000 100000000 --files 100 --users 2000000 --items 200000

Writes bench/results/data.json (format in DESIGN.md) and prints a table. The log is generated in
chunks (never whole in memory), with a Zipf user law so a few users hold a large share of rows
(the skew case), and is kept in --out between runs (delete it to regenerate).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path, rows: int, files: int, users: int, items: int, seed: int) -> Path:
    """``files`` Parquet files with rows in shuffled time order; skewed users (Zipf) and items."""
    log = out / f"log_{rows}_{files}"
    if (log / "_SUCCESS").exists():
        return log
    log.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    up = 1.0 / np.arange(1, users + 1) ** 0.9
    up /= up.sum()
    ip = 1.0 / np.arange(1, items + 1) ** 1.05
    ip /= ip.sum()
    per = -(-rows // files)
    for j in range(files):
        n = min(per, rows - j * per)
        u = rng.choice(users, size=n, p=up).astype(np.int64) + 1
        i = rng.choice(items, size=n, p=ip).astype(np.int64) + 1
        # distinct timestamps per row: equal-time ties would make row order matter across files
        t = 1_500_000_000_000 + rng.permutation(n).astype(np.int64) * files + j
        pq.write_table(pa.table({"user_id": u, "item_id": i, "timestamp": t}), log / f"part-{j:05d}.parquet",
                       row_group_size=1 << 20)
    (log / "_SUCCESS").write_text("")  # a Spark-style marker: the build lists and ignores it
    return log


class TreePeak:
    """Peak memory of this process and every descendant (Ray's raylet, object store and workers), from /proc.

    ``peak`` sums PSS: a page shared by several processes (the object store's shared memory, mapped
    by every worker that reads a block) counts once, split between them. ``peak_rss`` sums RSS, which
    counts such a page once per process that touched it: an over-count, kept for comparison.
    """

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self.peak_rss, self._stop = every, 0, 0, threading.Event()

    @staticmethod
    def _tree() -> tuple[int, int]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
        pss = rss = 0
        todo = [os.getpid()]
        while todo:
            p = todo.pop()
            todo += kids.get(p, [])
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                        elif line.startswith("Rss:"):
                            rss += int(line.split()[1]) * 1024
            except OSError:  # exited meanwhile
                continue
        return pss, rss

    def _sample(self):
        pss, rss = self._tree()
        self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)

    def _run(self):
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def pyarrow_build(log: Path) -> tuple[dict[int, list[int]], float]:
    """The same leave-last-two sequences in one process: read, stable sort, cut runs."""
    t0 = time.perf_counter()
    files = sorted(p for p in log.iterdir() if p.suffix == ".parquet")
    t = pa.concat_tables(pq.read_table(f, columns=["user_id", "item_id", "timestamp"]) for f in files)
    t = t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    t = t.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("row", "ascending")])
    u = t["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    offsets = np.r_[starts, len(u)].astype(np.int64)
    seqs = pa.ListArray.from_arrays(pa.array(offsets), t["item_id"].combine_chunks())
    wall = time.perf_counter() - t0
    return {"users": pa.array(u[starts]), "items": seqs}, wall


def seq_digest(users: pa.Array, items: pa.Array) -> str:
    order = pc.sort_indices(users)
    h = hashlib.sha256()
    h.update(users.take(order).to_numpy().tobytes())
    it = items.take(order)
    h.update(it.offsets.to_numpy().tobytes())
    h.update(it.flatten().to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def ray_build(log: Path, cache: Path, buckets: int) -> tuple[dict, float, int]:
    import ray

    from rayrec.config import DataConfig
    from rayrec.data.sequences import build_sequences

    with TreePeak() as peak:
        t0 = time.perf_counter()
        data = build_sequences(DataConfig(log=str(log), cache_dir=str(cache), eval_negatives=0, num_buckets=buckets), force=True)
        wall = time.perf_counter() - t0
    seqs = ray.data.read_parquet(data.sequences_path).select_columns(["user_id", "items"]).to_arrow_refs()
    t = pa.concat_tables(ray.get(seqs))
    vocab = pq.read_table(f"{data.root}/vocab/items.parquet")["item_id"].to_numpy()
    items = t["items"].combine_chunks()
    raw = pa.ListArray.from_arrays(items.offsets, pa.array(np.r_[0, vocab][items.flatten().to_numpy()]))
    return {"users": t["user_id"].combine_chunks(), "items": raw, "meta": data.meta}, wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[3_000_000, 10_000_000])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--buckets", type=int, default=0, help="0 = from the data size")
    ap.add_argument("--out", default="/tmp/rayrec_data_scale")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--result", default=str(ROOT / "bench/results/data.json"))
    a = ap.parse_args()

    from rayrec.ray_env import init_ray

    init_ray(num_cpus=a.num_cpus, object_store_memory=4 << 30, log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = Path(a.out)
    table, metrics = [], {}
    t_start = time.perf_counter()
    for n in a.rows:
        log = generate(out, n, a.files, a.users, a.items, seed=n % 1000)
        r, ray_s, ray_peak = ray_build(log, out / f"cache_{n}", a.buckets)
        p, pa_s = pyarrow_build(log)
        same = seq_digest(r["users"], r["items"]) == seq_digest(p["users"], p["items"])
        tag = f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"
        row = {"rows": n, "files": a.files, "buckets": r["meta"]["buckets"], "users": r["meta"]["users_out"],
               "ray_s": round(ray_s, 2), "ray_rows_per_s": round(n / ray_s), "pyarrow_s": round(pa_s, 2),
               "pyarrow_rows_per_s": round(n / pa_s), "ray_vs_pyarrow": round(pa_s / ray_s, 3),
               "peak_mem_gib": round(ray_peak.peak / 2**30, 2),
               "peak_rss_sum_gib": round(ray_peak.peak_rss / 2**30, 2), "identical": same,
               "ray_timings": r["meta"]["timings"]}
        table.append(row)
        metrics.update({f"ray_rows_per_s_{tag}": row["ray_rows_per_s"], f"pyarrow_rows_per_s_{tag}": row["pyarrow_rows_per_s"],
                        f"ray_vs_pyarrow_{tag}": row["ray_vs_pyarrow"], f"ray_s_{tag}": row["ray_s"],
                        f"peak_mem_gib_{tag}": row["peak_mem_gib"], f"peak_rss_sum_gib_{tag}": row["peak_rss_sum_gib"]})
        if not same:
            raise SystemExit(f"Ray and pyarrow sequences differ at {n} rows")
    cols = ["rows", "files", "buckets", "users", "ray_s", "ray_rows_per_s", "pyarrow_s", "pyarrow_rows_per_s",
            "ray_vs_pyarrow", "peak_mem_gib", "peak_rss_sum_gib", "identical"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"name": "data", "script": "bench/data.py",
              "command": "python bench/data.py " + " ".join(f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
                                                                  for k, v in vars(a).items() if k not in ("out", "result")),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "hardware": f"{os.cpu_count()}-core {cpu}, no GPU",
              "dataset": "generated (Zipf users 0.9, items 1.05)", "config": vars(a) | {"result": None},
              "metrics": metrics, "timings": {"wall_s": round(time.perf_counter() - t_start, 1)}, "rows": table}
    Path(a.result).parent.mkdir(parents=True, exist_ok=True)
    Path(a.result).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.result}")


if __name__ == "__main__":
    main()
