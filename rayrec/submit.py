"""``rayrec submit``: preflight a working folder and submit ``jobs/train.py`` to a Ray cluster.

Two checks before anything is uploaded:

- **Package size**: Ray zips ``--working-dir`` and refuses a package above its limit (the gRPC
  message size, 512 MiB by default) only after zipping it. The preflight walks the folder with
  Ray's own exclusion rules (``.gitignore``, ``.rayignore``) plus rayrec's data excludes
  (``DATA_EXCLUDES``) and refuses an oversized folder up front, listing the largest paths.
- **Who can reach the job API**: Ray's dashboard and job API run arbitrary code for anyone who can
  reach them. Submitting to a non-loopback address is refused unless token auth is on
  (``RAY_AUTH_MODE=token``): bind the dashboard to 127.0.0.1 and tunnel (``ssh -L 8265:...``).
"""
from __future__ import annotations

import ipaddress
import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from rayrec.config import ConfigError

# data, run outputs and caches never travel with the code: jobs read data from absolute paths
DATA_EXCLUDES = ["data/", "runs/", "bench/runs/", "_rayrec_cache/", ".git", ".venv/", "*.parquet", "*.safetensors",
                 "*.pt", "*.gz", "*.zip"]


class SubmitError(ConfigError):
    """A submission refused before upload; the message names the problem and the fix."""


def package_limit() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def package_files(root: str | Path, excludes: list[str] = DATA_EXCLUDES) -> dict[str, int]:
    """Relative path -> bytes of every file Ray would upload from ``root`` with ``excludes``."""
    # Ray's own traversal, so .gitignore/.rayignore and exclude patterns mean exactly what they mean to Ray
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).resolve()
    sizes: dict[str, int] = {}

    def handler(p: Path) -> None:
        if p.is_file() and not p.is_symlink():
            sizes[str(p.relative_to(root))] = p.stat().st_size

    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore=True)
    return sizes


def largest_paths(sizes: dict[str, int], n: int = 10) -> list[tuple[str, int]]:
    """The biggest files and top-level folders, largest first."""
    folders: dict[str, int] = {}
    for path, size in sizes.items():
        top = path.split("/", 1)[0]
        if "/" in path:
            folders[top + "/"] = folders.get(top + "/", 0) + size
    return sorted([*sizes.items(), *folders.items()], key=lambda kv: -kv[1])[:n]


def preflight(root: str | Path, excludes: list[str] = DATA_EXCLUDES, limit: int | None = None) -> int:
    """Bytes that would be uploaded; raises :class:`SubmitError` listing the largest paths when too many."""
    limit = package_limit() if limit is None else limit
    sizes = package_files(root, excludes)
    total = sum(sizes.values())
    if total >= limit:
        rows = "\n".join(f"  {b / 2**20:10.1f} MiB  {p}" for p, b in largest_paths(sizes))
        raise SubmitError(
            f"working dir {Path(root).resolve()} holds {total / 2**20:.1f} MiB to upload, over Ray's package limit of "
            f"{limit / 2**20:.0f} MiB. Largest paths:\n{rows}\nMove data out of the working dir (jobs read it from "
            "absolute paths) or add the paths to .rayignore")
    return total


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str) -> str:
    """The job API address; a non-loopback host needs RAY_AUTH_MODE=token."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if not is_loopback(parts.hostname or "") and os.environ.get("RAY_AUTH_MODE") != "token":
        raise SubmitError(
            f"refusing to submit to {address}: Ray's job API runs code for anyone who can reach it, and "
            "RAY_AUTH_MODE is not 'token'. Bind the dashboard to 127.0.0.1 and tunnel to it (ssh -L 8265:127.0.0.1:8265 "
            "head), or enable Ray's token auth on the cluster and set RAY_AUTH_MODE=token here")
    return address


def submit(config: str, overrides: list[str], address: str, working_dir: str = ".", wait: bool = True,
           job: str = "train") -> str:
    """Preflight, then submit ``python jobs/<job>.py CONFIG overrides``; returns the submission id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from rayrec.config import load_config

    load_config(config, overrides)  # a bad config fails here, not on the cluster
    check_address(address)
    preflight(working_dir)
    client = JobSubmissionClient(address)
    entry = " ".join(shlex.quote(a) for a in ["python", f"jobs/{job}.py", config, *overrides])
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(working_dir), "excludes": DATA_EXCLUDES})
    if wait:
        import time

        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            time.sleep(2)
        print(client.get_job_logs(job_id))
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {status}; logs above (ray job logs {job_id} --address {address})")
    return job_id
