"""PyTorch's own test samples, a suite nobody here wrote, run through our public functions and
modules on every backend: the OpInfo samples (``op_db``) of the functions we replace, and the
ModuleInfo samples (``module_db``) of the modules we replace, through ``hpml_ops.convert``.

Each sample is compared with torch run in float64 on the same values (and, in fp16/bf16, with
torch's own error in that dtype), forward and every gradient the sample asks for, by the
tolerance table of tests/helpers; batch norm's running statistics too; modules also by their
buffers and ``state_dict``. The activations ``linear_act`` fuses are checked through a 1 x 1
identity layer (``act(x @ [[1]])`` is ``act(x)`` exactly), whatever the sample's shape.

Where torch accepts a dtype we do not (integer and complex ``linear``), ours must raise an error
naming the argument and the dtype. Torch's own error inputs (``module_error_inputs_func``) must
raise the same exception type with a message that matches torch's.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import hpml_ops

from . import helpers
from .helpers import DEVICE, DTYPES, backend_params, dtype_id, up

assert_close_to_oracle = helpers.assert_close_to_oracle
check_against_oracle = helpers.check_against_oracle


def _opinfo(name: str, variant: str = ""):
    return next(o for o in op_db if o.name == name and o.variant_test_name == variant)


def _samples(opinfo, dtype):
    torch.manual_seed(0)
    return list(opinfo.sample_inputs(DEVICE, dtype, requires_grad=True))


def _tensors(sample) -> list:
    """The sample's tensors (input, positional, keyword) in call order."""
    vals = [sample.input, *sample.args, *sample.kwargs.values()]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _call(fn, sample, tensors):
    """``fn(input, *args, **kwargs)`` of the sample with its tensors replaced by ``tensors``."""
    it = iter(tensors)

    def sub(v):
        return next(it) if isinstance(v, torch.Tensor) else v

    inp = sub(sample.input)
    args = [sub(a) for a in sample.args]
    kwargs = {k: sub(v) for k, v in sample.kwargs.items()}
    return fn(inp, *args, **kwargs)


def _check_sample(ours, theirs, sample, what: str):
    ts = [t.detach() for t in _tensors(sample)]
    need = [t.requires_grad for t in _tensors(sample)]
    try:
        check_against_oracle(
            lambda *a: _call(ours, sample, a), lambda *a: _call(theirs, sample, a), ts, need
        )
    except AssertionError as e:
        shapes = [tuple(t.shape) for t in ts]
        raise AssertionError(f"{what} (tensors {shapes}, {sample.kwargs}):\n{e}") from None


def _with_backend(fn, backend):
    def run(*args, **kwargs):
        with hpml_ops.use_backend(backend):
            return fn(*args, **kwargs)

    return run


# ---- op_db -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_linear_samples(backend, dtype):
    info = _opinfo("nn.functional.linear")
    ours = _with_backend(lambda x, w, b=None: hpml_ops.linear_act(x, w, b, "none"), backend)
    for i, s in enumerate(_samples(info, dtype)):
        _check_sample(ours, F.linear, s, f"sample {i}")


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64], ids=dtype_id
)
@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_linear_samples_of_dtypes_we_do_not_take(backend, dtype):
    """torch's linear takes integer and complex tensors; ours says it does not, naming the
    argument and the dtype, on every sample."""
    info = _opinfo("nn.functional.linear")
    assert dtype in info.supported_dtypes(DEVICE)
    with hpml_ops.use_backend(backend):
        for s in info.sample_inputs(DEVICE, dtype, requires_grad=False):
            F.linear(s.input, *s.args, **s.kwargs)  # torch takes it
            with pytest.raises(RuntimeError, match=rf"floating-point input, got {dtype}$"):
                hpml_ops.linear_act(s.input, *s.args, **s.kwargs, activation="none")


_ACTIVATIONS = {
    "nn.functional.relu": "relu",
    "nn.functional.leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(_ACTIVATIONS))
@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_activation_samples(backend, name, dtype):
    """Each activation sample through a 1 x 1 identity layer: ``act(x @ [[1]])``, reshaped back."""
    info = _opinfo(name)
    act = _ACTIVATIONS[name]

    def ours(x, *args, **kwargs):
        slope = kwargs.get("negative_slope", args[0] if args else 0.01)
        one = torch.ones(1, 1, dtype=x.dtype, device=x.device)
        y = hpml_ops.linear_act(x.reshape(-1, 1), one, None, act, slope)
        return y.reshape(x.shape)

    for i, s in enumerate(_samples(info, dtype)):
        _check_sample(_with_backend(ours, backend), info.op, s, f"sample {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params(op="bce_with_logits"))
def test_bce_with_logits_samples(backend, dtype):
    info = _opinfo("nn.functional.binary_cross_entropy_with_logits")
    ours = _with_backend(hpml_ops.binary_cross_entropy_with_logits, backend)
    for i, s in enumerate(_samples(info, dtype)):
        _check_sample(ours, F.binary_cross_entropy_with_logits, s, f"sample {i}")


def _bn_args(sample):
    """(input, running_mean, running_var, weight, bias, training, momentum, eps) of a sample of
    ``F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
    momentum=0.1, eps=1e-5)``."""
    names = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = dict(zip(names, (None, None, None, None, False, 0.1, 1e-5), strict=True))
    defaults.update(zip(names, sample.args, strict=False))  # the given ones
    defaults.update(sample.kwargs)
    return (sample.input, *(defaults[n] for n in names))


@pytest.mark.parametrize("variant", ["", "without_cudnn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_batch_norm_samples(backend, dtype, variant):
    info = _opinfo("nn.functional.batch_norm", variant)
    for i, s in enumerate(_samples(info, dtype)):
        _check_batch_norm_sample(backend, s, f"sample {i}")


def _check_batch_norm_sample(backend, sample, what: str) -> None:
    """Output and gradients from fresh copies of the running statistics each run; then the
    statistics one call leaves behind, against torch's in float64 (and torch's own in the
    sample's dtype)."""
    x, rm, rv, w, b, training, momentum, eps = _bn_args(sample)
    what += f" (input {tuple(x.shape)}, training={training}, momentum={momentum})"

    def run(fn):
        def call(x, w, b):
            rm_, rv_ = (None if t is None else t.to(x.dtype, copy=True) for t in (rm, rv))
            return fn(x, rm_, rv_, w, b, training, momentum, eps)

        return call

    ts = [None if t is None else t.detach() for t in (x, w, b)]
    need = [t is not None and t.requires_grad for t in (x, w, b)]
    ours = _with_backend(hpml_ops.batch_norm, backend)
    try:
        check_against_oracle(run(ours), run(F.batch_norm), ts, need)
    except AssertionError as e:
        raise AssertionError(f"{what}\n{e}") from None
    if rm is None or not training:
        return
    stats = {}
    for key, fn, cast in (
        ("ours", ours, lambda t: t),
        ("ref", F.batch_norm, up),
        ("torch", F.batch_norm, lambda t: t),
    ):
        rm_, rv_ = cast(rm).clone(), cast(rv).clone()
        with torch.no_grad():
            fn(cast(x), rm_, rv_, cast(w), cast(b), training, momentum, eps)
        stats[key] = (rm_, rv_)
    lowp = x.dtype in (torch.float16, torch.bfloat16)
    for j, name in enumerate(("running_mean", "running_var")):
        assert_close_to_oracle(
            stats["ours"][j],
            stats["ref"][j],
            stats["torch"][j] if lowp else None,
            what=f"{what}: {name}",
        )


# ---- module_db ---------------------------------------------------------------------------------

_MODULES = (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.BCEWithLogitsLoss)
_MODULE_INFOS = [m for m in module_db if m.module_cls in _MODULES]


def _module_inputs(info, dtype, training):
    torch.manual_seed(0)
    return list(
        info.module_inputs_func(
            info, device=DEVICE, dtype=dtype, requires_grad=True, training=training
        )
    )


def _up_leaf(v):
    """The float64 copy of a sample's tensor, requiring grad as it does."""
    if not isinstance(v, torch.Tensor):
        return v
    return up(v).requires_grad_(v.requires_grad) if v.is_floating_point() else v


def _run_module(module, fwd, seed: int):
    """Output, input gradients and parameter gradients of ``module(*args, **kwargs)`` for a
    random output gradient drawn from ``seed``; the inputs are fresh leaves."""
    args = [
        a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in fwd.args
    ]
    kwargs = {
        k: (v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for k, v in fwd.kwargs.items()
    }
    out = module(*args, **kwargs)
    leaves = [
        a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.requires_grad
    ] + [p for p in module.parameters() if p.requires_grad]
    grads = [None] * len(leaves)
    if leaves and out.numel() > 0 and out.requires_grad:
        g = torch.Generator().manual_seed(seed)
        gout = torch.randn(out.shape, generator=g).to(out.device, torch.float64).to(out.dtype)
        grads = list(torch.autograd.grad(out, leaves, gout, allow_unused=True))
    return out.detach(), grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("info", _MODULE_INFOS, ids=lambda m: m.name)
@pytest.mark.parametrize("backend", backend_params())
def test_module_samples(backend, info, dtype, training):
    """Each sample's module built by torch, converted by ``hpml_ops.convert`` (it must be
    replaced), run twice (statistics move between the calls), against the same module in
    float64: output, input and parameter gradients, buffers and ``state_dict`` after."""
    assert dtype in info.dtypes
    for i, mi in enumerate(_module_inputs(info, dtype, training)):
        ci, fwd = mi.constructor_input, mi.forward_input
        torch.manual_seed(i)
        theirs = info.module_cls(*ci.args, **ci.kwargs).to(DEVICE, dtype)
        theirs.train(training)
        ref = copy.deepcopy(theirs).to(torch.float64)
        ours = hpml_ops.convert(copy.deepcopy(theirs), backend=backend)
        assert type(ours) is not info.module_cls, f"sample {i}: convert left {info.name} as is"
        what = f"{info.name} sample {i} ({ci.args}, {ci.kwargs}; training={training})"
        fwd64 = copy.copy(fwd)
        fwd64.args = tuple(_up_leaf(a) for a in fwd.args)
        fwd64.kwargs = {k: _up_leaf(v) for k, v in fwd.kwargs.items()}
        for call in range(2):
            o, og = _run_module(ours, fwd, seed=call)
            r, rg = _run_module(ref, fwd64, seed=call)
            assert_close_to_oracle(o, r, what=f"{what}, call {call}: output")
            assert len(og) == len(rg)
            for j, (a, b) in enumerate(zip(og, rg, strict=True)):
                assert (a is None) == (b is None), f"{what}, call {call}: gradient {j} presence"
                if a is not None:
                    assert_close_to_oracle(a, b, what=f"{what}, call {call}: gradient {j}")
        sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
        assert list(sd_ours) == list(sd_ref), what
        for k in sd_ref:
            a, b = sd_ours[k], sd_ref[k]
            if a.is_floating_point():
                assert a.dtype == dtype, f"{what}: {k} dtype {a.dtype}"
                assert_close_to_oracle(a, b, what=f"{what}: state_dict {k}")
            else:
                assert torch.equal(a.cpu(), b.cpu()), f"{what}: state_dict {k}"


@pytest.mark.parametrize(
    "info", [m for m in _MODULE_INFOS if m.module_error_inputs_func], ids=lambda m: m.name
)
@pytest.mark.parametrize("backend", backend_params())
def test_module_error_samples(backend, info):
    """torch's error inputs for the module, in training (the mode torch's own test runs them
    in): ours raises the exception type torch names, with a message matching torch's pattern.
    In evaluation, where torch's rules differ (eps = 0 allowed, eps < 0 an error of its own), ours
    does what torch does: the same error, or the same output."""
    errors = info.module_error_inputs_func(
        info, device=DEVICE, dtype=torch.float32, requires_grad=False, training=True
    )
    for e in errors:
        ci, fwd = e.module_error_input.constructor_input, e.module_error_input.forward_input
        theirs = info.module_cls(*ci.args, **ci.kwargs).to(DEVICE)
        ours = hpml_ops.convert(copy.deepcopy(theirs), backend=backend)
        with pytest.raises(e.error_type, match=e.error_regex):
            theirs(*fwd.args, **fwd.kwargs)
        with pytest.raises(e.error_type, match=e.error_regex):
            ours(*fwd.args, **fwd.kwargs)
        theirs.eval()
        ours.eval()
        try:
            expected = theirs(*fwd.args, **fwd.kwargs)
        except Exception as err:
            with pytest.raises(type(err), match=re.escape(str(err))):
                ours(*fwd.args, **fwd.kwargs)
        else:
            got = ours(*fwd.args, **fwd.kwargs)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_linear_bias_broadcast_as_torch(backend):
    """A bias of shape (1, N) (or any shape F.linear broadcasts over the output) works as in
    torch, output shape and bias gradient included; a bias that does not fit still raises."""
    torch.manual_seed(3)
    w = torch.randn(4, 3, device=DEVICE)
    for shape, bshape in (
        ((5, 3), (1, 4)),
        ((3,), (1, 4)),
        ((2, 5, 3), (5, 4)),
    ):
        x = torch.randn(shape, device=DEVICE)
        b = torch.randn(bshape, device=DEVICE)
        with hpml_ops.use_backend(backend):
            check_against_oracle(
                lambda x, w, b: hpml_ops.linear_act(x, w, b, "sigmoid"),
                lambda x, w, b: torch.sigmoid(F.linear(x, w, b)),
                [x, w, b],
                [True, True, True],
            )
    with hpml_ops.use_backend(backend), pytest.raises(RuntimeError, match="bias"):
        hpml_ops.linear_act(torch.randn(5, 3, device=DEVICE), w, torch.randn(1, 3, device=DEVICE))
