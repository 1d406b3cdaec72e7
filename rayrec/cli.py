"""``rayrec prepare | train | tune | evaluate | recommend | export | report | submit``: a config (or
run folder) followed by key.sub=value overrides."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from rayrec.config import ConfigError, load_config
from rayrec.data.log import DataError

EPILOG = "Overrides use dotted keys, e.g. train.lr=0.001 model.head=ce scale.num_workers=2"


COUNT_SUFFIXES = ("_users", "_repeat_targets", "_users_sampled_from")  # counts, not metrics


def _metric_table(metrics: dict, title: str) -> str:
    rows = [(k, v) for k, v in sorted(metrics.items())
            if isinstance(v, float) and k.startswith(("val_", "test_", "best_", "baseline_")) and not k.endswith(COUNT_SUFFIXES)]
    w = max((len(k) for k, _ in rows), default=10)
    notes = []
    for stage in ("val", "test"):
        if f"{stage}_users" not in metrics:
            continue
        n = f"{stage}: {metrics[f'{stage}_users']:,.0f} users"
        if f"{stage}_users_sampled_from" in metrics:
            n += f" (a seeded sample of {metrics[f'{stage}_users_sampled_from']:,.0f}: eval.max_users)"
        if metrics.get(f"{stage}_repeat_targets"):
            n += f", {metrics[f'{stage}_repeat_targets']:,.0f} with a repeat target (eval.repeat_targets)"
        notes.append(n)
    return "\n".join([title] + [f"  {k:<{w}}  {v:.4f}" for k, v in rows] + [f"  {n}" for n in notes])


def cmd_prepare(a) -> None:
    from rayrec.data.prepare import ensure_log, report_table
    from rayrec.data.sequences import build_sequences
    from rayrec.ray_env import init_ray

    cfg = load_config(a.config, a.overrides)
    ensure_log(cfg.data, force=a.force)
    init_ray()
    data = build_sequences(cfg.data, force=a.force)
    print(f"sequences ready: {data.root}\n{report_table(data.meta)}")


def cmd_train(a) -> None:
    from rayrec.data.prepare import ensure_log
    from rayrec.train.fit import fit
    from rayrec.train.preflight import check_output_dir

    cfg = load_config(a.config, a.overrides)
    check_output_dir(cfg)  # before converting data or starting Ray
    ensure_log(cfg.data)
    res = fit(cfg)
    print(_metric_table(res.metrics, f"\nfinished {cfg.name}: best epoch {res.metrics.get('best_epoch')} "
                                     f"(protocol: {cfg.eval.protocol} ranking; test = best-on-validation weights)"))
    print(f"\ncheckpoint: {res.checkpoint}\nrun folder: {res.run_dir}\n"
          f"TensorBoard: tensorboard --logdir {res.run_dir / 'tensorboard'}")


def cmd_evaluate(a) -> None:
    from rayrec.eval.offline import evaluate_checkpoint

    target = a.config
    overrides = list(a.overrides)
    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, overrides)
        if not cfg.eval.checkpoint:
            raise ConfigError("evaluate with a YAML config needs eval.checkpoint=<run or checkpoint folder>")
        target = cfg.eval.checkpoint
        overrides = [o for o in overrides if not o.startswith("eval.checkpoint=")]
    metrics, cfg = evaluate_checkpoint(target, overrides, int8=a.int8)
    print(_metric_table(metrics, f"evaluation of {metrics['checkpoint']} ({cfg.eval.protocol} ranking)"))
    if a.json:
        print(json.dumps(metrics))


def cmd_submit(a) -> None:
    from rayrec.submit import submit

    job_id = submit(a.config, a.overrides, a.address, a.working_dir, wait=not a.no_wait)
    print(f"submitted {job_id}; logs: ray job logs {job_id} --address {a.address}")


def cmd_tune(a) -> None:
    from rayrec.tune.sweep import resume_sweep, run_sweep

    if a.resume:
        if a.config or a.overrides:
            raise ConfigError("--resume takes the experiment folder only: the sweep's config is read from its sweep.yaml")
        res = resume_sweep(a.resume, resume_errored=a.resume_errored)
    else:
        if not a.config:
            raise ConfigError("tune needs CONFIG.yaml (with a tune: section), or --resume <experiment folder>")
        res = run_sweep(load_config(a.config, a.overrides))
    print(f"\n{res.leaderboard}\n\nexperiment: {res.exp_dir}\nresults:    {res.exp_dir / 'results.csv'}"
          f"\nbest:       {res.best_config}\nTensorBoard: tensorboard --logdir {res.exp_dir / 'runs'}")
    if res.unfinished:  # Ctrl-C: interim results; exit 130 as an interrupted command does
        print(f"\ninterrupted: {len(res.unfinished)} trial(s) unfinished; continue the sweep with:\n  {res.resume_hint}")
        raise SystemExit(130)


def _checkpoint_target(a, key: str) -> tuple[str, list[str]]:
    """A run/checkpoint folder (or URL) as given, or the one a YAML config names under ``key``."""
    target, overrides = a.config, list(a.overrides)
    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, overrides)
        section, field = key.split(".")
        target = getattr(getattr(cfg, section), field)
        if not target:
            raise ConfigError(f"{a.cmd} with a YAML config needs {key}=<run folder, checkpoint folder or bundle>")
        overrides = [o for o in overrides if not o.startswith(key + "=")]
    return target, overrides


def cmd_recommend(a) -> None:
    from rayrec.infer.batch import recommend_all

    target, overrides = _checkpoint_target(a, "infer.checkpoint")
    s = recommend_all(target, overrides)
    print(f"wrote {s['rows']:,} recommendations ({s['users']:,} users x k={s['k']}, row count checked) to {s['output']} "
          f"in {s['seconds']} s\nread them: python -c \"import pandas as pd; print(pd.read_parquet('{s['output']}').head(20))\"")


def cmd_export(a) -> None:
    from rayrec.infer.export import export_bundle

    target, overrides = _checkpoint_target(a, "infer.checkpoint")
    out = a.out or str(_local_run(target) / "export")
    m = export_bundle(target, out, formats=a.format.split(","), overrides=overrides)
    print(f"bundle: {m['bundle']} ({', '.join(m['files'].values())}); agreement with eager: {json.dumps(m['agreement'])}")


def _local_run(target: str):
    from pathlib import Path

    p = Path(target).expanduser()
    return p if "://" not in target and (p / "config.yaml").exists() and not (p / "state.json").exists() else p.parent


def cmd_report(a) -> None:
    from rayrec.infer.report import write_report

    r = write_report(a.config, a.out or None)
    print(f"report: {r['markdown']}\n" + "\n".join(f"  {p}" for p in r["plots"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rayrec", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    specs = {
        "prepare": (cmd_prepare, "convert data.source into data.log (if missing) and build the sequences"),
        "train": (cmd_train, "train on Ray Train; prints validation/test metrics and the TensorBoard command"),
        "tune": (cmd_tune, "search hyperparameters with Ray Tune (a config with a tune: section; docs/tune.md)"),
        "evaluate": (cmd_evaluate, "evaluate a run/checkpoint folder (or a YAML with eval.checkpoint)"),
        "submit": (cmd_submit, "preflight the working dir and submit jobs/train.py to a Ray cluster (docs/operations.md)"),
        "recommend": (cmd_recommend, "batch inference: top-k for every user of the training data -> recommendations.parquet "
                                     "(infer.k, infer.output, infer.num_actors, infer.device, ...)"),
        "export": (cmd_export, "write a self-contained bundle: weights, config, vocab, TorchScript and ONNX (history -> top-k)"),
        "report": (cmd_report, "PNG plots (training curves, metric@K bars, run/trial comparison) and report.md for a run or experiment folder"),
    }
    targets = {"evaluate": ", run folder or checkpoint folder", "recommend": ", run, checkpoint or bundle folder, or URL",
               "export": ", run or checkpoint folder, or URL"}
    for name, (fn, help_) in specs.items():
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        if name == "tune":
            sp.add_argument("config", nargs="?", help="CONFIG.yaml with a tune: section")
            sp.add_argument("overrides", nargs="*", help="key.sub=value (tune.* keys too)")
            sp.add_argument("--resume", metavar="EXPERIMENT", help="continue an interrupted sweep from its folder")
            sp.add_argument("--resume-errored", action="store_true", help="with --resume: also rerun errored trials")
            sp.set_defaults(fn=fn)
            continue
        if name == "report":
            sp.add_argument("config", metavar="FOLDER", help="a run folder, or a folder of runs / Tune trials")
            sp.add_argument("--out", default="", help="where the PNGs and report.md go (default: FOLDER/report)")
            sp.set_defaults(fn=fn, overrides=[])
            continue
        sp.add_argument("config", help="CONFIG.yaml" + targets.get(name, ""))
        sp.add_argument("overrides", nargs="*", help="key.sub=value")
        if name == "export":
            sp.add_argument("--out", default="", help="bundle folder (default: <run folder>/export)")
            sp.add_argument("--format", default="torchscript,onnx", help="comma-separated: torchscript, onnx")
        if name == "prepare":
            sp.add_argument("--force", action="store_true", help="re-convert the source and rebuild the sequences")
        if name == "evaluate":
            sp.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
            sp.add_argument("--int8", action="store_true", help="evaluate the real INT8 model converted from a QAT "
                            "checkpoint (or from a float one with quant.method=adaround: post-training rounding)")
        if name == "submit":
            sp.add_argument("--address", default="http://127.0.0.1:8265", help="Ray job API (dashboard) address")
            sp.add_argument("--working-dir", default=".", help="folder uploaded with the job (data excluded)")
            sp.add_argument("--no-wait", action="store_true", help="return after submission")
        sp.set_defaults(fn=fn)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        a.fn(a)
    except Exception as e:  # noqa: BLE001 - re-raised below unless its message is the whole story
        if not isinstance(e, (ConfigError, DataError, *_run_errors())):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_errors() -> tuple[type, ...]:
    """Refused checkpoints and permanent training failures: imported only once something failed
    (they bring torch and Ray, which ``rayrec --help`` does not need)."""
    from rayrec.train.checkpoint import CheckpointError
    from rayrec.train.failures import PermanentError

    return CheckpointError, PermanentError


if __name__ == "__main__":
    sys.exit(main())
