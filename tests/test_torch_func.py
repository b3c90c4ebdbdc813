"""torch.func transforms and forward-mode AD on our public functions and converted models, on
every backend: grad, vmap, jacrev, jacfwd, jvp, hessian, per-sample gradients through
functional_call, and forward_ad.dual_level. Under them the ops run as torch's own (the reference
backend; our kernels have no batching or forward-mode rules yet): the results must be torch's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import hpml_ops

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
