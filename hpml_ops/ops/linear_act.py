"""Fused linear + activation, ``act(input @ weight.T + bias)``: the argument contract, fake
kernels, Triton autograd formula, spec and public functions.

Ops (schemas: ``schema.py``): ``hpml::linear_act[_backward]`` (C++: BLAS + fused epilogue on CPU,
CUDA kernels) and ``hpml::linear_act[_backward]_triton`` (``kernels/linear_act.py``). The forward
returns the output and, for ReLU / leaky ReLU, a bit-packed mask (1 bit per element, rows padded
to whole bytes) that the backward reads instead of the pre-activation; sigmoid / tanh save the
output.
"""

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import reference
from ..constants import ACT_USES_MASK, ACT_USES_OUTPUT, ACTIVATIONS, activation_code, mask_row_bytes
from . import _checks as check
from ._registry import (
    AUTOCAST_LOWER,
    OpSpec,
    autocast_on,
    on_device,
    register,
    vmap_by_loop,
    vmap_rows,
)

_OP = "linear_act"


def _allow_tf32() -> bool:
    # fp32 means fp32 unless the user opted into TF32 the way torch's own matmul is told to.
    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


def check_args(input, weight, bias, activation: int, negative_slope, *, op: bool = True) -> None:
    """The arguments ``linear_act`` accepts; the C++ launchers check the same, in the same order
    and words (``csrc/linear_act.h``). ``op``: the ops' form (a 2-D input, a bias of
    ``(out_features,)``, one dtype); else the public function's (input ``(*, in_features)``, a
    bias of one element broadcast, dtypes left to autocast when it is on)."""
    check.tensor(_OP, "input", input)
    check.tensor(_OP, "weight", weight)
    check.tensor(_OP, "bias", bias, optional=True)
    if activation not in ACTIVATIONS.values():
        raise RuntimeError(
            f"{_OP}: activation must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (sigmoid) or "
            f"4 (tanh), got {activation}"
        )
    if not isinstance(negative_slope, int | float):
        raise TypeError(
            f"{_OP}: negative_slope must be a number, got {type(negative_slope).__name__}"
        )
    if weight.dim() != 2:
        raise RuntimeError(
            f"{_OP}: weight must be 2-D (out_features, in_features), got shape "
            f"{check.shape(weight)}"
        )
    if op and input.dim() != 2:
        raise RuntimeError(
            f"{_OP}: expected a 2-D input (M, in_features), got shape {check.shape(input)}"
        )
    if input.dim() < 1:
        raise RuntimeError(f"{_OP}: input must be at least 1-D (*, in_features), got a 0-d tensor")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{_OP}: input of shape {check.shape(input)} has in_features={input.shape[-1]} but "
            f"weight of shape {check.shape(weight)} expects in_features={weight.shape[1]}"
        )
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None:
            check.floating(_OP, t, name)
    check.same_device(_OP, input, weight, "weight")
    if bias is not None:
        check.same_device(_OP, input, bias, "bias")
        if bias.shape != weight.shape[:1] and (op or bias.numel() != 1 or bias.dim() > 1):
            raise RuntimeError(
                f"{_OP}: bias of shape {check.shape(bias)} does not match "
                f"out_features={weight.shape[0]}"
            )
    if op or not autocast_on(input.device.type):
        check.same_dtype(_OP, input, weight, "weight")
        if bias is not None:
            check.same_dtype(_OP, input, bias, "bias")


def check_backward_args(grad, input, weight, output, mask, activation: int) -> None:
    """``hpml::linear_act_backward``'s contract (``csrc/linear_act.h``): the forward's, then
    ``grad`` ``(M, N)`` and what the forward saved."""
    op = "hpml::linear_act_backward"
    check_args(input, weight, None, activation, 0.0)
    m, n = input.shape[0], weight.shape[0]
    if grad.dim() != 2 or tuple(grad.shape) != (m, n):
        raise RuntimeError(f"{op}: grad of shape {check.shape(grad)}, expected {(m, n)}")
    check.same_dtype(op, input, grad, "grad")
    check.same_device(op, input, grad, "grad")
    if activation in ACT_USES_MASK:
        nb = mask_row_bytes(n)
        if not (
            mask.dtype == torch.uint8 and tuple(mask.shape) == (m, nb) and mask.is_contiguous()
        ):
            raise RuntimeError(
                f"{op}: expected a contiguous torch.uint8 mask of shape {(m, nb)}, got "
                f"{mask.dtype} {check.shape(mask)}"
            )
        check.same_device(op, input, mask, "mask")
    if activation in ACT_USES_OUTPUT:
        check.like(op, input, output, "output", grad, "grad")


def linear_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(torch.nn.functional.linear(input, weight, bias))`` in one fused kernel.

    Args:
        input: ``(*, in_features)``, 1-D and an empty batch included, any strides.
        weight: ``(out_features, in_features)``, as ``nn.Linear`` stores it (any strides).
        bias: ``(out_features,)`` (or one element, broadcast) or None.
        activation: ``"relu"``, ``"leaky_relu"`` (with ``negative_slope``), ``"sigmoid"``,
            ``"tanh"`` or ``"none"``.

    Returns:
        ``(*, out_features)`` in the input's dtype (fp32/fp16/bf16/fp64; under autocast the
        autocast dtype, as ``F.linear``). Accumulation in fp32 (fp64 for fp64); fp32 products are
        IEEE fp32 unless torch's TF32 switches allow otherwise. Gradients for input, weight and
        bias, each computed only when required. For ReLU and leaky ReLU the backward keeps 1 bit
        per output element instead of the pre-activation.
    """
    if has_torch_function_variadic(input, weight, bias):  # as torch.nn.functional's
        return handle_torch_function(
            linear_act, (input, weight, bias), input, weight, bias, activation, negative_slope
        )
    return _run(input, weight, bias, activation, negative_slope, None)


def _linear_act(input, weight, bias, activation, negative_slope, backend: str | None) -> Tensor:
    """``linear_act`` on ``backend`` (None: the process-wide choice); what FusedLinear calls."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            _linear_act, (input, weight, bias), input, weight, bias, activation, negative_slope,
            backend,
        )  # fmt: skip
    return _run(input, weight, bias, activation, negative_slope, backend)


def _run(input, weight, bias, activation, negative_slope, backend: str | None) -> Tensor:
    """The work of ``linear_act`` / ``_linear_act`` (``__torch_function__`` asked already)."""
    # The C++ op at once for a 2-D input with its operands on one device and a bias that needs
    # no broadcast.
    if (
        isinstance(input, Tensor)
        and isinstance(weight, Tensor)
        and input.dim() == 2
        and on_device(dev := input.device, weight, bias)
        and (bias is None or bias.shape == (weight.shape[0],))
        and isinstance(activation, str)
        and activation in ACTIVATIONS
        and isinstance(negative_slope, int | float)
        and OP.cpp_first(dev, backend)
    ):
        return OP.cpp(input, weight, bias, ACTIVATIONS[activation], float(negative_slope))[0]
    code = activation_code(activation, _OP)
    if _broadcast_bias(input, weight, bias):
        # A bias F.linear broadcasts over the whole output (e.g. (1, N)): no per-column vector
        # to fuse; torch's linear runs it, with its semantics (output shape included).
        return OP.reference(input, weight, bias, activation, negative_slope)
    check_args(input, weight, bias, code, negative_slope, op=False)
    backend = OP.resolve(input.device, backend)
    # Under torch.vmap its batching rule folds the batch into the rows; a weight or bias batched
    # per sample is torch's work (a batched matrix product).
    call = OP.forward_for(backend, weight, bias)
    if call is None:
        return OP.reference(input, weight, bias, activation, negative_slope)
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        bias = bias.expand(n)  # a 0-d or one-element bias, which F.linear broadcasts
    if input.dim() == 2:  # no views: each adds ~5 us and a ViewBackward node per call
        return call(input, weight, bias, code, float(negative_slope))[0]
    rows = input.shape[:-1].numel()  # not reshape(-1, k): with k = 0 the -1 is ambiguous
    out, _ = call(input.reshape(rows, k), weight, bias, code, float(negative_slope))
    return out.reshape(*input.shape[:-1], n)


def _broadcast_bias(input, weight, bias) -> bool:
    """A bias of more than one dimension that F.linear takes: it broadcasts against the output
    ``(*input.shape[:-1], out_features)``."""
    if not (isinstance(bias, Tensor) and bias.dim() > 1 and isinstance(input, Tensor)):
        return False
    if not (isinstance(weight, Tensor) and weight.dim() == 2 and input.dim() >= 1):
        return False
    try:
        torch.broadcast_shapes((*input.shape[:-1], weight.shape[0]), bias.shape)
    except RuntimeError:
        return False
    return True


def linear_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``relu(F.linear(input, weight, bias))``: ``linear_act`` with ``activation="relu"``."""
    return linear_act(input, weight, bias, "relu")


# ---- the ops: fake kernels, the Triton ops' autograd formula, registration ---------------

# As torch's linear: under autocast the product runs in the autocast dtype.
SPEC = OpSpec("linear_act", autocast=AUTOCAST_LOWER)


@SPEC.fake("linear_act")
def _fake_fwd(input, weight, bias, activation, negative_slope):
    check_args(input, weight, bias, activation, negative_slope)
    m, n = input.shape[0], weight.shape[0]
    shape = (m, mask_row_bytes(n)) if activation in ACT_USES_MASK else (0,)
    return input.new_empty((m, n)), input.new_empty(shape, dtype=torch.uint8)


@SPEC.fake("linear_act_backward")
def _fake_bwd(grad, input, weight, output, mask, activation, negative_slope, ig, wg, bg):
    check_backward_args(grad, input, weight, output, mask, activation)
    return (
        input.new_empty(input.shape if ig else (0,)),
        weight.new_empty(weight.shape if wg else (0,)),
        weight.new_empty((weight.shape[0],) if bg else (0,)),
    )


@SPEC.vmap("linear_act")
def _vmap_fwd(info, in_dims, input, weight, bias, activation, negative_slope, *, op):
    """A batch of inputs is one call on their rows stacked; a batch of weights or biases, a call
    per sample."""
    if in_dims[1] is not None or in_dims[2] is not None:
        return vmap_by_loop(info, in_dims, (input, weight, bias, activation, negative_slope), op)
    x = input.movedim(in_dims[0], 0)
    out, mask = op(x.flatten(0, 1), weight, bias, activation, negative_slope)
    batch, rows = x.shape[0], x.shape[1]
    (out, out_dim), (mask, mask_dim) = vmap_rows(out, batch, rows), vmap_rows(mask, batch, rows)
    return (out, mask), (out_dim, mask_dim)


@SPEC.setup_context
def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope = inputs
    out, mask = output
    # Only what the backward reads: the mask (1 bit per element) for relu / leaky relu, the
    # output for sigmoid / tanh; never the pre-activation.
    saved_out = out if activation in ACT_USES_OUTPUT else out.new_empty((0,))
    ctx.save_for_backward(input, weight, saved_out, mask)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mask)


@SPEC.backward
def _backward(ctx, grad, grad_mask, *, bwd_op):
    input, weight, saved_out, mask = ctx.saved_tensors
    ig, wg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    bg = ctx.has_bias and ctx.needs_input_grad[2]
    if not (ig or wg or bg):
        return None, None, None, None, None
    if reference.wants_graph(grad, input, weight, saved_out):  # (a second backward to come)
        gx, gw, gb = reference.linear_act_grads(
            grad, input, weight, saved_out, mask, ctx.activation, ctx.negative_slope, (ig, wg, bg)
        )
        return gx, gw, gb, None, None
    gx, gw, gb = bwd_op(
        grad, input, weight, saved_out, mask, ctx.activation, ctx.negative_slope, ig, wg, bg
    )
    return (gx if ig else None, gw if wg else None, gb if bg else None, None, None)


OP = register(SPEC)
