"""A griffe extension: the reST habits of circuitsae's docstrings, read as Markdown for the API reference.

The docstrings are written for a reader of the source: Sphinx roles (``:class:`~circuitsae.x.Y```), reST simple
tables (columns under ``====  ====`` borders) and literal blocks after ``::``. Here, before mkdocstrings renders
them, a role becomes a code span (``~`` keeps the last name, as Sphinx shows it), a simple table becomes a
preformatted block, and a paragraph's closing ``::`` a single colon. Nothing in the source changes.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")
BORDER = re.compile(r"^(\s*)=+(?:\s+=+)+\s*$")


def _role(m: re.Match) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, end, borders = m.group(1), i, 0
        j = i
        while j < len(lines) and lines[j].strip():  # a simple table is one block: up to the next blank line
            if BORDER.match(lines[j]):
                borders, end = borders + 1, j
            j += 1
        if borders < 2:
            out.append(lines[i])
            i += 1
            continue
        out += [f"{indent}```text", *lines[i : end + 1], f"{indent}```"]
        i = end + 1
    return out


def markdown(text: str) -> str:
    text = ROLE.sub(_role, text)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    return "\n".join(_tables(text.split("\n")))


class ReSTToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
