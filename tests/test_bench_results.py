"""Committed benchmark results are portable: no absolute path of the machine or worktree they ran
on, only paths relative to the repository or to the data folder beside it."""
import json
import re
from pathlib import Path

import pytest

from bench.common import portable

RESULTS = sorted((Path(__file__).resolve().parent.parent / "bench" / "results").glob("*.json"))
ABSOLUTE = re.compile(r"(?<![\w.$])/(?:tmp|work|root|home|Users|private|mnt|var)/")


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_committed_results_hold_no_absolute_paths(path):
    text = path.read_text()
    json.loads(text)
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text).group(0)


@pytest.mark.parametrize("raw, want", [
    ("/tmp/vb/data/beauty/interactions.parquet", "data/beauty/interactions.parquet"),
    ("/work/wt/tune7/runs/bench", "runs/bench"),
    ("data.source.path=/work/shared/data/ml-100k/u.data.gz", "data.source.path=../shared/data/ml-100k/u.data.gz"),
    ("python bench/infer.py /tmp/infer10/runs/quickstart", "python bench/infer.py runs/quickstart"),
    ("--reference /tmp/ref_today.json", "--reference $TMPDIR/ref_today.json"),
    ("../shared/data/sasrec/ml-1m.txt.gz", "../shared/data/sasrec/ml-1m.txt.gz"),
    ("bench/runs/x", "bench/runs/x"),
])
def test_results_are_written_with_portable_paths(raw, want):
    assert portable({"a": [raw]}) == {"a": [want]}
