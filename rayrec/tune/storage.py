"""The filesystem a sweep folder is written through: every file is replaced whole, never cut off.

Tune keeps a sweep's state (``experiment_state-*.json``: which trials exist, which finished) in a
staging folder and copies it into the sweep folder from a background thread. A plain copy truncates
the old file and then writes the new one, and Tune rewrites the staging file while an earlier copy
may still be reading it. A sweep killed at the wrong moment (a node lost, ``kill -9``) therefore
left a cut-off state file, and Tune, unable to read it on ``--resume``, logged an error and silently
started the whole sweep over (seen in CI: a resumed sweep came back with one trial of three).

Here each file is written to a hidden temporary name in the same folder and renamed over the old
one when complete, and a state file that does not parse is not published at all: the previous,
complete one stays until the next copy brings a good one.
"""
from __future__ import annotations

import fnmatch
import io
import json
import logging
import os
import threading
import uuid

from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger("rayrec.tune")
STATE_FILES = "experiment_state-*.json"  # Tune's TuneController.CKPT_FILE_TMPL
# the search algorithm's state, pickled (BasicVariantGenerator's, a Searcher's, SearchGenerator's)
SEARCHER_FILES = ("basic-variant-state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")


def _parses_as_json(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            json.load(f)
        return True
    except (ValueError, OSError):
        return False


class ReplaceOnClose(io.FileIO):
    """A file opened for writing under a temporary name; ``close`` renames it over ``path``."""

    def __init__(self, path: str):
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.part")
        super().__init__(tmp, "xb")  # mode 0o666 less the umask, like the file it replaces
        self._tmp, self._final = tmp, path
        self._check = _parses_as_json if fnmatch.fnmatch(name, STATE_FILES) else None

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self._check is not None and not self._check(self._tmp):
            # the copy read Tune's staging file while Tune was rewriting it; keep the last good one
            log.debug("not publishing an incomplete %s", self._final)
            os.unlink(self._tmp)
            return
        os.replace(self._tmp, self._final)


class ReplacingLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem, except that files opened for writing are replaced whole on close."""

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "w" in mode:
            path = self._strip_protocol(path)
            if self.auto_mkdir:
                self.makedirs(self._parent(path), exist_ok=True)
            return ReplaceOnClose(path)
        return super()._open(path, mode, block_size=block_size, **kwargs)


def sweep_filesystem():
    """The ``pyarrow.fs.FileSystem`` Tune gets for a sweep folder (a local path)."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(ReplacingLocalFileSystem(auto_mkdir=True)))
