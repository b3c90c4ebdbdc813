"""The CUDA kernels of the five batch-norm ops (csrc/cuda/batch_norm.cu) called directly
(torch.ops.hpml.batch_norm, _backward, _stats, _backward_reduce, _backward_elemt), against float64
torch on the same values and against the CPU kernels (the same op on CPU tensors): every dtype,
contiguous and channels last, both walks of the kernels (planes: runs of >= 32 values; rows:
channels last, 2-D and small spatial), the split reduction (many chunks per channel), C = 1,
N = 2, unaligned data (scalar loads), mixed parameter dtypes, a large offset, empty inputs, and
determinism (two runs, the same bits). On a CUDA device the kernels run there; without one they
run on CPU tensors under the CUDA emulator (hpml_ops._C_emu: torch.ops.hpml_emu, the same
sources), at the same shapes except the split-reduction ones, smaller but still split into several
chunks per channel. The end-to-end tests of tests/test_batch_norm.py also run these kernels
(backend "cpp" on a GPU, "cuda-emu" without)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hpml_ops
from tests.helpers import TOL, dtype_id

# The kernels under test: on the GPU (torch.ops.hpml on CUDA tensors), else emulated on the CPU
# (torch.ops.hpml_emu on CPU tensors). The CPU kernels they are compared with: torch.ops.hpml on
# CPU tensors.
EMULATED = not torch.cuda.is_available()
DEV = "cpu" if EMULATED else "cuda"


def _skip_reason() -> str | None:
    if EMULATED:
        return hpml_ops._backend.unavailable_reason("cuda-emu", "cpu", "batch_norm")
    return hpml_ops._backend.unavailable_reason("cpp", "cuda", "batch_norm")


_REASON = _skip_reason()
OPS = torch.ops.hpml_emu if EMULATED and _REASON is None else torch.ops.hpml
CPU = torch.ops.hpml
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.usefixtures("poisoned"),
]

EPS = 1e-5
LOWP = (torch.float16, torch.bfloat16)

# (shape, channels_last). The walk each takes (csrc/cuda/batch_norm.cu): rows for inner < 32
# (2-D, channels last, 1x1 and 3x3 spatial, L = 7), planes otherwise; C = 1 is one run.
SMALL = [
    ((2, 3), False),  # N = 2, rows
    ((97, 5), False),  # prime N, rows, scalar packs (5 columns)
    ((13, 1), False),  # C = 1: one run of 13
    ((5, 3, 7), False),  # rows, 7 columns per channel
    ((8, 3, 3, 3), False),  # rows, 9 columns per channel merged in the finalize
    ((2, 3, 7, 9), False),  # planes, runs of 63 (scalar loads)
    ((2, 3, 7, 9), True),  # channels last: rows
    ((3, 4, 1, 1), False),  # spatial 1x1: rows
    ((4, 8, 16, 16), False),  # planes, 16-byte packs
    ((2, 16, 5, 8), True),  # channels last, 16-byte packs
    ((2, 3, 2, 3, 5), False),  # 5-D
    ((2, 1, 3000), False),  # C = 1, one run of 6000
]
# Many chunks per channel (16384 values a chunk): the split reduction, merged in a fixed order.
SPLIT = [
    ((65536, 256), False),  # rows, 512 row chunks
    ((256, 64, 56, 56), False),  # planes, 49 chunks per channel
    ((32, 64, 56, 56), True),  # channels last, rows
    ((3, 2, 300, 301), False),  # planes, few channels
]
if EMULATED:  # the same walks, sizes an emulator runs in a second
    SPLIT = [
        ((20000, 3), False),  # rows, 5 row chunks
        ((2, 2, 100, 100), False),  # planes, 2 chunks per channel
        ((8, 4, 40, 64), True),  # channels last, rows, 5 row chunks
        ((3, 2, 150, 151), False),  # planes, few channels, 3 chunks per channel
    ]
LARGE_OFFSET = [(16, 3, 9, 11), (8, 3, 48, 48) if EMULATED else (64, 3, 64, 64)]


def _id(case):
    shape, cl = case
    return "x".join(map(str, shape)) + ("-cl" if cl else "")


def _make(shape, dtype, seed, channels_last=False, offset=0.0, scale=1.0, pdt=None):
    """x on the GPU; weight, bias, running stats in fp32 for fp16/bf16 input (torch's mixed
    precision), else in the input's dtype (or `pdt`)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64, device=DEV) * scale + offset
    x = x.to(dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    pdt = pdt or (torch.float32 if dtype in LOWP else dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64, device=DEV) + 0.5).to(pdt)
    b = torch.randn(c, generator=g, dtype=torch.float64, device=DEV).to(pdt)
    rm = torch.randn(c, generator=g, dtype=torch.float64, device=DEV).to(pdt)
    rv = (torch.rand(c, generator=g, dtype=torch.float64, device=DEV) + 0.5).to(pdt)
    return x, w, b, rm, rv


def _dims(x):
    return [d for d in range(x.dim()) if d != 1]


def _bc(v, x):
    """A per-channel vector shaped to broadcast against x."""
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def _oracle_stats(x):
    """float64 (mean, biased var) per channel."""
    x64 = x.double()
    return x64.mean(_dims(x)), x64.var(_dims(x), unbiased=False)


def _check(ours, ref64, dtype, what):
    """fp32/fp64 by the tolerance table; fp16/bf16: the exact value rounded to the dtype, within
    one ulp (the arithmetic is fp32)."""
    o = ours.detach().double()
    r = ref64.detach().double().to(o.device)
    assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)}"
    if dtype in LOWP:
        eps = torch.finfo(dtype).eps
        atol = 1e-5 * max(1.0, r.abs().max().item() if r.numel() else 1.0)
        torch.testing.assert_close(o, r, atol=atol, rtol=eps, msg=lambda m: f"{what}: {m}")
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_sum(ours, ref64, terms64, x, what, scale=None):
    """A per-channel sum of `terms64` (x's shape) computed with fp32 (fp64) accumulators, against
    the float64 sum `ref64` (times `scale`): the table's tolerance plus 32 eps sqrt(sum t^2), the
    size of the rounding of n terms of mixed sign (a missing or wrong term is ~ |t|, far above)."""
    eps = torch.finfo(_stats_dtype(x.dtype)).eps
    o = ours.detach().double()
    r = ref64.detach().double()
    assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)}"
    atol, rtol = TOL[_stats_dtype(x.dtype)]
    if ours.dtype in LOWP:  # the result rounded to fp16/bf16
        rtol = torch.finfo(ours.dtype).eps
    rounding = 32 * eps * terms64.double().square().sum(_dims(x)).sqrt()
    if scale is not None:
        rounding = rounding * scale.double().abs()
    err = (o - r).abs()
    bound = atol + rtol * r.abs() + rounding
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3e}, worst excess "
        f"{(err - bound).max().item():.3e} over the bound"
    )


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd(x, w, b, rm, rv, training, act):
    return OPS.batch_norm(x, w, b, rm, rv, training, EPS, act)


def _fwd_cpu(x, w, b, rm, rv, training, act):
    return CPU.batch_norm(x, w, b, rm, rv, training, EPS, act)


def _cpu(*ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def _check_forward(x, w, b, rm, rv, training, act):
    dtype = x.dtype
    out, mean, invstd, var = _fwd(x, w, b, rm, rv, training, act)
    sdt = _stats_dtype(dtype)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert out.stride() == x.stride() or x.dim() == 2, "output layout differs from the input's"
    for t in (mean, invstd):
        assert t.dtype == sdt and t.shape == (x.shape[1],)
    assert var.dtype == sdt and var.shape == ((x.shape[1],) if training else (0,))
    if training:
        m64, v64 = _oracle_stats(x)
        n = x.numel() // x.shape[1]
        _check(mean, m64, sdt, "mean")
        _check(invstd, (v64 + EPS).rsqrt(), sdt, "invstd")
        _check(var, v64 * n / (n - 1), sdt, "var (unbiased)")
    else:
        v64 = rv.to(sdt).double()
        torch.testing.assert_close(mean.double(), rm.to(sdt).double(), atol=0, rtol=0)
        _check(invstd, (v64 + EPS).rsqrt(), sdt, "invstd")
    # The output from the statistics the op used: isolates the elementwise pass.
    x64 = x.double()
    ref = (x64 - _bc(mean.double(), x)) * _bc(invstd.double() * w.double(), x) + _bc(b.double(), x)
    if act == 1:
        ref = ref.clamp_min(0)
    _check(out, ref, dtype, "output")
    # The CPU kernels on the same values.
    c_out, c_mean, c_invstd, c_var = _fwd_cpu(*_cpu(x, w, b, rm, rv), training, act)
    _check(mean, c_mean.double(), sdt, "mean vs CPU")
    _check(invstd, c_invstd.double(), sdt, "invstd vs CPU")
    _check(var, c_var.double(), sdt, "var vs CPU")
    return out, mean, invstd


def _bwd_oracle(g, x, w, out, mean, invstd, training, act):
    """float64 (dx, dw, db) from the statistics given, as the op computes them, and the terms of
    the sums (dz, dz (x - mean))."""
    g64, x64 = g.double(), x.double()
    dz = torch.where(out > 0, g64, 0.0) if act == 1 else g64
    m, s = _bc(mean.double(), x), _bc(invstd.double(), x)
    xmu = x64 - m
    sdz, sdzx = dz.sum(_dims(x)), (dz * xmu).sum(_dims(x))
    n = x.numel() // x.shape[1]
    wv = _bc(w.double(), x)
    if training:
        dx = (dz - _bc(sdz, x) / n - xmu * s * s * _bc(sdzx, x) / n) * wv * s
    else:
        dx = dz * wv * s
    return dx, sdzx * invstd.double(), sdz, dz, dz * xmu


def _check_backward(x, w, out, mean, invstd, training, act, contiguous_grad=True):
    dtype = x.dtype
    gen = torch.Generator(device=DEV).manual_seed(1)
    # Contiguous: for channels-last x another layout than the input's (copied by the op).
    g = torch.randn(x.shape, generator=gen, device=DEV).to(dtype)
    if not contiguous_grad:
        g = g.movedim(1, -1).contiguous().movedim(-1, 1)
    saved = out if act == 1 else out.new_empty((0,))
    dx, dw, db = OPS.batch_norm_backward(
        g, x, w, saved, mean, invstd, training, act, True, True, True
    )
    assert dx.shape == x.shape and dx.dtype == dtype and dx.stride() == out.stride()
    assert dw.dtype == w.dtype and db.dtype == w.dtype
    rdx, rdw, rdb, t_dz, t_dzx = _bwd_oracle(g, x, w, out, mean, invstd, training, act)
    _check(dx, rdx, dtype, "grad_input")
    _check_sum(dw, rdw, t_dzx, x, "grad_weight", scale=invstd)
    _check_sum(db, rdb, t_dz, x, "grad_bias")
    cdx, cdw, cdb = CPU.batch_norm_backward(
        *_cpu(g, x, w, saved, mean, invstd), training, act, True, True, True
    )
    _check(dx, cdx.double(), dtype, "grad_input vs CPU")
    _check_sum(dw, cdw.double().to(dw.device), t_dzx, x, "grad_weight vs CPU", scale=invstd)
    _check_sum(db, cdb.double().to(db.device), t_dz, x, "grad_bias vs CPU")
    # Only what is asked for.
    dx2, dw2, db2 = OPS.batch_norm_backward(
        g, x, w, saved, mean, invstd, training, act, True, False, False
    )
    assert dw2.numel() == 0 and db2.numel() == 0
    assert torch.equal(dx2, dx)
    return g


@pytest.mark.parametrize("act", [0, 1], ids=["none", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", SMALL, ids=_id)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=dtype_id
)
def test_forward_backward(dtype, case, training, act):
    shape, cl = case
    x, w, b, rm, rv = _make(shape, dtype, sum(shape), channels_last=cl)
    out, mean, invstd = _check_forward(x, w, b, rm, rv, training, act)
    _check_backward(x, w, out, mean, invstd, training, act)


@pytest.mark.parametrize("case", SPLIT, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_split_reduction(dtype, case):
    shape, cl = case
    x, w, b, rm, rv = _make(shape, dtype, 5, channels_last=cl)
    out, mean, invstd = _check_forward(x, w, b, rm, rv, True, 1)
    # Channels last: grad in the input's layout (no copy); the small cases pass it contiguous.
    _check_backward(x, w, out, mean, invstd, True, 1, contiguous_grad=not cl)


def test_no_affine():
    x, _, _, rm, rv = _make((6, 5, 11), torch.float32, 3)
    out, mean, invstd, _ = _fwd(x, None, None, rm, rv, True, 0)
    ref = F.batch_norm(x.double(), None, None, None, None, True, 0.0, EPS)
    _check(out, ref, torch.float32, "output")
    dx, dw, db = OPS.batch_norm_backward(
        torch.ones_like(x), x, None, out.new_empty((0,)), mean, invstd, True, 0, True, True, True
    )
    assert dw.dtype == x.dtype and db.dtype == x.dtype
    _check(db, torch.full((5,), 66.0, dtype=torch.float64), torch.float32, "grad_bias")
    _check(dx, torch.zeros_like(x, dtype=torch.float64), torch.float32, "grad_input")


def test_mixed_parameter_dtypes_rejected():
    """torch's rule (one dtype for weight, bias and statistics: the input's, or float32 for
    fp16/bf16 input): the CUDA op rejects weight bf16, bias fp16, running stats fp64 with an fp32
    input before any kernel runs, in the CPU op's words (the allowed fp32 parameters of fp16/bf16
    input are what `_make` gives every low-precision test above)."""
    x, w, b, rm, rv = _make((7, 6, 5, 7), torch.float32, 11)
    w, b, rm, rv = w.bfloat16(), b.half(), rm.double(), rv.double()
    for training in (True, False):
        msgs = []
        for fwd, args in ((_fwd, (x, w, b, rm, rv)), (_fwd_cpu, _cpu(x, w, b, rm, rv))):
            with pytest.raises(RuntimeError, match="of one dtype, the input's") as err:
                fwd(*args, training, 1)
            msgs.append(str(err.value).splitlines()[0])
        assert msgs[0] == msgs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_unaligned(dtype):
    """Data that starts 1 element past an aligned address: the scalar (not 16-byte) loads."""
    for shape in ((33, 8), (4, 8, 8, 8)):
        n = torch.Size(shape).numel()
        base = torch.randn(n + 1, device=DEV).to(dtype)
        x = base[1:].view(shape)
        w = torch.rand(shape[1], device=DEV) + 0.5
        b = torch.randn(shape[1], device=DEV)
        if dtype == torch.float64:
            w, b = w.double(), b.double()
        out, mean, invstd = _check_forward(x, w, b, None, None, True, 1)
        _check_backward(x, w, out, mean, invstd, True, 1)


SYNC_CASES = [
    pytest.param(dt, case, id=f"{dtype_id(dt)}-{_id(case)}")
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for case in SMALL[:3] + SMALL[5:8]
] + [
    pytest.param(dt, case, id=f"{dtype_id(dt)}-{_id(case)}")
    for dt in (torch.float32, torch.bfloat16)
    for case in SPLIT[:2]
]


@pytest.mark.parametrize("dtype, case", SYNC_CASES)
def test_stats_and_sync_pieces(dtype, case):
    """batch_norm_stats, batch_norm_backward_reduce and batch_norm_backward_elemt: the pieces of
    SyncBatchNorm. The elementwise step with the sums of the whole batch is the training dx."""
    shape, cl = case
    x, w, b, _, _ = _make(shape, dtype, 21, channels_last=cl)
    sdt = _stats_dtype(dtype)
    mean, var = OPS.batch_norm_stats(x)
    assert mean.dtype == sdt and var.dtype == sdt
    m64, v64 = _oracle_stats(x)
    _check(mean, m64, sdt, "stats mean")
    _check(var, v64, sdt, "stats var")
    c_mean, c_var = CPU.batch_norm_stats(x.cpu())
    _check(mean, c_mean.double(), sdt, "stats mean vs CPU")
    _check(var, c_var.double(), sdt, "stats var vs CPU")

    invstd = (var.double() + EPS).rsqrt().to(sdt)
    z = (x.to(sdt) - _bc(mean, x)) * _bc(invstd * w.to(sdt), x) + _bc(b.to(sdt), x)
    out = F.relu(z).to(dtype)
    gen = torch.Generator(device=DEV).manual_seed(2)
    g = torch.randn(x.shape, generator=gen, device=DEV).to(dtype)
    for act in (0, 1):
        saved = out if act == 1 else out.new_empty((0,))
        sdz, sdzx = OPS.batch_norm_backward_reduce(g, x, saved, mean, act)
        assert sdz.dtype == sdt and sdzx.dtype == sdt
        dz = torch.where(out > 0, g.double(), 0.0) if act == 1 else g.double()
        r_sdz = dz.sum(_dims(x))
        t_dzx = dz * (x.double() - _bc(mean.double(), x))
        r_sdzx = t_dzx.sum(_dims(x))
        _check_sum(sdz, r_sdz, dz, x, "sum_dz")
        _check_sum(sdzx, r_sdzx, t_dzx, x, "sum_dz_xmu")
        c_sdz, c_sdzx = CPU.batch_norm_backward_reduce(*_cpu(g, x, saved, mean), act)
        _check_sum(sdz, c_sdz.double().to(sdz.device), dz, x, "sum_dz vs CPU")
        _check_sum(sdzx, c_sdzx.double().to(sdz.device), t_dzx, x, "sum_dz_xmu vs CPU")

        # As if this were one of 3 processes with the same batch: sums and count 3x.
        n = 3 * (x.numel() // x.shape[1])
        dx = OPS.batch_norm_backward_elemt(g, x, w, saved, mean, invstd, 3 * sdz, 3 * sdzx, n, act)
        assert dx.dtype == dtype and dx.stride() == x.stride()
        s = _bc(invstd.double(), x)
        xmu = x.double() - _bc(mean.double(), x)
        sdz3, sdzx3 = _bc(3 * sdz.double(), x), _bc(3 * sdzx.double(), x)
        ref = (dz - sdz3 / n - xmu * s * s * sdzx3 / n) * _bc(w.double(), x) * s
        _check(dx, ref, dtype, "backward_elemt")
        c_dx = CPU.batch_norm_backward_elemt(
            *_cpu(g, x, w, saved, mean, invstd, 3 * sdz, 3 * sdzx), n, act
        )
        _check(dx, c_dx.double(), dtype, "backward_elemt vs CPU")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", LARGE_OFFSET, ids=str)
def test_large_offset(shape, channels_last):
    """Mean 1e4, std 1e-2 in fp32: the shifted sums keep the variance (E[x^2] - E[x]^2 gives 0 or
    negative values here); the larger shape splits the reduction into chunks."""
    x, w, b, rm, rv = _make(shape, torch.float32, 6, channels_last, offset=1e4, scale=1e-2)
    var = x.double().var(dim=_dims(x), unbiased=True)
    out, mean, invstd, bvar = _fwd(x, w, b, rm, rv, True, 0)
    torch.testing.assert_close(bvar.double(), var, atol=0, rtol=1e-4)
    s_mean, s_var = OPS.batch_norm_stats(x)
    n = x.numel() // x.shape[1]
    torch.testing.assert_close(s_var.double(), var * (n - 1) / n, atol=0, rtol=1e-4)
    # The output is bounded by the mean stored in fp32 (ulp(1e4) ~ 1e-3 = 0.1 std), as torch's
    # own fp32 batch norm is: ours may be no worse than torch's, or than that rounding.
    ref = F.batch_norm(x.double(), None, None, w.double(), b.double(), True)
    torch_err = (F.batch_norm(x, None, None, w, b, True).double() - ref).abs().max().item()
    ulp = torch.finfo(torch.float32).eps * mean.double().abs()
    rounding = (0.5 * ulp * invstd.double() * w.double().abs()).max().item() * 1.01 + 1e-3
    assert (out.double() - ref).abs().max().item() <= max(torch_err, rounding)


@pytest.mark.parametrize("case", [SPLIT[0], SPLIT[1], SPLIT[2], SMALL[4]], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_deterministic(dtype, case):
    """Every op twice on the same inputs: the same bits (fixed chunks, fixed merge order)."""
    shape, cl = case
    x, w, b, rm, rv = _make(shape, dtype, 8, channels_last=cl)
    g = torch.randn_like(x)

    def run():
        out, mean, invstd, var = _fwd(x, w, b, rm, rv, True, 1)
        dx, dw, db = OPS.batch_norm_backward(g, x, w, out, mean, invstd, True, 1, True, True, True)
        sm, sv = OPS.batch_norm_stats(x)
        sdz, sdzx = OPS.batch_norm_backward_reduce(g, x, out, mean, 1)
        dxe = OPS.batch_norm_backward_elemt(
            g, x, w, out, mean, invstd, sdz, sdzx, x.numel() // x.shape[1], 1
        )
        return out, mean, invstd, var, dx, dw, db, sm, sv, sdz, sdzx, dxe

    a, c = run(), run()
    for p, q in zip(a, c, strict=True):
        assert torch.equal(p, q)


def test_empty_inputs():
    """An empty batch: the CPU kernels' statistics (mean 0, invstd 1/sqrt(eps), var 0), zero
    weight/bias gradients, empty outputs; no channels: empty everything."""
    for shape in ((0, 3, 4), (2, 3, 0)):
        x, w, b, rm, rv = _make(shape, torch.float32, 9)
        got = _fwd(x, w, b, rm, rv, True, 1)
        want = _fwd_cpu(*_cpu(x, w, b, rm, rv), True, 1)
        for o, c in zip(got, want, strict=True):
            assert o.shape == c.shape and o.dtype == c.dtype
            assert torch.equal(o.cpu(), c)
        dx, dw, db = OPS.batch_norm_backward(
            torch.empty_like(x), x, w, got[0], got[1], got[2], True, 1, True, True, True
        )
        assert dx.shape == x.shape
        assert torch.equal(dw.cpu(), torch.zeros(3)) and torch.equal(db.cpu(), torch.zeros(3))
        sm, sv = OPS.batch_norm_stats(x)
        assert torch.equal(sm.cpu(), torch.zeros(3)) and torch.equal(sv.cpu(), torch.zeros(3))
    x = torch.empty(4, 0, 3, device=DEV)
    out, mean, invstd, var = _fwd(x, None, None, None, None, True, 0)
    assert out.shape == x.shape and mean.shape == (0,) and var.shape == (0,)
    dx, dw, db = OPS.batch_norm_backward(x, x, None, x, mean, invstd, True, 0, True, True, True)
    assert dx.shape == x.shape and dw.shape == (0,)


def test_bad_inputs():
    x, w, b, rm, rv = _make((4, 3, 5), torch.float32, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _fwd(torch.randn(1, 3, device=DEV), None, None, None, None, True, 0)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        _fwd(x, w[:2], b, rm, rv, True, 0)
    with pytest.raises(RuntimeError, match="expected weight on"):
        _fwd(x, w.to("meta"), b, rm, rv, True, 0)
    with pytest.raises(RuntimeError, match="floating-point input"):
        _fwd(x.int(), None, None, None, None, True, 0)
    with pytest.raises(RuntimeError, match="mean should contain 3 elements"):
        OPS.batch_norm_backward(x, x, w, x, rm[:2], rv, True, 0, True, True, True)
    with pytest.raises(RuntimeError, match="count must be positive"):
        OPS.batch_norm_backward_elemt(x, x, w, x, rm, rv, rm, rm, 0, 0)
