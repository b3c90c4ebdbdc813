"""hpml_ops.batch_norm and the BatchNorm modules against torch computed in float64 from the same
inputs: output, running statistics and the three gradients, every backend, dtype, memory format
and shape (N = 2, primes, C = 1 and 3, spatial 1x1 and 7x9, 3-D and 5-D, sizes that force the
split reduction), training and eval, affine on / off, fused ReLU, data with a large offset;
gradcheck, opcheck, torch.compile, determinism, bad input, the modules as drop-ins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hpml_ops
from hpml_ops.ops.batch_norm import OP
from tests.helpers import DEVICE, DTYPES, TOL, backend_params, check_against_oracle, dtype_id

pytestmark = pytest.mark.usefixtures("poisoned")

# (shape, channels_last): N = 2, primes, C = 1, C = 3, spatial 1x1 and 7x9, 3-D, 5-D.
SHAPES = [
    ((2, 3), False),
    ((97, 5), False),
    ((13, 1), False),
    ((5, 3, 7), False),
    ((2, 3, 7, 9), False),
    ((2, 3, 7, 9), True),
    ((3, 4, 1, 1), False),
    ((2, 3, 2, 3, 5), False),
]


def _make(shape, dtype, seed, affine=True, channels_last=False, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Parameters and running statistics in fp32 for fp16/bf16 inputs (torch's mixed-precision
    # rule), in the input's dtype otherwise.
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(c, generator=g) + 0.5).to(DEVICE, pdt) if affine else None
    b = torch.randn(c, generator=g).to(DEVICE, pdt) if affine else None
    rm = torch.randn(c, generator=g).to(DEVICE, pdt)
    rv = (torch.rand(c, generator=g) + 0.5).to(DEVICE, pdt)
    return x, w, b, rm, rv


def _fn(backend, rm, rv, training, activation, momentum=0.1):
    """batch_norm on copies of the running statistics (each call starts from the same ones)."""

    def fn(x, w, b):
        r1 = rm.to(torch.float64 if x.dtype == torch.float64 else rm.dtype, copy=True)
        r2 = rv.to(r1.dtype, copy=True)
        if backend is None:
            return hpml_ops.reference.batch_norm(
                x, r1, r2, w, b, training, momentum, 1e-5, activation
            )
        with hpml_ops.use_backend(backend):
            return hpml_ops.batch_norm(x, r1, r2, w, b, training, momentum, 1e-5, activation)

    return fn


def _check_running_stats(backend, x, w, b, rm, rv, activation):
    """One training call updates the running statistics as torch does (against float64)."""
    r1, r2 = rm.clone(), rv.clone()
    with hpml_ops.use_backend(backend):
        hpml_ops.batch_norm(x, r1, r2, w, b, True, 0.1, 1e-5, activation)
    e1, e2 = rm.double(), rv.double()
    F.batch_norm(x.double(), e1, e2, None, None, True, 0.1, 1e-5)
    atol, rtol = TOL[torch.float64 if x.dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(r1.double(), e1, atol=atol, rtol=rtol, msg="running_mean")
    torch.testing.assert_close(r2.double(), e2, atol=atol, rtol=rtol, msg="running_var")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}{'-cl' if s[1] else ''}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_parity(backend, dtype, shape, training, affine, activation):
    shp, cl = shape
    x, w, b, rm, rv = _make(shp, dtype, seed=sum(shp), affine=affine, channels_last=cl)
    out = check_against_oracle(
        _fn(backend, rm, rv, training, activation),
        _fn(None, rm, rv, training, activation),
        (x, w, b),
        (True, affine, affine),
        names=("input", "weight", "bias"),
    )
    assert out.shape == x.shape
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last), "memory format not kept"
    if training:
        _check_running_stats(backend, x, w, b, rm, rv, activation)


@pytest.mark.parametrize("shape", [(3, 4, 128, 129), (40000, 3), (300, 2, 7)], ids=str)
@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_split_reduction(backend, shape):
    """Enough values per channel for several reduction chunks / row tiles, merged in order."""
    x, w, b, rm, rv = _make(shape, torch.float32, 5)
    check_against_oracle(
        _fn(backend, rm, rv, True, "relu"),
        _fn(None, rm, rv, True, "relu"),
        (x, w, b),
        (True, True, True),
    )
    _check_running_stats(backend, x, w, b, rm, rv, "relu")


@pytest.mark.parametrize(
    "shape,cl",
    [((32768, 257), False), ((16, 33, 128, 125), False), ((16, 33, 128, 125), True)],
    ids=["2d", "nchw", "nhwc"],
)
def test_streamed_outputs(shape, cl):
    """Outputs of >= 32 MiB: the C++ CPU kernels write y and dx with streaming stores (full,
    aligned vectors; a row of 257 channels makes most rows misaligned, so both paths run), and
    the backward reads the streamed y for the ReLU mask. Over 8M values a few pre-activations
    sit within fp32 rounding of 0, where fp32 and fp64 may take different sides of the ReLU:
    the float64 reference takes our output's mask."""
    if DEVICE != "cpu" or "cpp" not in hpml_ops.available_backends("cpu"):
        pytest.skip("the streaming stores are the C++ CPU kernels' (cpp backend unavailable)")
    x, w, b, rm, rv = _make(shape, torch.float32, 11, channels_last=cl)
    assert x.numel() * 4 >= 32 << 20
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
    with hpml_ops.use_backend("cpp"):
        out = hpml_ops.batch_norm(
            leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], True, activation="relu"
        )
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(gout)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    pre = F.batch_norm(ref_leaves[0], None, None, ref_leaves[1], ref_leaves[2], True)
    mask = out.detach() > 0
    pre.backward(gout.double() * mask)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(
        out.detach().double(), F.relu(pre.detach()) * mask, atol=atol, rtol=rtol
    )
    assert out.is_contiguous(memory_format=torch.channels_last) if cl else out.is_contiguous()
    torch.testing.assert_close(leaves[0].grad.double(), ref_leaves[0].grad, atol=atol, rtol=rtol)
    # grad_weight and grad_bias sum 2^15-2^18 terms of mixed sign per channel: a channel whose
    # sum cancels to ~0.1 from terms of ~1 cannot meet an error bound relative to the result.
    # The bound is the summation's own: rtol x sum |terms| per channel (~1e-2 here; our largest
    # error is ~1.3e-4, torch's fp32 batch norm ~1.8e-3).
    dims = [0, *range(2, x.dim())]
    dz = gout.double() * mask
    xhat = (pre.detach() - b.double().view([1, -1] + [1] * (x.dim() - 2))) / w.double().view(
        [1, -1] + [1] * (x.dim() - 2)
    )
    for ours, ref, terms in (
        (leaves[1].grad, ref_leaves[1].grad, (dz * xhat).abs().sum(dims)),
        (leaves[2].grad, ref_leaves[2].grad, dz.abs().sum(dims)),
    ):
        err = (ours.double() - ref).abs()
        assert (err <= rtol * terms + atol).all(), f"{err.max()} > {rtol} x {terms.min()}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_large_offset(backend, channels_last):
    """Mean 1e4, std 1e-2 in fp32: E[x^2] - E[x]^2 loses the variance entirely (it gives 0, -8,
    -16 here, for 1e-4); the shifted sums keep it to 1e-4 relative (torch's Welford: 2e-3)."""
    x, w, b, rm, rv = _make(
        (16, 3, 9, 11), torch.float32, 6, channels_last=channels_last, offset=1e4, scale=1e-2
    )
    with hpml_ops.use_backend(backend):
        out = hpml_ops.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    ref = F.batch_norm(x.double(), None, None, w.double(), b.double(), True)
    # The output is bounded by the mean stored in fp32 (ulp(1e4) ~ 1e-3 = 0.1 std), as torch's own
    # fp32 batch norm is (0.08 on this data): ours may be no worse than torch's.
    torch_err = (F.batch_norm(x, None, None, w, b, True).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= torch_err
    var = x.double().var(dim=(0, 2, 3), unbiased=True)
    r1, r2 = rm.clone(), rv.clone()
    with hpml_ops.use_backend(backend):
        hpml_ops.batch_norm(x, r1, r2, None, None, True, 1.0)  # momentum 1: the batch's own
    torch.testing.assert_close(r2.double(), var, atol=0, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_gradcheck(backend, training):
    x, w, b, rm, rv = _make((5, 3, 4), torch.float64, 7)
    for act in (None, "relu"):
        f = _fn(backend, rm, rv, training, act)
        assert torch.autograd.gradcheck(
            f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        )


@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_opcheck(backend):
    fwd, bwd = OP.pair(backend)
    for training in (True, False):
        for act in (0, 1):
            for shape, cl in (((6, 4), False), ((3, 4, 5, 2), True)):
                x, w, b, rm, rv = _make(shape, torch.float32, act, channels_last=cl)
                torch.library.opcheck(fwd, (x.requires_grad_(), w, b, rm, rv, training, 1e-5, act))
                out, mean, invstd, _ = fwd(x.detach(), w, b, rm, rv, training, 1e-5, act)
                g = torch.randn_like(out)
                saved = out if act == 1 else out.new_empty((0,))
                torch.library.opcheck(
                    bwd, (g, x.detach(), w, saved, mean, invstd, training, act, True, True, True)
                )


@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_compile_fullgraph(backend):
    """A model with a BatchNorm1d (fused ReLU) trains under torch.compile(fullgraph=True): the
    running statistics update inside the graph; numbers match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 8),
            hpml_ops.nn.BatchNorm1d(8, activation="relu"),
            torch.nn.Linear(8, 1),
        ).to(DEVICE)

    x = torch.randn(16, 6, device=DEVICE)
    eager, comp = make(), make()
    with hpml_ops.use_backend(backend):
        ye = eager(x)
        ye.sum().backward()
        yc = torch.compile(comp, fullgraph=True)(x)
        yc.sum().backward()
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(comp[1].running_var, eager[1].running_var)
    assert comp[1].num_batches_tracked.item() == 1
    for pc, pe in zip(comp.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_deterministic(backend):
    x, w, b, rm, rv = _make((64, 5, 33, 17), torch.float32, 8)

    def run():
        xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
        r1, r2 = rm.clone(), rv.clone()
        with hpml_ops.use_backend(backend):
            y = hpml_ops.batch_norm(xx, r1, r2, ww, bb, True, activation="relu")
        y.backward(torch.ones_like(y))
        return y, xx.grad, ww.grad, bb.grad, r1, r2

    a, c = run(), run()
    assert all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    if backend == "cpp" and DEVICE == "cpu":
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = run()
        finally:
            torch.set_num_threads(prev)
        assert all(torch.equal(p, q) for p, q in zip(a, one, strict=True)), "thread-count dependent"


@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_empty_batch(backend):
    x, w, b, rm, rv = _make((0, 3, 4), torch.float32, 9)
    r1, r2 = rm.clone(), rv.clone()
    xx = x.requires_grad_()
    with hpml_ops.use_backend(backend):
        y = hpml_ops.batch_norm(xx, r1, r2, w, b, True)
    assert y.shape == (0, 3, 4)
    assert torch.equal(r1, rm) and torch.equal(r2, rv)  # torch leaves them unchanged
    (g,) = torch.autograd.grad(y.sum(), xx)
    assert g.shape == x.shape


@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_bad_inputs(backend):
    x, w, b, rm, rv = _make((4, 3, 5), torch.float32, 1)
    bn = hpml_ops.batch_norm
    with hpml_ops.use_backend(backend):
        with pytest.raises(
            ValueError,
            match=r"Expected more than 1 value per channel when "
            r"training, got input size torch.Size\(\[1, 3\]\)",
        ):
            bn(torch.randn(1, 3, device=DEVICE), None, None, training=True)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bn(torch.randn(1, 3, 1, 1, device=DEVICE), None, None, training=True)
        with pytest.raises(RuntimeError, match=r"running_mean should contain 3 elements .* \(4,\)"):
            bn(x, torch.zeros(4, device=DEVICE), rv, training=True)
        with pytest.raises(RuntimeError, match=r"weight should contain 3 elements .* \(5,\)"):
            bn(x, rm, rv, torch.ones(5, device=DEVICE), training=True)
        with pytest.raises(RuntimeError, match="expected bias on .* got meta"):
            bn(x, rm, rv, w, b.to("meta"), training=True)
        with pytest.raises(RuntimeError, match="floating-point input, got torch.int64"):
            bn(x.long(), rm, rv, training=True)
        with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
            bn(x, None, None, training=False)
        with pytest.raises(ValueError, match="activation must be"):
            bn(x, rm, rv, activation="gelu")
        with pytest.raises(RuntimeError, match=r"shape \(N, C, \*\)"):
            bn(torch.randn(5, device=DEVICE), None, None, training=True)


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d"])
def test_modules_are_drop_ins(cls):
    ours_cls, torch_cls = getattr(hpml_ops.nn, cls), getattr(torch.nn, cls)
    shape = (8, 4) if cls == "BatchNorm1d" else (4, 4, 3, 5)
    for kwargs in ({}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}):
        ours, ref = ours_cls(4, **kwargs).to(DEVICE), torch_cls(4, **kwargs).to(DEVICE)
        assert isinstance(ours, torch_cls)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        for _ in range(3):
            x = torch.randn(shape, device=DEVICE) * 2 + 1
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-6, rtol=1e-6, msg=k)
        ours.eval()
        ref.eval()
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # A checkpoint of torch's module loads into ours and back.
    ref = torch_cls(4).to(DEVICE)
    ref(torch.randn(shape, device=DEVICE))
    ours = ours_cls(4, activation="relu").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    back = torch_cls(4).to(DEVICE)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, device=DEVICE)
    torch.testing.assert_close(ours(x), torch.relu(ref(x)), atol=1e-5, rtol=1e-5)
    assert "activation=relu" in repr(ours)
