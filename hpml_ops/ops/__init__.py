"""The public functions, each backed by torch.library custom ops (one module per op)."""

from .batch_norm import batch_norm
from .bce_with_logits import binary_cross_entropy_with_logits
from .linear_act import linear_act, linear_relu
from .mlp import mlp
from .mlp_bce_with_logits import mlp_bce_with_logits

__all__ = [
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "linear_act",
    "linear_relu",
    "mlp",
    "mlp_bce_with_logits",
]
