"""Other libraries' formats: hand-built folders in each peer's exact layout, with codes from the peer's formula.

No peer library is imported: each expected code below is the peer's encoder written out plainly
(SAE Lens 6.54, dictionary_learning 0.1.0, sparsify 1.3.3), computed on the tensors the test wrote.
"""

import json

import pytest
import safetensors.torch
import torch

from circuitsae import CircuitSAEError
from circuitsae.commands.cli import main
from circuitsae.dictionaries import (
    BatchTopKSAE,
    GatedSAE,
    IdentityDictionary,
    JumpReLUSAE,
    PCADictionary,
    ReluSAE,
    TopKSAE,
    load_dictionary,
)
from circuitsae.dictionaries.formats import (
    detect_format,
    dictionary_learning_site,
    module_site,
    site_to_hook,
    transformer_lens_site,
)

D, F = 12, 32  # d_in, d_sae
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _x(n=96, d=D, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    assert torch.allclose(a, b, **TOL), float((a - b).abs().max())


def _rows(m, d, g, norms=None):
    """Decoder rows [m, d]: unit norm, or with the given norms."""
    w = torch.randn(m, d, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    return w if norms is None else w * norms[:, None]


def _spread(m, g):
    return 0.5 + 1.5 * torch.rand(m, generator=g)  # norms in [0.5, 2]


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)


# -- SAE Lens: the peer's formula ----------------------------------------------------------------------------
def _saelens_tensors(arch, d=D, m=F, norms=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": 0.4 * torch.randn(d, m, generator=g),
        "W_dec": _rows(m, d, g, norms),
        "b_dec": 0.3 * torch.randn(d, generator=g),
    }
    if arch == "gated":
        t |= {k: 0.3 * torch.randn(m, generator=g) for k in ("b_gate", "r_mag", "b_mag")}
    else:
        t["b_enc"] = 0.3 * torch.randn(m, generator=g)
    if arch == "jumprelu":
        t["threshold"] = 0.6 * torch.rand(m, generator=g)
        t["threshold"][:3] = torch.tensor([-0.2, 0.0, 0.05])  # a negative θ: SAE Lens's ReLU still applies
    return t


def _saelens_encode(arch, t, x, apply_b_dec=True, k=None, rescale=False):
    """SAE Lens 6 inference encode (standard_sae, gated_sae, jumprelu_sae, topk_sae .encode)."""
    sae_in = x - t["b_dec"] if apply_b_dec else x
    if arch == "gated":
        active = (sae_in @ t["W_enc"] + t["b_gate"] > 0).float()
        return active * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"]).float()
    if rescale:
        pre = pre * t["W_dec"].norm(dim=-1)
    values, idx = torch.topk(pre, k=k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, values.relu())


def _saelens_decode(arch, t, f, rescale=False):
    if rescale:
        f = f * (1 / t["W_dec"].norm(dim=-1))
    return f @ t["W_dec"] + t["b_dec"]


def _saelens_folder(path, arch, tensors, metadata=None, **cfg):
    path.mkdir(parents=True)
    d, m = tensors["W_dec"].shape[1], tensors["W_dec"].shape[0]
    body = {
        "architecture": arch,
        "d_in": d,
        "d_sae": m,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post",
            "context_size": 128,
            **(metadata or {}),
        },
    }
    safetensors.torch.save_file(tensors, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(body | cfg))
    return path


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_saelens_v6_codes_are_the_peers(tmp_path, arch, apply_b_dec):
    t = _saelens_tensors(arch)
    extra = {"k": 5, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}
    p = _saelens_folder(tmp_path / "sae", arch, t, apply_b_dec_to_input=apply_b_dec, **extra)
    assert detect_format(p) == "saelens"
    sae = load_dictionary(p)
    cls = {"standard": ReluSAE, "gated": GatedSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE}[arch]
    assert type(sae) is cls and (sae.d, sae.d_dict) == (D, F)
    x = _x()
    want = _saelens_encode(arch, t, x, apply_b_dec, k=extra.get("k"))
    _close(sae.encode(x), want)
    _close(sae.decode(sae.encode(x)), _saelens_decode(arch, t, want))
    _close(sae.encode_features(x, torch.tensor([0, 5, 7])), want[:, [0, 5, 7]])
    assert sae.meta["model"] == "gpt2" and sae.meta["site"] == "resid.3" and sae.meta["context_size"] == 128
    assert sae.meta["source"]["format"] == "saelens" and sae.meta["source"]["hook_name"] == "blocks.3.hook_resid_post"
    assert "codes_scaled_by_decoder_norm" not in sae.meta
    if apply_b_dec:  # nothing folded: the file's numbers, exactly
        assert torch.equal(sae.W_dec, t["W_dec"]) and torch.equal(sae.b_dec, t["b_dec"])
    if arch == "standard":
        assert not sae.tied and sae.decoder_bias


def test_saelens_square_sae_follows_its_convention(tmp_path):
    """d_in == d_sae: shapes cannot show a transposed W_enc, so SAE Lens's layout ([d_in, d_sae]) is read."""
    t = _saelens_tensors("standard", d=16, m=16)
    sae = load_dictionary(_saelens_folder(tmp_path / "sq", "standard", t))
    x = _x(d=16)
    _close(sae.encode(x), _saelens_encode("standard", t, x))


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_saelens_decoder_norms_fold_into_scaled_codes(tmp_path, arch):
    g = torch.Generator().manual_seed(3)
    norms = _spread(F, g)
    t = _saelens_tensors(arch, norms=norms)
    sae = load_dictionary(_saelens_folder(tmp_path / "sae", arch, t))
    x = _x()
    want = _saelens_encode(arch, t, x)
    _close(sae.encode(x), want * norms)  # code i = the file's code i times ||W_dec,i||
    _close(sae.decode(sae.encode(x)), _saelens_decode(arch, t, want))  # the same reconstruction
    _close(sae.W_dec.norm(dim=-1), torch.ones(F))
    note = sae.meta["codes_scaled_by_decoder_norm"]
    assert note["min"] == pytest.approx(float(norms.min()), rel=1e-6)
    assert note["max"] == pytest.approx(float(norms.max()), rel=1e-6)


def test_saelens_topk_rescaled_by_decoder_norm_keeps_its_codes(tmp_path):
    norms = _spread(F, torch.Generator().manual_seed(4))
    t = _saelens_tensors("topk", norms=norms)
    sae = load_dictionary(_saelens_folder(tmp_path / "sae", "topk", t, k=4, rescale_acts_by_decoder_norm=True))
    x = _x()
    want = _saelens_encode("topk", t, x, k=4, rescale=True)
    _close(sae.encode(x), want)  # SAE Lens's own codes: its rescaling is the fold
    _close(sae.decode(sae.encode(x)), _saelens_decode("topk", t, want, rescale=True))
    assert "codes_scaled_by_decoder_norm" not in sae.meta and sae.k == 4


def test_saelens_topk_with_equal_decoder_norms_is_one_scale(tmp_path):
    t = _saelens_tensors("topk", norms=torch.full((F,), 2.0))
    sae = load_dictionary(_saelens_folder(tmp_path / "sae", "topk", t, k=4))
    x = _x()
    want = _saelens_encode("topk", t, x, k=4)
    _close(sae.encode(x), 2.0 * want)
    _close(sae.decode(sae.encode(x)), _saelens_decode("topk", t, want))
    assert sae.meta["codes_scaled_by_decoder_norm"]["min"] == pytest.approx(2.0)


def test_saelens_flat_pre6_configs(tmp_path):
    t = _saelens_tensors("standard")
    p = tmp_path / "flat"
    p.mkdir()
    safetensors.torch.save_file(t, p / "sae_weights.safetensors")
    flat = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",
        "hook_point_layer": 8,
        "hook_point_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
        "context_size": 128,
        "sae_lens_training_version": "3.13.0",
    }
    (p / "cfg.json").write_text(json.dumps(flat))
    sae = load_dictionary(p)
    x = _x()
    _close(sae.encode(x), _saelens_encode("standard", t, x, apply_b_dec=False))
    assert sae.meta["site"] == "resid.7"  # block 8's input is block 7's output
    assert sae.meta["model"] == "gpt2-small" and sae.meta["context_size"] == 128

    tk = _saelens_tensors("topk", seed=5)
    q = tmp_path / "flat-topk"
    q.mkdir()
    safetensors.torch.save_file(tk, q / "sae_weights.safetensors")
    (q / "cfg.json").write_text(
        json.dumps(flat | {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True})
    )
    sae = load_dictionary(q)
    assert isinstance(sae, TopKSAE) and sae.k == 3
    _close(sae.encode(x), _saelens_encode("topk", tk, x, k=3))

    tj = _saelens_tensors("jumprelu", seed=6)
    r = tmp_path / "flat-jumprelu"
    r.mkdir()
    tj_old = {k: v for k, v in tj.items() if k != "threshold"} | {
        "log_threshold": tj["threshold"].clamp_min(1e-3).log()
    }
    safetensors.torch.save_file(tj_old, r / "sae_weights.safetensors")
    (r / "cfg.json").write_text(json.dumps(flat | {"architecture": "jumprelu", "apply_b_dec_to_input": True}))
    sae = load_dictionary(r)
    _close(sae.encode(x), _saelens_encode("jumprelu", tj | {"threshold": tj_old["log_threshold"].exp()}, x))


# -- dictionary_learning: the peer's formulas --------------------------------------------------------------
def _dl_state(cls, norms=None, seed=0, threshold=0.3):
    """A state dict in dictionary_learning's exact layout (nn.Linear [out, in], raw parameters, buffers)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    dec = _rows(F, D, g, norms)  # [d_sae, d_in]: feature rows
    if cls == "AutoEncoder":
        return {"bias": r(D), "encoder.weight": r(F, D), "encoder.bias": r(F), "decoder.weight": dec.T.contiguous()}
    if cls == "AutoEncoderNew":
        return {
            "encoder.weight": r(F, D),
            "encoder.bias": r(F),
            "decoder.weight": dec.T.contiguous(),
            "decoder.bias": r(D),
        }
    if cls == "GatedAutoEncoder":
        return {
            "decoder_bias": r(D),
            "encoder.weight": r(F, D),
            "r_mag": r(F),
            "gate_bias": r(F),
            "mag_bias": r(F),
            "decoder.weight": dec.T.contiguous(),
        }
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "k": torch.tensor(4, dtype=torch.int),
            "threshold": torch.tensor(threshold, dtype=torch.float32),
            "decoder.weight": dec.T.contiguous(),
            "encoder.weight": r(F, D),
            "encoder.bias": r(F),
            "b_dec": r(D),
        }
    if cls == "MatryoshkaBatchTopKSAE":
        return {
            "k": torch.tensor(4, dtype=torch.int),
            "threshold": torch.tensor(threshold, dtype=torch.float32),
            "group_sizes": torch.tensor([8, 8, 16]),
            "W_enc": r(D, F),
            "b_enc": r(F),
            "W_dec": dec,
            "b_dec": r(D),
        }
    assert cls == "JumpReluAutoEncoder"
    return {"W_enc": r(D, F), "b_enc": r(F), "W_dec": dec, "b_dec": r(D), "threshold": 0.5 * torch.rand(F, generator=g)}


def _dl_encode(cls, s, x):
    """dictionary_learning 0.1.0's default ``encode`` and ``decode`` of each class."""
    relu = torch.relu
    if cls == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"]
    if cls == "AutoEncoderNew":
        f = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = (x_enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if cls == "AutoEncoderTopK":
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        top = post.topk(int(s["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if cls == "BatchTopKSAE":  # use_threshold=True, its default
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f = post * (post > s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    pre = x @ s["W_enc"] + s["b_enc"]  # JumpReluAutoEncoder: apply_b_dec_to_input is False
    f = relu(pre * (pre > s["threshold"]))
    return f, f @ s["W_dec"] + s["b_dec"]


def _dl_folder(path, cls, state, trainer=None, buffer=None):
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    cfg = {
        "trainer": {
            "dict_class": cls,
            "activation_dim": D,
            "dict_size": F,
            "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "submodule_name": "resid_post_layer_3",
            **({"k": 4} if "k" in state else {}),
            **(trainer or {}),
        },
        "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 30000, "ctx_len": 128, **(buffer or {})},
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


DL_CLASSES = {
    "AutoEncoder": ReluSAE,
    "AutoEncoderNew": ReluSAE,
    "GatedAutoEncoder": GatedSAE,
    "AutoEncoderTopK": TopKSAE,
    "BatchTopKSAE": BatchTopKSAE,
    "MatryoshkaBatchTopKSAE": BatchTopKSAE,
    "JumpReluAutoEncoder": JumpReLUSAE,
}


@pytest.mark.parametrize("cls", list(DL_CLASSES))
def test_dictionary_learning_codes_are_the_peers(tmp_path, cls):
    # the L1 AutoEncoders may leave decoder norms free (the April-update trainer); the others keep them unit
    norms = (
        _spread(F, torch.Generator().manual_seed(7)) if cls.startswith("AutoEncoder") and "TopK" not in cls else None
    )
    s = _dl_state(cls, norms=norms)
    p = _dl_folder(tmp_path / "ae", cls, s)
    assert detect_format(p) == "dictionary_learning"
    sae = load_dictionary(p)
    assert type(sae) is DL_CLASSES[cls]
    x = _x()
    f, x_hat = _dl_encode(cls, s, x)
    _close(sae.encode(x), f if norms is None else f * norms)
    _close(sae.decode(sae.encode(x)), x_hat)
    assert sae.meta["model"] == "EleutherAI/pythia-70m-deduped" and sae.meta["site"] == "resid.3"
    assert sae.meta["context_size"] == 128 and sae.meta["source"]["dict_class"] == cls
    assert ("codes_scaled_by_decoder_norm" in sae.meta) == (norms is not None)
    if "k" in s:
        assert sae.k == 4
    if cls == "MatryoshkaBatchTopKSAE":
        assert sae.meta["source"]["buffers"]["group_sizes"] == [8, 8, 16]


def test_dictionary_learning_batchtopk_before_its_threshold_is_set(tmp_path):
    """threshold = −1 (not yet estimated): its encode is then the plain ReLU, and so is circuitsae's."""
    s = _dl_state("BatchTopKSAE", threshold=-1.0)
    sae = load_dictionary(_dl_folder(tmp_path / "ae", "BatchTopKSAE", s))
    x = _x()
    _close(sae.encode(x), _dl_encode("BatchTopKSAE", s, x)[0])


def test_dictionary_learning_batchtopk_with_free_norms_becomes_a_jumprelu(tmp_path):
    norms = _spread(F, torch.Generator().manual_seed(8))
    s = _dl_state("BatchTopKSAE", norms=norms)
    sae = load_dictionary(_dl_folder(tmp_path / "ae", "BatchTopKSAE", s))
    assert isinstance(sae, JumpReLUSAE)  # θ·n_i: one threshold per feature
    x = _x()
    f, x_hat = _dl_encode("BatchTopKSAE", s, x)
    _close(sae.encode(x), f * norms)
    _close(sae.decode(sae.encode(x)), x_hat)


# -- sparsify --------------------------------------------------------------------------------------------
def _sparsify_coder(path, seed=0, norms=None, **cfg):
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    t = {
        "encoder.weight": 0.3 * torch.randn(F, D, generator=g),
        "encoder.bias": 0.3 * torch.randn(F, generator=g),
        "W_dec": _rows(F, D, g, norms),
        "b_dec": 0.3 * torch.randn(D, generator=g),
    }
    safetensors.torch.save_file(t, path / "sae.safetensors")
    body = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": 4}
    body |= {"multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    (path / "cfg.json").write_text(json.dumps(body | cfg))
    return t


def _sparsify_encode(t, x, k=4):
    """sparsify's SparseCoder.encode (fused_encoder: ReLU, then top-k) and decode."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, idx = torch.topk(pre, k, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter_(-1, idx, values)
    return f, f @ t["W_dec"] + t["b_dec"]


def test_sparsify_run_and_hookpoints(tmp_path):
    run = tmp_path / "run"
    t6 = _sparsify_coder(run / "layers.6")
    t6m = _sparsify_coder(run / "layers.6.mlp", seed=1)
    (run / "config.json").write_text(
        json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 2048, "hookpoints": ["layers.6", "layers.6.mlp"]})
    )
    with pytest.raises(
        CircuitSAEError, match=r"holds 2 dictionaries, one per subfolder \(layers.6, layers.6.mlp\)"
    ) as e:
        load_dictionary(run)
    _one_line(e)
    x = _x()
    for sub, t, site in (("layers.6", t6, "resid.6"), ("layers.6.mlp", t6m, "mlp.6")):
        assert detect_format(run / sub) == "sparsify"
        sae = load_dictionary(run / sub)
        assert isinstance(sae, TopKSAE) and sae.k == 4
        f, x_hat = _sparsify_encode(t, x)
        _close(sae.encode(x), f)
        _close(sae.decode(sae.encode(x)), x_hat)
        assert sae.meta["site"] == site and sae.meta["model"] == "HuggingFaceTB/SmolLM2-135M"
        assert sae.meta["context_size"] == 2048 and sae.meta["source"]["hookpoint"] == sub


def test_sparsify_without_run_config_maps_only_unambiguous_hooks(tmp_path):
    _sparsify_coder(tmp_path / "run" / "layers.2.mlp")
    sae = load_dictionary(tmp_path / "run" / "layers.2.mlp")
    assert "site" not in sae.meta  # a Gemma's `mlp` is not mlp.L: without the model, no site
    assert sae.meta["source"]["unmapped_hook"] == "layers.2.mlp"
    _sparsify_coder(tmp_path / "run2" / "layers.2" / "seed0")  # several seeds: <hookpoint>/seedN
    assert load_dictionary(tmp_path / "run2" / "layers.2" / "seed0").meta["site"] == "resid.2"


def test_hook_names_to_sites():
    tl = {
        "blocks.4.hook_resid_post": "resid.4",
        "blocks.4.hook_resid_pre": "resid.3",
        "blocks.0.hook_resid_pre": None,
        "blocks.4.hook_mlp_out": "mlp.4",
        "blocks.4.hook_attn_out": "attn.4",
        "blocks.4.hook_resid_mid": None,
        "blocks.4.attn.hook_z": None,
        "blocks.4.mlp.hook_post": None,
    }
    assert {h: transformer_lens_site(h) for h in tl} == tl
    assert module_site("model.layers.5") == "resid.5" and module_site("transformer.h.5") == "resid.5"
    assert module_site("gpt_neox.layers.5") == "resid.5" and module_site("layers.5", relative=True) == "resid.5"
    assert module_site("h.5.attn", "gpt2", relative=True) == "attn.5"
    assert module_site("model.layers.5.mlp", "meta-llama/Llama-3.2-1B") == "mlp.5"
    assert module_site("model.layers.5.self_attn", "Qwen/Qwen2.5-0.5B") == "attn.5"
    assert module_site("model.layers.5.mlp", "google/gemma-2-2b") is None  # Gemma's mlp.L is its post-norm
    assert module_site("model.layers.5.post_feedforward_layernorm", "google/gemma-2-2b") == "mlp.5"
    assert module_site("model.layers.5.post_attention_layernorm", "HuggingFaceTB/SmolLM2-135M") is None
    assert module_site("model.layers.5.mlp") is None  # which family? unknown
    assert dictionary_learning_site("resid_post_layer_3", "EleutherAI/pythia-70m", 3, "out") == "resid.3"
    assert dictionary_learning_site("mlp_out_layer1", "EleutherAI/pythia-70m-deduped", None, None) == "mlp.1"
    assert dictionary_learning_site("mlp_out_layer1", "google/gemma-2-2b", None, None) is None
    assert dictionary_learning_site("resid_post_layer_3", "x", 3, "in") is None
    assert dictionary_learning_site("resid_post_layer_3", "x", 4, "out") is None
    assert dictionary_learning_site(None, "x", 3, "out") is None
    assert [site_to_hook(s) for s in ("resid.2", "mlp.2", "attn.2")] == [
        "blocks.2.hook_resid_post",
        "blocks.2.hook_mlp_out",
        "blocks.2.hook_attn_out",
    ]


def test_saelens_hooks_that_are_not_sites(tmp_path):
    t = _saelens_tensors("standard")
    for name, meta in {
        "head": {"hook_head_index": 2},
        "centred": {"model_from_pretrained_kwargs": {"center_writing_weights": True}},
        "mid": {"hook_name": "blocks.3.hook_resid_mid"},
    }.items():
        sae = load_dictionary(_saelens_folder(tmp_path / name, "standard", t, metadata=meta))
        assert "site" not in sae.meta and sae.meta["source"]["unmapped_hook"]


# -- round trips circuitsae -> SAE Lens -> circuitsae --------------------------------------------------------
def _randomise(d):
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.2 * torch.randn_like(p))
        d.W_dec.div_(d.W_dec.norm(dim=-1, keepdim=True))
    return d


def _jumprelu():
    j = _randomise(JumpReLUSAE(D, F))
    with torch.no_grad():
        j.log_threshold.copy_(torch.randn(F) - 1)
        j.log_threshold[0] = -float("inf")  # θ = 0, as a Gated SAE's export may have
    return j


def _batchtopk():
    b = _randomise(BatchTopKSAE(D, F, k=4))
    b.threshold.fill_(0.15)
    return b


ROUND_TRIPS = {
    "relu-tied": (lambda: _randomise(ReluSAE(D, F)), None, "standard", ReluSAE),
    "relu-untied-bdec": (lambda: _randomise(ReluSAE(D, F, tied=False, decoder_bias=True)), None, "standard", ReluSAE),
    "gated": (lambda: _randomise(GatedSAE(D, F)), None, "gated", GatedSAE),
    "gated-as-jumprelu": (lambda: _randomise(GatedSAE(D, F)), "jumprelu", "jumprelu", JumpReLUSAE),
    "topk": (lambda: _randomise(TopKSAE(D, F, k=5)), None, "topk", TopKSAE),
    "jumprelu": (_jumprelu, None, "jumprelu", JumpReLUSAE),
    "batchtopk-as-jumprelu": (_batchtopk, None, "jumprelu", JumpReLUSAE),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_round_trip_through_saelens_is_exact(tmp_path, kind):
    make, arch, saelens_arch, back_cls = ROUND_TRIPS[kind]
    torch.manual_seed(0)
    sae = make()
    sae.meta = {"model": "smollm2-135m", "site": "mlp.2", "context_size": 64}
    ref = sae.to_jumprelu() if arch == "jumprelu" else sae  # the JumpReLU a Gated SAE is
    sae.save(tmp_path / "lens", format="saelens", architecture=arch)
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "dtype", "device")} == {
        "architecture": saelens_arch,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
    }
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    md = cfg["metadata"]
    assert md["model_name"] == "smollm2-135m" and md["hook_name"] == "blocks.2.hook_mlp_out"
    assert md["context_size"] == 64 and md["sae_lens_version"].startswith("6.")
    # what SAE Lens computes from the file it would load: its formula on the written tensors
    t = safetensors.torch.load_file(tmp_path / "lens" / "sae_weights.safetensors")
    x = _x(200)
    lens = _saelens_encode(saelens_arch, t, x, k=cfg.get("k"), rescale=cfg.get("rescale_acts_by_decoder_norm", False))
    assert torch.equal(lens > 0, ref.encode(x) > 0)
    _close(lens, ref.encode(x))
    back = load_dictionary(tmp_path / "lens")
    assert type(back) is back_cls
    assert torch.equal(back.encode(x), ref.encode(x))
    assert torch.equal(back.decode(back.encode(x)), ref.decode(ref.encode(x)))
    assert back.meta["site"] == "mlp.2" and back.meta["model"] == "smollm2-135m" and back.meta["context_size"] == 64
    assert back.config() == ref.config() or kind == "batchtopk-as-jumprelu"
    back.save(tmp_path / "again")  # and on into circuitsae's own format
    again = load_dictionary(tmp_path / "again")
    assert torch.equal(again.encode(x), ref.encode(x))


# -- every refusal is one line -------------------------------------------------------------------------------
def _lens(arch="standard", tensors=None, **cfg):
    def build(p):
        t = tensors(arch) if callable(tensors) else (tensors or _saelens_tensors(arch))
        return _saelens_folder(p, arch, t, **cfg)

    return build


def _lens_flat(**cfg):
    def build(p):
        p.mkdir()
        safetensors.torch.save_file(_saelens_tensors("standard"), p / "sae_weights.safetensors")
        (p / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": F, "hook_point": "blocks.1.hook_resid_pre"} | cfg))
        return p

    return build


def _edit(t, **changes):
    t = dict(t)
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return t


class _NotATensor:
    pass


def _dl(cls="AutoEncoder", state=None, config=True, **trainer):
    def build(p):
        s = state(cls) if callable(state) else (state or _dl_state(cls))
        _dl_folder(p, cls, s, trainer=trainer)
        if not config:
            (p / "config.json").unlink()
        return p

    return build


def _sparse(norms=None, **cfg):
    def build(p):
        _sparsify_coder(p, norms=norms, **cfg)
        return p

    return build


def _sparse_skip(p):
    _sparsify_coder(p)
    t = safetensors.torch.load_file(p / "sae.safetensors") | {"W_skip": torch.zeros(D, D)}
    safetensors.torch.save_file(t, p / "sae.safetensors")
    return p


def _sparse_inf(p):
    _sparsify_coder(p)
    t = safetensors.torch.load_file(p / "sae.safetensors")
    t["encoder.bias"][0] = float("inf")
    safetensors.torch.save_file(t, p / "sae.safetensors")
    return p


def _bad_safetensors(p):
    _saelens_folder(p, "standard", _saelens_tensors("standard"))
    (p / "sae_weights.safetensors").write_bytes(b"garbage")
    return p


UNIT = _saelens_tensors("standard")
REFUSALS = {
    "lens-transcoder": (
        _lens("transcoder", tensors=UNIT),
        r"architecture 'transcoder' is not supported \(a transcoder",
    ),
    "lens-abstopk": (_lens("abstopk", tensors=UNIT), r"architecture 'abstopk' is not supported"),
    "lens-batchtopk-training": (_lens("batchtopk", tensors=UNIT), r"'batchtopk' is SAE Lens's training form"),
    "lens-expected-average": (
        _lens(normalize_activations="expected_average_only_in"),
        r"normalize_activations='expected_average_only_in' is not supported: its scaling factor",
    ),
    "lens-constant-norm": (
        _lens(normalize_activations="constant_norm_rescale"),
        r"normalize_activations='constant_norm_rescale'",
    ),
    "lens-layer-norm": (_lens(normalize_activations="layer_norm"), r"normalize_activations='layer_norm'"),
    "lens-whitening": (
        _lens(normalize_activations="covariance_whitening"),
        r"normalize_activations='covariance_whitening'",
    ),
    "lens-hook-z": (_lens(reshape_activations="hook_z"), r"reshape_activations='hook_z' is not supported"),
    "lens-missing": (_lens(tensors=_edit(UNIT, b_enc=None)), r"missing \['b_enc'\], unexpected \[\]"),
    "lens-unexpected": (_lens(tensors=_edit(UNIT, foo=torch.zeros(3))), r"missing \[\], unexpected \['foo'\]"),
    "lens-transposed": (
        _lens(tensors=_edit(UNIT, W_enc=UNIT["W_enc"].T.contiguous())),
        r"W_enc has shape \(32, 12\) but .* has \(12, 32\) \(transposed\?\)",
    ),
    "lens-misshaped": (_lens(tensors=_edit(UNIT, b_dec=torch.zeros(D + 1))), r"b_dec has shape \(13,\)"),
    "lens-nan": (
        _lens(tensors=_edit(UNIT, W_dec=UNIT["W_dec"].clone().index_fill_(0, torch.tensor([2]), float("nan")))),
        r"W_dec holds NaN or inf",
    ),
    "lens-zero-row": (
        _lens(tensors=_edit(UNIT, W_dec=UNIT["W_dec"].clone().index_fill_(0, torch.tensor([2]), 0.0))),
        r"1 decoder rows are all zero",
    ),
    "lens-finetuning-factor": (_lens(finetuning_scaling_factor=True), r"finetuning_scaling_factor is not supported"),
    "lens-scaling-tensor": (
        _lens(tensors=_edit(UNIT, scaling_factor=torch.full((F,), 2.0))),
        r"scaling_factor other than 1",
    ),
    "lens-topk-norms": (
        _lens("topk", tensors=lambda a: _saelens_tensors(a, norms=_spread(F, torch.Generator().manual_seed(9))), k=4),
        r"TopK SAE whose decoder rows are not unit norm .* would change which k features fire",
    ),
    "lens-topk-no-k": (_lens("topk", tensors=lambda a: _saelens_tensors(a)), r"'k' must be a positive integer"),
    "lens-bad-file": (_bad_safetensors, r"not a readable safetensors file"),
    "lens-flat-activation": (_lens_flat(activation_fn_str="tanh-relu"), r"activation_fn 'tanh-relu' is not supported"),
    "lens-flat-normalised": (
        _lens_flat(normalize_activations=True),
        r"normalize_activations='expected_average_only_in'",
    ),
    "dl-unknown-class": (
        _dl("AutoEncoderMystery", state=_dl_state("AutoEncoder")),
        r"class 'AutoEncoderMystery' is not supported",
    ),
    "dl-no-config": (_dl(config=False), r"has ae.pt but no config.json"),
    "dl-k-mismatch": (_dl("AutoEncoderTopK", k=8), r"config.json says k=8 but ae.pt's k buffer holds 4"),
    "dl-missing": (_dl(state=_edit(_dl_state("AutoEncoder"), bias=None)), r"missing \['bias'\]"),
    "dl-pickled": (_dl(state={"bias": _NotATensor()}), r"is not a state dict torch.load\(weights_only=True\) can read"),
    "dl-topk-norms": (
        _dl("AutoEncoderTopK", state=lambda c: _dl_state(c, norms=_spread(F, torch.Generator().manual_seed(2)))),
        r"would change which k features fire",
    ),
    "sparsify-transcoder": (_sparse(transcode=True), r"a sparsify transcoder"),
    "sparsify-skip": (_sparse(skip_connection=True), r"skip connection"),
    "sparsify-w-skip": (_sparse_skip, r"skip connection \(W_skip\)"),
    "sparsify-groupmax": (_sparse(activation="groupmax"), r"activation 'groupmax' is not supported"),
    # config values of the wrong type or size, and non-finite tensors: one line each, before any allocation
    "lens-d-sae-string": (_lens(d_sae="32"), r"'d_sae' must be a positive integer, got '32'"),
    "lens-d-in-huge": (_lens(d_in=10**9), r"W_enc has shape \(12, 32\) but a SAE Lens standard SAE \(d_in=1000000000,"),
    "lens-flag-string": (_lens(apply_b_dec_to_input="false"), r"'apply_b_dec_to_input' must be true or false"),
    "lens-hook-name-list": (_lens(metadata={"hook_name": ["blocks.1"]}), r"'hook_name' must be a string"),
    "lens-recorded-junk": (
        _lens(metadata={"circuitsae": {"architecture": "relu", "config": {"tied": "yes"}}}),
        r"its recorded circuitsae config: 'tied' must be true or false, got 'yes'",
    ),
    "dl-nan": (_dl(state=lambda c: _edit(_dl_state(c), bias=torch.full((D,), float("nan")))), r"bias holds NaN or inf"),
    "dl-dict-size-huge": (_dl(dict_size=10**12), r"has shape \(32, 12\) but a dictionary_learning AutoEncoder"),
    "dl-layer-string": (_dl(layer="3"), r"'layer' must be an integer, got '3'"),
    "dl-k-fractional": (
        _dl("AutoEncoderTopK", state=lambda c: _edit(_dl_state(c), k=torch.tensor(2.5))),
        r"the k buffer holds 2.5, not a whole number",
    ),
    "sparsify-inf": (_sparse_inf, r"encoder.bias holds NaN or inf"),
    "sparsify-num-latents-string": (_sparse(num_latents="32"), r"'num_latents' must be a positive integer, got '32'"),
    "sparsify-flag-string": (_sparse(transcode="no"), r"'transcode' must be true or false, got 'no'"),
    "sparsify-free-norms": (
        _sparse(norms=_spread(F, torch.Generator().manual_seed(5)), normalize_decoder=False),
        r"would change which k features fire",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line(tmp_path, case):
    build, match = REFUSALS[case]
    p = build(tmp_path / "in")
    with pytest.raises(CircuitSAEError, match=match) as e:
        load_dictionary(p)
    _one_line(e)


def test_write_refusals_are_one_line(tmp_path):
    pca = PCADictionary.fit(torch.randn(50, D))
    for d, kwargs, match in (
        (pca, {}, r"a pca dictionary cannot be saved in SAE Lens format: SAE Lens has no architecture"),
        (IdentityDictionary(D), {}, r"a identity dictionary cannot be saved in SAE Lens format"),
        (
            GatedSAE(D, F),
            {"architecture": "topk"},
            r"cannot be saved as SAE Lens 'topk' \(it can be: gated, jumprelu\)",
        ),
        (ReluSAE(D, F), {"architecture": "jumprelu"}, r"it can be: standard"),
    ):
        with pytest.raises(CircuitSAEError, match=match) as e:
            d.save(tmp_path / "out", format="saelens", **kwargs)
        _one_line(e)
    with pytest.raises(CircuitSAEError, match="unknown format 'sparsify'"):
        ReluSAE(D, F).save(tmp_path / "x", format="sparsify")
    with pytest.raises(CircuitSAEError, match="needs format='saelens'"):
        ReluSAE(D, F).save(tmp_path / "x", architecture="standard")


# -- the convert command -----------------------------------------------------------------------------------
def test_convert_cli(tmp_path, capsys):
    t = _saelens_tensors("jumprelu")
    src = _saelens_folder(tmp_path / "lens", "jumprelu", t)
    assert main(["convert", str(src), str(tmp_path / "ours"), "--to", "circuitsae"]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = load_dictionary(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "circuitsae" and isinstance(ours, JumpReLUSAE)
    x = _x()
    _close(ours.encode(x), _saelens_encode("jumprelu", t, x))
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "lens2"), "--to", "saelens"]) == 0
    assert torch.equal(load_dictionary(tmp_path / "lens2").encode(x), ours.encode(x))
    gated = _randomise(GatedSAE(D, F))
    gated.save(tmp_path / "gated")
    assert (
        main(
            ["convert", str(tmp_path / "gated"), str(tmp_path / "gj"), "--to", "saelens", "--architecture", "jumprelu"]
        )
        == 0
    )
    assert json.loads((tmp_path / "gj" / "cfg.json").read_text())["architecture"] == "jumprelu"
    capsys.readouterr()
    for argv, match in (
        (
            ["convert", str(src), str(tmp_path / "ours"), "--to", "circuitsae"],
            "exists and is not empty: convert never overwrites",
        ),
        (["convert", str(src), str(tmp_path / "new")], "convert needs --to circuitsae or --to saelens"),
        (
            ["convert", str(src), str(tmp_path / "new"), "--to", "circuitsae", "--architecture", "gated"],
            "needs --to saelens",
        ),
        (["convert", str(tmp_path / "nothing"), str(tmp_path / "new"), "--to", "saelens"], "does not exist"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err
    assert not (tmp_path / "new").exists()


def test_eval_and_ioi_find_every_format_in_a_folder_of_dictionaries(tmp_path):
    """``circuitsae eval/ioi DIR``: a folder holding another library's dictionaries (dictionary_learning has no
    cfg.json, only ae.pt + config.json) lists each of them."""
    from circuitsae.dictionaries.folders import dictionary_folders

    _dl_folder(tmp_path / "runs" / "ae", "AutoEncoder", _dl_state("AutoEncoder"))
    _saelens_folder(tmp_path / "runs" / "lens", "standard", _saelens_tensors("standard"))
    assert dictionary_folders([str(tmp_path / "runs")]) == [tmp_path / "runs" / "ae", tmp_path / "runs" / "lens"]
    assert dictionary_folders([str(tmp_path / "runs" / "ae")]) == [tmp_path / "runs" / "ae"]
