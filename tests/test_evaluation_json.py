"""evaluate()'s typed result: Evaluation and DictionaryMetrics read and write eval.json as it always was."""

import json

import pytest

from circuitsae.errors import CircuitSAEError
from circuitsae.training.evaluate import DictionaryMetrics, Evaluation, format_table

#: an eval.json as evaluate() wrote it before it returned a typed result (keys in their order)
OLD = {
    "model": "tiny-llama",
    "model_dtype": "float32",
    "results": {
        f"resid.2-{arch}-c0.5": {
            "path": f"runs/saes/resid.2-{arch}-c0.5",
            "store": "runs/acts",
            "architecture": arch,
            "site": "resid.2",
            "d_dict": 128,
            "coefficient": 0.5,
            "tokens": 60,
            "l0": 12.5,
            "fvu": 0.25,
            "explained_variance": 0.75,
            "mse": 0.125,
            "gamma": 0.9,
            "dead_fraction": 0.0,
            "dense_fraction": 0.01,
            "density_histogram": {"log10_edges": [-8.0, -4.0, 0.0], "counts": [3, 125], "dead": 0},
            "ce_clean": 3.0,
            "ce_spliced": 3.5,
            "ce_zero": 8.0,
            "delta_ce": 0.5,
            "loss_recovered": 0.9,
            "kl": 0.4,
            "contexts": 4,
        }
        for arch in ("relu", "gated")
    },
}


def test_an_old_eval_json_reads_and_writes_back_byte_for_byte(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(OLD, indent=1))
    ev = Evaluation.read(path)
    assert ev.path == str(path) and list(ev.results) == list(OLD["results"])
    row = ev.results["resid.2-gated-c0.5"]
    assert isinstance(row, DictionaryMetrics) and row.architecture == "gated" and row.loss_recovered == 0.9
    assert ev.to_json() == OLD and Evaluation.from_json(json.loads(json.dumps(ev.to_json())), ev.path) == ev
    ev.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text() and ev.path == str(tmp_path / "again.json")


def test_the_table_is_the_same_from_the_typed_result_and_from_the_file():
    ev = Evaluation.from_json(OLD)
    table = format_table(ev)
    assert table == format_table(ev.results) == format_table(OLD["results"])
    assert table.splitlines()[0].split()[:5] == ["name", "l0", "fvu", "gamma", "loss_recovered"]
    assert len(table.splitlines()) == 3


def test_a_row_missing_a_metric_is_one_line():
    bad = json.loads(json.dumps(OLD))
    del bad["results"]["resid.2-relu-c0.5"]["kl"]
    with pytest.raises(CircuitSAEError, match="an evaluation row lacks kl$"):
        Evaluation.from_json(bad)


def test_the_fields_are_the_file_s_values():
    ev = Evaluation.from_json(OLD, path="eval.json")
    assert ev.results["resid.2-relu-c0.5"].l0 == 12.5
    assert ev.path == "eval.json" and ev.model == "tiny-llama"
