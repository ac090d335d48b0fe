"""evaluate(): every dictionary is measured on the held-out text of its own store."""

import pytest
import torch

import circuitsae


@pytest.fixture(scope="module")
def two_stores(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stores")
    kw = dict(model=tiny_llama, sites=("resid.1",), tokens=120, heldout_tokens=60, ctx_len=16, batch_size=4,
              shard_contexts=4, dtype="float32", progress=False)  # fmt: skip
    stores = {c: circuitsae.harvest(corpus=c, out=str(root / c), **kw) for c in ("sotu", "bbc")}
    saes = {}
    for i, (c, st) in enumerate(stores.items()):
        torch.manual_seed(i)
        sae = circuitsae.ReluSAE(64, 96, tied=False, decoder_bias=True)
        sae.meta = {"site": "resid.1", "store": str(st.root), "first_position": 1, "model": "tiny-llama"}
        saes[c] = str(sae.save(root / f"saes/{c}-relu"))
    return stores, saes


def test_dictionaries_of_two_stores_are_each_measured_on_their_own_heldout_text(tiny_llama, two_stores, tmp_path):
    stores, saes = two_stores
    ev = dict(model=tiny_llama, contexts=3, progress=False)
    alone = {
        c: circuitsae.evaluate(dictionaries=(p,), out=str(tmp_path / f"{c}.json"), **ev).results[f"{c}-relu"]
        for c, p in saes.items()
    }
    assert alone["sotu"].ce_clean != alone["bbc"].ce_clean  # different text, different clean loss
    for order in (("sotu", "bbc"), ("bbc", "sotu")):
        both = circuitsae.evaluate(dictionaries=tuple(saes[c] for c in order), out=str(tmp_path / "both.json"), **ev)
        for c in order:
            got = both.results[f"{c}-relu"]
            assert got.store == str(stores[c].root)
            for k in ("ce_clean", "ce_zero", "ce_spliced", "loss_recovered", "kl", "fvu", "l0"):
                assert getattr(got, k) == pytest.approx(getattr(alone[c], k), rel=1e-6, abs=1e-9), (c, k)
