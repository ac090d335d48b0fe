"""The real embedded model: proves the weights load and the model is the trained LM."""

import pytest
import torch

from circuitsae import data, sites
from circuitsae.harvest import harvest

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
    assert torch.allclose(x, direct[:, 1:].reshape(-1, 576), atol=1e-4)
    # the start token is the outlier it is said to be, which is why it is excluded
    assert direct[:, 0].norm(dim=-1).mean() > 5 * direct[:, 1:].norm(dim=-1).mean()
