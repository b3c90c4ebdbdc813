"""A whole MLP and the sigmoid BCE-with-logits loss of its output as one op forward and one op
backward: the argument contract, fake kernels, Triton autograd formula, spec and public function.

Ops (schemas: ``schema.py``): ``hpml::mlp_bce_with_logits[_backward]`` (C++:
``csrc/mlp_bce_with_logits.{h,cpp}``: on CPU the backward of an fp32/fp64 net starts from the
loss inside the whole-network kernel, the last layer's dZ computed from the loss a block of rows
at a time, never a logits gradient of its own) and ``hpml::mlp_bce_with_logits[_backward]_triton``
(``kernels/mlp_bce_with_logits.py``: likewise inside the net's fused backward kernel, for the nets
that kernel runs). The forward returns the loss, the logits (for metrics; not
differentiable) and what the net's backward needs, as ``hpml::mlp``; ``mlp_bce_with_logits``
updates the running statistics in place.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from .. import reference
from ..constants import ACTIVATIONS, REDUCTIONS, activation_code
from . import _checks as check
from ._registry import OpSpec, autocast_enabled, on_device, register, transforms_active

# The module (the package's attribute of that name is the public function).
_mlp = importlib.import_module(".mlp", __package__)
_OP = "mlp_bce_with_logits"
_NAMES = {code: name for name, code in ACTIVATIONS.items()}
_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}
SAVED_PER_LAYER = _mlp.SAVED_PER_LAYER


def check_loss(input, m: int, n: int, target, weight, pos_weight, reduction: int) -> None:
    """The loss's operands against logits ``(m, n)`` in the input's dtype and device
    (``csrc/mlp_bce_with_logits.h``: check_mlp_bce_loss, same order and words)."""
    if reduction not in REDUCTIONS.values():
        raise RuntimeError(
            f"{_OP}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}"
        )
    check.tensor(_OP, "target", target)
    if tuple(target.shape) != (m, n):
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({torch.Size([m, n])})"
        )
    check.floating(_OP, target, "target")
    check.same_device(_OP, input, target, "target")
    check.same_dtype(_OP, input, target, "target")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        check.tensor(_OP, name, t)
        check.floating(_OP, t, name)
        check.same_device(_OP, input, t, name)
        check.same_dtype(_OP, input, t, name)
        if not check.broadcastable_to(t.shape, torch.Size([m, n])):
            raise RuntimeError(
                f"{_OP}: {name} of shape {check.shape(t)} cannot be broadcast to the input's "
                f"shape ({m}, {n})"
            )


def check_args(
    input, target, weight, pos_weight, reduction, weights, biases, batch_norm, bn_weights,
    bn_biases, running_means, running_vars, training, eps, activation, negative_slope,
) -> None:  # fmt: skip
    """The arguments hpml::mlp_bce_with_logits accepts: the net's (``mlp.check_args``, no
    output activation), then the loss's."""
    _mlp.check_args(
        input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
        training, eps, activation, negative_slope, 0,
    )  # fmt: skip
    check_loss(input, input.shape[0], weights[-1].shape[0], target, weight, pos_weight, reduction)


def check_backward_args(
    grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
    bn_weights, saved, activation,
) -> None:  # fmt: skip
    """``hpml::mlp_bce_with_logits_backward``'s contract (``csrc/mlp_bce_with_logits.h``)."""
    op = "hpml::mlp_bce_with_logits_backward"
    n_hidden = len(weights) - 1
    none = [None] * max(n_hidden, 0)
    _mlp.check_args(
        input, weights, biases, batch_norm, bn_weights, none, none, none, True, 1.0, activation,
        0.0, 0, batch_norm_mode=False,
    )  # fmt: skip
    m, n = input.shape[0], weights[-1].shape[0]
    check_loss(input, m, n, target, weight, pos_weight, reduction)
    if tuple(logits.shape) != (m, n):
        raise RuntimeError(
            f"{op}: logits of shape {check.shape(logits)} do not match the net's output ({m}, {n})"
        )
    check.same_dtype(op, input, logits, "logits")
    check.same_device(op, input, logits, "logits")
    want = SAVED_PER_LAYER * n_hidden + 1
    if len(saved) != want:
        raise RuntimeError(f"{op}: expected {want} saved tensors, got {len(saved)}")
    check.same_device(op, input, grad, "grad")
    check.loss_grad(op, grad, reduction == REDUCTIONS["none"], logits, "the logits' shape")


# ---- the public function -------------------------------------------------------------------


def mlp_bce_with_logits(
    input: Tensor,
    target: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activation: str = "relu",
    *,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    negative_slope: float = 0.01,
    batch_norm: bool | Sequence[bool] = False,
    bn_weights: Sequence[Tensor | None] | None = None,
    bn_biases: Sequence[Tensor | None] | None = None,
    running_means: Sequence[Tensor | None] | None = None,
    running_vars: Sequence[Tensor | None] | None = None,
    training: bool = False,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.binary_cross_entropy_with_logits(mlp(input, weights, biases, ...), target, weight,
    reduction=reduction, pos_weight=pos_weight)`` as one op forward and one backward: the net as
    ``hpml_ops.mlp`` (no output activation: its output is the logits), the loss as torch's.

    Args:
        input: ``(*, in_features)``.
        target: ``(*, out_features)``, the logits' shape.
        weights, biases, activation, negative_slope, batch_norm, bn_weights, bn_biases,
            running_means, running_vars, training, momentum, eps: as ``hpml_ops.mlp``.
        weight, pos_weight, reduction: as ``F.binary_cross_entropy_with_logits`` (broadcast to
            the logits' shape).
        return_logits: also return the logits, detached (accuracy, metrics).

    Returns:
        The loss (``(*, out_features)`` for ``reduction="none"``, else 0-d), or ``(loss,
        logits)``. Gradients for the input, the target, every weight and bias and batch-norm
        weight and bias, each only when required. In one op where the operands share the
        input's dtype, outside autocast and torch.func transforms; otherwise ``hpml_ops.mlp``
        then ``hpml_ops.binary_cross_entropy_with_logits`` (the same values).
    """
    kwargs = locals()
    tensors = [input, target, *weights]
    for t in (weight, pos_weight):
        if t is not None:
            tensors.append(t)
    for ts in (biases, bn_weights, bn_biases, running_means, running_vars):
        tensors += [t for t in ts or () if t is not None]
    if has_torch_function(tensors):
        return handle_torch_function(mlp_bce_with_logits, tensors, **kwargs)
    return _mlp_bce_with_logits(**kwargs, backend=None)


def reduction_code(reduction: str) -> int:
    """The ops' code of a reduction name, raising torch's error for another."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def fusable_loss(input: Tensor, target, weight, pos_weight) -> bool:
    """Whether the net and the loss may run as one op: the loss's operands tensors of the
    input's dtype (else torch's type promotion between the logits and them), outside autocast
    (the net's products in the autocast dtype, the loss in fp32) and torch.func transforms."""
    return (
        isinstance(target, Tensor)
        and all(
            t is None or (isinstance(t, Tensor) and t.dtype == input.dtype)
            for t in (target, weight, pos_weight)
        )
        and not transforms_active()
        and not autocast_enabled()
    )


def _mlp_bce_with_logits(
    input, target, weights, biases, activation, *, weight, pos_weight, reduction,
    negative_slope, batch_norm, bn_weights, bn_biases, running_means, running_vars, training,
    momentum, eps, return_logits, backend: str | None,
):  # fmt: skip
    """``mlp_bce_with_logits`` on ``backend`` (None: the process-wide choice)."""
    code = reduction_code(reduction)
    net = dict(
        activation=activation, negative_slope=negative_slope, batch_norm=batch_norm,
        bn_weights=bn_weights, bn_biases=bn_biases, running_means=running_means,
        running_vars=running_vars, training=training, momentum=momentum, eps=eps,
    )  # fmt: skip
    one_op = isinstance(input, Tensor) and input.dim() >= 1
    if not (one_op and fusable_loss(input, target, weight, pos_weight)):
        # the two public functions, one after the other
        from .bce_with_logits import _bce_with_logits

        logits = _mlp._mlp(input, weights, biases, output_activation="none", **net,
                           backend=backend)  # fmt: skip
        loss = _bce_with_logits(logits, target, weight, reduction, pos_weight, backend)
        return (loss, logits.detach()) if return_logits else loss
    # The op's form: 2-D operands, the loss's broadcast ones against the logits' shape.
    n_out = weights[-1].shape[0] if weights and isinstance(weights[-1], Tensor) else None
    lead = input.shape[:-1]
    if input.dim() != 2 and n_out is not None and weights[-1].dim() == 2:
        shape = (*lead, n_out)
        if target.shape != shape:
            raise ValueError(
                f"Target size ({target.size()}) must be the same as input size "
                f"({torch.Size(shape)})"
            )
        flat = (-1, n_out)
        target = target.reshape(flat)
        weight, pos_weight = (
            None if t is None else t.expand(shape).reshape(flat) for t in (weight, pos_weight)
        )
    input2 = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    none = input.new_empty((0, 0))
    lists = _mlp.op_lists(weights, biases, batch_norm, bn_weights, bn_biases, running_means,
                          running_vars, momentum, none)  # fmt: skip
    loss, logits = run(
        input2, target, weight, pos_weight, code, *lists[:7], bool(training),
        float(eps), activation_code(activation, "mlp"), float(negative_slope), lists[7], backend,
    )  # fmt: skip
    if input.dim() != 2:
        logits = logits.reshape(*lead, logits.shape[-1])
        if reduction == "none":
            loss = loss.reshape(logits.shape)
    return (loss, logits) if return_logits else loss


def run(
    input, target, weight, pos_weight, reduction: int, weights, biases, flags, bn_w, bn_b, r_m,
    r_v, training: bool, eps: float, act: int, negative_slope: float, momenta,
    backend: str | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The op on arguments in its form, then the running statistics' update; returns (loss,
    logits) (the logits detached). ``FusedMLP.bce_with_logits`` comes here too."""
    args = (input, target, weight, pos_weight, reduction, weights, biases, flags, bn_w, bn_b,
            r_m, r_v, training, eps, act, negative_slope)  # fmt: skip
    if OP.cpp_first(input.device, backend) and on_device(
        input.device, target, weight, pos_weight, *weights
    ):
        call = OP.cpp
    else:
        check_args(*args)
        backend = OP.resolve(input.device, backend)
        if backend == "reference":
            loss = OP.reference(
                input, target, weights, _mlp.present(biases), _NAMES[act], negative_slope,
                flags, _mlp.present(bn_w), _mlp.present(bn_b), _mlp.present(r_m),
                _mlp.present(r_v), training, momenta, eps, weight, pos_weight,
                _REDUCTION_NAMES[reduction], return_logits=True,
            )  # fmt: skip
            return loss[0], loss[1].detach()
        call = OP.forward[backend]
    loss, logits, saved = call(*args)
    if training and input.shape[0] > 0:
        _mlp._update_running_stats(saved, flags, r_m, r_v, momenta)
    return loss, logits


# ---- the ops: fake kernels, the Triton ops' autograd formula, registration ---------------

# Autocast: none (the public function runs the net and the loss apart under autocast, each with
# its own policy: the net's products in the autocast dtype, the loss in fp32, as torch's).
SPEC = OpSpec("mlp_bce_with_logits")


def _empty(t):
    return t.new_empty((0,))


@SPEC.fake("mlp_bce_with_logits")
def _fake_fwd(*args):
    check_args(*args)
    input, target, _, _, reduction = args[:5]
    net = (input, *args[5:16], 0)
    logits, saved = _mlp._fake_fwd(*net)
    loss = input.new_empty(tuple(logits.shape) if reduction == REDUCTIONS["none"] else ())
    return loss, logits, saved


@SPEC.fake("mlp_bce_with_logits_backward")
def _fake_bwd(*args):
    (grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
     bn_weights, saved, training, activation, slope, input_grad, target_grad, wg, bg, bwg,
     bbg) = args  # fmt: skip
    check_backward_args(*args[:12], activation)
    gy = input.new_empty(target.shape) if target_grad else _empty(input)
    if not (input_grad or any(wg) or any(bg) or any(bwg) or any(bbg)):
        n = len(weights)
        return (_empty(input), gy, [_empty(input) for _ in range(n)],
                [_empty(input) for _ in range(n)], [_empty(input) for _ in range(n - 1)],
                [_empty(input) for _ in range(n - 1)])  # fmt: skip
    gx, gw, gb, gbw, gbb = _mlp._fake_bwd(
        logits, input, logits, weights, biases, batch_norm, bn_weights, saved, training,
        activation, slope, 0, input_grad, wg, bg, bwg, bbg,
    )  # fmt: skip
    return gx, gy, gw, gb, gbw, gbb


@SPEC.setup_context
def _setup_context(ctx, inputs, output):
    (input, target, weight, pos_weight, reduction, weights, biases, batch_norm, bn_weights,
     bn_biases, r_m, r_v, training, eps, act, slope) = inputs  # fmt: skip
    check.running_stats_untracked("hpml::mlp_bce_with_logits", _mlp._named_stats(r_m, r_v))
    _, logits, saved = output
    ctx.save_for_backward(input, target, weight, pos_weight, logits, *weights, *biases,
                          *bn_weights, *bn_biases, *saved)  # fmt: skip
    ctx.sizes = (len(weights), len(bn_weights))
    ctx.args = (reduction, list(batch_norm), training, act, slope, eps)
    ctx.mark_non_differentiable(logits, *saved)


@SPEC.backward
def _backward(ctx, grad, grad_logits, grad_saved, *, bwd_op):
    n_layers, n_hidden = ctx.sizes
    t = list(ctx.saved_tensors)
    input, target, weight, pos_weight, logits = t[:5]
    weights = t[5 : 5 + n_layers]
    biases = t[5 + n_layers : 5 + 2 * n_layers]
    bn_weights = t[5 + 2 * n_layers : 5 + 2 * n_layers + n_hidden]
    bn_biases = t[5 + 2 * n_layers + n_hidden : 5 + 2 * n_layers + 2 * n_hidden]
    saved = t[5 + 2 * n_layers + 2 * n_hidden :]
    reduction, flags, training, act, slope, eps = ctx.args
    needs = ctx.needs_input_grad
    ig, tg = bool(needs[0]), bool(needs[1])
    wg, bg = [bool(n) for n in needs[5]], [bool(n) for n in needs[6]]
    bwg, bbg = [bool(n) for n in needs[8]], [bool(n) for n in needs[9]]
    nones = [None] * n_hidden
    flags_grad = [] if n_hidden == 0 else None
    tail = (None,) * 4
    if grad is None or not (ig or tg or any(wg) or any(bg) or any(bwg) or any(bbg)):
        return (None, None, None, None, None, [None] * n_layers, [None] * n_layers, flags_grad,
                nones, nones, nones, nones) + tail  # fmt: skip
    if reference.wants_graph(grad, input, target, *weights, *biases, *bn_weights, *bn_biases):
        # (a second backward to come) the net and torch's loss again, differentiated with a graph
        stats = [saved[SAVED_PER_LAYER * i + 3 : SAVED_PER_LAYER * i + 5] for i in range(n_hidden)]
        gx, gy, gw, gb, gbw, gbb = reference.mlp_bce_with_logits_grads(
            grad, input, target, weight, pos_weight, _REDUCTION_NAMES[reduction], weights,
            _mlp.present(biases), flags, _mlp.present(bn_weights), _mlp.present(bn_biases),
            stats, training, eps, _NAMES[act], slope, (ig, tg, wg, bg, bwg, bbg),
        )  # fmt: skip
    else:
        gx, gy, gw, gb, gbw, gbb = bwd_op(
            grad, input, target, weight, pos_weight, reduction, logits, weights, biases, flags,
            bn_weights, saved, training, act, slope, ig, tg, wg, bg, bwg, bbg,
        )  # fmt: skip
    return (
        gx if ig else None,
        gy if tg else None,
        None,
        None,
        None,
        [g if f else None for g, f in zip(gw, wg, strict=True)],
        [g if f else None for g, f in zip(gb, bg, strict=True)],
        flags_grad,
        [g if f else None for g, f in zip(gbw, bwg, strict=True)],
        [g if f else None for g, f in zip(gbb, bbg, strict=True)],
        nones,
        nones,
    ) + tail


OP = register(SPEC)
