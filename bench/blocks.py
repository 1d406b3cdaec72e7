"""Generated tables in the docs: each lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
in README.md or docs/results.md (whichever holds the markers), and is only ever written from
bench/results/*.json, never typed by hand."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "docs" / "results.md")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(name: str, body: str) -> Path:
    """Write ``body`` between the markers of ``name``; the file written."""
    start, end = markers(name)
    for path in DOCS:
        text = path.read_text() if path.exists() else ""
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            path.write_text(f"{head}{start}\n{body}\n{end}{tail}")
            return path
    raise SystemExit(f"no file among {', '.join(str(p.relative_to(ROOT)) for p in DOCS)} holds the markers {start} ... {end}")
