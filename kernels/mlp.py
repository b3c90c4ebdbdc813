"""Triton launchers of the whole-MLP ops (hpml::mlp_triton, hpml::mlp_backward_triton): the
layers one after another through the Triton kernels of linear_act and batch_norm, inside one op
call, with the same saved tensors as the C++ op (csrc/mlp.h). The fully fused kernel (all layers
of a row block on chip, widths up to 128) is the next step of issue 12."""

from __future__ import annotations

import torch

from ..constants import ACTIVATIONS
from ..ops.mlp import SAVED_PER_LAYER, check_args, check_backward_args, present
from .batch_norm import batch_norm as _batch_norm
from .batch_norm import batch_norm_backward as _batch_norm_backward
from .linear_act import linear_act as _linear_act
from .linear_act import linear_act_backward as _linear_act_backward

_NONE, _RELU, _LEAKY = ACTIVATIONS["none"], ACTIVATIONS["relu"], ACTIVATIONS["leaky_relu"]
_SIGMOID, _TANH = ACTIVATIONS["sigmoid"], ACTIVATIONS["tanh"]


def mlp(
    input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
    training, eps, activation, negative_slope, output_activation,
):  # fmt: skip
    """hpml::mlp_triton: (output, saved) as hpml::mlp."""
    check_args(
        input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
        training, eps, activation, negative_slope, output_activation,
    )  # fmt: skip
    biases, bn_weights, bn_biases = present(biases), present(bn_weights), present(bn_biases)
    running_means, running_vars = present(running_means), present(running_vars)

    def none():  # a fresh one each time: the outputs of an op may not alias each other
        return input.new_empty((0,))

    saved = []
    h = input
    for i, w in enumerate(weights[:-1]):
        if not batch_norm[i]:
            out, mask = _linear_act(h, w, biases[i], activation, negative_slope)
            saved += [out, mask, none(), none(), none(), none()]
            h = out
            continue
        z, _ = _linear_act(h, w, biases[i], _NONE, 0.0)
        a, mean, invstd, var = _batch_norm(
            z, bn_weights[i], bn_biases[i], running_means[i], running_vars[i], training, eps,
            1 if activation == _RELU else 0,
        )  # fmt: skip
        out, aux = a, none()
        if activation == _LEAKY:
            out, aux = torch.nn.functional.leaky_relu(a, negative_slope), a
        elif activation == _SIGMOID:
            out = torch.sigmoid(a)
        elif activation == _TANH:
            out = torch.tanh(a)
        saved += [out, aux, z, mean, invstd, var]
        h = out
    y, mask = _linear_act(h, weights[-1], biases[-1], output_activation, negative_slope)
    saved.append(mask)
    return y, saved


def mlp_backward(
    grad, input, output, weights, biases, batch_norm, bn_weights, saved, training, activation,
    negative_slope, output_activation, input_grad, weight_grads, bias_grads, bn_weight_grads,
    bn_bias_grads,
):  # fmt: skip
    """hpml::mlp_backward_triton: the gradients as hpml::mlp_backward."""
    check_backward_args(grad, input, output, weights, biases, batch_norm, bn_weights, saved)
    biases, bn_weights = present(biases), present(bn_weights)
    n_layers = len(weights)

    def none():
        return input.new_empty((0,))

    below = [bool(input_grad)]  # below[i]: a gradient is wanted from the layers before layer i
    for j in range(n_layers):
        here = weight_grads[j] or bias_grads[j]
        if j < n_layers - 1:
            here = here or bn_weight_grads[j] or bn_bias_grads[j]
        below.append(below[-1] or bool(here))
    gw, gb = [none() for _ in range(n_layers)], [none() for _ in range(n_layers)]
    gbw, gbb = [none() for _ in range(n_layers - 1)], [none() for _ in range(n_layers - 1)]

    def layer_input(i):
        return input if i == 0 else saved[SAVED_PER_LAYER * (i - 1)]

    last = n_layers - 1
    g, gw[last], gb[last] = _linear_act_backward(
        grad, layer_input(last), weights[last], output, saved[-1], output_activation,
        negative_slope, below[last], weight_grads[last],
        bias_grads[last] and biases[last] is not None,
    )  # fmt: skip
    for i in range(n_layers - 2, -1, -1):
        if not below[i + 1]:
            break
        s = SAVED_PER_LAYER * i
        h, aux = saved[s], saved[s + 1]
        wg, bg = weight_grads[i], bias_grads[i] and biases[i] is not None
        if not batch_norm[i]:
            g, gw[i], gb[i] = _linear_act_backward(
                g, layer_input(i), weights[i], h, aux, activation, negative_slope, below[i],
                wg, bg,
            )  # fmt: skip
            continue
        ga = g
        if activation == _LEAKY:
            ga = torch.where(aux > 0, g, g * negative_slope)
        elif activation == _SIGMOID:
            ga = torch.ops.aten.sigmoid_backward(g, h)
        elif activation == _TANH:
            ga = torch.ops.aten.tanh_backward(g, h)
        gz, gbw[i], gbb[i] = _batch_norm_backward(
            ga, saved[s + 2], bn_weights[i], h, saved[s + 3], saved[s + 4], training,
            1 if activation == _RELU else 0, True,
            bool(bn_weight_grads[i]) and bn_weights[i] is not None, bool(bn_bias_grads[i]),
        )  # fmt: skip
        g, gw[i], gb[i] = _linear_act_backward(
            gz, layer_input(i), weights[i], none(), none().to(torch.uint8), _NONE, 0.0, below[i],
            wg, bg,
        )  # fmt: skip
    return (g if input_grad else none()), gw, gb, gbw, gbb


def aot_specs() -> list[dict]:
    """No kernels of its own yet: the layers run the Triton kernels of linear_act and
    batch_norm, which their modules' specs compile."""
    return []
