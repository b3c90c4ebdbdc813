"""``FusedMLP``: an ``nn.Sequential`` of ``Linear, [BatchNorm1d], activation, ..., Linear,
[activation]`` whose forward runs the whole network as one op (``hpml_ops.mlp``) and its backward
as one op."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..constants import ACTIVATIONS
from ..ops.bce_with_logits import _bce_with_logits
from ..ops.mlp import run, untracked
from ..ops.mlp_bce_with_logits import fusable_loss, reduction_code
from ..ops.mlp_bce_with_logits import run as run_loss
from ._common import check_backend

# The activation modules the op knows, by exact type, and their names.
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}


def flat_children(modules) -> list[nn.Module]:
    """``modules`` in the order an ``nn.Sequential`` runs them, with the children of nested
    ``nn.Sequential`` blocks (exact type) in their place and ``nn.Identity`` left out."""
    out = []
    for m in modules:
        if type(m) is nn.Sequential:
            out += flat_children(m)
        elif type(m) is not nn.Identity:
            out.append(m)
    return out


def parse_layers(modules) -> dict | None:
    """The structure of ``modules`` as ``hpml_ops.mlp`` runs it, or None if it is not
    ``Linear, [BatchNorm1d], act, ..., Linear, [act]`` with one activation (and slope) for every
    hidden layer (exact types; nested ``nn.Sequential`` blocks are read through, ``nn.Identity``
    anywhere is skipped)."""
    mods = flat_children(modules)
    linears, bns, acts = [], [], []
    i = 0
    while i < len(mods):
        if type(mods[i]) is not nn.Linear:
            return None
        linears.append(mods[i])
        i += 1
        bn = None
        if i < len(mods) and type(mods[i]) is nn.BatchNorm1d:
            bn, i = mods[i], i + 1
        act = None
        if i < len(mods) and type(mods[i]) in ACTIVATION_MODULES:
            act, i = mods[i], i + 1
        bns.append(bn)
        acts.append(act)
    if not linears or bns[-1] is not None:
        return None
    hidden = acts[:-1]

    def key(a):
        if a is None:
            return ("none", 0.01)
        return (ACTIVATION_MODULES[type(a)], getattr(a, "negative_slope", 0.01))

    kinds = {key(a) for a in hidden}
    if len(kinds) > 1:
        return None
    activation, slope = kinds.pop() if kinds else ("none", 0.01)
    out_name, out_slope = key(acts[-1])
    if out_name == "leaky_relu" and hidden and activation == "leaky_relu" and out_slope != slope:
        return None
    if out_name == "leaky_relu":
        slope = out_slope
    return {
        "linears": linears,
        "bns": bns[:-1],
        "activation": activation,
        "negative_slope": slope,
        "output_activation": out_name,
    }


def find_runs(modules, eligible=None) -> list[tuple[int, int]]:
    """The maximal runs ``[i, j)`` of ``modules`` (a flat list, as an ``nn.Sequential``'s
    children) that ``hpml_ops.mlp`` runs as one op: ``Linear, [BatchNorm1d], activation, ...,
    Linear, [activation]`` (``parse_layers``) with two layers or more, every module in it
    ``eligible`` (default: all), exact types. Greedy from the left: each run is the longest that
    starts at its first Linear; what is left between runs is not in any."""
    mods = list(modules)

    def ok(k: int, kinds) -> bool:
        return k < len(mods) and type(mods[k]) in kinds and (eligible is None or eligible(mods[k]))

    runs, i = [], 0
    while i < len(mods):
        ends, j = [], i
        while ok(j, (nn.Linear,)):
            j += 1
            j += ok(j, (nn.BatchNorm1d,))
            j += ok(j, ACTIVATION_MODULES)
            ends.append(j)
        end = next((e for e in reversed(ends[1:]) if parse_layers(mods[i:e]) is not None), None)
        if end is None:
            i += 1
        else:
            runs.append((i, end))
            i = end
    return runs


class FusedMLP(nn.Sequential):
    """Drop-in for an ``nn.Sequential`` of ``Linear, [BatchNorm1d], activation, ...,
    Linear, [activation]``: the same children (modules, parameters, buffers), so the same
    ``state_dict`` key for key (checkpoints load both ways); the forward runs the whole network
    as one op, its backward as one op, with the batch-norm modules' bookkeeping
    (``num_batches_tracked``, ``momentum=None``) exactly as theirs.

    The children may also be ``nn.Sequential`` blocks of those (``[Linear, BatchNorm1d, ReLU],
    ..., Linear``, as ``hpml_ops.models.MLP`` lays them out): the keys are then the nested ones
    (``0.0.weight``), as in the ``nn.Sequential`` of blocks it replaces.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``; with batch norm, 2-D
    input ``(N, in_features)`` (others run module by module, as ``nn.Sequential`` would).

    ``backend``: None (default) runs on the process-wide choice; a name on that backend.
    """

    backend: str | None = None

    def __init__(self, *args, backend: str | None = None) -> None:
        super().__init__(*args)
        if parse_layers(self) is None:
            raise ValueError(
                "FusedMLP: expected Linear, [BatchNorm1d], activation, ..., Linear, [activation] "
                "(one activation for every hidden layer: ReLU, LeakyReLU, Sigmoid or Tanh), got "
                + ", ".join(type(m).__name__ for m in self)
            )
        self.backend = check_backend(backend, "FusedMLP")

    def _layers(self) -> dict | None:
        """parse_layers of the current children, cached while they stay the same modules, with
        what every call needs ready (``_prepared``)."""
        return _prepared(self.__dict__, "_hpml_layers", flat_children(self._modules.values()))

    def forward(self, input: Tensor) -> Tensor:
        spec = self._layers()
        if spec is None or _hooked(spec["modules"]) or is_fx_symbolic_tracing():
            # torch.fx traces the children (torch's own modules, leaves to it) one by one.
            return super().forward(input)
        return _run_layers(spec, input, self.backend, super().forward)

    def bce_with_logits(
        self,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
        reduction: str = "mean",
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``F.binary_cross_entropy_with_logits(self(input), target, weight,
        reduction=reduction, pos_weight=pos_weight)`` with the net and the loss as one op forward
        and one backward (``hpml_ops.mlp_bce_with_logits``): the backward starts from the loss
        inside the net's backward. For a net whose last layer has no activation (its output is
        the logits). ``return_logits``: also return the logits, detached (accuracy, metrics).

        Where one op cannot run it (an output activation, hooks, torch.fx tracing, batch norms
        of mixed modes, other than 2-D input with batch norm, operands of other dtypes,
        autocast, torch.func transforms) it is ``self(input)`` then
        ``hpml_ops.binary_cross_entropy_with_logits``: the same values."""
        spec = self._layers()
        args = None
        if (
            spec is not None
            and spec["codes"][1] == ACTIVATIONS["none"]
            and not _hooked(spec["modules"])
            and not is_fx_symbolic_tracing()
            and isinstance(input, Tensor)
            and input.dim() == 2
            and fusable_loss(input, target, weight, pos_weight)
        ):
            args = _layer_args(spec, input)
        if args is None:
            logits = self(input)
            loss = _bce_with_logits(logits, target, weight, reduction, pos_weight, self.backend)
            return (loss, logits.detach()) if return_logits else loss
        weights, biases, flags, bn_w, bn_b, r_m, r_v, training, eps, act, slope, _ = args
        loss, logits = run_loss(
            input, target, weight, pos_weight, reduction_code(reduction), weights, biases, flags,
            bn_w, bn_b, r_m, r_v, training, eps, act, slope, _momenta(spec["bns"]), self.backend,
        )  # fmt: skip
        return (loss, logits) if return_logits else loss

    def extra_repr(self) -> str:
        return f"backend={self.backend}" if self.backend is not None else ""


class FusedRuns(nn.Sequential):
    """Drop-in for an ``nn.Sequential`` with other modules around or between its MLP parts
    (``Flatten, Linear, ReLU, Linear, BatchNorm1d, ReLU, Linear, Dropout, Linear``): each run of
    ``Linear, [BatchNorm1d], activation, ..., Linear, [activation]`` named in ``runs`` (two layers
    or more) runs as one ``hpml_ops.mlp`` op forward and one backward, as in ``FusedMLP``, and
    every other child as ``nn.Sequential`` runs it. The same children, so the same ``state_dict``
    key for key. ``convert`` makes one, with the maximal runs of modules it may fuse (see
    ``find_runs``), for an ``nn.Sequential`` that is not a whole MLP.

    Args:
        runs: ``(first, last)`` child names of each run, inclusive; None: every maximal run.
        backend: None (default) runs on the process-wide choice; a name on that backend.

    A run whose children no longer form an MLP (one was replaced), one with a hook on a child,
    or whose batch norms differ in mode or eps, or that gets other than 2-D input with batch norm,
    runs module by module, as ``nn.Sequential`` would.
    """

    backend: str | None = None

    def __init__(self, *args, runs=None, backend: str | None = None) -> None:
        super().__init__(*args)
        names = list(self._modules)
        if runs is None:
            runs = [(names[i], names[j - 1]) for i, j in find_runs(self._modules.values())]
        end = -1
        for first, last in runs:
            if first not in self._modules or last not in self._modules:
                raise ValueError(f"FusedRuns: run ({first!r}, {last!r}) names a missing child")
            if names.index(last) <= names.index(first):
                raise ValueError(f"FusedRuns: run ({first!r}, {last!r}) is not in order")
            if names.index(first) <= end:
                raise ValueError(
                    f"FusedRuns: run ({first!r}, {last!r}) overlaps or precedes the one before"
                )
            end = names.index(last)
        self.runs = [(str(a), str(b)) for a, b in runs]
        self.backend = check_backend(backend, "FusedRuns")

    def _segments(self) -> list:
        """The children in order, each run as one entry (its names and modules), cached while the
        children and runs stay the same."""
        names = list(self._modules)
        key = (tuple(map(id, self._modules.values())), tuple(self.runs))
        cached = self.__dict__.get("_hpml_segments")
        if cached is None or cached[0] != key:
            starts = dict(self.run_spans())
            segs, i = [], 0
            while i < len(names):
                j = starts.get(i, i + 1)
                segs.append([self._modules[n] for n in names[i:j]])
                i = j
            cached = (key, segs, {})
            self.__dict__["_hpml_segments"] = cached
        return cached[1]

    def run_spans(self) -> list[tuple[int, int]]:
        """The runs as child index ranges ``[i, j)``; runs whose children were since deleted or
        reordered are left out (their modules run one by one)."""
        names, spans, end = list(self._modules), [], -1
        for a, b in self.runs:
            if a in self._modules and b in self._modules:
                i, j = names.index(a), names.index(b)
                if end < i < j:
                    spans.append((i, j + 1))
                    end = j
        return spans

    def forward(self, input: Tensor) -> Tensor:
        if is_fx_symbolic_tracing():
            return super().forward(input)
        x = input
        for k, mods in enumerate(self._segments()):
            if len(mods) == 1:
                x = mods[0](x)
                continue
            spec = _prepared(self.__dict__["_hpml_segments"][2], k, mods)
            if spec is None or _hooked(mods):
                x = _in_order(mods, x)
            else:
                x = _run_layers(spec, x, self.backend, lambda t, mods=mods: _in_order(mods, t))
        return x

    def extra_repr(self) -> str:
        runs = ", ".join(f"{a}-{b}" for a, b in self.runs)
        return f"runs=[{runs}]" + (f", backend={self.backend}" if self.backend is not None else "")


def _in_order(mods, x):
    for m in mods:
        x = m(x)
    return x


def _prepared(store: dict, key, mods) -> dict | None:
    """parse_layers of ``mods`` with what every call needs ready (activation codes, batch-norm
    flags, the batch-norm modules, a per-device stand-in for None), cached in ``store[key]``
    while ``mods`` stay the same modules."""
    ids = tuple(map(id, mods))
    cached = store.get(key)
    if cached is None or cached[0] != ids:
        spec = parse_layers(mods)
        if spec is not None:
            spec["codes"] = (
                ACTIVATIONS[spec["activation"]],
                ACTIVATIONS[spec["output_activation"]],
            )
            spec["flags"] = [bn is not None for bn in spec["bns"]]
            spec["present"] = [bn for bn in spec["bns"] if bn is not None]
            spec["modules"] = list(mods)
            spec["empty"] = {}
        cached = (ids, spec)
        store[key] = cached
    return cached[1]


def _run_layers(spec: dict, input: Tensor, backend, fallback) -> Tensor:
    """The layers of ``spec`` (``_prepared``) on ``input`` as one op, or ``fallback(input)``
    (module by module) where one op cannot run them."""
    args = _layer_args(spec, input)
    if args is None:
        return fallback(input)
    return run(input, *args, _momenta(spec["bns"]), backend)


def _layer_args(spec: dict, input: Tensor) -> tuple | None:
    """The arguments of ``hpml_ops.ops.mlp.run`` after the input and before the momenta
    (weights, biases, flags, the batch norms' tensors, training, eps, the activation codes and
    slope) for the layers of ``spec`` on ``input``; None where one op cannot run them."""
    bns = spec["present"]
    # One op for the whole net needs one mode and one eps for every batch norm, and (N, C)
    # input; otherwise the modules run one by one, as nn.Sequential runs them.
    training, eps = False, 1e-5
    if bns:
        first = bns[0]
        training = first.training or (first.running_mean is None and first.running_var is None)
        eps = first.eps
        for bn in bns:
            mode = bn.training or (bn.running_mean is None and bn.running_var is None)
            if mode != training or bn.eps != eps:
                return None
        if input.dim() != 2:
            return None
    none = _empty(spec["empty"], input)
    weights = [_tensor(lin, "weight") for lin in spec["linears"]]
    biases = [_tensor(lin, "bias", none) for lin in spec["linears"]]
    bn_w, bn_b, r_m, r_v = [], [], [], []
    for bn in spec["bns"]:
        if bn is None:
            bn_w.append(none), bn_b.append(none), r_m.append(none), r_v.append(none)
            continue
        bn_w.append(_tensor(bn, "weight", none))
        bn_b.append(_tensor(bn, "bias", none))
        stats = not bn.training or bn.track_running_stats  # as _BatchNorm.forward passes them
        r_m.append(_tensor(bn, "running_mean", none) if stats else none)
        r_v.append(_tensor(bn, "running_var", none) if stats else none)
    act, out_act = spec["codes"]
    return (
        weights, biases, spec["flags"], bn_w, bn_b, r_m, r_v, training, float(eps), act,
        float(spec["negative_slope"]), out_act,
    )  # fmt: skip


def _tensor(m: nn.Module, name: str, none=None):
    """``m.<name>`` (a parameter or buffer; ``none`` where it is None), read from the module's
    dicts where it is registered there (``Module.__getattr__`` costs ~0.5 us a time), else as an
    attribute (a parametrized or otherwise computed weight)."""
    t = m._parameters.get(name) if name in m._parameters else m._buffers.get(name, m)
    if t is m:
        t = getattr(m, name, None)
    return none if t is None else t


def _hooked(mods) -> bool:
    """Whether forward hooks would see the children one at a time (registered on one of them,
    or globally): then the modules run one by one, so that every hook sees what it expects."""
    return bool(
        _global_forward_hooks
        or _global_forward_pre_hooks
        or any(m._forward_hooks or m._forward_pre_hooks for m in mods)
    )


def _empty(cache: dict, input: Tensor) -> Tensor:
    """The ops' stand-in for None: an empty (0, 0) tensor on the input's device, kept per device
    in ``cache`` (a spec's)."""
    if not isinstance(input, Tensor):
        return None  # the op's argument check names the input
    t = cache.get(input.device)
    if t is None:
        # Kept only when it is a plain tensor made outside torch.func transforms: one made while
        # torch.export or a fake mode traces (a FakeTensor, a FunctionalTensor) or from a
        # functorch wrapper would outlive them in the cache (the module then no longer deep-copies
        # or runs outside them).
        t = torch.empty((0, 0), device=input.device)
        if type(t) is Tensor and not torch._C._are_functorch_transforms_active():
            cache[input.device] = t
    return t


def _momenta(bns) -> list[float]:
    """``_BatchNorm.forward``'s bookkeeping for each batch norm (0.0 where a layer has none):
    count the batch (one ``_foreach_add_`` for all), return the averaging factors. One pass over
    the modules, their counters read from ``_buffers`` (``Module.__getattr__`` costs ~0.5 us a
    time), under ``no_grad`` only where a counter requires grad (torch's are integer tensors, which
    autograd never records; ``no_grad`` costs ~1.3 us)."""
    out, counted, cumulative = [], [], []
    for bn in bns:
        if bn is None:
            out.append(0.0)
            continue
        n = _tensor(bn, "num_batches_tracked")
        counting = bn.training and bn.track_running_stats and n is not None
        if counting:
            counted.append(n)
        if bn.momentum is not None:
            out.append(bn.momentum)
        else:
            if counting:  # a cumulative average: 1 / the count after this batch's
                cumulative.append((len(out), n))
            out.append(0.0)
    if counted:  # (a counter that requires grad: one made float and trainable)
        untracked(any(t.requires_grad for t in counted), torch._foreach_add_, counted, 1)
    for k, n in cumulative:
        out[k] = 1.0 / float(n)
    return out
