"""Fused linear + activation, ``act(input @ weight.T + bias)``: the public functions, the custom
ops of each backend, their fake kernels, autograd formula (for the Triton ops; the C++ ops carry
the same formula in C++, csrc/autograd.cpp) and autocast policy.

Ops: ``hpml::linear_act[_backward]`` (C++: BLAS + fused epilogue on CPU, CUDA kernels; schema in
csrc/ops.cpp) and ``hpml::linear_act[_backward]_triton`` (kernels/linear_act.py). The forward
returns the output and, for ReLU / leaky ReLU, a bit-packed mask (1 bit per element, rows padded to
whole bytes) that the backward reads instead of the pre-activation; sigmoid / tanh save the output.
"""

import torch
from torch import Tensor

from .. import _backend, reference
from ._registry import (
    check_device,
    check_floating,
    register_autocast_lower_precision,
    register_op_pair,
    resolves_to_cpp,
)

_OP = "linear_act"
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}
_MASKED = (1, 2)  # relu, leaky_relu: the backward reads the mask
_FROM_OUTPUT = (3, 4)  # sigmoid, tanh: the backward reads the output


def _allow_tf32() -> bool:
    # fp32 means fp32 unless the user opted into TF32 the way torch's own matmul is told to.
    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


@torch.library.custom_op("hpml::linear_act_triton", mutates_args=())
def _linear_act_triton(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: int,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    from ..kernels.linear_act import linear_act_fwd

    _check_op_args(input, weight, bias, activation)
    return linear_act_fwd(input, weight, bias, activation, negative_slope, _allow_tf32())


@torch.library.custom_op("hpml::linear_act_backward_triton", mutates_args=())
def _linear_act_backward_triton(
    grad: Tensor,
    input: Tensor,
    weight: Tensor,
    output: Tensor,
    mask: Tensor,
    activation: int,
    negative_slope: float,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.linear_act import linear_act_bwd

    _check_op_args(input, weight, None, activation)
    if grad.shape != (input.shape[0], weight.shape[0]):
        raise RuntimeError(
            f"hpml::linear_act_backward: grad of shape {tuple(grad.shape)}, expected "
            f"{(input.shape[0], weight.shape[0])}"
        )
    return linear_act_bwd(
        grad,
        input,
        weight,
        output,
        mask,
        activation,
        negative_slope,
        input_grad,
        weight_grad,
        bias_grad,
        _allow_tf32(),
    )


def _check_op_args(input, weight, bias, activation) -> None:
    """What hpml::check_linear_act (csrc/linear_act.h) checks, for the Triton ops."""
    if input.dim() != 2 or weight.dim() != 2:
        raise RuntimeError(
            f"hpml::linear_act: expected a 2-D input and weight, got {tuple(input.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if input.shape[1] != weight.shape[1]:
        raise RuntimeError(
            f"hpml::linear_act: input of shape {tuple(input.shape)} has in_features="
            f"{input.shape[1]} but weight of shape {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(
                f"Expected {name} of dtype {input.dtype} (the input's dtype), got {t.dtype}"
            )
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected {name} on {input.device} (the input's device), got {t.device}"
            )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeError(
            f"hpml::linear_act: bias of shape {tuple(bias.shape)} does not match "
            f"out_features={weight.shape[0]}"
        )
    if activation not in ACTIVATIONS.values():
        raise RuntimeError(f"hpml::linear_act: unknown activation code {activation}")


def _fake_fwd(input, weight, bias, activation, negative_slope):
    torch._check(input.dim() == 2 and weight.dim() == 2, lambda: "2-D input and weight expected")
    torch._check(input.shape[1] == weight.shape[1], lambda: "in_features mismatch")
    m, n = input.shape[0], weight.shape[0]
    out = input.new_empty((m, n))
    shape = (m, (n + 7) // 8) if activation in _MASKED else (0,)
    return out, input.new_empty(shape, dtype=torch.uint8)


def _fake_bwd(grad, input, weight, output, mask, activation, negative_slope, ig, wg, bg):
    return (
        input.new_empty(input.shape if ig else (0,)),
        weight.new_empty(weight.shape if wg else (0,)),
        weight.new_empty((weight.shape[0],) if bg else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope = inputs
    out, mask = output
    # Only what the backward reads: the mask (1 bit per element) for relu / leaky relu, the
    # output for sigmoid / tanh; never the pre-activation.
    saved_out = out if activation in _FROM_OUTPUT else out.new_empty((0,))
    ctx.save_for_backward(input, weight, saved_out, mask)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mask)


def _backward(ctx, grad, grad_mask, *, bwd_op):
    input, weight, saved_out, mask = ctx.saved_tensors
    ig, wg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    bg = ctx.has_bias and ctx.needs_input_grad[2]
    if not (ig or wg or bg):
        return None, None, None, None, None
    gx, gw, gb = bwd_op(
        grad, input, weight, saved_out, mask, ctx.activation, ctx.negative_slope, ig, wg, bg
    )
    return (gx if ig else None, gw if wg else None, gb if bg else None, None, None)


_OPS = {
    "triton": (
        torch.ops.hpml.linear_act_triton.default,
        torch.ops.hpml.linear_act_backward_triton.default,
    )
}
if _backend.HAS_EXTENSION:
    _OPS["cpp"] = (torch.ops.hpml.linear_act.default, torch.ops.hpml.linear_act_backward.default)

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
        autocast_dtype=None,
        cpp_autograd=_name == "cpp",
    )
    # As torch's linear: under autocast the product runs in the autocast dtype.
    register_autocast_lower_precision(_fwd)


def _check_args(input, weight, bias, activation, negative_slope):
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{_OP}: bias must be a Tensor or None, got {type(bias).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{_OP}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got "
            f"{activation!r}"
        )
    if not isinstance(negative_slope, int | float):
        raise TypeError(
            f"{_OP}: negative_slope must be a number, got {type(negative_slope).__name__}"
        )
    if weight.dim() != 2:
        raise RuntimeError(
            f"{_OP}: weight must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    if input.dim() < 1:
        raise RuntimeError(f"{_OP}: input must be at least 1-D (*, in_features), got a 0-d tensor")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{_OP}: input of shape {tuple(input.shape)} has in_features={input.shape[-1]} but "
            f"weight of shape {tuple(weight.shape)} expects in_features={weight.shape[1]}"
        )
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_floating(name, t, _OP)
    check_device("weight", weight, input, _OP)
    if bias is not None:
        check_device("bias", bias, input, _OP)
        if bias.shape not in ((weight.shape[0],), (), (1,)):
            raise RuntimeError(
                f"{_OP}: bias of shape {tuple(bias.shape)} does not match out_features="
                f"{weight.shape[0]}"
            )
    if not torch.is_autocast_enabled(input.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != input.dtype:
                raise RuntimeError(
                    f"{_OP}: expected {name} of dtype {input.dtype} (the input's dtype), got "
                    f"{t.dtype}"
                )


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
        bias: ``(out_features,)`` or None.
        activation: ``"relu"``, ``"leaky_relu"`` (with ``negative_slope``), ``"sigmoid"``,
            ``"tanh"`` or ``"none"``.

    Returns:
        ``(*, out_features)`` in the input's dtype (fp32/fp16/bf16/fp64; under autocast the
        autocast dtype, as ``F.linear``). Accumulation in fp32 (fp64 for fp64); fp32 products are
        IEEE fp32 unless torch's TF32 switches allow otherwise. Gradients for input, weight and
        bias, each computed only when required. For ReLU and leaky ReLU the backward keeps 1 bit
        per output element instead of the pre-activation.
    """
    return _linear_act(input, weight, bias, activation, negative_slope, None)


def _linear_act(input, weight, bias, activation, negative_slope, backend: str | None) -> Tensor:
    """``linear_act`` on ``backend`` (None: the process-wide choice); what FusedLinear calls."""
    if _cpp_fast_path(input, weight, bias, backend):
        code = ACTIVATIONS.get(activation) if isinstance(activation, str) else None
        if code is not None and isinstance(negative_slope, int | float):
            try:
                return _CALL["cpp"](input, weight, bias, code, float(negative_slope))[0]
            except Exception:  # noqa: BLE001  (diagnosed by the checks below, else re-raised)
                pass
    _check_args(input, weight, bias, activation, negative_slope)
    backend = _backend.resolve(input.device, "linear_act", backend)
    if backend == "reference":
        return reference.linear_act(input, weight, bias, activation, negative_slope)
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        bias = bias.expand(n)  # a 0-d or one-element bias, which F.linear broadcasts
    if input.dim() == 2:  # no views: each adds ~5 us and a ViewBackward node per call
        out, _ = _CALL[backend](input, weight, bias, ACTIVATIONS[activation], float(negative_slope))
        return out
    x2 = input.reshape(-1, k)
    out, _ = _CALL[backend](x2, weight, bias, ACTIVATIONS[activation], float(negative_slope))
    return out.reshape(*input.shape[:-1], n)


def _cpp_fast_path(input, weight, bias, backend: str | None) -> bool:
    """Whether to call the C++ op at once, before the Python checks: a 2-D input, the cpp
    backend, eager mode, every operand on the input's device (the dispatcher would otherwise
    pick one device's kernel: the meta one returns without complaint). The C++ op checks the
    rest (shapes, dtypes, floating point); when it raises, ``_check_args`` runs and raises the
    message naming the argument, or the slow path retries (a 0-d bias, broadcast there). On the
    small layers of a training step the Python checks cost more than the layer's arithmetic."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.dim() == 2):
        return False
    dev = input.device
    return (
        weight.device == dev
        and (bias is None or (isinstance(bias, Tensor) and bias.device == dev))
        and "cpp" in _CALL
        and not torch.compiler.is_compiling()
        and resolves_to_cpp(dev, "linear_act", backend)
    )


def linear_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``relu(F.linear(input, weight, bias))``: ``linear_act`` with ``activation="relu"``."""
    return linear_act(input, weight, bias, "relu")
