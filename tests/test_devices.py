"""Every path a GPU user takes, driven on the fake CUDA device (tests/fake_cuda.py) and compared with the CPU.

The fake device applies CUDA's device rules to every tensor the library creates or meets, and keeps the CPU's
values, so each test asserts two things: nothing mixes devices (a real GPU would raise), and the answer is the
CPU's. Each test here failed before the library chose one device and made every tensor there.
"""

import copy
import dataclasses
import json

import pytest
import torch

import circuitsae
from circuitsae import CircuitSAEError
from circuitsae.circuits.acdc import acdc
from circuitsae.commands.cli import main
from circuitsae.data.store import store_from_tensors
from circuitsae.dictionaries import load_dictionary
from circuitsae.training.trainer import TrainConfig, Trainer, train

from fake_cuda import FakeCuda, fake_cuda

SITE = "resid.1"


def _on_cuda(t: torch.Tensor) -> bool:
    return isinstance(t, FakeCuda) and t.device.type == "cuda"


@pytest.fixture(scope="module")
def ioi(tiny_llama):
    return circuitsae.make_ioi(tiny_llama, n=4, seed=0)


@pytest.fixture
def saved_sae(tmp_path, wired):
    """A dictionary as a user has it: saved, then loaded with load_dictionary (on the CPU)."""
    _, dicts = wired
    path = dicts["resid.1"].save(tmp_path / "resid.1-relu")
    return path


def _cuda_model():
    """tiny-llama loaded the way a GPU user loads it (inside fake_cuda), in float32 to compare exactly."""
    return circuitsae.load_model("tiny-llama", device="cuda", dtype="float32")


def test_load_model_on_cuda_defaults_to_bfloat16_and_puts_everything_there():
    with fake_cuda():
        lm = circuitsae.load_model("tiny-llama", device="cuda")
        params = list(lm._module.parameters())
        assert all(_on_cuda(p) for p in params) and {p.dtype for p in params} == {torch.bfloat16}
    assert circuitsae.models.default_dtype("cpu") is torch.float32


def test_a_gpu_without_bfloat16_defaults_to_float16_but_never_for_gemma():
    with fake_cuda():
        bf16, torch.cuda.is_bf16_supported = torch.cuda.is_bf16_supported, lambda *a, **k: False  # a T4, say
        try:
            default = circuitsae.models.default_dtype
            assert default("cuda", "llama") is torch.float16 and default("cuda", "qwen2") is torch.float16
            assert default("cuda", "gemma3_text") is torch.float32 and default("cuda", "gemma2") is torch.float32
            lm = circuitsae.load_model("tiny-gemma3", device="cuda")
            assert {p.dtype for p in lm._module.parameters()} == {torch.float32}
        finally:
            torch.cuda.is_bf16_supported = bf16  # the fake's own, which fake_cuda() restores on leaving


def test_patch_features_with_a_cpu_dictionary_on_a_cuda_model(tiny_llama, ioi, saved_sae):
    feats = list(range(0, 16, 3))
    want = circuitsae.patch_features(tiny_llama, load_dictionary(saved_sae), SITE, ioi.base, ioi.target, feats,
                                     lengths=ioi.lengths)  # fmt: skip
    with fake_cuda():
        lm, sae = _cuda_model(), load_dictionary(saved_sae)
        got = circuitsae.patch_features(lm, sae, SITE, ioi.base, ioi.target, feats, lengths=ioi.lengths)
        assert _on_cuda(sae.W_dec) and _on_cuda(got.logits)  # moved to the site's device
        logits = got.logits.cpu()
    assert got.kl == pytest.approx(want.kl, rel=1e-5, abs=1e-7)
    assert got.edit_magnitude == pytest.approx(want.edit_magnitude, rel=1e-5)
    torch.testing.assert_close(logits, want.logits.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["downstream", "hook"])
@pytest.mark.parametrize("order", ["acdc", "attribution"])
def test_acdc_on_cuda_equals_the_cpu(tiny_llama, ioi, saved_sae, engine, order):
    kw = dict(thresholds=[1e-4, 1e-2], engine=engine, order=order, progress=False)
    want = acdc(tiny_llama, load_dictionary(saved_sae), SITE, ioi, **kw)
    with fake_cuda():
        # the dictionary put on the GPU by the user: the masks, positions and indices acdc builds must follow it
        got = acdc(_cuda_model(), load_dictionary(saved_sae).to("cuda"), SITE, ioi, **kw)
    assert got.engine == want.engine == engine
    assert got.order == want.order and got.removed_at == want.removed_at
    for a, b in zip(got.records, want.records):
        assert a["n_features"] == b["n_features"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6)
        assert a["logit_diff"] == pytest.approx(b["logit_diff"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("engine", ["downstream", "hook"])
def test_evaluators_build_positions_masks_and_indices_on_the_device(tiny_llama, ioi, saved_sae, engine):
    """Both evaluators, handed deltas that live on the GPU: state runs, windowed removals, updates, gradients."""
    from circuitsae.interventions.patching import feature_deltas
    from circuitsae.interventions.replay import make_evaluator

    fd = feature_deltas(tiny_llama, load_dictionary(saved_sae), SITE, ioi.base, ioi.target, lengths=ioi.lengths)
    k = fd.n_candidates
    removals = [torch.tensor([0]), torch.tensor([1, 2]), torch.arange(k)]

    def exercise(model, deltas):
        ev = make_evaluator(model, deltas, ioi.base, engine)
        full = ev.set_state(torch.ones(k, dtype=torch.bool))
        per_prompt = ev.without_per_prompt(removals)
        grad = ev.gradient(torch.ones(k, dtype=torch.bool))
        ev.remove([0, 2])
        after = ev.state()
        return ev.name, full["kl"], per_prompt, grad.cpu(), after["kl"], after["logits"].cpu()

    want = exercise(tiny_llama, fd)
    with fake_cuda():
        lm = _cuda_model()
        moved = {f: getattr(fd, f).to("cuda") for f in ("delta", "directions", "x_base", "target_logits", "base_logits",
                                                            "mask")}  # fmt: skip
        got = exercise(lm, dataclasses.replace(fd, **moved))
    assert got[0] == want[0] == engine
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_causal_tree_on_cuda_equals_the_cpu(tiny_llama, wired, fast, monkeypatch):
    store, dicts = wired
    if not fast:
        monkeypatch.setattr("circuitsae.circuits.trees.Blocks.supports", staticmethod(lambda m, s: False))
    kw = dict(depth=2, branching=2, contexts=4, store=store, progress=False)
    want = circuitsae.causal_tree(tiny_llama, dicts, ("resid.2", 7), **kw)
    dicts = copy.deepcopy(dicts)  # the fixture's stay on the CPU
    with fake_cuda():
        got = circuitsae.causal_tree(_cuda_model(), dicts, ("resid.2", 7), **kw)
        assert all(_on_cuda(d.W_dec) for d in dicts.values())
    assert got.engines == want.engines
    assert sorted(got.edges) == sorted(want.edges)
    for u, v, e in want.edges(data=True):
        assert got.edges[u, v]["effect"] == pytest.approx(e["effect"], rel=1e-4, abs=1e-6)


def test_pca_fits_where_its_activations_are():
    x = torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    want = circuitsae.PCADictionary.fit(x)
    with fake_cuda():
        got = circuitsae.PCADictionary.fit(x.cuda())
    assert got.W_dec.device.type == "cpu"  # a fresh dictionary, like every other; placed when used
    torch.testing.assert_close(got.explained_variance, want.explained_variance)


def test_store_batches_arrive_on_the_device(wired):
    store, _ = wired
    want = list(store.batches("resid.0", 64, seed=3))
    with fake_cuda():
        got = list(store.batches("resid.0", 64, seed=3, device="cuda"))
        assert all(_on_cuda(b) for b in got)
        got = [b.cpu() for b in got]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_harvest_and_evaluate_on_cuda_equal_the_cpu(tiny_llama, tmp_path, saved_sae, wired):
    kw = dict(sites=("resid.1",), tokens=120, ctx_len=16, batch_size=4, shard_contexts=4, corpus="sotu",
              dtype="float32", progress=False)  # fmt: skip
    a = circuitsae.harvest(model=tiny_llama, out=str(tmp_path / "cpu"), **kw)
    want = circuitsae.evaluate(dictionaries=(str(saved_sae),), model=tiny_llama, out=str(tmp_path / "a.json"),
                               contexts=4, progress=False).results  # fmt: skip
    with fake_cuda():
        lm = _cuda_model()
        b = circuitsae.harvest(model=lm, out=str(tmp_path / "cuda"), **kw)
        got = circuitsae.evaluate(dictionaries=(str(saved_sae),), model=lm, out=str(tmp_path / "b.json"),
                                  contexts=4, progress=False).results  # fmt: skip
    torch.testing.assert_close(b.activations("resid.1", "train"), a.activations("resid.1", "train"))
    (name,) = want
    for k in ("l0", "fvu", "gamma", "ce_clean", "ce_spliced", "loss_recovered", "kl"):
        assert getattr(got[name], k) == pytest.approx(getattr(want[name], k), rel=1e-4, abs=1e-6), k


def test_public_api_with_a_cuda_model(tiny_llama, wired, saved_sae, ioi):
    store, _ = wired
    ids = ioi.base[:2]
    want = circuitsae.run_spliced(tiny_llama, ids, {SITE: load_dictionary(saved_sae)})
    report_want = circuitsae.analyse_feature(tiny_llama, load_dictionary(saved_sae), store, 3, k=3, progress=False)
    with fake_cuda():
        lm = _cuda_model()
        got = circuitsae.run_spliced(lm, ids, {SITE: load_dictionary(saved_sae)}).cpu()
        report = circuitsae.analyse_feature(lm, load_dictionary(saved_sae), store, 3, k=3, progress=False)
        meta = load_dictionary(saved_sae).to("meta")
        with pytest.raises(CircuitSAEError, match="meta device.*cuda") as err:
            circuitsae.patch_features(lm, meta, SITE, ioi.base, ioi.target, [1])
        assert "\n" not in str(err.value)
    torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5)
    assert [t for t, _ in report.logit_effect["down"]] == [t for t, _ in report_want.logit_effect["down"]]
    assert [t for t, _ in report.unembed["top"]] == [t for t, _ in report_want.unembed["top"]]


def test_ioi_command_on_a_gpu_machine(tiny_llama, saved_sae, tmp_path, capsys):
    """`circuitsae ioi --device cuda`: the model goes to the GPU, the dictionaries and the PCA baseline too."""
    argv = ["ioi", str(saved_sae), "--device", "cuda", "--model-dtype", "float32", "--prompts", "4",
            "--thresholds", "2", "--no-acdc-dense", "--out", str(tmp_path / "ioi")]  # fmt: skip
    with fake_cuda():
        code = main(argv)
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ioi" / "kl_vs_patches.json").read_text())
    assert report["device"] == "cuda:0" and report["model_dtype"] == "float32"
    assert {r["label"] for r in report["results"]} >= {"PCA"}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    x = ((torch.rand(3072, 16, generator=g) < 0.15) * torch.rand(3072, 16, generator=g)) @ feats
    root = tmp_path_factory.mktemp("small") / "acts"
    store_from_tensors(root, {"resid.0": x[:2560]}, {"resid.0": x[2560:]})
    return root


def _train_cfg(root, out, **kw):
    return dict(store=str(root), out=str(out), arch=("relu", "gated"), coefficients=(1.0,), expansion=2,
                batch_size=64, lr=3e-3, checkpoint_every=10, resample_every=15, progress=False, **kw)  # fmt: skip


def test_training_on_cuda_resumes_and_equals_the_cpu(small_store, tmp_path):
    """Stop on the GPU, resume on the GPU: the same SAEs as one CPU run; returned on the training device."""
    want = train(**_train_cfg(small_store, tmp_path / "cpu", device="cpu"))
    with fake_cuda():
        assert train(**_train_cfg(small_store, tmp_path / "cuda", device="cuda", autocast=False, stop_after=25)) == {}
        got = train(**_train_cfg(small_store, tmp_path / "cuda", device="cuda", autocast=False))
        assert all(_on_cuda(s.W_dec) for s in got.values())  # held-out metrics were computed there
        got = {k: {n: t.cpu() for n, t in s.state_dict().items()} | {"meta": s.meta["metrics"]} for k, s in got.items()}
    for name, sae in want.items():
        for n, t in sae.state_dict().items():
            torch.testing.assert_close(got[name][n], t.cpu(), rtol=1e-5, atol=1e-6)
        assert got[name]["meta"]["fvu"] == pytest.approx(sae.meta["metrics"]["fvu"], rel=1e-4)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_a_checkpoint_resumes_on_another_device(small_store, tmp_path):
    """The resume bug: the checkpoint's RNG state must stay on the CPU whatever the training device.

    ``meta`` stands for "another device" here (it has no values, which this check does not need): reading
    the checkpoint straight onto the training device put the generator's state there, and
    ``Generator.set_state`` refused it.
    """
    cfg = _train_cfg(small_store, tmp_path / "ck", stop_after=10)
    assert train(**cfg) == {}
    trainer = Trainer(TrainConfig(**{k: v for k, v in cfg.items() if k != "progress"} | {"device": "meta"}))
    assert trainer.load_checkpoint() and trainer.step_count == 10
    assert all(r.generator.device.type == "cpu" for r in trainer.runs)
    assert all(p.device.type == "meta" for r in trainer.runs for p in r.sae.parameters())
