"""The IOI dataset: prompt structure, determinism, name validation, metrics, and the real model doing IOI."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import circuitsae
from circuitsae.circuits.curves import halving
from circuitsae.commands.ioi import IOIRun
from circuitsae.errors import CircuitSAEError
from circuitsae.models import start_token_id
from circuitsae.tasks import (
    TEMPLATES,
    IOIDataset,
    PromptPairs,
    final_logits,
    ioi_performance,
    logit_diff,
    make_ioi,
    single_token_names,
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama.tokenizer


@pytest.fixture(scope="module")
def ds(tok):
    return make_ioi(tok, n=60, seed=0)


def test_prompt_structure(ds, tok):
    assert ds.base.shape == ds.target.shape and ds.base.dtype == torch.long and len(ds) == 60
    assert (ds.base[:, 0] == start_token_id(tok)).all() and (ds.target[:, 0] == start_token_id(tok)).all()
    assert torch.equal(ds.end_position, ds.lengths - 1)
    for i in range(len(ds)):
        n = int(ds.lengths[i])
        diff = (ds.base[i] != ds.target[i]).nonzero().flatten().tolist()
        assert diff == [int(ds.io_position[i])]
        assert ds.base[i, ds.io_position[i]] == ds.io_token[i] and ds.target[i, ds.io_position[i]] == ds.target_token[i]
        io, s = tok.decode([int(ds.io_token[i])]), tok.decode([int(ds.s_token[i])])
        assert io.startswith(" ") and s.startswith(" ")
        assert tok.decode([int(ds.base[i, ds.io_position[i]])]) == io
        assert tok.decode([int(ds.base[i, ds.s1_position[i]])]) == s
        assert tok.decode([int(ds.base[i, ds.s2_position[i]])]) == s
        assert 0 < ds.s1_position[i] < ds.s2_position[i] < n - 1 and ds.io_position[i] < ds.s2_position[i]
        assert (ds.io_position[i] < ds.s1_position[i]) == (ds.orders[i] == "ABBA")
        assert n == ds.base.shape[1] or (ds.base[i, n:] == tok.pad_token_id).all()
        assert tok.decode(ds.base[i, 1:n]) == ds.texts[i] and tok.decode(ds.target[i, 1:n]) == ds.target_texts[i]
        assert ds.texts[i].count(io.strip()) == 1 and ds.texts[i].endswith(" to")
    assert ((ds.target_token != ds.io_token) & (ds.target_token != ds.s_token) & (ds.io_token != ds.s_token)).all()


def test_deterministic_from_seed(tok):
    a, b, c = make_ioi(tok, n=20, seed=7), make_ioi(tok, n=20, seed=7), make_ioi(tok, n=20, seed=8)
    for name in ("base", "target", "lengths", "io_token", "s_token", "target_token", "io_position"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.texts == b.texts and a.seed == 7
    assert a.texts != c.texts


def test_orders_and_templates(tok, ds):
    assert len(TEMPLATES) >= 15
    assert set(ds.orders) == {"ABBA", "BABA"}
    big = make_ioi(tok, n=200, seed=1)
    assert len(set(big.templates)) >= 15
    assert {(t, o) for t, o in zip(big.templates, big.orders)} == {
        (t, o) for t in big.templates for o in ("ABBA", "BABA")
    }


def test_name_validation(tok):
    assert "Xzqwvbn" not in single_token_names(tok, ["John", "Xzqwvbn", "Mary"])
    assert single_token_names(tok, ["John", "Mary"]) == ["John", "Mary"]
    assert len(single_token_names(tok)) >= 80
    with pytest.raises(CircuitSAEError, match="Xzqwvbn"):
        make_ioi(tok, n=4, names=["John", "Mary", "Tom", "Xzqwvbn"])
    with pytest.raises(CircuitSAEError, match="at least 3"):
        make_ioi(tok, n=4, names=["John", "Mary"])
    ds = make_ioi(tok, n=10, names=["John", "Mary", "Tom"])
    names = {int(t) for t in tok.encode(" John Mary Tom", add_special_tokens=False)}
    assert set(ds.io_token.tolist()) | set(ds.s_token.tolist()) | set(ds.target_token.tolist()) <= names


def test_bad_template_raises(tok):
    # a name at the very start has no leading space, so it is not the " Name" token
    with pytest.raises(CircuitSAEError, match="template 0"):
        make_ioi(tok, n=4, templates=["{A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to"])
    with pytest.raises(CircuitSAEError, match="may use only"):
        make_ioi(tok, n=4, templates=["Then, {A} and {B} met {C}. {S} gave a {OBJECT} to"])


def test_subset(ds):
    sub = ds.subset([3, 0])
    assert len(sub) == 2 and sub.texts == [ds.texts[3], ds.texts[0]] and sub.orders == [ds.orders[3], ds.orders[0]]
    assert sub.base.shape[1] == int(sub.lengths.max())
    assert torch.equal(sub.base[0, : sub.lengths[0]], ds.base[3, : ds.lengths[3]])


def test_an_ioi_dataset_is_prompt_pairs_that_know_their_answers(ds):
    assert isinstance(ds, PromptPairs) and isinstance(ds.subset([1]), IOIDataset)
    io, s = ds.answer_tokens
    assert torch.equal(io, ds.io_token) and torch.equal(s, ds.s_token)
    pairs = PromptPairs(ds.base, ds.target, ds.lengths)
    assert pairs.answer_tokens is None and len(pairs) == len(ds) and torch.equal(pairs.end_position, ds.end_position)
    sub = pairs.subset([3, 0])
    assert type(sub) is PromptPairs and torch.equal(sub.base, ds.subset([3, 0]).base)
    assert torch.equal(sub.target, ds.subset([3, 0]).target) and torch.equal(sub.lengths, ds.lengths[[3, 0]])


def test_logit_diff_and_final_logits(ds):
    sub = ds.subset([0, 1])
    final = torch.zeros(2, 49152)
    final[0, sub.io_token[0]], final[0, sub.s_token[0]] = 3.0, 1.0
    final[1, sub.io_token[1]], final[1, sub.s_token[1]] = -2.0, 0.5
    assert torch.allclose(logit_diff(final, sub), torch.tensor([2.0, -2.5]))
    full = torch.randn(2, sub.base.shape[1], 7)
    gathered = final_logits(full, sub)
    for i in range(2):
        assert torch.equal(gathered[i], full[i, sub.lengths[i] - 1])


def test_ioi_performance_tiny(tiny_llama, ds):
    perf = ioi_performance(tiny_llama, ds.subset(range(10)), batch_size=6)
    assert set(perf) == {"logit_diff", "logit_diff_std", "accuracy", "target_logit_diff", "n"}
    assert perf["n"] == 10 and 0.0 <= perf["accuracy"] <= 1.0
    assert all(math.isfinite(v) for v in perf.values())
    # batching and padding do not change the answer
    assert perf["logit_diff"] == pytest.approx(
        ioi_performance(tiny_llama, ds.subset(range(10)))["logit_diff"], abs=1e-4
    )


@pytest.mark.real
def test_smollm2_does_ioi(smollm2):
    perf = ioi_performance(smollm2, make_ioi(smollm2, n=50))
    assert perf["accuracy"] >= 0.9 and perf["logit_diff"] > 1.0, perf
    assert perf["target_logit_diff"] > 1.0, perf


def test_a_dictionary_with_nothing_to_patch_is_skipped_not_fatal(tiny_llama, wired, tmp_path):
    """A dictionary whose features are all dead on the IOI prompts (the demo's α = 4 SAE on Gemma 3 is nearly so)
    has no curve; the experiment over several dictionaries draws the others and says which it skipped."""
    import copy
    import warnings

    from circuitsae.commands.ioi import run_ioi
    from circuitsae.errors import NothingToPatch
    from circuitsae.interventions.patching import feature_deltas

    _, dicts = wired
    live, dead = dicts["resid.1"], copy.deepcopy(dicts["resid.1"])
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)  # no feature ever fires
    paths = [str(live.save(tmp_path / "live")), str(dead.save(tmp_path / "dead"))]
    ds = circuitsae.make_ioi(tiny_llama, n=4, seed=0)
    with pytest.raises(NothingToPatch, match="no feature of the relu dictionary at resid.1 differs") as err:
        feature_deltas(tiny_llama, dead, "resid.1", ds.base, ds.target, lengths=ds.lengths)
    assert "\n" not in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_ioi(dictionaries=paths, model=tiny_llama, prompts=4, thresholds=3, pca=False,
                         out=str(tmp_path / "ioi"), progress=False)  # fmt: skip
    assert {r["path"] for r in report.results} == {paths[0]}
    assert {r["method"] for r in report.results} == {"acdc", "attribution"}
    assert [s["path"] for s in report.skipped] == [paths[1]] and "differs" in report.skipped[0]["reason"]
    assert any("skipped" in str(w.message) for w in caught)
    assert (tmp_path / "ioi" / "kl_vs_patches.png").is_file()
    # the file holds exactly the keys it always held, and reads back as the same run
    written = json.loads((tmp_path / "ioi" / "kl_vs_patches.json").read_text())
    assert list(written) == ["model", "model_dtype", "device", "machine", "prompts", "seed", "thresholds", "ioi",
                             "heldout_prompts", "ioi_heldout", "config", "results", "skipped", "seconds", "complete"]  # fmt: skip
    assert report.path == str(tmp_path / "ioi" / "kl_vs_patches.json")
    again = IOIRun.from_json(report.path)
    assert again.to_json() == written == json.loads(json.dumps(report.to_json())) and again.path == report.path
    assert len(again.halving()) == len(again.curves()) == 2 and len(again.curves(method="acdc")) == 1


def test_an_ioi_results_file_of_the_benchmark_loads_and_round_trips():
    """benchmarks/results/kl_vs_patches.json (written by the benchmark, with keys of its own and the τ count
    only) loads as an IOIRun whose rows halving() and transfer() read, and writes back the same object."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kl_vs_patches.json"
    data = json.loads(path.read_text())
    run = IOIRun.from_json(path)
    assert run.path == str(path) and run.thresholds == data["thresholds"] and run.prompts == data["prompts"]
    assert run.ioi_heldout == data["ioi_heldout"] and "store_identity" in run.extra and run.seed is None
    assert run.to_json().keys() >= data.keys() and {k: run.to_json()[k] for k in data} == data
    assert [h["features"] for h in run.halving()] == [h["features"] for h in data["halving"]]  # the grid points
    assert [t.get("removed_heldout") for t in run.transfer()] == [t.get("removed_heldout") for t in data["transfer"]]
    with pytest.raises(CircuitSAEError, match="not an IOI run"):
        IOIRun.from_json({"model": "x"})


def test_halving_reads_features_and_edit_off_one_record():
    records = [
        {"n_features": 40, "kl": 0.9, "edit_magnitude": 30.0},
        {"n_features": 60, "kl": 0.8, "edit_magnitude": 20.0},  # more features, smaller edit
        {"n_features": 20, "kl": 1.5, "edit_magnitude": 10.0},  # does not halve
    ]
    curve = {
        "label": "x",
        "site": "resid.1",
        "method": "attribution",
        "start": {"none": {"kl": 2.0}},
        "records": records,
    }
    h = halving(curve)
    assert (h["features"], h["edit_magnitude"]) == (40, 30.0)
    assert (h["min_edit_features"], h["min_edit"]) == (60, 20.0)
    assert h["floor"] == 0.8 and h["kl_all"] is None
    assert h["bracket"] == [20, 40]  # the record before the grid point, and the grid point
    none = halving({**curve, "records": records[2:]})
    assert none["features"] is None and none["edit_magnitude"] is None and none["min_edit"] is None
    assert none["features_interpolated"] is None and none["bracket"] is None


def test_halving_interpolates_the_crossing_on_log_features():
    """A curve that is a straight line in (log n, KL) is crossed where the line says, whatever the grid."""
    from circuitsae.circuits.curves import crossing

    def line(n):  # KL 4 at one feature, 1 less per decade
        return 4.0 - math.log10(n)

    curve = {
        "label": "x",
        "site": "resid.1",
        "method": "acdc",
        "start": {"none": {"kl": 5.0}, "all": {"n_features": 5000, "kl": 0.4}},  # goal: KL 2.5, at n = 10^1.5
        "records": [{"n_features": n, "kl": line(n), "edit_magnitude": float(n)} for n in (1000, 100, 10, 1)],
    }
    h = halving(curve)
    assert h["features"] == 100 and h["bracket"] == [10, 100]
    assert h["features_interpolated"] == pytest.approx(10**1.5)
    # the floor is the lowest KL on the curve, the every-candidate end counted; kl_all is that end's own KL
    assert h["floor"] == 0.4 and h["kl_all"] == 0.4
    above = halving({**curve, "start": {**curve["start"], "all": {"n_features": 5000, "kl": 1.7}}})
    assert above["floor"] == pytest.approx(line(1000)) and above["kl_all"] == 1.7  # as α = 1 at resid.27
    # any fraction, any spacing: 40% of the unpatched KL is 2.0, at n = 100 exactly, bracket 30–300
    grid = [{"n_features": n, "kl": line(n), "edit_magnitude": 1.0} for n in (3, 30, 300, 3000)]
    assert crossing(grid, 2.0) == pytest.approx((100.0, 30, 300))
    # linear in KL between the two records, not in log KL: half-way in KL is half-way in log n
    assert crossing([{"n_features": 10, "kl": 3.0, "edit_magnitude": 0}, {"n_features": 1000, "kl": 1.0,
                                                                           "edit_magnitude": 0}], 2.0)[0] == pytest.approx(100.0)  # fmt: skip
    # not monotone: the bracket is the grid point and the most features below it (all above the goal)
    bumpy = [{"n_features": n, "kl": kl, "edit_magnitude": 1.0} for n, kl in ((50, 3.0), (20, 2.6), (10, 3.5),
                                                                              (80, 1.0), (200, 0.5))]  # fmt: skip
    assert crossing(bumpy, 2.5) == pytest.approx((math.exp(math.log(50) + 0.25 * math.log(80 / 50)), 50, 80))
    # the first record already halves it: nothing to interpolate from, the grid point stands
    first = halving({**curve, "records": curve["records"][:2]})
    assert first["features"] == 100 and first["features_interpolated"] is None and first["bracket"] is None


def test_transfer_scores_the_halving_set_on_the_heldout_prompts_and_the_table_shows_it():
    from circuitsae.circuits.curves import HALVING_HEADER, halving_table, transfer

    curve = {
        "label": "gated λ=2 (R=3)",
        "site": "resid.1",
        "method": "acdc",
        "start": {"none": {"kl": 2.0}, "all": {"kl": 0.1}},
        "records": [
            {"n_features": 10, "kl": 1.5, "edit_magnitude": 5.0},
            {"n_features": 30, "kl": 0.8, "edit_magnitude": 9.0},  # halves on the selection prompts
            {"n_features": 50, "kl": 0.4, "edit_magnitude": 12.0},
        ],
        "heldout": {
            "start": {"none": {"kl": 4.0}, "all": {"kl": 0.2}},
            # the same sets, scored on the other prompts
            "records": [
                {"n_features": n, "kl": kl, "edit_magnitude": 1.0} for n, kl in ((10, 3.9), (30, 3.0), (50, 1.0))
            ],
        },
    }
    t = transfer(curve)
    assert t["features"] == 30
    assert t["removed_selection"] == pytest.approx(0.6) and t["removed_heldout"] == pytest.approx(0.25)
    assert t["heldout_over_selection"] == pytest.approx(0.25 / 0.6)
    assert t["heldout_halving"] == 50 and t["kl_all_candidates_heldout"] == 0.2
    assert t["heldout_bracket"] == [30, 50]
    assert t["heldout_halving_interpolated"] == pytest.approx(math.exp(math.log(30) + 0.5 * math.log(50 / 30)))
    assert transfer({**curve, "heldout": {}}) == {"label": curve["label"], "site": "resid.1", "method": "acdc",
                                                  "features": 30}  # fmt: skip
    never = {**curve, "label": "baseline α=2 (R=4)", "method": "attribution",
             "records": [{**r, "kl": 1.9} for r in curve["records"]]}  # fmt: skip
    # computed from the records, not from stored halving/transfer lists
    rows = halving_table({"results": [curve, never], "halving": [], "transfer": []}).splitlines()
    assert rows[0] == HALVING_HEADER and "floor (lowest KL)" in rows[0] and "every candidate patched" in rows[0]
    # log n at KL 1.0 between (10, 1.5) and (30, 0.8): 10 · 3^(0.5/0.7) = 21.9
    assert rows[2] == "| resid.1 | **ACDC** | Gated | ~22 [10–30] | 9.0 | 0.10 | 0.10 | 25% | 0.42 | ~39 [30–50] |"
    assert rows[3] == "| resid.1 | attribution | α = 2 | never | – | 0.10 | 0.10 | – | – | ~39 [30–50] |"


def test_selection_and_heldout_prompts_share_no_name_or_template(tiny_llama):
    from circuitsae.circuits.curves import split_prompts

    select, held = split_prompts(tiny_llama, 12, 10, seed=0)
    assert len(select) == 12 and len(held) == 10
    sel_names = set(select.io_token.tolist()) | set(select.s_token.tolist()) | set(select.target_token.tolist())
    held_names = set(held.io_token.tolist()) | set(held.s_token.tolist()) | set(held.target_token.tolist())
    assert not sel_names & held_names

    def pattern(template):
        parts = re.split(r"\{\w+\}", template)
        return re.compile("^" + ".+?".join(map(re.escape, parts)) + "$")

    chosen = [pattern(t) for t in TEMPLATES[0::2]]
    assert all(any(p.match(t) for p in chosen) for t in select.texts)
    assert not any(p.match(t) for p in chosen for t in held.texts)


def test_chosen_feature_sets_are_scored_on_heldout_prompts(tiny_llama, wired, tmp_path):
    """Every record's feature set is rebuilt exactly and patched, unchanged, into the other prompts."""
    from circuitsae.circuits.curves import feature_sets, score_sets, split_prompts
    from circuitsae.commands.ioi import run_ioi
    from circuitsae.viz.plots import plot_transfer

    _, dicts = wired
    path = str(dicts["resid.1"].save(tmp_path / "d"))
    report = run_ioi(dictionaries=[path], model=tiny_llama, prompts=6, heldout_prompts=5, thresholds=4, pca=False,
                     out=str(tmp_path / "ioi"), progress=False)  # fmt: skip
    assert report.heldout_prompts == 5 and report.ioi_heldout["n"] == 5
    _, held = split_prompts(tiny_llama, 6, 5, seed=0)
    d = circuitsae.load_dictionary(path)
    for curve in report.results:
        h = curve["heldout"]
        assert h["prompts"] == 5 and len(h["records"]) == len(curve["records"])
        assert [r["n_features"] for r in h["records"]] == [r["n_features"] for r in curve["records"]]
        # the same sets, measured again from scratch with patch_features, give the same KLs
        sets = feature_sets(curve, curve["order"]) if len(curve["order"]) == curve["n_candidates"] else None
        if sets is None:
            continue
        again = score_sets(tiny_llama, d, "resid.1", held, sets)
        for a, b in zip(again["records"], h["records"]):
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-7)
        for s, rec in zip(sets[:2], h["records"][:2]):
            r = circuitsae.patch_features(tiny_llama, d, "resid.1", held.base, held.target, s, lengths=held.lengths)
            assert r.kl == pytest.approx(rec["kl"], rel=1e-4, abs=1e-6)
    assert h["start"]["none"]["kl"] > 0
    assert (tmp_path / "ioi" / "kl_vs_patches_heldout.png").is_file()
    plot_transfer(report, tmp_path / "t.png")
