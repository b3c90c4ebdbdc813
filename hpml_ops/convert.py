"""``convert``: turn the torch modules of an existing model into hpml_ops' drop-ins, in place."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from . import nn as hnn
from ._backend import CHOICES, use_backend
from .nn._absorbed import absorb
from .nn.mlp import ACTIVATION_MODULES, find_runs, flat_children, parse_layers

# The activations a Linear can absorb, by exact type, and the name linear_act knows them by.
_LINEAR_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}
_BATCH_NORMS: dict[type, type] = {
    nn.BatchNorm1d: hnn.BatchNorm1d,
    nn.BatchNorm2d: hnn.BatchNorm2d,
    nn.BatchNorm3d: hnn.BatchNorm3d,
}
# Modules without state, which one FusedMLP may hold in several slots.
_STATELESS = frozenset(ACTIVATION_MODULES)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def convert(
    model: nn.Module,
    backend: str | None = None,
    *,
    fuse_mlp: bool = True,
    report: list[str] | None = None,
) -> nn.Module:
    """Replace, in place, the torch modules of ``model`` that hpml_ops has fused drop-ins for, and
    return the model.

    What is replaced (exact types only: a subclass of these modules, which may have its own
    ``forward``, is left as it is, and so is every hpml_ops module already there):

    - with ``fuse_mlp`` (the default), an ``nn.Sequential`` (exact type) that is a whole MLP,
      ``Linear, [BatchNorm1d], activation, ..., Linear, [activation]`` with one activation for
      every hidden layer (nested ``nn.Sequential`` blocks of those read through):
      ``hpml_ops.nn.FusedMLP`` with the same children, so the same ``state_dict`` keys; its
      forward and backward are one op each (``hpml_ops.mlp``). Not when any of its modules has
      hooks, sits in more than one place, or has parameters of another dtype. ``report`` says
      which and why;
    - with ``fuse_mlp``, an ``nn.Sequential`` (exact type) with other modules around or between
      its MLP parts (``Flatten``, ``Dropout``, ``SyncBatchNorm``, a convolution, a change of
      activation, ...): each maximal run of two layers or more of such modules that may be fused
      (no hooks, in one place only, fp32/fp64/fp16/bf16) runs as one ``hpml_ops.mlp`` op: the
      Sequential becomes an ``hpml_ops.nn.FusedRuns`` with the same children (the same
      ``state_dict`` keys) naming its runs, and its other children get the per-layer fusion
      below. ``report`` names each run. As for a whole MLP at the top level, a top-level one is
      replaced: use the returned module;
    - ``nn.Linear`` directly followed, in an ``nn.Sequential``, by ``nn.ReLU``, ``nn.LeakyReLU``
      (its ``negative_slope`` kept), ``nn.Sigmoid`` or ``nn.Tanh``: one ``hpml_ops.nn.FusedLinear``
      with that activation; the activation's slot keeps the activation as an ``AbsorbedReLU`` /
      ``AbsorbedLeakyReLU`` / ``AbsorbedSigmoid`` / ``AbsorbedTanh`` (a subclass of its class),
      which passes the fused module's own output through and applies the activation to anything else
      (a torch helper that rebuilt the fused module from its class, a hook's replacement output):
      never lost, never applied twice (``hpml_ops/nn/_absorbed.py``). The Sequential's indices,
      and therefore the ``state_dict`` keys, stay the same. A forward hook on the fused module
      sees the pre-activation output, as on torch's (the slot then applies the activation);
    - any other ``nn.Linear``: ``FusedLinear(activation="none")``;
    - ``nn.BatchNorm1d`` / ``2d`` / ``3d``: ``hpml_ops.nn.BatchNorm1d`` / ``2d`` / ``3d``, with
      ``activation="relu"`` (and the ReLU's slot an ``AbsorbedReLU``, as above) when an
      ``nn.ReLU`` follows it in an ``nn.Sequential``;
    - ``nn.BCEWithLogitsLoss``: ``hpml_ops.nn.BCEWithLogitsLoss``.

    The new modules take over the old ones' parameter and buffer *objects* (an optimizer built
    before the conversion keeps working; ``requires_grad``, device, dtype and values unchanged), the
    non-persistent-buffer set, the train/eval flag and any other instance attribute, so the
    ``state_dict`` has the same keys and values: a checkpoint of the original loads into the
    converted model, and back. Fusion only looks at neighbours within one ``nn.Sequential`` (or a
    subclass that keeps ``nn.Sequential.forward``, such as torchvision's ``MLP`` and
    ``Conv2dNormActivation``: their forward is known to run the children in order; they keep their
    class and attributes).

    Not converted: a module with hooks registered on it (forward, backward or state-dict hooks
    would see a different module, or, fused, a different output), and no activation with hooks is
    absorbed; a Linear / BatchNorm with parameters of a dtype other than fp32/fp64/fp16/bf16; a
    module that sits in more than one place of the model is converted once (every place then holds
    the same new module) and never fused with an activation.

    Args:
        model: any ``nn.Module``. A bare ``nn.Linear``, ``nn.BatchNorm1d/2d`` or
            ``nn.BCEWithLogitsLoss`` is converted too: then the *returned* module is the new one.
        backend: None (default): the converted modules run on the process-wide backend choice
            (``hpml_ops.use_backend``, ``HPML_BACKEND``); "cpp", "triton", "reference" or "auto":
            they always run on that backend (their ``backend`` attribute).
        fuse_mlp: replace whole-MLP ``nn.Sequential`` blocks by ``FusedMLP`` and fuse the runs
            inside others (``FusedRuns``) (True), or keep to the per-layer fusion everywhere
            (False).
        report: a list to which convert appends one line per ``nn.Sequential`` it looked at:
            fused into a ``FusedMLP``, its runs fused (one line per run), or left to the
            per-layer ops and why.

    Returns:
        ``model``, converted in place (or the replacement of a bare module or of a top-level
        ``nn.Sequential``, see above).

    Raises:
        ValueError: ``backend`` is not None or one of the backend names.
        hpml_ops.BackendUnavailableError: ``backend`` cannot run here (the message says why).
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if backend is not None:
        if not isinstance(backend, str) or backend not in CHOICES:
            raise ValueError(
                f"convert: backend must be None or one of {', '.join(map(repr, CHOICES))}, got "
                f"{backend!r}"
            )
        with use_backend(backend):  # raises BackendUnavailableError, saying why, if it can't run
            pass
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    # Modules are told apart by id(): every original one is kept alive until the end, so that no
    # module created on the way can reuse the id of one that was replaced.
    alive = list(model.modules())
    uses = _count_uses(model)
    memo: dict[int, nn.Module] = {}
    ctx = _Ctx(backend, uses, memo, fuse_mlp, report)
    top = _fused_mlp(model, "", ctx) or _convert_one(model, None, backend, memo)
    if top is None or type(top) is hnn.FusedRuns:
        _walk(top or model, "", ctx, set())
    del alive
    return model if top is None else top


class _Ctx:
    """What every step of one conversion shares."""

    def __init__(self, backend, uses, memo, fuse_mlp: bool, report) -> None:
        self.backend, self.uses, self.memo = backend, uses, memo
        self.fuse_mlp, self.report = fuse_mlp, report

    def say(self, path: str, what: str) -> None:
        if self.report is not None:
            self.report.append(f"{path or '(model)'}: {what}")


def _fused_mlp(seq: nn.Module, path: str, ctx: _Ctx) -> nn.Module | None:
    """``seq`` as a ``FusedMLP`` (same children, attributes and flags), or None (saying why in
    the report) when it is not an exact ``nn.Sequential`` that is a whole MLP hpml_ops.mlp runs."""
    if not ctx.fuse_mlp or type(seq) is not nn.Sequential:
        return None
    blocks = [m for m in seq.modules() if type(m) is nn.Sequential]
    mods = flat_children(seq)
    names = ", ".join(type(m).__name__ for m in mods)
    why = None
    if parse_layers(mods) is None:
        runs = _fused_runs(seq, path, ctx)
        if runs is not None:
            return runs
        why = (
            f"{names} is not Linear, [BatchNorm1d], activation, ..., Linear, [activation] with "
            "one activation for every hidden layer"
        )
    elif any(_has_hooks(m) for m in [*blocks, *mods]):
        why = "a module in it has hooks"
    elif any(ctx.uses.get(id(m), 0) != 1 for m in [*blocks, *mods] if type(m) not in _STATELESS):
        why = "a module in it sits in more than one place"  # (one activation module may)
    elif any(b._parameters or b._buffers for b in blocks):
        why = "an nn.Sequential in it has parameters or buffers of its own"
    elif any(
        t.dtype not in _DTYPES
        for m in mods
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if t.is_floating_point()
    ):
        why = "a parameter or buffer of a dtype other than fp32/fp64/fp16/bf16"
    if why is not None:
        ctx.say(path, f"left to the per-layer ops: {why}")
        return None
    new = hnn.FusedMLP(OrderedDict(seq._modules), backend=ctx.backend)
    _take_over(new, seq)  # the same children already; its flags and attributes
    ctx.say(path, f"{names} -> FusedMLP")
    return new


def _fused_runs(seq: nn.Module, path: str, ctx: _Ctx) -> nn.Module | None:
    """``seq`` (an exact ``nn.Sequential``, not a whole MLP) as a ``FusedRuns`` (same children,
    attributes and flags) whose runs are the maximal runs of modules that may be fused
    (``find_runs``: no hooks, in one place only, fp32/fp64/fp16/bf16), or None when it has no
    such run of two layers or more. Its other children are converted by ``_walk``."""
    mods = list(seq._modules.values())

    def eligible(m: nn.Module) -> bool:
        return (
            not _has_hooks(m)
            and (type(m) in _STATELESS or ctx.uses.get(id(m), 0) == 1)
            and all(
                t.dtype in _DTYPES
                for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
                if t.is_floating_point()
            )
        )

    runs = find_runs(mods, eligible) if None not in mods else []
    if not runs:
        return None
    names = list(seq._modules)
    new = hnn.FusedRuns(
        OrderedDict(seq._modules),
        runs=[(names[i], names[j - 1]) for i, j in runs],
        backend=ctx.backend,
    )
    _take_over(new, seq)
    for i, j in runs:
        kinds = ", ".join(type(m).__name__ for m in mods[i:j])
        ctx.say(path, f"{names[i]}-{names[j - 1]} ({kinds}) -> one hpml_ops.mlp op (FusedRuns)")
    return new


def _run_members(m: nn.Module) -> frozenset[str]:
    """The names of the children of a ``FusedRuns`` that its runs hold (left as they are)."""
    if type(m) is not hnn.FusedRuns:
        return frozenset()
    names = list(m._modules)
    return frozenset(n for i, j in m.run_spans() for n in names[i:j])


def _count_uses(model: nn.Module) -> dict[int, int]:
    """How many container slots hold each module (the root counts as one)."""
    uses = {id(model): 1}
    for parent in model.modules():  # each distinct module once
        for child in parent._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
    return uses


def _runs_in_order(m: nn.Module) -> bool:
    """An ``nn.Sequential``, or a subclass that keeps its forward (torchvision's ``MLP``,
    ``Conv2dNormActivation``): it runs its children in order, so neighbours can be fused (the
    module keeps its class and attributes; only exact ``nn.Sequential`` become ``FusedMLP``)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in _HOOK_DICTS)


def _walk(module: nn.Module, path: str, ctx: _Ctx, seen: set[int]) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    # A FusedRuns' runs stay as they are; its other children are fused and converted as any
    # nn.Sequential's.
    members = _run_members(module)
    if _runs_in_order(module) or members:
        _fuse_sequential(module, ctx.backend, ctx.uses, ctx.memo, members)
    for name, child in list(module._modules.items()):
        if child is None or name in members:
            continue
        child_path = f"{path}.{name}" if path else name
        new = _fused_mlp(child, child_path, ctx) or _convert_one(child, None, ctx.backend, ctx.memo)
        if new is not None:
            module._modules[name] = new
        if new is None or type(new) is hnn.FusedRuns:
            _walk(new or child, child_path, ctx, seen)


def _fuse_sequential(seq: nn.Sequential, backend, uses, memo, skip=frozenset()) -> None:
    """Fuse each (Linear | BatchNorm, activation) pair of neighbouring slots of ``seq`` (none
    of them named in ``skip``)."""
    names = list(seq._modules)
    i = 0
    while i < len(names) - 1:
        m, act = seq._modules[names[i]], seq._modules[names[i + 1]]
        fusable = (
            names[i] not in skip
            and names[i + 1] not in skip
            and m is not None
            and act is not None
            and uses.get(id(m), 0) == 1
            and not _has_hooks(act)
            and (
                (type(m) is nn.Linear and type(act) in _LINEAR_ACTIVATIONS)
                or (type(m) in _BATCH_NORMS and type(act) is nn.ReLU)
            )
        )
        new = _convert_one(m, act, backend, memo) if fusable else None
        if new is None:
            i += 1
            continue
        seq._modules[names[i]] = new
        # The activation's slot keeps an activation module that passes the fused module's own
        # output through and applies itself to anything else (hpml_ops/nn/_absorbed.py).
        seq._modules[names[i + 1]] = absorb(new, act)
        i += 2


def _convert_one(m: nn.Module, act: nn.Module | None, backend, memo) -> nn.Module | None:
    """The replacement of ``m`` (absorbing the activation module ``act`` when given), or None
    when ``m`` is not one of the converted types or must stay as it is."""
    if id(m) in memo:
        return memo[id(m)] if act is None else None
    kind = type(m)
    if _has_hooks(m):
        return None
    if kind is nn.Linear:
        if m.weight.dtype not in _DTYPES:
            return None
        activation = "none" if act is None else _LINEAR_ACTIVATIONS[type(act)]
        slope = act.negative_slope if type(act) is nn.LeakyReLU else 0.01
        new = hnn.FusedLinear(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            activation=activation,
            negative_slope=slope,
            device="meta",  # no memory, no initialisation: the parameters are taken over below
            dtype=m.weight.dtype,
            backend=backend,
        )
    elif kind in _BATCH_NORMS:
        tensors = [t for t in (m.weight, m.running_mean) if t is not None]
        if any(t.dtype not in _DTYPES for t in tensors):
            return None
        # Recent torch can leave out the bias alone (bias=False); older versions have no such flag.
        no_bias = {"bias": False} if m.affine and m.bias is None else {}
        new = _BATCH_NORMS[kind](
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            device="meta",
            activation=None if act is None else "relu",
            backend=backend,
            **no_bias,
        )
    elif kind is nn.BCEWithLogitsLoss:
        new = hnn.BCEWithLogitsLoss(reduction=m.reduction, backend=backend)
    else:
        return None
    _take_over(new, m)
    if act is None:
        memo[id(m)] = new
    return new


def _take_over(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the parameter and buffer objects of ``old`` (same names: the converted types
    register the same ones as torch's), its train/eval flag and its other instance attributes."""
    assert set(new._parameters) == set(old._parameters), (new._parameters, old._parameters)
    assert set(new._buffers) == set(old._buffers), (new._buffers, old._buffers)
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training  # its own flag only: children keep theirs
    for name, value in old.__dict__.items():
        if name not in new.__dict__:
            new.__dict__[name] = value
