"""The demo's report.html as a person sees it: opened in headless Chromium at 1280 px.

Every image decodes, the causal tree is drawn with labels large enough to read (a wide tree scrolls in its own
box instead of shrinking to the page), the page is no wider than the window, and nothing goes to the console.
Needs Debian's ``chromium`` (``make setup`` installs it); without it these tests fail, saying how to install it.
"""

import json
from pathlib import Path

import networkx as nx
import pytest

from circuitsae.viz.browser import MIN_LABEL_PX, find_chromium, inspect_page, problems
from circuitsae.viz.render import render
from circuitsae.viz.report import SECTIONS, write_report


@pytest.fixture(scope="module")
def chromium():
    try:
        return find_chromium()
    except FileNotFoundError as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)  # not a skip: `make test` installs it


@pytest.fixture(scope="module")
def demo(chromium, tiny_demo):
    return tiny_demo  # the same tiny demo run as tests/test_demo.py's


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_the_demo_report_reads_in_a_browser(demo, tmp_path):
    out, summary = demo
    png = tmp_path / "report.png"
    seen = inspect_page(out / "report.html", png, width=1280)
    assert problems(seen) == []  # every image decoded, the tree drawn and readable, no console error
    assert seen["h2"] == list(SECTIONS)
    assert len(seen["images"]) == 3  # IOI curves, token histogram, logit effect
    assert all(i["natural_width"] > 0 and i["width"] > 0 for i in seen["images"])
    (tree,) = seen["svgs"]
    assert tree["nodes"] >= summary["tree"]["nodes"] and tree["width"] > 0 and tree["height"] > 0
    assert tree["min_label_px"] >= MIN_LABEL_PX
    # the run's files are links relative to the report, not a printed dict
    assert {"summary.json", "report.html", "tree/causal_tree.dot"} <= set(seen["links"])
    assert '{"summary"' not in seen["text"] and "summary.json: every number on this page" in seen["text"]
    width, height = _png_size(png)
    assert width == 1280 and height > 2000  # the whole page, not one window
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 500, "the screenshot is nearly blank"


def _wide_tree(n_leaves: int = 16) -> nx.DiGraph:
    """A causal tree shaped like the real demo's (28 nodes over four sites, most of them at the first)."""
    g = nx.DiGraph(target="resid.3:7", model="tiny-llama", contexts=20, target_max_activation=9.5, mode="paper")
    g.add_node("resid.3:7", site="resid.3", label="' the' ' The' 'The'", max_activation=9.5)
    levels = [["resid.3:7"]]
    for site, n in (("resid.2", 3), ("resid.1", 8), ("resid.0", n_leaves)):
        level = [f"{site}:{100 + i}" for i in range(n)]
        for i, v in enumerate(level):
            g.add_node(v, site=site, label="' of' ' the' ' Executive'", max_activation=10.0 + i)
            child = levels[-1][i % len(levels[-1])]
            g.add_edge(v, child, effect=1.0 + i, relative=0.05 * (1 + i % 5))
        levels.append(level)
    return g


def test_a_wide_causal_tree_scrolls_at_full_size_instead_of_shrinking(demo, tmp_path):
    out, summary = demo
    files = render(_wide_tree(), tmp_path / "tree" / "causal_tree")
    summary = json.loads(json.dumps(summary))
    summary["tree"].update(files, nodes=28)
    page = write_report(summary, tmp_path / "report.html")
    fit = """(() => {
      const box = document.getElementById('tree'), svg = box.querySelector('svg');
      const sizes = {};
      for (const z of ['fit', '1.5', '1']) {
        document.querySelector(`[data-zoom="${z}"]`).click();
        sizes[z] = svg.getBoundingClientRect().width;
      }
      return {...sizes, box: box.clientWidth};
    })()"""
    seen = inspect_page(page, tmp_path / "wide.png", width=1280, script=fit)
    assert problems(seen) == []
    (tree,) = seen["svgs"]
    assert tree["nodes"] == 28 + 1  # and the legend
    assert tree["width"] > tree["container_width"] + 200  # wider than the window: drawn at full size ...
    assert tree["container_scroll_width"] >= tree["width"]  # ... in a box that scrolls to all of it
    assert tree["min_label_px"] >= MIN_LABEL_PX
    assert seen["page_width"] <= seen["viewport_width"]  # the page itself does not scroll sideways
    zoom = seen["script"]
    assert zoom["fit"] <= zoom["box"] and zoom["1.5"] == pytest.approx(1.5 * zoom["1"], abs=2), zoom
