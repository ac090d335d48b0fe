import pytest
import torch

from circuitsae import sites
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import Site


def test_parse_and_order():
    s = Site.parse("mlp.3")
    assert (s.kind, s.layer, str(s)) == ("mlp", 3, "mlp.3")
    assert Site.parse(s) is s
    names = ["resid.2", "attn.2", "mlp.1", "resid.0", "mlp.2"]
    ordered = sorted((Site.parse(n) for n in names), key=Site.sort_key)
    assert [str(x) for x in ordered] == ["resid.0", "mlp.1", "attn.2", "mlp.2", "resid.2"]


@pytest.mark.parametrize("bad", ["resid", "res.1", "resid.-1", "resid.x", "mlp 3", ""])
def test_unknown_names_explain_the_scheme(bad):
    with pytest.raises(CircuitSAEError, match="resid.L, mlp.L or attn.L"):
        Site.parse(bad)


def test_out_of_range_lists_valid_layers(tiny_llama):
    with pytest.raises(CircuitSAEError, match=r"layers 0\.\.3") as err:
        sites.resolve(tiny_llama, ["resid.4"])
    assert "resid.L, mlp.L, attn.L for L in 0..3" in str(err.value)
    with pytest.raises(CircuitSAEError, match="twice"):
        sites.resolve(tiny_llama, ["resid.1", "resid.1"])
    with pytest.raises(CircuitSAEError, match="at least one"):
        sites.resolve(tiny_llama, [])


def _hooked(model, module, ids):
    """Output of ``module`` on ``ids`` by a plain PyTorch forward hook."""
    got = {}

    def hook(m, i, o):
        got.setdefault("x", o[0] if isinstance(o, tuple) else o)

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize(
    "arch, blocks, attn",
    [
        ("tiny-llama", lambda m: m.model.layers, "self_attn"),
        ("tiny-gpt2", lambda m: m.transformer.h, "attn"),
        ("tiny-neox", lambda m: m.gpt_neox.layers, "attention"),
    ],
)
def test_sites_read_the_right_module(tiny_models, arch, blocks, attn):
    lm = tiny_models[arch]
    hf = lm._module
    ids = torch.randint(0, 1000, (2, 9)).to(hf.device)
    want = {
        "attn.1": _hooked(hf, getattr(blocks(hf)[1], attn), ids),
        "mlp.1": _hooked(hf, blocks(hf)[1].mlp, ids),
        "resid.1": _hooked(hf, blocks(hf)[1], ids),
        "resid.2": _hooked(hf, blocks(hf)[2], ids),
    }
    # the residual site also equals HF's hidden_states (index L+1; not the last, which is normed)
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(want["resid.1"], hs[2], atol=1e-6)
    order = sites.resolve(lm, list(want))
    saved = {}
    with torch.no_grad(), lm.trace(ids) as tr:
        for s in order:
            saved[str(s)] = sites.read(lm, s).save()
        tr.stop()
    for name, x in want.items():
        assert saved[name].shape == (2, 9, sites.d_model(lm))
        assert torch.allclose(saved[name], x, atol=1e-6), name


def test_unsupported_architecture_is_named(tiny_llama, monkeypatch):
    monkeypatch.setattr(tiny_llama._module.config, "model_type", "mamba")
    with pytest.raises(CircuitSAEError, match="unsupported architecture 'mamba'.*gpt2"):
        sites.resolve(tiny_llama, ["resid.0"])


def test_site_patterns_expand_against_the_layers():
    from circuitsae.sites import expand, select

    names = lambda sites: [str(s) for s in sites]  # noqa: E731
    assert len(expand(["all"], 30)) == 90 and names(expand(["all"], 2)) == [
        "attn.0", "mlp.0", "resid.0", "attn.1", "mlp.1", "resid.1",
    ]  # fmt: skip
    assert names(expand(["resid.*"], 3)) == ["resid.0", "resid.1", "resid.2"]
    assert names(expand(["*.1"], 3)) == ["attn.1", "mlp.1", "resid.1"]
    assert names(expand(["mlp.1-2", "attn.0,2", "resid.2"], 3)) == ["attn.0", "mlp.1", "attn.2", "mlp.2", "resid.2"]
    assert names(expand(["resid.*", "resid.1"], 2)) == ["resid.0", "resid.1"]  # overlaps are merged
    for bad, match in [
        (["resid.10-40"], r"'resid.10-40': layers 10-40 are not within this model's 0..29"),
        (["resid.5-3"], r"layers 5-3 are not within"),
        (["resid.30"], r"site resid.30 is out of range"),
        (["embed.*"], r"unknown site 'embed.\*'.*a pattern is all"),
        (["resid.1", "resid.1"], r"a site is named twice"),
    ]:
        with pytest.raises(CircuitSAEError, match=match):
            expand(bad, 30)
    have = ["resid.3", "resid.4", "mlp.4"]
    assert select(["resid.*"], have, "store s") == ["resid.3", "resid.4"]
    assert select(["*.4"], have, "store s") == ["mlp.4", "resid.4"]
    assert select(["all"], have, "store s") == ["resid.3", "mlp.4", "resid.4"]
    with pytest.raises(CircuitSAEError, match=r"site pattern 'attn.\*' matches none of the sites of store s"):
        select(["attn.*"], have, "store s")
    with pytest.raises(CircuitSAEError, match=r"site mlp.3 is not in store s"):
        select(["mlp.3"], have, "store s")


def test_harvest_and_train_take_site_patterns(tiny_llama, tmp_path, text_corpus):
    import circuitsae
    from circuitsae.training.trainer import train

    store = circuitsae.harvest(
        model=tiny_llama, sites=["resid.*", "mlp.1"], tokens=150, ctx_len=16, corpus=str(text_corpus),
        heldout_fraction=0.25, out=str(tmp_path / "acts"), progress=False,
    )  # fmt: skip
    n = circuitsae.sites.n_layers(tiny_llama)
    assert store.sites == ["resid.0", "mlp.1", "resid.1", *[f"resid.{i}" for i in range(2, n)]]
    saes = train(store=str(store.root), out=str(tmp_path / "saes"), sites=("mlp.*",), arch=("relu",),
                 batch_size=64, expansion=1, progress=False)  # fmt: skip
    assert list(saes) == ["mlp.1-relu-c1"]
    with pytest.raises(CircuitSAEError, match="matches none of the sites of store"):
        train(store=str(store.root), out=str(tmp_path / "o2"), sites=("attn.*",), progress=False)
