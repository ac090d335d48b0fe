import os
import random

import numpy as np
import pytest
import torch

# Tests never touch the network: an unknown model id must fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import circuitsae  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models():
    """One instance of each tiny architecture, loaded once."""
    return {name: circuitsae.load_model(name, device="cpu") for name in ("tiny-llama", "tiny-gpt2", "tiny-neox")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="session")
def smollm2():
    return circuitsae.load_model("smollm2-135m", device="cpu")


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
    from circuitsae.dictionaries import unit_rows
    from circuitsae.harvest import harvest

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
