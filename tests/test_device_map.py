"""Models that do not fit one device: ``load_model(..., device_map=...)`` with blocks offloaded to CPU and disk.

Offloaded weights sit on the ``meta`` device until accelerate brings them in for their block, so "the model's
device" is no longer one thing: dictionaries go where the module at their site runs, ids where the embeddings run.
"""

import pytest
import torch

import circuitsae
from circuitsae import CircuitSAEError
from circuitsae.circuits.acdc import acdc
from circuitsae.interventions.splice import site_device

MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
    "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}  # fmt: skip


@pytest.fixture(scope="module")
def offloaded():
    return circuitsae.load_model("tiny-llama", device_map=MAP)  # disk offload files go under the cache folder


@pytest.fixture(scope="module")
def ioi(tiny_llama):
    return circuitsae.make_ioi(tiny_llama, n=4, seed=0)


def _sae(site):
    torch.manual_seed(0)
    d = circuitsae.ReluSAE(64, 32)
    d.meta = {"site": site, "model": "tiny-llama", "first_position": 1}
    return d


def test_offloaded_blocks_live_on_meta_and_run_on_the_cpu(offloaded):
    hf = offloaded._module
    assert hf.hf_device_map["model.layers.1"] == "disk"
    assert {p.device.type for n, p in hf.named_parameters() if n.startswith("model.layers.1.")} == {"meta"}
    assert site_device(offloaded, "resid.1") == torch.device("cpu")  # the execution device, not meta
    assert site_device(offloaded, "mlp.3") == torch.device("cpu")


def test_everything_equals_the_model_on_one_device(offloaded, tiny_llama, ioi, tmp_path):
    sae = _sae("resid.1")
    one = circuitsae.run_spliced(tiny_llama, ioi.base, {"resid.1": sae}).cpu()  # the suite's device
    torch.testing.assert_close(circuitsae.run_spliced(offloaded, ioi.base, {"resid.1": sae}), one)
    a = circuitsae.patch_features(tiny_llama, sae, "resid.1", ioi.base, ioi.target, [1, 2, 3], lengths=ioi.lengths)
    b = circuitsae.patch_features(offloaded, sae, "resid.1", ioi.base, ioi.target, [1, 2, 3], lengths=ioi.lengths)
    assert b.kl == pytest.approx(a.kl) and b.edit_magnitude == pytest.approx(a.edit_magnitude)
    ra = acdc(tiny_llama, sae, "resid.1", ioi, thresholds=[1e-4, 1e-2], progress=False)
    rb = acdc(offloaded, sae, "resid.1", ioi, thresholds=[1e-4, 1e-2], progress=False)
    assert rb.engine == ra.engine and rb.order == ra.order
    assert [r["kl"] for r in rb.records] == pytest.approx([r["kl"] for r in ra.records])
    kw = dict(sites=("resid.1", "resid.3"), tokens=60, ctx_len=16, batch_size=4, shard_contexts=4, corpus="sotu",
              dtype="float32", progress=False)  # fmt: skip
    sa = circuitsae.harvest(model=tiny_llama, out=str(tmp_path / "a"), **kw)
    sb = circuitsae.harvest(model=offloaded, out=str(tmp_path / "b"), **kw)
    torch.testing.assert_close(sb.activations("resid.3", "train"), sa.activations("resid.3", "train"))


def test_device_and_device_map_exclude_each_other():
    with pytest.raises(CircuitSAEError, match="device or device_map, not both"):
        circuitsae.load_model("tiny-llama", device="cpu", device_map=MAP)
