"""``FusedLinear``: ``nn.Linear`` followed by an activation, in one fused op."""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import activation_code
from ..ops.linear_act import _linear_act
from ._absorbed import defer_activation
from ._common import check_backend


class FusedLinear(torch.nn.Linear):
    """Drop-in for ``torch.nn.Linear`` (+ an activation): same constructor arguments first, same
    parameters, same initialisation, same ``state_dict`` (a checkpoint of a plain ``nn.Linear``
    loads into it, and back); the forward runs ``hpml_ops.linear_act``.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``.

    ``backend``: None (default) runs on the process-wide choice (``hpml_ops.use_backend``,
    ``HPML_BACKEND``); a name ("auto", "cpp", "triton", "reference") runs this module's forward
    (and so its backward) on that backend. It is an attribute, not part of the ``state_dict``.
    """

    backend: str | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        activation_code(activation, "FusedLinear")  # a ValueError naming the choices
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope
        self.backend = check_backend(backend, "FusedLinear")

    def forward(self, input: Tensor) -> Tensor:
        slot = self.__dict__.get("_hpml_absorbed")  # the activation's slot after convert's fusion
        if slot is None:
            return _linear_act(
                input, self.weight, self.bias, self.activation, self.negative_slope, self.backend
            )
        if defer_activation(
            self
        ):  # a hook sees the product (or torch.compile traces); the slot applies the activation
            return _linear_act(input, self.weight, self.bias, "none", 0.01, self.backend)
        out = _linear_act(
            input, self.weight, self.bias, self.activation, self.negative_slope, self.backend
        )
        slot.__dict__["_fused_out"] = out  # (hpml_ops/nn/_absorbed.py)
        return out

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.backend is not None:
            s += f", backend={self.backend}"
        return s
