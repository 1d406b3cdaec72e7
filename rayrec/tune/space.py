"""The search space: YAML over dotted config keys, checked against the Config dataclasses.

```yaml
tune:
  space:
    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.hidden: {choice: [32, 64, 128]}
    model.head: {grid: [bce, ce]}
    model.num_blocks: {randint: [1, 4]}        # [low, high): high excluded, as in tune.randint
    train.batch_size: {qrandint: [64, 256, 64]}  # [low, high] in steps of q, as in tune.qrandint
    model.dropout: 0.1                          # a plain value fixes the key for every trial
```

Everything here runs on the driver before any trial starts: an unknown key, a section used as a
leaf, an unknown distribution, malformed bounds, or a choice that the key's type rejects all fail
with one :class:`ConfigError` that names the key and the fix. Combinations (``model.hidden`` not
divisible by ``model.num_heads``) are only known per trial; such a trial fails alone.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from rayrec.config import Config, ConfigError, _coerce

DISTRIBUTIONS = {  # name -> what its list holds
    "choice": "a non-empty list of values",
    "grid": "a non-empty list of values (every one is run)",
    "uniform": "[low, high] numbers",
    "loguniform": "[low, high] numbers, 0 < low < high",
    "randint": "[low, high] integers, high excluded",
    "qrandint": "[low, high, q] integers, high included",
}
# run bookkeeping that the sweep itself sets for each trial
NOT_SEARCHABLE = {"name", "output_dir", "resume"}


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    dist: str  # one of DISTRIBUTIONS, or "fixed"
    args: tuple

    def to_tune(self):
        from ray import tune

        if self.dist == "fixed":
            return self.args[0]
        if self.dist in ("choice", "grid"):
            return (tune.choice if self.dist == "choice" else tune.grid_search)(list(self.args))
        return getattr(tune, self.dist)(*self.args)


def field_type(key: str) -> Any:
    """The annotated type of a dotted Config key, or a ConfigError naming the valid keys."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"tune.space: unknown config key {key!r}; valid keys under {where}: {sorted(hints)}")
        tp = hints[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"tune.space: {key!r} is a config section, not a value; search one of its keys, "
                                  f"e.g. {key}.{sorted(typing.get_type_hints(tp))[0]}")
            cls = tp
        elif not last:
            raise ConfigError(f"tune.space: unknown config key {key!r}; {'.'.join(parts[:i + 1])} is a value, not a section")
    return tp


def _numbers(key: str, dist: str, args: list, n: int, integer: bool) -> tuple:
    ok = isinstance(args, list) and len(args) == n and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if ok and integer:
        ok = all(float(a).is_integer() for a in args)
    if not ok:
        raise ConfigError(f"tune.space: {key}: {dist} takes {DISTRIBUTIONS[dist]}, got {args!r}")
    return tuple(int(a) for a in args) if integer else tuple(float(a) for a in args)


def parse_param(key: str, spec: Any) -> Param:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"tune.space keys must be dotted config keys like train.lr, got {key!r}")
    if key in NOT_SEARCHABLE or key.split(".")[0] == "tune":
        raise ConfigError(f"tune.space: {key!r} cannot be searched: the sweep sets it for each trial "
                          f"(searchable: data.*, model.*, train.*, eval.*, scale.* and quantization keys)")
    tp = field_type(key)
    if not isinstance(spec, dict):  # a plain value fixes the key in every trial
        return Param(key, "fixed", (_coerce(spec, tp, key),))
    if len(spec) != 1:
        raise ConfigError(f"tune.space: {key} must map one distribution name to its arguments, e.g. "
                          f"{{choice: [a, b]}}; got {spec!r}; distributions: {sorted(DISTRIBUTIONS)}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space: {key}: unknown distribution {dist!r}; use one of {sorted(DISTRIBUTIONS)}")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space: {key}: {dist} takes {DISTRIBUTIONS[dist]}, got {args!r}")
        return Param(key, dist, tuple(_coerce(v, tp, f"tune.space: {key} ({dist} value)") for v in args))
    integer = dist in ("randint", "qrandint")
    want = int if integer else float
    if tp is not want:
        kind = "integer" if tp is int else "number" if tp is float else f"{getattr(tp, '__name__', tp)}"
        fix = "randint or qrandint" if tp is int else "uniform or loguniform" if tp is float else "choice or grid"
        raise ConfigError(f"tune.space: {key} is a {kind} key, {dist} does not fit it; use {fix}")
    vals = _numbers(key, dist, args, 3 if dist == "qrandint" else 2, integer)
    low, high = vals[0], vals[1]
    if not low < high or (dist == "loguniform" and low <= 0) or (dist == "qrandint" and vals[2] < 1):
        raise ConfigError(f"tune.space: {key}: {dist} takes {DISTRIBUTIONS[dist]}, got {args!r}")
    return Param(key, dist, vals)


def parse_space(space: dict[str, Any]) -> list[Param]:
    return [parse_param(k, v) for k, v in space.items()]


def tune_metric(cfg: Config) -> str:
    return cfg.tune.metric or cfg.eval.metric


def validate_tune(cfg: Config) -> list[Param]:
    """Checks a config's ``tune`` section; called by ``config.validate`` whenever the section is set."""
    t, s = cfg.tune, cfg.scale
    metric = tune_metric(cfg)
    name, _, k = metric[4:].rpartition("_")
    checks = [
        (metric.startswith("val_") and name in ("ndcg", "hr", "mrr") and k.isdigit() and int(k) in cfg.eval.ks,
         f"tune.metric {metric!r} must be val_<ndcg|hr|mrr>_<k> with k in eval.ks {cfg.eval.ks}: "
         "the search reads validation metrics only (choosing on test leaks)"),
        (t.num_samples >= 1, "tune.num_samples must be >= 1"),
        (t.max_concurrent_trials >= 1, "tune.max_concurrent_trials must be >= 1"),
        (t.trial_cpus > 0, f"tune.trial_cpus must be > 0 (a trial driver asking 0 CPU is never scheduled), got {t.trial_cpus}"),
        (t.grace_period >= 1, "tune.grace_period must be >= 1 (validation passes)"),
        (t.reduction_factor > 1, f"tune.reduction_factor must be > 1, got {t.reduction_factor}"),
        (t.max_failures >= 0, "tune.max_failures must be >= 0"),
        (s.num_workers >= 1, "Tune trials need scale.num_workers >= 1: per-epoch metrics reach the scheduler through "
                             "Ray Train's TuneReportCallback, which local mode (num_workers=0) does not run"),
        (not t.name or ("/" not in t.name and t.name not in (".", "..")), f"tune.name must be a plain folder name, got {t.name!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    params = parse_space(t.space)
    has_grid = any(p.dist == "grid" for p in params)
    if t.search_alg == "optuna" and has_grid:
        raise ConfigError("tune.search_alg=optuna cannot expand grid entries; write them as choice, "
                          "or use tune.search_alg=random")
    if t.search_alg == "optuna" and not _has_optuna():
        raise ConfigError("tune.search_alg=optuna needs the optuna package (pip install optuna); "
                          "or use tune.search_alg=random")
    return params


def _has_optuna() -> bool:
    import importlib.util

    return importlib.util.find_spec("optuna") is not None


def search_alg_name(cfg: Config, params: list[Param]) -> str:
    """auto -> optuna when it is installed and nothing needs grid expansion, else random."""
    alg = cfg.tune.search_alg
    if alg != "auto":
        return alg
    if any(p.dist == "grid" for p in params) or not _has_optuna():
        return "random"
    return "optuna"
