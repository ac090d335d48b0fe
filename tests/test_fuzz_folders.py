"""Fuzzing saved folders: every folder load_dictionary reads ends in a dictionary or one line, never in more.

For each format circuitsae reads — its own, SAE Lens v6 and the flat configs of SAE Lens < 6,
dictionary_learning (``ae.pt`` + ``config.json``) and sparsify — a valid small folder is built, then
hypothesis changes it: config values replaced by junk (huge, negative or non-integral numbers, strings, bools,
null, NaN, lists, nested objects), keys removed or added, the whole config replaced, tensors replaced by
others of random names, shapes and dtypes (empty, NaN, inf), removed or added. Each load must return a
dictionary that encodes, or raise :class:`CircuitSAEError` with a one-line message; any other exception fails,
and so does a peak resident memory that grows by more than ``RSS_BOUND`` (no tensor is sized by a config's
numbers before the file's tensors agree with them).

``CIRCUITSAE_FUZZ_EXAMPLES`` sets the examples per format (default 100: a few seconds each); with
``CIRCUITSAE_FUZZ_REPORT=FILE`` each example appends ``{"suite": "folders", "format", "outcome":
"loaded"|"refused"|"other", "message"}`` to FILE, and the others are reported together at the end.
"""

import hashlib
import json
import math
import os
import resource
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitsae import CircuitSAEError
from circuitsae.dictionaries import load_dictionary, registry

EXAMPLES = int(os.environ.get("CIRCUITSAE_FUZZ_EXAMPLES", "100"))
REPORT = os.environ.get("CIRCUITSAE_FUZZ_REPORT")
RSS_BOUND = 200 * 2**20  # bytes the peak resident memory may grow by over a whole format's examples
D, F = 4, 8

# -- junk ------------------------------------------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.sampled_from([0, -1, 10**9, 10**12, 2**31, 2**63, 10**30, -(10**12)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 4.0, 8.0, -0.0, float("nan"), float("inf"), 1e300]),
    st.text(max_size=6),
    st.sampled_from(["512", "4", "topk", "relu", "jumprelu", "gated", "standard", "none", "", "\n", "resid.1"]),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.uint8,
]
NAMES = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold", "log_threshold", "k", "W_skip", "scaling_factor",
         "encoder.weight", "encoder.bias", "decoder.weight", "bias", "r_mag", "b_gate", "b_mag", "group_sizes"]  # fmt: skip


@st.composite
def tensors(draw):
    """A random small tensor: shape of up to 3 sizes in 0..9 (often the folder's own D, F), any dtype, NaN/inf."""
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, D, F, 9]), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.randn(shape).mul(3).to(dtype) if dtype.is_floating_point else torch.randint(0, 9, shape).to(dtype)
    if dtype.is_floating_point and t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


def _unit(m, d):
    w = torch.randn(m, d)
    return w / w.norm(dim=-1, keepdim=True)


# -- a valid folder of each format: (configs by file name, tensors) -------------------------------------------
def _circuitsae(draw):
    cls = draw(st.sampled_from(registry.classes()))
    arch = cls.architecture
    args = {"k": 2} if arch in ("topk", "batchtopk") else {}
    sae = cls(D, D if arch in ("pca", "identity") else F, **args)
    cfg = {
        "format": "circuitsae-dictionary/1",
        "architecture": arch,
        **sae.config(),
        "model": "tiny",
        "site": "resid.1",
    }
    return {"cfg.json": cfg}, {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}


def _saelens_weights(arch):
    t = {"W_enc": torch.randn(D, F), "W_dec": _unit(F, D), "b_dec": torch.randn(D)}
    t |= {k: torch.randn(F) for k in ("b_gate", "r_mag", "b_mag")} if arch == "gated" else {"b_enc": torch.randn(F)}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(F)
    return t


def _saelens6(draw):
    arch = draw(st.sampled_from(["standard", "gated", "jumprelu", "topk"]))
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.1.0", "model_name": "gpt2", "hook_name": "blocks.1.hook_resid_post",
                        "context_size": 16}}  # fmt: skip
    if arch == "topk":
        cfg |= {"k": 2, "rescale_acts_by_decoder_norm": False}
    return {"cfg.json": cfg}, _saelens_weights(arch)


def _saelens_flat(draw):
    act = draw(st.sampled_from(["relu", "topk"]))
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.1.hook_resid_pre", "hook_point_layer": 1,
           "activation_fn_str": act, "apply_b_dec_to_input": True, "normalize_activations": False,
           "model_name": "gpt2", "context_size": 16, "sae_lens_training_version": "3.0.0"}  # fmt: skip
    if act == "topk":
        cfg["activation_fn_kwargs"] = {"k": 2}
    return {"cfg.json": cfg}, _saelens_weights("standard")


def _dictionary_learning(draw):
    cls = draw(st.sampled_from(["AutoEncoder", "GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE",
                                "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"]))  # fmt: skip
    dec = _unit(F, D)
    linear = {"encoder.weight": torch.randn(F, D), "decoder.weight": dec.T.contiguous()}
    raw = {"W_enc": torch.randn(D, F), "b_enc": torch.randn(F), "W_dec": dec, "b_dec": torch.randn(D)}
    k = {"k": torch.tensor(2), "threshold": torch.tensor(0.3)}
    state = {
        "AutoEncoder": linear | {"encoder.bias": torch.randn(F), "bias": torch.randn(D)},
        "GatedAutoEncoder": linear
        | {
            "decoder_bias": torch.randn(D),
            "r_mag": torch.randn(F),
            "gate_bias": torch.randn(F),
            "mag_bias": torch.randn(F),
        },
        "AutoEncoderTopK": linear | {"encoder.bias": torch.randn(F), "b_dec": torch.randn(D)} | k,
        "BatchTopKSAE": linear | {"encoder.bias": torch.randn(F), "b_dec": torch.randn(D)} | k,
        "MatryoshkaBatchTopKSAE": raw | k | {"group_sizes": torch.tensor([4, 4])},
        "JumpReluAutoEncoder": raw | {"threshold": torch.rand(F)},
    }[cls]
    trainer = {"dict_class": cls, "activation_dim": D, "dict_size": F, "layer": 1, "lm_name": "EleutherAI/pythia-70m",
               "submodule_name": "resid_post_layer_1"}  # fmt: skip
    if "k" in state:
        trainer["k"] = 2
    return {"config.json": {"trainer": trainer, "buffer": {"io": "out", "ctx_len": 16}}}, state


def _sparsify(draw):
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": F, "k": 2,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}  # fmt: skip
    t = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F),
        "W_dec": _unit(F, D),
        "b_dec": torch.randn(D),
    }
    return {"cfg.json": cfg, "../config.json": {"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 16}}, t


FORMATS = {
    "circuitsae": _circuitsae,
    "saelens": _saelens6,
    "saelens-flat": _saelens_flat,
    "dictionary_learning": _dictionary_learning,
    "sparsify": _sparsify,
}
WEIGHTS = {"circuitsae": "sae.safetensors", "saelens": "sae_weights.safetensors", "saelens-flat":
           "sae_weights.safetensors", "dictionary_learning": "ae.pt", "sparsify": "sae.safetensors"}  # fmt: skip


# -- changes -------------------------------------------------------------------------------------------------
def _mutate_config(draw, cfg):
    """Replace, remove or add one value somewhere in the (nested) config, or replace the whole config."""
    if not isinstance(cfg, dict) or draw(st.integers(0, 15)) == 0:
        return draw(JUNK)
    target = cfg
    while True:  # into a nested object (SAE Lens metadata, dictionary_learning's trainer) more often than not
        nested = [k for k, v in target.items() if isinstance(v, dict) and v]
        if not nested or draw(st.integers(0, 2)) == 0:
            break
        target = target[draw(st.sampled_from(nested))]
    action = draw(st.sampled_from(["replace", "replace", "nudge", "nudge", "remove", "add"]))
    if action == "add" or not target:
        key = draw(st.sampled_from(["k", "d", "d_dict", "tied", "bandwidth", "k_aux", "num_latents", "x"]))
        target[key] = draw(JUNK)
        return cfg
    key = draw(st.sampled_from(sorted(target)))
    if action == "remove":
        del target[key]
    elif action == "nudge":  # a near miss: the same value off by one, of another type, or at an edge
        v = target[key]
        near = None
        if type(v) is int:
            near = [v + 1, v - 1, float(v), str(v), 0, 10**12]
        elif isinstance(v, bool):
            near = [not v, None, 1]
        target[key] = draw(st.sampled_from(near)) if near else draw(JUNK)
    else:
        target[key] = draw(JUNK)
    return cfg


def _mutate_tensors(draw, state):
    action = draw(st.sampled_from(["replace", "retype", "poison", "remove", "add", "transpose"]))
    names = sorted(state)
    if action in ("retype", "poison") and names:  # the same shape, another dtype or a NaN/inf inside
        name = draw(st.sampled_from(names))
        t = state[name].to(draw(st.sampled_from(DTYPES))) if action == "retype" else state[name].clone()
        if action == "poison" and t.is_floating_point() and t.numel():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        state[name] = t
    elif action == "add" or not names:
        state[draw(st.one_of(st.sampled_from(NAMES), st.text("abcxyz._", min_size=1, max_size=6)))] = draw(tensors())
    elif action == "remove":
        del state[draw(st.sampled_from(names))]
    elif action == "transpose":
        name = draw(st.sampled_from(names))
        state[name] = state[name].T.contiguous() if state[name].ndim == 2 else state[name]
    else:
        state[draw(st.sampled_from(names))] = draw(tensors())
    return state


@st.composite
def folders(draw, fmt):
    configs, state = FORMATS[fmt](draw)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(configs)))
        if draw(st.booleans()):
            configs[name] = _mutate_config(draw, configs[name])
        else:
            state = _mutate_tensors(draw, state)
    manifest = draw(st.sampled_from(["none", "matching"])) if fmt == "circuitsae" else "none"
    return configs, state, manifest


def _write(root: Path, fmt: str, configs: dict, state: dict, manifest: str) -> Path:
    folder = root / "run" / "layers.1"
    folder.mkdir(parents=True)
    files = {WEIGHTS[fmt]: _weights_bytes(fmt, state)}
    files |= {name: json.dumps(cfg).encode() for name, cfg in configs.items()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if manifest == "matching":  # the checksum vouches for the changed files: the checks behind it are tested
        entries = {
            n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items() if "/" not in n
        }
        (folder / "manifest.json").write_text(json.dumps({"format": "circuitsae-manifest/1", "files": entries}))
    return folder


def _weights_bytes(fmt: str, state: dict) -> bytes:
    if fmt == "dictionary_learning":
        path = Path(tempfile.mkdtemp()) / "ae.pt"
        torch.save(state, path)
        data = path.read_bytes()
        path.unlink()
        path.parent.rmdir()
        return data
    return safetensors.torch.save({k: v.contiguous() for k, v in state.items()})


def _load(folder: Path) -> "tuple[str, str]":
    """(outcome, message) of loading ``folder`` and encoding a batch with what it returns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = load_dictionary(folder)
        codes = d.encode(torch.randn(3, d.d))
        assert codes.shape == (3, d.d_dict), codes.shape
        return "loaded", f"{type(d).__name__} d={d.d} d_dict={d.d_dict}"
    except CircuitSAEError as e:
        if "\n" in str(e):
            return "other", f"a CircuitSAEError of several lines: {str(e)!r}"
        return "refused", str(e)
    except Exception as e:  # what the test exists to find
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "other", f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_folder_loads_or_is_refused_in_one_line(fmt):
    others: list[str] = []
    start = _peak_rss()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(folders(fmt))
    def check(example):
        configs, state, manifest = example
        with tempfile.TemporaryDirectory() as root:
            outcome, message = _load(_write(Path(root), fmt, configs, state, manifest))
        if REPORT:
            with open(REPORT, "a") as f:
                line = {"suite": "folders", "format": fmt, "outcome": outcome, "message": message[:200]}
                f.write(json.dumps(line) + "\n")
            if outcome == "other":
                others.append(message)
        else:
            assert outcome != "other", message
        grew = _peak_rss() - start
        assert grew < RSS_BOUND, f"peak memory grew by {grew / 2**20:.0f} MiB loading {configs}"

    check()
    assert not others, f"{len(others)} loads ended in another exception: {others[:5]}"
