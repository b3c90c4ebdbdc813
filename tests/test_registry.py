"""The one-list, one-contract machinery: the constants of the two languages agree, every op
family is complete (schema, Triton launchers, C++ kernels, autograd, oracle, tests, benchmark),
the Triton ops carry the C++ ops' schemas, and every contract says the same thing in C++ and in
Python: a bad argument gets the same exception with the same words from the C++ op, from the
Triton op and from each public function whatever the backend (the public functions call the C++
op straight away and let its error through)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch

import hpml_ops
from hpml_ops import constants
from hpml_ops.ops import _registry
from hpml_ops.ops.schema import FAMILIES, SCHEMAS
from tests.helpers import DEVICE, backend_params

ROOT = Path(__file__).resolve().parent.parent
HAS_CPP = hpml_ops._backend.HAS_EXTENSION
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")


@needs_cpp
def test_constants_agree_with_the_cpp_header():
    c = hpml_ops._backend._C.CONSTANTS
    assert c["activations"] == constants.ACTIVATIONS
    codes = constants.ACTIVATIONS
    assert {n for n, v in c["act_uses_mask"].items() if v} == {
        n for n in codes if codes[n] in constants.ACT_USES_MASK
    }
    assert {n for n, v in c["act_uses_output"].items() if v} == {
        n for n in codes if codes[n] in constants.ACT_USES_OUTPUT
    }
    assert c["reductions"] == constants.REDUCTIONS
    assert set(constants.BN_ACTIVATIONS.values()) == {codes["none"], codes["relu"]}
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    assert c["acc_dtypes"] == {str(d): str(constants.acc_dtype(d)) for d in dtypes}
    assert c["mask_bits_per_byte"] == constants.MASK_BITS_PER_BYTE
    for n in (0, 1, 7, 8, 9, 129):
        assert constants.mask_row_bytes(n) == -(-n // c["mask_bits_per_byte"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_complete(family):
    """What a new op family must bring, found from the one list in schema.py."""
    op = _registry.REGISTERED[family]
    assert op.name == family and op.reference is getattr(hpml_ops.reference, family)
    kernels = importlib.import_module(f"hpml_ops.kernels.{family}")
    assert callable(kernels.aot_specs), f"kernels/{family}.py: aot_specs() for gpu-build-check"
    for name, schema in SCHEMAS[family].items():
        # The Triton launcher of each op takes the schema's arguments, by the same names.
        launcher = getattr(kernels, name)
        args = schema.split(")")[0].strip("(").split(", ")
        names = [a.split(" ")[-1] for a in args if a]
        assert list(inspect.signature(launcher).parameters) == names, name
        triton_op = op.ops["triton"][name]
        assert str(triton_op._schema) == f"hpml::{name}_triton{schema}"
        if HAS_CPP:
            cpp_op = op.ops["cpp"][name]
            assert str(cpp_op._schema) == f"hpml::{name}{schema}"
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hpml::{name}", "CPU")
            if hpml_ops._backend._C.WITH_CUDA:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hpml::{name}", "CUDA")
    if HAS_CPP:  # the forward's autograd formula in C++
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hpml::{family}", "Autograd")
    for path in (
        f"csrc/{family}.cpp",
        f"csrc/{family}.h",
        f"csrc/cuda/{family}.cu",
        f"tests/test_{family}.py",
        f"benchmarks/bench_{family}.py",
    ):
        assert (ROOT / path).is_file(), f"family {family}: {path} is missing"


def test_generated_header_matches_the_list():
    """The build's C++ list is the one in schema.py (setup.py rewrites it on every build)."""
    header = ROOT / "build" / "generated" / "hpml_schemas.h"
    if not header.exists():
        pytest.skip("no build/generated/hpml_schemas.h: the extension was not built here")
    from hpml_ops.ops.schema import cpp_header

    assert header.read_text() == cpp_header()


# ---- the contracts ------------------------------------------------------------------------------


def _raised(fn):
    """(exception type, message) of what ``fn()`` raises."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the comparison is the test)
        return type(e), str(e)
    raise AssertionError("no exception raised")


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


# (name, function of the public API, arguments), each with one bad argument.
PUBLIC_CASES = {
    "linear_act: in_features": (hpml_ops.linear_act, lambda: (_t(4, 6), _t(3, 5))),
    "linear_act: 1-D weight": (hpml_ops.linear_act, lambda: (_t(4, 5), _t(5))),
    "linear_act: 3-D weight": (hpml_ops.linear_act, lambda: (_t(4, 5), _t(1, 3, 5))),
    "linear_act: bias size": (hpml_ops.linear_act, lambda: (_t(4, 5), _t(3, 5), _t(4))),
    "linear_act: weight dtype": (
        hpml_ops.linear_act,
        lambda: (_t(4, 5), _t(3, 5, dtype=torch.float64)),
    ),
    "linear_act: bias dtype": (
        hpml_ops.linear_act,
        lambda: (_t(4, 5), _t(3, 5), _t(3, dtype=torch.float64)),
    ),
    "linear_act: integer input": (
        hpml_ops.linear_act,
        lambda: (_t(4, 5, dtype=torch.int64), _t(3, 5)),
    ),
    "linear_act: integer weight": (
        hpml_ops.linear_act,
        lambda: (_t(4, 5), _t(3, 5, dtype=torch.int64)),
    ),
    "linear_act: weight device": (hpml_ops.linear_act, lambda: (_t(4, 5), _t(3, 5, device="meta"))),
    "linear_act: 0-d input": (hpml_ops.linear_act, lambda: (_t(), _t(3, 5))),
    "bce: shape": (hpml_ops.binary_cross_entropy_with_logits, lambda: (_t(4, 3), _t(3, 3))),
    "bce: integer input and target": (
        hpml_ops.binary_cross_entropy_with_logits,
        lambda: (_t(4, 3, dtype=torch.int32), _t(4, 3, dtype=torch.int32)),
    ),
    "bce: target device": (
        hpml_ops.binary_cross_entropy_with_logits,
        lambda: (_t(4, 3), _t(4, 3, device="meta")),
    ),
    "mlp: layer widths": (hpml_ops.mlp, lambda: (_t(4, 5), [_t(6, 5), _t(2, 7)])),
    "mlp: a layer's dtype": (
        hpml_ops.mlp,
        lambda: (_t(4, 5), [_t(6, 5), _t(2, 6, dtype=torch.float64)]),
    ),
    "mlp: one row in training": (
        lambda x, ws: hpml_ops.mlp(x, ws, batch_norm=True, training=True),
        lambda: (_t(1, 5), [_t(6, 5), _t(2, 6)]),
    ),
    "batch_norm: 1-D input": (hpml_ops.batch_norm, lambda: (_t(5), None, None, None, None, True)),
    "batch_norm: integer input": (
        hpml_ops.batch_norm,
        lambda: (_t(4, 3, dtype=torch.int64), None, None, None, None, True),
    ),
    "batch_norm: running_mean size": (
        hpml_ops.batch_norm,
        lambda: (_t(4, 3), _t(4), _t(3), None, None, True),
    ),
    "batch_norm: weight size": (
        hpml_ops.batch_norm,
        lambda: (_t(4, 3), None, None, _t(5), None, True),
    ),
    "batch_norm: integer weight": (
        hpml_ops.batch_norm,
        lambda: (_t(4, 3), None, None, _t(3, dtype=torch.int64), None, True),
    ),
    "batch_norm: eval without statistics": (
        hpml_ops.batch_norm,
        lambda: (_t(4, 3), None, None, None, None, False),
    ),
    "batch_norm: one value per channel": (
        hpml_ops.batch_norm,
        lambda: (_t(1, 3, 1, 1), None, None, None, None, True),
    ),
    "batch_norm: one row, no channels": (
        hpml_ops.batch_norm,
        lambda: (_t(1, 0), None, None, None, None, True),
    ),
}


@pytest.mark.parametrize("case", list(PUBLIC_CASES))
def test_public_functions_raise_the_same_on_every_backend(case):
    """The cpp backend's error comes from the C++ contract (the op is called first), the others'
    from the Python one: the same exception and words."""
    fn, make = PUBLIC_CASES[case]
    seen = {}
    for b in ("cpp", "triton", "reference"):
        if hpml_ops._backend.unavailable_reason(b, torch.device(DEVICE).type):
            continue
        args = make()
        with hpml_ops.use_backend(b):
            seen[b] = _raised(lambda args=args: fn(*args))
    assert len(set(seen.values())) == 1, seen


def _bn_vectors(c=3):
    return _t(c), _t(c)


def _mlp_bce_args(target=None, weight=None, pos_weight=None, reduction=1):
    """hpml::mlp_bce_with_logits's arguments for a 5-4-2 net on 6 rows."""
    e = _t(0, 0)
    target = _t(6, 2) if target is None else target
    return (_t(6, 5), target, weight, pos_weight, reduction, [_t(4, 5), _t(2, 4)], [e, e],
            [False], [e], [e], [e], [e], True, 1e-5, 1, 0.0)  # fmt: skip


def _mlp_bce_backward_args(grad):
    e = _t(0, 0)
    saved = [_t(6, 4), torch.zeros(6, 1, dtype=torch.uint8), *[_t(0)] * 4, _t(0)]
    return (grad, _t(6, 5), _t(6, 2), None, None, 1, _t(6, 2), [_t(4, 5), _t(2, 4)], [e, e],
            [False], [e], saved, True, 1, 0.0, True, True, [True] * 2, [True] * 2, [True],
            [True])  # fmt: skip


# Direct calls of the ops with one bad argument: (op, arguments).
OP_CASES = {
    "mlp_bce_with_logits: target size": (
        "mlp_bce_with_logits",
        lambda: _mlp_bce_args(target=_t(6, 3)),
    ),
    "mlp_bce_with_logits: reduction": ("mlp_bce_with_logits", lambda: _mlp_bce_args(reduction=5)),
    "mlp_bce_with_logits: pos_weight": (
        "mlp_bce_with_logits",
        lambda: _mlp_bce_args(pos_weight=_t(3)),
    ),
    "mlp_bce_with_logits: weight dtype": (
        "mlp_bce_with_logits",
        lambda: _mlp_bce_args(weight=_t(2, dtype=torch.float64)),
    ),
    "mlp_bce_with_logits_backward: grad": (
        "mlp_bce_with_logits_backward",
        lambda: _mlp_bce_backward_args(_t(2)),
    ),
    "linear_act: 3-D input": ("linear_act", lambda: (_t(2, 4, 5), _t(3, 5), None, 1, 0.0)),
    "linear_act: activation code": ("linear_act", lambda: (_t(4, 5), _t(3, 5), None, 9, 0.0)),
    "linear_act: 0-d bias": ("linear_act", lambda: (_t(4, 5), _t(3, 5), _t(), 1, 0.0)),
    "linear_act: bias dtype": (
        "linear_act",
        lambda: (_t(4, 5), _t(3, 5), _t(3, dtype=torch.float16), 1, 0.0),
    ),
    "linear_act_backward: grad shape": (
        "linear_act_backward",
        lambda: (
            (_t(4, 2), _t(4, 5), _t(3, 5), _t(0), torch.zeros(4, 1, dtype=torch.uint8), 1)
            + (0.0, True, True, True)
        ),
    ),
    "linear_act_backward: mask shape": (
        "linear_act_backward",
        lambda: (
            (_t(4, 3), _t(4, 5), _t(3, 5), _t(0), torch.zeros(4, 2, dtype=torch.uint8), 1)
            + (0.0, True, True, True)
        ),
    ),
    "linear_act_backward: output shape": (
        "linear_act_backward",
        lambda: (
            (_t(4, 3), _t(4, 5), _t(3, 5), _t(4, 2), torch.zeros(0, dtype=torch.uint8), 3)
            + (0.0, True, True, True)
        ),
    ),
    "linear_act_backward: grad dtype": (
        "linear_act_backward",
        lambda: (
            (_t(4, 3, dtype=torch.float64), _t(4, 5), _t(3, 5), _t(0))
            + (torch.zeros(4, 1, dtype=torch.uint8), 1, 0.0, True, True, True)
        ),
    ),
    "bce_with_logits: reduction code": ("bce_with_logits", lambda: (_t(4), _t(4), None, None, 7)),
    "bce_with_logits: target dtype": (
        "bce_with_logits",
        lambda: (_t(4), _t(4, dtype=torch.float64), None, None, 1),
    ),
    "bce_with_logits: weight shape": (
        "bce_with_logits",
        lambda: (_t(4, 3), _t(4, 3), _t(2), None, 1),
    ),
    "bce_with_logits: pos_weight dtype": (
        "bce_with_logits",
        lambda: (_t(4, 3), _t(4, 3), None, _t(3, dtype=torch.float64), 1),
    ),
    "bce_with_logits_backward: grad shape": (
        "bce_with_logits_backward",
        lambda: (_t(3), _t(4), _t(4), None, None, 0, True, True),
    ),
    "bce_with_logits_backward: reduced grad": (
        "bce_with_logits_backward",
        lambda: (_t(2), _t(4), _t(4), None, None, 1, True, True),
    ),
    "batch_norm: activation code": (
        "batch_norm",
        lambda: (_t(4, 3), None, None, None, None, True, 1e-5, 2),
    ),
    "batch_norm: running_var size": (
        "batch_norm",
        lambda: (_t(4, 3), None, None, _t(3), _t(2), False, 1e-5, 0),
    ),
    "batch_norm_backward: grad shape": (
        "batch_norm_backward",
        lambda: (_t(4, 2), _t(4, 3), None, _t(4, 3), *_bn_vectors(), True, 0, True, True, True),
    ),
    "batch_norm_backward: output for relu": (
        "batch_norm_backward",
        lambda: (_t(4, 3), _t(4, 3), None, _t(0), *_bn_vectors(), True, 1, True, True, True),
    ),
    "batch_norm_backward: invstd size": (
        "batch_norm_backward",
        lambda: (_t(4, 3), _t(4, 3), None, _t(4, 3), _t(3), _t(4), True, 0, True, True, True),
    ),
    "batch_norm_stats: 1-D input": ("batch_norm_stats", lambda: (_t(4),)),
    "batch_norm_backward_reduce: mean size": (
        "batch_norm_backward_reduce",
        lambda: (_t(4, 3), _t(4, 3), _t(4, 3), _t(2), 0),
    ),
    "batch_norm_backward_elemt: count": (
        "batch_norm_backward_elemt",
        lambda: (_t(4, 3), _t(4, 3), None, _t(4, 3), *_bn_vectors(), *_bn_vectors(), 0, 0),
    ),
    "batch_norm_backward_elemt: sum_dz size": (
        "batch_norm_backward_elemt",
        lambda: (_t(4, 3), _t(4, 3), None, _t(4, 3), *_bn_vectors(), _t(2), _t(3), 4, 0),
    ),
}


@needs_cpp
@pytest.mark.parametrize("case", list(OP_CASES))
def test_cpp_and_triton_ops_raise_the_same(case):
    """The C++ contract (csrc/<stem>.h) and the Python one (the Triton launcher's and the fake
    kernel's) reject the same arguments with the same exception and words."""
    name, make = OP_CASES[case]
    family = next(f for f in FAMILIES if name in SCHEMAS[f])
    op = _registry.REGISTERED[family]
    args = make()
    cpp = _raised(lambda: op.ops["cpp"][name](*args))
    triton = _raised(lambda: op.ops["triton"][name](*args))
    assert cpp == triton
    with torch._subclasses.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert _raised(lambda: op.spec.fakes[name](*fake_args)) == cpp


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_errors_pass_through_unchanged(backend, monkeypatch):
    """No exception is swallowed and no op runs twice: an error raised inside the op (here an
    internal control-flow exception, as torch.utils.checkpoint's early stop) reaches the caller
    as it was raised, after one call."""

    class Stop(Exception):
        pass

    calls = []

    def failing(*args):
        calls.append(args)
        raise Stop("from inside the op")

    op = _registry.REGISTERED["linear_act"]
    monkeypatch.setitem(op.forward, backend, failing)
    x, w = _t(4, 5), _t(3, 5)
    with hpml_ops.use_backend(backend), pytest.raises(Stop, match="from inside the op"):
        hpml_ops.linear_act(x, w)
    assert len(calls) == 1
