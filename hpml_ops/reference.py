"""The pure-PyTorch oracle for every op: torch's own implementation.

With ``upcast=True`` every floating-point tensor is first converted to float64 and the result stays
in float64: that is what the parity tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _up(t: Tensor | None, upcast: bool) -> Tensor | None:
    if t is None or not upcast or not t.is_floating_point():
        return t
    return t.to(torch.float64)


def bce_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    upcast: bool = False,
) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits``, optionally in float64."""
    return F.binary_cross_entropy_with_logits(
        _up(input, upcast),
        _up(target, upcast),
        _up(weight, upcast),
        reduction=reduction,
        pos_weight=_up(pos_weight, upcast),
    )
