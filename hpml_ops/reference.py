"""The pure-PyTorch oracle for every op: torch's own implementation.

With ``upcast=True`` every floating-point tensor is first converted to float64 and the result stays
in float64: that is what the parity tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import ACTIVATIONS, REDUCTIONS


def _up(t: Tensor | None, upcast: bool) -> Tensor | None:
    if t is None or not upcast or not t.is_floating_point():
        return t
    return t.to(torch.float64)


def bce_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    upcast: bool = False,
) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits``, optionally in float64."""
    return F.binary_cross_entropy_with_logits(
        _up(input, upcast),
        _up(target, upcast),
        _up(weight, upcast),
        reduction=reduction,
        pos_weight=_up(pos_weight, upcast),
    )


def linear_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    *,
    upcast: bool = False,
) -> Tensor:
    """``act(F.linear(input, weight, bias))`` with torch's own activation, optionally in
    float64."""
    z = F.linear(_up(input, upcast), _up(weight, upcast), _up(bias, upcast))
    return _activate(z, activation, negative_slope)


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
    *,
    upcast: bool = False,
) -> Tensor:
    """``F.batch_norm`` (then ReLU for ``activation="relu"``), optionally in float64. With
    ``upcast`` the running statistics are updated in float64 copies, not in place."""
    out = F.batch_norm(
        _up(input, upcast),
        _up(running_mean, upcast),
        _up(running_var, upcast),
        _up(weight, upcast),
        _up(bias, upcast),
        training,
        momentum,
        eps,
    )
    return F.relu(out) if activation == "relu" else out


def _activate(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "none":
        return z
    raise ValueError(f"unknown activation {activation!r}")


def mlp(
    input: Tensor,
    weights,
    biases=None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    output_activation: str = "none",
    batch_norm=False,
    bn_weights=None,
    bn_biases=None,
    running_means=None,
    running_vars=None,
    training: bool = False,
    momentum=0.1,
    eps: float = 1e-5,
    *,
    upcast: bool = False,
) -> Tensor:
    """The MLP of ``hpml_ops.mlp`` from torch's own ops (``F.linear``, ``F.batch_norm``, the
    activations), optionally in float64 (then the running statistics are updated in float64
    copies, not in place)."""
    n = len(weights)
    biases = [None] * n if biases is None else list(biases)
    flags = [bool(batch_norm)] * (n - 1) if isinstance(batch_norm, bool) else list(batch_norm)

    def per_hidden(v):
        return [None] * (n - 1) if v is None else list(v)

    bn_w, bn_b, r_m, r_v = map(per_hidden, (bn_weights, bn_biases, running_means, running_vars))
    momenta = list(momentum) if isinstance(momentum, list | tuple) else [momentum] * (n - 1)
    h = _up(input, upcast)
    for i in range(n - 1):
        h = F.linear(h, _up(weights[i], upcast), _up(biases[i], upcast))
        if flags[i]:
            h = F.batch_norm(
                h, _up(r_m[i], upcast), _up(r_v[i], upcast), _up(bn_w[i], upcast),
                _up(bn_b[i], upcast), training, momenta[i], eps,
            )  # fmt: skip
        h = _activate(h, activation, negative_slope)
    y = F.linear(h, _up(weights[-1], upcast), _up(biases[-1], upcast))
    return _activate(y, output_activation, negative_slope)


def mlp_bce_with_logits(
    input: Tensor,
    target: Tensor,
    weights,
    biases=None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    batch_norm=False,
    bn_weights=None,
    bn_biases=None,
    running_means=None,
    running_vars=None,
    training: bool = False,
    momentum=0.1,
    eps: float = 1e-5,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    *,
    upcast: bool = False,
    return_logits: bool = False,
):
    """``hpml_ops.mlp_bce_with_logits`` from torch's own ops: ``mlp`` (no output activation),
    then ``F.binary_cross_entropy_with_logits``; optionally in float64."""
    logits = mlp(
        input, weights, biases, activation, negative_slope, "none", batch_norm, bn_weights,
        bn_biases, running_means, running_vars, training, momentum, eps, upcast=upcast,
    )  # fmt: skip
    loss = bce_with_logits(logits, target, weight, reduction, pos_weight, upcast=upcast)
    return (loss, logits) if return_logits else loss


# ---- differentiable backward formulas ----------------------------------------------------------
# Used by the ops' backward under create_graph=True when the gradients will be differentiated
# again (a Hessian, a gradient penalty): torch's ops on what the forward saved, so a second
# backward works as on torch's own ops. The same formulas as csrc/autograd.cpp's, for the ops whose
# autograd is registered in Python (the Triton backend).


def wants_graph(*tensors: Tensor | None) -> bool:
    """Whether a backward must build a graph: create_graph=True and something requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def unpack_mask(mask: Tensor, n: int) -> Tensor:
    """linear_act's bit mask (uint8 (M, ceil(N / 8)), bit j % 8 of byte j // 8) as bool (M, N)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.unsqueeze(-1) >> shifts) & 1).reshape(mask.shape[0], -1)[:, :n].bool()


def linear_act_grads(grad, input, weight, out, mask, activation: int, slope: float, need):
    """(grad input, grad weight, grad bias) of ``act(input @ weight.T + b)`` (2-D input), each
    None unless asked, from the mask (ReLU, leaky ReLU) or the output (sigmoid, tanh)."""
    if activation == ACTIVATIONS["relu"]:
        dz = grad.masked_fill(~unpack_mask(mask, grad.shape[1]), 0)
    elif activation == ACTIVATIONS["leaky_relu"]:
        dz = torch.where(unpack_mask(mask, grad.shape[1]), grad, grad * slope)
    elif activation == ACTIVATIONS["sigmoid"]:
        dz = grad * out * (1 - out)
    elif activation == ACTIVATIONS["tanh"]:
        dz = grad * (1 - out * out)
    else:
        dz = grad
    return (
        dz @ weight if need[0] else None,
        dz.t() @ input if need[1] else None,
        dz.sum(0) if need[2] else None,
    )


def batch_norm_grads(grad, input, weight, out, mean, invstd, training: bool, relu: bool, need):
    """(grad input, grad weight, grad bias) of batch norm (then ReLU), each None unless asked:
    in training torch's native_batch_norm_backward on the saved statistics, in evaluation the
    affine map's."""
    g = grad.masked_fill(out <= 0, 0) if relu else grad
    if training:
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, input, weight, None, None, mean, invstd, True, 0.0, list(need)
        )
        return tuple(t if n else None for t, n in zip((gx, gw, gb), need, strict=True))
    shape = [1] * input.dim()
    shape[1] = input.shape[1]
    dims = [d for d in range(input.dim()) if d != 1]
    m, s = mean.to(input.dtype).view(shape), invstd.to(input.dtype).view(shape)
    gx = (g * s * weight.view(shape) if weight is not None else g * s) if need[0] else None
    gw = (g * (input - m) * s).sum(dims) if need[1] else None
    gb = g.sum(dims) if need[2] else None
    return gx, gw, gb


_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}


def mlp_grads(grad, input, weights, biases, flags, bn_weights, bn_biases, stats, training: bool,
              eps: float, activation: str, slope: float, output_activation: str, need):  # fmt: skip
    """(grad input, [grad weight], [grad bias], [grad bn weight], [grad bn bias]) of
    ``hpml_ops.mlp`` (2-D input), each None unless asked (``need``: a flag and four lists of flags):
    the net again from torch's ops on the saved inputs (batch norm in training from the batch, in
    eval from ``stats``: per hidden layer the (mean, 1/std) the forward used), differentiated with
    a graph."""
    y = _mlp_again(input, weights, biases, flags, bn_weights, bn_biases, stats, training, eps,
                   activation, slope, output_activation)  # fmt: skip
    return _grads_of(y, grad, [input], (weights, biases, bn_weights, bn_biases), need)


def mlp_bce_with_logits_grads(grad, input, target, weight, pos_weight, reduction: str, weights,
                              biases, flags, bn_weights, bn_biases, stats, training: bool,
                              eps: float, activation: str, slope: float, need):  # fmt: skip
    """(grad input, grad target, [grad weight], [grad bias], [grad bn weight], [grad bn bias])
    of ``hpml_ops.mlp_bce_with_logits`` (2-D operands), each None unless asked (``need``: two
    flags and four lists of flags), as ``mlp_grads``: the net and torch's loss again,
    differentiated with a graph."""
    with torch.enable_grad():
        z = _mlp_again(input, weights, biases, flags, bn_weights, bn_biases, stats, training, eps,
                       activation, slope, "none")  # fmt: skip
        loss = F.binary_cross_entropy_with_logits(
            z, target, weight, pos_weight=pos_weight, reduction=reduction
        )
    ig, tg, *rest = need
    gx, (gy,), *per_layer = _grads_of(
        loss, grad, [input], (weights, biases, bn_weights, bn_biases), (ig, *rest), [target], [tg]
    )
    return gx, gy, *per_layer


def _grads_of(y, grad, first, groups, need, extra=(), extra_need=()):
    """torch.autograd.grad of ``y`` (with ``grad``) with a graph for the tensors asked for:
    ``first`` (one tensor, flag ``need[0]``), each list of ``groups`` (flags ``need[1:]``) and
    ``extra`` (flags ``extra_need``); returns the first's gradient, the lists', then (when
    ``extra``) the extra ones as a list, None where not asked."""
    groups = (first, *groups, *((list(extra),) if extra else ()))
    flags_of = ([need[0]], *need[1:], *((list(extra_need),) if extra else ()))
    wrt = [t for ts, fs in zip(groups, flags_of, strict=True)
           for t, f in zip(ts, fs, strict=True) if f and t is not None]  # fmt: skip
    found = iter(torch.autograd.grad(y, wrt, grad, create_graph=True, allow_unused=True))
    out = [[next(found) if f and t is not None else None for t, f in zip(ts, fs, strict=True)]
           for ts, fs in zip(groups, flags_of, strict=True)]  # fmt: skip
    if extra:
        return out[0][0], out[-1], *out[1:-1]
    return out[0][0], *out[1:]


def _mlp_again(input, weights, biases, flags, bn_weights, bn_biases, stats, training, eps,
               activation, slope, output_activation):  # fmt: skip
    """The net of ``mlp_grads`` from torch's ops."""
    h = input
    for i, w in enumerate(weights):
        h = F.linear(h, w, biases[i])
        if i == len(weights) - 1:
            break
        if flags[i]:
            bw, bb = bn_weights[i], bn_biases[i]
            if training:
                h = F.batch_norm(h, None, None, bw, bb, True, 0.0, eps)
            else:
                mean, invstd = stats[i]
                h = (h - mean.to(h.dtype)) * invstd.to(h.dtype)
                h = h if bw is None else h * bw
                h = h if bb is None else h + bb
        h = _activate(h, activation, slope)
    return _activate(h, output_activation, slope)


def bce_with_logits_grads(grad, input, target, weight, pos_weight, reduction: int, need):
    """(grad input, grad target), each None unless asked: torch's own loss on the saved inputs,
    differentiated with a graph."""
    with torch.enable_grad():
        loss = F.binary_cross_entropy_with_logits(
            input, target, weight, pos_weight=pos_weight, reduction=_REDUCTION_NAMES[reduction]
        )
    wrt = [t for t, n in zip((input, target), need, strict=True) if n]
    got = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True))
    return tuple(next(got) if n else None for n in need)
