"""Every tutorial runs top to bottom in its small mode (tiny model), so none can rot.

Each run is checked for what that tutorial exists to show, not only for not crashing.
"""

import json
import os
import re
import runpy
import shutil
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))


def _check_00(out: str, folder: Path) -> None:
    assert "ActivationStore(" in out and "is the token" in out
    assert (folder / "meta.json").is_file()


def _check_01(out: str, folder: Path) -> None:
    # both architectures trained, evaluated (L0, FVU, γ, loss recovered) and spliced
    metrics = re.findall(r"^(\S+-(relu|gated)-c[\d.]+): L0 ([\d.]+), FVU ([\d.]+), gamma ([\d.]+), loss recovered (\S+)$",
                         out, re.M)  # fmt: skip
    assert {m[1] for m in metrics} == {"relu", "gated"}, out
    assert all(float(m[2]) > 0 for m in metrics)
    saved = json.loads((folder / "eval.json").read_text())["results"]
    assert {m[0] for m in metrics} == set(saved)
    assert "with the gated SAE spliced at" in out


def _check_02(out: str, folder: Path) -> None:
    # patching every PCA component is the target run: KL(patched ‖ target) ≈ 0
    kl = float(re.search(r"PCA, every component patched: KL\(z‖y\) = (\S+)", out).group(1))
    assert abs(kl) < 1e-4, out
    rows = re.findall(r"^\s*\d\.\de[+-]\d\d\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert len(rows) == 6  # one ACDC record per threshold
    assert [int(n) for n, _, _ in rows] == sorted((int(n) for n, _, _ in rows), reverse=True)  # F only shrinks
    assert re.search(r"\d+ candidate features, \d+ subsets evaluated", out)
    assert (folder / "kl_vs_patches.png").stat().st_size > 0


def _check_03(out: str, folder: Path) -> None:
    feature = re.search(r"^feature (resid\.2):(\d+)", out, re.M)
    assert feature, out
    stem = f"{feature.group(1)}-{feature.group(2)}"
    for name in (f"{stem}-histogram.png", f"{stem}-logit_effect.png", f"{stem}.json"):
        assert (folder / "feature" / name).stat().st_size > 0
    assert re.search(r"^\d+ nodes, \d+ edges", out, re.M)
    tree = folder / "tree" / "causal_tree"
    graph = json.loads(tree.with_suffix(".json").read_text())
    assert graph["graph"]["target"] == f"{feature.group(1)}:{feature.group(2)}"
    assert tree.with_suffix(".dot").is_file()
    if shutil.which("dot"):
        assert tree.with_suffix(".svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        assert tree.with_suffix(".png").stat().st_size > 0


def _check_04(out: str, folder: Path) -> None:
    assert re.search(r"^12 dictionaries", out, re.M), out  # every site of the 4-layer tiny model
    nodes = re.search(r"^(\d+) nodes \((\d+) error nodes\), (\d+) edges", out, re.M)
    assert nodes and int(nodes.group(1)) == 30 and int(nodes.group(3)) > 0, out
    circuit = json.loads((folder / "circuit.json").read_text())
    assert len(circuit["nodes"]) == 31  # and the metric's node
    assert re.search(r"error nodes carry \d+% of the summed", out)
    assert re.search(r"atp vs exact on \d+ nodes: Spearman -?[\d.]+", out)
    curves = re.findall(r"^(SAE features \+ errors|neurons): (.*)$", out, re.M)
    assert {c[0] for c in curves} == {"SAE features + errors", "neurons"}
    assert (folder / "faithfulness.png").stat().st_size > 0


CHECKS = {"00": _check_00, "01": _check_01, "02": _check_02, "03": _check_03, "04": _check_04}


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_small_mode_runs(path, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    monkeypatch.setitem(os.environ, "CIRCUITSAE_TUTORIAL_SMALL", "1")
    monkeypatch.setitem(os.environ, "CIRCUITSAE_TUTORIAL_OUT", str(out_dir))
    runpy.run_path(str(path), run_name="__main__")
    CHECKS[path.stem[:2]](capsys.readouterr().out, out_dir)


def test_every_tutorial_has_its_check():
    assert [p.stem[:2] for p in TUTORIALS] == sorted(CHECKS)
