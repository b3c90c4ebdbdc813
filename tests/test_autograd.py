"""The autograd layer of the three ops, as a user of torch.autograd meets it: the C++ ops carry
their formula in C++ (csrc/autograd.cpp; the Triton ops in Python), and both must behave as torch's
own ops do: in-place changes to a saved tensor are caught, a graph is freed after one backward
unless retained, a retained graph gives the same gradients twice, ``torch.autograd.grad`` returns
only what is asked for, and the ops record no graph under ``no_grad``. Gradient values themselves
are checked against float64 torch in the per-op test files."""

from __future__ import annotations

import importlib

import pytest
import torch

import hpml_ops
from tests.helpers import DEVICE, backend_params

pytestmark = pytest.mark.usefixtures("poisoned")


def _cases():
    """name -> (build inputs, run the public function): each returns a scalar to differentiate
    and the leaf tensors whose gradients it has; the first leaf is the op's input (saved for the
    backward)."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    def linear():
        x, w, b = rand(13, 11), rand(7, 11), rand(7)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return leaves, lambda: hpml_ops.linear_act(x, w, b, "relu").sum()

    def linear_sigmoid():
        x, w, b = rand(13, 11), rand(7, 11), rand(7)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return leaves, lambda: hpml_ops.linear_act(x, w, b, "sigmoid").square().sum()

    def bce():
        x, y = rand(9, 5), torch.rand(9, 5, generator=g).to(DEVICE)
        leaves = [x.requires_grad_(), y.requires_grad_()]
        return leaves, lambda: hpml_ops.binary_cross_entropy_with_logits(x, y)

    def batch_norm():
        x, w, b = rand(17, 6, 3), rand(6), rand(6)
        rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return (
            leaves,
            lambda: (
                hpml_ops.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
                .square()
                .sum()
            ),
        )

    return {
        "linear_act": (linear, "linear_act"),
        "linear_act_sigmoid": (linear_sigmoid, "linear_act"),
        "bce_with_logits": (bce, "bce_with_logits"),
        "batch_norm": (batch_norm, "batch_norm"),
    }


CASES = _cases()
BACKENDS = backend_params(include_reference=False)


@pytest.mark.skipif(not hpml_ops._backend.HAS_EXTENSION, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", ["linear_act", "bce_with_logits", "batch_norm"])
def test_cpp_ops_carry_their_formula_in_cpp(op):
    """No Python autograd layer in front of the C++ ops (it cost ~40-60 us a call)."""
    dump = torch._C._dispatch_dump(f"hpml::{op}")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd[alias]:")]
    assert len(autograd) == 1 and "csrc/autograd.cpp" in autograd[0], dump
    # The public function calls the op itself (no Python autograd.Function around it).
    assert (
        importlib.import_module(f"hpml_ops.ops.{op}").OP.cpp is getattr(torch.ops.hpml, op).default
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_change_of_a_saved_input_is_caught(backend, case):
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        leaves, run = build()
        loss = run()
        with torch.no_grad():
            leaves[0].add_(1.0)  # the input, saved for the backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_freed_unless_retained(backend, case):
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        leaves, run = build()
        loss = run()
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second, strict=True):
            assert a is not None and torch.equal(a, b)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_a_subset(backend, case):
    """``autograd.grad`` for one leaf gives the same value as the full backward; the other
    leaves' ``.grad`` stay untouched."""
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        leaves, run = build()
        full = torch.autograd.grad(run(), leaves)
        for i, leaf in enumerate(leaves):
            (only,) = torch.autograd.grad(run(), [leaf])
            torch.testing.assert_close(only, full[i], rtol=0, atol=0)
        assert all(leaf.grad is None for leaf in leaves)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_under_no_grad(backend, case):
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        _, run = build()
        with torch.no_grad():
            out = run()
        assert out.grad_fn is None and not out.requires_grad
        with torch.inference_mode():
            out = run()
        assert out.grad_fn is None and out.is_inference()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_first_order_then_no_second(backend, case):
    """Under ``create_graph=True`` the gradients are the usual ones (and carry a graph), and
    differentiating them again raises naming the op, as a Python ``@once_differentiable``
    Function does: the backward ops have no formula of their own."""
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        leaves, run = build()
        plain = torch.autograd.grad(run(), leaves)
        graphed = torch.autograd.grad(run(), leaves, create_graph=True)
        for p, g in zip(plain, graphed, strict=True):
            torch.testing.assert_close(g.detach(), p, rtol=0, atol=0)
        assert any(g.requires_grad for g in graphed)
        second = sum(g.square().sum() for g in graphed)
        with pytest.raises(RuntimeError, match="cannot be differentiated|no autograd formula"):
            torch.autograd.grad(second, leaves, allow_unused=True)
