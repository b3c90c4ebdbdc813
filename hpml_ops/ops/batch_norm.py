"""Batch normalization (+ fused ReLU): the argument contracts, fake kernels, Triton autograd
formula, spec and public function.

Ops (schemas: ``schema.py``): ``hpml::batch_norm[_backward]`` (C++: CPU and CUDA kernels) and
``hpml::batch_norm[_backward]_triton`` (``kernels/batch_norm.py``), and the pieces SyncBatchNorm
combines with collectives (``batch_norm_stats``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``). The forward op is functional (an op that mutates its arguments
cannot carry an autograd formula): it returns the output, the per-channel mean and inverse
standard deviation it used and, in training, the unbiased batch variance, from which
``batch_norm`` updates the running statistics in place (two C-element ops). The backward reads
the statistics, the input and, for ReLU, the output.
"""

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import reference
from ..constants import ACTIVATIONS, BN_ACTIVATIONS, acc_dtype, activation_code
from . import _checks as check
from ._registry import (
    OpSpec,
    on_device,
    register,
    transforms_active,
    update_running,
)

_OP = "batch_norm"
_RELU = ACTIVATIONS["relu"]


def _check_input(op: str, input, activation: int) -> None:
    """The input (N, C, *), floating point, and the activation code (0 none, 1 relu)."""
    check.tensor(op, "input", input)
    if activation not in BN_ACTIVATIONS.values():
        raise RuntimeError(f"{op}: activation must be 0 (none) or 1 (relu), got {activation}")
    if input.dim() < 2:
        raise RuntimeError(
            f"{op}: expected an input of shape (N, C, *), got shape {check.shape(input)}"
        )
    check.floating(op, input, "input")


def check_args(
    input, weight, bias, running_mean, running_var, training, eps, activation: int
) -> None:
    """The arguments batch norm accepts, for the public function, the op and its fake kernel;
    the C++ launchers check the same, in the same order and words (``csrc/batch_norm.h``)."""
    _check_input(_OP, input, activation)
    params = (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    for name, t in params:
        check.per_channel(_OP, t, input.shape[1], input, name)
    # torch's rule: one dtype for all of them, the input's, or float32 for fp16/bf16 input.
    given = [(name, t.dtype) for name, t in params if t is not None]
    want = given[0][1] if given else input.dtype
    low = input.dtype in (torch.float16, torch.bfloat16)
    if given and (
        any(d != want for _, d in given) or want not in (input.dtype, *([torch.float32] * low))
    ):
        got = ", ".join(f"{name} {d}" for name, d in given)
        raise RuntimeError(
            f"{_OP}: expected weight, bias, running_mean and running_var of one dtype, the "
            f"input's ({input.dtype}) or torch.float32 for float16/bfloat16 input; got {got}"
        )
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training:
        # torch's rule (F.batch_norm's _verify_batch_size): N times the spatial size, C aside.
        size_prods = input.shape[0]
        for s in input.shape[2:]:
            size_prods *= s
        if size_prods == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
    check.bn_eps(eps, training)


def check_backward_args(op: str, grad, input, weight, output, activation, mean, invstd) -> None:
    """The backward ops' contract (``csrc/batch_norm.h``, check_backward): grad (and, for ReLU,
    the output, read for the mask) of the input's shape and dtype, per-channel vectors of C."""
    _check_input(op, input, activation)
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        check.per_channel(op, t, input.shape[1], input, name)
    check.like(op, input, grad, "grad", input, "the input's")
    if activation == _RELU:
        check.like(op, input, output, "output", input, "the input's")


def check_elemt_args(
    grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation
) -> None:
    """``hpml::batch_norm_backward_elemt``'s contract: the backward's, the group's sums, a
    positive count."""
    op = "hpml::batch_norm_backward_elemt"
    check_backward_args(op, grad, input, weight, output, activation, mean, invstd)
    check.per_channel(op, sum_dz, input.shape[1], input, "sum_dz")
    check.per_channel(op, sum_dz_xmu, input.shape[1], input, "sum_dz_xmu")
    if count <= 0:
        raise RuntimeError(f"{op}: count must be positive, got {count}")


def _stats(input: Tensor, n: int) -> tuple[Tensor, ...]:
    """n empty per-channel vectors in the statistics' dtype (fp32, fp64 for fp64)."""
    return tuple(input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype)) for _ in range(n))


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
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight, bias, training, momentum, eps, activation,
        )  # fmt: skip
    return _run(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation, None
    )


def _batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend
) -> Tensor:
    """``batch_norm`` on ``backend`` (None: the process-wide choice); what the modules call."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            _batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight, bias, training, momentum, eps, activation, backend,
        )  # fmt: skip
    return _run(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend
    )


def _run(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend
) -> Tensor:
    """The work of ``batch_norm`` / ``_batch_norm`` (``__torch_function__`` asked already)."""
    args = (input, weight, bias, running_mean, running_var)
    if type(momentum) is not float and not isinstance(momentum, int | float):
        raise TypeError(  # torch's words (its binding's check), in every mode
            "batch_norm(): argument 'momentum' (position 7) must be float, not "
            f"{type(momentum).__name__}"
        )
    # The C++ op at once when every operand is a tensor on the input's device (or None).
    if (
        isinstance(input, Tensor)
        and input.dim() > 1
        and activation in (None, "none", "relu")
        and on_device(dev := input.device, weight, bias, running_mean, running_var)
        and OP.cpp_first(dev, backend)
    ):
        code = BN_ACTIVATIONS[activation]
        out, mean, _, var = OP.cpp(*args, bool(training), float(eps), code)
    else:
        code = activation_code(activation, _OP, BN_ACTIVATIONS)
        if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
            # torch's rule: a 1-D input has no channel dimension; an empty one comes back as it
            # is (a copy), whatever the statistics, which stay untouched.
            check.floating(_OP, input, "input")
            return input.clone()
        check_args(*args, training, eps, code)
        if torch.is_grad_enabled():  # (the C++ ops' autograd formula checks this itself)
            check.running_stats_untracked(
                "hpml::batch_norm", (("running_mean", running_mean), ("running_var", running_var))
            )
        backend = OP.resolve(input.device, backend)
        call = OP.forward_for(backend)
        if call is None:
            return OP.reference(
                input, running_mean, running_var, weight, bias, training, momentum, eps, activation
            )
        if training and transforms_active():
            _check_vmap_running_stats(input, running_mean, running_var)
        out, mean, _, var = call(*args, bool(training), float(eps), code)
    if training and running_mean is not None and running_var is not None and input.numel() > 0:
        # running = (1 - momentum) running + momentum batch (the variance unbiased), as torch,
        # written running + momentum (batch - running): one op per statistic instead of two
        # (the same value to an ulp; the small layers of a training step are all call overhead).
        with torch.no_grad():
            update_running(running_mean, mean, momentum)
            update_running(running_var, var, momentum)
    return out


def _check_vmap_running_stats(input, running_mean, running_var) -> None:
    """torch's rule under vmap: batch statistics of a batched input cannot update unbatched
    running statistics in place (torch's words)."""
    if not _is_batched(input):
        return
    for t in (running_mean, running_var):
        if t is not None and not _is_batched(t):
            raise RuntimeError(_VMAP_RUNNING_STATS)


_is_batched = torch._C._functorch.is_batchedtensor
_VMAP_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval "
    "mode, please set `track_running_stats` to be False.If you are using a prebuilt module and "
    "do not need eval mode, please see the functorch website for resources on how to patch your "
    "module to work with vmap"
)


# ---- the ops: fake kernels, the Triton ops' autograd formula, registration ---------------

# As torch's batch_norm under autocast: the input as it comes, statistics in fp32.
SPEC = OpSpec("batch_norm", autocast=None)


@SPEC.fake("batch_norm")
def _fake_fwd(input, weight, bias, running_mean, running_var, training, eps, activation):
    check_args(input, weight, bias, running_mean, running_var, training, eps, activation)
    mean, invstd = _stats(input, 2)
    var = mean.new_empty((input.shape[1],) if training else (0,))
    return torch.empty_like(input), mean, invstd, var


@SPEC.fake("batch_norm_backward")
def _fake_bwd(grad, input, weight, output, mean, invstd, training, activation, ig, wg, bg):
    check_backward_args(
        "hpml::batch_norm_backward", grad, input, weight, output, activation, mean, invstd
    )
    c = input.shape[1]
    wdt = weight.dtype if weight is not None else input.dtype
    return (
        torch.empty_like(input) if ig else input.new_empty((0,)),
        input.new_empty((c,) if wg else (0,), dtype=wdt),
        input.new_empty((c,) if bg else (0,), dtype=wdt),
    )


@SPEC.fake("batch_norm_stats")
def _fake_stats(input):
    _check_input("hpml::batch_norm_stats", input, 0)
    return _stats(input, 2)


@SPEC.fake("batch_norm_backward_reduce")
def _fake_reduce(grad, input, output, mean, activation):
    check_backward_args(
        "hpml::batch_norm_backward_reduce", grad, input, None, output, activation, mean, None
    )
    return _stats(input, 2)


@SPEC.fake("batch_norm_backward_elemt")
def _fake_elemt(grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation):
    check_elemt_args(
        grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation
    )
    return torch.empty_like(input)


@SPEC.vmap("batch_norm")
def _vmap_fwd(info, in_dims, input, weight, bias, running_mean, running_var, training, eps,
              activation, *, op):  # fmt: skip
    """torch's batching rule: the batch folded into the channels, ``(N, B, C, *)`` as
    ``(N, B*C, *)``, so that one call normalises every sample's channels over its own rows;
    per-channel operands batched as ``(B*C,)``, unbatched ones repeated."""
    batch = info.batch_size
    if in_dims[0] is not None:
        x = input.movedim(in_dims[0], 1)
    else:
        x = input.unsqueeze(1).expand(input.shape[0], batch, *input.shape[1:])
    n, c, rest = x.shape[0], x.shape[2], x.shape[3:]

    def channels(t, d):
        if t is None:
            return None
        return t.repeat(batch) if d is None else t.movedim(d, 0).reshape(batch * c)

    per_channel = (weight, bias, running_mean, running_var)
    args = [channels(t, d) for t, d in zip(per_channel, in_dims[1:5], strict=True)]
    out, *stats = op(x.reshape(n, batch * c, *rest), *args, training, eps, activation)

    def unfold(t):
        if t.dim() == 1 and t.numel() == batch * c and t.numel() > 0:
            return t.reshape(batch, c), 0
        return t, None

    stats, dims = zip(*(unfold(t) for t in stats), strict=True)
    return (out.reshape(n, batch, c, *rest), *stats), (1, *dims)


@SPEC.setup_context
def _setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, eps, activation = inputs
    out, mean, invstd, var = output
    # The output is read only for the ReLU mask.
    saved_out = out if activation == _RELU else out.new_empty((0,))
    ctx.save_for_backward(input, weight, saved_out, mean, invstd)
    ctx.training = training
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, invstd, var)


@SPEC.backward
def _backward(ctx, grad, grad_mean, grad_invstd, grad_var, *, bwd_op):
    input, weight, saved_out, mean, invstd = ctx.saved_tensors
    ig = ctx.needs_input_grad[0]
    wg = weight is not None and ctx.needs_input_grad[1]
    bg = ctx.has_bias and ctx.needs_input_grad[2]
    if not (ig or wg or bg):
        return (None,) * 8
    if reference.wants_graph(grad, input, weight, saved_out):  # (a second backward to come)
        grads = reference.batch_norm_grads(
            grad, input, weight, saved_out, mean, invstd, ctx.training, ctx.activation == _RELU,
            (ig, wg, bg),
        )  # fmt: skip
        return grads + (None,) * 5
    gx, gw, gb = bwd_op(
        grad, input, weight, saved_out, mean, invstd, ctx.training, ctx.activation, ig, wg, bg
    )
    return (gx if ig else None, gw if wg else None, gb if bg else None) + (None,) * 5


OP = register(SPEC)
