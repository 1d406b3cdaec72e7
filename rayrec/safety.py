"""Run names, paths and URLs that cannot be turned against the machine or the storage account.

Rules (docs/operations.md, "Security posture"):

- ``name`` is a plain folder name: letters, digits, ``.``, ``_``, ``-``; it starts with a letter or
  digit and is at most 128 characters, so it cannot leave ``output_dir`` (no ``/``, no ``..``) or
  break a shell command that quotes it badly (no spaces).
- Local paths (``output_dir``, ``data.log``, ``data.cache_dir``, ``scale.storage_path``,
  ``eval.checkpoint``) may be relative: they are made absolute against the driver's working
  directory when the config is loaded, because Ray Train workers run in another directory.
- URLs are accepted only with a known scheme (``file``, ``s3``, ``gs``, ``gcs``, ``abfs``,
  ``abfss``, ``az``, ``hdfs``) and only where a remote location makes sense (``data.log``,
  ``data.cache_dir``, ``scale.storage_path``). A query string (``s3://b/x?endpoint_override=...``)
  reconfigures the filesystem, e.g. sends requests and credentials to another host, and
  ``user:password@`` puts a secret in config.yaml and the logs: both are refused. Set
  ``RAYREC_ALLOW_URL_SCHEMES=http,https`` to allow more schemes and ``RAYREC_ALLOW_URL_QUERY=1``
  to allow query strings, on a cluster where you trust every config author.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from rayrec.config import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs")
# where a remote URL is meaningful; output_dir and eval.checkpoint are read with local file APIs
REMOTE_OK = ("data.log", "data.cache_dir", "scale.storage_path")


class UnsafeValue(ConfigError):
    """A name, path or URL refused by the rules above."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise UnsafeValue(
            f"name={name!r} is not a safe run name: use letters, digits, '.', '_' and '-' only (no '/', "
            f"'..' or spaces), starting with a letter or digit, at most 128 characters; e.g. name=sasrec_ml1m-2")
    return name


def allowed_schemes() -> tuple[str, ...]:
    extra = [s.strip().lower() for s in os.environ.get("RAYREC_ALLOW_URL_SCHEMES", "").split(",") if s.strip()]
    return SCHEMES + tuple(extra)


def check_location(key: str, value: str, cwd: Path | None = None) -> str:
    """``value`` checked (URL rules) and, for a local path, made absolute. Empty stays empty."""
    if not value:
        return value
    if "\x00" in value or "\n" in value:
        raise UnsafeValue(f"{key}={value!r} contains a NUL or newline character")
    if "://" not in value:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (cwd or Path.cwd()) / p)
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return value
    if key not in REMOTE_OK:
        raise UnsafeValue(f"{key}={value!r}: only a local path is supported here (no URL)")
    if scheme not in allowed_schemes():
        raise UnsafeValue(f"{key}={value!r}: URL scheme {scheme!r} is not allowed; use one of {list(allowed_schemes())} "
                          "or set RAYREC_ALLOW_URL_SCHEMES=<scheme> if you trust it")
    if parts.query or parts.fragment:
        if os.environ.get("RAYREC_ALLOW_URL_QUERY") != "1":
            raise UnsafeValue(f"{key}={value!r}: URL query strings ({parts.query or parts.fragment!r}) reconfigure the "
                              "filesystem (endpoint, credentials) and are refused; configure the filesystem through its "
                              "environment (e.g. AWS_ENDPOINT_URL) or set RAYREC_ALLOW_URL_QUERY=1 if you trust every config")
    if parts.username or parts.password:
        raise UnsafeValue(f"{key}: credentials in a URL end up in config.yaml and logs; remove 'user:password@' and "
                          "use the storage's own credential mechanism (environment, instance role)")
    return value


def check_config(cfg) -> None:
    """Validate the name and normalise every location of a :class:`rayrec.config.Config` in place."""
    check_name(cfg.name)
    cfg.output_dir = check_location("output_dir", cfg.output_dir)
    cfg.data.log = check_location("data.log", cfg.data.log)
    cfg.data.cache_dir = check_location("data.cache_dir", cfg.data.cache_dir)
    cfg.scale.storage_path = check_location("scale.storage_path", cfg.scale.storage_path)
    cfg.eval.checkpoint = check_location("eval.checkpoint", cfg.eval.checkpoint)
