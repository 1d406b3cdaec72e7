"""Quantization benchmark: QAT with every method at 8 and 4 bits, AdaRound after training, the
converted INT8 model's quality, size on disk, and FP32 vs INT8 CPU scoring speed in one run.

    python bench/quant.py configs/sasrec_qat_ml1m_ts.yaml [--float-epochs 20] [--qat-epochs 3] [key=value ...]

1. trains the float model of the config (fit, best-on-validation weights);
2. for each method and bit width, fine-tunes it with QAT from those weights (``quant.init_from``)
   and records validation/test NDCG@10 of the fake-quant model (fit's own report) and of the
   converted INT8 model (``evaluate_checkpoint(..., int8=True)``, the path of
   ``jobs/evaluate.py --int8``);
3. rounds the float model with AdaRound's post-training pass (no training), fake and INT8;
   and, as the control for the QAT rows, fine-tunes the float model for the same epochs and
   learning rate without quantization (``fp32-ft``): QAT's loss against it is the quantization's,
   not the extra training's;
4. picks the best 8-bit INT8 model on validation (below) and times full-catalogue scoring
   (``score_last``) of the float model and of it, batch 1 and 256, interleaved in one process.

"Best" is the 8-bit INT8 model (any QAT method, or AdaRound after training) whose validation
NDCG@10 is closest to the float model's: quantization should reproduce the float model, and a
QAT run's validation gain is extra training that did not carry to test (every QAT method at lr
1e-4 or 3e-4 gained on validation and lost on test, as did the unquantized fine-tuning control).
The highest-validation pick is reported beside it (``best_val_8bit_method``).

Stages are cached in bench/runs/quant/ (delete it to start over), so the run can be split into
several calls. Writes bench/results/quant.json and prints a table. ``--speed-from FILE`` keeps the
scoring speed of an earlier result (a CPU without VNNI runs INT8 layers as exact fp32 emulation,
so its speed ratio says nothing about INT8 kernels); the file's host and commit are recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, sha256, write_result  # noqa: E402
from bench.quality import resolve_source  # noqa: E402

METHODS = ["lsq", "pact", "adaround", "apot", "dorefa", "ste"]
OUT = ROOT / "bench" / "runs" / "quant"
KEYS = ("val_ndcg_10", "test_ndcg_10", "test_hr_10")


def cached(name: str, fn):
    path = OUT / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    row = fn()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def pick(m: dict) -> dict:
    return {k: round(float(m[k]), 5) for k in KEYS if k in m}


def train(cfg_path: str, name: str, overrides: list[str]) -> dict:
    from rayrec.config import load_config
    from rayrec.data.prepare import ensure_log
    from rayrec.train.fit import fit

    done = any((OUT / name).glob("checkpoint_*"))  # a run cut off after training: resume = final evaluation only
    cfg = load_config(cfg_path, [f"name={name}", f"output_dir={OUT}", *overrides, f"resume={str(done).lower()}"])
    cfg.data.source.path = resolve_source(cfg.data.source.path)
    ensure_log(cfg.data)
    res = fit(cfg)
    return {"run_dir": str(res.run_dir), "epochs": res.metrics["epoch"], "best_epoch": res.metrics["best_epoch"],
            "fake": pick(res.metrics), "pop_test_ndcg_10": res.metrics.get("baseline_pop_test_ndcg_10"),
            "s_per_epoch": round(statistics.median([h["epoch_s"] for h in res.history if "epoch_s" in h] or [math.nan]), 2)}


def evaluate(run_dir: str, overrides: list[str], int8: bool) -> dict:
    from rayrec.eval.offline import evaluate_checkpoint

    metrics, _ = evaluate_checkpoint(run_dir, overrides, int8=int8)
    return pick(metrics)


def load_models(float_run: str, int8_from: str | list[str]):
    """(fp32 model, INT8 model, eval store) from best-on-validation weights; ``int8_from`` is a QAT
    run folder, or the quant overrides of AdaRound's post-training pass on the float run."""
    import ray.data

    from rayrec.config import load_config
    from rayrec.data.sequences import build_sequences
    from rayrec.eval.offline import find_checkpoint
    from rayrec.models import build_model
    from rayrec.quant import prepare
    from rayrec.quant.convert import convert
    from rayrec.train import checkpoint as ckpt
    from rayrec.train.loop import load_store

    f_dir = find_checkpoint(float_run)
    f_cfg = load_config(f_dir / ckpt.CONFIG)
    data = build_sequences(f_cfg.data)
    tables = ray.data.read_parquet(data.sequences_path).iter_batches(batch_format="pyarrow", batch_size=None)
    store = load_store(data.num_items, 0, 1, tables=tables)
    fp32 = build_model(f_cfg.model, data.num_items, data.num_users)
    fp32.load_state_dict(ckpt.load_weights(f_dir, best=True))
    if isinstance(int8_from, list):  # post-training: the path of jobs/evaluate.py FLOAT_RUN --int8 quant.method=adaround
        from rayrec.quant.offline import quantized_model

        q_cfg = load_config(f_dir / ckpt.CONFIG, int8_from)
        int8 = quantized_model(build_model(q_cfg.model, data.num_items, data.num_users), q_cfg, f_cfg,
                               ckpt.load_weights(f_dir, best=True), store, int8=True)
        return fp32.eval(), int8, store, f_cfg
    q_dir = find_checkpoint(int8_from)
    q_cfg = load_config(q_dir / ckpt.CONFIG)
    qat = prepare(build_model(q_cfg.model, data.num_items, data.num_users), q_cfg)
    qat.load_state_dict(ckpt.load_weights(q_dir, best=True))
    return fp32.eval(), convert(qat.eval()), store, f_cfg


def speed(float_run: str, int8_from: str | list[str], repeats: int, threads: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from rayrec.data.batches import eval_batch
    from rayrec.quant.convert import int8_state_dict

    torch.set_num_threads(threads)
    fp32, int8, store, cfg = load_models(float_run, int8_from)
    users = store.eval_users()
    out = {"threads": threads, "hidden": cfg.model.hidden, "max_len": cfg.model.max_len,
           "num_blocks": cfg.model.num_blocks, "items": store.num_items}
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, f"{tmp}/fp32.safetensors")
        save_file({k: v.contiguous() for k, v in int8_state_dict(int8).items()}, f"{tmp}/int8.safetensors")
        out["size_mb_fp32"] = round(os.path.getsize(f"{tmp}/fp32.safetensors") / 2 ** 20, 3)
        out["size_mb_int8"] = round(os.path.getsize(f"{tmp}/int8.safetensors") / 2 ** 20, 3)
    for bs in (1, 256):
        b = eval_batch(store, users[:bs], cfg.model.max_len, "test")
        items = torch.from_numpy(b["items"]).long()
        stamps = torch.from_numpy(b["timestamps"])
        times = {"fp32": [], "int8": []}
        with torch.no_grad():
            for model in (fp32, int8):  # warm-up (oneDNN picks its kernels on the first call)
                model.score_last(items, stamps)
            for _ in range(repeats * (8 if bs == 1 else 1)):  # interleaved: both see the same machine load
                for key, model in (("fp32", fp32), ("int8", int8)):
                    t0 = time.perf_counter()
                    model.score_last(items, stamps)
                    times[key].append(time.perf_counter() - t0)
        for key, ts in times.items():
            med = statistics.median(ts)
            out[f"{key}_latency_ms_b{bs}"] = round(med * 1e3, 3)
            out[f"{key}_users_per_s_b{bs}"] = round(bs / med, 1)
        out[f"int8_speedup_b{bs}"] = round(statistics.median(times["fp32"]) / statistics.median(times["int8"]), 3)
    return out


def readme_table(result: dict) -> str:
    """The README block, generated from bench/results/quant.json (never typed by hand)."""
    by = {}
    for r in result["rows"]:
        by.setdefault((r["method"], r["bits"]), {})[r["mode"].split()[-1]] = r
    lines = ["| method | bits | val NDCG@10 fake-quant | test NDCG@10 fake-quant | val NDCG@10 INT8 | test NDCG@10 INT8 |",
             "|---|---:|---:|---:|---:|---:|"]
    for (m, b), modes in by.items():
        f, i = modes.get("float") or modes.get("fake-quant", {}), modes.get("int8", {})
        cell = lambda d, k: f"{d[k]:.4f}" if k in d else "–"  # noqa: E731
        lines.append(f"| `{m}` | {b} | {cell(f, 'val_ndcg_10')} | {cell(f, 'test_ndcg_10')} | {cell(i, 'val_ndcg_10')} | "
                     f"{cell(i, 'test_ndcg_10')} |")
    m, t = result["metrics"], result["timings"]
    src = result.get("speed_source")
    where = (f"timed on {src['hardware']} at commit {src['commit'][:8]} with `{src['method']}` as the INT8 model; "
             if src else "")
    control = (f"; fp32 fine-tuned as long without quantization {m['fp32_ft_test_ndcg_10']:.4f} "
               f"(`int8_rel_ndcg_loss_vs_fp32_ft` {m['int8_rel_ndcg_loss_vs_fp32_ft']:.4f})" if "fp32_ft_test_ndcg_10" in m else "")
    alt = (f" The highest-validation 8-bit model, `{m['best_val_8bit_method']}`, has INT8 test NDCG@10 "
           f"{m['best_val_int8_test_ndcg_10']:.4f} (loss {m['best_val_int8_rel_ndcg_loss']:.4f})." if "best_val_8bit_method" in m else "")
    if "ptq_int8_rel_ndcg_loss" in m:
        alt += (f" AdaRound after training (the float checkpoint itself, no retraining): INT8 test NDCG@10 "
                f"{m['ptq_int8_test_ndcg_10']:.4f} (`ptq_int8_rel_ndcg_loss` {m['ptq_int8_rel_ndcg_loss']:.4f}).")
    lines += ["", f"Best 8-bit INT8 model on validation (closest to fp32): `{m['best_8bit_method']}`; INT8 test NDCG@10 "
              f"{m['int8_test_ndcg_10']:.4f} vs fp32 {m['fp32_test_ndcg_10']:.4f} (`int8_rel_ndcg_loss` "
              f"{m['int8_rel_ndcg_loss']:.4f}){control}.{alt} Scoring ({where}"
              f"hidden {t['hidden']}, max_len {t['max_len']}, {t['items']} items, {t['threads']} thread): batch 256 "
              f"fp32 {t['fp32_latency_ms_b256']:.1f} ms vs INT8 {t['int8_latency_ms_b256']:.1f} ms "
              f"(`int8_speedup_b256` {m['int8_speedup_b256']:.2f}), batch 1 {t['fp32_latency_ms_b1']:.2f} vs "
              f"{t['int8_latency_ms_b1']:.2f} ms ({m['int8_speedup_b1']:.2f}×); size on disk {m['size_mb_fp32']:.2f} MB "
              f"→ {m['size_mb_int8']:.2f} MB. ({result['hardware']}, commit {result['commit'][:8]}, "
              f"{result['float_epochs']} float epochs + {result['qat_epochs']} QAT epochs per method)"]
    return "\n".join(lines)


def update_readme() -> None:
    result = json.loads((ROOT / "bench" / "results" / "quant.json").read_text())
    from bench.blocks import replace_block

    replace_block("quant", readme_table(result))


def load_speed(path: str) -> dict:
    """An earlier quant.json whose scoring timings ``--speed-from`` reuses; a clear exit if it has none."""
    try:
        earlier = json.loads(Path(path).read_text())
        missing = [k for k in ("int8_speedup_b256", "int8_speedup_b1", "size_mb_fp32", "size_mb_int8")
                   if k not in earlier["timings"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--speed-from {path}: not a readable bench/quant.py result with timings ({e!r}); "
                         "pass an earlier bench/results/quant*.json") from None
    if missing:
        raise SystemExit(f"--speed-from {path}: its timings lack {missing}; pass a complete bench/quant.py result")
    return earlier


def ptq_overrides(bits: int) -> list[str]:
    return ["quant.method=adaround", f"quant.weight_bits={bits}", f"quant.act_bits={bits}", "quant.granularity=per_channel",
            "quant.embedding=true", "quant.scoring=true"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--qat-lr", type=float, default=3e-4)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--bits", nargs="*", type=int, default=[8, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", choices=["float", "qat", "ptq"], help="run the stages up to this one and exit")
    p.add_argument("--speed-from", metavar="JSON", help="reuse the scoring-speed timings of this earlier quant.json "
                   "(measured on a CPU with VNNI) instead of timing here")
    p.add_argument("--readme", action="store_true", help="only rewrite the README table from bench/results/quant.json")
    a = p.parse_intermixed_args(argv)
    if a.readme:
        return update_readme()
    earlier = load_speed(a.speed_from) if a.speed_from else None  # before an hour of training, not after
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from rayrec.config import load_config

    base = load_config(a.config, a.overrides)
    fp = cached("fp32", lambda: train(a.config, "fp32", [*a.overrides, f"train.epochs={a.float_epochs}"]))
    rows = [{"method": "fp32", "bits": 32, "mode": "float", **fp["fake"]}]
    if a.stop_after == "float":
        return
    qat = {}
    for bits in a.bits:
        for m in a.methods:
            name = f"{m}_w{bits}a{bits}"
            gran = "per_channel" if m in ("lsq", "adaround", "ste") else "per_tensor"
            ov = [*a.overrides, f"quant.method={m}", f"quant.weight_bits={bits}", f"quant.act_bits={bits}",
                  f"quant.granularity={gran}", f"quant.init_from={fp['run_dir']}", f"train.epochs={a.qat_epochs}",
                  f"train.lr={a.qat_lr}", "train.warmup_steps=0", "train.eval_every=1", "train.patience=0",
                  f"quant.adaround_steps={a.qat_epochs * 25}", "quant.embedding=true", "quant.scoring=true"]
            r = cached(name, lambda: train(a.config, name, ov))
            r.setdefault("int8", None)
            if r["int8"] is None:
                r["int8"] = evaluate(r["run_dir"], [], int8=True)
                (OUT / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
            qat[(m, bits)] = r
            rows.append({"method": m, "bits": bits, "mode": "qat fake-quant", **r["fake"]})
            rows.append({"method": m, "bits": bits, "mode": "qat int8", **r["int8"]})
    if a.stop_after == "qat":
        return
    ptq = {}
    for bits in a.bits:
        # the same quantized parts as the QAT rows: every Linear, the item table, the scoring input
        ov = ptq_overrides(bits)
        r = cached(f"adaround_ptq_t_w{bits}a{bits}", lambda: {"fake": evaluate(fp["run_dir"], ov, False),
                                                                "int8": evaluate(fp["run_dir"], ov, True)})
        ptq[bits] = r
        rows.append({"method": "adaround-ptq", "bits": bits, "mode": "ptq fake-quant", **r["fake"]})
        rows.append({"method": "adaround-ptq", "bits": bits, "mode": "ptq int8", **r["int8"]})
    ft_ov = [*a.overrides, f"train.init_from={fp['run_dir']}", f"train.epochs={a.qat_epochs}", f"train.lr={a.qat_lr}",
             "train.warmup_steps=0", "train.eval_every=1", "train.patience=0"]
    ft = cached("fp32_ft", lambda: train(a.config, "fp32_ft", ft_ov))
    rows.insert(1, {"method": "fp32-ft", "bits": 32, "mode": "float", **ft["fake"]})
    if a.stop_after == "ptq":
        return
    eight = {m: r for (m, b), r in qat.items() if b == 8}
    if 8 in ptq:
        eight["adaround-ptq"] = ptq[8]
    # chosen on validation, never test: closest to the float model (see the module docstring)
    f_val = fp["fake"]["val_ndcg_10"]
    best = min(eight, key=lambda m: abs(eight[m]["int8"]["val_ndcg_10"] - f_val))
    best_val = max(eight, key=lambda m: eight[m]["int8"]["val_ndcg_10"])
    int8_from = lambda m: ptq_overrides(8) if m == "adaround-ptq" else eight[m]["run_dir"]  # noqa: E731
    speed_source = None
    if earlier:
        sp = earlier["timings"]
        speed_source = {k: earlier.get(k) for k in ("hardware", "commit", "date")}
        speed_source.update(method=earlier["metrics"].get("best_8bit_method"), file=str(a.speed_from))
    else:
        from rayrec.quant.convert import vnni_available

        if not vnni_available():
            logging.warning("no VNNI on this CPU: INT8 layers run as exact fp32 emulation, so the speed ratio "
                            "measured here is not an INT8 figure (see --speed-from)")
        sp = cached(f"speed_{best}_t{a.threads}", lambda: speed(fp["run_dir"], int8_from(best), a.repeats, a.threads))
    f_test, q_test, ft_test = fp["fake"]["test_ndcg_10"], eight[best]["int8"]["test_ndcg_10"], ft["fake"]["test_ndcg_10"]
    bv_test = eight[best_val]["int8"]["test_ndcg_10"]
    metrics = {"fp32_test_ndcg_10": f_test, "best_8bit_method": best, "int8_test_ndcg_10": q_test,
               "int8_rel_ndcg_loss": round((f_test - q_test) / f_test, 5),
               "best_val_8bit_method": best_val, "best_val_int8_test_ndcg_10": bv_test,
               "best_val_int8_rel_ndcg_loss": round((f_test - bv_test) / f_test, 5),
               # the same checkpoint rounded after training: the one comparison without retraining noise
               **({"ptq_int8_test_ndcg_10": ptq[8]["int8"]["test_ndcg_10"],
                   "ptq_int8_rel_ndcg_loss": round((f_test - ptq[8]["int8"]["test_ndcg_10"]) / f_test, 5)} if 8 in ptq else {}),
               "fp32_ft_test_ndcg_10": ft_test, "int8_rel_ndcg_loss_vs_fp32_ft": round((ft_test - q_test) / ft_test, 5),
               "int8_speedup_b256": sp["int8_speedup_b256"], "int8_speedup_b1": sp["int8_speedup_b1"],
               "size_mb_fp32": sp["size_mb_fp32"], "size_mb_int8": sp["size_mb_int8"],
               "pop_test_ndcg_10": fp["pop_test_ndcg_10"]}
    src = Path(resolve_source(base.data.source.path))
    cmd = " ".join(["python bench/quant.py", a.config, *a.overrides, f"--float-epochs {a.float_epochs}",
                    f"--qat-epochs {a.qat_epochs}", f"--threads {a.threads}"]
                   + ([f"--speed-from {a.speed_from}"] if a.speed_from else []))
    out = write_result("quant", {
        "script": "bench/quant.py", "command": cmd, "dataset": src.name, "data_sha256": sha256(src) if src.exists() else "",
        "config": base.to_dict(), "protocol": "full", "metrics": metrics, "timings": sp,
        "float_epochs": a.float_epochs, "qat_epochs": a.qat_epochs, "qat_lr": a.qat_lr, "rows": rows,
        "speed_source": speed_source})
    print(f"\n{'method':<14}{'bits':>5}  {'mode':<16}{'val NDCG@10':>12}{'test NDCG@10':>13}{'test HR@10':>11}")
    for r in rows:
        print(f"{r['method']:<14}{r['bits']:>5}  {r['mode']:<16}{r.get('val_ndcg_10', float('nan')):>12.4f}"
              f"{r.get('test_ndcg_10', float('nan')):>13.4f}{r.get('test_hr_10', float('nan')):>11.4f}")
    print("\n" + "\n".join(f"  {k:<22} {v}" for k, v in {**metrics, **sp}.items()))
    print(f"wrote {out}")
    update_readme()


if __name__ == "__main__":
    main()
