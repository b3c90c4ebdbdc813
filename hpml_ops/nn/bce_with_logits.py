"""``BCEWithLogitsLoss`` running on hpml_ops' kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.bce_with_logits import _bce_with_logits
from ._common import check_backend


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss``: same constructor, same ``weight`` and
    ``pos_weight`` buffers, same ``state_dict``; the forward runs
    ``hpml_ops.binary_cross_entropy_with_logits``.

    Shapes: input ``(*)`` logits, target ``(*)``; output ``(*)`` for ``reduction="none"``, else 0-d.

    ``backend`` (keyword only): None (default) runs on the process-wide choice
    (``hpml_ops.use_backend``); a name runs this loss on that backend. An attribute, not part of
    the ``state_dict``.
    """

    backend: str | None = None

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, "BCEWithLogitsLoss")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _bce_with_logits(
            input, target, self.weight, self.reduction, self.pos_weight, self.backend
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend}" if self.backend is not None else ""
