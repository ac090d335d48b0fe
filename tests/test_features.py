"""Feature analysis (REFERENCE §5): contexts, histogram, logit effect and unembedding, on tiny models."""

import json

import pytest
import torch

import circuitsae
from circuitsae.circuits.features import (
    ablate,
    analyse_feature,
    decoder_unembed,
    feature_activations,
    logit_effect,
    random_contexts,
    row_tokens,
    site_hook,
    token_histogram,
    top_contexts,
)
from circuitsae.circuits.trees import record
from circuitsae.commands.cli import main
from circuitsae.errors import CircuitSAEError

SITE, FEATURE = "resid.1", 3


@pytest.fixture(scope="module")
def acts(wired):
    store, dicts = wired
    return feature_activations(dicts[SITE], store, SITE, FEATURE, progress=False)


def test_activations_are_the_codes_of_every_stored_row(wired, acts):
    store, dicts = wired
    d = dicts[SITE]
    want = d.encode(store.activations(SITE, "train").to(d.W_dec.device))[:, FEATURE]
    torch.testing.assert_close(acts, want.detach().cpu())
    assert (acts > 0).any() and (acts == 0).any()


@pytest.mark.parametrize("kind", ["relu", "relu-untied", "gated", "pca", "identity"])
def test_encode_features_is_a_column_slice_of_encode(kind):
    x = torch.randn(3, 5, 64)
    d = {
        "relu": lambda: circuitsae.ReluSAE(64, 32),
        "relu-untied": lambda: circuitsae.ReluSAE(64, 32, tied=False, decoder_bias=True),
        "gated": lambda: circuitsae.GatedSAE(64, 32),
        "pca": lambda: circuitsae.PCADictionary.fit(torch.randn(256, 64)),
        "identity": lambda: circuitsae.IdentityDictionary(64),
    }[kind]()
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)  # non-zero biases, so both paths must use them alike
        feats = torch.tensor([7, 0, 3])
        torch.testing.assert_close(d.encode_features(x, feats), d.encode(x)[..., feats], rtol=1e-5, atol=1e-5)


def test_top_and_random_contexts(tiny_llama, wired, acts):
    store, _ = wired
    tok = tiny_llama.tokenizer
    top = top_contexts(acts, store, tok, k=5)
    assert [c.activation for c in top] == sorted((c.activation for c in top), reverse=True)
    assert top[0].activation == pytest.approx(float(acts.max()))
    ids = store.tokens("train")
    for c in top:
        assert c.activations[c.position] == pytest.approx(c.activation)
        assert c.tokens == [tok.decode([t]) for t in ids[c.context].tolist()]
        assert c.activations[0] == 0.0 and len(c.activations) == len(c.tokens) == 16
        assert f"[[{c.tokens[c.position]}]]" in c.marked()
    rand = random_contexts(acts, store, tok, k=6, seed=1)
    assert len({c.context for c in rand}) == 6 and all(c.activation > 0 for c in rand)
    assert [c.context for c in rand] == [c.context for c in random_contexts(acts, store, tok, k=6, seed=1)]


def test_token_histogram_counts_every_firing_row(tiny_llama, wired, acts):
    store, _ = wired
    toks = row_tokens(store)
    h = token_histogram(acts, toks, tiny_llama.tokenizer, bins=5, top=3)
    counts = torch.tensor(h["counts"])
    assert counts.shape == (4, 5) and h["tokens"][-1] == "other"
    assert int(counts.sum()) == int((acts > 0).sum())
    first = toks[acts > 0].mode().values
    assert h["tokens"][0] == repr(tiny_llama.tokenizer.decode([int(first)]))
    assert h["edges"][-1] == pytest.approx(float(acts.max()))


def test_logit_effect_is_the_mean_change_at_firing_positions(tiny_llama, wired):
    store, dicts = wired
    d, ids = dicts[SITE], store.tokens("train")[:4]
    res = logit_effect(tiny_llama, d, SITE, ids, FEATURE, k=5, batch_size=3)
    hf = tiny_llama._module
    ids = ids.to(hf.device)
    with torch.no_grad():
        clean = hf(input_ids=ids).logits.log_softmax(-1)
        with site_hook(tiny_llama, SITE, lambda x: ablate(d, x, FEATURE, start=1)):
            ablated = hf(input_ids=ids).logits.log_softmax(-1)
        x = record(hf, ids, [SITE])[SITE]
    fires = d.encode(x)[..., FEATURE] > 0
    fires[:, 0] = False
    mean = (ablated - clean)[fires].mean(0).cpu()
    assert res["positions"] == int(fires.sum())
    tok = tiny_llama.tokenizer
    assert [t for t, _ in res["down"]] == [tok.decode([int(i)]) for i in mean.argsort()[:5]]
    assert res["down"][0][1] == pytest.approx(float(mean.min()), rel=1e-4)
    assert res["up"][0][1] == pytest.approx(float(mean.max()), rel=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_decoder_unembed_reads_the_direction_through_the_final_norm(tiny_models, name):
    model = tiny_models[name]
    hf = model._module
    d = circuitsae.ReluSAE(64, 8).to(hf.device)
    norm = hf.model.norm if name == "tiny-llama" else hf.transformer.ln_f
    saved = norm.bias.detach().clone() if name == "tiny-gpt2" else None
    if saved is not None:
        with torch.no_grad():
            norm.bias.normal_()  # a bias, the same for every direction, must not count
    f = d.W_dec[2].detach()
    with torch.no_grad():
        logits = hf.get_output_embeddings().weight @ (norm(f) - norm(torch.zeros_like(f)))
    res = decoder_unembed(model, d, 2, k=4)
    logits = logits.cpu()
    assert [t for t, _ in res["top"]] == [model.tokenizer.decode([int(i)]) for i in logits.argsort(descending=True)[:4]]
    assert res["bottom"][0][1] == pytest.approx(float(logits.min()), rel=1e-5)
    if saved is not None:
        with torch.no_grad():
            norm.bias.copy_(saved)


def test_analyse_and_write(tiny_llama, wired, tmp_path):
    store, dicts = wired
    rep = analyse_feature(tiny_llama, dicts[SITE], store, FEATURE, k=4, progress=False)
    assert rep.site == SITE and 0 < rep.density < 1 and rep.rows == 405 and len(rep.top) == 4
    from circuitsae.viz.plots import write_feature_report

    paths = write_feature_report(rep, tmp_path / "f")
    data = json.loads(open(paths["json"]).read())
    assert data["feature"] == FEATURE and data["top"][0]["activation"] == pytest.approx(rep.max_activation)
    for key in ("histogram", "logit_effect"):
        assert open(paths[key], "rb").read(4) == b"\x89PNG"
    assert f"{SITE}:{FEATURE}" in rep.summary()


def test_a_feature_that_never_fires_is_an_error_with_its_density(wired):
    store, dicts = wired
    d = circuitsae.ReluSAE(64, 16)
    d.load_state_dict(dicts[SITE].state_dict())
    with torch.no_grad():
        d.b_enc[FEATURE] = -100.0
    with pytest.raises(CircuitSAEError, match=r"resid.1 never fires: density 0 over 405 train rows"):
        feature_activations(d, store, SITE, FEATURE, progress=False)


def test_feature_cli(tiny_llama, wired, tmp_path, capsys, device):
    store, dicts = wired
    dicts[SITE].save(tmp_path / "saes" / f"{SITE}-relu-c1")
    argv = ["feature", f"{SITE}:{FEATURE}", "--dictionaries", str(tmp_path / "saes"), "--contexts", "3"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", device, "--model-dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "top contexts:" in printed and "ablation lowers:" in printed
    assert (tmp_path / "out" / f"{SITE}-{FEATURE}-histogram.png").is_file()
    assert main(["feature", "resid.2:1", "--dictionaries", str(tmp_path / "saes")]) == 2
    assert "no dictionary at resid.2" in capsys.readouterr().err
