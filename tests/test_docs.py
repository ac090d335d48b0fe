"""The documentation: the site builds with ``--strict``, the README stays a short front door, and links hold.

The build reads the sources statically (mkdocstrings' Python handler, through griffe): a broken cross-reference,
a missing page, an anchor that does not exist or a docstring griffe cannot parse fails it, and no module is
imported, so it takes seconds.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
README_LINES = 200


def _links(path: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every relative link in a Markdown file, code blocks and code spans left out."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        found.append((file, anchor))
    return found


def _anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives a page (Python-Markdown's toc slugify)."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(h.strip(), "-") for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines (at most {README_LINES}): move to docs/"


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_that_exist(path):
    broken = []
    for file, anchor in _links(path):
        target = (path.parent / file).resolve() if file else path
        if not target.exists():
            broken.append(f"{file}: no such file")
        # the API reference's anchors (circuitsae.…) are made by mkdocstrings and checked by the strict build
        elif anchor and target.suffix == ".md" and not anchor.startswith("circuitsae."):
            if anchor not in _anchors(target):
                broken.append(f"{file}#{anchor}: no such heading")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.relative_to(DOCS).as_posix() for p in PAGES if p.relative_to(DOCS).as_posix() not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_the_site_builds_strictly(tmp_path):
    mkdocs = pytest.importorskip("mkdocs")
    assert mkdocs
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-6000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "reference" / "data.html").is_file()
    api = (site / "reference" / "dictionaries.html").read_text()
    assert "circuitsae.dictionaries.registry" in api and "register" in api, "the API reference is empty"
    assert (site / "benchmarks" / "results" / "pareto.png").is_file(), "the results the pages show are not copied"
