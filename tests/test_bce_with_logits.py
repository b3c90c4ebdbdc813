"""hpml_ops.binary_cross_entropy_with_logits against torch, computed in float64 from the same
inputs: forward and both gradients, every backend, dtype, shape and reduction, with weight and
pos_weight in every broadcast pattern, non-contiguous views, extreme logits; gradcheck, opcheck,
torch.compile, determinism, bad input, the nn module and autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hpml_ops
from hpml_ops.ops.bce_with_logits import OP
from tests.helpers import (
    DEVICE,
    DTYPES,
    assert_close_to_oracle,
    backend_params,
    check_against_oracle,
    dtype_id,
    forward_backward,
)

pytestmark = pytest.mark.usefixtures("poisoned")

REDUCTIONS = ("none", "mean", "sum")
# 0-d, one element, primes, 2^k +- 1 (chunk and block edges), empty, 3-D.
SHAPES = [(), (1,), (7,), (97, 61), (4095,), (8193,), (3, 5, 7), (0,), (0, 3), (2, 10007)]


def _weight(kind: str, shape, g, dtype):
    """A weight/pos_weight in one of the broadcast patterns the kernels read in place (full,
    per-feature, per-row, scalar) or one they materialise (gap: (A, 1, C) for (A, B, C))."""
    if kind == "none":
        return None
    if kind == "full":
        s = shape
    elif kind == "feature":
        s = shape[-1:]
    elif kind == "row":
        s = (shape[0],) + (1,) * (len(shape) - 1)
    elif kind == "scalar":
        s = ()
    elif kind == "gap":
        s = (shape[0], 1, shape[2])
    else:
        raise ValueError(kind)
    return (torch.rand(s, generator=g) * 2 + 0.25).to(dtype=dtype, device=DEVICE)


def _inputs(shape, dtype, seed, wkind="none", pwkind="none"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype=dtype, device=DEVICE)
    y = torch.rand(shape, generator=g).to(dtype=dtype, device=DEVICE)
    return x, y, _weight(wkind, shape, g, dtype), _weight(pwkind, shape, g, dtype)


def _ours(backend, reduction):
    def fn(x, y, w, pw):
        with hpml_ops.use_backend(backend):
            return hpml_ops.binary_cross_entropy_with_logits(x, y, w, reduction, pw)

    return fn


def _torch(reduction):
    return lambda x, y, w, pw: F.binary_cross_entropy_with_logits(
        x, y, w, reduction=reduction, pos_weight=pw
    )


def check_parity(backend, x, y, w, pw, reduction, need=(True, True), seed=0):
    out = check_against_oracle(
        _ours(backend, reduction),
        _torch(reduction),
        (x, y, w, pw),
        (*need, False, False),
        seed=seed,
        names=("input", "target", "weight", "pos_weight"),
    )
    assert out.dtype == y.dtype, f"output dtype {out.dtype}, torch gives {y.dtype}"


def _torch_and_ours(backend, x, y, pw, seed):
    """Loss ('none') and gradients of ours and of torch in the same dtype, for exact cases."""
    args, need = (x, y, None, pw), (True, True, False, False)
    ours = forward_backward(_ours(backend, "none"), args, need, seed)
    ref = forward_backward(_torch("none"), args, need, seed)
    return ours, ref


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params())
def test_parity(backend, dtype, shape, reduction):
    x, y, w, pw = _inputs(shape, dtype, seed=hash((shape, reduction)) % 1000)
    check_parity(backend, x, y, w, pw, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pwkind", ["none", "full", "feature", "row", "scalar"])
@pytest.mark.parametrize("wkind", ["none", "full", "feature", "row", "scalar", "gap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_parity_weights(backend, dtype, wkind, pwkind, reduction):
    shape = (3, 5, 7) if wkind == "gap" else (13, 7)
    x, y, w, pw = _inputs(shape, dtype, 7, wkind, pwkind)
    check_parity(backend, x, y, w, pw, reduction)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["input", "target"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_one_gradient(backend, need):
    x, y, w, pw = _inputs((11, 5), torch.float32, 3, "feature", "feature")
    check_parity(backend, x, y, w, pw, "mean", need=need)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_non_contiguous(backend, reduction):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(13, 9, generator=g) * 3).to(DEVICE).t()  # transposed: (9, 13)
    y = torch.rand(9, 26, generator=g).to(DEVICE)[:, ::2]  # strided slice
    w = torch.rand(26, generator=g).to(DEVICE)[::2]  # strided per-feature weight
    pw = (torch.rand(13, 3, generator=g) * 2).to(DEVICE)[:, 1]  # column of a matrix
    assert not (x.is_contiguous() or y.is_contiguous() or w.is_contiguous())
    check_parity(backend, x, y, w, pw, reduction)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_misaligned_views(backend):
    """Views that start one element into their storage: the CUDA kernels must not take their
    16-byte path; elsewhere the same numbers."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(2 * 1031 + 1, generator=g).to(DEVICE)
    x, y = base[1:1032], torch.rand(1032, generator=g).to(DEVICE)[1:]
    check_parity(backend, x, y, None, None, "none")
    check_parity(backend, x, y, None, None, "sum")


EXTREMES = [1e4, -1e4, math.inf, -math.inf, math.nan, 0.0, 30.0, -30.0, 88.0, -88.0, 1e-7, -17.5]


@pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_extreme_logits(backend, with_pw):
    """+-1e4, +-inf, NaN give exactly what torch gives (NaN where torch has NaN), finite values
    closely; gradients too."""
    x = torch.tensor(EXTREMES * 3, device=DEVICE)
    y = torch.tensor(
        [0.0] * len(EXTREMES) + [1.0] * len(EXTREMES) + [0.5] * len(EXTREMES), device=DEVICE
    )
    pw = torch.full((), 3.0, device=DEVICE) if with_pw else None
    (ours, ograds, _), (ref, rgrads, _) = _torch_and_ours(backend, x, y, pw, 1)
    assert_close_to_oracle(ours, ref, what="loss")
    for o, r in zip(ograds[:2], rgrads[:2], strict=True):
        assert_close_to_oracle(o, r, what="grad")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_large_logits_reduced(backend, reduction):
    """Logits of +-1e4 in a reduction: no overflow, no loss of the small terms."""
    x = torch.tensor([1e4, -1e4, 20.0, -20.0], device=DEVICE)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], device=DEVICE)
    check_parity(backend, x, y, None, None, reduction)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
    ],
    ids=lambda d: f"{dtype_id(d[0])}-{dtype_id(d[1])}",
)
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_mixed_dtypes(backend, dtypes):
    """torch returns the loss in the target's dtype; the gradients come back in each one's dtype."""
    xd, yd = dtypes
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 3, generator=g).to(DEVICE, xd).requires_grad_()
    y = torch.rand(17, 3, generator=g).to(DEVICE, yd).requires_grad_()
    with hpml_ops.use_backend(backend):
        out = hpml_ops.binary_cross_entropy_with_logits(x, y)
    ref = F.binary_cross_entropy_with_logits(x, y)
    assert out.dtype == ref.dtype
    out.backward()
    assert x.grad.dtype == xd and y.grad.dtype == yd
    r = F.binary_cross_entropy_with_logits(x.detach().double(), y.detach().double())
    torch.testing.assert_close(out.double(), r, atol=1e-3, rtol=1e-3)


# ---- gradcheck, opcheck, compile --------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_gradcheck(backend, reduction):
    x, y, w, pw = _inputs((5, 3), torch.float64, 11, "feature", "row")
    x.requires_grad_()
    y.requires_grad_()

    def f(a, b):
        with hpml_ops.use_backend(backend):
            return hpml_ops.binary_cross_entropy_with_logits(a, b, w, reduction, pw)

    assert torch.autograd.gradcheck(f, (x, y))


def _opcheck_samples():
    samples = []
    for red in (0, 1, 2):
        x, y, w, pw = _inputs((6, 4), torch.float32, red, "feature", "row")
        samples.append((x, y, w, pw, red))
        x, y, _, _ = _inputs((5,), torch.float32, 10 + red)
        samples.append((x, y, None, None, red))
    return samples


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_opcheck(backend):
    fwd, bwd = OP.pair(backend)
    for x, y, w, pw, red in _opcheck_samples():
        torch.library.opcheck(fwd, (x.requires_grad_(), y, w, pw, red))
        grad = torch.randn(x.shape if red == 0 else (), device=DEVICE)
        torch.library.opcheck(bwd, (grad, x.detach(), y, w, pw, red, True, True))
        torch.library.opcheck(bwd, (grad, x.detach(), y, w, pw, red, False, True))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_compile_fullgraph(backend):
    """A training-step-like function (module loss, backward) compiles with no graph break and
    gives the eager numbers."""
    torch._dynamo.reset()
    x, y, _, pw = _inputs((16, 5), torch.float32, 4, "none", "feature")
    loss_fn = hpml_ops.nn.BCEWithLogitsLoss(pos_weight=pw)
    lin = torch.nn.Linear(5, 5).to(DEVICE)

    def step(inp, tgt):
        return loss_fn(lin(inp), tgt)

    with hpml_ops.use_backend(backend):
        eager = step(x, y)
        compiled = torch.compile(step, fullgraph=True)(x, y)
        compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    assert lin.weight.grad is not None and lin.weight.grad.isfinite().all()


# ---- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_deterministic(backend, reduction):
    n = (1 << 20) + 3 if backend == "cpp" else (1 << 16) + 3  # many chunks / programs
    x, y, w, pw = _inputs((n,), torch.float32, 8, "full", "scalar")
    f = _ours(backend, reduction)
    a, b = f(x, y, w, pw), f(x, y, w, pw)
    assert torch.equal(a, b)
    if backend == "cpp" and DEVICE == "cpu":
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = f(x, y, w, pw)
            torch.set_num_threads(max(2, prev))
            many = f(x, y, w, pw)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(one, many), f"1 thread {one.item()!r} != many {many.item()!r}"


# ---- empty, 0-d --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_empty(backend):
    x = torch.empty(0, 4, device=DEVICE, requires_grad=True)
    y = torch.empty(0, 4, device=DEVICE)
    assert _ours(backend, "none")(x, y, None, None).shape == (0, 4)
    assert _ours(backend, "sum")(x, y, None, None).item() == 0.0
    m = _ours(backend, "mean")(x, y, None, None)
    assert m.isnan().item()  # torch: the mean of nothing is NaN
    (gx,) = torch.autograd.grad(_ours(backend, "sum")(x, y, None, None), x)
    assert gx.shape == (0, 4)


# ---- bad input ---------------------------------------------------------------------------------


def _bce(*args, **kwargs):
    return hpml_ops.binary_cross_entropy_with_logits(*args, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
def test_bad_inputs(backend):
    x = torch.randn(4, 3, device=DEVICE)
    y = torch.rand(4, 3, device=DEVICE)
    with hpml_ops.use_backend(backend):
        size_msg = (
            r"Target size \(torch.Size\(\[3, 3\]\)\) must be the same as input size "
            r"\(torch.Size\(\[4, 3\]\)\)"
        )
        with pytest.raises(ValueError, match=size_msg):
            _bce(x, y[:3])
        with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
            _bce(x, y, reduction="avg")
        with pytest.raises(RuntimeError, match="floating-point target, got torch.int64"):
            _bce(x, (y > 0.5).long())
        with pytest.raises(RuntimeError, match="floating-point input, got torch.int32"):
            _bce((x > 0).int(), y)
        with pytest.raises(RuntimeError, match=r"pos_weight of shape \(2,\) cannot be broadcast"):
            _bce(x, y, pos_weight=torch.rand(2, device=DEVICE))
        with pytest.raises(RuntimeError, match=r"weight of shape \(5, 4, 3\) cannot be broadcast"):
            _bce(x, y, weight=torch.rand(5, 4, 3, device=DEVICE))
        with pytest.raises(
            RuntimeError, match=rf"expected target on {x.device} \(the input's device\), got meta"
        ):  # noqa: E501
            _bce(x, y.to("meta"))
        with pytest.raises(
            RuntimeError, match="not differentiable with respect to argument 'weight'"
        ):
            _bce(x, y, weight=torch.rand(3, device=DEVICE, requires_grad=True))
        with pytest.raises(TypeError, match="target must be a Tensor"):
            _bce(x, [0.0, 1.0])


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_bad_inputs_direct_op_call(backend):
    """The registered ops check their own arguments: a direct torch.ops call with bad input gets
    an error, not a crash."""
    fwd, _ = OP.pair(backend)
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises((RuntimeError, ValueError), match="Target size|must be the same"):
        fwd(x, torch.rand(3, 3, device=DEVICE), None, None, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(x, torch.rand(4, 3, device=DEVICE, dtype=torch.float64), None, None, 1)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_nan_inf_inputs_propagate(backend):
    """NaN in the input or target gives NaN in the loss and the gradients, as torch does."""
    x = torch.tensor([0.5, math.nan, 1.0], device=DEVICE)
    y = torch.tensor([1.0, 0.0, math.nan], device=DEVICE)
    (ours, ograds, _), (ref, rgrads, _) = _torch_and_ours(backend, x, y, None, 3)
    assert_close_to_oracle(ours, ref, what="loss")
    for o, r in zip(ograds[:2], rgrads[:2], strict=True):
        assert_close_to_oracle(o, r, what="grad")
    s = _ours(backend, "sum")(x, y, None, None)
    assert s.isnan().item()


# ---- the module, autocast ----------------------------------------------------------------------


def test_module_is_a_drop_in():
    pw, w = torch.rand(3) + 0.5, torch.rand(3)
    ours = hpml_ops.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fresh = hpml_ops.nn.BCEWithLogitsLoss(weight=torch.zeros(3), pos_weight=torch.zeros(3))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.pos_weight, pw) and torch.equal(fresh.weight, w)
    x, y = torch.randn(6, 3), torch.rand(6, 3)
    torch.testing.assert_close(ours(x, y), theirs(x, y), atol=1e-5, rtol=1e-6)
    assert hpml_ops.nn.BCEWithLogitsLoss()._buffers == {"weight": None, "pos_weight": None}


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_autocast_runs_in_fp32(backend):
    """Under autocast torch runs BCE with logits in fp32; so do we."""
    amp = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    x = torch.randn(8, 4, device=DEVICE)
    y = torch.rand(8, 4, device=DEVICE)
    lin = torch.nn.Linear(4, 4).to(DEVICE)
    with torch.autocast(DEVICE, dtype=amp):
        logits = lin(x)
        assert logits.dtype == amp
        ref = F.binary_cross_entropy_with_logits(logits, y)
        with hpml_ops.use_backend(backend):
            ours = hpml_ops.binary_cross_entropy_with_logits(logits, y)
            # The registered op alone follows the same policy.
            fwd, _ = OP.pair(backend)
            direct = fwd(logits, y.to(amp), None, None, 1)
    assert ours.dtype == ref.dtype == torch.float32
    assert direct.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
