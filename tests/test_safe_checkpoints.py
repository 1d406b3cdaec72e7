"""Checkpoints verify themselves, never run code, and resume skips interrupted writes.
No Ray needed: these are the fast checks behind the fault-tolerance tests."""
import ast
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rayrec.config import ConfigError, load_config
from rayrec.train import checkpoint as ckpt
from rayrec.train import faults
from rayrec.train.tb import TBLogger, check_scalars

ROOT = Path(__file__).resolve().parent.parent


def _save(folder, epoch, value=1.0):
    w = {"w": torch.full((4, 3), value), "b": torch.arange(3.0)}
    return ckpt.save(folder, model_state=w, best_state=w, optimizer_state={"state": {}, "param_groups": []},
                     state={"epoch": epoch, "global_step": 10 * epoch}, config_yaml="name: x\n")


def test_manifest_lists_sizes_and_hashes_and_verifies(tmp_path):
    folder = _save(tmp_path / ckpt.dir_name(1), 1)
    manifest = ckpt.verify(folder)
    assert set(manifest["files"]) == {ckpt.MODEL, ckpt.BEST, ckpt.OPTIM, ckpt.STATE, ckpt.CONFIG}
    assert manifest["epoch"] == 1 and manifest["global_step"] == 10
    for name, meta in manifest["files"].items():
        assert meta["bytes"] == (folder / name).stat().st_size and len(meta["sha256"]) == 64
    assert torch.equal(ckpt.load_weights(folder)["w"], torch.ones(4, 3))


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / ckpt.MODEL).write_bytes((f / ckpt.MODEL).read_bytes()[:-7]), "truncated"),
    (lambda f: (f / ckpt.BEST).unlink(), "is missing"),
    (lambda f: (f / ckpt.MANIFEST).unlink(), "no manifest.json"),
    (lambda f: (f / ckpt.STATE).write_text('{"epoch": 9, "global_step": 90}\n'), "truncated|sha256"),
    (lambda f: (f / ckpt.MANIFEST).write_text("{not json"), "unreadable"),
], ids=["truncated-weights", "missing-file", "no-manifest", "edited-state", "bad-manifest"])
def test_damaged_checkpoint_is_refused_and_resume_falls_back(tmp_path, caplog, damage, reason):
    _save(tmp_path / ckpt.dir_name(1), 1, value=1.0)
    _save(tmp_path / ckpt.dir_name(2), 2, value=2.0)
    newest = _save(tmp_path / ckpt.dir_name(3), 3, value=3.0)
    damage(newest)
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.verify(newest)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_weights(newest)
    with caplog.at_level(logging.WARNING, logger="rayrec.train"):
        chosen = ckpt.latest(tmp_path)
    assert chosen == str(tmp_path / ckpt.dir_name(2))
    assert torch.equal(ckpt.load_weights(chosen)["w"], torch.full((4, 3), 2.0))
    assert any("skipping checkpoint" in r.message and ckpt.dir_name(3) in r.message for r in caplog.records)


def test_partial_folder_from_an_interrupted_copy_is_never_chosen(tmp_path):
    good = _save(tmp_path / ckpt.dir_name(1), 1)
    partial = tmp_path / ckpt.dir_name(2)  # a node lost mid-upload: some files, no manifest yet
    partial.mkdir()
    (partial / ckpt.STATE).write_text(json.dumps({"epoch": 2, "global_step": 20}))
    (partial / ckpt.MODEL).write_bytes((good / ckpt.MODEL).read_bytes()[:50])
    assert ckpt.latest(tmp_path) == str(good)
    (good / ckpt.MODEL).write_bytes(b"")  # nothing valid left: no silent fresh start from garbage
    assert ckpt.latest(tmp_path) is None


def test_a_complete_copy_not_yet_renamed_into_place_is_never_a_candidate(tmp_path):
    good = _save(tmp_path / ckpt.dir_name(1), 1)
    final = _save(tmp_path / ckpt.dir_name(1, final=True), 1)
    for name in (f"{ckpt.dir_name(5)}.partial", f".{ckpt.dir_name(6)}.partial", f".{ckpt.dir_name(7)}.old",
                 f"{ckpt.dir_name(8)}_copy"):
        shutil.copytree(good, tmp_path / name)  # every file verifies: only the name says it is unfinished
    assert ckpt.candidates(tmp_path) == [final, good]
    assert ckpt.latest(tmp_path) == str(final)


def test_persist_never_leaves_a_half_copied_checkpoint(tmp_path):
    src = _save(tmp_path / "src", 4)
    run = tmp_path / "run"
    dest = Path(ckpt.persist(src, run, 4))
    assert dest.name == "checkpoint_000004" and ckpt.verify(dest)
    assert [p.name for p in run.iterdir()] == [dest.name]  # no .partial left behind
    (src / ckpt.MODEL).write_bytes(b"x")  # a bad source is refused before it replaces anything
    with pytest.raises(ckpt.CheckpointError):
        ckpt.persist(src, run, 4)
    assert ckpt.verify(dest)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    folder = _save(tmp_path / ckpt.dir_name(1), 1)
    marker = tmp_path / "pwned"
    # the attacker can rewrite the manifest too: verification passes, the loader must still refuse
    torch.save({"optimizer": _Payload(marker), "scheduler": None}, folder / ckpt.OPTIM)
    ckpt.write_manifest(folder)
    ckpt.verify(folder)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: refused.*nothing in it was run"):
        ckpt.load_optimizer(folder)
    assert not marker.exists()
    # weights go through safetensors: a pickle under the weights' name is not a safetensors file
    with open(folder / ckpt.MODEL, "wb") as f:
        pickle.dump(_Payload(marker), f)
    ckpt.write_manifest(folder)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: not a valid safetensors file"):
        ckpt.load_weights(folder)
    assert not marker.exists()


def test_weights_need_no_pickle(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert (tmp_path / "x.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_code_execution_from_files_anywhere_in_the_source():
    """torch.load only with weights_only=True; no pickle, marshal, eval/exec or unsafe YAML."""
    bad = []
    files = [p for d in ("rayrec", "jobs", "data_prep", "bench") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle")
                       for m in mods):
                    bad.append(f"{path}:{node.lineno} imports a pickle-like module")
        for call in _calls(tree):
            f = call.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in call.keywords}
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{path}:{call.lineno} torch.load without weights_only=True")
            if isinstance(f, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                bad.append(f"{path}:{call.lineno} {name}()")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                bad.append(f"{path}:{call.lineno} yaml.{name} (use yaml.safe_load)")
            if owner in ("np", "numpy") and name == "load" and "allow_pickle" in kw:
                bad.append(f"{path}:{call.lineno} np.load(allow_pickle=...): keep numpy's safe default")
            if owner in ("pd", "pandas") and name == "read_pickle":
                bad.append(f"{path}:{call.lineno} pandas.read_pickle")
    assert not bad, "\n".join(bad)


def test_configs_parse_with_the_safe_loader(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "yaml_pwned"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    with pytest.raises(ConfigError):
        load_config(None, [f"name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "has space", "..", ".hidden", "", "x" * 129, "a..b", "-rf"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        load_config(None, [f"name={name}"] if name else ["name="])


@pytest.mark.parametrize("override, message", [
    ("data.log=s3://bucket/log?endpoint_override=evil.example:9000", "query strings"),
    ("scale.storage_path=gs://b/runs#frag", "query strings"),
    ("data.log=ftp://host/x.parquet", "scheme 'ftp' is not allowed"),
    ("data.log=s3://key:secret@bucket/x", "credentials"),
    ("output_dir=s3://bucket/runs", "only a local path"),
    ("eval.checkpoint=http://host/ckpt", "only a local path"),
])
def test_unsafe_urls_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_urls_and_relative_paths_as_documented(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.log=data/x.parquet", "output_dir=runs", "scale.storage_path=s3://bucket/ray",
                             "name=ok_run-1.2"])
    assert cfg.data.log == str(tmp_path / "data/x.parquet") and cfg.output_dir == str(tmp_path / "runs")
    assert cfg.scale.storage_path == "s3://bucket/ray" and cfg.run_dir == tmp_path / "runs" / "ok_run-1.2"
    monkeypatch.setenv("RAYREC_ALLOW_URL_QUERY", "1")
    monkeypatch.setenv("RAYREC_ALLOW_URL_SCHEMES", "ftp")
    assert load_config(None, ["data.log=s3://b/x?endpoint_override=minio:9000"]).data.log.endswith("minio:9000")
    assert load_config(None, ["data.log=ftp://host/x"]).data.log == "ftp://host/x"


def test_non_scalar_metric_raises_at_report_time(tmp_path):
    assert check_scalars({"a": 1, "b": 0.5, "c": torch.tensor(1.0).numpy()[()]}) == {"a": 1, "b": 0.5, "c": 1.0}
    for bad in (torch.tensor(1.0), [1.0], "0.3", None, True):
        with pytest.raises(TypeError, match="not a scalar"):
            check_scalars({"val_ndcg_10": bad})
    # also on ranks without a writer: every rank reports the same keys
    with pytest.raises(TypeError, match="x"):
        TBLogger(None).scalars({"x": torch.ones(2)}, 1)


def test_tensorboard_step_axis_continues_across_a_resume_without_duplicates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TBLogger(tmp_path)
    for step in (10, 20, 30):  # 30 was written after the last checkpoint (at 20), then the run died
        tb.scalars({"loss": step / 10}, step)
    tb.close()
    tb = TBLogger(tmp_path, start_step=20)  # resumed from the checkpoint at step 20
    for step in (30, 40):
        tb.scalars({"loss": step}, step)
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [10, 20, 30, 40]
    assert events[2].value == 30.0  # the resumed run's value, not the dead run's
    assert len(list(tmp_path.iterdir())) == 2  # one folder, one file per writer


def test_fault_spec_is_validated_and_fires_once_per_run_folder(tmp_path):
    assert str(faults.Fault.parse("rank=1, epoch=2, kind=exit")) == "rank=1,epoch=2,kind=exit"
    for bad in ("rank=1", "rank=x,epoch=1", "rank=1,epoch=1,kind=segv", "rank=1,epoch=0", "rank=1,epoch=1,when=now"):
        with pytest.raises(ValueError, match="RAYREC_FAULT"):
            faults.Fault.parse(bad)
    faults.maybe_inject("rank=1,epoch=2,kind=raise", rank=0, epoch=2, run_dir=tmp_path)  # other rank
    faults.maybe_inject("rank=1,epoch=2,kind=raise", rank=1, epoch=1, run_dir=tmp_path)  # other epoch
    with pytest.raises(faults.InjectedFault, match="rank 1 at epoch 2"):
        faults.maybe_inject("rank=1,epoch=2,kind=raise", rank=1, epoch=2, run_dir=tmp_path)
    faults.maybe_inject("rank=1,epoch=2,kind=raise", rank=1, epoch=2, run_dir=tmp_path)  # restarted: trains on
    # a sequence of faults: each fires at its own rank and epoch, once
    two = "rank=1,epoch=2,kind=raise; rank=0,epoch=3,kind=raise"
    assert [str(f) for f in faults.parse_all(two)] == ["rank=1,epoch=2,kind=raise", "rank=0,epoch=3,kind=raise"]
    for bad in (";", "rank=1,epoch=2,kind=raise;rank=1"):
        with pytest.raises(ValueError, match="RAYREC_FAULT"):
            faults.parse_all(bad)
    seq = tmp_path / "seq"
    faults.maybe_inject(two, rank=0, epoch=2, run_dir=seq)
    with pytest.raises(faults.InjectedFault, match="rank 1 at epoch 2"):
        faults.maybe_inject(two, rank=1, epoch=2, run_dir=seq)
    with pytest.raises(faults.InjectedFault, match="rank 0 at epoch 3"):
        faults.maybe_inject(two, rank=0, epoch=3, run_dir=seq)
    faults.maybe_inject(two, rank=1, epoch=2, run_dir=seq)
    faults.maybe_inject(two, rank=0, epoch=3, run_dir=seq)


def test_run_folder_policy(tmp_path):
    from rayrec.train.fit import _check_run_dir

    base = [f"output_dir={tmp_path}", "name=r1"]
    _check_run_dir(load_config(None, base))  # new name: fresh
    (tmp_path / "r1").mkdir()
    _check_run_dir(load_config(None, base))  # empty folder: fresh
    (tmp_path / "r1" / "config.yaml").write_text("x")  # killed before its first checkpoint
    with pytest.raises(ConfigError, match="resume=true.*nothing was overwritten"):
        _check_run_dir(load_config(None, base))
    _check_run_dir(load_config(None, base + ["resume=true"]))
    (tmp_path / "r1" / "checkpoint_000001").mkdir()
    with pytest.raises(ConfigError, match="1 checkpoint folder"):
        _check_run_dir(load_config(None, base))


def test_checkpoints_ray_never_registered_are_pruned_after_a_run(tmp_path, caplog):
    # restarts resumed from checkpoint folders on disk whose reports Ray lost with the failed worker
    # group (1, and 3 between kept ones): num_to_keep never counted them, so fit() removes them at the end
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from rayrec.train.fit import _prune_unregistered

    run = tmp_path / "run"
    folders = {e: _save(run / ckpt.dir_name(e), e) for e in (1, 2, 3, 4)}
    final = _save(run / ckpt.dir_name(4, final=True), 4)
    elsewhere = _save(tmp_path / "other" / ckpt.dir_name(9), 9)
    kept = [(Checkpoint.from_directory(str(p)), {}) for p in (folders[2], folders[4], final)]
    with caplog.at_level(logging.INFO, logger="rayrec.train"):
        _prune_unregistered(run, SimpleNamespace(best_checkpoints=kept))
    assert [p.name for p in ckpt.candidates(run)] == [final.name, folders[4].name, folders[2].name]
    assert "removed 2 checkpoint folder(s)" in caplog.text
    assert ckpt.dir_name(1) in caplog.text and ckpt.dir_name(3) in caplog.text
    # Ray kept nothing in this folder (storage elsewhere): nothing here is touched
    _prune_unregistered(run, SimpleNamespace(best_checkpoints=[(Checkpoint.from_directory(str(elsewhere)), {})]))
    _prune_unregistered(run, SimpleNamespace(best_checkpoints=[]))
    assert len(ckpt.candidates(run)) == 3
