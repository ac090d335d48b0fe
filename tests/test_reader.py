"""The fast reader (circuitsae.data.reader) against the plain reference, and its verify-once, finiteness and
read-ahead behaviour."""

import threading

import numpy as np
import pytest
import torch

from circuitsae.data import reader as reader_mod
from circuitsae.data import store as store_mod
from circuitsae.data.store import ActivationStore, store_from_tensors
from circuitsae.errors import CircuitSAEError

from fake_cuda import fake_cuda


def _store(tmp_path, dtype="float16", rows=1000, shard_rows=128, sites=("resid.0", "resid.1"), d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, d, generator=g)
    train = {s: a * (k + 1) + k for k, s in enumerate(sites)}
    return store_from_tensors(tmp_path / f"s-{dtype}-{rows}-{shard_rows}", train, dtype=dtype, shard_rows=shard_rows)


def _both(store, site, batch_size, **kw):
    fast = list(store.batches(site, batch_size, **kw))
    ref = list(store.batches(site, batch_size, reader="reference", **kw))
    return fast, ref


def _equal(fast, ref):
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fast_reader_gives_the_reference_batches_bit_for_bit(tmp_path, dtype):
    store = _store(tmp_path, dtype, rows=1000, shard_rows=96)
    cases = [
        dict(),  # the whole store in one pool (buffer larger than the store)
        dict(buffer_rows=256, epochs=2, seed=3),
        dict(buffer_rows=200, drop_last=True, seed=1),
        dict(buffer_rows=256, epochs=3, seed=7, skip=13),
        dict(buffer_rows=64, seed=2, dtype=torch.float64),
        dict(buffer_rows=100, seed=4, dtype=torch.bfloat16, epochs=2),
    ]
    for kw in cases:
        _equal(*_both(store, "resid.1", 64, **kw))
        _equal(*_both(store, ["resid.0", "resid.1"], 50, **kw))


def test_a_batch_larger_than_half_the_pool_grows_it_like_the_reference(tmp_path):
    store = _store(tmp_path, rows=700, shard_rows=64)
    _equal(*_both(store, "resid.0", 300, buffer_rows=100, seed=5, epochs=2))


def test_shards_of_unequal_size_and_a_last_partial_batch(tmp_path):
    store = _store(tmp_path, rows=1001, shard_rows=100)  # shards of 100 rows and one of 1
    fast, ref = _both(store, "resid.0", 33, buffer_rows=150, seed=9)
    _equal(fast, ref)
    assert sum(b.shape[0] for b in fast) == 1001 and fast[-1].shape[0] == 1001 % 33


def test_pool_stays_within_buffer_plus_one_shard(tmp_path, monkeypatch):
    store = _store(tmp_path, rows=3000, shard_rows=128)

    def no_growth(self, need):
        raise AssertionError(f"pool grew to {need} rows")

    monkeypatch.setattr(reader_mod._SlotPool, "_grow", no_growth)
    n = sum(1 for _ in store.batches("resid.0", 64, buffer_rows=512, epochs=2))
    assert n == store.n_batches(64, epochs=2)


def test_each_file_is_hashed_once_and_a_later_change_is_caught(tmp_path, monkeypatch):
    store = _store(tmp_path, rows=600, shard_rows=100)
    hashed = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    list(store.batches(["resid.0", "resid.1"], 64, epochs=3))
    list(ActivationStore(store.root).batches("resid.0", 64))  # another store object, same process
    assert len(hashed) == len(set(hashed)) == 2 * 6  # two sites x six shards, each once
    victim = store.root / "train-00002.resid.1.npy"
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0xFF  # same size, new content
    victim.write_bytes(bytes(data))
    with pytest.raises(CircuitSAEError, match=r"shard train-00002 .* train-00002.resid.1.npy fails its checksum"):
        list(store.batches("resid.1", 64))
    assert list(store.batches("resid.0", 64, verify=True))  # the other site's files are still good
    with pytest.raises(CircuitSAEError, match="fails its checksum"):
        store.verify()  # an explicit verify always hashes


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_non_finite_rows_are_named_by_file_and_row(tmp_path, dtype):
    a = torch.randn(300, 4)
    a[100 + 37, 2] = float("nan") if dtype == "float32" else float("inf")
    store = store_from_tensors(tmp_path / "s", {"resid.0": a}, dtype=dtype, shard_rows=100)
    for reader in ("fast", "reference"):
        with pytest.raises(CircuitSAEError, match=r"non-finite .*/train-00001.resid.0.npy at row 37"):
            list(store.batches("resid.0", 32, reader=reader))


def test_stopping_early_ends_the_read_ahead_thread(tmp_path):
    store = _store(tmp_path, rows=2000, shard_rows=64)
    before = threading.active_count()
    stream = store.batches("resid.0", 16, buffer_rows=128, prefetch=1)
    next(stream)
    assert any(t.name == "circuitsae-read-ahead" for t in threading.enumerate())
    stream.close()
    assert not any(t.name == "circuitsae-read-ahead" for t in threading.enumerate())
    assert threading.active_count() == before


def test_shuffled_batches_over_plain_loaders_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(int(n), 3, generator=g).half() for n in torch.randint(1, 90, (17,), generator=g)]
    rows = [s.shape[0] for s in shards]
    args = (lambda i: [shards[i]], rows, lambda i, k: f"shard {i}", 40)
    kw = dict(width=3, storage_dtype=torch.float16, n_sites=1, epochs=2, seed=11, buffer_rows=150)
    fast = [b[0] for b in reader_mod.shuffled_batches(*args, **kw)]
    ref = [b[0] for b in reader_mod.reference_batches(*args, **kw)]
    _equal(fast, ref)
    assert torch.equal(torch.sort(torch.cat(fast[: len(fast) // 2]).sum(1)).values,
                       torch.sort(torch.cat(shards).float().sum(1)).values)  # fmt: skip


def test_batches_on_the_fake_cuda_device_equal_the_cpu_ones_and_the_pool_lives_there(tmp_path, monkeypatch):
    store = _store(tmp_path, rows=500, shard_rows=64)
    want = list(store.batches(["resid.0", "resid.1"], 32, buffer_rows=128, seed=2))
    pools = []
    real_init = reader_mod._SlotPool.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        pools.append(self)

    monkeypatch.setattr(reader_mod._SlotPool, "__init__", spy)
    with fake_cuda():
        got = list(store.batches(["resid.0", "resid.1"], 32, buffer_rows=128, seed=2, device="cuda"))
        assert all(b.device.type == "cuda" for pair in got for b in pair)
        assert pools and all(buf.device.type == "cuda" for buf in pools[0].bufs)
        got = [tuple(b.cpu() for b in pair) for pair in got]
    _equal(got, want)


def test_memory_mapped_shards_are_copy_on_write(tmp_path):
    store = _store(tmp_path, dtype="float32", rows=100, shard_rows=100, sites=("resid.0",))
    x = store.shard("resid.0")
    before = np.load(store.root / "train-00000.resid.0.npy").copy()
    x.mul_(0)  # writing to what was read never reaches the file
    assert np.array_equal(np.load(store.root / "train-00000.resid.0.npy"), before)
    store.verify()


@pytest.mark.parametrize("pool", ["slots", "mapped"])
def test_both_pools_equal_the_reference_on_the_cpu(pool):
    g = torch.Generator().manual_seed(1)
    shards = [torch.randn(int(n), 5, generator=g).to(torch.bfloat16) for n in torch.randint(1, 70, (23,), generator=g)]
    args = (lambda i: [shards[i], 2 * shards[i]], [s.shape[0] for s in shards], lambda i, k: f"shard {i}", 32)
    for kw in (dict(buffer_rows=90, epochs=2, seed=3), dict(buffer_rows=40, skip=5, drop_last=True, seed=4)):
        kw |= dict(width=5, storage_dtype=torch.bfloat16, n_sites=2)
        _equal([tuple(b) for b in reader_mod.shuffled_batches(*args, pool=pool, **kw)],
               [tuple(b) for b in reader_mod.reference_batches(*args, **kw)])  # fmt: skip


def test_a_bad_pool_choice_is_refused_at_once():
    args = (lambda i: [], [1], lambda i, k: "", 1)
    with pytest.raises(CircuitSAEError, match="unknown pool"):
        reader_mod.shuffled_batches(*args, width=1, storage_dtype=torch.float16, n_sites=1, pool="ram")
    with pytest.raises(CircuitSAEError, match="serves the CPU only"):
        reader_mod.shuffled_batches(*args, width=1, storage_dtype=torch.float16, n_sites=1, pool="mapped",
                                    device="meta")  # fmt: skip


def test_the_shares_of_all_ranks_make_up_each_batch(tmp_path):
    store = _store(tmp_path, rows=900, shard_rows=100)
    for kw in (dict(drop_last=True), dict(drop_last=False, epochs=2)):
        whole = list(store.batches(["resid.0", "resid.1"], 60, buffer_rows=200, seed=3, **kw))
        shares = [list(store.batches(["resid.0", "resid.1"], 60, buffer_rows=200, seed=3, part=(r, 3), **kw))
                  for r in range(3)]  # fmt: skip
        ref = list(store.batches(["resid.0", "resid.1"], 60, buffer_rows=200, seed=3, part=(1, 3),
                                 reader="reference", **kw))  # fmt: skip
        _equal(shares[1], ref)
        for k, batch in enumerate(whole):
            for site in range(2):
                assert torch.equal(torch.cat([shares[r][k][site] for r in range(3)]), batch[site])
    with pytest.raises(CircuitSAEError, match="part must be"):
        store.batches("resid.0", 8, part=(2, 2))


def test_reused_buffers_hold_the_same_batches_while_they_are_current(tmp_path):
    store = _store(tmp_path, rows=800, shard_rows=100)
    for dtype in (torch.float32, torch.float16):
        want = list(store.batches(["resid.0", "resid.1"], 64, buffer_rows=200, seed=4, dtype=dtype))
        got, seen = [], set()
        for pair in store.batches(["resid.0", "resid.1"], 64, buffer_rows=200, seed=4, dtype=dtype, reuse=True):
            seen.update(t.data_ptr() for t in pair)
            got.append(tuple(t.clone() for t in pair))
        _equal(got, want)
        assert len(seen) <= 4  # two buffers per site, reused
