"""A Tune sweep: one driver function per trial that calls the same ``fit(cfg)`` as ``jobs/train.py``.

Layout of an experiment folder ``<output_dir>/<tune.name>/``::

    sweep.yaml                the resolved base config + tune section (what --resume reads)
    trial_00000/ ...          Tune's own trial folders (result.json, progress.csv, events)
    runs/trial_00000/         each trial's Train run: checkpoints, tensorboard/ (scalars + HParams)
    results.parquet/.csv      every trial's config and metrics
    best_config.yaml          the best trial as a config that jobs/train.py runs
    metric_by_epoch.png       the tune metric per trial over epochs

Trial names come from Tune's trial id (``trial_00000`` with random/grid search, ``trial_<8 hex>``
with Optuna), never from a time; the ids are kept in the experiment state, so a restored sweep finds
each trial's run folder and continues it from its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrec.config import Config, ConfigError, TuneConfig, _set_path, config_from_dict, load_config
from rayrec.tune.space import Param, search_alg_name, tune_metric, validate_tune
from rayrec.tune.storage import SEARCHER_FILES, STATE_FILES, sweep_filesystem

log = logging.getLogger("rayrec.tune")
SWEEP_FILE = "sweep.yaml"
RUNS = "runs"


def trial_name(trial) -> str:
    # random/grid ids are "<experiment id>_<index>": the index alone reads well; searcher ids have no "_"
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def experiment_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir).expanduser().absolute() / (cfg.tune.name or f"{cfg.name}_tune")


def trial_config(base: dict[str, Any], sampled: dict[str, Any], exp_dir: str, name: str) -> Config:
    """The full run config of one trial: the base config with the sampled dotted keys set."""
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    for key, value in sampled.items():
        _set_path(raw, key, list(value) if isinstance(value, tuple) else value)
    raw.update(name=name, output_dir=str(Path(exp_dir) / RUNS), resume=False)
    return config_from_dict(raw)


def _pass_index(epoch: int, eval_every: int) -> int:
    """1-based index of the validation pass at ``epoch`` (passes every ``eval_every`` epochs and at the last)."""
    return -(-int(epoch) // eval_every)


def tune_result(metrics: dict[str, Any], eval_every: int) -> dict[str, Any]:
    """A Train report as the Tune result it becomes, with its ``training_iteration`` set from the
    epoch rather than counted by Tune: a trial restored after Ctrl-C or a lost driver restarts
    Tune's count at 1 (its Tune state holds no checkpoint), but its Train run continues at its
    checkpoint's epoch. Iteration n is validation pass n; the final report (test metrics) comes one
    after the last pass and says ``epochs`` (epochs trained) instead of repeating the last ``epoch``."""
    out = dict(metrics)
    if out.get("final") == 1:
        out["epochs"] = out.pop("epoch", 0)
        out["training_iteration"] = _pass_index(out["epochs"], eval_every) + 1
    elif "epoch" in out:
        out["training_iteration"] = _pass_index(out["epoch"], eval_every)
    return out


def _report_callback(metric: str, eval_every: int):
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        """Forwards only reports that carry the tune metric (validation epochs and the final report):
        Tune requires the metric in every result, and ASHA's rungs then count validation passes."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, [tune_result(metrics[0], eval_every), *metrics[1:]], checkpoint)

    return ValidationReportCallback()


def _epochs_seen(result_json: Path) -> int:
    """The last epoch a trial's Tune log (``<experiment>/<trial>/result.json``) holds, 0 if none."""
    try:
        lines = result_json.read_text().splitlines()
    except OSError:
        return 0
    last = 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off by a kill
            continue
        if row.get("final") != 1 and isinstance(row.get("epoch"), (int, float)):
            last = max(last, int(row["epoch"]))
    return last


def unseen_passes(cfg: Config, result_json: Path, metric: str) -> list[dict[str, Any]]:
    """Validation passes that the trial's Train run has checkpointed but its Tune log never got.

    A driver interrupted or killed between a Train checkpoint and Tune's processing of that report
    loses the report; the resumed Train run continues after the checkpoint, so without these the
    trial's history would have a hole. They come from the ``state.json`` history of the checkpoint
    ``fit`` resumes from (the newest valid one)."""
    from rayrec.train import checkpoint as ckpt

    found = ckpt.candidates(cfg.run_dir)
    latest = ckpt.newest_valid(found) if found else None
    if latest is None:
        return []
    try:
        history = ckpt.load_state(latest).get("history", [])
    except (ckpt.CheckpointError, OSError):
        return []  # fit refuses it with the reason
    seen = _epochs_seen(result_json)
    return [{k: v for k, v in h.items() if k != "call"} for h in history
            if metric in h and h.get("final") != 1 and int(h.get("epoch", 0)) > seen]


def run_trial(sampled: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """Tune's trainable: one trial = one ``fit(cfg)`` with a callback that feeds Tune."""
    from ray import tune

    from rayrec.train.fit import fit
    from rayrec.train.tb import has_session
    from rayrec.tune.report import write_trial_hparams

    base_cfg = config_from_dict(base)
    metric, eval_every = tune_metric(base_cfg), base_cfg.train.eval_every
    name = tune.get_context().get_trial_name()
    cfg = trial_config(base, sampled, exp_dir, name)  # a bad combination fails here, alone
    if not has_session(cfg.run_dir / "tensorboard"):
        write_trial_hparams(cfg, sampled, metric)
    # a restored trial: first the passes its Tune log missed, so its history has every pass once
    for row in unseen_passes(cfg, Path(exp_dir) / name / "result.json", metric):
        tune.report(tune_result(row, eval_every))
    # the trial folder is the sweep's own: its HParams session, and the checkpoints of an attempt that
    # was interrupted, which a restored trial continues (with none, the trial starts from scratch)
    cfg.resume = True
    fit(cfg, callbacks=[_report_callback(metric, eval_every)])


@dataclass
class SweepResult:
    exp_dir: Path
    table: Any  # pandas DataFrame, one row per trial
    best_config: Path | None
    leaderboard: str
    unfinished: list[str] = field(default_factory=list)  # interrupted or pending trials: the sweep was cut off

    @property
    def resume_hint(self) -> str | None:
        from rayrec.tune.report import resume_command

        return resume_command(self.exp_dir) if self.unfinished else None


def _trainable(base: dict[str, Any], exp_dir: Path, trial_cpus: float):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, base=base, exp_dir=str(exp_dir)), {"cpu": trial_cpus})


def _check_capacity(cfg: Config) -> None:
    import ray

    if os.environ.get("RAYREC_AUTOSCALING") == "1":
        return
    s, t = cfg.scale, cfg.tune
    one = t.trial_cpus + s.num_workers * s.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if one > have + 1e-9:
        raise ConfigError(f"one trial asks tune.trial_cpus {t.trial_cpus} + scale.num_workers {s.num_workers} x "
                          f"scale.cpus_per_worker {s.cpus_per_worker} = {one:g} CPUs but the cluster has {have:g}; "
                          "lower scale.cpus_per_worker (fractions are fine)")
    # a starting trial reads its sequences with Ray Data, whose Parquet sampling tasks take 1 whole CPU:
    # the running trials must leave that free, or the new trial waits for it forever
    spare = have - t.trial_cpus - 1.0  # what the running trials may hold while one more starts
    if spare < -1e-9:
        raise ConfigError(f"a starting trial needs tune.trial_cpus {t.trial_cpus} + 1 free CPU for its Ray Data read, "
                          f"but the cluster has {have:g} CPUs; add CPUs or lower tune.trial_cpus")
    fits = 1 + int((spare + 1e-9) // one)
    if t.max_concurrent_trials > fits:
        log.warning("tune.max_concurrent_trials %d -> %d: %d running trials x %g CPUs would leave less than the 1 CPU "
                    "a starting trial's Ray Data read needs (cluster: %g CPUs)", t.max_concurrent_trials, fits,
                    t.max_concurrent_trials - 1, one, have)
        t.max_concurrent_trials = fits


def _tuner_config(cfg: Config, params: list[Param]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    metric = tune_metric(cfg)
    scheduler = FIFOScheduler()
    passes = -(-cfg.train.epochs // cfg.train.eval_every)
    if t.scheduler == "asha" and passes < 2:
        log.warning("tune.scheduler=asha: %d validation pass(es) per trial leave no pass before the last to "
                    "stop at; running every trial to the end (raise train.epochs or lower train.eval_every)", passes)
    elif t.scheduler == "asha":
        # one Tune result per validation pass, then the final report (best-on-validation + test). Rungs
        # (grace * rf^k <= max_t) sit only on passes before the last: a trial that reached its last
        # pass has spent its training and always gets tested. stop_last_trials=False: the final
        # report, not max_t, ends a trial.
        max_t = passes - 1
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(t.grace_period, max_t),
                                  reduction_factor=t.reduction_factor, stop_last_trials=False)
    search_alg = None
    if search_alg_name(cfg, params) == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=t.seed))
    return tune.TuneConfig(metric=metric, mode=t.mode, num_samples=t.num_samples,
                           max_concurrent_trials=t.max_concurrent_trials, scheduler=scheduler, search_alg=search_alg,
                           trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def _run_config(cfg: Config, exp_dir: Path):
    from ray import tune

    from rayrec.tune.history import logger_callbacks

    return tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent), storage_filesystem=sweep_filesystem(),
                          failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures, fail_fast=False),
                          callbacks=logger_callbacks())


class _OwnResumeHint(logging.Filter):
    """Drops Ray's "Resume experiment with: Tuner.restore(...)" advice after Ctrl-C: a sweep is
    resumed with ``python jobs/tune.py --resume <experiment>``, which ``_finish`` prints instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def _fit(tuner):
    hint = _OwnResumeHint()
    ray_log = logging.getLogger("ray.tune.tune")
    ray_log.addFilter(hint)
    try:
        return tuner.fit()
    finally:
        ray_log.removeFilter(hint)


def _init_ray() -> None:
    import ray

    from rayrec.ray_env import init_ray, start_local_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        init_ray()
        return
    # with the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
    # dashboard) whether a trial's controller is gone; without it, the workers' CPUs of a trial that
    # ASHA stopped stay reserved and later trials wait for them forever
    start_local_ray(include_dashboard=True)


def _prepare(cfg: Config) -> None:
    """Data work done once on the driver, so concurrent trials only read the cache."""
    from rayrec.data.prepare import ensure_log
    from rayrec.data.sequences import build_sequences
    from rayrec.train.preflight import check_output_dir, check_trainable

    check_output_dir(cfg)
    ensure_log(cfg.data)
    _init_ray()
    _check_capacity(cfg)
    check_trainable(cfg, build_sequences(cfg.data).meta)


def _absolute_paths(cfg: Config) -> None:
    """Trials run in Ray worker processes whose working folder is not the user's: pin local paths."""
    d = cfg.data
    for obj, attr in ((d, "log"), (d, "cache_dir"), (d.source, "path"), (cfg.scale, "storage_path")):
        value = getattr(obj, attr)
        if value and "://" not in value and (attr != "path" or Path(value).expanduser().exists()):
            setattr(obj, attr, str(Path(value).expanduser().absolute()))
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().absolute())


def run_sweep(cfg: Config) -> SweepResult:
    """Start a new sweep for a config with a ``tune`` section; refuses to overwrite an existing one."""
    from ray import tune

    params = validate_tune(cfg)  # again: a config built in code may have skipped load_config
    if cfg.tune == TuneConfig() or not any(p.dist != "fixed" for p in params):
        raise ConfigError("the config has no tune.space to search; add e.g. "
                          "tune: {space: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}}")
    exp_dir = experiment_dir(cfg)
    if (exp_dir / SWEEP_FILE).exists():
        raise ConfigError(f"{exp_dir} already holds a sweep; continue it with --resume {exp_dir}, "
                          "or choose a new tune.name=... (nothing was overwritten)")
    _absolute_paths(cfg)
    _prepare(cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SWEEP_FILE).write_text(cfg.to_yaml())
    base = cfg.to_dict()
    log.info("sweep %s: %d searched keys, search=%s, scheduler=%s", exp_dir, len(params),
             search_alg_name(cfg, params), cfg.tune.scheduler)
    tuner = tune.Tuner(_trainable(base, exp_dir, cfg.tune.trial_cpus),
                       param_space={p.key: p.to_tune() for p in params},
                       tune_config=_tuner_config(cfg, params), run_config=_run_config(cfg, exp_dir))
    return _finish(cfg, exp_dir, _fit(tuner))


def _complete_pickle(path: Path) -> bool:
    try:  # walks the opcodes without running any: a cut-off pickle ends before its STOP
        for _ in pickletools.genops(path.read_bytes()):
            pass
        return True
    except (ValueError, OSError):
        return False


def _newest(exp_dir: Path, pattern: str) -> Path | None:
    names = sorted(p.name for p in exp_dir.glob(pattern))  # Tune restores the greatest name
    return exp_dir / names[-1] if names else None


def check_experiment_state(exp_dir: Path) -> None:
    """Refuse to resume from state Tune cannot read: Tune would log the error and silently start the
    sweep over, rerunning finished trials into their old folders."""
    state = _newest(exp_dir, STATE_FILES)
    if state is None:
        raise ConfigError(f"{exp_dir} has no {STATE_FILES} (interrupted before the first trial started); "
                          "delete it and start the sweep again")
    try:
        if not isinstance(json.loads(state.read_text())["trial_data"], list):
            raise TypeError("trial_data is not a list")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise _cannot_resume(exp_dir, f"{state} is incomplete or corrupt ({type(e).__name__}: {e})") from None
    for pattern in SEARCHER_FILES:
        path = _newest(exp_dir, pattern)
        if path is not None and not _complete_pickle(path):
            raise _cannot_resume(exp_dir, f"{path} (the search algorithm's state) is incomplete")


def _cannot_resume(exp_dir: Path, damaged: str) -> ConfigError:
    return ConfigError(f"{damaged}: the sweep cannot be resumed from it. Finished trials' runs stay under "
                       f"{exp_dir / RUNS}; start a new sweep with tune.name=... (sweeps written by this "
                       "version replace these files whole, never cut off)")


def resume_sweep(exp_dir: str | Path, resume_errored: bool = False) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue from their
    last checkpoint, errored ones rerun only with ``resume_errored``."""
    from ray import tune

    exp_dir = Path(exp_dir).expanduser().absolute()
    if not (exp_dir / SWEEP_FILE).exists():
        raise ConfigError(f"{exp_dir} is not a sweep folder (no {SWEEP_FILE}); pass the folder that "
                          "jobs/tune.py printed when the sweep started")
    cfg = load_config(exp_dir / SWEEP_FILE)
    fs = sweep_filesystem()
    if not tune.Tuner.can_restore(str(exp_dir), storage_filesystem=fs):
        raise ConfigError(f"{exp_dir} holds no Tune experiment state yet (interrupted before the first trial "
                          f"started); delete it and start the sweep again")
    check_experiment_state(exp_dir)
    _prepare(cfg)
    tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(cfg.to_dict(), exp_dir, cfg.tune.trial_cpus),
                               resume_unfinished=True, resume_errored=resume_errored, restart_errored=False,
                               storage_filesystem=fs)
    return _finish(cfg, exp_dir, _fit(tuner))


def _finish(cfg: Config, exp_dir: Path, grid) -> SweepResult:
    from rayrec.tune.report import write_outputs

    table, best, board = write_outputs(cfg, exp_dir, grid)
    res = SweepResult(exp_dir, table, best, board)
    if len(table):
        res.unfinished = list(table.loc[table["status"].isin(("interrupted", "pending")), "trial"])
    if res.unfinished:
        log.warning("the sweep was interrupted: %d trial(s) unfinished (%s); results so far are interim (best_config "
                    "only among finished trials). Continue it with: %s", len(res.unfinished),
                    ", ".join(res.unfinished), res.resume_hint)
    return res

