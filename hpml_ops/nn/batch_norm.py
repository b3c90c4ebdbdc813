"""``BatchNorm1d`` / ``2d`` / ``3d`` on hpml_ops' kernels, optionally with a fused ReLU."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from ..constants import BN_ACTIVATIONS, activation_code
from ..ops.batch_norm import _batch_norm
from ._absorbed import defer_activation
from ._common import check_backend


class _FusedBatchNormMixin:
    """torch's ``_BatchNorm.forward``, with the normalisation through ``hpml_ops.batch_norm``.

    ``backend``: None runs on the process-wide choice (``hpml_ops.use_backend``); a name runs
    this module on that backend. An attribute, not part of the ``state_dict``."""

    backend: str | None = None

    def _init_activation(self, activation, backend=None):
        activation_code(activation, type(self).__name__, BN_ACTIVATIONS)  # ValueError if not
        self.activation = activation
        self.backend = check_backend(backend, type(self).__name__)

    def forward(self, input: Tensor) -> Tensor:
        traced = isinstance(input, torch.fx.Proxy)
        if not traced:  # (under torch.fx the rank is not known)
            self._check_input_dim(input)
        # Exactly torch's bookkeeping: the average factor, num_batches_tracked, which statistics.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if traced:
                _count_traced(self, input)
            else:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        # The ReLU's slot after convert's fusion (hpml_ops/nn/_absorbed.py): told what this call
        # applied; with a forward hook the hook sees the normalised output, the slot the ReLU.
        slot = self.__dict__.get("_hpml_absorbed")
        activation = None if slot is not None and defer_activation(self) else self.activation
        out = _batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            activation,
            self.backend,
        )
        if slot is not None and activation is not None:
            slot.__dict__["_fused_out"] = out
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", activation={self.activation}" if self.activation else ""
        return s + (f", backend={self.backend}" if self.backend is not None else "")


def _count_traced(module, input: torch.fx.Proxy) -> None:
    """Under torch.fx (which leaves torch's own batch norms as leaf modules, run at every call,
    but traces ours): record ``num_batches_tracked += 1`` in the graph instead of doing it once
    at trace time. ``momentum=None`` averages by that count, a value the trace cannot hold."""
    if module.momentum is None:
        raise RuntimeError(
            f"{type(module).__name__} with momentum=None (a cumulative average) in training cannot "
            "be traced by torch.fx: the factor 1 / num_batches_tracked changes every call"
        )
    path = input.tracer.path_of_module(module)
    name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
    input.tracer.create_proxy("get_attr", name, (), {}).add_(1)


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``): same constructor
    (plus ``activation=None`` or ``"relu"``, fused into the same kernel), same buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``) and ``state_dict``;
    ``backend=None`` or a backend name for this module alone."""

    def __init__(
        self, *args, activation: str | None = None, backend: str | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_activation(activation, backend)


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d`` (input ``(N, C, H, W)``, contiguous or channels last):
    same constructor (plus ``activation=None`` or ``"relu"``, and ``backend=None`` or a backend
    name for this module alone), same buffers and ``state_dict``."""

    def __init__(
        self, *args, activation: str | None = None, backend: str | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_activation(activation, backend)


class BatchNorm3d(_FusedBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d`` (input ``(N, C, D, H, W)``, contiguous or channels
    last): same constructor (plus ``activation=None`` or ``"relu"``, and ``backend=None`` or a
    backend name for this module alone), same buffers and ``state_dict``."""

    def __init__(
        self, *args, activation: str | None = None, backend: str | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_activation(activation, backend)
