"""The sweep folder's filesystem: files are replaced whole, and a resume refuses a state Tune cannot read."""
from __future__ import annotations

import json
import os
import pickle

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
