"""Inference speed of a trained run: the Python API, the Ray Data batch job, and the exported graphs.

    python bench/infer.py runs/quickstart [--k 10] [--name infer_quickstart]

Writes bench/results/<name>.json and prints a table. Latencies are medians of repeated calls on
real users' histories (the last max_len items); the batch job is timed end to end (read,
score, write, row-count check) on every user of the run's sequences.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import write_result  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--name", default="infer_quickstart")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args(argv)

    from rayrec.infer import Recommender
    from rayrec.infer.batch import recommend_all, sequences_path
    from rayrec.infer.export import TopK, export_bundle, run_onnx
    from rayrec.ray_env import init_ray

    torch.set_num_threads(1)
    rec = Recommender.from_checkpoint(a.run)
    init_ray()
    t = pq.read_table(sequences_path(rec)).sort_by("user_idx")
    hist = {u: rec.item_id(np.asarray(s)).to_pylist() for u, s in zip(t["user_id"].to_pylist(), t["items"].to_pylist())}
    users = list(hist)
    one, many = {users[0]: hist[users[0]]}, {u: hist[u] for u in users[:256]}
    rows = []
    rows.append({"path": "api", "batch": 1, "ms": median_ms(lambda: rec.recommend(one, k=a.k), a.repeat)})
    rows.append({"path": "api", "batch": 256, "ms": median_ms(lambda: rec.recommend(many, k=a.k), a.repeat)})

    T = rec.cfg.model.max_len
    windows = torch.zeros(256, T, dtype=torch.long)
    for r, u in enumerate(users[:256]):
        idx = torch.from_numpy(rec.item_index(hist[u][-T:]))
        windows[r, T - len(idx):] = idx
    stamps = torch.cumsum((windows > 0).long(), 1)
    with tempfile.TemporaryDirectory() as tmp:
        m = export_bundle(a.run, Path(tmp) / "bundle", overrides=[f"infer.k={a.k}"])
        eager = TopK(rec.model, a.k, True)
        ts = torch.jit.load(str(Path(tmp) / "bundle" / m["files"]["torchscript"]))
        onnx_path = Path(tmp) / "bundle" / m["files"]["onnx"]
        for b in (1, 256):
            x = (windows[:b], stamps[:b])
            with torch.no_grad():
                rows.append({"path": "eager graph", "batch": b, "ms": median_ms(lambda: eager(*x), a.repeat)})
                rows.append({"path": "torchscript", "batch": b, "ms": median_ms(lambda: ts(*x), a.repeat)})
            rows.append({"path": "onnxruntime", "batch": b, "ms": median_ms(lambda: run_onnx(onnx_path, x), a.repeat)})
        # a service keeps its session: time the run alone as well
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        for b in (1, 256):
            feed = {"items": windows[:b].numpy(), "timestamps": stamps[:b].numpy()}
            rows.append({"path": "onnxruntime (session kept)", "batch": b, "ms": median_ms(lambda: sess.run(None, feed), a.repeat)})
        out = Path(tmp) / "recommendations.parquet"
        s = recommend_all(a.run, [f"infer.output={out}", f"infer.k={a.k}", "infer.cpus_per_actor=1"], progress=False)
    for r in rows:
        r["users_per_s"] = round(r["batch"] / (r["ms"] / 1000), 1)
    timings = {"batch_job_s": s["seconds"], "batch_job_users": s["users"],
               "batch_job_users_per_s": round(s["users"] / s["seconds"], 1)}
    payload = {"script": "bench/infer.py", "command": "python bench/infer.py " + " ".join(argv or sys.argv[1:]),
               "dataset": rec.cfg.data.log, "config": {"k": a.k, "model": rec.cfg.to_dict()["model"]},
               "metrics": {"export_agreement": m["agreement"]}, "timings": timings, "rows": rows}
    path = write_result(a.name, payload)
    print(f"{'path':<28} {'batch':>5} {'ms':>9} {'users/s':>9}")
    for r in rows:
        print(f"{r['path']:<28} {r['batch']:>5} {r['ms']:>9.3f} {r['users_per_s']:>9.1f}")
    print(f"batch job: {s['users']} users in {s['seconds']} s ({timings['batch_job_users_per_s']} users/s, 1 actor, "
          f"includes Ray Data start-up)\nexport agreement: {m['agreement']}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
