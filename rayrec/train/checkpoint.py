"""Checkpoints that describe themselves, verify themselves and load without executing pickled code.

A checkpoint folder holds ``model.safetensors`` (current weights), ``best_model.safetensors``
(best-on-validation weights), ``optimizer.pt`` (tensors and numbers only, loaded with
``weights_only=True``), ``config.yaml`` (everything needed to rebuild the model), ``state.json``
(progress) and, written last and atomically, ``manifest.json``: the size and sha256 of every
other file. A folder whose manifest is missing or does not match its files was interrupted
(killed writer, full disk, node lost during upload) and is never loaded; resume falls back to
the newest folder that verifies and logs every folder it skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
BEST = "best_model.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

log = logging.getLogger("rayrec.train")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete, corrupted or not a checkpoint; the message says which file."""


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Record size and sha256 of every file in ``folder``; called after the last data file is closed."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    state = json.loads((folder / STATE).read_text()) if (folder / STATE).exists() else {}
    manifest = {"format": MANIFEST_FORMAT, "epoch": state.get("epoch"), "global_step": state.get("global_step"),
                "files": files}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises :class:`CheckpointError` naming what is wrong."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write was interrupted, or the folder is not a checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({e})") from None
    for required in (MODEL, STATE, CONFIG):
        if required not in files:
            raise CheckpointError(f"{folder}: {MANIFEST} does not list {required}")
    for name, meta in files.items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{folder}: {MANIFEST} lists an unsafe file name {name!r}")
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{folder}: {name} has {size} bytes, the manifest says {meta['bytes']} (truncated write?)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest (corrupted)")
    return manifest


def save(folder: str | Path, *, model_state, best_state, optimizer_state, state: dict[str, Any], config_yaml: str,
         scheduler_state: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # rewriting a folder: it is incomplete until the new manifest lands
    save_file(_contiguous(model_state), str(folder / MODEL))
    if best_state is not None:
        save_file(_contiguous(best_state), str(folder / BEST))
    if optimizer_state is not None:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, folder / OPTIM)
    (folder / STATE).write_text(json.dumps(state, indent=2) + "\n")
    (folder / CONFIG).write_text(config_yaml)
    write_manifest(folder)
    return folder


# A file can match its manifest and still be unloadable: the manifest only proves the folder is the
# one that was written, so a file replaced together with a rewritten manifest reaches the loaders.
_TAMPERED = "it matches the manifest, so it was written this way or replaced together with a rewritten manifest"


def _not_safetensors(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({e}); {_TAMPERED}; nothing was loaded")


def load_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {_TAMPERED}") from None


def load_weights(folder: str | Path, best: bool = False, verified: bool = False) -> dict[str, torch.Tensor]:
    """Weights through safetensors only (no pickle); the folder is verified first unless ``verified``."""
    folder = Path(folder)
    files = verify(folder)["files"] if not verified else None
    use_best = best and ((BEST in files) if files is not None else (folder / BEST).exists())
    path = folder / (BEST if use_best else MODEL)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _not_safetensors(path, e) from None


def load_optimizer(folder: str | Path, mmap: bool = False) -> dict | None:
    path = Path(folder) / OPTIM
    if not path.exists():
        return None
    try:
        # weights_only: a crafted pickle (os.system in __reduce__ ...) is refused instead of run
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusal (UnpicklingError) or a broken file
        # torch's text opens with advice to retry with weights_only=False, the one thing not to do here:
        # show the line that names what was refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(f"{path}: refused, it holds more than tensors and numbers or is not a torch file "
                              f"({why}); {_TAMPERED}; nothing in it was run") from None


def check_loadable(folder: str | Path) -> None:
    """Open every file a resume loads the way it will be loaded, without reading the tensors
    (safetensors headers, the optimizer state memory-mapped): a refused file fails on the driver,
    before any worker starts."""
    folder = Path(folder)
    files = verify(folder)["files"]
    for name in (MODEL, BEST):
        if name in files:
            try:
                with safe_open(str(folder / name), "pt"):
                    pass
            except SafetensorError as e:
                raise _not_safetensors(folder / name, e) from None
    load_state(folder)
    load_optimizer(folder, mmap=True)


def persist(src: str | Path, run_dir: Path, epoch: int, final: bool = False) -> str:
    """Copy a checkpoint into ``run_dir/checkpoint_<epoch>`` atomically (write aside, then rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dest = run_dir / dir_name(epoch, final)
    tmp = run_dir / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    verify(tmp)
    if dest.exists():  # never replace an existing checkpoint in place: move it aside, then drop it
        old = run_dir / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    return str(dest)


def dir_name(epoch: int, final: bool = False) -> str:
    """Checkpoint folder name; zero-padded so name order is training order (final sorts after its epoch)."""
    return f"checkpoint_{epoch:06d}{'_final' if final else ''}"


_NAME = re.compile(r"checkpoint_\d+(_final)?")


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run folder, newest first (by name: ``dir_name`` sorts in training order).

    Only names ``dir_name`` makes count: a copy still being written or never renamed into place
    (``checkpoint_000012.partial``, ``.checkpoint_000012.partial``, ``.old``) is never a candidate,
    even when its files happen to verify."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.glob("checkpoint_*") if _NAME.fullmatch(p.name) and p.is_dir()), reverse=True)


def _first_valid(folders: Iterable[str | Path]) -> tuple[str | None, list[str]]:
    reasons = []
    for folder in folders:
        try:
            verify(folder)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to an earlier one", e)
            reasons.append(str(e))
            continue
        return str(folder), reasons
    return None, reasons


def newest_valid(folders: Iterable[str | Path]) -> str | None:
    """The first folder (newest first) that verifies; every skipped folder is logged with its reason."""
    return _first_valid(folders)[0]


def require_valid(folders: Iterable[str | Path], purpose: str) -> str:
    """``newest_valid``, or a :class:`CheckpointError` naming every folder tried and why it was refused."""
    chosen, reasons = _first_valid(folders)
    if chosen is None:
        raise CheckpointError(
            f"no checkpoint {purpose} passed its manifest check, so nothing was loaded: {'; '.join(reasons)}. "
            "Restore the folders from a copy, or move them aside to start afresh")
    return chosen


def latest(run_dir: str | Path) -> str | None:
    """The newest checkpoint folder in a run folder that verifies against its manifest."""
    return newest_valid(candidates(run_dir))
