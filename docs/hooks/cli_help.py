"""MkDocs hook: a line ``<!-- bnctl-help: demo -->`` in a page becomes the output of ``bnctl demo --help``.

The command line page is generated from the command itself at every build, so it cannot drift from
the code. A line ``<!-- bnctl-help: rest -->`` becomes a section with the ``--help`` of every subcommand
that has no line of its own yet, so a new subcommand is documented from its first build.
tests/test_docs.py checks that the blocks equal what the installed ``bnctl`` prints. Help is formatted at
a fixed width (80 columns), so the page does not depend on the terminal that builds it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = re.compile(r"^<!-- bnctl-help:(?P<args>[^>]*)-->[ \t]*$", re.MULTILINE)
REST = "rest"
COLUMNS = "80"


def help_text(args: list[str]) -> str:
    """What ``bnctl *args --help`` prints, at :data:`COLUMNS` columns."""
    from bnctl.cli import main

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            status = main([*args, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    if status != 0:
        raise RuntimeError(f"`bnctl {' '.join(args)} --help` exited with status {status}")
    return out.getvalue()


def subcommands() -> list[str]:
    """The subcommands ``bnctl --help`` lists (``{demo,inspect,report}``)."""
    found = re.search(r"\{([\w,-]+)\}", help_text([]))
    return found.group(1).split(",") if found else []


def block(args: list[str]) -> str:
    command = " ".join(["bnctl", *args, "--help"])
    return f'```text title="{command}"\n{help_text(args).rstrip()}\n```'


def render(markdown: str) -> str:
    """``markdown`` with each marker replaced by its ``--help`` block (the ``rest`` marker by a section for
    each subcommand without a marker of its own)."""
    explicit = [m.group("args").split() for m in MARKER.finditer(markdown)]
    rest = [name for name in subcommands() if [name] not in explicit]

    def replace(match: re.Match[str]) -> str:
        args = match.group("args").split()
        if args != [REST]:
            return block(args)
        return "\n\n".join(f"## bnctl {name}\n\n{block([name])}" for name in rest)

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return render(markdown)
