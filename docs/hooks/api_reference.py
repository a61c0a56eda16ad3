"""MkDocs hook: the API reference covers every public name, also one added since its pages were written.

The pages of docs/reference place each name of ``bnctl.__all__`` by topic, with a ``::: path`` line that
mkdocstrings expands from the docstrings. A line ``<!-- bnctl-api: rest -->`` expands to a ``::: path`` entry
for every public name that no reference page places yet, so a new name is documented from its first build;
tests/test_docs.py checks that the built site has an entry for every public name.

A function that shares the name of the module defining it (``bnctl.apply`` in ``bnctl/apply.py``) is the
function in Python but the module for griffe, so its entry uses the function's own path with the public
name as heading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = re.compile(r"^<!-- bnctl-api: rest -->[ \t]*$", re.MULTILINE)
ENTRY = re.compile(r"^::: *([\w.]+)", re.MULTILINE)


def entry_paths(name: str) -> tuple[str, str]:
    """``(public path, the object's own path)`` of ``bnctl.<name>``; a reference entry under either
    documents it (``bnctl.functional.batch_norm`` is ``bnctl.batch_norm``)."""
    import bnctl

    obj = getattr(bnctl, name)
    own = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    return f"bnctl.{name}", own if own.startswith("bnctl.") else f"bnctl.{name}"


def entry(name: str) -> str:
    """The ``:::`` entry for ``bnctl.<name>``: its public path, or the object's own path under the public
    name where ``bnctl.<name>`` would name a module for griffe."""
    public, own = entry_paths(name)
    if own != f"{public}.{name}":
        return f"::: {public}\n"
    return f"::: {own}\n    options:\n      heading: {public}\n"


def placed(reference: Path) -> set[str]:
    """The paths the reference pages under ``reference`` document with a ``:::`` line."""
    return {m for page in reference.glob("*.md") for m in ENTRY.findall(page.read_text(encoding="utf-8"))}


def missing(reference: Path) -> list[str]:
    """Public names of bnctl that no page under ``reference`` documents, in ``__all__`` order."""
    import bnctl

    done = placed(reference)
    return [name for name in bnctl.__all__ if not ({*entry_paths(name)} & done)]


def rest(reference: Path) -> str:
    """Markdown for the names :func:`missing` finds: a section with one entry each, or nothing."""
    names = missing(reference)
    if not names:
        return ""
    lines = ["## Other public names", "",
             "Not yet placed on a page above; generated from their docstrings like the rest.", ""]
    lines += [entry(name) for name in names]
    return "\n".join(lines)


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    if not MARKER.search(markdown):
        return markdown
    reference = Path(config["docs_dir"]) / "reference"
    return MARKER.sub(lambda _: rest(reference), markdown)
