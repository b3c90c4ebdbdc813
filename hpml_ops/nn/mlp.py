"""``FusedMLP``: an ``nn.Sequential`` of ``Linear, [BatchNorm1d], activation, ..., Linear,
[activation]`` whose forward runs the whole network as one op (``hpml_ops.mlp``) and its backward
as one op."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.mlp import _mlp
from ._common import check_backend

# The activation modules the op knows, by exact type, and their names.
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}


def parse_layers(modules) -> dict | None:
    """The structure of ``modules`` as ``hpml_ops.mlp`` runs it, or None if it is not
    ``Linear, [BatchNorm1d], act, ..., Linear, [act]`` with one activation (and slope) for every
    hidden layer (exact types; ``nn.Identity`` anywhere is skipped)."""
    mods = [m for m in modules if type(m) is not nn.Identity]
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


class FusedMLP(nn.Sequential):
    """Drop-in for an ``nn.Sequential`` of ``Linear, [BatchNorm1d], activation, ...,
    Linear, [activation]``: the same children (modules, parameters, buffers), so the same
    ``state_dict`` key for key (checkpoints load both ways); the forward runs the whole network
    as one op, its backward as one op, with the batch-norm modules' bookkeeping
    (``num_batches_tracked``, ``momentum=None``) exactly as theirs.

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
        """parse_layers of the current children, cached while they stay the same modules."""
        key = tuple(map(id, self._modules.values()))
        cached = self.__dict__.get("_hpml_layers")
        if cached is None or cached[0] != key:
            cached = (key, parse_layers(self))
            self.__dict__["_hpml_layers"] = cached
        return cached[1]

    def forward(self, input: Tensor) -> Tensor:
        spec = self._layers()
        if spec is None:
            return super().forward(input)
        bns = [bn for bn in spec["bns"] if bn is not None]
        # One op for the whole net needs one mode and one eps for every batch norm, and (N, C)
        # input; otherwise the modules run one by one, as nn.Sequential runs them.
        modes = {bn.training or (bn.running_mean is None and bn.running_var is None) for bn in bns}
        epss = {bn.eps for bn in bns}
        if len(modes) > 1 or len(epss) > 1 or (bns and input.dim() != 2):
            return super().forward(input)
        return _mlp(
            input,
            [lin.weight for lin in spec["linears"]],
            [lin.bias for lin in spec["linears"]],
            spec["activation"],
            negative_slope=spec["negative_slope"],
            output_activation=spec["output_activation"],
            batch_norm=[bn is not None for bn in spec["bns"]],
            bn_weights=[None if bn is None else bn.weight for bn in spec["bns"]],
            bn_biases=[None if bn is None else bn.bias for bn in spec["bns"]],
            running_means=[_running(bn, "running_mean") for bn in spec["bns"]],
            running_vars=[_running(bn, "running_var") for bn in spec["bns"]],
            training=modes.pop() if modes else False,
            momentum=[0.0 if bn is None else _momentum(bn) for bn in spec["bns"]],
            eps=epss.pop() if epss else 1e-5,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend}" if self.backend is not None else ""


def _running(bn, name: str):
    """The running statistic the op reads or updates: as ``_BatchNorm.forward`` passes it."""
    if bn is None or not (not bn.training or bn.track_running_stats):
        return None
    return getattr(bn, name)


def _momentum(bn) -> float:
    """``_BatchNorm.forward``'s bookkeeping: count the batch, return the averaging factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor
