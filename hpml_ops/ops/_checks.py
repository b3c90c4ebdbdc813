"""The checks every argument contract is made of (``hpml_ops/ops/<stem>.py``), each raising what
its C++ twin in ``csrc/common.h`` raises, in the same words: a public function calls the C++ op
straight away and lets its error through, so the two languages must agree. Used as
``from . import _checks as check``: ``check.floating(op, t, "weight")``."""

from __future__ import annotations

import torch
from torch import Tensor


def shape(t: Tensor) -> str:
    """A shape as Python prints a tuple, "(4, 6)" (``py_shape``)."""
    return str(tuple(t.shape))


def tensor(op: str, name: str, t, *, optional: bool = False) -> None:
    if isinstance(t, Tensor) or (optional and t is None):
        return
    what = "a Tensor or None" if optional else "a Tensor"
    raise TypeError(f"{op}: {name} must be {what}, got {type(t).__name__}")


def floating(op: str, t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating-point {name}, got {t.dtype}")


def same_device(op: str, ref: Tensor, t: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: expected {name} on {ref.device} (the input's device), got {t.device}"
        )


def same_dtype(op: str, ref: Tensor, t: Tensor, name: str) -> None:
    if t.dtype != ref.dtype:
        raise RuntimeError(
            f"{op}: expected {name} of dtype {ref.dtype} (the input's dtype), got {t.dtype}"
        )


def per_channel(op: str, t, n: int, ref: Tensor, name: str) -> None:
    """A per-channel vector ``(n,)``, floating point, on ``ref``'s device; None passes
    (``check_per_channel``)."""
    tensor(op, name, t, optional=True)
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise RuntimeError(
            f"{op}: {name} should contain {n} elements (one per channel), got shape {shape(t)}"
        )
    floating(op, t, name)
    same_device(op, ref, t, name)


def bn_eps(eps: float, training: bool) -> None:
    """torch's batch-norm eps rule (``check_bn_eps``): positive in training, non-negative in
    evaluation; ValueError in torch's words."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def broadcastable_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def like(op: str, ref: Tensor, t: Tensor, name: str, other: Tensor, other_name: str) -> None:
    """``t`` of ``other``'s shape, on ``ref``'s device in ``ref``'s dtype (``check_like``)."""
    if t.shape != other.shape:
        raise RuntimeError(
            f"{op}: {name} of shape {shape(t)} does not match {other_name} {shape(other)}"
        )
    same_dtype(op, ref, t, name)
    same_device(op, ref, t, name)


def loss_grad(op: str, grad: Tensor, elementwise: bool, like: Tensor, like_name: str) -> None:
    """A loss's gradient: ``like``'s shape for reduction none, else one element
    (``check_bce_grad``, ``check_mlp_bce_backward``)."""
    if elementwise:
        if grad.shape != like.shape:
            raise RuntimeError(
                f"{op}: grad of shape {shape(grad)} does not match {like_name} {shape(like)}"
            )
    elif grad.numel() != 1:
        raise RuntimeError(
            f"{op}: expected a one-element grad for a reduced loss, got shape {shape(grad)}"
        )


def running_stats_untracked(op: str, named) -> None:
    """torch's batch norm refuses running statistics that require grad (it is not
    differentiable with respect to them); the same error for ours (``csrc/autograd.cpp``:
    check_running_stat, same words). ``named``: (argument name, tensor or None) pairs."""
    for name, t in named:
        if isinstance(t, Tensor) and t.requires_grad:
            raise RuntimeError(
                f"The function '{op}' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
