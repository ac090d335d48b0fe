"""Saved dictionaries are checked before they are trusted: manifest (sizes, sha256), config values, shapes, NaN.

Every folder circuitsae writes carries ``manifest.json`` (bytes and sha256 of ``sae.safetensors`` and
``cfg.json``); ``load_dictionary`` checks it, then checks ``cfg.json`` value by value and the shapes it implies
against the safetensors header before any tensor is made, and refuses NaN or inf weights naming the tensor.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import safetensors.torch
import torch

from circuitsae import CircuitSAEError
from circuitsae.commands.cli import main
from circuitsae.dictionaries import ReluSAE, TopKSAE, load_dictionary

D, F = 8, 16


def _saved(path, sae=None):
    """A small dictionary with non-trivial weights, saved to ``path``."""
    torch.manual_seed(0)
    sae = sae if sae is not None else ReluSAE(D, F, tied=False, decoder_bias=True)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))  # feature directions stay unit norm
    sae.save(path)
    return path


def _rewrite(folder, name, data: bytes):
    """Replace one file and record it in the manifest, as a writer would: the checksum then passes."""
    (folder / name).write_bytes(data)
    if not (folder / "manifest.json").is_file():
        return
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _data_offset(path):
    """Where the tensor bytes of a safetensors file start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _flip(path, offset, mask):
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_save_writes_a_manifest_of_both_files(tmp_path):
    folder = _saved(tmp_path / "sae")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "circuitsae-manifest/1"
    assert set(manifest["files"]) == {"sae.safetensors", "cfg.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # saved again over itself (a resumed run): the manifest describes the new files
    sae = load_dictionary(folder)
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    sae.save(folder)
    assert torch.equal(load_dictionary(folder).b_enc, sae.b_enc)
    assert not list(folder.glob(".tmp-*"))


def test_a_flipped_mantissa_bit_is_refused_naming_the_file(tmp_path):
    folder = _saved(tmp_path / "sae")
    weights = folder / "sae.safetensors"
    before = load_dictionary(folder).state_dict()
    _flip(weights, _data_offset(weights), 0x01)  # the lowest mantissa bit of the first weight: off by ~1e-7
    with pytest.raises(CircuitSAEError, match=r"sae.safetensors: sha256 differs from manifest.json") as e:
        load_dictionary(folder)
    assert "changed or damaged after it was saved" in _one_line(e)
    # skipping the hashes is said, and then the change goes unseen (the flag's price)
    with pytest.warns(UserWarning, match=r"sha256 of its files not checked \(verify=False\); sizes were"):
        loaded = load_dictionary(folder, verify=False)
    assert any(not torch.equal(loaded.state_dict()[k], v) for k, v in before.items())


def test_a_flipped_exponent_bit_is_refused(tmp_path):
    folder = _saved(tmp_path / "sae")
    weights = folder / "sae.safetensors"
    _flip(weights, _data_offset(weights) + 3, 0x40)  # the top exponent bit of the first float32: ~1e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flipped = load_dictionary(folder, verify=False).state_dict()
    assert max(float(t.abs().max()) for t in flipped.values()) > 1e30  # what loading it unchecked gives
    with pytest.raises(CircuitSAEError, match="sae.safetensors: sha256 differs"):
        load_dictionary(folder)


def test_circuitsae_verify_0_skips_the_hashes_and_says_so(tmp_path, monkeypatch):
    folder = _saved(tmp_path / "sae")
    _flip(folder / "sae.safetensors", _data_offset(folder / "sae.safetensors"), 0x01)
    monkeypatch.setenv("CIRCUITSAE_VERIFY", "0")
    with pytest.warns(UserWarning, match=r"not checked \(CIRCUITSAE_VERIFY=0\)") as record:
        load_dictionary(folder)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    # the sizes are still checked
    (folder / "sae.safetensors").write_bytes((folder / "sae.safetensors").read_bytes()[:-4])
    with pytest.raises(CircuitSAEError, match=r"sae.safetensors: \d+ bytes but manifest.json says \d+"):
        load_dictionary(folder)


def test_a_changed_cfg_json_is_refused(tmp_path):
    folder = _saved(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"model": "another"}, indent=1))
    with pytest.raises(CircuitSAEError, match=r"cfg.json: (\d+ bytes but|sha256 differs)"):
        load_dictionary(folder)


def test_nan_that_passes_the_checksum_is_refused_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path / "sae")
    tensors = safetensors.torch.load_file(folder / "sae.safetensors")
    tensors["W_dec"][3, 1] = float("nan")
    _rewrite(folder, "sae.safetensors", safetensors.torch.save(tensors))
    with pytest.raises(CircuitSAEError, match=r"sae.safetensors: W_dec holds NaN or inf \(1 of its 128 values\)") as e:
        load_dictionary(folder)
    _one_line(e)
    tensors["W_dec"][3, 1] = float("inf")
    _rewrite(folder, "sae.safetensors", safetensors.torch.save(tensors))
    with pytest.raises(CircuitSAEError, match="W_dec holds NaN or inf"):
        load_dictionary(folder)


def test_a_jumprelu_threshold_of_zero_still_loads(tmp_path):
    """log θ = −inf (θ = 0) is a JumpReLU's own value, not damage: only NaN and +inf are refused there."""
    from circuitsae.dictionaries import JumpReLUSAE

    sae = JumpReLUSAE(D, F)
    with torch.no_grad():
        sae.log_threshold[:3] = -float("inf")
    sae.save(tmp_path / "j")
    assert torch.equal(load_dictionary(tmp_path / "j").log_threshold, sae.log_threshold)


# the bad values of a cfg.json, with what the one line says; the manifest is rewritten, so the checksum passes
BAD_CONFIGS = {
    "d_dict 10**12": ({"d_dict": 10**12}, r"W_dec has shape \(16, 8\) but cfg.json implies \(1000000000000, 8\)"),
    "d 10**9": ({"d": 10**9}, r"has shape \(16, 8\) but cfg.json implies \(16, 1000000000\)"),
    "d_dict '512'": ({"d_dict": "512"}, r"'d_dict' must be an integer >= 1, got '512'"),
    "k 0": ({"k": 0}, r"'k' must be an integer >= 1, got 0"),
    "k > d_dict": ({"k": 17}, r"k must be an integer in \[1, d_dict=16\], got 17"),
    "d true": ({"d": True}, r"'d' must be an integer >= 1, got True"),
    "d 8.0": ({"d": 8.0}, r"'d' must be an integer >= 1, got 8.0"),
    "d -3": ({"d": -3}, r"'d' must be an integer >= 1, got -3"),
    "k_aux null ok, k_aux 0": ({"k_aux": 0}, r"'k_aux' must be an integer >= 1 or null, got 0"),
    "d and d_dict huge": ({"d": 10**12, "d_dict": 10**12}, r"cannot be built \(.*overflow|implies"),
    "site a list": ({"site": ["resid", 1]}, r"'site' must be a string"),
    "architecture a list": ({"architecture": ["topk"]}, r"unknown architecture \['topk'\]"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_values_are_one_line_before_any_allocation(tmp_path, case):
    change, match = BAD_CONFIGS[case]
    folder = _saved(tmp_path / "sae", TopKSAE(D, F, k=4))
    cfg = json.loads((folder / "cfg.json").read_text())
    _rewrite(folder, "cfg.json", json.dumps(cfg | change).encode())
    start = time.perf_counter()
    with pytest.raises(CircuitSAEError, match=match) as e:
        load_dictionary(folder)
    assert time.perf_counter() - start < 2
    assert str(folder / "cfg.json") in _one_line(e) or str(folder / "sae.safetensors") in str(e.value)


def test_huge_sizes_allocate_nothing(tmp_path):
    """In a fresh interpreter: the peak resident memory grows by less than 100 MB over five refused loads."""
    folders = []
    for i, change in enumerate([{"d_dict": 10**12}, {"d": 10**9}, {"d": 10**9, "d_dict": 10**9}, {"d_dict": "512"}]):
        folder = _saved(tmp_path / f"sae{i}")
        cfg = json.loads((folder / "cfg.json").read_text())
        _rewrite(folder, "cfg.json", json.dumps(cfg | change).encode())
        folders.append(str(folder))
    from circuitsae.dictionaries import IdentityDictionary

    IdentityDictionary(D).save(tmp_path / "identity")  # no tensors in the file: d alone sizes it
    cfg = json.loads((tmp_path / "identity" / "cfg.json").read_text())
    _rewrite(tmp_path / "identity", "cfg.json", json.dumps(cfg | {"d": 10**7, "d_dict": 10**7}).encode())
    folders.append(str(tmp_path / "identity"))
    script = textwrap.dedent(
        """
        import json, resource, sys
        from circuitsae import CircuitSAEError
        from circuitsae.dictionaries import ReluSAE, load_dictionary
        ReluSAE(8, 16)  # torch's own first allocations, before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = []
        for f in sys.argv[1:]:
            try:
                load_dictionary(f)
                out.append("loaded")
            except CircuitSAEError as e:
                out.append(str(e))
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"messages": out, "grew_kib": grew}))
        """
    )
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["grew_kib"] < 100 * 1024, result
    messages = result["messages"]
    assert all(m != "loaded" and "\n" not in m for m in messages), messages
    assert "would need" in messages[-1] and "of memory" in messages[-1], messages[-1]


def test_an_old_folder_without_a_manifest_loads_with_a_note(tmp_path, capsys):
    folder = _saved(tmp_path / "sae")
    (folder / "manifest.json").unlink()
    with pytest.warns(UserWarning, match=r"has no manifest.json .*cannot be checked.*circuitsae convert") as record:
        sae = load_dictionary(folder)
    assert isinstance(sae, ReluSAE) and len(record) == 1 and "\n" not in str(record[0].message)
    # ... and convert writes a copy that has one; the command line prints the note as one line
    assert main(["convert", str(folder), str(tmp_path / "new"), "--to", "circuitsae"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitsae: warning:") and "has no manifest.json" in err and len(err.splitlines()) == 1
    assert (tmp_path / "new" / "manifest.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dictionary(tmp_path / "new")


@pytest.mark.parametrize(
    "manifest, match",
    [
        ({"extra.bin": {"bytes": 3, "sha256": "0" * 64}}, r"extra.bin is missing but manifest.json lists it"),
        ({"../cfg.json": {"bytes": 3, "sha256": "0" * 64}}, r"names '../cfg.json', which is not a file of this folder"),
        ({"cfg.json": {"bytes": "12"}}, r"the entry for 'cfg.json' lacks bytes or a sha256"),
    ],
)
def test_a_manifest_that_does_not_describe_the_folder_is_refused(tmp_path, manifest, match):
    folder = _saved(tmp_path / "sae")
    m = json.loads((folder / "manifest.json").read_text())
    m["files"] |= manifest
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CircuitSAEError, match=match) as e:
        load_dictionary(folder)
    _one_line(e)
    (folder / "manifest.json").write_text("[1, 2")
    with pytest.raises(CircuitSAEError, match="manifest.json is not valid JSON"):
        load_dictionary(folder)
    (folder / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CircuitSAEError, match="is not a circuitsae manifest"):
        load_dictionary(folder)


def test_a_saelens_folder_carries_a_manifest_too(tmp_path):
    sae = load_dictionary(_saved(tmp_path / "sae"))
    lens = sae.save(tmp_path / "lens", format="saelens")
    assert json.loads((lens / "manifest.json").read_text())["files"].keys() == {"sae_weights.safetensors", "cfg.json"}
    back = load_dictionary(lens)
    x = torch.randn(5, D)
    assert torch.equal(back.encode(x), sae.encode(x))
    weights = lens / "sae_weights.safetensors"
    _flip(weights, _data_offset(weights), 0x01)
    with pytest.raises(CircuitSAEError, match="sae_weights.safetensors: sha256 differs from manifest.json"):
        load_dictionary(lens)
    (lens / "manifest.json").unlink()  # SAE Lens's own folders have none: no note, the tensors are checked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dictionary(lens)


def test_the_cli_says_one_line_and_exits_2(tmp_path, capsys):
    folder = _saved(tmp_path / "sae")
    _flip(folder / "sae.safetensors", _data_offset(folder / "sae.safetensors") + 3, 0x40)
    for argv in (["eval", str(folder)], ["convert", str(folder), str(tmp_path / "out"), "--to", "circuitsae"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("circuitsae: error: "), err
        assert "sae.safetensors: sha256 differs from manifest.json" in err
    assert not (tmp_path / "out" / "cfg.json").exists()
    # a NaN the checksum vouches for: refused by both, naming the tensor
    tensors = safetensors.torch.load_file(_saved(tmp_path / "nan") / "sae.safetensors")
    tensors["b_enc"][0] = float("nan")
    _rewrite(tmp_path / "nan", "sae.safetensors", safetensors.torch.save(tensors))
    for argv in (
        ["eval", str(tmp_path / "nan")],
        ["convert", str(tmp_path / "nan"), str(tmp_path / "o2"), "--to", "saelens"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "b_enc holds NaN or inf" in err, err
