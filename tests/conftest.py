"""Shared fixtures, and the device the suite runs on.

``pytest --device cpu`` (the default) runs everything on the CPU, GPUs hidden, so the suite means the same on
every machine. ``pytest --device cuda`` runs the same suite on a GPU: the models load there (in float32, as on
the CPU, unless a test asks for another dtype) and the library's defaults pick the GPU too.
``pytest --device fake-cuda`` runs it on the fake CUDA device of tests/fake_cuda.py (CUDA's device rules, the
CPU's values): what a GPU run would reveal about devices, on a machine without one.
"""

import os
import random

import numpy as np
import pytest
import torch

# Tests never touch the network: an unknown model id must fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import circuitsae  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "fake-cuda"),
        help="device the suite runs on: cpu (default, GPUs hidden), cuda (a real GPU), fake-cuda (tests/fake_cuda.py)",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA: the defaults pick the CPU
    elif config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA GPU is available here (--device fake-cuda runs without one)")


@pytest.fixture(scope="session", autouse=True)
def _session_device(request):
    """With --device fake-cuda, the whole session runs inside the fake CUDA device."""
    if request.config.getoption("--device") != "fake-cuda":
        yield
        return
    from fake_cuda import fake_cuda

    with fake_cuda():
        yield


@pytest.fixture(scope="session")
def device(request) -> str:
    """The device models are loaded on: ``"cpu"`` or ``"cuda"`` (the fake device says cuda too)."""
    return "cpu" if request.config.getoption("--device") == "cpu" else "cuda"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(device):
    """One instance of each tiny architecture, loaded once (float32 on the suite's device)."""
    return {
        name: circuitsae.load_model(name, device=device, dtype="float32")
        for name in ("tiny-llama", "tiny-gpt2", "tiny-neox")
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="session")
def smollm2(device):
    return circuitsae.load_model("smollm2-135m", device=device, dtype="float32")


@pytest.fixture
def text_corpus(tmp_path):
    """A folder of 12 small, distinct real-ish documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    words = (
        "the state of the union is strong and the people are free to speak their minds "
        "while markets rose sharply in london as investors welcomed the news from the bank"
    ).split()
    rng = random.Random(1)
    for i in range(12):
        text = f"Document {i}. " + " ".join(rng.choice(words) for _ in range(300))
        (root / f"doc{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def wired(tiny_llama, tmp_path_factory):
    """A tiny-llama store at resid.0-2 and ReLU dictionaries wired along one direction u.

    u is the mean resid.0 direction (u·x > 0 at most tokens). Feature 5 at
    resid.0, feature 3 at resid.1 and feature 7 at resid.2 all have direction u;
    every other resid.0 direction is orthogonal to u, so ablating resid.0:5
    is the one edit that lowers u·x directly: it drives resid.1:3.
    """
    from circuitsae.data.harvest import harvest
    from circuitsae.dictionaries import unit_rows

    root = tmp_path_factory.mktemp("wired") / "store"
    store = harvest(
        model=tiny_llama, sites=("resid.0", "resid.1", "resid.2"), tokens=400, ctx_len=16, batch_size=8,
        shard_contexts=16, corpus="sotu", heldout_fraction=0.1, out=str(root), progress=False, dtype="float32",
    )  # fmt: skip
    u = unit_rows(store.activations("resid.0", "train").mean(0, keepdim=True))[0]
    g = torch.Generator().manual_seed(0)

    def sae(site, n, feature):
        rows = unit_rows(torch.randn(n, 64, generator=g))
        if site == "resid.0":
            rows = unit_rows(rows - (rows @ u)[:, None] * u)
        rows[feature] = u
        d = circuitsae.ReluSAE(64, n)
        with torch.no_grad():
            d.W_dec.copy_(rows)
        d.meta = {"site": site, "model": "tiny-llama", "first_position": 1, "store": str(root)}
        return d

    dicts = {"resid.0": sae("resid.0", 32, 5), "resid.1": sae("resid.1", 16, 3), "resid.2": sae("resid.2", 16, 7)}
    return store, dicts


#: the end-to-end demo on the tiny model (tests/test_demo.py, tests/test_report_browser.py)
TINY_DEMO = dict(model="tiny-llama", sites=("resid.0", "resid.1"), tokens=3000, ioi_prompts=4, ioi_thresholds=4,
                 tree_contexts=5, branching=2, model_dtype="float32")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, device):
    """One run of the tiny demo for every test that reads its output: (folder, summary)."""
    from circuitsae.commands.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=str(out), progress=False, device=device, **TINY_DEMO)


@pytest.fixture(scope="session")
def random_store(tmp_path_factory):
    """``random_store(name, train_rows, heldout_rows, d)``: the folder of a store of seeded Gaussian activations
    at ``resid.0`` (the bad-input tests' small stores)."""

    def make(name: str, train_rows: int, heldout_rows: int, d: int):
        from circuitsae.data.store import store_from_tensors

        root = tmp_path_factory.mktemp(name) / "store"
        x = torch.randn(train_rows + heldout_rows, d, generator=torch.Generator().manual_seed(0))
        store_from_tensors(root, {"resid.0": x[:train_rows]}, {"resid.0": x[train_rows:]})
        return root

    return make
