"""One registry for every op family: from the schemas (``schema.py``) and each family's spec
(``hpml_ops/ops/<stem>.py``) it defines the Triton ops ``hpml::<op>_triton``, registers the fake
kernels, the forward's autograd formula and its autocast policy for every backend, and hands the
public functions what they call. It also holds the argument checks every contract is made of, with
the same messages as their C++ twins (``csrc/common.h``).

A new op family costs: its schemas in ``schema.py``; its kernels (``kernels/<stem>.py``: a Triton
launcher per op, named as the op; ``csrc/<stem>.{h,cpp}``, ``csrc/cuda/<stem>.cu``:
``<op>_cpu`` / ``<op>_cuda``, registered with ``HPML_REGISTER_KERNELS``; the forward's formula in
``csrc/autograd.cpp``); its oracle ``reference.<stem>``; and ``hpml_ops/ops/<stem>.py``: the
contract, the fake kernels, the Triton formula, ``OP = register(OpSpec(...))`` and the public
function.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import _backend, reference
from .schema import SCHEMAS

# Only these matter for the registrations below: others (mps, xpu) never reach our ops.
_AUTOCAST_DEVICES = ("cpu", "cuda")
# OpSpec.autocast: cast floating inputs (not fp64) to the current autocast dtype of their device,
# as torch does for its matrix products.
AUTOCAST_LOWER = "lower"


class OpSpec:
    """What is particular to one op family; ``register`` does the rest. Its pieces are given as
    decorators, next to their definitions in ``hpml_ops/ops/<stem>.py``::

        SPEC = OpSpec("linear_act", autocast=AUTOCAST_LOWER)

        @SPEC.fake("linear_act")
        def _fake_fwd(input, weight, bias, activation, negative_slope): ...

        @SPEC.setup_context
        def _setup_context(ctx, inputs, output): ...

        @SPEC.backward
        def _backward(ctx, grad, grad_mask, *, bwd_op): ...

        OP = register(SPEC)

    name: the stem: the family in ``schema.py`` (its first op is the forward, its second the
        forward's backward), ``hpml_ops.kernels.<name>`` (a Triton launcher per op, named as the
        op), ``reference.<name>``, and the op name backends are resolved for.
    autocast: the forward's autocast policy: ``torch.float32`` (floating inputs to fp32, as torch
        treats its losses), ``AUTOCAST_LOWER`` (to the autocast dtype, as its matrix products)
        or None (inputs as they come, as its batch norm); ``autocast_args``: with
        ``AUTOCAST_LOWER``, cast only the first so many arguments.
    fakes: op name -> fake kernel (``@SPEC.fake(op)``): the op's contract checks, then empty
        outputs of the right shapes, dtypes and devices (``torch.compile``, ``opcheck``, meta).
    vmaps: op name -> batching rule (``@SPEC.vmap(op)``): ``rule(info, in_dims, *args, op=<that
        backend's op>)`` as ``torch.library.register_vmap`` takes it, registered for the op of
        every backend; it calls ``op`` once on the batched tensors where one call computes the
        batch (else ``vmap_by_loop``).
    setup_context_fn, backward_fn: the forward's autograd formula for the Triton ops
        (``@SPEC.setup_context``, ``@SPEC.backward``: ``backward(ctx, *grads, bwd_op=<the
        backward op>)``); the C++ ops carry the same formula in ``csrc/autograd.cpp``, and both
        must stay in step.
    """

    def __init__(
        self,
        name: str,
        *,
        autocast: torch.dtype | str | None = None,
        autocast_args: int | None = None,
    ) -> None:
        if name not in SCHEMAS:
            raise ValueError(f"OpSpec {name!r}: no such family in hpml_ops/ops/schema.py")
        self.name = name
        self.autocast = autocast
        self.autocast_args = autocast_args
        self.fakes: dict[str, Callable] = {}
        self.vmaps: dict[str, Callable] = {}
        self.setup_context_fn: Callable | None = None
        self.backward_fn: Callable | None = None

    def fake(self, op: str) -> Callable[[Callable], Callable]:
        if op not in SCHEMAS[self.name]:
            raise ValueError(f"OpSpec {self.name!r}: {op!r} is not one of its ops")

        def add(fn: Callable) -> Callable:
            self.fakes[op] = fn
            return fn

        return add

    def vmap(self, op: str) -> Callable[[Callable], Callable]:
        if op not in SCHEMAS[self.name]:
            raise ValueError(f"OpSpec {self.name!r}: {op!r} is not one of its ops")

        def add(fn: Callable) -> Callable:
            self.vmaps[op] = fn
            return fn

        return add

    def setup_context(self, fn: Callable) -> Callable:
        self.setup_context_fn = fn
        return fn

    def backward(self, fn: Callable) -> Callable:
        self.backward_fn = fn
        return fn

    def _check_complete(self) -> None:
        missing = [op for op in SCHEMAS[self.name] if op not in self.fakes]
        if missing or self.setup_context_fn is None or self.backward_fn is None:
            raise ValueError(
                f"OpSpec {self.name!r} is incomplete: fake kernels missing for {missing}, "
                f"setup_context {'set' if self.setup_context_fn else 'missing'}, backward "
                f"{'set' if self.backward_fn else 'missing'}"
            )


@dataclasses.dataclass
class Op:
    """A registered family. ``ops[backend][op name]``: the op overloads ("triton" always, "cpp"
    when the extension has them); ``forward[backend]``: the forward as the public function calls
    it; ``cpp``: the C++ forward (None without the extension); ``reference``: the oracle."""

    spec: OpSpec
    ops: dict[str, dict[str, torch._ops.OpOverload]]  # "triton", "cpp", "cuda-emu"
    forward: dict[str, Callable]
    reference: Callable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cpp(self) -> Callable | None:
        return self.forward.get("cpp")

    def cpp_first(self, device: torch.device, backend: str | None) -> bool:
        """Whether a public function calls the C++ op straight away (its cheap type checks
        passed): the extension has the op, eager mode, and ``backend`` (None: the process-wide
        choice) resolves to cpp on ``device``. The C++ op checks the rest and raises what the
        Python contract would (same exception, same words): its error goes through unchanged.
        On the small layers of a training step the Python checks cost more than the arithmetic.
        """
        return (
            "cpp" in self.forward
            and not torch.compiler.is_compiling()
            and resolves_to_cpp(device, self.spec.name, backend)
            # transforms_active(), inlined (this runs on every call)
            and not _functorch_active()
            and forward_ad._current_level < 0
        )

    def forward_for(
        self, backend: str, *unbatched: Tensor | None, batchable: bool = True
    ) -> Callable | None:
        """The forward a public function's full path calls on ``backend`` (resolved), or None
        where the op must run as torch's own (the reference backend). Under ``torch.vmap`` alone
        it is the op itself, whose batching rule (``OpSpec.vmap``) runs it on the unbatched
        tensors below the transform, where its autograd formula works as in eager mode; unless
        one call cannot batch it: one of ``unbatched`` is batched, or not ``batchable`` (e.g.
        per-sample batch statistics of a whole MLP). Under the other transforms:
        ``torch_ops_needed``."""
        if backend == "reference":
            return None
        if not transforms_active():
            return self.forward[backend]
        if not batchable or torch_ops_needed(*unbatched):
            return None
        return self.pair(backend)[0]

    def pair(self, backend: str) -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
        """``backend``'s (forward op, backward op)."""
        fwd, bwd = list(self.ops[backend].values())[:2]
        return fwd, bwd

    def resolve(self, device: torch.device, backend: str | None) -> str:
        return _backend.resolve(device, self.spec.name, backend)


REGISTERED: dict[str, Op] = {}


def register(spec: OpSpec) -> Op:
    """Define the Triton ops of ``spec``'s family, register fake kernels for them and for the
    C++ ops, the forward's autograd formula and autocast policy; returns the ``Op``."""
    spec._check_complete()
    schemas = SCHEMAS[spec.name]
    names = list(schemas)
    ops: dict[str, dict] = {"triton": {}}
    for op, schema in schemas.items():
        ops["triton"][op] = _define_triton_op(spec.name, op, schema)
    if _backend.HAS_EXTENSION and all(hasattr(torch.ops.hpml, op) for op in names):
        ops["cpp"] = {op: getattr(torch.ops.hpml, op).default for op in names}
    if _backend.HAS_EMULATOR and all(hasattr(torch.ops.hpml_emu, op) for op in names):
        ops["cuda-emu"] = {op: getattr(torch.ops.hpml_emu, op).default for op in names}
    forward = {}
    for backend, overloads in ops.items():
        for op, overload in overloads.items():
            torch.library.register_fake(overload)(spec.fakes[op])
            if op in spec.vmaps:
                rule = functools.partial(spec.vmaps[op], op=overload)
                torch.library.register_vmap(overload, rule)
        fwd, bwd = overloads[names[0]], overloads[names[1]]
        # The C++ libraries (hpml, and hpml_emu built from the same sources) carry the
        # forward's formula in C++ (csrc/autograd.cpp); the Triton ops get the Python one.
        forward[backend] = _register_autograd(spec, fwd, bwd, cpp=backend != "triton")
        _register_autocast(fwd, spec.autocast, spec.autocast_args)
    result = Op(spec, ops, forward, getattr(reference, spec.name))
    REGISTERED[spec.name] = result
    return result


def _define_triton_op(family: str, op: str, schema: str):
    """``hpml::<op>_triton`` with the C++ op's schema, implemented by
    ``hpml_ops.kernels.<family>.<op>`` (imported on the first call: importing hpml_ops does
    not import triton)."""

    def impl(*args, **kwargs):
        launcher = getattr(importlib.import_module(f"hpml_ops.kernels.{family}"), op)
        return launcher(*args, **kwargs)

    impl.__name__ = f"{op}_triton"
    torch.library.custom_op(f"hpml::{op}_triton", impl, mutates_args=(), schema=schema)
    return getattr(torch.ops.hpml, f"{op}_triton").default


def _register_autograd(spec: OpSpec, fwd, bwd, *, cpp: bool) -> Callable:
    """The forward's autograd formula, unless it is a C++ op whose formula is registered in C++
    (csrc/autograd.cpp); returns the forward as the public functions call it."""
    if cpp and torch._C._dispatch_has_kernel_for_dispatch_key(fwd._schema.name, "Autograd"):
        return fwd
    torch.library.register_autograd(
        fwd, functools.partial(spec.backward_fn, bwd_op=bwd), setup_context=spec.setup_context_fn
    )
    if any(isinstance(a.type, torch.ListType) for a in fwd._schema.arguments):
        # A plain autograd.Function does not see tensors inside lists: torch.library's layer
        # (which does) it is.
        return fwd
    return _eager_caller(fwd, bwd, spec.setup_context_fn, spec.backward_fn)


def _register_autocast(fwd, policy, autocast_args: int | None) -> None:
    if policy is None:
        return
    if policy == AUTOCAST_LOWER:
        _register_autocast_lower_precision(fwd, autocast_args)
    elif hasattr(torch.library, "register_autocast"):
        for dev in _AUTOCAST_DEVICES:
            torch.library.register_autocast(fwd, dev, policy)


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
        if torch.compiler.is_compiling() or autocast_enabled():
            return fwd(*args)
        return _Fn.apply(*args)

    return call


def _register_autocast_lower_precision(op, arg_count: int | None = None) -> None:
    """Autocast policy of torch's matrix ops for ``op``: under autocast its floating inputs (not
    fp64; tensors and lists of tensors; the first ``arg_count`` arguments when given) are cast to
    the current autocast dtype of their device (``torch.get_autocast_dtype``), which
    ``torch.library.register_autocast``'s fixed dtype cannot express. Mirrors that function's
    registration (a dispatcher kernel plus the Python kernel used when tracing)."""
    ns, name = op._schema.name.split("::")
    lib = _library(ns)
    for dev in _AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(dev)
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def cast_and_call(*args, _dev=dev, _dk=dispatch_key):
            dtype = torch.get_autocast_dtype(_dev)

            def cast(a):
                if isinstance(a, list | tuple):
                    return type(a)(cast(t) for t in a)
                if (
                    isinstance(a, Tensor)
                    and a.is_floating_point()
                    and a.device.type == _dev
                    and a.dtype != torch.float64
                ):
                    return a.to(dtype)
                return a

            n = len(args) if arg_count is None else arg_count
            cast_args = [cast(a) if i < n else a for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_dk)):
                return op(*cast_args)

        if op.has_kernel_for_dispatch_key(dispatch_key):
            op.py_kernels.pop(dispatch_key, None)
        op.py_impl(dispatch_key)(cast_and_call)
        lib.impl(name, lambda _keyset, *args, _f=cast_and_call: _f(*args), key, with_keyset=True)


_LIBS: dict = {}


def _library(ns: str):
    if ns not in _LIBS:
        _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
    return _LIBS[ns]


def resolves_to_cpp(device: torch.device, op: str, choice: str | None) -> bool:
    """Whether ``op`` on ``device`` runs on the cpp backend under ``choice`` (an unusable choice
    answers False: the public function's full path raises that error, after its argument
    checks). Reads ``_backend.resolve``'s memo first (this runs on every call; the caller has
    already ruled out torch.compile, under which the memo is not used)."""
    backend = _backend._resolved.get((choice or _backend._choice[0], device, op))
    if backend is not None:
        return backend == "cpp"
    try:
        return _backend.resolve(device, op, choice) == "cpp"
    except _backend.BackendUnavailableError:
        return False


def autocast_enabled() -> bool:
    """Whether autocast is on for any device our ops run on (cheaper than asking for one
    tensor's device: ``device.type`` alone costs ~0.3 us)."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def on_device(device: torch.device, *tensors) -> bool:
    """Whether each of ``tensors`` is None or a tensor on ``device`` (a public function's
    precondition for calling the C++ op at once: with operands on several devices the dispatcher
    would pick one device's kernel, and the meta one returns without complaint)."""
    for t in tensors:
        if t is not None and not (isinstance(t, Tensor) and t.device == device):
            return False
    return True


# ---- dtype rules at the public-function boundary ----------------------------------------------


_functorch_active = torch._C._are_functorch_transforms_active


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jacfwd, jvp, hessian,
    functional_call under them) or forward-mode AD (``forward_ad.dual_level``) is on: then
    ``torch_ops_needed`` decides how an op runs."""
    return _functorch_active() or forward_ad._current_level >= 0


_VMAP = torch._C._functorch.TransformType.Vmap
_is_batched = torch._C._functorch.is_batchedtensor


def torch_ops_needed(*unbatched: Tensor | None) -> bool:
    """Under ``transforms_active()``: whether the op must run as torch's own (the reference
    backend) rather than as our op with its batching rule. Our ops run under ``torch.vmap`` alone
    (nested or not; autograd outside it as usual) when none of ``unbatched`` (the operands one
    call cannot batch, e.g. a linear layer's weight) is batched. Under the other transforms
    (grad, jvp, jacrev, jacfwd, hessian, functionalize), forward-mode AD or torch.compile they run
    as torch's: our kernels have no forward-mode formulas, and their autograd formulas (C++
    ``torch::autograd::Function``) cannot run under functorch's grad transforms."""
    if forward_ad._current_level >= 0 or torch.compiler.is_compiling():
        return True
    stack = torch._C._functorch.get_interpreter_stack() or ()
    if any(level.key() != _VMAP for level in stack):
        return True
    return any(t is not None and _is_batched(t) for t in unbatched)


def update_running(running: Tensor, batch: Tensor, momentum: float) -> None:
    """``running = (1 - momentum) running + momentum batch`` in place (under no_grad), written
    ``running + momentum (batch - running)``: one op instead of two (the same value to an ulp; the
    small layers of a training step are all call overhead). Under vmap, where ``lerp_`` has no
    batching rule, torch's own two."""
    batch = batch if batch.dtype == running.dtype else batch.to(running.dtype)
    if _functorch_active():
        running.mul_(1 - momentum).add_(batch, alpha=momentum)
    else:
        running.lerp_(batch, momentum)


def vmap_by_loop(info, in_dims, args, op):
    """A batching rule's fallback where one call cannot compute the batch: ``op`` once per batch
    element, the outputs stacked along dimension 0 (what torch does for an op without a batching
    rule). ``args`` and ``in_dims`` as the rule got them (lists for ``Tensor[]`` arguments)."""

    def take(a, d, i):
        if isinstance(a, list | tuple) and isinstance(d, list | tuple):
            return [take(t, e, i) for t, e in zip(a, d, strict=True)]
        return a if d is None else a.select(d, i)

    outs = [
        op(*(take(a, d, i) for a, d in zip(args, in_dims, strict=True)))
        for i in range(info.batch_size)
    ]

    def stack(items):
        if isinstance(items[0], list | tuple):
            return [stack(list(group)) for group in zip(*items, strict=True)]
        return torch.stack(items)

    def zeros(out):
        return [zeros(o) for o in out] if isinstance(out, list) else 0

    if isinstance(outs[0], tuple):
        result = tuple(stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return result, tuple(zeros(r) for r in result)
    return stack(outs), 0


def vmap_rows(t: Tensor, batch: int, rows: int) -> tuple[Tensor, int | None]:
    """An output of a call on ``batch`` blocks of ``rows`` rows stacked along dimension 0: as the
    batch of ``batch`` such outputs along dimension 0; a 1-D empty output (an absent one)
    unbatched."""
    if t.dim() == 1 and t.numel() == 0:
        return t, None
    return t.reshape(batch, rows, *t.shape[1:]), 0


def autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False for a device type autocast does not
    know (``meta``: deferred initialisation, shape inference), where torch raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_to(dtype: torch.dtype, device_type: str, *tensors: Tensor | None):
    """Cast as autocast's fp32 policy would, when autocast is on for ``device_type``: fp16/bf16
    floating tensors to ``dtype``; fp64 and non-floating tensors unchanged."""
    if not autocast_on(device_type):
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
