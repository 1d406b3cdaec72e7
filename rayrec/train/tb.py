"""Rank-0 TensorBoard logging with a step axis that continues across a resume, and HParams sessions.

HParams: one session per run folder, written into the run's own event folder (``<run>/tensorboard``,
not a ``hparams`` sub-run), hyperparameters named by their dotted config keys (``train.lr``,
``model.norm_first``) in single runs and sweeps alike, booleans kept as booleans. A Tune trial's
session is written by the sweep when the trial starts (``rayrec.tune.report.write_trial_hparams``);
the run's own end-of-run call then adds only its final scalars. ``SESSION_FILE`` beside the events
records that a folder has its session, so a resumed or re-finished run never writes a second one.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable

SESSION_FILE = "hparams_session.json"  # beside the event files: this folder already holds its HParams session


def hp_value(v: Any) -> bool | int | float | str:
    """A value TensorBoard's HParams accepts: bool, number or string (anything else as its text)."""
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def session_metric_tags(final_names: Iterable[str]) -> list[str]:
    """The scalar tags an HParams session shows as metrics, for the given final-report metric names
    (``val_ndcg_10``, ``test_hr_10``...): ``final/<name>`` for each, ``epoch/<name>`` for validation
    ones (their value at the run's last validation pass), and ``epoch/train_loss``. Single runs and
    sweep trials use the same tags, so one TensorBoard shows both with one set of columns."""
    names = sorted(set(final_names))
    return ["epoch/train_loss", *(f"epoch/{n}" for n in names if n.startswith("val_")), *(f"final/{n}" for n in names)]


def has_session(logdir: str | Path) -> bool:
    return (Path(logdir) / SESSION_FILE).exists()


def _plugin_summary(tag: str, **data):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = HParamsPluginData(version=PLUGIN_DATA_VERSION, **data).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def session_summaries(hparams: dict[str, Any], metric_tags: Iterable[str]):
    """The experiment (hyperparameter names and types, metric tags) and session-start summaries of
    one HParams session. Built here rather than with torch's ``hparams()``, which stores a bool as
    the number 1.0 (``isinstance(True, int)``); tensorboard's own helper needs TensorFlow."""
    from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG, SESSION_START_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

    ssi, infos = SessionStartInfo(), []
    for k, v in sorted(hparams.items()):
        v = hp_value(v)
        if isinstance(v, bool):
            ssi.hparams[k].bool_value, kind = v, "DATA_TYPE_BOOL"
        elif isinstance(v, str):
            ssi.hparams[k].string_value, kind = v, "DATA_TYPE_STRING"
        else:
            ssi.hparams[k].number_value, kind = float(v), "DATA_TYPE_FLOAT64"
        infos.append(HParamInfo(name=k, type=DataType.Value(kind)))
    exp = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=t)) for t in metric_tags])
    return _plugin_summary(EXPERIMENT_TAG, experiment=exp), _plugin_summary(SESSION_START_INFO_TAG, session_start_info=ssi)


def write_session(writer, logdir: str | Path, hparams: dict[str, Any], metric_tags: Iterable[str]) -> None:
    """One HParams session in ``writer``'s own folder (``SummaryWriter``); TensorBoard reads the
    metric values from the scalars of the same folder."""
    metric_tags = list(metric_tags)
    for summary in session_summaries(hparams, metric_tags):
        writer.file_writer.add_summary(summary)
    writer.flush()
    hp = {k: hp_value(v) for k, v in sorted(hparams.items())}
    (Path(logdir) / SESSION_FILE).write_text(json.dumps({"hparams": hp, "metrics": metric_tags}, indent=1) + "\n")


def check_scalars(metrics: dict) -> dict[str, float]:
    """Metrics as plain numbers; anything else (a tensor, a list, a string) raises here, at report
    time, instead of vanishing from TensorBoard or breaking a Tune scheduler later."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            hint = " (call .item() on a 0-d tensor)" if hasattr(v, "item") else ""
            raise TypeError(f"metric {k!r} is {type(v).__name__}, not a scalar; report numbers only{hint}")
        out[k] = v if isinstance(v, (int, float)) else float(v)
    return out


class TBLogger:
    def __init__(self, logdir: str | Path | None, start_step: int = 0):
        self.writer = None
        self.logdir = Path(logdir) if logdir is not None else None
        self._final_tags: set[str] = set()
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps
            self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, metrics: dict[str, float], step: int, prefix: str = "") -> None:
        metrics = check_scalars(metrics)  # on every rank, not only where a writer exists
        if self.writer is None:
            return
        for k, v in metrics.items():
            if math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)
                if prefix == "final/":
                    self._final_tags.add(prefix + k)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int = 0) -> None:
        """The run's HParams session, in its own event folder: ``hparams`` by dotted config key,
        ``metrics`` (final-report names) as ``final/<name>`` scalars (those not logged yet are logged
        here at ``step``). A folder that already holds a session (a sweep trial's, written when the
        trial started with the sweep's keys) gets the scalars only: one session per run."""
        if self.writer is None:
            return
        self.scalars({k: v for k, v in metrics.items() if f"final/{k}" not in self._final_tags}, step, prefix="final/")
        if not has_session(self.logdir):
            write_session(self.writer, self.logdir, hparams, session_metric_tags(metrics))

    def flush(self) -> None:
        """Called before each checkpoint: events up to a checkpoint survive a SIGKILL (the writer
        otherwise buffers up to two minutes), and a resume purges only what came after it."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def hparams_sessions(logdir: str | Path) -> list[dict[str, Any]]:
    """The session groups TensorBoard's HParams dashboard lists for ``tensorboard --logdir LOGDIR``,
    read through TensorBoard's own HParams plugin: ``[{"name", "hparams", "metrics"}, ...]``. A check
    (tests, or by hand) that a sweep shows one session per trial."""
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    logdir = str(logdir)
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    tb = base_plugin.TBContext(logdir=logdir, data_provider=data_provider.MultiplexerDataProvider(mux, logdir),
                               multiplexer=mux)
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100_000, include_metrics=True,
                                               allowed_statuses=list(api_pb2.Status.values()))
    found = list_session_groups.Handler(tb_context.RequestContext(), backend_context.Context(tb), "", request).run()
    return [{"name": g.name,
             "hparams": {k: getattr(v, v.WhichOneof("kind")) for k, v in g.hparams.items() if v.WhichOneof("kind")},
             "metrics": {m.name.tag: m.value for m in g.metric_values}} for g in found.session_groups]
