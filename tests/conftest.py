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
