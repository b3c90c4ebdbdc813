"""The numbers the Python side and the C++/CUDA side (``csrc/constants.h``) must agree on, written
once per language: ``tests/test_registry.py`` checks these against the values the compiled
extension reports (``hpml_ops._C.CONSTANTS``, built from the C++ header).

- activation codes of ``hpml::linear_act`` (and ``hpml::batch_norm``, which takes none and relu);
- reduction codes of ``hpml::bce_with_logits`` (``at::Reduction``);
- the accumulation dtype of each storage dtype (statistics, partial sums, matrix products);
- the layout of linear_act's ReLU mask: bit ``j % 8`` of byte ``[m, j // 8]``, rows padded to
  whole bytes.
"""

from __future__ import annotations

import torch

ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}
# The backward of these reads the 1-bit mask; of these, the forward's output.
ACT_USES_MASK: frozenset[int] = frozenset({ACTIVATIONS["relu"], ACTIVATIONS["leaky_relu"]})
ACT_USES_OUTPUT: frozenset[int] = frozenset({ACTIVATIONS["sigmoid"], ACTIVATIONS["tanh"]})
# batch_norm's activation argument: None or "none" (0), "relu" (1): the same codes.
BN_ACTIVATIONS: dict[str | None, int] = {None: 0, "none": 0, "relu": ACTIVATIONS["relu"]}

REDUCTIONS: dict[str, int] = {"none": 0, "mean": 1, "sum": 2}

MASK_BITS_PER_BYTE = 8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_row_bytes(n: int) -> int:
    """Bytes per row of a 1-bit mask over ``n`` columns."""
    return (n + MASK_BITS_PER_BYTE - 1) // MASK_BITS_PER_BYTE


def activation_code(activation, owner: str, choices: dict = ACTIVATIONS) -> int:
    """The code of ``activation`` (a name in ``choices``); ValueError naming ``owner`` and the
    choices otherwise."""
    try:
        code = choices.get(activation)
    except TypeError:  # unhashable
        code = None
    if code is None:
        names = ", ".join(map(repr, dict.fromkeys(choices)))
        raise ValueError(f"{owner}: activation must be one of {names}, got {activation!r}")
    return code
