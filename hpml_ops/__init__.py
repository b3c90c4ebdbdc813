"""hpml_ops: hand-written Triton and C++/CUDA kernels for the core ops of MLP training, as
autograd-aware ``torch.library`` custom ops (namespace ``hpml``) and ``nn.Module`` drop-ins.

The package imports without the compiled extension and without triton; a missing backend is
reported by ``backend_status()`` with the reason, and the others still work.
"""

from . import nn, reference
from ._backend import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    use_backend,
)
from .ops import batch_norm, binary_cross_entropy_with_logits, linear_act, linear_relu

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "get_backend",
    "linear_act",
    "linear_relu",
    "nn",
    "reference",
    "use_backend",
]
