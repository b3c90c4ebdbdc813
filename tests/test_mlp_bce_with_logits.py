"""hpml_ops.mlp_bce_with_logits (a whole MLP and the sigmoid BCE-with-logits loss of its output as
one op forward and one op backward) and FusedMLP.bce_with_logits: parity against torch's own
layers and loss in float64 (loss, logits, every gradient including the target's, running
statistics) on every backend, for the nets of tests/test_mlp.py, every reduction, weight and
pos_weight broadcast; the fused CPU backward against the net's and the loss's ops one after the
other (the same bits); gradcheck, gradgradcheck, opcheck, torch.compile; bad input and edge
cases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hpml_ops
from hpml_ops import reference
from hpml_ops.constants import ACTIVATIONS, REDUCTIONS
from hpml_ops.ops.mlp_bce_with_logits import OP
from tests.helpers import DEVICE, assert_close_to_oracle, backend_params, dtype_id
from tests.test_mlp import CONFIGS, ILL_CONDITIONED, _make

BACKENDS = backend_params(op="mlp_bce_with_logits")
NON_REF = [b for b in BACKENDS if b.values[0] != "reference"]
NET_KEYS = ("weights", "biases", "bn_weights", "bn_biases")


def _loss_kw(config, dtype, seed, rows=13, reduction="mean", weight=None, pos_weight=None):
    """The net of tests/test_mlp.py's ``config`` (no output activation: its output is the
    logits) with soft targets, and the loss's options: weight / pos_weight None, "row" (one per
    row, (M, 1)), "col" (per output, (N,)) or "full" ((M, N))."""
    kw = _make(config, dtype, seed, rows)
    kw.pop("output_activation")
    g = torch.Generator().manual_seed(seed + 100)
    n, m = kw["weights"][-1].shape[0], rows
    kw["target"] = torch.rand(m, n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    def make(kind):
        shape = {None: None, "row": (m, 1), "col": (n,), "full": (m, n)}[kind]
        if shape is None:
            return None
        return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)

    kw.update(weight=make(weight), pos_weight=make(pos_weight), reduction=reduction)
    return kw


def _leaves(kw, requires=True):
    out = dict(kw)
    out["input"] = kw["input"].detach().clone().requires_grad_(requires)
    out["target"] = kw["target"].detach().clone().requires_grad_(requires)
    for k in NET_KEYS:
        out[k] = [None if t is None else t.detach().clone().requires_grad_(requires) for t in kw[k]]
    for k in ("running_means", "running_vars"):
        out[k] = [None if t is None else t.clone() for t in kw[k]]
    return out


def _up(kw):
    f64 = _leaves({k: v for k, v in kw.items()})
    f64["input"] = kw["input"].detach().double().requires_grad_()
    f64["target"] = kw["target"].detach().double().requires_grad_()
    for k in NET_KEYS:
        f64[k] = [None if t is None else t.detach().double().requires_grad_() for t in kw[k]]
    for k in ("running_means", "running_vars", "weight", "pos_weight"):
        v = kw[k]
        f64[k] = [None if t is None else t.double() for t in v] if isinstance(v, list) else (
            None if v is None else v.double())  # fmt: skip
    return f64


def _targets(kw):
    return [kw["input"], kw["target"]] + [t for k in NET_KEYS for t in kw[k] if t is not None]


def _names(kw):
    return ["input", "target"] + [f"{k}[{i}]" for k in NET_KEYS
                                  for i, t in enumerate(kw[k]) if t is not None]  # fmt: skip


def _run(fn, kw, seed):
    loss, logits = fn(**kw, return_logits=True)
    g = torch.Generator().manual_seed(seed + 1)
    gout = torch.randn(loss.shape, generator=g).to(loss.dtype).to(loss.device)
    ts = _targets(kw)
    grads = (
        torch.autograd.grad(loss, ts, gout, allow_unused=True) if loss.numel() else [None] * len(ts)
    )
    return loss.detach(), logits.detach(), grads


def _check(config, dtype, backend, seed=0, rows=13, yardstick=False, **loss):
    kw = _loss_kw(config, dtype, seed, rows, **loss)
    ours_kw, ref_kw = _leaves(kw), _up(kw)
    with hpml_ops.use_backend(backend):
        out, logits, grads = _run(hpml_ops.mlp_bce_with_logits, ours_kw, seed)
    ref_out, ref_logits, ref_grads = _run(reference.mlp_bce_with_logits, ref_kw, seed)
    torch_out, torch_logits, torch_grads, torch_kw = None, None, [None] * len(grads), None
    low = dtype in (torch.float16, torch.bfloat16)
    if low or (dtype == torch.float32 and (yardstick or config in ILL_CONDITIONED)):
        torch_kw = _leaves(kw)
        torch_out, torch_logits, torch_grads = _run(reference.mlp_bce_with_logits, torch_kw, seed)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert logits.dtype == dtype and not logits.requires_grad
    assert_close_to_oracle(out, ref_out, torch_out, what="loss")
    assert_close_to_oracle(logits, ref_logits, torch_logits, what="logits")
    for name, o, r, t in zip(_names(kw), grads, ref_grads, torch_grads, strict=True):
        if o is None:
            assert r is None, name
            continue
        assert_close_to_oracle(o, r, t, what=f"grad {name}", compute_dtype=dtype)
    for k in ("running_means", "running_vars"):
        for i, (o, r) in enumerate(zip(ours_kw[k], ref_kw[k], strict=True)):
            if o is not None:
                t = torch_kw[k][i] if low else None
                assert_close_to_oracle(o, r, t, what=f"{k}[{i}]", compute_dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_parity(dtype, config, backend):
    _check(config, dtype, backend)


LOSSES = [
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(reduction="mean", weight="row", pos_weight="col"),
    dict(reduction="none", weight="full"),
    dict(reduction="sum", pos_weight="full", weight="col"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("config", ["relu", "leaky-bn", "relu-bn-eval"])
def test_parity_loss_options(config, loss, backend):
    # A linear bias before a batch norm in training has a gradient of exactly 0, and every fp32
    # result (torch's own included) is rounding noise of the size of the gradients flowing
    # there: with a summed loss over 70 rows torch's own fp32 layers miss the fp32 tolerance on
    # it (leaky-bn, reduction sum: 1.3e-05 > 1e-05). The fp32 results are judged against the fp64
    # oracle with the tolerance widened by twice torch's own fp32 error on the same draw.
    _check(config, torch.float32, backend, seed=3, rows=70, yardstick=True, **loss)


@pytest.mark.parametrize("backend", NON_REF)
@pytest.mark.parametrize("config", ["relu", "leaky-bn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_parity_low_precision(dtype, config, backend):
    _check(config, dtype, backend, seed=1)


@pytest.mark.parametrize("config", ["relu", "leaky-bn", "tanh-bn-some", "deep-odd", "wide-128"])
@pytest.mark.parametrize("loss", LOSSES[1:4], ids=["none", "weights", "full-weight"])
@pytest.mark.parametrize("rows", [13, 1000])
def test_cpu_fused_backward_matches_the_ops_apart(rows, loss, config):
    """The C++ CPU backward that starts from the loss inside the whole-network kernel gives the
    same bits as the loss's backward op and then the net's (hpml::bce_with_logits_backward,
    hpml::mlp_backward): the same arithmetic, only the logits gradient is never a tensor."""
    if "cpp" not in OP.ops:
        pytest.skip("the C++ extension is not built")
    kw = _loss_kw(config, torch.float32, 5, rows, **loss)
    fused_kw, apart_kw = _leaves(kw), _leaves(kw)
    with hpml_ops.use_backend("cpp"):
        fused = _run(hpml_ops.mlp_bce_with_logits, fused_kw, 5)

        def apart(**a):
            a = dict(a)
            target, weight, pos_weight = a.pop("target"), a.pop("weight"), a.pop("pos_weight")
            reduction = a.pop("reduction")
            a.pop("return_logits")
            logits = hpml_ops.mlp(**a)
            return hpml_ops.binary_cross_entropy_with_logits(
                logits, target, weight, reduction, pos_weight
            ), logits.detach()

        separate = _run(apart, apart_kw, 5)
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
    for name, a, b in zip(_names(kw), fused[2], separate[2], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("config", ["relu", "tanh-leaky-out", "deep-8", "leaky-bn", "deep-odd"])
@pytest.mark.parametrize("loss", LOSSES[1:], ids=["none", "weights", "full-weight", "full-pw"])
def test_triton_fused_backward_matches_the_kernels_apart(loss, config, monkeypatch):
    """The Triton backward of a net the fused kernel runs starts from the loss inside the net's
    fused backward kernel (the target's gradient written in the same pass) and never runs the
    loss's backward kernel; it gives the same bits as the loss's backward kernel followed by the
    net's fused backward (the same fp32 arithmetic; only the logits gradient is not a tensor)."""
    from hpml_ops.kernels import mlp_bce_with_logits as kmod

    if "triton" not in OP.ops:
        pytest.skip("the Triton backend is unavailable")
    kw = _loss_kw(config, torch.float32, 7, 37, **loss)
    calls = []
    apart_backward = kmod._bce_backward
    monkeypatch.setattr(kmod, "_bce_backward", lambda *a: calls.append(1) or apart_backward(*a))
    with hpml_ops.use_backend("triton"):
        fused = _run(hpml_ops.mlp_bce_with_logits, _leaves(kw), 7)
        assert calls == []  # the loss's own backward kernel did not run
        monkeypatch.setattr(kmod, "_fusable", lambda *a: False)  # the loss's kernel, then the net's
        apart = _run(hpml_ops.mlp_bce_with_logits, _leaves(kw), 7)
        assert calls == [1]
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])
    for name, a, b in zip(_names(kw), fused[2], apart[2], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("config", ["relu", "deep-8"])
@pytest.mark.parametrize("loss", LOSSES, ids=["sum", "none", "weights", "full-weight", "full-pw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_cuda_fused_backward_starts_from_the_loss(dtype, loss, config, monkeypatch):
    """On CUDA (run by the emulator) the backward of an fp16/bf16 net the fused kernels run starts
    from the loss inside the fused backward kernel (csrc/cuda/mlp.cu): the loss's backward op is
    not called, and the loss, logits and every gradient (input, target, weights, biases) are
    torch's in float64 within twice torch's own error in the dtype, for every reduction and
    weight / pos_weight broadcast; under HPML_MLP_KERNEL=layers the loss's op runs apart."""
    if "cuda-emu" not in OP.ops:
        pytest.skip("the CUDA emulator is unavailable here")

    def loss_backward_calls():
        with torch.profiler.profile() as prof:
            _check(config, dtype, "cuda-emu", seed=9, rows=70, **loss)
        return [e.name for e in prof.events()].count("hpml_emu::bce_with_logits_backward")

    assert loss_backward_calls() == 0
    monkeypatch.setenv("HPML_MLP_KERNEL", "layers")
    assert loss_backward_calls() == 1


def test_cpu_backward_is_one_op_without_the_loss_backward():
    """On CPU (fp32, the whole-network kernel) the backward is one op call, and the loss's
    backward op (which would write the logits' gradient) is not called."""
    if "cpp" not in OP.ops:
        pytest.skip("the C++ extension is not built")
    kw = _leaves(_loss_kw("leaky-bn", torch.float32, 2, 40))
    with hpml_ops.use_backend("cpp"):
        loss = hpml_ops.mlp_bce_with_logits(**kw)
        with torch.profiler.profile() as prof:
            loss.backward()
    names = [e.name for e in prof.events()]
    assert names.count("hpml::mlp_bce_with_logits_backward") == 1
    assert "hpml::bce_with_logits_backward" not in names
    assert "hpml::mlp_backward" not in names


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_one_row_and_3d_input(backend):
    kw = _loss_kw("relu-bn-eval", torch.float32, 3, rows=0)
    kw["training"] = True
    ours = _leaves(kw)
    with hpml_ops.use_backend(backend):
        loss = hpml_ops.mlp_bce_with_logits(**ours)
    assert loss.shape == () and loss.isnan()  # the mean of no elements, as torch
    loss.backward()
    assert torch.equal(ours["weights"][0].grad, torch.zeros_like(ours["weights"][0]))
    for k in ("running_means", "running_vars"):
        assert all(torch.equal(a, b) for a, b in zip(ours[k], kw[k], strict=True))
    _check("relu-bn-eval", torch.float32, backend, rows=1)
    # (*, in_features) input without batch norm, the target (*, out_features)
    kw = _loss_kw("relu", torch.float64, 4, rows=12, reduction="none", pos_weight="col")
    x, t = kw["input"].reshape(3, 4, -1), kw["target"].reshape(3, 4, -1)
    with hpml_ops.use_backend(backend):
        loss, logits = hpml_ops.mlp_bce_with_logits(
            **dict(kw, input=x, target=t), return_logits=True
        )
    ref_loss, ref_logits = reference.mlp_bce_with_logits(
        **dict(kw, input=x, target=t), return_logits=True
    )
    assert loss.shape == (3, 4, t.shape[-1]) and logits.shape == loss.shape
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(logits, ref_logits)


@pytest.mark.parametrize("backend", NON_REF)
def test_gradcheck_and_gradgradcheck(backend):
    kw = _loss_kw("tanh-bn-some", torch.float64, 5, rows=6, weight="row", pos_weight="col")
    kw["training"] = True
    n_hidden = len(kw["running_means"])
    kw["running_means"] = kw["running_vars"] = [None] * n_hidden
    leaves = _leaves(kw)
    targets = _targets(leaves)

    def fn(*ts):
        it = iter(ts)
        call = dict(leaves, input=next(it), target=next(it))
        for k in NET_KEYS:
            call[k] = [None if t is None else next(it) for t in leaves[k]]
        return hpml_ops.mlp_bce_with_logits(**call)

    with hpml_ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, targets, atol=1e-8, rtol=1e-6)
        assert torch.autograd.gradgradcheck(fn, targets, atol=1e-6, rtol=1e-5)


def _op_args(config, reduction=1, dtype=torch.float32):
    kw = _loss_kw(config, dtype, 7, weight="row", pos_weight="col")
    none = kw["input"].new_empty((0, 0))
    for k in ("biases", "bn_weights", "bn_biases", "running_means", "running_vars"):
        kw[k] = [none if t is None else t for t in kw[k]]
    return (
        kw["input"], kw["target"], kw["weight"], kw["pos_weight"], reduction, kw["weights"],
        kw["biases"], kw["batch_norm"], kw["bn_weights"], kw["bn_biases"], kw["running_means"],
        kw["running_vars"], kw["training"], 1e-5, ACTIVATIONS[kw["activation"]], 0.01,
    )  # fmt: skip


@pytest.mark.parametrize("backend", NON_REF)
@pytest.mark.parametrize("config,reduction", [("relu", 1), ("leaky-bn", 0), ("relu-bn-eval", 2)])
def test_opcheck(config, reduction, backend):
    args = _op_args(config, reduction)
    fwd, bwd = OP.pair(backend)
    grad_args = list(args)
    grad_args[0] = args[0].clone().requires_grad_()
    grad_args[1] = args[1].clone().requires_grad_()
    grad_args[5] = [w.clone().requires_grad_() for w in args[5]]
    torch.library.opcheck(fwd, tuple(grad_args))
    loss, logits, saved = fwd(*args)
    n = len(args[5])
    for flags in (True, False):  # every gradient; the target's alone
        bargs = (torch.randn_like(loss), *args[:5], logits, args[5], args[6], args[7], args[8],
                 saved, args[12], args[14], 0.01, flags, True, [flags] * n, [flags] * n,
                 [flags] * (n - 1), [flags] * (n - 1))  # fmt: skip
        torch.library.opcheck(bwd, bargs)


def _plain(seed=0, out=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6),
                         nn.ReLU(), nn.Linear(6, out))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp_bce_with_logits_is_the_module_and_torch_loss(backend):
    plain = _plain(out=3)
    fused = hpml_ops.nn.FusedMLP(*copy.deepcopy(plain), backend=backend)
    x, y = torch.randn(33, 5), torch.rand(33, 3)
    pw = torch.rand(3) + 0.5
    for _ in range(3):  # training: running statistics and batch counts as torch's
        ref = nn.functional.binary_cross_entropy_with_logits(plain(x), y, pos_weight=pw)
        loss, logits = fused.bce_with_logits(x, y, pos_weight=pw, return_logits=True)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
        assert logits.shape == (33, 3) and not logits.requires_grad
        ref.backward()
        loss.backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    for (name, b), c in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-6, msg=name)
    fused.eval(), plain.eval()
    ref = nn.functional.binary_cross_entropy_with_logits(plain(x), y, reduction="sum")
    torch.testing.assert_close(fused.bce_with_logits(x, y, reduction="sum"), ref)
    # an output activation: the module, then the loss (the same values)
    act = hpml_ops.nn.FusedMLP(*copy.deepcopy(plain), nn.Sigmoid(), backend=backend).eval()
    ref = nn.functional.binary_cross_entropy_with_logits(nn.Sequential(plain, nn.Sigmoid())(x), y)
    torch.testing.assert_close(act.bce_with_logits(x, y), ref)


def test_fused_mlp_bce_with_logits_runs_one_op_each_way():
    if "cpp" not in OP.ops:
        pytest.skip("the C++ extension is not built")
    fused = hpml_ops.nn.FusedMLP(*_plain(), backend="cpp")
    x, y = torch.randn(16, 5), torch.rand(16, 1)
    with torch.profiler.profile() as prof:
        fused.bce_with_logits(x, y).backward()
    names = [e.name for e in prof.events() if e.name.startswith("hpml::")]
    # (inside the forward op: the net's op and the loss's, called below autograd)
    assert names.count("hpml::mlp_bce_with_logits") == 1
    assert names.count("hpml::mlp_bce_with_logits_backward") == 1
    assert "hpml::mlp_backward" not in names and "hpml::bce_with_logits_backward" not in names


@pytest.mark.parametrize("backend", NON_REF)
def test_compile_fullgraph(backend):
    fused = hpml_ops.nn.FusedMLP(*_plain(), backend=backend)
    x, y = torch.randn(9, 5), torch.rand(9, 1)
    eager = fused.bce_with_logits(x, y)
    eager.backward()
    g_eager = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    compiled = torch.compile(fused.bce_with_logits, fullgraph=True)
    out = compiled(x, y)
    out.backward()
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    for p, g in zip(fused.parameters(), g_eager, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the exception type and words are what is compared
        return type(e), str(e).split("\n")[0]
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_as_torch(backend):
    """The loss's bad operands give torch's error (the same type; torch's words where torch
    says them), before any kernel runs (the running statistics untouched)."""
    kw = _loss_kw("leaky-bn", torch.float32, 1, rows=8)
    kw["training"] = True
    rm = [t.clone() for t in kw["running_means"]]

    def ours(**change):
        with hpml_ops.use_backend(backend):
            return hpml_ops.mlp_bce_with_logits(**dict(kw, **change))

    def torch_(**change):
        a = dict(kw, **change)
        for k in ("running_means", "running_vars"):  # (F.batch_norm updates them in place)
            a[k] = [None if t is None else t.clone() for t in a[k]]
        logits = reference.mlp_bce_with_logits(**dict(a, target=kw["target"], weight=None,
                                                      pos_weight=None, reduction="none"),
                                               return_logits=True)[1]  # fmt: skip
        return nn.functional.binary_cross_entropy_with_logits(
            logits, a["target"], a["weight"], reduction=a["reduction"], pos_weight=a["pos_weight"]
        )

    cases = [
        dict(target=kw["target"][:, :1].expand(8, 2).contiguous()[:5]),  # rows
        dict(target=kw["target"].t().contiguous()),  # (N, M)
        dict(reduction="average"),
    ]
    for case in cases:
        got, want = (
            _raised(lambda case=case: ours(**case)),
            _raised(lambda case=case: torch_(**case)),
        )
        assert got is not None and want is not None and got[0] is want[0], (case, got, want)
        if "reduction" not in case:
            assert got[1] == want[1], (got, want)
    for case in (dict(weight=torch.ones(3)), dict(pos_weight=torch.ones(8, 3))):
        got = _raised(lambda case=case: ours(**case))
        assert got is not None and got[0] is RuntimeError and "cannot be broadcast" in got[1]
    assert all(torch.equal(a, b) for a, b in zip(rm, kw["running_means"], strict=True))
    # a target of another dtype: torch's promotion (the loss in fp64), as the two ops apart
    t64 = kw["target"].double()
    with hpml_ops.use_backend(backend):
        loss = hpml_ops.mlp_bce_with_logits(**dict(kw, target=t64, training=False))
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_autocast_runs_the_net_and_loss_apart_as_torch(reduction):
    """Under autocast the net's products run in the autocast dtype and the loss in fp32, as
    torch's (the one op takes one dtype: it is the two ops then)."""
    kw = _loss_kw("relu", torch.float32, 2, rows=10, reduction=reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = hpml_ops.mlp_bce_with_logits(**kw, return_logits=True)
        ref_loss, ref_logits = reference.mlp_bce_with_logits(**kw, return_logits=True)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    assert loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits)  # bf16's default tolerance
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1.6e-2)  # of bf16 logits


@pytest.mark.parametrize("backend", NON_REF)
def test_checkpoint_and_torch_func_as_torch(backend):
    """Non-reentrant checkpointing recomputes the one op; torch.func.grad and vmap (per-sample
    losses) run the net and the loss as torch's ops: the same values as torch's."""
    kw = _loss_kw("relu", torch.float64, 6, rows=9, pos_weight="col")
    ws = [w.detach().clone().requires_grad_() for w in kw["weights"]]
    net = {k: kw[k] for k in ("biases", "activation")}
    ref_ws = [w.detach().clone().requires_grad_() for w in ws]
    ref = reference.mlp_bce_with_logits(kw["input"], kw["target"], ref_ws, **net,
                                        pos_weight=kw["pos_weight"])  # fmt: skip
    ref.backward()
    with hpml_ops.use_backend(backend):
        loss = torch.utils.checkpoint.checkpoint(
            lambda *w: hpml_ops.mlp_bce_with_logits(kw["input"], kw["target"], list(w), **net,
                                                    pos_weight=kw["pos_weight"]),
            *ws, use_reentrant=False,
        )  # fmt: skip
        loss.backward()

        def f(w0, x, y):
            return hpml_ops.mlp_bce_with_logits(x, y, [w0, *ws[1:]], **net, reduction="sum")

        g = torch.func.grad(f)(ws[0].detach(), kw["input"], kw["target"])
        per_sample = torch.vmap(f, in_dims=(None, 0, 0))(
            ws[0].detach(), kw["input"][:, None], kw["target"][:, None]
        )
    torch.testing.assert_close(loss, ref)
    for w, r in zip(ws, ref_ws, strict=True):
        torch.testing.assert_close(w.grad, r.grad)
    x = kw["input"].detach()
    w0 = ws[0].detach().clone().requires_grad_()
    plain = reference.mlp_bce_with_logits(x, kw["target"], [w0, *ws[1:]], **net, reduction="sum")
    torch.testing.assert_close(g, torch.autograd.grad(plain, w0)[0])
    want = reference.mlp_bce_with_logits(x, kw["target"], ws, **net, reduction="none").sum(1)
    torch.testing.assert_close(per_sample, want.detach())
