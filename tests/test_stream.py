"""Training straight from the model (``train --model``): the stream equals a store of the same contexts, a killed
run resumes byte-identical, the memory plan refuses in one line, and torchrun runs it on 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import circuitsae
from circuitsae.data.harvest import harvest
from circuitsae.data.reader import needed_shards, shuffled_batches
from circuitsae.data.stream import ModelStream
from circuitsae.errors import CircuitSAEError
from circuitsae.training.evaluate import evaluate
from circuitsae.training.trainer import TrainConfig, Trainer, train

#: one context shape, chunking and forward batch for the store and the stream
SHAPE = {"ctx_len": 16, "seed": 3}
STREAM = {**SHAPE, "chunk_contexts": 20, "model_batch": 8}
RUN = {"arch": ("topk", "relu"), "coefficients": (4,), "expansion": 2, "batch_size": 64, "lr": 3e-3,
       "buffer_rows": 500, "scale_rows": 400, "eval_rows": 150, "resample_every": 10, "device": "cpu"}  # fmt: skip


def _states(saved):
    return {name: {k: v.clone() for k, v in sae.state_dict().items()} for name, sae in saved.items()}


def test_streaming_equals_a_store_harvested_from_the_same_contexts(tiny_llama, tmp_path):
    sites = ("resid.0", "mlp.1", "attn.2")
    store = harvest(model=tiny_llama, sites=sites, tokens=2000, out=str(tmp_path / "acts"), shard_contexts=20,
                    batch_size=8, heldout_tokens=150, progress=False, **SHAPE)  # fmt: skip
    from_store = train(store=str(store.root), out=str(tmp_path / "a"), seed=SHAPE["seed"], progress=False, **RUN)
    streamed = train(model=tiny_llama, sites=sites, tokens=2000, out=str(tmp_path / "b"), progress=False, **STREAM,
                     **RUN)  # fmt: skip
    assert sorted(from_store) == sorted(streamed) and len(streamed) == 6
    a, b = _states(from_store), _states(streamed)
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
        assert from_store[name].meta["input_scale"] == streamed[name].meta["input_scale"]
        assert from_store[name].meta["metrics"]["fvu"] == pytest.approx(streamed[name].meta["metrics"]["fvu"])
    meta = streamed["mlp.1-topk-c4"].meta
    assert "store" not in meta and meta["stream"]["model"] == "tiny-llama" and meta["stream"]["tokens"] == 2000
    loaded = circuitsae.load_dictionary(tmp_path / "b" / "mlp.1-topk-c4")  # checksummed and readable like any other
    assert loaded.meta["stream"] == meta["stream"]
    # eval without a store runs forward passes over the held-out split they were trained beside: the same rows
    # and contexts as the store's held-out split
    folders = [str(tmp_path / "b" / n) for n in ("mlp.1-topk-c4", "attn.2-relu-c4")]
    on_model = evaluate(dictionaries=folders, model=tiny_llama, rows=150, contexts=4, out=str(tmp_path / "e1.json"),
                        progress=False).results  # fmt: skip
    on_store = evaluate(dictionaries=folders, store=str(store.root), model=tiny_llama, rows=150, contexts=4,
                        out=str(tmp_path / "e2.json"), progress=False).results  # fmt: skip
    for name in on_model:
        assert on_model[name].store.startswith("forward passes of tiny-llama")
        for key in ("fvu", "l0", "loss_recovered", "kl"):
            assert getattr(on_model[name], key) == pytest.approx(getattr(on_store[name], key), rel=1e-5), key


def test_site_patterns_expand_against_the_model(tiny_llama):
    stream = ModelStream(tiny_llama, ["resid.*", "mlp.1"], tokens=300, **SHAPE)
    assert stream.sites == ["resid.0", "mlp.1", "resid.1", "resid.2", "resid.3"]
    assert stream.n_rows("train") == 20 * 15 and stream.chunk_rows() == [300]  # one chunk of 128 contexts at most
    with pytest.raises(CircuitSAEError, match="not within this model"):
        ModelStream(tiny_llama, ["mlp.7-9"], tokens=300, **SHAPE)


def test_ranks_stream_their_own_contexts_but_sample_the_input_scale_from_the_same_first_rows(tiny_llama):
    shape = {**SHAPE, "chunk_contexts": 20, "batch_contexts": 40}
    one = ModelStream(tiny_llama, ["resid.1"], tokens=600, **shape)
    ranks = [ModelStream(tiny_llama, ["resid.1"], tokens=600, ranks=(r, 2), **shape) for r in range(2)]
    assert torch.equal(torch.cat([r.ids["train"] for r in ranks]), one.ids["train"])  # contiguous ranges
    assert ranks[0].n_rows("train") == ranks[1].n_rows("train") == one.n_rows("train") // 2
    want = one.sample(["resid.1"], "train", 300)["resid.1"]
    for r in ranks:
        assert torch.equal(r.sample(["resid.1"], "train", 300)["resid.1"], want)
    assert ranks[1].n_batches(64, drop_last=True) == one.n_rows("train") // 2 // 32


def test_a_resumed_reader_needs_only_the_shards_its_remaining_batches_read():
    rows, kw = [37, 50, 21, 64, 40, 33], {"epochs": 2, "seed": 5, "buffer_rows": 80, "drop_last": True}
    total = sum(rows) * 2 // 16
    assert all(needed_shards(rows, 16, **kw, skip=0))
    assert not any(needed_shards(rows, 16, **kw, skip=total))
    data = [torch.randn(n, 3) for n in rows]

    def batches(skip, zeros_for=None):
        calls = iter(zeros_for) if zeros_for is not None else None

        def load(i):
            return [data[i] if calls is None or next(calls) else torch.zeros_like(data[i])]

        return list(shuffled_batches(load, rows, lambda i, k: str(i), 16, width=3, storage_dtype=torch.float32,
                                     n_sites=1, skip=skip, prefetch=0, pool="slots", **kw))  # fmt: skip

    for skip in (0, 3, 9, total - 1):
        need = needed_shards(rows, 16, **kw, skip=skip)
        assert 0 < sum(need) <= len(need)
        full, lean = batches(skip), batches(skip, need)
        assert len(full) == len(lean) == total - skip
        assert all(torch.equal(f[0], g[0]) for f, g in zip(full, lean))
    assert sum(needed_shards(rows, 16, **kw, skip=total - 1)) < len(rows) * 2  # late resumes skip forward passes


def test_the_memory_plan_refuses_in_one_line(tiny_llama, tmp_path):
    cfg = TrainConfig(model="tiny-llama", sites=("all",), tokens=2000, out=str(tmp_path / "m"), memory_limit="2M",
                      batch_size=64, **STREAM)  # fmt: skip
    with pytest.raises(CircuitSAEError, match=r"would need .* more than the 2 MiB the limit given") as e:
        Trainer(cfg, progress=False, model=tiny_llama)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m" / "checkpoint.pt").exists()
    with pytest.raises(CircuitSAEError, match="memory_limit|size"):
        TrainConfig(model="tiny-llama", sites=("all",), memory_limit="lots")
    with pytest.raises(CircuitSAEError, match="name the sites"):
        TrainConfig(model="tiny-llama")


# -- processes: kill -9 and resume; torchrun ---------------------------------------------------------------------------

ARGS = ["train", "--model", "tiny-llama", "--sites", "resid.1", "mlp.2", "--tokens", "2.4k", "--ctx-len", "16",
        "--chunk-contexts", "20", "--model-batch", "8", "--arch", "topk", "--coefficients", "4", "--expansion", "2",
        "--batch-size", "64", "--buffer-rows", "400", "--scale-rows", "300", "--eval-rows", "100",
        "--checkpoint-every", "6", "--device", "cpu"]  # fmt: skip


def _env(**extra):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CIRCUITSAE_KILL_AT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                                     "CIRCUITSAE_DIST_TIMEOUT": "60"} | extra  # fmt: skip


def _run(args, cwd, ranks=None, **env):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks \
        else [sys.executable]  # fmt: skip
    cmd = [*launcher, "-m", "circuitsae", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).glob("*/sae.safetensors"))}


def test_a_killed_streaming_run_resumes_byte_identical(tmp_path, tiny_llama):
    whole = _run([*ARGS, "--out", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    died = _run([*ARGS, "--out", "cut"], tmp_path, CIRCUITSAE_KILL_AT="0:9")
    assert died.returncode == -9
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = _run([*ARGS, "--out", "cut"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "cut")
    assert sorted(a) == ["mlp.2-topk-c4/sae.safetensors", "resid.1-topk-c4/sae.safetensors"]
    assert a == b  # byte for byte
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    bad = _run([*ARGS, "--out", "cut", "--memory-limit", "1k"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "more than the 1 KiB" in bad.stderr


def test_torchrun_two_ranks_each_stream_their_own_tokens(tmp_path, tiny_llama):
    two = _run([*ARGS, "--out", "two"], tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(summary["runs"]) == ["mlp.2-topk-c4", "resid.1-topk-c4"]
    assert all(0 < r["fvu"] < 1 for r in summary["runs"].values())
    assert not list((tmp_path / "two").glob("*rank*"))  # rank 0 wrote everything
    alone = _run([*ARGS, "--out", "two"], tmp_path)  # another world size streams other batches: refused
    assert alone.returncode == 2 and "holds a different training" in alone.stderr
