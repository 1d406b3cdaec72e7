"""A run with nothing to train on, nobody to evaluate, or nowhere to write is refused with one
`error:` line and exit 2, before any run folder or checkpoint exists."""
from pathlib import Path

import pytest

from rayrec.cli import main
from tests.conftest import write_parquet_log

pytestmark = pytest.mark.ray
SMALL = ["data.eval_negatives=0", "eval.protocol=full", "model.max_len=10", "model.hidden=16", "model.num_heads=1", "train.epochs=1", "scale.num_workers=0"]


def run_train(capsys, log: str, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(["train", "configs/quickstart.yaml", f"data.log={log}", f"output_dir={out}", "name=r", *SMALL, *extra])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def one_event_users(path: Path) -> str:
    return write_parquet_log(str(path), [(u, u % 3 + 1, 100 + u) for u in range(1, 20)])


def repeat_targets_only(path: Path) -> str:
    # every user's validation and test items were already seen: nothing left to evaluate under 'drop'
    return write_parquet_log(str(path), [(u, i, 10 * u + t) for u in range(1, 6) for t, i in enumerate([1, 2, 3, 1, 2])])


CASES = [
    ("every user has one event", one_event_users, [], "no user has two training events"),
    ("every target is a repeat", repeat_targets_only, [], "no validation user to evaluate (5 of 5 have a target already"),
]


@pytest.mark.parametrize("name, make_log, extra, message", CASES, ids=[c[0] for c in CASES])
def test_nothing_to_train_or_evaluate_is_refused_before_training(ray_cluster, tmp_path, capsys, name, make_log, extra, message):
    out = tmp_path / "runs"
    rc, text = run_train(capsys, make_log(tmp_path / "log.parquet"), out, *extra)
    assert rc == 2 and message in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text
    assert not (out / "r").exists()  # no run folder, config, checkpoint or metrics claim anything
    assert "finished" not in text and "checkpoint:" not in text


def test_repeat_targets_kept_as_misses_train(ray_cluster, tmp_path, capsys):
    rc, text = run_train(capsys, repeat_targets_only(tmp_path / "log.parquet"), tmp_path / "runs",
                         "eval.repeat_targets=miss")
    assert rc == 0 and "finished" in text


@pytest.mark.parametrize("bad, message", [
    ("a_file", "exists and is not a folder"),
    ("a_file/sub", "exists and is not a folder"),
    ("/dev/null/runs", "/dev/null exists and is not a folder"),
    ("/proc/rayrec_runs", "is not writable"),  # pseudo filesystems
    ("/sys/rayrec_runs", "is not writable (operation not permitted"),
])
def test_an_unwritable_output_dir_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, bad, message):
    import ray

    (tmp_path / "a_file").write_text("x")
    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(1))
    out = bad if bad.startswith("/") else str(tmp_path / bad)
    rc = main(["train", "configs/quickstart.yaml", f"output_dir={out}", "data.log=unused.parquet",
               "data.source.kind=none"])
    text = capsys.readouterr().err
    assert rc == 2 and message in text and f"output_dir={out!r}" in text, text
    assert not started and "Traceback" not in text
