"""Every tutorial runs top to bottom in its small mode (tiny model), so none can rot."""

import os
import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_small_mode_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(os.environ, "CIRCUITSAE_TUTORIAL_SMALL", "1")
    monkeypatch.setitem(os.environ, "CIRCUITSAE_TUTORIAL_OUT", str(tmp_path / "out"))
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "ActivationStore(" in out and "is the token" in out


def test_there_are_tutorials():
    assert TUTORIALS
