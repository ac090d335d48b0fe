"""A full disk and unwritable outputs, for real: small and read-only tmpfs mounts in a user+mount namespace.

Each test runs one driver process inside ``unshare -rm`` that mounts the file systems and runs ``circuitsae``
commands (``cli.main``) and shell steps in order, and reports each step's exit status and what it said. A full
disk must be one line and exit 2, leave no temporary file, and leave a folder that completes when re-run with
space (harvest and training resume; convert leaves nothing behind). Skipped where namespaces or mounts are not
permitted.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from circuitsae.dictionaries import ReluSAE, load_dictionary

DRIVER = r"""
import contextlib, io, json, os, subprocess, sys
from circuitsae.commands.cli import main

results = []
for step in json.loads(sys.argv[1]):
    if "cli" in step:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(step["cli"])
        results.append({"code": code, "err": err.getvalue()})
    elif "sh" in step:
        r = subprocess.run(step["sh"], shell=True, capture_output=True, text=True)
        results.append({"code": r.returncode, "err": r.stderr})
    else:  # "fill": leave only step["leave"] bytes free on the file system of step["fill"]
        free = os.statvfs(step["fill"]).f_bavail * os.statvfs(step["fill"]).f_frsize
        with open(os.path.join(step["fill"], "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - step["leave"]))
        results.append({"code": 0, "err": ""})
    if "ls" in step:
        results[-1]["ls"] = sorted(os.listdir(step["ls"])) if os.path.isdir(step["ls"]) else None
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """Run a driver over ``steps`` in a user+mount namespace; skips when this machine does not allow one."""
    probe = tmp_path_factory.mktemp("probe")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here: a full disk is simulated with a small tmpfs in a user+mount namespace")
    tried = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                           capture_output=True, text=True)  # fmt: skip
    if tried.returncode:
        pytest.skip(f"cannot mount a tmpfs in a user+mount namespace here: {tried.stderr.strip()}")

    def run(steps: list) -> list:
        r = subprocess.run([unshare, "-rm", sys.executable, "-c", DRIVER, json.dumps(steps)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    return run


def _mount(folder, size="", ro=False):
    opts = ",".join([*([f"size={size}"] if size else []), *(["ro"] if ro else [])])
    return {"sh": f"mkdir -p {folder} && mount -t tmpfs {'-o ' + opts if opts else ''} tmpfs {folder}"}


def _remount(folder, size):
    return {"sh": f"mount -o remount,size={size} {folder}"}


def _one_line(result, *fragments):
    """Exit 2 and one ``circuitsae: error:`` line (progress bars aside), holding ``fragments``; no traceback."""
    err = result["err"]
    lines = [ln for ln in err.splitlines() if ln.startswith("circuitsae:")]
    assert result["code"] == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().endswith(lines[0]) and lines[0].startswith("circuitsae: error: "), err[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def _no_temporary(names):
    assert names is not None and not [n for n in names if n.startswith(".tmp-")], names


@pytest.fixture(scope="module")
def store(random_store):
    return random_store("disk", 4096, 512, 64)


HARVEST = ["harvest", "--model", "tiny-llama", "--model-dtype", "float32", "--sites", "resid.0", "--tokens", "3000",
           "--ctx-len", "16", "--shard-contexts", "20", "--corpus", "sotu", "--device", "cpu"]  # fmt: skip


def test_harvest_on_a_full_disk_is_one_line_and_resumes(namespace, tmp_path, tiny_llama):
    from circuitsae.data.harvest import harvest

    disk, out, ref = tmp_path / "disk", tmp_path / "disk" / "acts", tmp_path / "ref"
    harvest(model=tiny_llama, sites=("resid.0",), tokens=3000, ctx_len=16, shard_contexts=20, corpus="sotu",
            out=str(ref), progress=False)  # fmt: skip
    steps = [_mount(disk, "2m")]
    # room for the activations but not for the whole store (token ids, manifests, one page per file)
    activations = 2 * 3150 * 64  # float16, the training and held-out rows, d = 64
    steps += [
        {"fill": str(disk), "leave": int(activations * 1.1)},
        {"cli": [*HARVEST, "--out", str(out)], "ls": str(out)},
    ]
    steps += [
        {"sh": f"rm {disk}/filler"},
        {"cli": [*HARVEST, "--out", str(out)]},
        {"sh": f"cp -a {out} {tmp_path}/got"},
    ]
    _, _, full, _, resumed, _ = namespace(steps)
    _one_line(full, "free there): free some space, then re-run the same command")
    _no_temporary(full["ls"])
    assert any(n.endswith(".json") and n.startswith("train-") for n in full["ls"])  # shards written are kept
    assert resumed["code"] == 0, resumed["err"][-2000:]
    got = {p.name: p.read_bytes() for p in sorted((tmp_path / "got").iterdir())}
    assert got == {p.name: p.read_bytes() for p in sorted(ref.iterdir())}  # the store an uninterrupted run writes


def test_training_on_a_full_disk_is_one_line_and_resumes(namespace, tmp_path, store):
    disk, out = tmp_path / "disk", tmp_path / "disk" / "saes"
    train = ["train", "--store", str(store), "--out", str(out), "--arch", "relu", "--expansion", "4",
             "--batch-size", "128", "--checkpoint-every", "10", "--log-every", "5", "--device", "cpu"]  # fmt: skip
    # a checkpoint takes ~410 kB: the first fits in 600 kB, the second's temporary copy beside it does not
    steps = [_mount(disk, "600k"), {"cli": train, "ls": str(out)}, _remount(disk, "8m"), {"cli": train}]
    steps += [{"sh": f"cp -a {out} {tmp_path}/got"}]
    _, full, _, resumed, _ = namespace(steps)
    _one_line(full, "no space left on the device while writing", "checkpoint.pt", "free there")
    _no_temporary(full["ls"])
    assert "checkpoint.pt" in full["ls"] and "train.json" not in full["ls"]
    assert resumed["code"] == 0, resumed["err"][-2000:]
    got = tmp_path / "got"
    steps = [json.loads(ln)["step"] for ln in (got / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 33, 5)) + [32]  # resumed at step 10: no step logged twice, none lost
    assert load_dictionary(got / "resid.0-relu-c1").d_dict == 256


def test_convert_on_a_full_disk_leaves_nothing_behind(namespace, tmp_path):
    src = tmp_path / "sae"
    ReluSAE(64, 4096).save(src)  # 2 MB of weights
    disk = tmp_path / "disk"
    convert = ["convert", str(src)]
    steps = [_mount(disk, "1m"), {"cli": [*convert, f"{disk}/new", "--to", "circuitsae"], "ls": str(disk)}]
    steps += [
        {"sh": f"mkdir {disk}/empty"},
        {"cli": [*convert, f"{disk}/empty", "--to", "saelens"], "ls": f"{disk}/empty"},
    ]
    steps += [_remount(disk, "8m"), {"cli": [*convert, f"{disk}/new", "--to", "circuitsae"]}]
    steps += [{"cli": [*convert, f"{disk}/empty", "--to", "saelens"], "ls": f"{disk}/empty"}]
    _, new, _, empty, _, again, again_empty = namespace(steps)
    _one_line(new, "no space left on the device while writing", "sae.safetensors")
    assert new["ls"] == []  # the folder convert made is gone
    _one_line(empty, "no space left on the device")
    assert empty["ls"] == []  # the folder it was given is left as it was: empty
    assert again["code"] == 0 and again_empty["code"] == 0, (again["err"], again_empty["err"])
    assert "sae_weights.safetensors" in again_empty["ls"]


def test_unwritable_outputs_are_refused_before_the_work(namespace, tmp_path, store, capsys):
    from circuitsae.commands.cli import main

    src = tmp_path / "sae"
    ReluSAE(64, 128).save(src)  # names no store: an evaluation that started would fail on that
    ro = tmp_path / "ro"
    steps = [_mount(ro, ro=True)]
    steps += [{"cli": ["train", "--store", str(store), "--out", f"{ro}/saes"]}]
    steps += [{"cli": [*HARVEST, "--out", f"{ro}/acts"]}]
    steps += [{"cli": ["eval", str(src), "--out", f"{ro}/eval.json"]}]
    steps += [{"cli": ["convert", str(src), f"{ro}/lens", "--to", "saelens"]}]
    _, train, harvest, evaluate, convert = namespace(steps)
    for result, what in ((train, "saes"), (harvest, "acts"), (evaluate, "ro"), (convert, "lens")):
        _one_line(result, "cannot write to output folder", what, "Read-only file system")
    # an output that is a file, a JSON output that is a folder, a conversion into its own input
    (tmp_path / "file").write_text("not a folder")
    for argv, match in (
        (["train", "--store", str(store), "--out", str(tmp_path / "file")], "is a file: choose another output folder"),
        (["eval", str(src), "--out", str(tmp_path)], "is a folder: name a file"),
        (["convert", str(src), str(src), "--to", "saelens"], "is the input folder"),
        (["convert", str(src), str(src / "inside"), "--to", "saelens"], "is inside the input folder"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert sorted(os.listdir(src)) == ["cfg.json", "manifest.json", "sae.safetensors"]
