"""Griffe extension for the API reference: read bnctl's docstrings as the Google style they are written in.

bnctl's docstrings follow PyTorch's conventions (STYLE.md): a singular ``Example:`` section, Sphinx roles
(``:func:`bnctl.apply```) and ``.. math::`` lines. Griffe's Google parser knows only ``Examples:`` and
plain Markdown, so once the package is loaded this extension

* renames an ``Example:`` section to ``Examples:`` (so its doctest is rendered as code, not prose);
* turns ``:role:`target``` into a cross-reference to ``target`` where the reference documents it, and
  into plain code otherwise (private helpers, modules without a page);
* turns ``.. math:: formula`` into the formula as code.

The source is never changed, only the text griffe parses for the site.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|exc|obj):`(~?)([^`]+)`")
_MATH_LINE = re.compile(r"^(\s*)\.\. math::[ \t]*(\S.*)$", re.MULTILINE)
_MATH_BLOCK = re.compile(r"^(\s*)\.\. math::[ \t]*$", re.MULTILINE)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def _target(obj: griffe.Object, name: str) -> str:
    """The path that documents ``name`` as written in ``obj``'s docstring."""
    name = name.rstrip("()")
    if "." not in name:  # relative: a member of the class or module the docstring is in
        for scope in (obj, obj.parent, obj.module):
            member = scope.members.get(name) if scope is not None else None
            if member is not None:
                return member.target_path if member.is_alias else member.path  # type: ignore[union-attr]
        return name
    head, _, last = name.rpartition(".")
    if head == obj.package.path and last in obj.package.members:
        # bnctl.apply, bnctl.fold, bnctl.recalibrate, bnctl.report: functions that share their module's
        # name; in Python `bnctl.apply` is the function, for griffe the module that holds it
        member = obj.package.members[last]
        if member.is_module and last in member.members:
            return f"{name}.{last}"
    return name


def rewrite(obj: griffe.Object, text: str) -> str:
    """``obj``'s docstring ``text`` as griffe's Google parser and Markdown expect it."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _MATH_LINE.sub(lambda m: f"{m.group(1)}`{m.group(2).strip()}`", text)
    text = _MATH_BLOCK.sub(lambda m: f"{m.group(1)}Formula:\n", text)

    def role(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        label = name.rsplit(".", 1)[-1] if short else name
        return f'<autoref optional identifier="{_target(obj, name)}"><code>{label}</code></autoref>'

    return _ROLE.sub(role, text)


class BnctlDocstrings(griffe.Extension):
    """Rewrite every docstring of the package once, after it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
