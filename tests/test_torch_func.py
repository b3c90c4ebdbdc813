"""torch.func transforms and forward-mode AD on our public functions and converted models, on
every backend: grad, vmap, jacrev, jacfwd, jvp, hessian, per-sample gradients through
functional_call, and forward_ad.dual_level: the results must be torch's. Under ``torch.vmap``
alone our ops run, their batching rules calling the kernel once on the whole batch (checked here
with the profiler: one call on the stacked tensor, none per sample); under the other transforms,
and where one call cannot batch (per-sample weights, per-sample batch statistics in a whole
MLP), the ops run as torch's own."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import hpml_ops
from hpml_ops.ops._registry import REGISTERED

from .helpers import DEVICE, backend_params

BACKENDS = backend_params()
F64 = dict(device=DEVICE, dtype=torch.float64)


def _cases():
    """(name, ours(x), torch's(x)) for a function of one input tensor (the others fixed)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g).to(**F64)
    b = torch.randn(4, generator=g).to(**F64)
    w2 = torch.randn(2, 4, generator=g).to(**F64)
    y = torch.rand(5, 4, generator=g).to(**F64)
    pw = torch.rand(4, generator=g).to(**F64) + 0.5
    rm, rv = torch.randn(4, generator=g).to(**F64), torch.rand(4, generator=g).to(**F64) + 0.5
    return [
        (
            "linear_act",
            lambda x: hpml_ops.linear_act(x, w, b, "tanh"),
            lambda x: torch.tanh(F.linear(x, w, b)),
        ),
        (
            "batch_norm eval",
            lambda x: hpml_ops.batch_norm(F.linear(x, w), rm, rv, b, b, False, 0.1, 1e-5, "relu"),
            lambda x: F.relu(F.batch_norm(F.linear(x, w), rm, rv, b, b, False, 0.1, 1e-5)),
        ),
        (
            "batch_norm train, no running stats",
            lambda x: hpml_ops.batch_norm(F.linear(x, w), None, None, b, b, True),
            lambda x: F.batch_norm(F.linear(x, w), None, None, b, b, True),
        ),
        (
            "bce",
            lambda x: hpml_ops.binary_cross_entropy_with_logits(
                F.linear(x, w), y, pos_weight=pw, reduction="sum"
            ),
            lambda x: F.binary_cross_entropy_with_logits(
                F.linear(x, w), y, pos_weight=pw, reduction="sum"
            ),
        ),
        (
            "mlp",
            lambda x: hpml_ops.mlp(x, [w, w2], [b, None], "leaky_relu"),
            lambda x: F.linear(F.leaky_relu(F.linear(x, w, b)), w2),
        ),
    ]


def _x():
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(**F64)


_NAMES = [c[0] for c in _cases()]


@pytest.mark.parametrize("case", range(len(_NAMES)), ids=_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_transforms_and_forward_mode(backend, case):
    name, ours, theirs = _cases()[case]
    x = _x()
    t = torch.randn_like(x)
    xs = torch.stack([x, 2 * x, -x])

    def transforms(fn):
        return {
            "grad": tf.grad(lambda x: fn(x).sum())(x),
            "jacrev": tf.jacrev(fn)(x),
            "jacfwd": tf.jacfwd(fn)(x),
            "jvp": tf.jvp(fn, (x,), (t,))[1],
            "vmap": tf.vmap(fn)(xs),
            "hessian": tf.hessian(lambda x: fn(x).sum())(x),
            "forward_ad": forward_ad(fn),
        }

    def forward_ad(fn):
        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent

    with hpml_ops.use_backend(backend):
        got = transforms(ours)
    want = transforms(theirs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=f"{name}: {k}")


@pytest.mark.parametrize("fuse_mlp", [True, False], ids=["fused-mlp", "pairs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_of_a_converted_model(backend, fuse_mlp):
    """vmap(grad(loss)) through functional_call: the per-sample gradients of every parameter,
    as torch's model gives them (eval mode: batch norm with its running statistics)."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
        nn.Sigmoid(),
        nn.Linear(2, 1),
    )
    model = model.to(**F64).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    ours = hpml_ops.convert(copy.deepcopy(model), backend=backend, fuse_mlp=fuse_mlp)
    x, y = _x(), torch.rand(5, 1, **F64)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.detach() for k, v in m.named_buffers()}

        def loss(p, xi, yi):
            out = tf.functional_call(m, (p, buffers), (xi[None],))
            return F.binary_cross_entropy_with_logits(out, yi[None])

        return tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample(ours), per_sample(model)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def _vmap_cases():
    """(name, ours(*args), torch's(*args), args, in_dims, the stacked input's shape that one call
    of our forward op gets): functions of batched tensors, the others fixed."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(**F64)

    w, b, w2, b2 = r(6, 5), r(6), r(3, 6), r(3)
    rm, rv = r(6), r(6).abs() + 0.5
    x3 = r(7, 4, 5)  # batch of 4 along dimension 1
    xb = r(4, 3, 6, 5)  # (B, N, C, L) for batch norm
    return [
        ("linear_act relu, batch in dim 1", lambda x: hpml_ops.linear_act(x, w, b, "relu"),
         lambda x: F.relu(F.linear(x, w, b)), (x3,), 1, (28, 5)),
        ("linear_act sigmoid, 3-d samples", lambda x: hpml_ops.linear_act(x, w, None, "sigmoid"),
         lambda x: torch.sigmoid(F.linear(x, w)), (r(4, 2, 3, 5),), 0, (24, 5)),
        ("bce mean, batched weights",
         lambda x, y, pw: hpml_ops.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
         lambda x, y, pw: F.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
         (r(4, 3, 6), r(4, 3, 6).sigmoid(), r(4, 6).abs()), 0, (4, 3, 6)),
        ("bce none, target unbatched",
         lambda x, y: hpml_ops.binary_cross_entropy_with_logits(x, y, rv, reduction="none"),
         lambda x, y: F.binary_cross_entropy_with_logits(x, y, rv, reduction="none"),
         (r(3, 4, 6), r(3, 6).sigmoid()), (1, None), (4, 3, 6)),
        ("batch_norm train relu, batched running stats",
         lambda x, m, v: hpml_ops.batch_norm(x, m, v, rv, b, True, 0.1, 1e-5, "relu"),
         lambda x, m, v: F.relu(F.batch_norm(x, m, v, rv, b, True, 0.1, 1e-5)),
         (xb, r(4, 6), r(4, 6).abs() + 0.5), 0, (3, 24, 5)),
        ("batch_norm eval",
         lambda x: hpml_ops.batch_norm(x, rm, rv, rv, b, False),
         lambda x: F.batch_norm(x, rm, rv, rv, b, False), (xb,), 0, (3, 24, 5)),
        ("mlp", lambda x: hpml_ops.mlp(x, [w, w2], [b, None], "tanh"),
         lambda x: F.linear(torch.tanh(F.linear(x, w, b)), w2), (x3,), 1, (28, 5)),
        ("mlp eval batch norm",
         lambda x: hpml_ops.mlp(x, [w, w2], [b, b2], batch_norm=True, bn_weights=[rv],
                                bn_biases=[b], running_means=[rm], running_vars=[rv]),
         lambda x: F.linear(F.relu(F.batch_norm(F.linear(x, w, b), rm, rv, rv, b)), w2, b2),
         (x3,), 1, (28, 5)),
    ]  # fmt: skip


_VMAP_NAMES = [c[0] for c in _vmap_cases()]
_FORWARD_OPS = {"linear_act": "linear_act", "bce": "bce_with_logits", "batch_norm": "batch_norm",
                "mlp": "mlp"}  # fmt: skip


def _op_calls(prof, op: str) -> list[tuple]:
    """The shapes of the first input of every call of forward op ``op`` (any backend's)."""
    names = {f"hpml::{op}", f"hpml::{op}_triton", f"hpml_emu::{op}"}
    return [tuple(e.input_shapes[0]) for e in prof.events() if e.name in names]


@pytest.mark.parametrize("case", range(len(_VMAP_NAMES)), ids=_VMAP_NAMES)
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_vmap_runs_our_op_once_on_the_batch(backend, case):
    """vmap of our public functions: torch's results, forward and every gradient (autograd outside
    the vmap, as usual), running statistics updated as torch's; our forward op called once on the
    whole batch (the profiler shows the vmapped call with the sample's shape and those below it
    with the stacked shape, no call per sample), and no fallback of torch's."""
    name, ours, theirs, args, in_dims, stacked = _vmap_cases()[case]
    op = _FORWARD_OPS[name.split()[0]]
    leaves = [a.clone().requires_grad_(a.dtype.is_floating_point and i == 0)
              for i, a in enumerate(args)]  # fmt: skip
    mine = [a.clone() for a in leaves]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        with hpml_ops.use_backend(backend), torch.profiler.profile(record_shapes=True) as prof:
            got = tf.vmap(ours, in_dims=in_dims)(*leaves)
    want = tf.vmap(theirs, in_dims=in_dims)(*mine[:1], *[a.clone() for a in args[1:]])
    theirs_stats = list(args[1:])
    if "running stats" in name:  # torch's updates went into args' clones above: redo with ours'
        theirs_stats = [a.clone() for a in args[1:]]
        want = tf.vmap(theirs, in_dims=in_dims)(mine[0], *theirs_stats)
        for a, b in zip(leaves[1:], theirs_stats, strict=True):
            torch.testing.assert_close(a, b, msg=f"{name}: running statistics")
    torch.testing.assert_close(got, want, msg=name)
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(4)).to(**F64)
    (gx,) = torch.autograd.grad(got, leaves[0], probe)
    (wx,) = torch.autograd.grad(want, mine[0], probe)
    torch.testing.assert_close(gx, wx, msg=f"{name}: input gradient")
    calls = _op_calls(prof, op)
    # The dispatcher records a call at each level it passes (the vmapped call, then the autograd
    # layer and the kernel below it, both with the stacked shape); a per-sample loop would add a
    # call with the sample's shape per sample.
    assert calls.count(stacked) >= 1 and len(calls) - calls.count(stacked) == 1, (calls, stacked)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_vmap_where_one_call_cannot_batch(backend):
    """Per-sample weights (model ensembles) and per-sample batch statistics in a whole MLP run as
    torch's ops under vmap (our op is not called); a direct call of the op with a batched weight
    runs it once per sample (its batching rule's fallback). Torch's results either way; unbatched
    running statistics that batch statistics would update raise torch's error."""
    g = torch.Generator().manual_seed(5)
    x, ws = torch.randn(7, 5, generator=g).to(**F64), torch.randn(3, 6, 5, generator=g).to(**F64)
    w2 = torch.randn(2, 6, generator=g).to(**F64)
    xs = x.view(7, 1, 5).expand(7, 4, 5)  # 7 samples of 4 rows

    def net(xi):
        return hpml_ops.mlp(xi, [ws[0], w2], batch_norm=True, training=True)

    def torch_net(xi):
        return F.linear(F.relu(F.batch_norm(F.linear(xi, ws[0]), None, None, training=True)), w2)

    with hpml_ops.use_backend(backend), torch.profiler.profile(record_shapes=True) as prof:
        got = tf.vmap(lambda w: hpml_ops.linear_act(x, w, None, "relu"))(ws)
        got_mlp = tf.vmap(net)(xs)
    assert not _op_calls(prof, "linear_act") and not _op_calls(prof, "mlp")
    torch.testing.assert_close(got, torch.relu(torch.einsum("mk,bnk->bmn", x, ws)))
    torch.testing.assert_close(got_mlp, tf.vmap(torch_net)(xs))
    with hpml_ops.use_backend(backend):
        fwd = REGISTERED["linear_act"].pair(backend)[0]
        out, mask = tf.vmap(lambda w: fwd(x, w, None, 1, 0.0))(ws)
        rm, rv = torch.zeros(5, **F64), torch.ones(5, **F64)
        with pytest.raises(RuntimeError, match="were not batched"):
            tf.vmap(lambda xi: hpml_ops.batch_norm(xi, rm, rv, training=True))(x.expand(3, 7, 5))
    torch.testing.assert_close(out, torch.relu(torch.einsum("mk,bnk->bmn", x, ws)))
    assert mask.shape[0] == 3


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_vmap_edge_sizes(backend):
    """vmap over no samples, and samples with no features (in_features = 0: the bias alone), as
    torch's results."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(3, 4, generator=g).to(**F64)
    w0, b = torch.randn(3, 0).to(**F64), torch.randn(3, generator=g).to(**F64)
    cases = [
        (lambda x: hpml_ops.linear_act(x, w, b, "relu"), lambda x: F.relu(F.linear(x, w, b)),
         torch.randn(0, 5, 4).to(**F64)),
        (lambda x: hpml_ops.mlp(x, [w]), lambda x: F.linear(x, w), torch.randn(0, 5, 4).to(**F64)),
        (lambda x: hpml_ops.linear_act(x, w0, b, "tanh"), lambda x: torch.tanh(F.linear(x, w0, b)),
         torch.randn(2, 5, 0).to(**F64)),
        (lambda x: hpml_ops.mlp(x, [w0], [b]), lambda x: F.linear(x, w0, b),
         torch.randn(2, 5, 0).to(**F64)),
        (lambda x: hpml_ops.binary_cross_entropy_with_logits(x, x.detach().sigmoid()),
         lambda x: F.binary_cross_entropy_with_logits(x, x.detach().sigmoid()),
         torch.randn(0, 5, 4).to(**F64)),
    ]  # fmt: skip
    # (batch norm over no samples: torch's own batching rule raises "input tensor must have at
    # least one element", where ours returns the empty result, as both do outside vmap)
    for ours, theirs, x in cases:
        with hpml_ops.use_backend(backend):
            got = tf.vmap(ours)(x)
        torch.testing.assert_close(got, tf.vmap(theirs)(x))
