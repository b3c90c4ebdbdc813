"""Triton launchers of the fused net-and-loss ops (hpml::mlp_bce_with_logits_triton and its
backward), one op call each way. Forward: the net through ``kernels/mlp.py`` (its fused kernels
where they apply: widths <= 128, one kernel per run of layers between batch norms), then the loss
through ``kernels/bce_with_logits.py``. Backward: for a net the fused kernels run, the fused
backward kernel of the net's last run of layers starts from the loss (the last layer's dZ
computed from the logits, target, weight and pos_weight where it is needed, the target's gradient
written in the same pass: no logits-gradient tensor, as the C++ CPU kernel, ``csrc/mlp.cpp``
MlpLoss); other nets take the loss's gradient with the loss's kernel and then run the net's
layer-by-layer backward."""

from __future__ import annotations

import torch

from ..ops.mlp import present
from ..ops.mlp_bce_with_logits import check_args, check_backward_args
from .bce_with_logits import _operands as _bce_operands
from .bce_with_logits import bce_with_logits as _bce
from .bce_with_logits import bce_with_logits_backward as _bce_backward
from .mlp import FusedLoss, _fusable, backward_fused_net
from .mlp import mlp as _mlp
from .mlp import mlp_backward as _mlp_backward


def mlp_bce_with_logits(
    input, target, weight, pos_weight, reduction, weights, biases, batch_norm, bn_weights,
    bn_biases, running_means, running_vars, training, eps, activation, negative_slope,
):  # fmt: skip
    """hpml::mlp_bce_with_logits_triton: (loss, logits, saved)."""
    check_args(
        input, target, weight, pos_weight, reduction, weights, biases, batch_norm, bn_weights,
        bn_biases, running_means, running_vars, training, eps, activation, negative_slope,
    )  # fmt: skip
    logits, saved = _mlp(
        input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
        training, eps, activation, negative_slope, 0,
    )  # fmt: skip
    return _bce(logits, target, weight, pos_weight, reduction), logits, saved


def mlp_bce_with_logits_backward(
    grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
    bn_weights, saved, training, activation, negative_slope, input_grad, target_grad,
    weight_grads, bias_grads, bn_weight_grads, bn_bias_grads,
):  # fmt: skip
    """hpml::mlp_bce_with_logits_backward_triton: the gradients as the C++ op."""
    check_backward_args(
        grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
        bn_weights, saved, activation,
    )  # fmt: skip
    net = (
        bool(input_grad)
        or any(weight_grads)
        or any(bias_grads)
        or any(bn_weight_grads)
        or any(bn_bias_grads)
    )
    # (the fused kernel indexes the loss's operands in int32)
    if net and _fusable(input, weights) and logits.numel() < 2**31:
        xl, y, w, pw = _bce_operands(logits, target, weight, pos_weight)
        gt = torch.empty_like(y) if target_grad else None
        gx, gw, gb, gbw, gbb = backward_fused_net(
            grad, input, xl, weights, present(biases), batch_norm, present(bn_weights), saved,
            training, activation, negative_slope, 0, input_grad, weight_grads, bias_grads,
            bn_weight_grads, bn_bias_grads, loss=FusedLoss(y, w, pw, gt, reduction),
        )  # fmt: skip
        return gx, (input.new_empty((0,)) if gt is None else gt), gw, gb, gbw, gbb
    g_logits, g_target = _bce_backward(
        grad, logits, target, weight, pos_weight, reduction, net, target_grad
    )
    if not net:

        def none():
            return input.new_empty((0,))

        n = len(weights)
        return (none(), g_target, [none() for _ in range(n)], [none() for _ in range(n)],
                [none() for _ in range(n - 1)], [none() for _ in range(n - 1)])  # fmt: skip
    gx, gw, gb, gbw, gbb = _mlp_backward(
        g_logits, input, logits, weights, biases, batch_norm, bn_weights, saved, training,
        activation, negative_slope, 0, input_grad, weight_grads, bias_grads, bn_weight_grads,
        bn_bias_grads,
    )  # fmt: skip
    return gx, g_target, gw, gb, gbw, gbb


def aot_specs() -> list[dict]:
    """None of its own: the ops run the kernels of mlp, linear_act, batch_norm and
    bce_with_logits, which those families' specs compile for `make gpu-build-check`."""
    return []
