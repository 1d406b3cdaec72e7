"""The sweep folder's filesystem: files are replaced whole, and a resume refuses a state Tune cannot read;
a trial's Tune log across restores; the labels, best config and strict summary of an interrupted sweep."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pyarrow.fs
import pytest

from rayrec.config import ConfigError
from rayrec.tune.storage import ReplaceOnClose, sweep_filesystem
from rayrec.tune.sweep import check_experiment_state

STATE = "experiment_state-2026-01-01_00-00-00.json"


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_a_file_cut_off_mid_write_leaves_the_old_one_whole(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old\n")
    f = ReplaceOnClose(str(target))
    f.write(b"new, but the process dies before clos")
    assert target.read_text() == "old\n"  # what a resume would read after a kill here
    f.write(b"ing\n")
    f.close()
    assert target.read_text() == "new, but the process dies before closing\n" and not _leftovers(tmp_path)


def test_a_state_file_that_does_not_parse_is_never_published(tmp_path):
    target = tmp_path / STATE
    target.write_text(json.dumps({"trial_data": [["t0", {}]]}))
    f = ReplaceOnClose(str(target))
    f.write(b'{"trial_data": [["t0", {}], ["t1"')  # a copy taken while Tune was rewriting its staging file
    f.close()
    assert json.loads(target.read_text()) == {"trial_data": [["t0", {}]]} and not _leftovers(tmp_path)
    with ReplaceOnClose(str(target)) as f:
        f.write(json.dumps({"trial_data": [["t0", {}], ["t1", {}]]}).encode())
    assert len(json.loads(target.read_text())["trial_data"]) == 2


def test_pyarrow_copies_a_folder_through_it_as_tune_does(tmp_path):
    src, dst = tmp_path / "staging", tmp_path / "sweep"
    (src / "trial_00000").mkdir(parents=True)
    (src / STATE).write_text('{"trial_data": []}')
    (src / "trial_00000" / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (dst / "trial_00000").mkdir(parents=True)
    (dst / "trial_00000" / "result.json").write_text('{"epoch": 1}\n')
    fs = sweep_filesystem()
    pyarrow.fs.copy_files(str(src), str(dst), destination_filesystem=fs)
    assert (dst / "trial_00000" / "result.json").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert (dst / STATE).read_text() == '{"trial_data": []}'
    assert not _leftovers(dst) and not _leftovers(dst / "trial_00000")
    with fs.open_input_stream(str(dst / STATE)) as f:  # reads go through unchanged
        assert f.read() == b'{"trial_data": []}'


def test_resume_refuses_a_cut_off_state_instead_of_restarting_the_sweep(tmp_path):
    # Tune itself logs "Failed to restore the run state", then reruns the sweep from scratch
    (tmp_path / STATE).write_text('{"trial_data": [["{\\"trial_id\\": \\"ab')
    with pytest.raises(ConfigError, match=rf"{STATE} is incomplete or corrupt.*start a new sweep"):
        check_experiment_state(tmp_path)
    (tmp_path / STATE).write_text(json.dumps({"trial_data": []}))
    check_experiment_state(tmp_path)
    # Tune restores the greatest name: an older complete state does not hide a newer cut-off one
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text("")
    with pytest.raises(ConfigError, match="2026-01-02_00-00-00.json is incomplete"):
        check_experiment_state(tmp_path)
    os.remove(tmp_path / STATE)
    os.remove(tmp_path / "experiment_state-2026-01-02_00-00-00.json")
    with pytest.raises(ConfigError, match="no experiment_state"):
        check_experiment_state(tmp_path)


def test_resume_refuses_a_cut_off_search_state(tmp_path):
    (tmp_path / STATE).write_text(json.dumps({"trial_data": []}))
    good = pickle.dumps({"finished": True, "total_samples": 3, "uuid_prefix": "ab12c_"})
    (tmp_path / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(good)
    check_experiment_state(tmp_path)
    (tmp_path / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(good[:-7])
    with pytest.raises(ConfigError, match=r"basic-variant-state-2026-01-01_00-00-00.json \(the search algorithm's state\) is incomplete"):
        check_experiment_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# a trial's Tune log across restores, and what an interrupted sweep leaves behind (no Ray needed)


class _Storage:
    def __init__(self, folder):
        self.trial_fs_path = str(folder)
        self.storage_filesystem = pyarrow.fs.LocalFileSystem()


class _Trial:
    """What TrialHistoryLogger reads of a Tune Trial: its staging folder and its sweep folder."""

    def __init__(self, staging, sweep):
        self.local_path, self.storage, self.config = str(staging), _Storage(sweep), {"train.lr": 0.01}

    def init_local_path(self):
        os.makedirs(self.local_path, exist_ok=True)


def _rows(folder):
    return [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]


def test_a_restored_trial_keeps_its_tune_log_and_never_logs_a_pass_twice(tmp_path):
    import pandas as pd

    from rayrec.tune.history import TrialHistoryLogger
    from rayrec.tune.sweep import tune_result

    sweep = tmp_path / "sweep" / "trial_00000"
    first = _Trial(tmp_path / "staging1", sweep)
    log = TrialHistoryLogger()
    for epoch in (1, 2, 3):
        log.log_trial_result(epoch, first, tune_result({"epoch": epoch, "val_ndcg_10": epoch / 10}, 1))
    sweep.parent.mkdir()
    shutil.copytree(first.local_path, sweep)  # Tune's sync of the staging folder into the sweep folder
    # a new driver (--resume): Tune's own logger started result.json over here (no Tune checkpoint)
    again = _Trial(tmp_path / "staging2", sweep)
    log = TrialHistoryLogger()
    log.log_trial_start(again)
    log.log_trial_result(1, again, tune_result({"epoch": 4, "val_ndcg_10": 0.4}, 1))
    log.log_trial_result(2, again, tune_result({"epoch": 4, "final": 1, "test_ndcg_10": 0.3}, 1))
    rows = _rows(Path(again.local_path))
    assert [(r.get("epoch"), r["training_iteration"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4), (None, 5)]
    csv = pd.read_csv(Path(again.local_path) / "progress.csv")  # every column, the final row's test metrics too
    assert list(csv["training_iteration"]) == [1, 2, 3, 4, 5] and csv["test_ndcg_10"].iloc[-1] == 0.3
    # a pass that comes again (the run resumed from an older checkpoint) replaces it and what followed
    log.log_trial_result(3, again, tune_result({"epoch": 3, "val_ndcg_10": 0.35}, 1))
    assert [(r["epoch"], r["val_ndcg_10"]) for r in _rows(Path(again.local_path))] == [(1, 0.1), (2, 0.2), (3, 0.35)]


class _Result:
    def __init__(self, path, config, rows, error=None):
        import pandas as pd

        self.path, self.config, self.error = str(path), config, error
        self.metrics = rows[-1] if rows else {}
        self.metrics_dataframe = pd.DataFrame(rows) if rows else None


class _Grid(list):
    experiment_path = ""


def test_an_interrupted_sweep_is_labelled_so_and_its_interim_best_is_a_finished_trial(tmp_path):
    from rayrec.config import load_config
    from rayrec.tune.report import write_outputs

    exp = tmp_path / "sw_tune"
    exp.mkdir()
    status = {"00000": "TERMINATED", "00001": "RUNNING", "00002": "ERROR", "00003": "TERMINATED", "00004": "PENDING"}
    (exp / STATE).write_text(json.dumps({"trial_data": [[json.dumps({"trial_id": f"ab_{i}", "status": s}), {}]
                                                        for i, s in status.items()]}))
    passes = lambda vals: [{"epoch": e + 1, "val_ndcg_10": v, "training_iteration": e + 1} for e, v in enumerate(vals)]
    final = {"final": 1, "epochs": 3, "val_ndcg_10": 0.2, "best_val_ndcg_10": 0.2, "best_epoch": 3,
             "test_ndcg_10": 0.18, "training_iteration": 4}
    grid = _Grid([
        _Result(exp / "trial_00000", {"train.lr": 0.01}, passes([0.1, 0.15, 0.2]) + [final]),  # completed
        _Result(exp / "trial_00001", {"train.lr": 0.02}, passes([0.3, 0.4])),  # interrupted: best val, no test
        _Result(exp / "trial_00002", {"train.lr": 0.03}, [], error=RuntimeError("boom")),
        _Result(exp / "trial_00003", {"train.lr": 0.001}, passes([0.05])),  # stopped by ASHA
        _Result(exp / "trial_00004", {"train.lr": 0.04}, []),  # never started
    ])
    grid.experiment_path = str(exp)
    cfg = load_config(None, [f"output_dir={tmp_path}", "tune.name=sw_tune", "tune.space={train.lr: {choice: [0.01, 0.02]}}"])
    table, best, _ = write_outputs(cfg, exp, grid)
    assert dict(zip(table["trial"], table["status"])) == {
        "trial_00000": "completed", "trial_00001": "interrupted", "trial_00002": "error", "trial_00003": "stopped",
        "trial_00004": "pending"}

    def refuse(name):
        raise ValueError(f"bare {name}")

    summary = json.loads((exp / "summary.json").read_text(), parse_constant=refuse)  # strict JSON: null, no NaN
    assert summary["best"]["trial"] == "trial_00000" and summary["best"]["test_ndcg_10"] == 0.18
    assert summary["unfinished"] == ["trial_00001", "trial_00004"] and not summary["complete"]
    assert summary["resume"] == f"python jobs/tune.py --resume {exp}"
    assert "interrupted" in summary["best_rule"] and best == exp / "best_config.yaml"
    text = best.read_text()
    assert "Best trial trial_00000 (completed)" in text and "Interim: 2 trial(s) unfinished" in text
    assert load_config(best).train.lr == 0.01
    # with no finished trial yet there is no best config at all (and no stale one left behind)
    grid = _Grid([grid[1], grid[2]])
    grid.experiment_path = str(exp)
    _, best, _ = write_outputs(cfg, exp, grid)
    summary = json.loads((exp / "summary.json").read_text(), parse_constant=refuse)
    assert best is None and summary["best"] is None and summary["best_config"] is None
    assert not (exp / "best_config.yaml").exists()
