"""Batch normalization (+ fused ReLU): the public function, the custom ops of each backend, their
fake kernels, autograd formula (for the Triton ops; the C++ ops carry the same formula in C++,
csrc/autograd.cpp) and autocast policy.

Ops: ``hpml::batch_norm[_backward]`` (C++: CPU kernels; schema in csrc/ops.cpp) and
``hpml::batch_norm[_backward]_triton`` (kernels/batch_norm.py). The forward op is functional (an
op that mutates its arguments cannot carry an autograd formula): it returns the output, the
per-channel mean and inverse standard deviation it used and, in training, the unbiased batch
variance, from which ``batch_norm`` updates the running statistics in place (two C-element ops).
The backward reads the statistics, the input and, for ReLU, the output.
"""

import torch
from torch import Tensor

from .. import _backend, reference
from ._registry import check_device, check_floating, register_op_pair, resolves_to_cpp

_OP = "batch_norm"
ACTIVATIONS = {None: 0, "none": 0, "relu": 1}


@torch.library.custom_op("hpml::batch_norm_triton", mutates_args=())
def _batch_norm_triton(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    activation: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.batch_norm import batch_norm_fwd

    return batch_norm_fwd(input, weight, bias, running_mean, running_var, training, eps, activation)


@torch.library.custom_op("hpml::batch_norm_backward_triton", mutates_args=())
def _batch_norm_backward_triton(
    grad: Tensor,
    input: Tensor,
    weight: Tensor | None,
    output: Tensor,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    activation: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.batch_norm import batch_norm_bwd

    return batch_norm_bwd(
        grad,
        input,
        weight,
        output,
        mean,
        invstd,
        training,
        activation,
        input_grad,
        weight_grad,
        bias_grad,
    )


@torch.library.custom_op("hpml::batch_norm_stats_triton", mutates_args=())
def _batch_norm_stats_triton(input: Tensor) -> tuple[Tensor, Tensor]:
    from ..kernels.batch_norm import batch_norm_stats

    return batch_norm_stats(input)


@torch.library.custom_op("hpml::batch_norm_backward_reduce_triton", mutates_args=())
def _batch_norm_backward_reduce_triton(
    grad: Tensor, input: Tensor, output: Tensor, mean: Tensor, activation: int
) -> tuple[Tensor, Tensor]:
    from ..kernels.batch_norm import batch_norm_backward_reduce

    return batch_norm_backward_reduce(grad, input, output, mean, activation)


@torch.library.custom_op("hpml::batch_norm_backward_elemt_triton", mutates_args=())
def _batch_norm_backward_elemt_triton(
    grad: Tensor,
    input: Tensor,
    weight: Tensor | None,
    output: Tensor,
    mean: Tensor,
    invstd: Tensor,
    sum_dz: Tensor,
    sum_dz_xmu: Tensor,
    count: int,
    activation: int,
) -> Tensor:
    from ..kernels.batch_norm import batch_norm_backward_elemt

    return batch_norm_backward_elemt(
        grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation
    )


def _stat_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _fake_fwd(input, weight, bias, running_mean, running_var, training, eps, activation):
    c = input.shape[1]
    out = torch.empty_like(input)
    stats = input.new_empty((c,), dtype=_stat_dtype(input))
    var = input.new_empty((c,) if training else (0,), dtype=_stat_dtype(input))
    return out, stats, torch.empty_like(stats), var


def _fake_bwd(grad, input, weight, output, mean, invstd, training, activation, ig, wg, bg):
    c = input.shape[1]
    wdt = weight.dtype if weight is not None else input.dtype
    return (
        torch.empty_like(input) if ig else input.new_empty((0,)),
        input.new_empty((c,) if wg else (0,), dtype=wdt),
        input.new_empty((c,) if bg else (0,), dtype=wdt),
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, eps, activation = inputs
    out, mean, invstd, var = output
    # The output is read only for the ReLU mask.
    saved_out = out if activation == 1 else out.new_empty((0,))
    ctx.save_for_backward(input, weight, saved_out, mean, invstd)
    ctx.training = training
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, invstd, var)


def _backward(ctx, grad, grad_mean, grad_invstd, grad_var, *, bwd_op):
    input, weight, saved_out, mean, invstd = ctx.saved_tensors
    ig = ctx.needs_input_grad[0]
    wg = weight is not None and ctx.needs_input_grad[1]
    bg = ctx.has_bias and ctx.needs_input_grad[2]
    if not (ig or wg or bg):
        return (None,) * 8
    gx, gw, gb = bwd_op(
        grad, input, weight, saved_out, mean, invstd, ctx.training, ctx.activation, ig, wg, bg
    )
    return (gx if ig else None, gw if wg else None, gb if bg else None) + (None,) * 5


_OPS = {
    "triton": (
        torch.ops.hpml.batch_norm_triton.default,
        torch.ops.hpml.batch_norm_backward_triton.default,
    )
}
if _backend.HAS_EXTENSION:
    _OPS["cpp"] = (torch.ops.hpml.batch_norm.default, torch.ops.hpml.batch_norm_backward.default)

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
        # As torch's batch_norm under autocast: the input as it comes, statistics in fp32.
        autocast_dtype=None,
        cpp_autograd=_name == "cpp",
    )


def _fake_stats(input):
    stats = input.new_empty((input.shape[1],), dtype=_stat_dtype(input))
    return stats, torch.empty_like(stats)


def _fake_reduce(grad, input, output, mean, activation):
    return _fake_stats(input)


def _fake_elemt(grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation):
    return torch.empty_like(input)


# The pieces SyncBatchNorm (hpml_ops.nn.SyncBatchNorm) combines with collectives: per backend,
# (forward, stats, backward_reduce, backward_elemt). No autograd formula of their own: the
# module's autograd.Function calls them.
SYNC_OPS = {
    "triton": (
        torch.ops.hpml.batch_norm_triton.default,
        torch.ops.hpml.batch_norm_stats_triton.default,
        torch.ops.hpml.batch_norm_backward_reduce_triton.default,
        torch.ops.hpml.batch_norm_backward_elemt_triton.default,
    )
}
if _backend.HAS_EXTENSION:
    SYNC_OPS["cpp"] = (
        torch.ops.hpml.batch_norm.default,
        torch.ops.hpml.batch_norm_stats.default,
        torch.ops.hpml.batch_norm_backward_reduce.default,
        torch.ops.hpml.batch_norm_backward_elemt.default,
    )
for _ops in SYNC_OPS.values():
    for _op, _fake in zip(_ops[1:], (_fake_stats, _fake_reduce, _fake_elemt), strict=True):
        torch.library.register_fake(_op)(_fake)


def _check_args(input, running_mean, running_var, weight, bias, training, activation):
    if not isinstance(input, Tensor):
        raise TypeError(f"{_OP}: input must be a Tensor, got {type(input).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be None, 'none' or 'relu', got {activation!r}")
    if input.dim() < 2:
        raise RuntimeError(
            f"{_OP}: expected an input of shape (N, C, *), got shape {tuple(input.shape)}"
        )
    check_floating("input", input, _OP)
    c = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != c:
            raise RuntimeError(
                f"{_OP}: {name} should contain {c} elements (one per channel), got shape "
                f"{tuple(t.shape)}"
            )
        check_floating(name, t, _OP)
        check_device(name, t, input, _OP)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training:
        size_prods = input.shape[0]
        for s in input.shape[2:]:
            size_prods *= s
        if size_prods == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` (then ReLU when ``activation="relu"``, fused).

    Args:
        input: ``(N, C, *)`` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...), contiguous or
            channels last, fp32/fp16/bf16/fp64.
        running_mean, running_var: ``(C,)`` or None; updated in place in training, as torch does
            (the variance unbiased); required in evaluation mode.
        weight, bias: ``(C,)`` affine parameters gamma and beta, or None.
        training: normalise with the batch statistics (and update the running ones), else with
            the running statistics.

    Returns:
        The input's shape, dtype and memory format. Statistics are computed in fp32 (fp64 for
        fp64), from shifted sums that stay exact for data with a large offset.
    """
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation, None
    )


def _batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend
) -> Tensor:
    """``batch_norm`` on ``backend`` (None: the process-wide choice); what the modules call."""
    done = False
    if _cpp_fast_path(input, running_mean, running_var, weight, bias, backend):
        code = ACTIVATIONS.get(activation) if isinstance(activation, str | None) else None
        if code is not None:
            try:
                out, mean, _, var = _CALL["cpp"](
                    input, weight, bias, running_mean, running_var, bool(training), float(eps), code
                )
                done = True
            except Exception:  # noqa: BLE001  (diagnosed by the checks below, else re-raised)
                pass
    if not done:
        _check_args(input, running_mean, running_var, weight, bias, training, activation)
        backend = _backend.resolve(input.device, _OP, backend)
        if backend == "reference":
            return reference.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps, activation
            )
        out, mean, _, var = _CALL[backend](
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bool(training),
            float(eps),
            ACTIVATIONS[activation],
        )
    if training and running_mean is not None and running_var is not None and input.numel() > 0:
        # running = (1 - momentum) running + momentum batch (the variance unbiased), as torch,
        # written running + momentum (batch - running): one op per statistic instead of two
        # (the same value to an ulp; the small layers of a training step are all call overhead).
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype), momentum)
    return out


def _cpp_fast_path(input, running_mean, running_var, weight, bias, backend) -> bool:
    """Whether to call the C++ op at once, before the Python checks (as linear_act's): the
    cpp backend, eager mode, every operand a tensor on the input's device or None. The C++ op
    checks the rest; when it raises, ``_check_args`` runs and raises the message naming the
    argument (and torch's ValueError for one value per channel), else the error is re-raised."""
    if not isinstance(input, Tensor):
        return False
    dev = input.device
    for t in (running_mean, running_var, weight, bias):
        if t is not None and not (isinstance(t, Tensor) and t.device == dev):
            return False
    return (
        "cpp" in _CALL and not torch.compiler.is_compiling() and resolves_to_cpp(dev, _OP, backend)
    )
