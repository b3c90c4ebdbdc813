"""The autograd layer of the three ops, as a user of torch.autograd meets it: the C++ ops carry
their formula in C++ (csrc/autograd.cpp; the Triton ops in Python), and both must behave as torch's
own ops do: in-place changes to a saved tensor are caught, a graph is freed after one backward
unless retained, a retained graph gives the same gradients twice, ``torch.autograd.grad`` returns
only what is asked for, and the ops record no graph under ``no_grad``. Gradient values themselves
are checked against float64 torch in the per-op test files."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import hpml_ops
from tests.helpers import DEVICE, assert_close_to_oracle, backend_params

pytestmark = pytest.mark.usefixtures("poisoned")


def _cases():
    """name -> (build inputs, run the public function): each returns a scalar to differentiate
    and the leaf tensors whose gradients it has; the first leaf is the op's input (saved for the
    backward)."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    def linear(dtype=torch.float32):
        x, w, b = rand(13, 11, dtype=dtype), rand(7, 11, dtype=dtype), rand(7, dtype=dtype)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return leaves, lambda: hpml_ops.linear_act(x, w, b, "relu").sum()

    def linear_sigmoid(dtype=torch.float32):
        x, w, b = rand(13, 11, dtype=dtype), rand(7, 11, dtype=dtype), rand(7, dtype=dtype)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return leaves, lambda: hpml_ops.linear_act(x, w, b, "sigmoid").square().sum()

    def bce(dtype=torch.float32):
        x, y = rand(9, 5, dtype=dtype), torch.rand(9, 5, generator=g).to(DEVICE, dtype)
        leaves = [x.requires_grad_(), y.requires_grad_()]
        return leaves, lambda: hpml_ops.binary_cross_entropy_with_logits(x, y)

    def batch_norm(dtype=torch.float32):
        x, w, b = rand(17, 6, 3, dtype=dtype), rand(6, dtype=dtype), rand(6, dtype=dtype)
        rm, rv = (
            torch.zeros(6, device=DEVICE, dtype=dtype),
            torch.ones(6, device=DEVICE, dtype=dtype),
        )
        leaves = [t.requires_grad_() for t in (x, w, b)]
        return (
            leaves,
            lambda: (
                hpml_ops.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
                .square()
                .sum()
            ),
        )

    def mlp(dtype=torch.float32):
        x, w1, b1, w2 = (
            rand(13, 11, dtype=dtype),
            rand(7, 11, dtype=dtype),
            rand(7, dtype=dtype),
            rand(3, 7, dtype=dtype),
        )
        gamma, beta = rand(7, dtype=dtype), rand(7, dtype=dtype)
        rm, rv = (
            torch.zeros(7, device=DEVICE, dtype=dtype),
            torch.ones(7, device=DEVICE, dtype=dtype),
        )
        leaves = [t.requires_grad_() for t in (x, w1, b1, w2, gamma, beta)]
        return (
            leaves,
            lambda: hpml_ops.mlp(
                x, [w1, w2], [b1, None], "tanh", batch_norm=True, bn_weights=[gamma],
                bn_biases=[beta], running_means=[rm], running_vars=[rv], training=True,
            ).square().sum(),
        )  # fmt: skip

    return {
        "mlp": (mlp, "mlp"),
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
def test_create_graph_then_second_order(backend, case):
    """Under ``create_graph=True`` the gradients are the usual ones (and carry a graph), and
    differentiating them again (a gradient penalty, a Hessian) gives what torch's own ops give:
    the backward then computes its gradients with differentiable torch ops."""
    build, _ = CASES[case]
    with hpml_ops.use_backend(backend):
        leaves, run = build()
        plain = torch.autograd.grad(run(), leaves)
        graphed = torch.autograd.grad(run(), leaves, create_graph=True)
        for p, g in zip(plain, graphed, strict=True):
            torch.testing.assert_close(g.detach(), p)
        assert any(g.requires_grad for g in graphed)
        second = sum(g.square().sum() for g in graphed)
        got = torch.autograd.grad(second, leaves, allow_unused=True)
    # torch's second-order gradients from the same values in float64 (the oracle) and in the
    # leaves' dtype (torch's own error there widens the fp32 tolerance, as everywhere).
    want = {}
    for dtype in (torch.float64, leaves[0].dtype):
        with hpml_ops.use_backend("reference"):
            leaves_ref, run_ref = build(dtype)
            with torch.no_grad():
                for a, b in zip(leaves_ref, leaves, strict=True):
                    a.copy_(b)
            graphed = torch.autograd.grad(run_ref(), leaves_ref, create_graph=True)
            second = sum(g.square().sum() for g in graphed)
            want[dtype] = torch.autograd.grad(second, leaves_ref, allow_unused=True)
    for i, (a, b64, b32) in enumerate(
        zip(got, want[torch.float64], want[leaves[0].dtype], strict=True)
    ):
        # torch's ReLU mask is connected to the graph (its derivative, zero, materialised);
        # ours is a saved bit mask: a leaf reached only through it has no second-order gradient.
        a = torch.zeros_like(leaves[i]) if a is None else a
        b64 = torch.zeros_like(b64) if b64 is None else b64
        b32 = torch.zeros_like(b32) if b32 is None else b32
        assert_close_to_oracle(a, b64, b32, what=f"second-order gradient {i}")


def _double_cases():
    """name -> (function, fp64 inputs) for gradgradcheck."""
    g = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    x, w, b = rand(5, 4), rand(3, 4), rand(3)
    cases = {
        f"linear_act {act}": (
            lambda x, w, b, act=act: hpml_ops.linear_act(x, w, b, act, 0.2),
            (x, w, b),
        )
        for act in ("relu", "leaky_relu", "sigmoid", "tanh", "none")
    }
    y = torch.rand(5, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    wt = torch.rand(3, generator=g, dtype=torch.float64).to(DEVICE)
    pw = torch.rand(3, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    for red in ("mean", "sum", "none"):
        cases[f"bce {red}"] = (
            lambda x, y, red=red: hpml_ops.binary_cross_entropy_with_logits(
                x, y, wt, red, pos_weight=pw
            ),
            (rand(5, 3), y),
        )
    xb, gamma, beta = rand(6, 3, 2), rand(3), rand(3)
    rm = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    rv = torch.rand(3, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    for training in (True, False):
        for act in (None, "relu"):
            cases[f"batch_norm training={training} {act}"] = (
                lambda x, w, b, t=training, a=act: hpml_ops.batch_norm(
                    x, rm.clone(), rv.clone(), w, b, t, 0.1, 1e-5, a
                ),
                (xb, gamma, beta),
            )
    # The whole network (hpml_ops.mlp): batch norm in training and in eval, every activation.
    w1, b1, w2, b2, gamma, beta = rand(4, 4), rand(4), rand(2, 4), rand(2), rand(4), rand(4)
    rm4 = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE)
    rv4 = torch.rand(4, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    for act, out_act, bn in (("tanh", "none", None), ("leaky_relu", "sigmoid", True),
                             ("relu", "none", False), ("sigmoid", "tanh", True)):  # fmt: skip
        cases[f"mlp {act} {out_act} batch_norm training={bn}"] = (
            lambda x, w1, b1, w2, b2, gamma, beta, a=act, o=out_act, t=bn: hpml_ops.mlp(
                x, [w1, w2], [b1, b2], a, negative_slope=0.2, output_activation=o,
                batch_norm=t is not None, bn_weights=[gamma if t is not None else None],
                bn_biases=[beta if t is not None else None],
                running_means=[rm4.clone() if t is not None else None],
                running_vars=[rv4.clone() if t is not None else None], training=bool(t),
            ),
            (x, w1, b1, w2, b2, gamma, beta),
        )  # fmt: skip
    return cases


DOUBLE = _double_cases()


@pytest.mark.parametrize("case", list(DOUBLE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend, case):
    """Second derivatives in float64 against finite differences (torch.autograd.gradgradcheck)."""
    fn, inputs = DOUBLE[case]
    with hpml_ops.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("fuse_mlp", [False, True], ids=["pairs", "fused-mlp"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wgan_gp_penalty_through_a_converted_model(backend, fuse_mlp):
    """A WGAN-GP critic step (gradient penalty: the input gradient's norm, differentiated again)
    through a converted model, with fused pairs or as one whole-network op (FusedMLP), gives
    torch's parameter gradients."""
    from torch import nn

    torch.manual_seed(12)
    second = nn.Tanh() if fuse_mlp else nn.LeakyReLU(0.2)  # (one op: one hidden activation)
    critic = nn.Sequential(nn.Linear(4, 8), second, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(
        DEVICE, torch.float64
    )
    ours = hpml_ops.convert(copy.deepcopy(critic), backend=backend, fuse_mlp=fuse_mlp)
    if fuse_mlp:
        assert type(ours) is hpml_ops.nn.FusedMLP
    else:
        assert type(ours[0]) is hpml_ops.nn.FusedLinear and ours[0].activation == "leaky_relu"
    x = torch.randn(6, 4, device=DEVICE, dtype=torch.float64)
    for model in (critic, ours):
        xi = x.clone().requires_grad_()
        out = model(xi)
        (gx,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        loss = out.mean() + 10 * ((gx.norm(dim=1) - 1) ** 2).mean()
        loss.backward()
    for (name, p), q in zip(critic.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_of_a_fused_mlp(backend):
    """torch.autograd.functional.hessian of a loss through a FusedMLP with batch norm (training
    and eval) with respect to the input: torch's, in float64."""
    from torch import nn

    torch.manual_seed(13)
    net = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2), nn.Sigmoid()
    ).to(DEVICE, torch.float64)
    ours = hpml_ops.convert(copy.deepcopy(net), backend=backend)
    assert type(ours) is hpml_ops.nn.FusedMLP
    x = torch.randn(4, 3, device=DEVICE, dtype=torch.float64)
    for training in (True, False):
        net.train(training), ours.train(training)
        want = torch.autograd.functional.hessian(lambda t: net(t).square().sum(), x)
        got = torch.autograd.functional.hessian(lambda t: ours(t).square().sum(), x)
        torch.testing.assert_close(got, want, msg=f"training={training}")
