"""The README is the front door: short, every command it shows refers to things that exist and
parse, every link resolves, and its results table is the generated one.

The job-submission block runs verbatim in tests/test_fault_cluster.py; the quickstart and test
commands are what CI runs (`.ci/run` -> scripts/test.sh), and train -> recommend is exercised by
tests/test_infer.py. The remaining commands need real datasets or minutes of training, so here
they are checked for what can drift without anyone noticing: files, configs and overrides,
subcommands.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    out = []
    for block in _blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for section in ("## Install", "## Two commands", "## Results", "## Ray clusters and `ray job submit`"):
        assert section in text
    assert "source .venv/bin/activate" in text


def test_the_readme_results_table_is_the_generated_one():
    from bench.report import headline

    text = README.read_text()
    body = text.split("<!-- headline:start -->\n", 1)[1].split("\n<!-- headline:end -->", 1)[0]
    assert body == headline()
    assert body.count("\n") >= 4  # a header, its rule and at least three measured rows


def test_every_readme_command_names_files_configs_and_subcommands_that_exist():
    from rayrec.cli import main
    from rayrec.config import load_config

    commands = _commands(README.read_text())
    assert len(commands) >= 10
    checked = 0
    for argv in commands:
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv = argv[1:]  # leading VAR=value environment assignments
        if not argv:
            continue
        tool, args = argv[0], argv[1:]
        if tool in ("python", "bash") and args and args[0] not in ("-c", "-m"):
            assert (ROOT / args[0]).is_file(), f"README runs {args[0]}, which does not exist"
        if tool == "rayrec":
            with pytest.raises(SystemExit) as exit_:
                main([args[0], "--help"])
            assert exit_.value.code == 0, f"rayrec {args[0]} is not a subcommand"
        configs = [a for a in args if a.endswith(".yaml")]
        if configs and tool in ("python", "rayrec"):
            overrides = [a for a in args[args.index(configs[0]) + 1:] if "=" in a and "$" not in a]
            load_config(ROOT / configs[0], overrides)  # a renamed key or a bad value fails here
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_in_the_docs_resolves(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve()
        assert dest.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
            assert anchor in slugs, f"{doc.name} links to {target}: no such heading in {path}"
