"""``nn.Module`` drop-ins: each subclasses torch's module and keeps its parameters, buffers and
``state_dict``."""

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .bce_with_logits import BCEWithLogitsLoss
from .linear_act import FusedLinear
from .mlp import FusedMLP, FusedRuns
from .sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BCEWithLogitsLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedLinear",
    "FusedMLP",
    "FusedRuns",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
]
