"""Shared pieces of the benchmarks: provenance and the result file format of DESIGN.md."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RAYREC_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {cpu}{gpu or ', no GPU'}"


# a checkout (this one, a worktree, a copy under /tmp) followed by a folder of the repository
_CHECKOUT = re.compile(r"(?<![\w.])(?:/[^\s\"'=:,]+?)/((?:bench|data|runs|configs|docs|scripts)(?:/|\b))")
_SHARED = re.compile(r"(?<![\w.])(?:/[^\s\"'=:,]+?)?/shared/data/")
_TEMP = re.compile(r"(?<![\w.])/tmp/")


def portable(value):
    """Paths made relative to the repository (``bench/runs/...``, ``data/...``) or to the data
    folder beside it (``../shared/data/...``), in every string of a result: a result must not carry
    the absolute paths of the machine (or worktree) it ran on. Other temporary paths read $TMPDIR."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if not isinstance(value, str):
        return value
    value = _SHARED.sub("../shared/data/", value)
    value = _CHECKOUT.sub(r"\1", value)
    return _TEMP.sub("$TMPDIR/", value)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = {"name": name, "commit": commit(), "date": dt.date.today().isoformat(), "hardware": hardware()}
    base.update(portable(payload))
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(base, indent=2, default=str) + "\n")
    return out
