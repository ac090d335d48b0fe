"""The demo runs end to end on the tiny model, resumes, and its report has every section."""

import json
from html.parser import HTMLParser

import pytest

from circuitsae.commands.demo import DemoConfig, one_screen, run_demo
from circuitsae.errors import CircuitSAEError
from circuitsae.viz.report import SECTIONS

from conftest import TINY_DEMO as SMALL


class _Headings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.h2, self.tags, self._in = [], set(), False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in = tag == "h2"

    def handle_data(self, data):
        if self._in:
            self.h2.append(data)
            self._in = False


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return tiny_demo


def test_demo_writes_a_report_with_every_section(demo):
    out, summary = demo
    page = (out / "report.html").read_text()
    parser = _Headings()
    parser.feed(page)
    assert parser.h2 == list(SECTIONS)
    assert "img" in parser.tags and "svg" in parser.tags  # the plots and the inline circuit diagram
    assert "(not run)" not in page and "not produced" not in page
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["saes"]) == {
        f"{s}-{k}" for s in SMALL["sites"] for k in ("relu-c1", "relu-c4", "relu-c0", "gated-c2")
    }
    assert {r["method"] for r in saved["ioi"]["rows"]} == {"acdc", "attribution"}
    assert {r["label"].split(" ")[0] for r in saved["ioi"]["rows"]} == {"baseline", "gated", "PCA"}
    assert saved["tree"]["nodes"] >= 1 and (out / "tree" / "causal_tree.svg").is_file()
    assert "report" in one_screen(summary)


def test_demo_resumes_without_redoing_finished_steps(demo, device):
    out, first = demo
    again = run_demo(out=str(out), progress=False, device=device, **SMALL)
    assert again["saes"] == first["saes"]
    assert again["ioi"]["rows"] == first["ioi"]["rows"]  # each IOI curve was read back, not recomputed
    assert again["seconds"]["ioi"] < first["seconds"]["ioi"]


def test_demo_rejects_a_single_site():
    with pytest.raises(CircuitSAEError, match="two successive sites"):
        DemoConfig(sites=("resid.0",))
