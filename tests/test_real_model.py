"""The real embedded model: proves the weights load and the model is the trained LM."""

import pytest
import torch

import circuitsae
from circuitsae import data, sites
from circuitsae.data.harvest import harvest

pytestmark = pytest.mark.real


def test_smollm2_architecture(smollm2):
    cfg = smollm2._module.config
    assert cfg.model_type == "llama" and sites.n_layers(smollm2) == 30 and sites.d_model(smollm2) == 576
    assert len(smollm2.tokenizer) == 49152


@pytest.mark.parametrize("io, s", [(" John", " Mary"), (" Mary", " John")])
def test_smollm2_completes_ioi(smollm2, io, s):
    tok = smollm2.tokenizer
    prompt = f"Then,{s} and{io} went to the store.{s} gave a snack to"
    ids = tok(prompt, return_tensors="pt").input_ids
    io_id, s_id = tok(io).input_ids, tok(s).input_ids
    assert len(io_id) == len(s_id) == 1, "names are single tokens with their leading space"
    with torch.no_grad(), smollm2.trace(ids):
        logits = smollm2.lm_head.output[0, -1].save()
    assert logits[io_id[0]] - logits[s_id[0]] > 1.0


def test_smollm2_harvest_on_embedded_corpus(smollm2, tmp_path):
    st = harvest(
        model=smollm2,
        sites=["resid.3"],
        tokens=254,
        ctx_len=128,
        batch_size=2,
        corpus="sotu",
        out=str(tmp_path / "s"),
        progress=False,
        dtype="float32",
    )
    x = st.activations("resid.3", "train")
    assert x.shape == (254, 576) and torch.isfinite(x).all()
    # the stored rows are the model's activations on the stored text (positions 1..127)
    toks = st.tokens("train")
    assert torch.equal(toks, data.contexts(smollm2.tokenizer, 2, 128, "sotu", "train"))
    with torch.no_grad(), smollm2.trace(toks) as tr:
        direct = sites.read(smollm2, "resid.3").save()
        tr.stop()
    direct = direct.cpu()
    assert torch.allclose(x, direct[:, 1:].reshape(-1, 576), atol=1e-4)
    # the start token is the outlier it is said to be, which is why it is excluded
    assert direct[:, 0].norm(dim=-1).mean() > 5 * direct[:, 1:].norm(dim=-1).mean()


# -- Gemma 3 270M: the second real family -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3(device):
    return circuitsae.load_model("gemma3-270m", device=device, dtype="float32")


def test_gemma3_architecture_and_sites(gemma3):
    cfg = gemma3._module.config
    assert cfg.model_type == "gemma3_text" and sites.n_layers(gemma3) == 18 and sites.d_model(gemma3) == 640
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    # attn.L / mlp.L are what the sub-blocks add to the residual: the outputs of Gemma's post-norms
    assert sites.path(gemma3, "attn.4") == "model.layers.4.post_attention_layernorm"
    assert sites.path(gemma3, "mlp.4") == "model.layers.4.post_feedforward_layernorm"


def test_gemma3_contexts_start_with_its_own_bos_once(gemma3):
    tok = gemma3.tokenizer
    assert tok("Hi").input_ids[0] == tok.bos_token_id == 2  # the tokenizer adds BOS by default
    ctx = data.contexts(tok, 3, 32, "sotu", "train")
    assert (ctx[:, 0] == 2).all() and (ctx[:, 1:] != 2).all()  # one BOS, put there by circuitsae, not doubled
    ioi = circuitsae.make_ioi(gemma3, n=4)
    assert (ioi.base[:, 0] == 2).all() and (ioi.base[:, 1] != 2).all()


def test_gemma3_does_ioi_and_the_fast_evaluator_reproduces_it(gemma3):
    import warnings

    from circuitsae.interventions.patching import feature_deltas
    from circuitsae.interventions.replay import make_evaluator

    ds = circuitsae.make_ioi(gemma3, n=20, seed=0)
    perf = circuitsae.ioi_performance(gemma3, ds)
    assert perf["accuracy"] >= 0.9 and perf["logit_diff"] > 1.0  # IO beats S
    sae = circuitsae.ReluSAE(640, 1280)
    sae.meta = {"site": "resid.12", "model": "gemma3-270m", "first_position": 1}
    sub = ds.subset(range(6))
    fd = feature_deltas(gemma3, sae, "resid.12", sub.base, sub.target, lengths=sub.lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the block-only path must reproduce the real model (no fallback)
        ev = make_evaluator(gemma3, fd, sub.base)
    assert ev.name == "downstream"
