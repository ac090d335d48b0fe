import hashlib
import json

import pytest
import torch

import circuitsae
from circuitsae import sites
from circuitsae.data import store as store_mod
from circuitsae.data.harvest import HarvestConfig, harvest
from circuitsae.data.store import ActivationStore, StoreWriter
from circuitsae.errors import CircuitSAEError

SITES = ("resid.1", "mlp.2", "attn.0")


def _harvest(model, out, corpus, **kw):
    cfg = dict(
        sites=SITES,
        tokens=600,
        ctx_len=16,
        batch_size=4,
        shard_contexts=8,
        corpus=str(corpus),
        heldout_fraction=0.25,
        out=str(out),
        progress=False,
    )
    cfg.update(kw)
    return harvest(model=model, **cfg)


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_roundtrip_equals_direct_forward(tiny_llama, text_corpus, tmp_path):
    st = _harvest(tiny_llama, tmp_path / "s", text_corpus, dtype="float32")
    assert st.sites == ["attn.0", "resid.1", "mlp.2"]  # forward order
    assert st.config["model"] == "tiny-llama" and st.d == 64
    rows = 40 * 15  # ceil(600 / 15) contexts, start token excluded
    assert st.n_rows("train") == rows and st.meta["config"]["keep_bos"] is False
    toks = st.tokens("train")
    assert toks.shape == (40, 16) and (toks[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    # the stored contexts are exactly the corpus' training contexts, in order
    from circuitsae import data

    assert torch.equal(toks, data.contexts(tiny_llama.tokenizer, 40, 16, str(text_corpus), "train", 0, 0.25))
    hf = tiny_llama._module
    for name in SITES:
        mod = sites.module(hf, name)
        got = {}
        h = mod.register_forward_hook(lambda m, i, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hf(toks.to(hf.device))
        h.remove()
        want = got["x"][:, 1:].reshape(-1, 64).cpu()
        stored = st.activations(name, "train")
        assert torch.allclose(stored, want, atol=1e-5), name
        # locate() maps a row back to its token
        ctx, pos = st.locate(123)
        assert torch.allclose(stored[123], got["x"][ctx, pos].cpu(), atol=1e-5)


def test_float16_and_bfloat16_storage(tiny_llama, text_corpus, tmp_path):
    ref = _harvest(tiny_llama, tmp_path / "f32", text_corpus, dtype="float32").activations("resid.1", "train")
    for dt, tol in (("float16", 2e-3), ("bfloat16", 2e-2)):
        st = _harvest(tiny_llama, tmp_path / dt, text_corpus, dtype=dt)
        x = st.activations("resid.1", "train")
        assert st.shard("resid.1", "train", 0).dtype == store_mod.STORE_DTYPES[dt][1]
        assert torch.allclose(x, ref, rtol=tol, atol=tol)


def test_heldout_slice_is_separate(tiny_llama, text_corpus, tmp_path):
    st = _harvest(tiny_llama, tmp_path / "s", text_corpus, heldout_tokens=60)
    assert st.n_rows("heldout") == 60 and st["resid.1"].heldout().shape == (60, 64)
    train_rows = {tuple(r.tolist()) for r in st.tokens("train")[:, 1:]}
    assert not any(tuple(r.tolist()) in train_rows for r in st.tokens("heldout")[:, 1:])


class _Kill(Exception):
    pass


def test_resume_after_interruption_gives_identical_store(tiny_llama, text_corpus, tmp_path, monkeypatch):
    full = _harvest(tiny_llama, tmp_path / "full", text_corpus)
    real_write, calls = StoreWriter.write_shard, []

    def dying_write(self, split, index, *a, **k):
        calls.append((split, index))
        if len(calls) == 3:  # die in the middle of the third shard: one file written, no manifest
            store_mod.atomic_write(self.root / f"{split}-{index:05d}.tokens.npy", b"partial")
            (self.root / ".tmp-999-train-00002.resid.1.npy").write_bytes(b"half")
            raise _Kill()
        return real_write(self, split, index, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_shard", dying_write)
    with pytest.raises(_Kill):
        _harvest(tiny_llama, tmp_path / "cut", text_corpus)
    with pytest.raises(CircuitSAEError, match="incomplete"):
        ActivationStore(tmp_path / "cut")
    partial = ActivationStore(tmp_path / "cut", allow_incomplete=True)
    assert len(partial.manifests["train"]) == 2
    written = []
    monkeypatch.setattr(
        StoreWriter, "write_shard", lambda self, s, i, *a, **k: (written.append(i), real_write(self, s, i, *a, **k))
    )
    resumed = _harvest(tiny_llama, tmp_path / "cut", text_corpus)
    assert written[:1] == [2], "resume must start at the first missing shard"
    assert _digests(tmp_path / "full") == _digests(tmp_path / "cut")
    assert torch.equal(resumed.activations("mlp.2", "train"), full.activations("mlp.2", "train"))
    # a complete store re-run is a no-op
    written.clear()
    _harvest(tiny_llama, tmp_path / "cut", text_corpus)
    assert written == []


@pytest.mark.parametrize(
    "change", [dict(sites=("resid.1",)), dict(dtype="float32"), dict(tokens=900), dict(model="tiny-gpt2")]
)
def test_incompatible_store_is_refused_untouched(tiny_models, text_corpus, tmp_path, change):
    _harvest(tiny_models["tiny-llama"], tmp_path / "s", text_corpus)
    before = _digests(tmp_path / "s")
    model = tiny_models[change.pop("model", "tiny-llama")]
    with pytest.raises(CircuitSAEError, match="incompatible activation store") as err:
        _harvest(model, tmp_path / "s", text_corpus, **change)
    assert "\n" not in str(err.value)
    assert _digests(tmp_path / "s") == before


def test_foreign_folder_is_refused(tiny_llama, text_corpus, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(CircuitSAEError, match="not empty and holds no activation store"):
        _harvest(tiny_llama, tmp_path / "f", text_corpus)
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine"


def test_damaged_shards_are_named(tiny_llama, text_corpus, tmp_path):
    _harvest(tiny_llama, tmp_path / "s", text_corpus)
    victim = tmp_path / "s" / "train-00001.mlp.2.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    st = ActivationStore(tmp_path / "s")  # sizes fine: opens
    with pytest.raises(CircuitSAEError, match="shard train-00001 .* train-00001.mlp.2.npy fails its checksum"):
        st.verify()
    with pytest.raises(CircuitSAEError, match="checksum"):
        list(st.batches("mlp.2", 64))
    victim.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(CircuitSAEError, match="shard train-00001 .*damaged: train-00001.mlp.2.npy has"):
        ActivationStore(tmp_path / "s")
    # a resumed harvest refuses too rather than trusting the bad shard
    with pytest.raises(CircuitSAEError, match="damaged"):
        _harvest(tiny_llama, tmp_path / "s", text_corpus)


def test_batches_cover_each_row_once_per_epoch_shuffled(tiny_llama, text_corpus, tmp_path):
    st = _harvest(tiny_llama, tmp_path / "s", text_corpus, dtype="float32")
    ref = st.activations("resid.1", "train")
    for buffer_rows in (50, 10_000):
        got = torch.cat(list(st["resid.1"].batches(32, buffer_rows=buffer_rows, seed=3)))
        assert got.shape == ref.shape
        # same multiset of rows, different order
        assert torch.equal(torch.sort(got.sum(1)).values, torch.sort(ref.sum(1)).values)
        assert not torch.equal(got, ref)
    a = list(st.batches("resid.1", 32, epochs=2, seed=5))
    b = list(st.batches("resid.1", 32, epochs=2, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 2 * len(list(st.batches("resid.1", 32)))
    full = list(st.batches("resid.1", 32, drop_last=True, dtype=torch.float64))
    assert all(x.shape == (32, 64) and x.dtype == torch.float64 for x in full)


def test_config_validation():
    for bad, match in [
        (dict(tokens=0), "tokens must be >= 1, got 0"),
        (dict(heldout_tokens=-1), "heldout_tokens must be >= 0, got -1"),
        (dict(heldout_fraction=0.0), "heldout_fraction must be > 0"),
        (dict(batch_size=float("nan")), "batch_size must be a finite number"),
        (dict(ctx_len=1 << 40), "ctx_len must be <= "),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(sites=()), "at least one site"),
        (dict(sites=("foo.1",)), "unknown site"),
    ]:
        with pytest.raises(CircuitSAEError, match=match):
            HarvestConfig(**bad)


def test_meta_records_provenance(tiny_llama, text_corpus, tmp_path):
    _harvest(tiny_llama, tmp_path / "s", text_corpus, keep_bos=True)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["complete"] and meta["first_position"] == 0 and meta["rows_per_context"] == 16
    for key in ("model", "sites", "tokens", "corpus", "ctx_len", "seed", "dtype", "keep_bos"):
        assert key in meta["config"]
    assert meta["start_token_id"] == tiny_llama.tokenizer.bos_token_id
    assert isinstance(circuitsae.ActivationStore(tmp_path / "s")["resid.1"].n_rows(), int)


def test_multi_site_batches_share_rows_and_skip_resumes_the_stream(tmp_path):
    from circuitsae.data.store import store_from_tensors

    a = torch.randn(1000, 4)
    store = store_from_tensors(tmp_path / "s", {"resid.0": a, "resid.1": 2 * a}, shard_rows=128)
    pairs = list(store.batches(["resid.0", "resid.1"], 64, seed=3, buffer_rows=256, epochs=2))
    assert all(torch.equal(y, 2 * x) for x, y in pairs)  # same rows at both sites
    single = list(store.batches("resid.0", 64, seed=3, buffer_rows=256, epochs=2))
    assert all(torch.equal(x, s) for (x, _), s in zip(pairs, single))
    assert len(single) == store.n_batches(64, epochs=2) == 2 * 16
    rest = list(store.batches("resid.0", 64, seed=3, buffer_rows=256, epochs=2, skip=11))
    assert len(rest) == len(single) - 11 and all(torch.equal(x, s) for x, s in zip(rest, single[11:]))
    assert store.n_batches(64, drop_last=True) == 15
