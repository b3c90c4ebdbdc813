"""Which implementation runs an op: "triton", "cpp" (the compiled extension: C++ kernels for CPU
tensors, CUDA kernels for CUDA tensors), "cuda-emu" (the CUDA kernels run on CPU tensors by the
emulator, hpml_ops._C_emu: for testing them without a GPU) or "reference" (pure PyTorch). "auto",
the default, picks triton for CUDA tensors, cpp for CPU tensors and reference otherwise, falling
back along that order when one is unavailable (never the emulator). The choice is process-wide:
``use_backend`` or ``HPML_BACKEND``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "cpp", "cuda-emu", "reference")
CHOICES = ("auto", *BACKENDS)


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why."""


def _load(name: str, what: str):
    """(module, None) or (None, why): importing a compiled module registers its ops' kernels."""
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as e:
        return None, (
            f"{what} hpml_ops.{name} could not be imported ({e}); build it with `make build` "
            "(or `pip install --no-build-isolation -e .`)"
        )


# torch.ops.hpml: the C++ CPU kernels and the CUDA kernels.
_C, _C_ERROR = _load("_C", "the compiled extension")
HAS_EXTENSION = _C is not None
# torch.ops.hpml_emu: the CUDA kernels run on CPU tensors by the emulator (csrc/emu).
_C_EMU, _C_EMU_ERROR = _load("_C_emu", "the CUDA emulator")
HAS_EMULATOR = _C_EMU is not None


def _initial_choice() -> str:
    name = os.environ.get("HPML_BACKEND", "auto").strip().lower() or "auto"
    if name not in CHOICES:
        raise ValueError(f"HPML_BACKEND={name!r} is not one of {', '.join(CHOICES)}")
    return name


_choice = [_initial_choice()]


def _triton_interpreting() -> bool:
    # The kernels module decides when it is first imported (that is when @triton.jit looks).
    common = sys.modules.get("hpml_ops.kernels._common")
    if common is not None:
        return common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str, op: str | None = None) -> str | None:
    """None if backend ``name`` can run ops (the op ``op``, e.g. "batch_norm", when given) on
    tensors of ``device_type``, else why not."""
    if name == "reference":
        return None
    if name == "cpp":
        if _C is None:
            return _C_ERROR
        if device_type == "cpu":
            return None
        if device_type == "cuda":
            if not _C.WITH_CUDA:
                return "hpml_ops._C was built without its CUDA kernels (see the build log for why)"
            if op is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"hpml::{op}", "CUDA"
            ):
                return f"the C++ backend has no CUDA kernel for {op} yet"
            return None if torch.cuda.is_available() else "no CUDA device is available"
        return f"the C++ kernels handle CPU and CUDA tensors, not {device_type}"
    if name == "cuda-emu":
        if _C_EMU is None:
            return _C_EMU_ERROR
        if device_type != "cpu":
            return f"the CUDA emulator runs the CUDA kernels on CPU tensors, not {device_type}"
        if op is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"hpml_emu::{op}", "CPU"
        ):
            return f"the CUDA emulator has no kernel for {op}"
        return None
    if name == "triton":
        try:
            found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return "triton is not installed"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            if _triton_interpreting():
                return None
            return (
                "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                "before importing triton (and hpml_ops)"
            )
        return f"Triton kernels handle CUDA tensors (CPU under the interpreter), not {device_type}"
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run ops on tensors of ``device`` (default: CUDA if present, else
    CPU), in the order "auto" prefers them."""
    dt = torch.device(device).type if device is not None else _default_device_type()
    order = ("triton", "cpp") if dt == "cuda" else ("cpp", "triton", "cuda-emu")
    order += ("reference",)
    return [b for b in order if unavailable_reason(b, dt) is None]


def cpu_capability() -> str | None:
    """The ISA variant of the C++ CPU kernels in use: "DEFAULT", "AVX2" or "AVX512" (None without
    the extension). Each variant is built from the same source; the one run is the best built that
    torch's own capability allows (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` overrides, as for torch's kernels)."""
    return _C.cpu_capability() if _C is not None else None


def backend_status(device: str | torch.device | None = None) -> dict[str, str]:
    """For each backend: "available", or the reason it is not, for tensors of ``device``. For
    the C++ kernels on CPU tensors: "available: <variant> CPU kernels (...)", naming the ISA
    variant in use, those built, torch's capability, and what runs large fp32 linear forwards
    (oneDNN's inner product or the tiled products over torch's BLAS: csrc/cpu_dispatch.cpp)."""
    dt = torch.device(device).type if device is not None else _default_device_type()
    status = {b: unavailable_reason(b, dt) or "available" for b in BACKENDS}
    if dt == "cpu" and status["cpp"] == "available":
        onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise")
        status["cpp"] = (
            f"available: {cpu_capability()} CPU kernels (built: "
            f"{', '.join(_C.cpu_capabilities_built())}; torch's capability: "
            f"{torch.backends.cpu.get_cpu_capability()}; large fp32 linear forwards: "
            f"{'oneDNN' if _C._large_forward_onednn() and onednn else 'tiled BLAS products'})"
        )
    return status


def get_backend() -> str:
    """The current choice: "auto" or a backend name."""
    return _choice[0]


_usable: set[str] = set()  # names use_backend found usable


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block with backend ``name`` ("auto", "triton", "cpp", "reference").

    Raises ``BackendUnavailableError`` at once if the backend cannot run on any device here;
    device-specific limits (Triton on CPU tensors needs the interpreter) are checked per call.
    """
    if name not in _usable:
        if name not in CHOICES:
            raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
        if name != "auto":
            reasons = {dt: unavailable_reason(name, dt) for dt in ("cpu", "cuda")}
            if all(reasons.values()):
                raise BackendUnavailableError(
                    f"backend {name!r} is not available: "
                    + "; ".join(f"{dt} tensors: {r}" for dt, r in reasons.items())
                )
        # What decides this (the extension, triton, a CUDA device, the interpreter flag read at
        # import) does not change in a process: a module with a ``backend`` enters this block on
        # every call, and the checks cost more than a small layer's kernel.
        _usable.add(name)
    prev = _choice[0]
    _choice[0] = name
    try:
        yield
    finally:
        _choice[0] = prev


@torch.compiler.assume_constant_result
def _resolve(choice: str, device_type: str, op: str | None) -> str:
    if device_type == "meta":
        # Shapes and dtypes only (deferred initialisation, shape inference): torch's own ops
        # infer them, whichever backend was chosen for the real tensors.
        return "reference"
    if choice == "auto":
        order = {"cuda": ("triton", "cpp"), "cpu": ("cpp",)}.get(device_type, ())
        for b in order:
            if unavailable_reason(b, device_type, op) is None:
                return b
        return "reference"
    reason = unavailable_reason(choice, device_type, op)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {choice!r} cannot run on {device_type} tensors: {reason}"
        )
    return choice


# (choice, device, op) -> the backend that runs it. What decides it (the extension, triton, a CUDA
# device, the interpreter flag read at import) does not change in a process (as use_backend
# assumes), and a small layer's call cannot afford the checks (device.type alone takes ~0.3 us).
_resolved: dict[tuple, str] = {}


def resolve(device: torch.device, op: str | None = None, choice: str | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device`` under ``choice`` (a module's
    ``backend``; None: the current process-wide choice). Under torch.compile the answer is fixed
    when the graph is traced."""
    choice = choice or _choice[0]
    if torch.compiler.is_compiling():
        return _resolve(choice, device.type, op)
    key = (choice, device, op)
    backend = _resolved.get(key)
    if backend is None:  # an unusable choice raises here, every time
        backend = _resolved[key] = _resolve(choice, device.type, op)
    return backend
