"""The trainer: recovery of known features, constraints, exact resume, bad input."""

import json

import pytest
import torch

from circuitsae import CircuitSAEError
from circuitsae.data.store import ActivationStore, store_from_tensors
from circuitsae.dictionaries import load_dictionary
from circuitsae.training.trainer import TrainConfig, Trainer, TrainingDiverged, train


def sparse_data(n, d=32, n_features=32, p_active=3 / 32, seed=0):
    """x = Σ_i a_i g_i with unit ground-truth directions g_i, each active with probability p_active."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=g) < p_active
    mags = torch.rand(n, n_features, generator=g) * 2 + 0.5
    return (active * mags) @ feats, feats


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, feats = sparse_data(54_096)
    root = tmp_path_factory.mktemp("synthetic") / "acts"
    store_from_tensors(root, {"resid.0": x[:50_000]}, {"resid.0": x[50_000:]})
    return root, feats


def test_training_recovers_known_sparse_features(synthetic, tmp_path):
    root, feats = synthetic
    common = dict(store=str(root), expansion=2, batch_size=256, lr=3e-3, epochs=4, progress=False)
    saes = {
        "paper": train(
            out=str(tmp_path / "p"), arch=("relu",), coefficients=(1.0,), tied=True, decoder_bias=False, **common
        )["resid.0-relu-c1"],
        "untied": train(out=str(tmp_path / "u"), arch=("relu",), coefficients=(1.0,), **common)["resid.0-relu-c1"],
        "gated": train(out=str(tmp_path / "g"), arch=("gated",), coefficients=(3.0,), **common)["resid.0-gated-c3"],
    }
    assert saes["paper"].config() == {"d": 32, "d_dict": 64, "tied": True, "decoder_bias": False}
    for name, sae in saes.items():
        mmcs = (sae.directions.cpu() @ feats.T).max(0).values.mean()  # best match for each true feature
        assert mmcs >= 0.9, f"{name}: mean max cosine similarity {mmcs:.3f}"
    relu, gated = saes["untied"].meta["metrics"], saes["gated"].meta["metrics"]
    assert relu["gamma"] < 0.97 < gated["gamma"] < 1.05  # L1 shrinks, the gate does not (Gated paper)
    assert gated["fvu"] < 0.1 and gated["l0"] < 5  # true L0 is 3


def test_feature_rows_stay_unit_norm(synthetic, tmp_path):
    root, _ = synthetic
    tr = Trainer(TrainConfig(store=str(root), out=str(tmp_path), expansion=1, batch_size=128, lr=1e-2), progress=False)
    batches = ActivationStore(root).batches("resid.0", 128, device=tr.device)
    for _ in range(20):
        tr.step({"resid.0": next(batches)})
    for run in tr.runs:
        for w in run.sae.constrained():
            torch.testing.assert_close(w.norm(dim=-1).cpu(), torch.ones(w.shape[0]), atol=1e-5, rtol=0)


def _cfg(root, out, **kw):
    base = dict(
        store=str(root),
        out=str(out),
        arch=("relu", "gated"),
        coefficients=(0.5, 2.0),
        expansion=1,
        batch_size=512,
        checkpoint_every=5,
        log_every=3,
        resample_every=4,
    )
    return TrainConfig(**(base | kw))


def test_resume_after_interruption_equals_an_uninterrupted_run(synthetic, tmp_path):
    root, _ = synthetic
    full = Trainer(_cfg(root, tmp_path / "full"), progress=False).fit()
    assert Trainer(_cfg(root, tmp_path / "cut", stop_after=12), progress=False).fit() == {}
    # as if killed at step 14, after the checkpoint at 12 but before the next one
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 14, "run": "lost"}) + "\n")
    resumed = Trainer(_cfg(root, tmp_path / "cut"), progress=False).fit()
    assert full.keys() == resumed.keys() and len(full) == 4
    for name in full:
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "full" / "log.jsonl").read_text() == (tmp_path / "cut" / "log.jsonl").read_text()
    saved = load_dictionary(tmp_path / "cut" / "resid.0-gated-c2")
    assert saved.meta["training"]["steps"] == 97 and saved.meta["site"] == "resid.0"


def test_resume_refuses_a_different_command(synthetic, tmp_path):
    root, _ = synthetic
    Trainer(_cfg(root, tmp_path, stop_after=5), progress=False).fit()
    with pytest.raises(CircuitSAEError, match="different training command"):
        Trainer(_cfg(root, tmp_path, coefficients=(1.0,)), progress=False).fit()


def test_saved_sae_takes_raw_activations(synthetic, tmp_path):
    """The input scale is folded in at save: the saved SAE reconstructs raw x as in training."""
    root, _ = synthetic
    saes = train(
        store=str(root),
        out=str(tmp_path),
        arch=("gated",),
        coefficients=(3.0,),
        expansion=2,
        batch_size=256,
        lr=3e-3,
        progress=False,
    )
    sae = load_dictionary(tmp_path / "resid.0-gated-c3")
    x = ActivationStore(root).activations("resid.0")
    assert sae.meta["input_scale"] != pytest.approx(1.0, abs=0.05)
    with torch.no_grad():
        fvu = float((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(saes["resid.0-gated-c3"].meta["metrics"]["fvu"], rel=1e-4) and fvu < 0.5


def test_divergence_stops_and_keeps_the_last_good_checkpoint(synthetic, tmp_path):
    root, _ = synthetic
    cfg = _cfg(
        root, tmp_path, arch=("relu",), coefficients=(1.0,), lr=1e38, lr_warmup=0.5, checkpoint_every=1, log_every=1
    )
    with pytest.raises(TrainingDiverged, match=r"lower the learning rate \(--lr, now 1e\+38\)") as err:
        Trainer(cfg, progress=False).fit()
    bad_step = int(str(err.value).split(" at step ")[1].split()[0].rstrip(";"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == bad_step - 1 and f"(step {bad_step - 1}) is kept" in str(err.value)
    assert all(torch.isfinite(v).all() for v in state["runs"][0]["sae"].values())


def test_non_finite_activations_name_the_shard_and_row(tmp_path):
    x = torch.randn(300, 8)
    x[211, 3] = float("nan")
    store_from_tensors(tmp_path / "acts", {"resid.0": x}, shard_rows=100)
    with pytest.raises(CircuitSAEError, match=r"train-00002\.resid\.0\.npy at row 11"):
        train(store=str(tmp_path / "acts"), out=str(tmp_path / "o"), batch_size=32, progress=False)


def test_bad_training_input(tmp_path, synthetic):
    root, _ = synthetic
    store_from_tensors(tmp_path / "small", {"resid.0": torch.randn(10, 8)})
    with pytest.raises(CircuitSAEError, match="fewer than one batch"):
        train(store=str(tmp_path / "small"), out=str(tmp_path / "o"), progress=False)
    with pytest.raises(CircuitSAEError, match="site resid.7 is not in store"):
        train(store=str(root), out=str(tmp_path / "o"), sites=("resid.7",), progress=False)
    with pytest.raises(CircuitSAEError, match="unknown architecture"):
        TrainConfig(arch=("wavelet",))
    with pytest.raises(CircuitSAEError, match="coefficients must be >= 0"):
        TrainConfig(coefficients=(-1.0,))


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_bf16_autocast_step_matches_float32_gradients(arch):
    """Under autocast the loss goes through plain autograd (the hand-written backward is float32 only)."""
    from circuitsae.dictionaries import GatedSAE, ReluSAE

    torch.manual_seed(0)
    sae = ReluSAE(32, 64, tied=False, decoder_bias=True) if arch == "relu" else GatedSAE(32, 64)
    x, _ = sparse_data(512)
    x = x * (32 / x.pow(2).sum(-1).mean()).sqrt()
    sae.loss(x, 1.0).total.backward()
    want = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sae.loss(x, 1.0)
    assert float(loss.mse.detach()) != pytest.approx(float(sae.loss_reference(x, 1.0).mse.detach()), rel=1e-7)
    loss.total.backward()
    for n, p in sae.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        err = float((p.grad - want[n]).norm() / want[n].norm().clamp_min(1e-12))
        assert err < 0.05, f"{n}: relative gradient error {err:.3f} under bf16 autocast"


def test_bf16_autocast_training_on_the_cpu_gives_the_float32_result(synthetic, tmp_path):
    """The autocast path (chosen by device type, so it runs here): same SAEs as float32 within bf16 noise."""
    root, feats = synthetic
    common = dict(store=str(root), arch=("relu", "gated"), coefficients=(1.0,), expansion=2, batch_size=256,
                  lr=3e-3, epochs=2, device="cpu", progress=False)  # fmt: skip
    f32 = train(out=str(tmp_path / "f32"), autocast=False, **common)
    bf16 = train(out=str(tmp_path / "bf16"), autocast=True, **common)
    for name, sae in bf16.items():
        assert sae.W_dec.dtype == torch.float32  # weights (and Adam moments) stay float32 under autocast
        same = (sae.directions * f32[name].directions).sum(-1).detach()
        assert float(same.median()) > 0.99, f"{name}: features moved under autocast"
        assert sae.meta["metrics"]["fvu"] == pytest.approx(f32[name].meta["metrics"]["fvu"], rel=0.05)
    assert (bf16["resid.0-relu-c1"].directions @ feats.T).max(0).values.mean() >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_path(synthetic, tmp_path):
    """On a real GPU (pytest --device cuda on a GPU machine): bf16 autocast by default, results on the GPU."""
    root, feats = synthetic
    saes = train(
        store=str(root),
        out=str(tmp_path),
        arch=("relu", "gated"),
        coefficients=(1.0,),
        expansion=2,
        batch_size=256,
        lr=3e-3,
        epochs=2,
        device="cuda",
        progress=False,
    )
    for sae in saes.values():
        assert sae.W_dec.device.type == "cuda"  # returned on the training device, saved from there
        assert sae.meta["metrics"]["fvu"] < 0.5


def test_killed_training_process_resumes_to_the_same_result(synthetic, tmp_path):
    """SIGKILL a real `circuitsae train` once it has checkpointed; the re-run finishes identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _ = synthetic
    argv = [
        "--store",
        str(root),
        "--arch",
        "relu",
        "gated",
        "--expansion",
        "2",
        "--batch-size",
        "256",
        "--epochs",
        "2",
        "--checkpoint-every",
        "20",
        "--device",  # kill and resume are the point here; devices are test_devices.py's
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuitsae", "train", *argv, "--out", str(tmp_path / "k")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (tmp_path / "k" / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < killed_at < 2 * 195  # a mid-run checkpoint (195 batches per epoch)
    same = dict(store=str(root), arch=("relu", "gated"), expansion=2, batch_size=256, epochs=2, checkpoint_every=20,
                device="cpu")  # fmt: skip
    resumed = train(out=str(tmp_path / "k"), progress=False, **same)
    full = train(out=str(tmp_path / "f"), progress=False, **same)
    for name in full:
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_default_resampling_needs_a_long_enough_window(synthetic, tmp_path):
    root, _ = synthetic
    short = Trainer(TrainConfig(store=str(root), out=str(tmp_path / "a"), batch_size=1024), progress=False)
    assert short.total_steps == 48 and short.resample_every is None and short.dead_window == 12
    long = Trainer(TrainConfig(store=str(root), out=str(tmp_path / "b"), batch_size=128), progress=False)
    assert long.total_steps == 390 and long.resample_every == long.dead_window == 97
    never = Trainer(
        TrainConfig(store=str(root), out=str(tmp_path / "c"), batch_size=128, resample_every=-1), progress=False
    )
    assert never.resample_every is None and never.dead_window == 97


@pytest.mark.parametrize(
    "arch, coefficient, lr, max_l0",
    [("topk", 3, 3e-3, 3.0), ("batchtopk", 3, 3e-3, 5.0), ("jumprelu", 0.3, 1e-3, 6.0)],
)
def test_later_architectures_recover_known_sparse_features(synthetic, tmp_path, arch, coefficient, lr, max_l0):
    """TopK, BatchTopK and JumpReLU (REFERENCE §2b) find the ground-truth directions, at about the true L0 of 3."""
    root, feats = synthetic
    saved = train(store=str(root), out=str(tmp_path), arch=(arch,), coefficients=(coefficient,), expansion=2,
                  batch_size=256, lr=lr, epochs=2, progress=False)  # fmt: skip
    sae = saved[f"resid.0-{arch}-c{coefficient:g}"]
    mmcs = (sae.directions.cpu() @ feats.T).max(0).values.mean()
    m = sae.meta["metrics"]
    assert mmcs >= 0.9 and m["fvu"] < 0.2 and m["l0"] <= max_l0, (float(mmcs), m)


def test_every_architecture_trains_in_one_pass_and_resumes_exactly(synthetic, tmp_path):
    """Five architectures in one pass; a stop and resume (BatchTopK's θ, JumpReLU's optimiser groups, TopK's
    dead-latent mask all rebuilt) gives the uninterrupted result bit for bit."""
    root, _ = synthetic
    archs = ("relu", "gated", "topk", "batchtopk", "jumprelu")
    common = dict(store=str(root), arch=archs, coefficients=(4.0,), expansion=1, batch_size=512, checkpoint_every=10)
    full = Trainer(TrainConfig(out=str(tmp_path / "full"), **common), progress=False).fit()
    assert Trainer(TrainConfig(out=str(tmp_path / "cut"), stop_after=40, **common), progress=False).fit() == {}
    resumed = Trainer(TrainConfig(out=str(tmp_path / "cut"), **common), progress=False).fit()
    assert sorted(full) == sorted(f"resid.0-{a}-c4" for a in archs)
    for name in full:
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert float(full["resid.0-batchtopk-c4"].threshold) > 0
    summary = json.loads((tmp_path / "full" / "train.json").read_text())
    assert summary["runs"]["resid.0-topk-c4"]["l0"] <= 4 + 1e-6


def test_k_must_be_a_whole_number_within_the_dictionary(synthetic, tmp_path):
    root, _ = synthetic
    with pytest.raises(CircuitSAEError, match="the coefficient is k"):
        Trainer(TrainConfig(store=str(root), out=str(tmp_path), arch=("topk",), coefficients=(2.5,)), progress=False)
    with pytest.raises(CircuitSAEError, match="more than the 32 features"):
        Trainer(TrainConfig(store=str(root), out=str(tmp_path), arch=("topk",), coefficients=(33,), expansion=1),
                progress=False)  # fmt: skip


def test_per_architecture_coefficients_share_one_pass(synthetic, tmp_path):
    from circuitsae.training.trainer import plan_runs

    root, _ = synthetic
    cfg = TrainConfig(store=str(root), out=str(tmp_path), arch=("relu", "topk", "jumprelu"), coefficients=(0.5, 2),
                      arch_coefficients=("topk=4,8",))  # fmt: skip
    assert plan_runs(cfg, ActivationStore(root)) == [
        ("resid.0", "relu", 0.5), ("resid.0", "relu", 2.0), ("resid.0", "topk", 4.0), ("resid.0", "topk", 8.0),
        ("resid.0", "jumprelu", 0.5), ("resid.0", "jumprelu", 2.0),
    ]  # fmt: skip
    assert TrainConfig(store="s").fingerprint() == TrainConfig(store="s", arch_coefficients=()).fingerprint()
    with pytest.raises(CircuitSAEError, match="not among the architectures trained"):
        TrainConfig(store=str(root), arch=("relu",), arch_coefficients=("topk=4",))
    with pytest.raises(CircuitSAEError, match="write ARCH=C1,C2"):
        TrainConfig(store=str(root), arch=("topk",), arch_coefficients=("topk:4",))
