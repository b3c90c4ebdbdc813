"""hpml_ops: hand-written Triton and C++/CUDA kernels for the core ops of MLP training, as
autograd-aware ``torch.library`` custom ops (namespace ``hpml``) and ``nn.Module`` drop-ins.

The package imports without the compiled extension and without triton; a missing backend is
reported by ``backend_status()`` with the reason, and the others still work.
"""

from . import models, nn, reference
from ._backend import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    cpu_capability,
    get_backend,
    use_backend,
)
from .convert import convert
from .ops import (
    batch_norm,
    binary_cross_entropy_with_logits,
    linear_act,
    linear_relu,
    mlp,
    mlp_bce_with_logits,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # hpml_ops.train (the training loop and CLI) loads on first use: `import hpml_ops` stays light.
    if name == "train":
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "convert",
    "cpu_capability",
    "get_backend",
    "linear_act",
    "linear_relu",
    "mlp",
    "mlp_bce_with_logits",
    "models",
    "nn",
    "reference",
    "train",
    "use_backend",
]
