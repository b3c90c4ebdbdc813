"""What every op module does the same way: fake kernels, autograd and autocast registration for
an op's backends, and the dtype rules at the public-function boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _backend

# Only these matter for the registrations below: others (mps, xpu) never reach our ops.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def register_op_pair(
    fwd,
    bwd,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable,
    setup_context: Callable,
    backward: Callable,
    autocast_dtype: torch.dtype | None,
    cpp_autograd: bool = False,
) -> Callable:
    """Register the fake kernels of a forward/backward op pair, the forward's autograd formula
    (``backward(ctx, grad, bwd_op=bwd)``) and, if ``autocast_dtype`` is given, the forward's
    autocast policy (floating inputs cast to that dtype, as torch does for its own ops). Returns
    the forward as the public functions call it.

    ``cpp_autograd``: the op is a C++ op whose autograd formula is registered in C++
    (csrc/autograd.cpp, the same formula as ``setup_context`` / ``backward`` here): nothing is
    registered for autograd and the op itself is returned (an extension built before that file
    existed gets the Python formula instead). The Triton ops get the Python formula and
    ``_eager_caller``."""
    torch.library.register_fake(fwd)(fake_fwd)
    torch.library.register_fake(bwd)(fake_bwd)
    if autocast_dtype is not None and hasattr(torch.library, "register_autocast"):
        for dev in _AUTOCAST_DEVICES:
            torch.library.register_autocast(fwd, dev, autocast_dtype)
    if cpp_autograd and torch._C._dispatch_has_kernel_for_dispatch_key(
        fwd._schema.name, "Autograd"
    ):
        return fwd
    torch.library.register_autograd(
        fwd, functools.partial(backward, bwd_op=bwd), setup_context=setup_context
    )
    return _eager_caller(fwd, bwd, setup_context, backward)


def _eager_caller(fwd, bwd, setup_context: Callable, backward: Callable) -> Callable:
    """``fwd(*args)`` with the same autograd formula, minus the per-call cost of the Python
    autograd layer that ``torch.library.register_autograd`` puts in front of the op (~40-50 us a
    call here, more than a small layer's arithmetic): in eager mode the op is called below
    autograd inside an ``autograd.Function`` that uses the registered ``setup_context`` and
    ``backward``. Under ``torch.compile`` and autocast (whose casts must happen before autograd
    sees the inputs) it is the op itself."""

    # The forward(ctx, ...) form: with a separate setup_context staticmethod, apply() took
    # ~95 us a call here against ~30 us.
    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = fwd(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads, bwd_op=bwd)

    def call(*args):
        if (
            torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")
            or torch.is_autocast_enabled("cuda")
        ):
            return fwd(*args)
        return _Fn.apply(*args)

    return call


def resolves_to_cpp(device: torch.device, op: str, choice: str | None) -> bool:
    """Whether ``op`` on ``device`` runs on the cpp backend under ``choice`` (an unusable choice
    answers False: the public function's full path raises that error, after its argument
    checks)."""
    try:
        return _backend.resolve(device, op, choice) == "cpp"
    except _backend.BackendUnavailableError:
        return False


def autocast_to(dtype: torch.dtype, device_type: str, *tensors: Tensor | None):
    """Cast as autocast's fp32 policy would, when autocast is on for ``device_type``: fp16/bf16
    floating tensors to ``dtype``; fp64 and non-floating tensors unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def promote(*tensors: Tensor | None):
    """Cast the tensors (None skipped) to their common dtype; the kernels take one dtype."""
    present = [t for t in tensors if t is not None]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in present))
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def check_device(name: str, t: Tensor, ref: Tensor, op: str) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: expected {name} on {ref.device} (the input's device), got {t.device}"
        )


def check_floating(name: str, t: Tensor, op: str) -> None:
    if not t.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating-point {name}, got {t.dtype}")


def broadcastable_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def register_autocast_lower_precision(op) -> None:
    """Autocast policy of torch's matrix ops for ``op``: under autocast its floating inputs (not
    fp64) are cast to the current autocast dtype of their device (``torch.get_autocast_dtype``),
    which ``torch.library.register_autocast``'s fixed dtype cannot express. Mirrors that
    function's registration (a dispatcher kernel plus the Python kernel used when tracing)."""
    ns, name = op._schema.name.split("::")
    lib = _library(ns)
    for dev in _AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(dev)
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def cast_and_call(*args, _dev=dev, _dk=dispatch_key):
            dtype = torch.get_autocast_dtype(_dev)
            cast = [
                a.to(dtype)
                if isinstance(a, Tensor)
                and a.is_floating_point()
                and a.device.type == _dev
                and a.dtype != torch.float64
                else a
                for a in args
            ]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_dk)):
                return op(*cast)

        if op.has_kernel_for_dispatch_key(dispatch_key):
            op.py_kernels.pop(dispatch_key, None)
        op.py_impl(dispatch_key)(cast_and_call)
        lib.impl(name, lambda _keyset, *args, _f=cast_and_call: _f(*args), key, with_keyset=True)


_LIBS: dict = {}


def _library(ns: str):
    if ns not in _LIBS:
        _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
    return _LIBS[ns]
