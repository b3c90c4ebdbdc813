"""Sigmoid binary cross-entropy with logits: the argument contract, fake kernels, Triton autograd
formula, spec and public function.

Ops (schemas: ``schema.py``): ``hpml::bce_with_logits[_backward]`` (C++: CPU kernels, CUDA
kernels) and ``hpml::bce_with_logits[_backward]_triton`` (``kernels/bce_with_logits.py``). Both are
``torch.library`` ops with a registered fake kernel, so opcheck and
``torch.compile(fullgraph=True)`` treat them alike on a GPU and under ``TRITON_INTERPRET=1``
(``triton_op`` would let Inductor look inside the Triton kernel on a GPU, but fails under the
interpreter; a ``custom_op`` passes in both places, and the kernel is already fused).
"""

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import reference
from ..constants import REDUCTIONS
from . import _checks as check
from ._registry import (
    OpSpec,
    autocast_enabled,
    autocast_to,
    promote,
    register,
)

_OP = "binary_cross_entropy_with_logits"


def check_args(input, target, weight, pos_weight, reduction: int, *, op: bool = True) -> None:
    """The arguments the loss accepts; the C++ launchers check the same, in the same order and
    words (``csrc/bce_with_logits.h``). ``op``: the ops' form (one dtype for every tensor); else
    the public function's (mixed floating dtypes, promoted)."""
    check.tensor(_OP, "input", input)
    check.tensor(_OP, "target", target)
    check.tensor(_OP, "weight", weight, optional=True)
    check.tensor(_OP, "pos_weight", pos_weight, optional=True)
    if reduction not in REDUCTIONS.values():
        raise RuntimeError(
            f"{_OP}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}"
        )
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    check.floating(_OP, input, "input")
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        check.floating(_OP, t, name)
        check.same_device(_OP, input, t, name)
        if op:
            check.same_dtype(_OP, input, t, name)
        if name != "target" and not check.broadcastable_to(t.shape, input.shape):
            raise RuntimeError(
                f"{_OP}: {name} of shape {check.shape(t)} cannot be broadcast to the input's shape "
                f"{check.shape(input)}"
            )


def check_backward_args(grad, input, target, weight, pos_weight, reduction: int) -> None:
    """``hpml::bce_with_logits_backward``'s contract (``csrc/bce_with_logits.h``)."""
    op = "hpml::bce_with_logits_backward"
    check_args(input, target, weight, pos_weight, reduction)
    check.same_device(op, input, grad, "grad")
    check.loss_grad(op, grad, reduction == REDUCTIONS["none"], input, "the input's shape")


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
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            binary_cross_entropy_with_logits, (input, target, weight, pos_weight), input, target,
            weight, reduction, pos_weight,
        )  # fmt: skip
    return _run(input, target, weight, reduction, pos_weight, None)


def _bce_with_logits(input, target, weight, reduction, pos_weight, backend: str | None) -> Tensor:
    """``binary_cross_entropy_with_logits`` on ``backend`` (None: the process-wide choice); what
    BCEWithLogitsLoss calls."""
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            _bce_with_logits, (input, target, weight, pos_weight), input, target, weight,
            reduction, pos_weight, backend,
        )  # fmt: skip
    return _run(input, target, weight, reduction, pos_weight, backend)


def _run(input, target, weight, reduction, pos_weight, backend: str | None) -> Tensor:
    """The work of ``binary_cross_entropy_with_logits`` / ``_bce_with_logits``
    (``__torch_function__`` asked already)."""
    # The C++ op at once for input and target of one dtype on one device, no weights and no
    # autocast (whose casts the full path makes).
    if (
        weight is None
        and pos_weight is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and target.device == (dev := input.device)
        and target.dtype == input.dtype
        and isinstance(reduction, str)
        and reduction in REDUCTIONS
        and not autocast_enabled()
        and OP.cpp_first(dev, backend)
    ):
        return OP.cpp(input, target, None, None, REDUCTIONS[reduction])
    if not (isinstance(reduction, str) and reduction in REDUCTIONS):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    code = REDUCTIONS[reduction]
    check_args(input, target, weight, pos_weight, code, op=False)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            # torch's own message: the loss is not differentiable with respect to these.
            raise RuntimeError(
                f"The function '{_OP}' is not differentiable with respect to argument "
                f"'{name}'. This input cannot have requires_grad True."
            )
    backend = OP.resolve(input.device, backend)
    call = OP.forward_for(backend)
    if call is None:
        return OP.reference(input, target, weight, reduction, pos_weight)
    input, target, weight, pos_weight = autocast_to(
        torch.float32, input.device.type, input, target, weight, pos_weight
    )
    out_dtype = target.dtype
    input, target, weight, pos_weight = promote(input, target, weight, pos_weight)
    out = call(input, target, weight, pos_weight, code)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ---- the ops: fake kernels, the Triton ops' autograd formula, registration ---------------

# As torch: binary_cross_entropy_with_logits runs in fp32 under autocast.
SPEC = OpSpec("bce_with_logits", autocast=torch.float32)


@SPEC.fake("bce_with_logits")
def _fake_fwd(input, target, weight, pos_weight, reduction):
    check_args(input, target, weight, pos_weight, reduction)
    return input.new_empty(input.shape if reduction == REDUCTIONS["none"] else ())


@SPEC.fake("bce_with_logits_backward")
def _fake_bwd(grad, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    check_backward_args(grad, input, target, weight, pos_weight, reduction)
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        input.new_empty(input.shape if target_grad else (0,)),
    )


@SPEC.vmap("bce_with_logits")
def _vmap_fwd(info, in_dims, input, target, weight, pos_weight, reduction, *, op):
    """A batch of losses is one call on the whole batch with reduction "none" (every operand
    batched or broadcast along a leading batch dimension), reduced per sample after it."""
    batch = info.batch_size
    rank = input.dim() - (in_dims[0] is not None)  # the per-sample (logical) rank

    def lift(t, d):  # batch dimension first, the sample's dimensions aligned to the right
        if t is None or d is None:
            return t
        t = t.movedim(d, 0)
        return t.reshape(batch, *[1] * (rank + 1 - t.dim()), *t.shape[1:])

    operands = (input, target, weight, pos_weight)
    x, y, w, pw = (lift(t, d) for t, d in zip(operands, in_dims[:4], strict=True))
    shape = x.shape if in_dims[0] is not None else (batch, *input.shape)
    loss = op(x.expand(shape), y.expand(shape), w, pw, REDUCTIONS["none"])
    if reduction != REDUCTIONS["none"] and rank > 0:
        dims = tuple(range(1, rank + 1))
        loss = loss.sum(dims) if reduction == REDUCTIONS["sum"] else loss.mean(dims)
    return loss, 0


@SPEC.setup_context
def _setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.reduction = reduction


@SPEC.backward
def _backward(ctx, grad, *, bwd_op):
    input, target, weight, pos_weight = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_input or need_target):
        return None, None, None, None, None
    if reference.wants_graph(grad, input, target, weight, pos_weight):  # (a second backward)
        grads = reference.bce_with_logits_grads(
            grad, input, target, weight, pos_weight, ctx.reduction, (need_input, need_target)
        )
        return grads + (None, None, None)
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


OP = register(SPEC)
