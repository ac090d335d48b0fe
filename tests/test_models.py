import nnsight
import pytest
import torch

import circuitsae
from circuitsae.errors import CircuitSAEError
from circuitsae.models import model_name, resolve_dtype, start_token_id


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
def test_tiny_models_load_deterministically(tiny_models, name):
    lm = tiny_models[name]
    assert isinstance(lm, nnsight.TransformersModel)
    assert model_name(lm) == name
    again = circuitsae.load_model(name, device="cpu")
    for (k, a), (_, b) in zip(lm._module.state_dict().items(), again._module.state_dict().items()):
        assert torch.equal(a.cpu(), b), k
    ids = lm.tokenizer("Hello world", return_tensors="pt").input_ids.to(lm._module.device)
    with torch.no_grad():
        logits = lm._module(ids).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer))


def test_local_folder_roundtrip(tiny_llama, tmp_path):
    tiny_llama._module.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    lm = circuitsae.load_model(str(tmp_path / "m"), device="cpu")
    ids = torch.tensor([[1, 500, 600, 700]])
    with torch.no_grad():
        assert torch.allclose(lm._module(ids).logits, tiny_llama._module(ids.to(tiny_llama.device)).logits.cpu())
    assert model_name(lm) == str(tmp_path / "m")


def test_dtype_argument(tmp_path):
    lm = circuitsae.load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    assert next(lm._module.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name_or_path="no-such-model-anywhere"), "hub is unreachable"),
        (dict(name_or_path="tiny-llama", dtype="float8"), "unknown dtype"),
        (dict(name_or_path="tiny-llama", device="tpu"), "unknown device"),
    ],
)
def test_bad_model_arguments_are_one_line(kwargs, match):
    with pytest.raises(CircuitSAEError, match=match) as err:
        circuitsae.load_model(**kwargs)
    assert "\n" not in str(err.value)


def test_empty_local_folder_is_clear(tmp_path):
    with pytest.raises(CircuitSAEError, match="local folder"):
        circuitsae.load_model(str(tmp_path))


def test_start_token(tiny_llama):
    assert start_token_id(tiny_llama.tokenizer) == tiny_llama.tokenizer.bos_token_id
    assert resolve_dtype(None) is torch.float32
