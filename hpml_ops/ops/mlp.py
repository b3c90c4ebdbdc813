"""A whole MLP as one op: ``Linear -> [BatchNorm1d] -> activation`` hidden layers and a last
``Linear`` (with an optional output activation), forward in one call and backward in one call.
The argument contract, fake kernels, Triton autograd formula, spec and public function.

Ops (schemas: ``schema.py``): ``hpml::mlp[_backward]`` (C++: the layers through the library's CPU
or CUDA kernels inside one op call, ``csrc/mlp.h``) and ``hpml::mlp[_backward]_triton``
(``kernels/mlp.py``). The forward is functional: it returns the output and what the backward
needs (per hidden layer its output, the ReLU mask or pre-activation, the batch norm's input and
statistics), and ``mlp`` updates the running statistics in place from the batch ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from .. import reference
from ..constants import ACT_USES_MASK, ACTIVATIONS, acc_dtype, activation_code, mask_row_bytes
from . import _checks as check
from ._registry import (
    AUTOCAST_LOWER,
    OpSpec,
    on_device,
    register,
    transforms_active,
    vmap_by_loop,
    vmap_rows,
)

_OP = "mlp"
SAVED_PER_LAYER = 6  # csrc/mlp.h: kMlpSavedPerLayer
_NONE, _RELU, _LEAKY = ACTIVATIONS["none"], ACTIVATIONS["relu"], ACTIVATIONS["leaky_relu"]
_NAMES = {code: name for name, code in ACTIVATIONS.items()}
_ACT_MSG = "must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (sigmoid) or 4 (tanh)"


def _layer(i: int, what: str) -> str:
    return f"layer {i}'s {what}"


def absent(t) -> bool:
    """An entry of the ops' lists of biases and batch-norm tensors that stands for None: an empty
    (0, 0) tensor (torch.library cannot take gradients through lists holding None)."""
    return t is None or (isinstance(t, Tensor) and t.dim() == 2 and t.shape == (0, 0))


def present(ts) -> list:
    """The list with None for every absent entry."""
    return [None if absent(t) else t for t in ts]


def check_args(
    input,
    weights,
    biases,
    batch_norm,
    bn_weights,
    bn_biases,
    running_means,
    running_vars,
    training,
    eps,
    activation: int,
    negative_slope,
    output_activation: int,
    *,
    op: bool = True,
    batch_norm_mode: bool = True,
) -> None:
    """The arguments ``mlp`` accepts, as hpml::mlp takes them (``eps`` as torch's batch norm
    checks it, ``negative_slope`` unchecked, as torch leaves it); the C++ launchers check the
    same, in the same order and words (``csrc/mlp.h``). ``op``: the ops' form (a 2-D input);
    else the public function's (input ``(*, in_features)``). ``batch_norm_mode``: check the batch
    norms' statistics and eps against the mode (the forward's concern; the backward reads what
    the forward saved)."""
    for name, code in (("activation", activation), ("output_activation", output_activation)):
        if code not in ACTIVATIONS.values():
            raise RuntimeError(f"{_OP}: {name} {_ACT_MSG}, got {code}")
    n_layers = len(weights)
    if n_layers < 1:
        raise RuntimeError(f"{_OP}: expected at least one layer (weights is empty)")
    check.tensor(_OP, "input", input)
    if op and input.dim() != 2:
        raise RuntimeError(
            f"{_OP}: expected a 2-D input (M, in_features), got shape {check.shape(input)}"
        )
    if input.dim() < 1:
        raise RuntimeError(f"{_OP}: input must be at least 1-D (*, in_features), got a 0-d tensor")
    check.floating(_OP, input, "input")
    biases, bn_weights, bn_biases = present(biases), present(bn_weights), present(bn_biases)
    running_means, running_vars = present(running_means), present(running_vars)
    for got, want, what, per in (
        (len(biases), n_layers, "biases", "one per layer, or None"),
        (len(batch_norm), n_layers - 1, "batch_norm flags", "one per hidden layer"),
        (len(bn_weights), n_layers - 1, "bn_weights", "one per hidden layer, or None"),
        (len(bn_biases), n_layers - 1, "bn_biases", "one per hidden layer, or None"),
        (len(running_means), n_layers - 1, "running_means", "one per hidden layer, or None"),
        (len(running_vars), n_layers - 1, "running_vars", "one per hidden layer, or None"),
    ):
        if got != want:
            raise RuntimeError(f"{_OP}: expected {want} {what} ({per}), got {got}")
    fan_in = input.shape[-1]
    rows = input.numel() // max(fan_in, 1) if input.dim() != 2 else input.shape[0]
    for i, w in enumerate(weights):
        wn = _layer(i, "weight")
        check.tensor(_OP, wn, w)
        if w.dim() != 2:
            raise RuntimeError(
                f"{_OP}: {wn} must be 2-D (out_features, in_features), got shape {check.shape(w)}"
            )
        if w.shape[1] != fan_in:
            if i == 0:
                raise RuntimeError(
                    f"{_OP}: input of shape {check.shape(input)} has in_features={fan_in} but "
                    f"{wn} of shape {check.shape(w)} expects in_features={w.shape[1]}"
                )
            raise RuntimeError(
                f"{_OP}: {wn} of shape {check.shape(w)} expects in_features={w.shape[1]} but "
                f"layer {i - 1} has out_features={fan_in}"
            )
        check.floating(_OP, w, wn)
        check.same_device(_OP, input, w, wn)
        check.same_dtype(_OP, input, w, wn)
        n = w.shape[0]
        b = biases[i]
        if b is not None:
            bn = _layer(i, "bias")
            check.tensor(_OP, bn, b)
            check.floating(_OP, b, bn)
            check.same_device(_OP, input, b, bn)
            if b.dim() != 1 or b.shape[0] != n:
                raise RuntimeError(
                    f"{_OP}: {bn} of shape {check.shape(b)} does not match out_features={n}"
                )
            check.same_dtype(_OP, input, b, bn)
        if i < n_layers - 1:
            has_bn = bool(batch_norm[i])
            for lst, what in (
                (bn_weights, "bn_weight"),
                (bn_biases, "bn_bias"),
                (running_means, "running_mean"),
                (running_vars, "running_var"),
            ):
                t = lst[i]
                if t is None:
                    continue
                if not has_bn:
                    raise RuntimeError(f"{_OP}: layer {i} has no batch norm but a {what} was given")
                check.per_channel(_OP, t, n, input, _layer(i, what))
            if has_bn and batch_norm_mode:
                if not training and (running_means[i] is None or running_vars[i] is None):
                    raise RuntimeError(
                        f"{_OP}: layer {i}'s batch norm: running_mean must be defined in "
                        "evaluation mode"
                    )
                if training and rows == 1:
                    raise ValueError(
                        "Expected more than 1 value per channel when training, got input size "
                        f"{torch.Size([rows, n])}"
                    )
                check.bn_eps(eps, training)
        fan_in = n


def check_backward_args(grad, input, output, weights, biases, batch_norm, bn_weights, saved):
    """``hpml::mlp_backward``'s contract (``csrc/mlp.h``)."""
    op = "hpml::mlp_backward"
    n_hidden = len(weights) - 1
    none = [None] * max(n_hidden, 0)
    check_args(
        input,
        weights,
        biases,
        batch_norm,
        bn_weights,
        none,
        none,
        none,
        True,
        0.0,
        0,
        0.0,
        0,
        batch_norm_mode=False,
    )
    want = SAVED_PER_LAYER * n_hidden + 1
    if len(saved) != want:
        raise RuntimeError(f"{op}: expected {want} saved tensors, got {len(saved)}")
    check.like(op, input, grad, "grad", output, "the output")


# ---- the public function -------------------------------------------------------------------


def _per_hidden(value, n_hidden: int, name: str) -> list:
    if value is None:
        return [None] * n_hidden
    out = list(value)
    if len(out) != n_hidden:
        raise ValueError(
            f"{_OP}: expected {n_hidden} {name} (one per hidden layer), got {len(out)}"
        )
    return out


def mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    output_activation: str = "none",
    batch_norm: bool | Sequence[bool] = False,
    bn_weights: Sequence[Tensor | None] | None = None,
    bn_biases: Sequence[Tensor | None] | None = None,
    running_means: Sequence[Tensor | None] | None = None,
    running_vars: Sequence[Tensor | None] | None = None,
    training: bool = False,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """A whole MLP in one op: for each hidden layer ``i``,
    ``h = act(BN_i(F.linear(h, weights[i], biases[i])))`` (``BN_i`` as ``F.batch_norm`` with
    ``bn_weights[i]``, ``bn_biases[i]``, ``running_means[i]``, ``running_vars[i]`` when
    ``batch_norm[i]``), then ``output_activation(F.linear(h, weights[-1], biases[-1]))``.

    Args:
        input: ``(*, in_features)``.
        weights: ``L >= 1`` tensors ``(out_i, in_i)``, as ``nn.Linear`` stores them; each layer's
            ``in_i`` the previous one's ``out``.
        biases: ``L`` tensors ``(out_i,)`` or None (None: no biases).
        activation, output_activation: ``"relu"``, ``"leaky_relu"`` (``negative_slope``),
            ``"sigmoid"``, ``"tanh"`` or ``"none"``; the first for every hidden layer.
        batch_norm: one flag per hidden layer (``L - 1``), or one for all.
        bn_weights, bn_biases, running_means, running_vars: per hidden layer ``(out_i,)`` or
            None. The running statistics are updated in place in training, as ``F.batch_norm``
            does (``momentum`` per batch-norm layer or one for all; the variance unbiased).
        training: batch statistics (else the running ones).

    Returns:
        ``(*, out_L)`` in the input's dtype. Gradients for the input, every weight and bias and
        batch-norm weight and bias, each only when required.
    """
    kwargs = locals()
    tensors = [input, *weights]
    for ts in (biases, bn_weights, bn_biases, running_means, running_vars):
        tensors += [t for t in ts or () if t is not None]
    if has_torch_function(tensors):  # as torch.nn.functional's
        return handle_torch_function(mlp, tensors, **kwargs)
    return _mlp(**kwargs, backend=None)


def _mlp(
    input, weights, biases, activation, *, negative_slope, output_activation, batch_norm,
    bn_weights, bn_biases, running_means, running_vars, training, momentum, eps,
    backend: str | None,
) -> Tensor:  # fmt: skip
    """``mlp`` on ``backend`` (None: the process-wide choice): its arguments in the ops' form,
    then ``run``."""
    none = None
    if isinstance(input, Tensor):  # None as the ops take it: an empty (0, 0) tensor
        if transforms_active():  # not new_empty: under vmap that one is a batched tensor
            none = torch.empty((0, 0), dtype=input.dtype, device=input.device)
        else:  # (0.3 us cheaper a call than torch.empty with dtype and device)
            none = input.new_empty((0, 0))
    weights, biases, flags, *lists, momenta = op_lists(
        weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
        momentum, none,
    )  # fmt: skip
    act = activation_code(activation, _OP)
    out_act = activation_code(output_activation, f"{_OP}: output")
    return run(
        input, weights, biases, flags, *lists, bool(training), float(eps), act,
        float(negative_slope), out_act, momenta, backend,
    )  # fmt: skip


def op_lists(weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
             momentum, none):  # fmt: skip
    """The public function's per-layer arguments in the ops' form: (weights, biases, batch_norm
    flags, bn_weights, bn_biases, running_means, running_vars, momenta), lists with ``none``
    (an empty (0, 0) tensor; None leaves None) for every absent tensor."""
    weights = list(weights)
    n_layers, n_hidden = len(weights), max(len(weights) - 1, 0)
    biases = [None] * n_layers if biases is None else list(biases)
    flags = [bool(batch_norm)] * n_hidden if isinstance(batch_norm, bool) else list(batch_norm)
    lists = [
        _per_hidden(v, n_hidden, name)
        for v, name in (
            (bn_weights, "bn_weights"),
            (bn_biases, "bn_biases"),
            (running_means, "running_means"),
            (running_vars, "running_vars"),
        )
    ]
    if none is not None:
        biases = [none if t is None else t for t in biases]
        lists = [[none if t is None else t for t in ts] for ts in lists]
    momenta = list(momentum) if isinstance(momentum, Sequence) else [momentum] * n_hidden
    return (weights, biases, flags, *lists, momenta)


def run(
    input, weights, biases, flags, bn_w, bn_b, r_m, r_v, training: bool, eps: float, act: int,
    negative_slope: float, out_act: int, momenta, backend: str | None,
) -> Tensor:  # fmt: skip
    """The op on arguments in its form (lists of tensors with an empty (0, 0) tensor for an absent
    one, activation codes, a momentum per hidden layer), then the running statistics' update:
    ``mlp`` and ``FusedMLP`` both come here. The C++ op is called at once where it runs (it checks
    its arguments and raises what ``check_args`` would); else the arguments are checked first."""
    args = (input, weights, biases, flags, bn_w, bn_b, r_m, r_v, training, eps, act)
    if not (isinstance(input, Tensor) and input.dim() == 2 and OP.cpp_first(input.device, backend)
            and on_device(input.device, *weights)):  # fmt: skip
        check_args(*args, negative_slope, out_act, op=False)
        backend = OP.resolve(input.device, backend)
        # Under torch.vmap its batching rule folds the batch into the rows, unless a parameter
        # is batched per sample or batch statistics are taken (per sample).
        call = OP.forward_for(
            backend, *weights, *biases, *bn_w, *bn_b, *r_m, *r_v,
            batchable=not (training and any(flags)),
        )  # fmt: skip
        if call is None:
            return OP.reference(
                input, weights, present(biases), _NAMES[act], negative_slope, _NAMES[out_act],
                flags, present(bn_w), present(bn_b), present(r_m), present(r_v), training,
                momenta, eps,
            )  # fmt: skip
    else:
        call = OP.cpp
    x2 = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    out, saved = call(x2, *args[1:], negative_slope, out_act)
    if training and x2.shape[0] > 0:
        _update_running_stats(saved, flags, r_m, r_v, momenta)
    return out if input.dim() == 2 else out.reshape(*input.shape[:-1], out.shape[-1])


def _update_running_stats(saved, flags, running_means, running_vars, momenta) -> None:
    """running = (1 - momentum) running + momentum batch for each batch-norm layer with running
    statistics, from the mean and unbiased variance the op returned (as ``F.batch_norm``): one
    ``_foreach_lerp_`` for all of them where they share a momentum and dtype, as they do in a
    ``FusedMLP`` of ``BatchNorm1d`` with default settings. Outside autograd, as torch's batch-norm
    kernels update them: under ``no_grad`` where any of the tensors requires grad (never for
    torch's buffers and the op's non-differentiable statistics; ``no_grad`` costs ~1.3 us)."""
    running, batch, weights = [], [], []
    same, tracked = True, False
    for i, has_bn in enumerate(flags):
        if not has_bn:
            continue
        rm, rv = running_means[i], running_vars[i]
        if absent(rm) or absent(rv):
            continue
        s = SAVED_PER_LAYER * i
        mean, var = saved[s + 3], saved[s + 5]
        if mean.dtype != rm.dtype:
            mean = mean.to(rm.dtype)
        if var.dtype != rv.dtype:
            var = var.to(rv.dtype)
        running += [rm, rv]
        batch += [mean, var]
        weights += [momenta[i], momenta[i]]
        same = same and momenta[i] == weights[0] and rm.dtype == rv.dtype == running[0].dtype
        tracked = tracked or rm.requires_grad or rv.requires_grad
        tracked = tracked or mean.requires_grad or var.requires_grad
    if running:
        untracked(tracked, _lerp, running, batch, weights, same)


def untracked(tracked: bool, fn, *args) -> None:
    """``fn(*args)`` outside autograd, as torch's batch-norm bookkeeping: under ``no_grad`` only
    where ``tracked`` (a tensor involved requires grad); ``no_grad`` costs ~1.3 us a call."""
    if tracked:
        with torch.no_grad():
            fn(*args)
    else:
        fn(*args)


def _lerp(running, batch, weights, same: bool) -> None:
    if same:
        torch._foreach_lerp_(running, batch, weights[0])
    else:
        for r, b, w in zip(running, batch, weights, strict=True):
            r.lerp_(b, w)


# ---- the ops: fake kernels, the Triton ops' autograd formula, registration ---------------

# As torch's linear under autocast: the products in the autocast dtype (input, weights and
# biases cast; the batch-norm parameters and statistics as they come).
SPEC = OpSpec("mlp", autocast=AUTOCAST_LOWER, autocast_args=3)


@SPEC.fake("mlp")
def _fake_fwd(*args):
    check_args(*args)
    input, weights, _, batch_norm, *_, training, _, activation, _, output_activation = args
    m, sdt = input.shape[0], acc_dtype(input.dtype)

    def none():
        return input.new_empty((0,))

    saved = []
    for i, w in enumerate(weights[:-1]):  # what csrc/mlp.h returns, shape for shape
        n = w.shape[0]
        h = input.new_empty((m, n))
        if not batch_norm[i]:
            uses_mask = activation in ACT_USES_MASK
            mask = input.new_empty((m, mask_row_bytes(n)) if uses_mask else (0,), dtype=torch.uint8)
            saved += [h, mask, none(), none(), none(), none()]
            continue
        aux = input.new_empty((m, n)) if activation == _LEAKY else none()
        stats = [input.new_empty((n,), dtype=sdt) for _ in range(2)]
        var = input.new_empty((n,) if training else (0,), dtype=sdt)
        saved += [h, aux, input.new_empty((m, n)), *stats, var]
    n_out = weights[-1].shape[0]
    uses_mask = output_activation in ACT_USES_MASK
    saved.append(
        input.new_empty((m, mask_row_bytes(n_out)) if uses_mask else (0,), dtype=torch.uint8)
    )
    return input.new_empty((m, n_out)), saved


@SPEC.fake("mlp_backward")
def _fake_bwd(*args):  # hpml::mlp_backward's arguments (schema.py)
    check_backward_args(*args[:8])
    input, weights, biases, batch_norm, bn_weights = args[1], args[3], args[4], args[5], args[6]
    biases, bn_weights = present(biases), present(bn_weights)
    input_grad, weight_grads, bias_grads, bn_weight_grads, bn_bias_grads = args[12:]

    def empty(dtype=input.dtype):  # a fresh one each time: outputs may not alias each other
        return input.new_empty((0,), dtype=dtype)

    gw = [
        w.new_empty(w.shape) if f else empty() for w, f in zip(weights, weight_grads, strict=True)
    ]
    gb = [
        input.new_empty((w.shape[0],)) if f and b is not None else empty()
        for w, b, f in zip(weights, biases, bias_grads, strict=True)
    ]
    gbw, gbb = [], []
    for i, w in enumerate(weights[:-1]):
        n = w.shape[0]
        bw = bn_weights[i]
        wdt = bw.dtype if bw is not None else input.dtype
        if not batch_norm[i]:
            gbw.append(empty())
            gbb.append(empty())
            continue
        gbw.append(input.new_empty((n,), dtype=wdt) if bn_weight_grads[i] and bw is not None
                   else empty(wdt))  # fmt: skip
        gbb.append(input.new_empty((n,), dtype=wdt) if bn_bias_grads[i] else empty(wdt))
    return (input.new_empty(input.shape) if input_grad else empty()), gw, gb, gbw, gbb


@SPEC.vmap("mlp")
def _vmap_fwd(info, in_dims, *args, op):
    """A batch of inputs is one call on their rows stacked (the saved per-row tensors come back
    as ``(B, rows, *)``); batched parameters or batch statistics in training (taken per sample),
    a call per sample."""
    input, weights, biases, flags, bn_w, bn_b, r_m, r_v, training = args[:9]
    dims = (in_dims[1], in_dims[2], *in_dims[4:8])
    if (training and any(flags)) or any(d is not None for ds in dims for d in ds):
        return vmap_by_loop(info, in_dims, args, op)
    x = input.movedim(in_dims[0], 0)
    batch, rows = x.shape[0], x.shape[1]
    out, saved = op(x.flatten(0, 1), *args[1:])
    out, out_dim = vmap_rows(out, batch, rows)
    # Per row: the 2-D ones (layer outputs, masks); per channel (statistics) or absent: 1-D.
    saved = [vmap_rows(t, batch, rows) if t.dim() == 2 else (t, None) for t in saved]
    return (out, [t for t, _ in saved]), (out_dim, [d for _, d in saved])


def _named_stats(running_means, running_vars) -> list:
    """(argument name, tensor) of every layer's running statistics, for the error that names one
    requiring grad."""
    return [(f"running_means[{i}]", t) for i, t in enumerate(running_means)] + [
        (f"running_vars[{i}]", t) for i, t in enumerate(running_vars)
    ]


@SPEC.setup_context
def _setup_context(ctx, inputs, output):
    (input, weights, biases, batch_norm, bn_weights, _, _, _, training, _, act, slope,
     out_act) = inputs  # fmt: skip
    check.running_stats_untracked("hpml::mlp", _named_stats(inputs[6], inputs[7]))
    out, saved = output
    bn_biases = inputs[5]  # (read only by a second backward: _backward's recomputation)
    ctx.save_for_backward(input, out, *weights, *biases, *bn_weights, *bn_biases, *saved)
    ctx.sizes = (len(weights), len(bn_weights))
    ctx.args = (list(batch_norm), training, act, slope, out_act)
    ctx.eps = inputs[9]
    ctx.mark_non_differentiable(*saved)


@SPEC.backward
def _backward(ctx, grad, grad_saved, *, bwd_op):
    n_layers, n_hidden = ctx.sizes
    tensors = list(ctx.saved_tensors)
    input, out = tensors[0], tensors[1]
    weights = tensors[2 : 2 + n_layers]
    biases = tensors[2 + n_layers : 2 + 2 * n_layers]
    bn_weights = tensors[2 + 2 * n_layers : 2 + 2 * n_layers + n_hidden]
    bn_biases = tensors[2 + 2 * n_layers + n_hidden : 2 + 2 * n_layers + 2 * n_hidden]
    saved = tensors[2 + 2 * n_layers + 2 * n_hidden :]
    flags, training, act, slope, out_act = ctx.args
    needs = ctx.needs_input_grad
    ig = bool(needs[0])
    wg, bg = [bool(n) for n in needs[1]], [bool(n) for n in needs[2]]
    bwg, bbg = [bool(n) for n in needs[4]], [bool(n) for n in needs[5]]
    nones = [None] * n_hidden
    # The batch_norm flags take None, or [] when empty (torch.library's structure of inputs).
    flags_grad = [] if n_hidden == 0 else None
    if not (ig or any(wg) or any(bg) or any(bwg) or any(bbg)):
        return (None, [None] * n_layers, [None] * n_layers, flags_grad, nones, nones, nones,
                nones) + (None,) * 5  # fmt: skip
    if reference.wants_graph(grad, input, *weights, *biases, *bn_weights, *bn_biases):
        # (a second backward to come) the net again from torch's ops, differentiated with a graph
        gx, gw, gb, gbw, gbb = reference.mlp_grads(
            grad, input, weights, present(biases), flags, present(bn_weights),
            present(bn_biases), [saved[SAVED_PER_LAYER * i + 3 : SAVED_PER_LAYER * i + 5]
                                 for i in range(n_hidden)],
            training, ctx.eps, _NAMES[act], slope, _NAMES[out_act], (ig, wg, bg, bwg, bbg),
        )  # fmt: skip
    else:
        gx, gw, gb, gbw, gbb = bwd_op(
            grad, input, out, weights, biases, flags, bn_weights, saved, training, act, slope,
            out_act, ig, wg, bg, bwg, bbg,
        )  # fmt: skip
    return (
        gx if ig else None,
        [g if f else None for g, f in zip(gw, wg, strict=True)],
        [g if f else None for g, f in zip(gb, bg, strict=True)],
        flags_grad,
        [g if f else None for g, f in zip(gbw, bwg, strict=True)],
        [g if f else None for g, f in zip(gbb, bbg, strict=True)],
        nones,
        nones,
    ) + (None,) * 5


OP = register(SPEC)
