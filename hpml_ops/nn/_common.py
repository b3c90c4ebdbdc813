"""What the fused modules share: the optional per-module ``backend`` attribute."""

from __future__ import annotations

from .._backend import CHOICES


def check_backend(backend: str | None, owner: str) -> str | None:
    """``backend`` if it is None (the process-wide choice, ``hpml_ops.use_backend``) or one of
    "auto", "triton", "cpp", "reference"; otherwise a ValueError naming ``owner``'s argument.
    Whether the backend can run here is checked when the module runs (``use_backend`` raises
    ``BackendUnavailableError``)."""
    if backend is not None and backend not in CHOICES:
        raise ValueError(
            f"{owner}: backend must be None or one of {', '.join(map(repr, CHOICES))}, got "
            f"{backend!r}"
        )
    return backend
