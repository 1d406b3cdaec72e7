"""Each trial's Tune log (``result.json``, ``progress.csv``) kept whole across a resume, every pass once.

Tune's own loggers restore a trial's files from the sweep folder only when the trial has a Tune
checkpoint. Sweep trials have none (their checkpoints are the Train run's, under ``runs/``), so a
trial restored after Ctrl-C or a lost driver started its ``result.json`` over: it kept only its
post-resume history, ``metric_by_epoch.png`` drew no curve, and the results table missed epochs.

Here a trial's rows are read back from its folder when it starts again and new rows are appended.
Rows are keyed by ``training_iteration`` (validation pass n, set by ``sweep.tune_result`` from the
epoch): a row for a pass that is already there replaces it and everything after it (a run that
resumed from an earlier checkpoint retrains those epochs), so no pass is ever written twice.
``progress.csv`` is rewritten from the same rows, with every column any row has (Tune's CSV keeps
only the first row's columns and so drops the final row's test metrics).

Tune's TensorBoard logger is switched off: each trial's Train run already writes its scalars and
its one HParams session under ``runs/<trial>/tensorboard``; Tune's copy under ``<trial>/`` made every
trial a second session in ``tensorboard --logdir <experiment>``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from ray.air.constants import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE, TRAINING_ITERATION
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.utils import flatten_dict
from ray.tune.utils.util import SafeFallbackEncoder

log = logging.getLogger("rayrec.tune")


def _iteration(row: dict[str, Any]) -> int:
    try:
        return int(row.get(TRAINING_ITERATION, 0))
    except (TypeError, ValueError):
        return 0


def _parse(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a file cut off by a kill
            log.warning("dropping a cut-off line of a trial's %s", EXPR_RESULT_FILE)
    return rows


class TrialHistoryLogger(JsonLoggerCallback):
    """``result.json`` and ``progress.csv`` per trial, continued across restores (module docstring)."""

    _SAVED_FILE_TEMPLATES = [EXPR_RESULT_FILE, EXPR_PROGRESS_FILE, "params.json", "params.pkl"]

    def __init__(self):
        super().__init__()
        self._rows: dict[Any, list[dict[str, Any]]] = {}

    def _read_back(self, trial) -> list[dict[str, Any]]:
        local = Path(trial.local_path, EXPR_RESULT_FILE)
        if local.exists() and local.stat().st_size:
            return _parse(local.read_text())
        remote = Path(trial.storage.trial_fs_path, EXPR_RESULT_FILE).as_posix()
        fs = trial.storage.storage_filesystem
        try:
            with fs.open_input_stream(remote) as f:
                return _parse(f.read().decode())
        except (FileNotFoundError, OSError):
            return []  # a new trial

    def log_trial_start(self, trial) -> None:
        trial.init_local_path()
        self.update_config(trial, trial.config)  # params.json / params.pkl, as Tune's logger writes them
        if trial not in self._rows:
            self._rows[trial] = self._read_back(trial)
            if self._rows[trial]:
                self._write(trial, rewrite=True)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._rows:
            self.log_trial_start(trial)
        rows = self._rows[trial]
        row = json.loads(json.dumps(result, cls=SafeFallbackEncoder))
        it = _iteration(row)
        rewrite = any(_iteration(r) >= it for r in rows)
        if rewrite:
            rows[:] = [r for r in rows if _iteration(r) < it]
        rows.append(row)
        self._write(trial, rewrite=rewrite)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass  # nothing stays open; the rows stay for a retry of the trial in this driver

    def _write(self, trial, rewrite: bool) -> None:
        rows = self._rows[trial]
        folder = Path(trial.local_path)
        folder.mkdir(parents=True, exist_ok=True)
        if rewrite:
            (folder / EXPR_RESULT_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            with open(folder / EXPR_RESULT_FILE, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        flat = [flatten_dict({k: v for k, v in r.items() if k != "config"}, delimiter="/") for r in rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns)
        writer.writeheader()
        writer.writerows(flat)
        (folder / EXPR_PROGRESS_FILE).write_text(buf.getvalue())


class _Off:
    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass


class NoCSVLogger(_Off, CSVLoggerCallback):
    """Stands in for Tune's CSV logger (``TrialHistoryLogger`` writes ``progress.csv``)."""

    _SAVED_FILE_TEMPLATES: list[str] = []


class NoTBXLogger(_Off, TBXLoggerCallback):
    """Stands in for Tune's TensorBoard logger: the trial's Train run writes its TensorBoard files."""

    _SAVED_FILE_TEMPLATES: list[str] = []

    def __init__(self):  # Tune's imports tensorboardX
        pass


def logger_callbacks() -> list:
    """What a sweep's ``RunConfig(callbacks=...)`` gets: Tune adds its default loggers only for the
    kinds missing, so these three replace all of them."""
    return [TrialHistoryLogger(), NoCSVLogger(), NoTBXLogger()]
