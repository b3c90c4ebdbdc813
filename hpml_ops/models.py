"""Ready-made models built from the fused modules, each with a plain-PyTorch twin.

``MLP(in_features, hidden_sizes, out_features=1, activation="relu", batch_norm=True, init="he")``
is a multilayer perceptron of hidden blocks and a linear head that returns logits (use it with
``hpml_ops.nn.BCEWithLogitsLoss``). It is built from PyTorch's own ``nn.Linear``,
``nn.BatchNorm1d`` and activation modules either way; with ``fused=True`` (the default) it is an
``hpml_ops.nn.FusedMLP`` that runs the whole network as one op forward and one op backward
(``hpml_ops.mlp``); with ``fused=False`` it runs module by module, as ``nn.Sequential`` does. The
two have the same modules, ``state_dict`` keys and, for the same seed, initial values, so a
checkpoint of one loads into the other and both can start from identical weights::

    fused = MLP(30, [64, 32])                        # hpml_ops' whole-network op
    plain = MLP(30, [64, 32], fused=False)           # PyTorch's own modules, one by one
    plain.load_state_dict(fused.state_dict())        # identical starting point

Layout (an ``nn.Sequential``; block ``i`` is itself an ``nn.Sequential``)::

    batch_norm:      i: [Linear, BatchNorm1d, activation module]
    no batch_norm:   i: [Linear,              activation module]
    head:            L: Linear

(no activation module for ``activation="none"``), so the keys are ``"0.0.weight"``,
``"0.1.running_mean"``, ..., ``"L.weight"`` in both forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import constants
from . import nn as hnn

ACTIVATIONS = tuple(constants.ACTIVATIONS)
INITS = ("he", "he_uniform", "xavier", "xavier_uniform", "torch")

__all__ = ["ACTIVATIONS", "INITS", "MLP", "count_parameters", "init_linear_", "plain_mlp"]


def _activation_module(name: str, negative_slope: float) -> nn.Module | None:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    return None


def init_linear_(
    layer: nn.Linear, init: str, activation: str = "relu", negative_slope: float = 0.01
) -> None:
    """Initialise ``layer.weight`` in place by ``init`` for a layer followed by ``activation``,
    and set its bias to zero (``init="torch"`` keeps ``nn.Linear``'s own initialisation).

    - ``"he"``: ``kaiming_normal_`` (fan-in), std ``gain / sqrt(fan_in)`` — the lecture's
      ``sqrt(2 / r_in)`` for ReLU; ``"he_uniform"``: ``kaiming_uniform_``, same variance;
    - ``"xavier"``: ``xavier_normal_``, std ``gain * sqrt(2 / (fan_in + fan_out))`` — the lecture's
      Glorot for ``gain = 1`` (sigmoid, and the logits of the head); ``"xavier_uniform"``:
      ``xavier_uniform_``, same variance;

    with ``gain = torch.nn.init.calculate_gain(activation)`` (``"none"`` -> ``"linear"``, 1).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    constants.activation_code(activation, "init_linear_")
    if init == "torch":
        return
    nonlinearity = "linear" if activation == "none" else activation
    param = negative_slope if activation == "leaky_relu" else None
    w = layer.weight
    if init in ("he", "he_uniform"):
        # kaiming_* take the leaky slope as `a`; for other nonlinearities `a` is ignored.
        a = negative_slope if activation == "leaky_relu" else 0.0
        fn = nn.init.kaiming_normal_ if init == "he" else nn.init.kaiming_uniform_
        fn(w, a=a, mode="fan_in", nonlinearity=nonlinearity)
    else:
        gain = nn.init.calculate_gain(nonlinearity, param)
        fn = nn.init.xavier_normal_ if init == "xavier" else nn.init.xavier_uniform_
        fn(w, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(hnn.FusedMLP):
    """Multilayer perceptron: ``len(hidden_sizes)`` hidden blocks (linear, optional batch norm,
    activation) and a linear head returning logits.

    Args:
        in_features: size of each input sample.
        hidden_sizes: width of each hidden layer (may be empty: logistic regression).
        out_features: number of logits (1 for binary classification; 10 for ten sigmoid outputs).
        activation: ``"relu"``, ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"`` or ``"none"``.
        batch_norm: a ``BatchNorm1d`` between each hidden linear layer and its activation.
        init: ``"he"``, ``"he_uniform"``, ``"xavier"``, ``"xavier_uniform"`` (see
            :func:`init_linear_`) or ``"torch"`` (``nn.Linear``'s default); biases zero.
        fused: run as one op forward and one op backward (True: ``hpml_ops.mlp``, on the
            process-wide backend) or module by module (False: PyTorch's own ops).
        negative_slope: slope of ``"leaky_relu"``.

    Shapes: input ``(N, in_features)`` float; output ``(N, out_features)`` logits. Batch norm in
    training mode needs ``N > 1``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        out_features: int = 1,
        activation: str = "relu",
        batch_norm: bool = True,
        init: str = "he",
        *,
        fused: bool = True,
        negative_slope: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        hidden_sizes = [int(h) for h in hidden_sizes]
        sizes = [int(in_features), *hidden_sizes, int(out_features)]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"MLP: every layer size must be positive, got {sizes}")
        constants.activation_code(activation, "MLP")
        if init not in INITS:
            raise ValueError(
                f"MLP: init must be one of {', '.join(map(repr, INITS))}, got {init!r}"
            )
        kw = {"device": device, "dtype": dtype}
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            lin = nn.Linear(fan_in, fan_out, **kw)
            init_linear_(lin, init, activation, negative_slope)
            block: list[nn.Module] = [lin]
            if batch_norm:
                block.append(nn.BatchNorm1d(fan_out, **kw))
            act = _activation_module(activation, negative_slope)
            if act is not None:
                block.append(act)
            blocks.append(nn.Sequential(*block))
        head = nn.Linear(sizes[-2], sizes[-1], **kw)
        init_linear_(head, init, "none")
        super().__init__(*blocks, head)
        self.in_features = sizes[0]
        self.hidden_sizes = hidden_sizes
        self.out_features = sizes[-1]
        self.activation = activation
        self.batch_norm = batch_norm
        self.init = init
        self.fused = fused
        self.negative_slope = negative_slope

    def config(self) -> dict:
        """The constructor arguments (without ``fused``, device, dtype): ``MLP(**m.config())``
        rebuilds the same architecture."""
        return {
            "in_features": self.in_features,
            "hidden_sizes": list(self.hidden_sizes),
            "out_features": self.out_features,
            "activation": self.activation,
            "batch_norm": self.batch_norm,
            "init": self.init,
            "negative_slope": self.negative_slope,
        }

    def twin(self, fused: bool | None = None) -> MLP:
        """A copy of this model (same architecture, parameters and buffers, on the same device
        and dtype), run as one op (``fused=True``) or module by module (``False``); by default
        the other kind."""
        fused = (not self.fused) if fused is None else fused
        p = next(self.parameters())
        other = MLP(**self.config(), fused=fused, device=p.device, dtype=p.dtype)
        other.load_state_dict(self.state_dict())
        other.train(self.training)
        return other

    def forward(self, input: Tensor) -> Tensor:
        """``(N, in_features)`` -> ``(N, out_features)`` logits: the whole network as one op
        (``fused``) or module by module."""
        if self.fused:
            return super().forward(input)
        return nn.Sequential.forward(self, input)

    def extra_repr(self) -> str:
        return "fused=True" if self.fused else "fused=False"


def plain_mlp(*args, **kwargs) -> MLP:
    """``MLP(..., fused=False)``: the same model built from PyTorch's own modules."""
    kwargs["fused"] = False
    return MLP(*args, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
