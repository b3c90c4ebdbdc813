"""Input normalisation fitted on the training split only and applied unchanged to every other
split (the lecture's rule: the parameters come from the training data).

- ``standard``: ``x_j <- (x_j - mean_j) / std_j`` (population std, as scikit-learn's
  ``StandardScaler``);
- ``minmax``: ``x_j <- (x_j - min_j) / (max_j - min_j)``, the training data mapped to [0, 1];
- ``none``: unchanged.

A constant feature (std or range 0) is only shifted. Statistics are computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZATIONS = ("standard", "minmax", "none")

__all__ = ["NORMALIZATIONS", "Normalizer"]


class Normalizer:
    """Per-feature affine normalisation ``(x - shift) / scale``.

    ``fit(x_train)`` computes ``shift`` and ``scale`` from ``(N, F)`` training data;
    ``transform(x)`` applies them to any ``(*, F)`` tensor (result in ``x``'s dtype and device);
    ``state_dict()`` / ``load_state_dict()`` save them with a checkpoint.
    """

    def __init__(self, kind: str = "standard") -> None:
        if kind not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}"
            )
        self.kind = kind
        self.shift: Tensor | None = None
        self.scale: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.kind == "none" or self.shift is not None

    def fit(self, x: Tensor) -> Normalizer:
        """Fit on the training inputs ``x`` of shape ``(N, F)``, ``N >= 1``; returns ``self``."""
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"Normalizer.fit: expected (N, F) with N >= 1, got {tuple(x.shape)}")
        if self.kind == "none":
            return self
        x64 = x.detach().to(torch.float64)
        if self.kind == "standard":
            shift = x64.mean(dim=0)
            scale = x64.std(dim=0, correction=0)
        else:
            shift = x64.amin(dim=0)
            scale = x64.amax(dim=0) - shift
        self.shift = shift.cpu()
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale)).cpu()
        return self

    def transform(self, x: Tensor) -> Tensor:
        """``(x - shift) / scale`` computed in float64, returned in ``x``'s dtype."""
        if self.kind == "none":
            return x
        if self.shift is None:
            raise RuntimeError("Normalizer.transform before fit")
        if x.shape[-1] != self.shift.numel():
            raise ValueError(
                f"Normalizer.transform: {x.shape[-1]} features, fitted on {self.shift.numel()}"
            )
        shift = self.shift.to(x.device)
        scale = self.scale.to(x.device)
        return ((x.to(torch.float64) - shift) / scale).to(x.dtype)

    def fit_transform(self, x: Tensor) -> Tensor:
        return self.fit(x).transform(x)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {state['kind']!r} in state")
        self.kind = state["kind"]
        self.shift = state["shift"]
        self.scale = state["scale"]

    @classmethod
    def from_state_dict(cls, state: dict) -> Normalizer:
        n = cls(state["kind"])
        n.load_state_dict(state)
        return n

    def __repr__(self) -> str:
        return f"Normalizer(kind={self.kind!r}, fitted={self.fitted})"
