"""The ISA variants of the C++ CPU kernels (csrc/cpu_dispatch.h): each built from the same source,
the one in use chosen at run time from torch's capability (ATEN_CPU_CAPABILITY honoured) and
named by backend_status; every variant this CPU can run gives torch's results (float64 oracle,
the usual tolerance), the same bits on any thread count, and its 1-bit masks in the one layout
every variant reads.

The whole C++ parity suite runs under each variant too: `make test` runs it again with
ATEN_CPU_CAPABILITY set to each variant below the best (tools/test_cpu_variants.py), and
test_forced_variant_is_in_use checks that such a run really runs the variant it asks for."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import hpml_ops
from hpml_ops import _backend, constants
from tests.helpers import check_against_oracle, num_threads

pytestmark = pytest.mark.skipif(
    _backend._C is None or torch.device(_backend._default_device_type()).type != "cpu",
    reason="the CPU kernels' ISA variants need the compiled extension, and a CPU-only session "
    "(the suite runs the CUDA kernels where a GPU is visible)",
)

ORDER = ("DEFAULT", "AVX2", "AVX512")


def _runnable() -> list[str]:
    """The built variants that torch's capability allows, in order."""
    if _backend._C is None:
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    limit = ORDER.index(cap) if cap in ORDER else 0
    return [c for c in _backend._C.cpu_capabilities_built() if ORDER.index(c) <= limit]


RUNNABLE = _runnable()


@pytest.fixture(params=RUNNABLE)
def variant(request):
    _backend._C._force_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        _backend._C._force_cpu_capability(None)


def test_in_use_is_the_best_runnable_and_named():
    assert hpml_ops.cpu_capability() == RUNNABLE[-1]
    status = hpml_ops.backend_status("cpu")["cpp"]
    assert status.startswith(f"available: {RUNNABLE[-1]} CPU kernels (built: ")
    assert torch.backends.cpu.get_cpu_capability() in status


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or bool(os.environ.get("HPML_CPU_ISA")),
    reason="every variant is built on x86-64 unless HPML_CPU_ISA limits the build",
)
def test_every_variant_is_built():
    assert _backend._C.cpu_capabilities_built() == list(ORDER)


def test_forced_variant_is_in_use():
    """ATEN_CPU_CAPABILITY, as tools/test_cpu_variants.py sets it, selects our variant too."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        assert hpml_ops.cpu_capability() == forced.upper()


@pytest.mark.parametrize("name", ORDER)
def test_aten_cpu_capability_is_honoured(name):
    r = subprocess.run(
        [sys.executable, "-c", "import hpml_ops; print(hpml_ops.cpu_capability())"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": name.lower()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # torch itself declines a capability the CPU lacks (then it picks its best).
    expected = name if name in RUNNABLE or name == "DEFAULT" else RUNNABLE[-1]
    assert r.stdout.strip() == expected


def test_forcing_checks_its_argument():
    with pytest.raises(ValueError, match="unknown CPU capability 'SSE9'"):
        _backend._C._force_cpu_capability("SSE9")
    for name in ORDER:
        if name not in RUNNABLE:
            with pytest.raises(ValueError, match=f"{name} kernels would use instructions"):
                _backend._C._force_cpu_capability(name)
    assert hpml_ops.cpu_capability() == RUNNABLE[-1]


# Widths that end a row partway through a vector of every variant (8 and 16 fp32 lanes, 4 and 8
# fp64), and through a byte of the 1-bit masks.
SHAPES = [((37, 53), 29), ((5, 7, 19), 45), ((64, 16), 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_act_in_every_variant(variant, shape, activation, dtype):
    (xs, n) = shape
    g = torch.Generator().manual_seed(11)
    x = torch.randn(xs, generator=g).to(dtype)
    w = (torch.randn(n, xs[-1], generator=g) / xs[-1] ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)

    def ours(x, w, b):
        with hpml_ops.use_backend("cpp"):
            return hpml_ops.linear_act(x, w, b, activation, 0.1)

    def ref(x, w, b):
        return hpml_ops.reference.linear_act(x, w, b, activation, 0.1)

    check_against_oracle(ours, ref, [x, w, b], [True, True, True], names=("x", "w", "b"))


# Run by test_bf16_weight_gradient_transposed_in_every_variant in a fresh process (the
# environment variable is read once per process), for each variant named in argv.
_FORCED_TRANSPOSE = """
import sys, torch, hpml_ops
from hpml_ops import _backend
from tests.helpers import check_against_oracle, num_threads
for variant in sys.argv[1:]:
    _backend._C._force_cpu_capability(variant)
    for (xs, n), act in zip((((77, 45), 33), ((100, 70), 40), ((64, 32), 96), ((5, 3), 1)),
                            ("relu", "none", "tanh", "leaky_relu")):
        g = torch.Generator().manual_seed(xs[0])
        x = torch.randn(xs, generator=g).bfloat16()
        w = (torch.randn(n, xs[1], generator=g) / xs[1] ** 0.5).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()

        def ours(x, w, b):
            with hpml_ops.use_backend("cpp"):
                return hpml_ops.linear_act(x, w, b, act)

        def ref(x, w, b):
            return hpml_ops.reference.linear_act(x, w, b, act)

        check_against_oracle(ours, ref, (x, w, b), (False, True, True), names=("x", "w", "b"))
        grads = []
        for threads in (1, 2):
            with num_threads(threads):
                leaf = w.detach().requires_grad_(True)
                ours(x, leaf, b).backward(torch.ones(xs[0], n, dtype=torch.bfloat16))
                grads.append(leaf.grad)
        assert torch.equal(*grads), (variant, xs, n, act)
    print("ok", hpml_ops.cpu_capability())
"""


def test_bf16_weight_gradient_transposed_in_every_variant():
    """The bf16 weight gradient through dZ^T written out first (csrc/linear_act.cpp,
    transpose_dz_for_dw; on its own only on an AMX CPU for large products), forced for any shape
    with HPML_DW_TRANSPOSE=1, in each variant (the AVX-512 one transposes with ATen's
    transpose_mxn, the others with a plain loop): shapes whose edges cut the 32 x 32 tiles (77
    and 100 rows, 33 and 1 column), dW and db against float64 with torch's bf16 error as the
    yardstick, dW the same bits on 1 and 2 threads."""
    r = subprocess.run(
        [sys.executable, "-c", _FORCED_TRANSPOSE, *RUNNABLE],
        env={**os.environ, "HPML_DW_TRANSPOSE": "1"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [w for v in RUNNABLE for w in ("ok", v)], r.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp16_bf16_relu_epilogue_in_every_variant(variant, dtype):
    """linear_act's fp16/bf16 ReLU forward (csrc/cpu_epilogue.h, relu16_row: on the 16-bit patterns,
    32 lanes on AVX-512 with a masked tail, 16 on AVX2, a scalar loop in DEFAULT and for tails):
    every row a copy of one value (x (M, 1) times a weight of ones), the special values included
    (+-0, +-inf, NaN of either sign, subnormals, the largest finite), at widths across the vector
    and tail sizes: the output is torch's relu of the product (NaN where it is NaN, +-0 equal) and
    the mask has a row's bits set exactly where the product is > 0 or NaN."""
    special = [0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), -float("nan")]
    special += [1e-40 if dtype == torch.bfloat16 else 1e-7, -1e-7, 65504.0, -65504.0, 3.0, -2.5]
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(special), torch.randn(20, generator=g)]).to(dtype).reshape(-1, 1)
    for n in (1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 70, 120, 129):
        w = torch.ones(n, 1, dtype=dtype)
        y, mask = torch.ops.hpml.linear_act(x, w, None, constants.ACTIVATIONS["relu"], 0.0)
        z = (x @ w.t()).float()
        assert torch.equal(y.isnan(), z.isnan()), n
        assert torch.equal(y[~y.isnan()].float(), torch.relu(z)[~z.isnan()]), n
        bits = ((z > 0) | z.isnan()).to(torch.uint8)
        want = torch.zeros(x.shape[0], constants.mask_row_bytes(n) * 8, dtype=torch.uint8)
        want[:, :n] = bits
        weights = 2 ** torch.arange(8, dtype=torch.int32)
        packed = (want.reshape(x.shape[0], -1, 8).int() * weights).sum(-1).to(torch.uint8)
        assert torch.equal(mask, packed), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_in_every_variant(variant, reduction, dtype):
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(41, 29, generator=g) * 4).to(dtype)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), 90.0])
    y = torch.rand(41, 29, generator=g).to(dtype)
    wt = torch.rand(29, generator=g).to(dtype)
    pw = (torch.rand(29, generator=g) * 3).to(dtype)

    def ours(x, y):
        with hpml_ops.use_backend("cpp"):
            return hpml_ops.binary_cross_entropy_with_logits(
                x, y, weight=wt, pos_weight=pw, reduction=reduction
            )

    def ref(x, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            x, y, weight=wt.to(x.dtype), pos_weight=pw.to(x.dtype), reduction=reduction
        )

    # x's infinities give NaN gradients in torch too; compare the finite rows' gradients.
    check_against_oracle(ours, ref, [x[1:], y[1:]], [True, True], names=("input", "target"))
    out = ours(x, y)
    expect = ref(x.double(), y.double())
    assert torch.equal(out.isnan(), expect.isnan()) and torch.equal(out.isinf(), expect.isinf())


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", [(67, 29), (6, 19, 5, 3)], ids=str)
def test_batch_norm_in_every_variant(variant, shape, relu):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=g) * 3 + 1
    c = shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)

    def ours(x, w, b):
        with hpml_ops.use_backend("cpp"):
            return hpml_ops.batch_norm(
                x, None, None, w, b, training=True, activation="relu" if relu else None
            )

    def ref(x, w, b):
        y = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
        return torch.relu(y) if relu else y

    check_against_oracle(ours, ref, [x, w, b], [True, True, True], names=("x", "w", "b"))


def _mlp_step(seed, threads):
    """Forward, backward and the running statistics of a batch-norm MLP on the C++ kernels."""
    g = torch.Generator().manual_seed(seed)
    widths = [23, 45, 17, 3]
    x = torch.randn(301, widths[0], generator=g, requires_grad=True)
    ws = [
        torch.randn(o, i, generator=g).div(i**0.5).requires_grad_()
        for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
    bs = [torch.randn(o, generator=g).requires_grad_() for o in widths[1:]]
    rm, rv = torch.zeros(45), torch.ones(45)
    with num_threads(threads), hpml_ops.use_backend("cpp"):
        out = hpml_ops.mlp(
            x,
            ws,
            bs,
            activation="leaky_relu",
            batch_norm=[True, False],
            running_means=[rm, None],
            running_vars=[rv, None],
            training=True,
        )
        out.square().sum().backward()
    return [out.detach(), x.grad, *(t.grad for t in ws + bs), rm, rv]


@pytest.mark.parametrize("op", ["linear_act", "bce", "batch_norm", "mlp"])
def test_same_bits_on_any_thread_count_in_every_variant(variant, op):
    def run(threads):
        if op == "mlp":
            return _mlp_step(5, threads)
        g = torch.Generator().manual_seed(6)
        with num_threads(threads), hpml_ops.use_backend("cpp"):
            if op == "linear_act":
                x = torch.randn(4099, 67, generator=g, requires_grad=True)
                w = torch.randn(33, 67, generator=g, requires_grad=True)
                y = hpml_ops.linear_act(x, w, None, "relu")
                y.square().sum().backward()
                return [y.detach(), x.grad, w.grad]
            if op == "bce":
                x = torch.randn(300001, generator=g, requires_grad=True)
                t = torch.rand(300001, generator=g)
                loss = hpml_ops.binary_cross_entropy_with_logits(x, t)
                loss.backward()
                return [loss.detach(), x.grad]
            x = torch.randn(20011, 37, generator=g, requires_grad=True)
            w = torch.rand(37, generator=g, requires_grad=True)
            y = hpml_ops.batch_norm(x, None, None, w, None, training=True, activation="relu")
            y.square().sum().backward()
            return [y.detach(), x.grad, w.grad]

    one, two = run(1), run(2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_variants_read_each_others_masks():
    """A ReLU mask written by one variant's forward is read right by another's backward (the
    layout does not depend on the vector width): forward under each, backward under each."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(19, 37, generator=g, requires_grad=True)
    w = torch.randn(53, 37, generator=g, requires_grad=True)
    gy = torch.randn(19, 53, generator=g)
    xd = x.detach().double().requires_grad_()
    (expect,) = torch.autograd.grad(torch.relu(xd @ w.detach().double().T), (xd,), gy.double())
    try:
        for fwd in RUNNABLE:
            for bwd in RUNNABLE:
                _backend._C._force_cpu_capability(fwd)
                with hpml_ops.use_backend("cpp"):
                    y = hpml_ops.linear_act(x, w, None, "relu")
                _backend._C._force_cpu_capability(bwd)
                (gx,) = torch.autograd.grad(y, (x,), gy)
                torch.testing.assert_close(gx.double(), expect, atol=1e-5, rtol=1e-5)
    finally:
        _backend._C._force_cpu_capability(None)


def test_large_outputs_reuse_the_block_freed_last():
    """Outputs of 4 MiB and more come from csrc/cpu_alloc.h's cache: a freed block is handed out
    again for the same size, the one freed last first (still in cache), and its values are
    written afresh (no stale values from the tensor that held it)."""
    if "cpp" not in hpml_ops.available_backends("cpu"):
        pytest.skip("the allocator is the C++ CPU kernels' (cpp backend unavailable)")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1031, 1031, generator=g)  # 4.05 MiB of fp32: rounded up to 6 MiB
    ys = [torch.randn(1031, 1031, generator=g) for _ in range(2)]

    def bce(y):
        with hpml_ops.use_backend("cpp"):
            return hpml_ops.binary_cross_entropy_with_logits(x, y, reduction="none")

    a, b = bce(ys[0]), bce(ys[1])
    pa, pb = a.data_ptr(), b.data_ptr()
    assert pa != pb
    del a
    del b  # freed last
    c = bce(ys[0])
    assert c.data_ptr() == pb
    d = bce(ys[1])
    assert d.data_ptr() == pa
    ref = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(c, ref(x, ys[0], reduction="none"))
    torch.testing.assert_close(d, ref(x, ys[1], reduction="none"))
