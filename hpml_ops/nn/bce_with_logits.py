"""``BCEWithLogitsLoss`` running on hpml_ops' kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.bce_with_logits import binary_cross_entropy_with_logits


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss``: same constructor, same ``weight`` and
    ``pos_weight`` buffers, same ``state_dict``; the forward runs
    ``hpml_ops.binary_cross_entropy_with_logits``.

    Shapes: input ``(*)`` logits, target ``(*)``; output ``(*)`` for ``reduction="none"``, else 0-d.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )
