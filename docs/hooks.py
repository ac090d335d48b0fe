"""MkDocs hooks: the benchmark results the pages show, served from where the repository keeps them.

The pages link to ``benchmarks/results/…`` relative to their place in the repository (``../benchmarks/results/x.png``
from ``docs/ioi.md``), so the links also work when the Markdown is read on its own. The site copies every file of
``benchmarks/results/`` to ``site/benchmarks/results/`` and these links are rewritten to point there.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = "benchmarks/results"
LINK = re.compile(r"(\]\()((?:\.\./)+)(" + re.escape(RESULTS) + r"/[^)\s]+)")


def on_files(files: Files, config) -> Files:
    root = Path(config["docs_dir"]).parent
    for path in sorted((root / RESULTS).iterdir()):
        if path.is_file():
            files.append(File(f"{RESULTS}/{path.name}", str(root), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page

    def rewrite(m: re.Match) -> str:
        if m.group(2) != "../" * (depth + 1):  # not a link from this page to the repository's results
            return m.group(0)
        return m.group(1) + posixpath.join("../" * depth, m.group(3)) if depth else m.group(1) + m.group(3)

    return LINK.sub(rewrite, markdown)
