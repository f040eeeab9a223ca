"""Every `podmeter` command line and `make` target the docs name exists: a flag renamed or dropped in the CLI (or
mistyped in a README) fails here rather than in front of a user copying it."""

from __future__ import annotations

import glob
import os
import re

import pytest

from podmeter.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md", "docs/*.md", "receivers/*/README.md",
        "processors/*/README.md", "exporters/*/README.md", "podmeter/extensions/README.md", "k8s/**/*.md",
        "examples/*.yaml"]
# `podmeter run --config F`, up to the end of its code span, line or shell comment
_COMMAND = re.compile(r"\bpodmeter[ \t]+(run|validate|components|collect|inspect)\b([^`\n#|;&)]*)")
_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_MAKE = re.compile(r"`make ([a-z][\w-]*)")
# options inspect parses itself (podmeter/inspect.py)
INSPECT_OPTIONS = {"--proc-root", "--config", "--wait", "-h", "--help"}


def _doc_files() -> list[str]:
    found: set[str] = set()
    for pattern in DOCS:
        found.update(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _text(rel: str) -> str:
    with open(os.path.join(ROOT, rel)) as f:
        # a shell line continued with a backslash is one command
        return f.read().replace("\\\n", " ")


def _commands() -> list[tuple[str, str, str]]:
    out = []
    for rel in _doc_files():
        for m in _COMMAND.finditer(_text(rel)):
            out.append((rel, m.group(1), m.group(2)))
    return out


def _options(command: str) -> set[str]:
    if command == "inspect":
        return INSPECT_OPTIONS
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def test_the_docs_name_commands():
    assert len(_commands()) > 10  # the pattern still finds them


@pytest.mark.parametrize("where, command, rest", _commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_flag_exists(where, command, rest):
    known = _options(command)
    for flag in _FLAG.findall(rest):
        name = flag.partition("=")[0]
        assert name in known, f"{where}: `podmeter {command}{rest}`: {name} is not an option of {command} " \
                              f"(it has {', '.join(sorted(known))})"


def test_every_documented_make_target_exists():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([a-z][\w-]*):", f.read(), re.M))
    for rel in _doc_files():
        for target in _MAKE.findall(_text(rel)):
            assert target in targets, f"{rel}: `make {target}` is not a target of the Makefile"
