"""The architecture registry: a new architecture is one class and one ``register`` call.

The toy below is defined here, registered once, and then goes everywhere the built-in ones go — the
trainer, ``load_dictionary``, ``circuitsae convert`` (to circuitsae's format and to SAE Lens), feature
patching — with no other file touched. The fixture unregisters it, so other tests see the built-in list.
"""

import json
from typing import ClassVar

import pytest
import torch

import circuitsae
from circuitsae import CircuitSAEError
from circuitsae.commands.convert import ConvertConfig, convert
from circuitsae.data.store import store_from_tensors
from circuitsae.dictionaries import (
    BatchTopKSAE,
    GatedSAE,
    IdentityDictionary,
    JumpReLUSAE,
    PCADictionary,
    ReluSAE,
    TopKSAE,
    TrainableDictionary,
    TrainingDefaults,
    load_dictionary,
    registry,
)
from circuitsae.interventions.patching import patch_features
from circuitsae.training.trainer import TrainConfig, train

D = 64  # the tiny models' width, so the trained toy can be patched into one


class ToyReluSAE(ReluSAE):
    """A ReLU SAE under its own name, with its own training defaults (and ReLU's SAE Lens form, ``standard``)."""

    architecture: ClassVar[str] = "toyrelu"
    training: ClassVar[TrainingDefaults] = TrainingDefaults(lr=2e-3, betas=(0.8, 0.99), coefficient=0.25)


@pytest.fixture
def toy():
    registry.register(ToyReluSAE)
    try:
        yield ToyReluSAE
    finally:
        registry.unregister("toyrelu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(48, D, generator=g), dim=1)
    active = torch.rand(6000, 48, generator=g) < 4 / 48
    x = (active * (torch.rand(6000, 48, generator=g) + 0.5)) @ feats
    root = tmp_path_factory.mktemp("toy") / "acts"
    store_from_tensors(root, {"resid.1": x[:5000]}, {"resid.1": x[5000:]}, model="tiny-llama")
    return root


def test_the_builtin_list_is_explicit_and_ordered():
    assert registry.names() == ("relu", "gated", "topk", "batchtopk", "jumprelu", "pca", "identity")
    assert [c.architecture for c in registry.trainable()] == ["relu", "gated", "topk", "batchtopk", "jumprelu"]
    assert registry.classes() == (ReluSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, PCADictionary,
                                  IdentityDictionary)  # fmt: skip
    assert all(issubclass(c, TrainableDictionary) for c in registry.trainable())
    # what the trainer read from its tables before: the same numbers, now declared on the classes
    got = {c.architecture: (c.training, c.resamples_dead) for c in registry.trainable()}
    assert got == {
        "relu": (TrainingDefaults(1e-3, (0.9, 0.999), 1.0), True),
        "gated": (TrainingDefaults(3e-4, (0.0, 0.999), 2.0), True),
        "topk": (TrainingDefaults(5e-4, (0.9, 0.999), 64.0, k=True), False),
        "batchtopk": (TrainingDefaults(5e-4, (0.9, 0.999), 64.0, k=True), False),
        "jumprelu": (TrainingDefaults(3e-4, (0.0, 0.999), 0.3), False),
    }
    assert registry.read_names("saelens") == ("standard", "gated", "topk", "jumprelu")
    assert tuple(registry.SAELENS_WRITES) == ("standard", "gated", "jumprelu", "topk")
    assert registry.reader("dictionary_learning", "MatryoshkaBatchTopKSAE") is BatchTopKSAE
    assert registry.reader("sparsify", "topk") is TopKSAE


def test_register_refuses_a_taken_name_and_builtins_stay(toy):
    with pytest.raises(CircuitSAEError, match="'toyrelu' is registered already"):
        registry.register(toy)
    with pytest.raises(CircuitSAEError, match="built in"):
        registry.unregister("relu")
    with pytest.raises(CircuitSAEError, match="unknown architecture 'nope'"):
        registry.get("nope")


def test_unregistered_toy_is_unknown_everywhere(store, tmp_path):
    assert "toyrelu" not in registry.names()
    with pytest.raises(CircuitSAEError, match="unknown architecture"):
        TrainConfig(store=str(store), arch=("toyrelu",))


def test_a_registered_toy_trains_saves_loads_converts_and_patches(toy, store, tmp_path):
    # -- trains, with its own defaults (no coefficient or lr given) --------------------------------------
    out = tmp_path / "saes"
    saved = train(store=str(store), out=str(out), arch=("toyrelu",), expansion=2, batch_size=256, epochs=3,
                  log_every=1, progress=False, device="cpu")  # fmt: skip
    assert list(saved) == ["resid.1-toyrelu-c0.25"]
    sae = saved["resid.1-toyrelu-c0.25"]
    assert type(sae) is toy and sae.d_dict == 2 * D
    training = sae.meta["training"]
    assert (training["coefficient"], training["lr"], training["betas"]) == (0.25, 2e-3, [0.8, 0.99])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) >= 50 and losses[-1] < 0.5 * losses[0]  # the loss falls
    assert sae.meta["metrics"]["fvu"] < 0.5

    # -- saves and loads ---------------------------------------------------------------------------------
    folder = out / "resid.1-toyrelu-c0.25"
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "toyrelu"
    back = load_dictionary(folder)
    assert type(back) is toy and back.config() == sae.config() and back.meta == json.loads(json.dumps(sae.meta))
    x = torch.randn(100, D)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x).x_hat, sae(x).x_hat)

    # -- converts: to circuitsae's format (the same bytes) and to SAE Lens (as standard, and back) ------------
    to_ours, _ = convert(ConvertConfig(source=str(folder), out=str(tmp_path / "ours"), to="circuitsae"))
    for name in ("sae.safetensors", "cfg.json"):
        assert (to_ours / name).read_bytes() == (folder / name).read_bytes()
    assert toy.saelens_writes == ("standard",)
    to_lens, _ = convert(ConvertConfig(source=str(folder), out=str(tmp_path / "lens"), to="saelens"))
    cfg = json.loads((to_lens / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["metadata"]["circuitsae"]["architecture"] == "toyrelu"
    from_lens = load_dictionary(to_lens)
    assert type(from_lens) is toy and from_lens.config() == sae.config()  # the file named its class
    assert torch.equal(from_lens.encode(x), sae.encode(x))
    assert torch.equal(from_lens.decode(from_lens.encode(x)), sae.decode(sae.encode(x)))
    assert from_lens.meta["site"] == "resid.1"
    registry.unregister("toyrelu")  # without the toy the same file is read as the ReLU SAE it also is
    try:
        as_relu = load_dictionary(to_lens)
        assert type(as_relu) is ReluSAE and torch.equal(as_relu.encode(x), sae.encode(x))
    finally:
        registry.register(toy)

    # -- patches: nothing patched is the base run; patched features move it ----------------------------------
    model = circuitsae.load_model("tiny-llama", device="cpu", dtype="float64")
    d = back.double()
    d.meta["first_position"] = 1
    g = torch.Generator().manual_seed(0)
    base = torch.randint(100, 5000, (3, 7), generator=g)
    base[:, 0] = 1
    target = base.clone()
    target[:, 3] = torch.randint(100, 5000, (3,), generator=g)
    none = patch_features(model, d, "resid.1", base, target, [])
    with model.trace(base):
        logits = model.output.logits.save()
    torch.testing.assert_close(none.logits, logits[:, -1], rtol=0, atol=1e-10)
    assert none.edit_magnitude == 0.0
    some = patch_features(model, d, "resid.1", base, target, "all")
    assert some.edit_magnitude > 0 and not torch.equal(some.logits, none.logits)
