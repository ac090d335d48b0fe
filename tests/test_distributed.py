"""Training and harvesting on torch.distributed: 2 processes of 1 thread each, gloo, launched by torchrun.

Each test starts real processes (``python -m torch.distributed.run --standalone``), so the suite checks what a
user's ``torchrun ... -m circuitsae`` does, on tiny stores and the tiny model.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import circuitsae
from circuitsae.data.store import store_from_tensors

TIMEOUT = 180


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}  # fmt: skip
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack
    return env | {"OMP_NUM_THREADS": "1", "CIRCUITSAE_DIST_TIMEOUT": "60", "HF_HUB_OFFLINE": "1",
                  "PYTHONFAULTHANDLER": "1"} | extra  # fmt: skip


def _said(proc, n=4000):
    """What the ranks wrote to stderr, without torchrun's own traceback (it fills the tail and says nothing)."""
    err = proc.stderr
    cut = err.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    if cut >= 0:
        start = err.rfind("Traceback (most recent call last):", 0, cut)
        err = err[: start if start >= 0 else cut] + err[cut:]
    return err[-n:]


def _circuitsae(args, cwd, n=None, env=None, timeout=TIMEOUT):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        if n
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "circuitsae", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3, generator=g).relu() @ torch.randn(3, 16, generator=g)  # few directions: dead features
    store_from_tensors(root / "store", {"resid.0": x, "resid.1": x.flip(1)}, {"resid.0": x[:256], "resid.1": x[:256]},
                       shard_rows=500)  # fmt: skip
    return root


TRAIN = ["train", "--store", "store", "--expansion", "4", "--batch-size", "64", "--arch", "relu", "gated",
         "--coefficients", "1", "3", "--resample-every", "16", "--device", "cpu", "--eval-rows", "256"]  # fmt: skip


def _weights(out):
    return {p.parent.name: circuitsae.load_dictionary(p.parent) for p in sorted(Path(out).glob("*/cfg.json"))}


def _summary(out, name="train.json"):
    import json

    return json.loads((Path(out) / name).read_text())


def test_data_parallel_training_equals_one_process(tiny_store):
    one = _circuitsae([*TRAIN, "--out", "one"], tiny_store)
    two = _circuitsae([*TRAIN, "--out", "two"], tiny_store, n=2)
    assert one.returncode == 0, _said(one)
    assert two.returncode == 0, _said(two)
    try:
        _check_data_parallel(tiny_store)
    except AssertionError as e:  # what the runs said, for a failure that does not show on a re-run
        raise AssertionError(f"{e}\n--- one process:\n{_said(one)}\n--- two ranks:\n{_said(two)}") from e


def _check_data_parallel(tiny_store):
    a, b = _weights(tiny_store / "one"), _weights(tiny_store / "two")
    assert sorted(a) == sorted(b) and len(a) == 8  # 2 sites x 2 architectures x 2 coefficients
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    s1, s2 = _summary(tiny_store / "one"), _summary(tiny_store / "two")
    resampled = {k: v["resampled_features_last_session"] for k, v in s1["runs"].items()}
    assert sum(resampled.values()) > 0  # resampling happened, so it was checked too
    assert resampled == {k: v["resampled_features_last_session"] for k, v in s2["runs"].items()}
    assert s2["world_size"] == 2 and s2["allreduce_bytes_per_step"] > 0
    # the dead-feature bookkeeping is the same: compare the final checkpoints' counters
    c1 = torch.load(tiny_store / "one" / "checkpoint.pt", weights_only=True)
    c2 = torch.load(tiny_store / "two" / "checkpoint.pt", weights_only=True)
    for r1, r2 in zip(c1["runs"], c2["runs"]):
        assert torch.equal(r1["last_fired"], r2["last_fired"]), r1["name"]
    # only rank 0 wrote: one log, one checkpoint, no per-rank files
    assert not list((tiny_store / "two").glob("*rank*"))


def test_run_parallel_equals_sequential(tiny_store):
    seq = tiny_store / "one"
    if not (seq / "train.json").is_file():
        assert _circuitsae([*TRAIN, "--out", "one"], tiny_store).returncode == 0
    par = _circuitsae([*TRAIN, "--out", "runs", "--parallel", "runs"], tiny_store, n=2)
    assert par.returncode == 0, _said(par)
    a, b = _weights(seq), _weights(tiny_store / "runs")
    assert sorted(a) == sorted(b)
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name  # the same computation, bit for bit
    assert {p.name for p in (tiny_store / "runs").glob("train-rank*.json")} == {"train-rank0of2.json",
                                                                                "train-rank1of2.json"}  # fmt: skip
    again = _circuitsae([*TRAIN, "--out", "runs", "--parallel", "runs"], tiny_store)  # one process, 2-rank files
    assert again.returncode == 2 and "resume with that many processes" in again.stderr


def test_a_killed_rank_stops_the_job_and_the_rerun_resumes_to_the_same_result(tiny_store):
    args = [*TRAIN, "--out", "crash", "--checkpoint-every", "10"]
    t0 = time.monotonic()
    died = _circuitsae(args, tiny_store, n=2, env=_env(CIRCUITSAE_KILL_AT="1:25"))
    assert died.returncode != 0 and time.monotonic() - t0 < 120  # stopped, did not hang
    assert "SIGKILL" in died.stderr or "Signal 9" in died.stderr, _said(died)
    assert _summary_missing(tiny_store / "crash")
    ck = torch.load(tiny_store / "crash" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 20 and ck["world_size"] == 2
    resumed = _circuitsae(args, tiny_store, n=2)
    assert resumed.returncode == 0, _said(resumed)
    ref = tiny_store / "two"
    if not (ref / "train.json").is_file():
        assert _circuitsae([*TRAIN, "--out", "two"], tiny_store, n=2).returncode == 0
    a, b = _weights(ref), _weights(tiny_store / "crash")
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _summary_missing(out):
    return not (Path(out) / "train.json").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank, port, **extra):
    return _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), **extra)  # fmt: skip


def _two_ranks(args, cwds, port, **extra):
    """Ranks 0 and 1 started by hand (no torchrun), each in its own working directory; their (returncode, stderr)."""
    procs = [subprocess.Popen([sys.executable, "-m", "circuitsae", *map(str, args)], cwd=cwd,
                              env=_rank_env(r, port, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r, cwd in enumerate(cwds)]  # fmt: skip
    errs = [p.communicate(timeout=120)[1] for p in procs]
    return [p.returncode for p in procs], errs


def test_without_torchrun_a_dead_peer_gives_one_line_not_a_hang(tiny_store):
    codes, errs = _two_ranks([*TRAIN, "--out", "bare"], [tiny_store] * 2, _free_port(), CIRCUITSAE_KILL_AT="1:5")
    assert codes[1] == -9
    assert codes[0] == 2, errs[0][-2000:]
    last = errs[0].strip().splitlines()[-1]
    assert last.startswith("circuitsae: error: rank 0 lost the other ranks during training step"), last


def test_bad_distributed_input_gives_one_line_and_exit_2(tiny_store, tmp_path):
    odd = _circuitsae([*TRAIN[:6], "63", *TRAIN[7:], "--out", "odd"], tiny_store, n=2)
    assert odd.returncode != 0 and "--batch-size 63 is not divisible by the 2 ranks" in odd.stderr
    assert not (tiny_store / "odd").exists()
    # a rendezvous nobody answers: rank 1 alone, a short timeout
    port = _free_port()
    lone = subprocess.run([sys.executable, "-m", "circuitsae", *TRAIN, "--out", "lone"], cwd=tiny_store,
                          env=_rank_env(1, port, CIRCUITSAE_DIST_TIMEOUT="3"), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = lone.stderr.strip().splitlines()
    assert lone.returncode == 2 and len(lines) == 1, _said(lone)
    assert "rank 1 of 2" in lines[0] and f"could not join the rendezvous at 127.0.0.1:{port}" in lines[0]
    # a store one rank cannot see (a relative path from another working directory)
    (tmp_path / "elsewhere").mkdir()
    codes, errs = _two_ranks([*TRAIN, "--out", tmp_path / "o"], [tiny_store, tmp_path / "elsewhere"], _free_port())
    assert codes == [2, 2], errs
    for e in errs:
        line = e.strip().splitlines()[-1]
        assert "opening the store failed on rank 1" in line and "is not an activation store" in line, line
    assert not (tmp_path / "o").exists()


HARVEST = ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "resid.1", "--tokens", "3000", "--ctx-len",
           "16", "--shard-contexts", "20", "--corpus", "sotu"]  # fmt: skip


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}


def test_parallel_harvest_is_byte_identical_to_one_process(tmp_path):
    one = _circuitsae([*HARVEST, "--out", "h1"], tmp_path)
    two = _circuitsae([*HARVEST, "--out", "h2"], tmp_path, n=2)  # both ranks start at once on no folder
    assert one.returncode == 0 and two.returncode == 0, _said(two)
    a, b = _files(tmp_path / "h1"), _files(tmp_path / "h2")
    assert list(a) == list(b) and all(a[k] == b[k] for k in a)
    assert not [n for n in b if n.startswith(".tmp-")]
    # an interrupted parallel harvest resumes: drop one shard of each rank and re-run with two ranks
    import json

    meta = json.loads((tmp_path / "h2" / "meta.json").read_text())
    (tmp_path / "h2" / "meta.json").write_text(json.dumps(meta | {"complete": False}, indent=2))
    for name in ("train-00001.json", "train-00002.json"):
        (tmp_path / "h2" / name).unlink()
    again = _circuitsae([*HARVEST, "--out", "h2"], tmp_path, n=2)
    assert again.returncode == 0, _said(again)
    assert _files(tmp_path / "h2") == a


def test_a_harvest_folder_one_rank_cannot_see_stops_both_ranks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    codes, errs = _two_ranks([*HARVEST, "--out", "h"], [tmp_path / "a", tmp_path / "b"], _free_port())
    assert codes == [2, 2], errs
    for e in errs:
        line = e.strip().splitlines()[-1]
        assert "opening the store failed on rank 1" in line and "storage every node sees" in line, line
    assert not (tmp_path / "b" / "h").exists()  # nothing written where rank 1 looked


def test_shutdown_leaves_no_gloo_thread_running(tmp_path):
    """After ``shutdown()`` the process group is really gone: no gloo thread left to outlive the interpreter.

    (torch._dynamo, first imported by the first optimiser while a group exists, kept the group alive, and its
    threads ran on into interpreter shutdown: the suspected cause of a rank's rare SIGABRT at exit.)
    """
    script = tmp_path / "job.py"
    script.write_text(
        "import os, torch\n"
        "from circuitsae import distributed\n"
        "distributed.init('cpu')\n"
        "torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3)\n"
        "distributed.all_reduce_sum_(torch.ones(8))\n"
        "distributed.shutdown()\n"
        "task = f'/proc/{os.getpid()}/task'\n"
        "names = [open(f'{task}/{t}/comm').read().strip() for t in os.listdir(task)]\n"
        "open(f\"threads{os.environ['RANK']}.txt\", 'w').write(' '.join(n for n in names if 'gloo' in n))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, _said(out)
    for rank in (0, 1):
        assert (tmp_path / f"threads{rank}.txt").read_text() == "", f"rank {rank}: gloo threads left running"
