"""``BatchNorm1d`` / ``BatchNorm2d`` running on hpml_ops' kernels, optionally with a fused ReLU."""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import BN_ACTIVATIONS, activation_code
from ..ops.batch_norm import _batch_norm
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
        self._check_input_dim(input)
        # Exactly torch's bookkeeping: the average factor, num_batches_tracked, which statistics.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            self.activation,
            self.backend,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", activation={self.activation}" if self.activation else ""
        return s + (f", backend={self.backend}" if self.backend is not None else "")


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
