"""Unusual and bad input gets torch's behaviour on every backend (issue 15's list): non-finite
values through ReLU's backward and batch norm's statistics, and torch's errors for arguments it
rejects (with torch's exception type and words)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpml_ops

from .helpers import DEVICE, assert_close_to_oracle, backend_params, up

BACKENDS = backend_params()


def _grads(fn, tensors, seed=0):
    """fn(*tensors)'s output and the gradients of <output, gout> for every tensor (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, gout)


def _check(ours, theirs, tensors, what):
    o, og = _grads(ours, tensors)
    r, rg = _grads(theirs, [up(t) for t in tensors])
    assert_close_to_oracle(o, r, what=f"{what}: output")
    for i, (a, b) in enumerate(zip(og, rg, strict=True)):
        assert_close_to_oracle(a, b, what=f"{what}: gradient {i}")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pre_activation_gradient(backend, activation):
    """torch's ReLU backward passes the gradient where the pre-activation is NaN
    (threshold_backward: zero only where x <= 0); leaky ReLU's takes the slope branch (x > 0 is
    false). A NaN bias makes one column NaN while every gradient stays finite, so a masked
    gradient shows."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, device=DEVICE)
    w = torch.randn(6, 5, device=DEVICE)
    b = torch.randn(6, device=DEVICE)
    b[2] = float("nan")

    def ours(x, w, b):
        with hpml_ops.use_backend(backend):
            return hpml_ops.linear_act(x, w, b, activation)

    def theirs(x, w, b):
        z = F.linear(x, w, b)
        return F.relu(z) if activation == "relu" else F.leaky_relu(z)

    _check(ours, theirs, [x, w, b], f"linear_act {activation}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_through_batch_norm_relu(backend):
    """Batch norm with the fused ReLU, in evaluation (finite statistics): a NaN input element
    gives a NaN output there, through which torch's ReLU passes the gradient."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, device=DEVICE)
    x[1, 2, 0] = float("nan")
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)

    def ours(x, w, b):
        with hpml_ops.use_backend(backend):
            return hpml_ops.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, "relu")

    def theirs(x, w, b):
        return F.relu(F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False, 0.1, 1e-5))

    _check(ours, theirs, [x, w, b], "batch_norm relu")


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn-eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_through_fused_mlp_relu(backend, bn):
    """The whole-network op: a NaN hidden unit (from its bias) passes the gradient back through
    the ReLU as torch's does, so the first layer's weight gradient of that unit is finite and
    equal to torch's."""
    torch.manual_seed(2)
    layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.ReLU(), nn.Linear(6, 3)]
    seq = nn.Sequential(*layers).to(DEVICE)
    with torch.no_grad():
        if bn:
            seq[1].running_mean.normal_()
            seq[1].running_var.uniform_(0.5, 1.5)
        else:
            seq[0].bias[4] = float("nan")
    seq.eval()
    fused = hpml_ops.nn.FusedMLP(*copy.deepcopy(seq), backend=backend)
    ref = copy.deepcopy(seq).double()
    x = torch.randn(8, 5, device=DEVICE)
    if bn:
        x[3, 1] = float("nan")  # row 3 NaN in every unit of the first layer, then through BN
    o, og = _grads(lambda x: fused(x), [x])
    r, rg = _grads(lambda x: ref(x), [up(x)])
    assert_close_to_oracle(o, r, what="output")
    assert_close_to_oracle(og[0], rg[0], what="grad input")
    gout = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for model, cast in ((fused, lambda t: t), (ref, up)):
        model.zero_grad()
        model(cast(x)).backward(gout.to(DEVICE, cast(x).dtype))
    for (name, p), q in zip(ref.named_parameters(), fused.parameters(), strict=True):
        assert_close_to_oracle(q.grad, p.grad, what=f"grad {name}")


def _bn_inf_case():
    torch.manual_seed(3)
    x = torch.randn(9, 3, device=DEVICE)
    x[4, 0] = float("inf")
    x[0, 1] = float("-inf")  # in the first row too: the value the shifted sums start from
    x[2, 2] = float("nan")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_channel_statistics(backend):
    """A channel holding +-inf has torch's mean +-inf and variance NaN (not a NaN mean); a NaN
    one NaN for both; the running statistics follow. Also when the inf is the channel's first
    value, from which the shifted sums start."""
    x = _bn_inf_case()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with hpml_ops.use_backend(backend):
        y = hpml_ops.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    rm64, rv64 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y64 = F.batch_norm(up(x).cpu(), rm64, rv64, None, None, True, 0.1, 1e-5)
    assert_close_to_oracle(y, y64, what="output")
    assert_close_to_oracle(rm, rm64, what="running_mean")
    assert_close_to_oracle(rv, rv64, what="running_var")
    assert rm64[0].item() == float("inf") and rm64[1].item() == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_channel_statistics_in_fused_mlp(backend):
    """The same through FusedMLP's batch norm (the whole-network kernel's per-block sums)."""
    torch.manual_seed(4)
    seq = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DEVICE)
    fused = hpml_ops.nn.FusedMLP(*copy.deepcopy(seq), backend=backend)
    ref = copy.deepcopy(seq).double()
    x = torch.randn(9, 3, device=DEVICE)
    x[0, 0] = float("inf")  # row 0: +-inf in every unit of the first layer
    with torch.no_grad():
        fused(x)
        ref(up(x))
    for name in ("running_mean", "running_var"):
        assert_close_to_oracle(getattr(fused[1], name), getattr(ref[1], name), what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_argument_errors_as_torch(backend):
    x = torch.randn(6, 3, device=DEVICE)
    stats = torch.zeros(3, device=DEVICE)
    cases = [
        # running_mean without running_var (torch: ValueError, before anything runs)
        dict(running_mean=stats.clone(), running_var=None, training=True),
        dict(running_mean=None, running_var=stats.clone() + 1, training=True),
        dict(running_mean=None, running_var=stats.clone() + 1, training=False),
        # momentum=None in the functional form (the modules turn it into a cumulative average)
        dict(running_mean=stats.clone(), running_var=stats.clone() + 1, momentum=None),
        dict(running_mean=stats.clone(), running_var=stats.clone() + 1, momentum="0.1"),
        # eps
        dict(running_mean=None, running_var=None, training=True, eps=0.0),
        dict(running_mean=stats.clone(), running_var=stats.clone() + 1, eps=-1e-3),
    ]
    for kw in cases:
        kw = dict(dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5), **kw)
        with pytest.raises(Exception) as theirs:  # noqa: PT011 (whatever torch raises)
            F.batch_norm(x, **kw)
        with hpml_ops.use_backend(backend), pytest.raises(type(theirs.value)) as ours:
            hpml_ops.batch_norm(x, **kw)
        assert str(ours.value) == str(theirs.value), kw
    # and untouched statistics when torch's error comes
    rm = torch.zeros(3, device=DEVICE)
    with hpml_ops.use_backend(backend), pytest.raises(ValueError, match=re.escape("both be None")):
        hpml_ops.batch_norm(x, rm, None, training=True)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_that_require_grad_as_torch(backend):
    """torch's batch norm is not differentiable with respect to its running statistics: with one
    that requires grad it raises (training and eval) wherever autograd records, and runs under
    no_grad. Ours the same, for batch_norm, the modules and the whole-MLP ops (naming the
    layer's list entry), before any statistic moves; not a gradient silently None."""
    torch.manual_seed(2)
    x = torch.randn(6, 3, device=DEVICE)
    words = "is not differentiable with respect to argument '{}'. This input cannot have"
    for name in ("running_mean", "running_var"):
        for training in (True, False):
            stats = {
                "running_mean": torch.zeros(3, device=DEVICE),
                "running_var": torch.ones(3, device=DEVICE),
            }
            stats[name].requires_grad_(True)
            with pytest.raises(RuntimeError, match=re.escape(words.format(name))):
                F.batch_norm(x, **stats, training=training)
            with hpml_ops.use_backend(backend):
                with pytest.raises(RuntimeError, match=re.escape(words.format(name))):
                    hpml_ops.batch_norm(x, **stats, training=training)
                with torch.no_grad():
                    got = hpml_ops.batch_norm(x, **stats, training=training)
            with torch.no_grad():
                want = F.batch_norm(
                    x, **{k: v.clone() for k, v in stats.items()}, training=training
                )
            torch.testing.assert_close(got, want)
    plain = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3),
        nn.ReLU(), nn.Linear(3, 2),
    ).to(DEVICE)  # fmt: skip
    plain[4].running_var.requires_grad_(True)
    x, y = torch.randn(7, 4, device=DEVICE), torch.rand(7, 2, device=DEVICE)
    for fused in (
        hpml_ops.nn.FusedMLP(*copy.deepcopy(plain), backend=backend),
        hpml_ops.convert(copy.deepcopy(plain), backend=backend, fuse_mlp=False),
    ):
        ref = copy.deepcopy(plain)
        before = [t.detach().clone() for t in fused.buffers()]
        # the whole-MLP ops name the list entry (layer 1's); the reference backend is torch's
        whole = isinstance(fused, hpml_ops.nn.FusedMLP) and backend != "reference"
        with pytest.raises(RuntimeError, match=re.escape(words.format("running_var"))):
            ref(x)
        with pytest.raises(
            RuntimeError,
            match=re.escape(words.format("running_vars[1]" if whole else "running_var")),
        ):
            fused(x)
        if isinstance(fused, hpml_ops.nn.FusedMLP):
            with pytest.raises(RuntimeError, match="This input cannot have requires_grad True"):
                fused.bce_with_logits(x, y)
            with pytest.raises(RuntimeError, match="This input cannot have requires_grad True"):
                F.binary_cross_entropy_with_logits(ref(x), y)
        # The batches counted as torch's modules count them (before F.batch_norm raises). Module
        # by module, the first batch norm's statistics move before the second raises, as torch's;
        # one op for the whole net raises before any of them moves.
        for a, b, c in zip(fused.buffers(), ref.buffers(), before, strict=True):
            if not a.is_floating_point():
                assert torch.equal(a, b)
            elif whole:
                assert torch.equal(a.detach(), c)
            else:
                torch.testing.assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_dtype_rules_as_torch(backend):
    """torch's rule for batch norm's weight, bias and statistics: one dtype for all, the input's,
    or float32 for float16/bfloat16 input. Where torch raises, ours raises naming the arguments
    and dtypes; where torch runs, ours gives its result."""
    dts = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    torch.manual_seed(5)
    for xd in dts:
        x = torch.randn(6, 3, device=DEVICE).to(xd)
        for wd in dts:
            for sd in dts:
                args = (
                    torch.zeros(3, device=DEVICE, dtype=sd),
                    torch.ones(3, device=DEVICE, dtype=sd),
                    torch.ones(3, device=DEVICE, dtype=wd),
                    torch.zeros(3, device=DEVICE, dtype=wd),
                )
                try:
                    want = F.batch_norm(x, *[a.clone() for a in args], True)
                except RuntimeError:
                    want = None
                with hpml_ops.use_backend(backend):
                    if want is None:
                        with pytest.raises(RuntimeError, match="of one dtype, the input's"):
                            hpml_ops.batch_norm(x, *[a.clone() for a in args], True)
                        continue
                    got = hpml_ops.batch_norm(x, *[a.clone() for a in args], True)
                assert got.dtype == want.dtype == xd
                torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
