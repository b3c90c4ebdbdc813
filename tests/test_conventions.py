"""PyTorch's conventions, row by row (issue 15's table): each standard tool that works on torch's
own ops must work on ours and give torch's numbers, on every backend, through the public
functions and through converted models in both forms (``fuse_mlp=False``: fused pairs;
``fuse_mlp=True``: one whole-network op, ``FusedMLP``).

Rows: non-reentrant checkpointing (``checkpoint``, ``checkpoint_sequential``); ``torch.func``
(``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``, per-sample gradients through
``functional_call``); forward-mode AD (``jvp``, ``forward_ad.dual_level``); double backward
(``gradgradcheck``, a WGAN-GP gradient penalty); the meta device (construction under
``torch.device("meta")``); ``torch.fx.symbolic_trace``; torch's helpers that rebuild a module from
its class (``SyncBatchNorm.convert_sync_batchnorm``, ``fuse_conv_bn_eval``) and
``torch.ao.quantization.fuse_modules`` (which must fail loudly); ``nn.Sequential`` subclasses
(torchvision's ``ops.MLP``, ``Conv2dNormActivation``); a forward hook added after ``convert``.

The same rows in more depth (dtypes, every op's cases): test_torch_func.py, test_autograd.py,
test_torch_function.py, test_convert.py, test_bad_input_as_torch.py; whole torchvision networks:
test_torchvision.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import hpml_ops

from .helpers import DEVICE, backend_params

BACKENDS = backend_params(include_reference=False)
FORMS = [pytest.param(False, id="pairs"), pytest.param(True, id="fused-mlp")]
F64 = dict(device=DEVICE, dtype=torch.float64)


def _net(act: type[nn.Module] = nn.Tanh, **to) -> nn.Sequential:
    """Linear, BatchNorm1d, act, Linear, act, Linear in float64 (``to``: else), with running
    statistics that are not the defaults."""
    torch.manual_seed(21)
    net = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 2)
    ).to(**(to or F64))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _pair(fuse_mlp: bool, backend: str, act: type[nn.Module] = nn.Tanh, train: bool = True):
    """(torch's net, the same converted) in training or eval mode."""
    net = _net(act).train(train)
    ours = hpml_ops.convert(copy.deepcopy(net), backend=backend, fuse_mlp=fuse_mlp)
    assert (type(ours) is hpml_ops.nn.FusedMLP) == fuse_mlp
    return net, ours


def _x(rows: int = 5, cols: int = 3) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(22)).to(**F64)


def _params():
    g = torch.Generator().manual_seed(23)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(**F64)

    return {
        "w1": r(6, 3), "b1": r(6), "gamma": r(6).abs() + 0.5, "beta": r(6),
        "w2": r(4, 6), "b2": r(4), "w3": r(2, 4), "y": r(5, 2).sigmoid(),
    }  # fmt: skip


def _ours(x, p):
    """All four public functions in one expression."""
    h = hpml_ops.linear_act(x, p["w1"], p["b1"], "tanh")
    h = hpml_ops.batch_norm(h, None, None, p["gamma"], p["beta"], True, activation="relu")
    out = hpml_ops.mlp(h, [p["w2"], p["w3"]], [p["b2"], None], "sigmoid")
    return hpml_ops.binary_cross_entropy_with_logits(out, p["y"])


def _torch(x, p):
    h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
    h = F.relu(F.batch_norm(h, None, None, p["gamma"], p["beta"], True))
    out = F.linear(torch.sigmoid(F.linear(h, p["w2"], p["b2"])), p["w3"])
    return F.binary_cross_entropy_with_logits(out, p["y"])


def _same_grads(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=f"{what}: {name}")


# ---- checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_non_reentrant(backend, fuse_mlp):
    """torch's gradients through checkpoint and checkpoint_sequential (training mode). The
    running statistics: torch's batch norm updates them again when the backward recomputes the
    forward (a known hazard of checkpointing batch norm), and so do our per-layer ops; a FusedMLP
    updates them after its one op, which the recomputation stops at (checkpoint's early stop: all
    saved tensors are recomputed by then), so they take the step's update once (the batch count
    is torch's). Documented in the README."""
    net, ours = _pair(fuse_mlp, backend)
    once = copy.deepcopy(net)
    x = _x()
    once(x)
    for model in (net, ours):
        checkpoint(model, x, use_reentrant=False).square().sum().backward()
    _same_grads(ours, net, "checkpoint")
    torch.testing.assert_close(ours[1].num_batches_tracked, net[1].num_batches_tracked)
    for name in ("running_mean", "running_var"):
        want = getattr(once[1] if fuse_mlp else net[1], name)
        torch.testing.assert_close(getattr(ours[1], name), want, msg=name)
    with torch.no_grad():
        for a, b in zip(ours.buffers(), net.buffers(), strict=True):
            a.copy_(b)
    for model in (net, ours):
        model.zero_grad()
        checkpoint_sequential(model, 2, x, use_reentrant=False).square().sum().backward()
    _same_grads(ours, net, "checkpoint_sequential")
    for a, b in zip(ours.buffers(), net.buffers(), strict=True):
        torch.testing.assert_close(a, b)  # (segments of modules: torch's batch norm's update)
    p, xr = _params(), x.clone().requires_grad_()
    with hpml_ops.use_backend(backend):
        (got,) = torch.autograd.grad(checkpoint(_ours, xr, p, use_reentrant=False), xr)
    (want,) = torch.autograd.grad(_torch(xr, p), xr)
    torch.testing.assert_close(got, want)


# ---- torch.func and forward-mode AD ----------------------------------------------------------


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_on_converted_models(backend, fuse_mlp):
    """grad of functional_call, per-sample gradients (vmap of grad), vmap, jacrev, jacfwd,
    hessian and jvp with respect to the input (eval mode: the running statistics)."""
    net, ours = _pair(fuse_mlp, backend, train=False)
    x, t = _x(), torch.randn(5, 3, **F64)

    def results(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.detach() for k, v in m.named_buffers()}

        def loss(p, xi):
            return tf.functional_call(m, (p, buffers), (xi,)).square().sum()

        def f(xi):
            return m(xi)

        def one(xi):
            return m(xi[None]).square().sum()

        return {
            "grad": tf.grad(loss)(params, x),
            "per-sample": tf.vmap(tf.grad(loss), in_dims=(None, 0))(params, x[:, None]),
            "vmap": tf.vmap(f)(x[:, None]),
            "jacrev": tf.jacrev(f)(x),
            "jacfwd": tf.jacfwd(f)(x),
            "hessian": tf.vmap(tf.hessian(one))(x),
            "jvp": tf.jvp(f, (x,), (t,))[1],
        }

    with hpml_ops.use_backend(backend):
        got = results(ours)
    want = results(net)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_on_the_functions(backend):
    p, x, t = _params(), _x(), torch.randn(5, 3, **F64)

    def results(fn):
        def f(xi):
            return fn(xi, p)

        with fwAD.dual_level():
            dual = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        return {
            "grad": tf.grad(f)(x),
            "jacrev": tf.jacrev(f)(x),
            "jacfwd": tf.jacfwd(f)(x),
            "hessian": tf.hessian(f)(x),
            "jvp": tf.jvp(f, (x,), (t,))[1],
            "forward_ad": dual,
            "vmap": tf.vmap(f)(torch.stack([x, 2 * x, -x])),
        }

    with hpml_ops.use_backend(backend):
        got = results(_ours)
    torch.testing.assert_close(got, results(_torch))


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_on_converted_models(backend, fuse_mlp):
    net, ours = _pair(fuse_mlp, backend, train=False)
    x, t = _x(), torch.randn(5, 3, **F64)

    def tangent(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent

    with hpml_ops.use_backend(backend):
        got = tangent(ours)
    torch.testing.assert_close(got, tangent(net))


# ---- double backward -------------------------------------------------------------------------


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_on_converted_models(backend, fuse_mlp):
    """A WGAN-GP critic step (training mode): torch's parameter gradients and running stats."""
    net, ours = _pair(fuse_mlp, backend)
    x = _x()
    for model in (net, ours):
        xi = x.clone().requires_grad_()
        out = model(xi)
        (gx,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        (out.mean() + 10 * ((gx.norm(dim=1) - 1) ** 2).mean()).backward()
    _same_grads(ours, net, "gradient penalty")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_of_the_functions(backend):
    p = {k: v.requires_grad_(k != "y") for k, v in _params().items()}
    names = [k for k in p if k != "y"]

    def fn(x, *tensors):
        return _ours(x, {**p, **dict(zip(names, tensors, strict=True))})

    with hpml_ops.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, (_x().requires_grad_(), *[p[k] for k in names]))


# ---- meta device, FX -------------------------------------------------------------------------


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_device(backend, fuse_mlp):
    """Deferred initialisation: models built and converted under torch.device("meta") and the
    functions on meta tensors give torch's shapes and dtypes."""
    with torch.device("meta"):
        net = _net(dtype=torch.float32)
        ours = hpml_ops.convert(copy.deepcopy(net), backend=backend, fuse_mlp=fuse_mlp)
        x = torch.randn(5, 3)
        got, want = ours(x), net(x)
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
    p = {k: v.to("meta") for k, v in _params().items()}
    with hpml_ops.use_backend(backend):
        got = _ours(_x().to("meta"), p)
    want = _torch(_x().to("meta"), p)
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


class _Functions(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.p = fn, _params()

    def forward(self, x):
        return self.fn(x, self.p)


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_symbolic_trace(backend, fuse_mlp):
    """symbolic_trace records our functions as calls; the traced graphs give torch's numbers."""
    net, ours = _pair(fuse_mlp, backend, train=False)
    x = _x()
    with hpml_ops.use_backend(backend):
        traced = torch.fx.symbolic_trace(ours)
        torch.testing.assert_close(traced(x), net(x))
        functions = torch.fx.symbolic_trace(_Functions(_ours))
        assert any("binary_cross_entropy" in str(n.target) for n in functions.graph.nodes)
        torch.testing.assert_close(functions(x), _torch(x, _params()))


# ---- torch's module helpers, Sequential subclasses, hooks ------------------------------------


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_sync_batchnorm_keeps_the_relu(backend, fuse_mlp):
    """torch's convert_sync_batchnorm rebuilds each batch norm from its class: the ReLU fused into
    ours must survive (eval mode: no process group here)."""
    net, ours = _pair(fuse_mlp, backend, act=nn.ReLU, train=False)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    x = _x()
    assert any(type(m) is nn.SyncBatchNorm for m in synced.modules())
    torch.testing.assert_close(synced(x), net(x))
    h = x
    for module in list(synced.children())[:3]:  # Linear, batch norm, ReLU: module by module
        h = module(h)
    torch.testing.assert_close(h, net[:3](x))
    assert float(h.detach().min()) == 0.0


def _conv_block(backend: str):
    torch.manual_seed(24)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(**F64).eval()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net, hpml_ops.convert(copy.deepcopy(net), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_conv_bn_eval_and_fuse_modules(backend):
    """fuse_conv_bn_eval folds our batch norm into the convolution and keeps the ReLU;
    torch.ao's fuse_modules, which cannot know our modules, fails loudly."""
    net, ours = _conv_block(backend)
    x = torch.randn(2, 2, 6, 6, **F64)
    folded = copy.deepcopy(ours)
    folded[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(folded[0], folded[1])
    folded[1] = nn.Identity()
    torch.testing.assert_close(folded(x), net(x))
    assert float(folded(x).detach().min()) >= 0.0
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError, TypeError)):
        torch.ao.quantization.fuse_modules(copy.deepcopy(ours), [["0", "1", "2"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_subclasses(backend):
    """convert fuses inside torchvision's nn.Sequential subclasses, keeping their class."""
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is a test dependency")
    torch.manual_seed(25)
    mlp = ops.MLP(3, [6, 5, 2], norm_layer=nn.BatchNorm1d).to(**F64).eval()
    block = ops.Conv2dNormActivation(2, 4, 3).to(**F64).eval()
    for net, x in ((mlp, _x()), (block, torch.randn(2, 2, 6, 6, **F64))):
        ours = hpml_ops.convert(copy.deepcopy(net), backend=backend)
        assert type(ours) is type(net)
        assert any(type(m).__module__.startswith("hpml_ops") for m in ours.modules())
        torch.testing.assert_close(ours(x), net(x))
        assert ours.state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize("fuse_mlp", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_hook_added_after_convert(backend, fuse_mlp):
    """A forward hook on a Linear of the converted model sees what torch's Linear returns (the
    pre-activation), and the model's output is still torch's."""
    net, ours = _pair(fuse_mlp, backend, act=nn.ReLU, train=False)
    seen: dict[str, torch.Tensor] = {}
    net[3].register_forward_hook(lambda m, i, o: seen.__setitem__("torch", o))
    ours[3].register_forward_hook(lambda m, i, o: seen.__setitem__("ours", o))
    x = _x()
    torch.testing.assert_close(ours(x), net(x))
    torch.testing.assert_close(seen["ours"], seen["torch"])
    assert float(seen["torch"].min()) < 0.0  # (the pre-activation: a lost ReLU would show)
