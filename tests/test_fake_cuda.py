"""The fake CUDA device itself (tests/fake_cuda.py): it must apply CUDA's device rules and keep the CPU's values,
or the device tests built on it prove nothing."""

import pytest
import torch

from fake_cuda import DeviceMismatch, FakeCuda, fake_cuda


def test_tensors_made_on_cuda_claim_it_and_hold_the_cpu_values():
    x = torch.arange(6.0).reshape(2, 3)
    with fake_cuda():
        y = x.to("cuda")
        z = torch.ones(3, device="cuda")
        assert isinstance(y, FakeCuda) and y.device.type == "cuda" and z.device == torch.device("cuda", 0)
        assert torch.cuda.is_available()
        out = (y * 2 + z).sum(0)
        assert out.device.type == "cuda" and out.cpu().device.type == "cpu"
        assert torch.equal(out.cpu(), (x * 2 + 1).sum(0))
        assert out.tolist() == (x * 2 + 1).sum(0).tolist() and float(out[0]) == 8.0


@pytest.mark.parametrize(
    "mix",
    [
        lambda c, h: c + h,
        lambda c, h: c @ h.T,
        lambda c, h: torch.cat([c, h]),
        lambda c, h: c.masked_fill(h > 1, 0.0),
        lambda c, h: torch.where(h > 1, c, 0.0),
        lambda c, h: c.scatter(1, h.long(), 0.0),
        lambda c, h: h[c.long().clamp(0, 1)],  # a cpu tensor indexed with cuda indices
    ],
)
def test_mixing_cpu_and_cuda_raises_as_on_cuda(mix):
    with fake_cuda():
        c, h = torch.ones(2, 3, device="cuda"), torch.ones(2, 3)
        with pytest.raises(DeviceMismatch):
            mix(c, h)


def test_what_cuda_allows_is_allowed():
    with fake_cuda():
        c = torch.arange(6.0, device="cuda").reshape(2, 3)
        assert float((c * torch.tensor(2.0)).sum()) == 30.0  # 0-dim cpu tensors mix freely
        assert c[torch.tensor([1, 0])][0, 0].item() == 3.0  # cpu indices into a cuda tensor
        assert c[torch.tensor([True, False])].shape == (1, 3)
        c[torch.tensor([0])] = torch.zeros(1, 3, device="cuda")
        c.copy_(torch.ones(2, 3))  # copies between devices
        assert float(c.sum()) == 6.0
        with pytest.raises(TypeError, match="numpy"):
            c.numpy()
        with pytest.raises(DeviceMismatch):
            torch.randperm(3, generator=torch.Generator().manual_seed(0), device="cuda")


def test_modules_autograd_and_custom_functions_run_on_the_cpu_values():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    ref = lin(x).pow(2).sum()
    ref.backward()
    want = lin.weight.grad.clone()
    lin.weight.grad = None
    with fake_cuda():
        lin.to("cuda")
        assert lin.weight.device.type == "cuda" and isinstance(lin.weight, torch.nn.Parameter)
        out = (x.cuda() @ lin.weight.T + lin.bias).pow(2).sum()  # .T: an attribute that must keep autograd
        out.backward()
        assert lin.weight.grad.device.type == "cuda"
        torch.testing.assert_close(lin.weight.grad.cpu(), want)
        torch.optim.Adam(lin.parameters(), fused=True).step()  # CUDA's fused Adam path
        with pytest.raises(DeviceMismatch):
            lin(x)  # cpu input, cuda weights


def test_a_mismatch_deep_inside_a_model_is_raised_not_hidden(tiny_llama):
    import circuitsae

    lm = circuitsae.load_model("tiny-llama", device="cpu")
    with fake_cuda():
        lm._module.to("cuda")
        with pytest.raises(DeviceMismatch), torch.no_grad():
            lm._module(torch.tensor([[1, 2, 3]]))  # ids on the CPU, embedding on cuda
