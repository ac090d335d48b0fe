"""A fake CUDA device for CPU-only machines: tensors that say ``cuda:0``, hold real CPU data, and obey CUDA's
device rules.

Inside ``with fake_cuda(): ...`` the device ``cuda`` exists. A tensor created there (a factory with
``device="cuda"``, ``.to("cuda")``, ``.cuda()``, ``module.to("cuda")``) is a :class:`FakeCuda`: its ``.device`` is
``cuda:0`` and its values are a CPU tensor, ``.elem``. Every torch function called from Python with such a
tensor runs on the CPU values after the device rules of real CUDA are checked:

* a call that mixes a ``cuda`` tensor with a ``cpu`` tensor of one or more dimensions raises
  :class:`DeviceMismatch` (0-dim CPU tensors mix freely, as on CUDA);
* a ``cuda`` tensor may be indexed with ``cpu`` index tensors (CUDA copies them over), but a ``cpu`` tensor
  not with ``cuda`` ones;
* copies between devices (``.to``, ``.cuda()``, ``.cpu()``, ``copy_``) are allowed; ``.numpy()`` and
  ``.pin_memory()`` of a ``cuda`` tensor raise.

Values are exactly the CPU's, so a whole computation on the fake device can be compared with the same on the
CPU, autograd included: gradients are taken on the CPU values (the autograd engine never sees a tensor that
claims ``cuda``, which on a CPU build would abort the process).

Why not ``torch._subclasses.FakeTensorMode``: fake tensors carry no values, so data-dependent code
(``nonzero``, ``tolist``, ``if mask.any()``: the heart of ACDC) cannot run under it; and on a CPU build it
cannot index a cuda tensor, move one with ``.to("cuda")`` or run autograd on it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
Tensor = torch.Tensor


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a CUDA one where real CUDA would raise."""


class FakeCuda(torch.Tensor):
    """A tensor claiming ``cuda:0`` whose values are the CPU tensor ``elem``."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "FakeCuda":
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=CUDA, requires_grad=False,
        )  # fmt: skip
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FakeCuda({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _dispatch(func, args, kwargs or {})


def _is_cuda(device: Any) -> bool:
    return device is not None and not isinstance(device, bool) and torch.device(device).type == "cuda"


def _cpu(values: Any) -> list[torch.Tensor]:
    """The CPU tensors of one or more dimensions among ``values`` (those that may not meet a cuda tensor)."""
    return [t for t in values if isinstance(t, Tensor) and not isinstance(t, FakeCuda) and t.dim() > 0]


def _fake(values: Any) -> bool:
    return any(isinstance(t, FakeCuda) for t in values)


def _unwrap(t: Any) -> Any:
    return t.elem if isinstance(t, FakeCuda) else t


def _wrap_like(out: Any, args: Any, kwargs: Any) -> Any:
    """Wrap the tensors ``out`` as FakeCuda; an output that *is* an input's values becomes that input again."""
    inputs = {id(t.elem): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, FakeCuda)}

    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or isinstance(t, FakeCuda):
            return t
        same = inputs.get(id(t))
        return same if same is not None else FakeCuda(t)

    return tree_map(wrap, out)


# -- device rules ------------------------------------------------------------------------------------------
_MOVES = {Tensor.to, Tensor.cuda, Tensor.cpu}
_COPIES = {Tensor.copy_}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put, torch.index_put}
#: attributes the wrapper answers itself; every other attribute (grad, data, T...) comes from the CPU values,
#: where autograd lives
_METADATA = {"device", "is_cuda", "is_cpu", "is_meta", "shape", "dtype", "layout", "ndim", "names"}
#: functions about the tensor objects themselves, called as they are
_AS_IS = {torch._has_compatible_shallow_copy_type, Tensor.__repr__}
_HOST = {"tolist", "item", "__float__", "__int__", "__index__", "__bool__", "__len__", "__format__", "__repr__"}


def _check(func: Any, args: Any, kwargs: dict) -> None:
    flat = tree_flatten((args, kwargs))[0]
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator) and generator.device.type == "cpu":
        if _fake(flat) or _is_cuda(kwargs.get("device")):
            raise DeviceMismatch(f"{getattr(func, '__qualname__', func)}: a cpu generator cannot draw cuda:0 tensors")
    if not _fake(flat):
        return
    if func in _COPIES:
        return
    if func in _INDEXING:
        self_, idx = args[0], args[1] if len(args) > 1 else kwargs.get("indices")
        value = args[2] if len(args) > 2 else kwargs.get("values")
        if not isinstance(self_, FakeCuda) and _fake(tree_flatten(idx)[0]):
            raise DeviceMismatch("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        if isinstance(self_, FakeCuda) and _cpu([value]):
            raise DeviceMismatch(f"assigning a cpu tensor of shape {tuple(value.shape)} into a cuda:0 tensor")
        if not isinstance(self_, FakeCuda) and isinstance(value, FakeCuda) and value.dim() > 0:
            raise DeviceMismatch(f"assigning a cuda:0 tensor of shape {tuple(value.shape)} into a cpu tensor")
        return
    bad = _cpu(flat)
    if bad:
        raise DeviceMismatch(
            f"{getattr(func, '__qualname__', func)}: expected all tensors to be on the same device, but found "
            f"cuda:0 and a cpu tensor of shape {tuple(bad[0].shape)}"
        )


def _move(func: Any, args: Any, kwargs: dict) -> Any:
    """``.to`` / ``.cuda()`` / ``.cpu()``: a copy between devices, the dtype change done on the CPU values."""
    x = args[0]
    if func is Tensor.cpu:
        device, dtype, copy = torch.device("cpu"), None, False
    elif func is Tensor.cuda:
        device, dtype, copy = CUDA, None, False
    else:
        other = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else kwargs.get("other")
        if isinstance(other, Tensor):
            device, dtype, copy = other.device, other.dtype, bool(kwargs.get("copy", False))
        else:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            copy = bool(kwargs.get("copy", False))
    values = _unwrap(x)
    here_cuda = isinstance(x, FakeCuda)
    to_cuda = _is_cuda(device) if device is not None else here_cuda
    if not to_cuda:  # to the cpu (a copy when leaving cuda), or to another real device such as meta
        target = values.device if device is None else torch.device(device)
        moved = values.to(device=target, dtype=dtype or values.dtype, copy=copy)
        return moved.clone() if here_cuda and moved is values else moved
    moved = values.to(dtype or values.dtype, copy=copy)
    if here_cuda:
        return x if moved is values else FakeCuda(moved)
    return FakeCuda(moved.clone() if moved is values else moved)  # cpu -> cuda: a new tensor, as on a GPU


class _Functions(TorchFunctionMode):
    """Every torch function called from Python passes here: cuda tensors are unwrapped after the device check."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _MOVES:
            return _move(func, args, kwargs)
        if func in _AS_IS:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        self_ = args[0] if args else None
        if isinstance(self_, FakeCuda):
            if name in _HOST:
                return getattr(self_.elem, name)(*args[1:], **kwargs)
            if name == "numpy":
                raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
            if name == "pin_memory":
                raise RuntimeError("cannot pin 'torch.cuda.FloatTensor': only dense CPU tensors can be pinned")
            prop = (
                getattr(getattr(func, "__self__", None), "__name__", None) if name in ("__get__", "__set__") else None
            )
            if prop in _METADATA:
                return func(*args, **kwargs)  # device, shape, dtype...: the wrapper's own (it says cuda)
            if prop is not None and name == "__get__":  # grad, data, T, mT...: from the values, autograd included
                value = getattr(self_.elem, prop)
                return FakeCuda(value) if isinstance(value, Tensor) else value
            if prop is not None:
                value = args[1]
                if isinstance(value, Tensor) and _cpu([value]):
                    raise DeviceMismatch(f"assigning a cpu tensor to .{prop} of a cuda:0 tensor")
                setattr(self_.elem, prop, _unwrap(value))
                return None
        elif name == "pin_memory" and isinstance(self_, Tensor):
            return self_  # page-locked memory needs a driver; what follows (the copy to cuda) is what matters
        device = kwargs.get("device")
        flat = tree_flatten((args, kwargs))[0]
        if not _fake(flat) and not _is_cuda(device):
            return func(*args, **kwargs)
        _check(func, args, kwargs)
        if _is_cuda(device):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if out is None or (func is Tensor.__getitem__ and not isinstance(self_, FakeCuda)):
            return out
        return _wrap_like(out, args, kwargs)


# -- the safety net below Python: ops that reach the dispatcher with a FakeCuda still run on the CPU values ------
def _dispatch(func: Any, args: Any, kwargs: dict) -> Any:
    flat = tree_flatten((args, kwargs))[0]
    to_cuda = _is_cuda(kwargs.get("device"))
    if to_cuda:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    if _fake(flat) and func is not torch.ops.aten.copy_.default and _cpu(flat):
        # raising here could unwind through a CUDA device guard and abort the process: record, raise later
        _PENDING.append(f"{func}: a cpu tensor met a cuda:0 tensor{_where()}")
    if torch.is_grad_enabled() and any(isinstance(t, FakeCuda) and t.elem.requires_grad for t in flat):
        # below autograd: a gradient through here would be silently lost, so this is an error of the harness
        _PENDING.append(f"{func} reached the dispatcher with a tensor that needs a gradient{_where()}")
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is torch.ops.aten.copy_.default:
        return args[0]
    return _wrap_like(out, args, kwargs) if _fake(flat) or to_cuda else out


_PENDING: list[str] = []


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "circuitsae" in f.filename and "fake_cuda" not in f.filename]
    return f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _dispatch(func, args, kwargs or {})


_APPLY = torch.autograd.Function.apply.__func__


def _apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``autograd.Function.apply`` bypasses torch-function modes: unwrap here, so autograd runs on CPU values."""
    if not _fake(tree_flatten((args, kwargs))[0]):
        return _APPLY(cls, *args, **kwargs)
    _check(cls.apply, args, kwargs)
    out = _APPLY(cls, *tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    return _wrap_like(out, args, kwargs)


def _forget_cached_device_checks() -> None:
    try:
        from transformers.utils import import_utils
    except ImportError:
        return
    cached = import_utils.is_torch_cuda_available
    getattr(cached, "cache_clear", lambda: None)()


_DEPTH = [0]


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Inside, ``cuda`` is a device with CUDA's rules and the CPU's values (see the module docstring).

    Re-entrant: a test that opens it inside a session already on the fake device (``pytest --device fake-cuda``)
    leaves the outer set-up in place.
    """
    if _DEPTH[0]:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
        return
    names = ("is_available", "_lazy_init", "is_bf16_supported", "device_count", "current_device", "get_device_name")
    saved = {n: getattr(torch.cuda, n) for n in names}
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda._lazy_init = lambda: None
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda *a: "fake CUDA device (CPU values)"
    # module.to("cuda") must give new (FakeCuda) parameters, not write a cuda TensorImpl into a CPU Parameter
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    torch.autograd.Function.apply = classmethod(_apply)
    _forget_cached_device_checks()  # transformers caches "is CUDA available?": it must see the GPU inside
    _PENDING.clear()
    _DEPTH[0] = 1
    try:
        with _Dispatch(), _Functions():
            yield
        if _PENDING:
            raise DeviceMismatch(_PENDING[0])
    finally:
        _DEPTH[0] = 0
        _PENDING.clear()
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.autograd.Function.apply = classmethod(_APPLY)
        for n, f in saved.items():
            setattr(torch.cuda, n, f)
        _forget_cached_device_checks()
