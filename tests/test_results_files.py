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


def test_readme_ioi_table_is_the_one_the_results_file_gives():
    """The README's IOI figures are read off benchmarks/results/kl_vs_patches.json, not typed in."""
    from circuitsae.circuits.curves import halving_table

    expected = halving_table(json.loads((RESULTS / "kl_vs_patches.json").read_text())).splitlines()
    readme = (RESULTS.parents[1] / "README.md").read_text().splitlines()
    start = readme.index(expected[0])
    assert readme[start : start + len(expected)] == expected, "regenerate: python benchmarks/kl_vs_patches.py --table"
