"""The committed benchmark results name their machine and hold no path of the machine they ran on."""

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ABSOLUTE = re.compile(r'"(/|[A-Za-z]:\\\\|~/)[^"]*"')


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_json_hold_relative_paths_and_a_machine(path):
    text = path.read_text()
    assert not ABSOLUTE.search(text), f"{path.name} holds an absolute path: {ABSOLUTE.search(text).group(0)}"
    data = json.loads(text)
    assert "machine" in json.dumps(data), f"{path.name} does not name the machine it ran on"


def test_docs_ioi_table_is_the_one_the_results_file_gives():
    """docs/ioi.md's IOI figures are computed from the curves' records in benchmarks/results/kl_vs_patches.json
    (interpolated halving, floor and every-candidate KL, held-out ratio), not typed in nor read off stored lists."""
    from circuitsae.circuits.curves import halving_table

    expected = halving_table(json.loads((RESULTS / "kl_vs_patches.json").read_text())).splitlines()
    page = (RESULTS.parents[1] / "docs" / "ioi.md").read_text().splitlines()
    assert expected[0] in page, "docs/ioi.md lacks the IOI table: python benchmarks/kl_vs_patches.py --table"
    start = page.index(expected[0])
    assert page[start : start + len(expected)] == expected, "regenerate: python benchmarks/kl_vs_patches.py --table"
