"""One writer per folder: the folder lock, a second writer refused in one line, a killed holder never blocking
the re-run, and a training folder refusing another configuration before any step."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from circuitsae import CircuitSAEError
from circuitsae.commands.cli import main
from circuitsae.dictionaries import ReluSAE
from circuitsae.io import LOCK_NAME, lock_folder
from circuitsae.training.trainer import TrainConfig, Trainer

HOLD = (
    "import sys, time\n"
    "from circuitsae.io import lock_folder\n"
    "lock = lock_folder(sys.argv[1], 'test').acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder():
    """Start a process that holds a folder's lock: ``holder(folder)`` returns it once it holds it."""
    started = []

    def start(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        started.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def store(random_store):
    return random_store("locks", 2048, 256, 16)


def _train_argv(store, out, *extra):
    return ["train", "--store", str(store), "--out", str(out), "--arch", "relu", "--expansion", "1", "--batch-size",
            "128", "--checkpoint-every", "4", "--log-every", "2", "--device", "cpu", *extra]  # fmt: skip


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("circuitsae: error: "), err
    return err


def test_the_lock_is_reentrant_and_leaves_nothing(tmp_path):
    folder = tmp_path / "new"
    with lock_folder(folder, "outer"):
        info = json.loads((folder / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["what"] == "outer"
        with lock_folder(folder, "inner"):  # a nested lock of the same folder by the same process
            (folder / "result").write_text("x")
        assert (folder / LOCK_NAME).exists()  # the outer one still holds it
    assert os.listdir(folder) == ["result"]
    with lock_folder(tmp_path / "unused", "failed early"):
        pass
    assert not (tmp_path / "unused").exists()  # created by the lock, nothing written: removed again


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, holder):
    p = holder(tmp_path / "out")
    with pytest.raises(
        CircuitSAEError, match=rf"is being written by process {p.pid} \(test: -c .*out\) since \d\d:\d\d: wait"
    ):
        with lock_folder(tmp_path / "out", "second"):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()  # a killed holder leaves its file, but not its lock
    with lock_folder(tmp_path / "out", "after"):
        pass


def test_second_harvest_train_convert_exit_2_naming_the_holder(tmp_path, store, holder, capsys, text_corpus):
    folder = tmp_path / "busy"
    p = holder(folder)
    sae = tmp_path / "sae"
    ReluSAE(16, 32).save(sae)
    for argv in (
        ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "--tokens", "60", "--ctx-len", "8",
         "--corpus", str(text_corpus), "--out", str(folder)],
        _train_argv(store, folder),
        ["convert", str(sae), str(folder), "--to", "circuitsae"],
        ["eval", str(sae), "--out", str(folder / "eval.json")],
        ["ioi", str(sae), "--out", str(folder)],
        ["feature", "resid.0:1", "--dictionaries", str(sae), "--out", str(folder)],
        ["tree", "resid.0:1", "--dictionaries", str(sae), "--out", str(folder / "tree")],
        ["demo", "--out", str(folder)],
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = _one_line(capsys)
        assert f"{folder} is being written by process {p.pid}" in err and "wait for it to finish" in err, err
    assert os.listdir(folder) == [LOCK_NAME]  # nothing was written
    p.kill()
    p.wait()
    assert main(["convert", str(sae), str(folder), "--to", "circuitsae"]) == 0  # the stale lock file is no obstacle
    assert sorted(os.listdir(folder)) == ["cfg.json", "manifest.json", "sae.safetensors"]
    assert main(_train_argv(store, tmp_path / "trained")) == 0
    assert (tmp_path / "trained" / "resid.0-relu-c1" / "cfg.json").exists()


def _cfg(store, out, **kw):
    return TrainConfig(**(dict(store=str(store), out=str(out), arch=("relu",), expansion=1, batch_size=128,
                                checkpoint_every=4, log_every=2, lr=1e-3) | kw))  # fmt: skip


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_training_of_another_configuration_is_refused_before_any_step(tmp_path, store, checkpoint, capsys):
    out = tmp_path / "saes"
    assert Trainer(_cfg(store, out, stop_after=4), progress=False).fit() == {}
    if not checkpoint:  # as if killed before its first checkpoint
        (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CircuitSAEError) as err:
        Trainer(_cfg(store, out, lr=5e-4), progress=False)  # refused on construction: no step is taken
    assert f"{out} holds a different training command, with lr=0.001 (this one: lr=0.0005)" in str(err.value)
    assert main(_train_argv(store, out, "--lr", "5e-4", "--expansion", "2")) == 2
    assert "with expansion=1, lr=0.001 (this one: expansion=2, lr=0.0005)" in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the same training resumes, whatever its output-only settings, and a finished folder re-runs as before
    done = Trainer(_cfg(store, out, log_every=4, device="cpu"), progress=False).fit()
    assert list(done) == ["resid.0-relu-c1"]
    again = Trainer(_cfg(store, out), progress=False).fit()
    assert torch.equal(again["resid.0-relu-c1"].W_dec, done["resid.0-relu-c1"].W_dec)


def test_a_folder_from_before_the_record_is_compared_with_its_train_json(tmp_path, store):
    out = tmp_path / "saes"
    Trainer(_cfg(store, out), progress=False).fit()
    (out / "train-config.json").unlink()
    (out / "checkpoint.pt").unlink()
    with pytest.raises(CircuitSAEError, match=r"with arch=relu \(this one: arch=gated\)"):
        Trainer(_cfg(store, out, arch=("gated",)), progress=False)
