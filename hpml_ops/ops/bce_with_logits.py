"""Sigmoid binary cross-entropy with logits: the public function, its custom ops, their fake
kernels, autograd formula (for the Triton ops; the C++ ops carry the same formula in C++,
csrc/autograd.cpp) and autocast policy.

Two op pairs implement it: ``hpml::bce_with_logits[_backward]`` (C++: CPU kernels, CUDA kernels;
schema in csrc/ops.cpp) and ``hpml::bce_with_logits[_backward]_triton`` (Triton, kernels/).
Both are ``torch.library`` ops with a registered fake kernel, so opcheck and
``torch.compile(fullgraph=True)`` treat them alike on a GPU and under ``TRITON_INTERPRET=1``
(``triton_op`` would let Inductor look inside the Triton kernel on a GPU, but fails under the
interpreter; a ``custom_op`` passes in both places, and the kernel is already fused).
"""

import torch
from torch import Tensor

from .. import _backend, reference
from ._registry import (
    autocast_to,
    broadcastable_to,
    check_device,
    check_floating,
    promote,
    register_op_pair,
    resolves_to_cpp,
)

_OP = "binary_cross_entropy_with_logits"
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@torch.library.custom_op("hpml::bce_with_logits_triton", mutates_args=())
def _bce_triton(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: int,
) -> Tensor:
    from ..kernels.bce_with_logits import bce_with_logits_fwd

    return bce_with_logits_fwd(input, target, weight, pos_weight, reduction)


@torch.library.custom_op("hpml::bce_with_logits_backward_triton", mutates_args=())
def _bce_backward_triton(
    grad: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: int,
    input_grad: bool,
    target_grad: bool,
) -> tuple[Tensor, Tensor]:
    from ..kernels.bce_with_logits import bce_with_logits_bwd

    return bce_with_logits_bwd(
        grad, input, target, weight, pos_weight, reduction, input_grad, target_grad
    )


def _fake_fwd(input, target, weight, pos_weight, reduction):
    torch._check(
        input.shape == target.shape,
        lambda: f"Target size ({target.shape}) must be the same as input size ({input.shape})",
    )
    torch._check(input.dtype == target.dtype, lambda: "input and target dtypes differ")
    torch._check(reduction in (0, 1, 2), lambda: f"reduction must be 0, 1 or 2, got {reduction}")
    return input.new_empty(input.shape if reduction == 0 else ())


def _fake_bwd(grad, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        input.new_empty(input.shape if target_grad else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.reduction = reduction


def _backward(ctx, grad, *, bwd_op):
    input, target, weight, pos_weight = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_input or need_target):
        return None, None, None, None, None
    grad_input, grad_target = bwd_op(
        grad, input, target, weight, pos_weight, ctx.reduction, need_input, need_target
    )
    return (
        grad_input if need_input else None,
        grad_target if need_target else None,
        None,
        None,
        None,
    )


_OPS = {
    "triton": (
        torch.ops.hpml.bce_with_logits_triton.default,
        torch.ops.hpml.bce_with_logits_backward_triton.default,
    )
}
if _backend.HAS_EXTENSION:
    _OPS["cpp"] = (
        torch.ops.hpml.bce_with_logits.default,
        torch.ops.hpml.bce_with_logits_backward.default,
    )

# Per backend, the forward as the public function calls it (see _registry._eager_caller).
_CALL = {}
for _name, (_fwd, _bwd) in _OPS.items():
    _CALL[_name] = register_op_pair(
        _fwd,
        _bwd,
        fake_fwd=_fake_fwd,
        fake_bwd=_fake_bwd,
        setup_context=_setup_context,
        backward=_backward,
        autocast_dtype=torch.float32,  # as torch: binary_cross_entropy_with_logits runs in fp32
        cpp_autograd=_name == "cpp",
    )


def _check_args(input, target, weight, reduction, pos_weight) -> None:
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    check_floating("input", input, _OP)
    check_floating("target", target, _OP)
    check_device("target", target, input, _OP)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor or None, got {type(t).__name__}")
        check_floating(name, t, _OP)
        check_device(name, t, input, _OP)
        if not broadcastable_to(t.shape, input.shape):
            raise RuntimeError(
                f"{_OP}: {name} of shape {tuple(t.shape)} cannot be broadcast to the input's "
                f"shape {tuple(input.shape)}"
            )
        if t.requires_grad and torch.is_grad_enabled():
            # torch's own message: the loss is not differentiable with respect to these.
            raise RuntimeError(
                f"The function '{_OP}' is not differentiable with respect to argument "
                f"'{name}'. This input cannot have requires_grad True."
            )


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Sigmoid binary cross-entropy on logits, as ``torch.nn.functional.
    binary_cross_entropy_with_logits``:
    ``loss = -w [pw y log(sigmoid(x)) + (1 - y) log(1 - sigmoid(x))]``, computed in the stable
    form ``(1 - y) x - (1 + (pw - 1) y) log(sigmoid(x))``.

    Args:
        input: logits ``x``, any shape ``(*)`` (0-d and empty included), floating dtype.
        target: ``y``, same shape as ``input``, floating (probabilities or soft labels).
        weight: per-element rescaling ``w``, broadcastable to ``(*)``.
        reduction: ``"none"`` (output ``(*)``), ``"mean"`` or ``"sum"`` (0-d output).
        pos_weight: weight ``pw`` of the positive term, broadcastable to ``(*)`` (typically
            ``(C,)`` for inputs ``(N, C)``).

    Returns:
        The loss in ``target``'s dtype, as torch returns it. Computed in fp32 (fp64 for fp64
        inputs) whatever the storage dtype; under autocast in fp32, as torch does. Gradients flow
        to ``input`` and ``target``.
    """
    return _bce_with_logits(input, target, weight, reduction, pos_weight, None)


def _bce_with_logits(input, target, weight, reduction, pos_weight, backend: str | None) -> Tensor:
    """``binary_cross_entropy_with_logits`` on ``backend`` (None: the process-wide choice); what
    BCEWithLogitsLoss calls."""
    if (
        weight is None
        and pos_weight is None
        and isinstance(reduction, str)
        and reduction in REDUCTIONS
        and _cpp_fast_path(input, target, backend)
    ):
        try:
            return _CALL["cpp"](input, target, None, None, REDUCTIONS[reduction])
        except Exception:  # noqa: BLE001  (diagnosed by the checks below, else re-raised)
            pass
    _check_args(input, target, weight, reduction, pos_weight)
    backend = _backend.resolve(input.device, "bce_with_logits", backend)
    if backend == "reference":
        return reference.bce_with_logits(input, target, weight, reduction, pos_weight)
    input, target, weight, pos_weight = autocast_to(
        torch.float32, input.device.type, input, target, weight, pos_weight
    )
    out_dtype = target.dtype
    input, target, weight, pos_weight = promote(input, target, weight, pos_weight)
    out = _CALL[backend](input, target, weight, pos_weight, REDUCTIONS[reduction])
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _cpp_fast_path(input, target, backend) -> bool:
    """Whether to call the C++ op at once, before the Python checks (as linear_act's): the cpp
    backend, eager mode, no autocast (whose casts the full path makes), input and target tensors
    of one dtype on one device. The C++ op checks the rest; when it raises, ``_check_args`` runs
    and raises the message naming the argument (torch's ValueError for a shape mismatch), else
    the error is re-raised."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return False
    dev = input.device
    return (
        target.device == dev
        and target.dtype == input.dtype
        and "cpp" in _CALL
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(dev.type)
        and resolves_to_cpp(dev, "bce_with_logits", backend)
    )
