"""SyncBatchNorm and the ops behind it: batch_norm_stats, batch_norm_backward_reduce and
batch_norm_backward_elemt against float64 torch per backend; a 2-process gloo run with unequal
per-process batches against one BatchNorm over the concatenated batch; the module as a drop-in
for torch's SyncBatchNorm (constructor, state_dict, convert_sync_batchnorm, single process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hpml_ops
from hpml_ops.ops.batch_norm import OP
from tests import _sync_bn_worker as worker
from tests.helpers import DEVICE, TOL, backend_params

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("poisoned")


def _close(ours, ref, what, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        ours.detach().double().cpu(),
        ref.detach().double().cpu(),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


SHAPES = [((37, 5), False), ((2, 3, 7, 9), False), ((5, 4, 3, 3), True), ((3, 1, 11), False)]


@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,cl", SHAPES, ids=[f"{s}{'-cl' if c else ''}" for s, c in SHAPES])
@pytest.mark.parametrize("act", [0, 1], ids=["none", "relu"])
def test_sync_ops_match_float64(backend, dtype, shape, cl, act):
    """stats = (mean, biased var); reduce = (sum dz, sum dz (x - mean)); elemt with this batch's
    own sums = the training gradient of F.batch_norm (+ ReLU), all against float64 torch."""
    fwd, _, stats_op, reduce_op, elemt_op = OP.ops[backend].values()
    g = torch.Generator().manual_seed(hash((shape, cl, act)) % 2**31)
    x = (torch.randn(shape, generator=g) * 3 + 5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    w = (torch.rand(shape[1], generator=g) + 0.5).to(dtype)
    b = torch.randn(shape[1], generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dims = [0, *range(2, x.dim())]
    x64 = x.double()
    stat_dt = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = stats_op(x)
    assert mean.dtype == var.dtype == stat_dt and mean.shape == (shape[1],)
    _close(mean, x64.mean(dims), "mean", dtype)
    _close(var, x64.var(dims, unbiased=False), "var", dtype)
    # Mean 1e4, std 1e-2: the shifted sums keep the variance (E[x^2] - E[x]^2 would lose it).
    big = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e4).to(dtype)
    big_var = stats_op(big.contiguous(memory_format=torch.channels_last) if cl else big)[1]
    torch.testing.assert_close(
        big_var.double(), big.double().var(dims, unbiased=False), atol=0, rtol=1e-4
    )

    out, mean_u, invstd, _ = fwd(x, w, b, mean, var, False, 1e-5, act)
    x_ref = x64.detach().requires_grad_(True)
    w_ref = w.double().requires_grad_(True)
    ref = F.batch_norm(x_ref, None, None, w_ref, b.double(), True, 0.0, 1e-5)
    if act:
        ref = F.relu(ref)
    _close(out, ref, "output", dtype)
    sum_dz, sum_dz_xmu = reduce_op(dy, x, out if act else out.new_empty((0,)), mean_u, act)
    dz = dy.double() * (ref > 0) if act else dy.double()
    shape_c = [1, -1] + [1] * (x.dim() - 2)
    _close(sum_dz, dz.sum(dims), "sum_dz", dtype)
    _close(sum_dz_xmu, (dz * (x64 - mean_u.double().view(shape_c))).sum(dims), "sum_dz_xmu", dtype)
    n = x.numel() // shape[1]
    dx = elemt_op(
        dy, x, w, out if act else out.new_empty((0,)), mean_u, invstd, sum_dz, sum_dz_xmu, n, act
    )
    (gx,) = torch.autograd.grad(ref, x_ref, dy.double())
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dx.is_contiguous(memory_format=torch.channels_last) if cl else dx.is_contiguous()
    _close(dx, gx, "grad_input", dtype)


@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_sync_ops_opcheck_and_empty(backend):
    fwd, _, stats_op, reduce_op, elemt_op = OP.ops[backend].values()
    for shape, cl in (((6, 4), False), ((3, 4, 5, 2), True)):
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        mean, var = stats_op(x)
        out, _, invstd, _ = fwd(x, None, None, mean, var, False, 1e-5, 1)
        torch.library.opcheck(stats_op, (x,))
        torch.library.opcheck(reduce_op, (dy, x, out, mean, 1))
        s1, s2 = reduce_op(dy, x, out, mean, 1)
        torch.library.opcheck(elemt_op, (dy, x, None, out, mean, invstd, s1, s2, 12, 1))
    # A process with an empty share of the batch: zero statistics and sums.
    e = torch.empty(0, 3)
    for t in stats_op(e) + reduce_op(e, e, e, torch.zeros(3), 0):
        assert t.shape == (3,) and torch.equal(t, torch.zeros(3))
    with pytest.raises(RuntimeError, match="count must be positive"):
        elemt_op(dy, x, None, out, mean, invstd, s1, s2, 0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name, shape, act, momentum, seed):
    """One BatchNorm over the whole batch in float64, two steps: per step the output, the three
    gradients and the running statistics."""
    steps, weight, bias = worker.case_data(shape, seed)
    m = torch.nn.BatchNorm1d(shape[1], momentum=momentum).double()
    with torch.no_grad():
        m.weight.copy_(weight.double())
        m.bias.copy_(bias.double())
    res = []
    for x_all, g_all in steps:
        x = x_all.double().requires_grad_(True)
        m.zero_grad()
        # BatchNorm1d's input check is by dim only: call F.batch_norm for any rank.
        out = F.batch_norm(
            x,
            m.running_mean,
            m.running_var,
            m.weight,
            m.bias,
            True,
            m.momentum if momentum is not None else 1.0 / (len(res) + 1),
            m.eps,
        )
        if act == "relu":
            out = F.relu(out)
        out.backward(g_all.double())
        res.append(
            (
                out.detach(),
                x.grad,
                m.weight.grad.clone(),
                m.bias.grad.clone(),
                m.running_mean.clone(),
                m.running_var.clone(),
            )
        )
    return res


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("backend", backend_params(include_reference=False, op="batch_norm"))
def test_two_process_gloo_unequal_batches(backend, tmp_path):
    """2 gloo processes holding 1+6, 3+10 and 2+5 samples: outputs and input gradients
    (concatenated), running statistics (each process), weight/bias gradients (summed over the
    processes, as DDP's all-reduce would) match one BatchNorm over the concatenated batch, for
    two steps (momentum 0.1, cumulative average, 0.3), 2-D/3-D/channels-last 4-D, fused ReLU."""
    if DEVICE != "cpu":
        pytest.skip("the gloo test runs the CPU kernels; a CUDA run needs nccl and 2 GPUs")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._sync_bn_worker",
                str(r),
                "2",
                str(port),
                backend,
                str(tmp_path),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (name, shape, sizes, act, cl, momentum) in enumerate(worker.CASES):
        ref = _reference(name, shape, act, momentum, seed=100 + i)
        for step, (out, gx, gw, gb, rm, rv) in enumerate(ref):
            r0, r1 = got[0][name][step], got[1][name][step]
            what = f"{name} step {step}"
            assert r0["out"].shape[0] == sizes[0] and r1["out"].shape[0] == sizes[1]
            _close(torch.cat([r0["out"], r1["out"]]), out, f"{what} output")
            _close(torch.cat([r0["grad_input"], r1["grad_input"]]), gx, f"{what} grad_input")
            _close(r0["grad_weight"] + r1["grad_weight"], gw, f"{what} grad_weight")
            _close(r0["grad_bias"] + r1["grad_bias"], gb, f"{what} grad_bias")
            for r in (r0, r1):
                _close(r["running_mean"], rm, f"{what} running_mean")
                _close(r["running_var"], rv, f"{what} running_var")
                assert r["num_batches_tracked"] == step + 1
                assert r["channels_last"] == cl
            # Both processes merged the same gathered statistics in the same order: same bits.
            assert torch.equal(r0["running_var"], r1["running_var"])


def test_module_is_torch_syncbatchnorm_drop_in():
    """Same constructor, buffers and state_dict as torch's SyncBatchNorm; without a process
    group (or in eval) it is our single-process batch norm."""
    torch.manual_seed(0)
    ours = hpml_ops.nn.SyncBatchNorm(6, 1e-4, 0.2, True, True, None, activation="relu")
    theirs = torch.nn.SyncBatchNorm(6, 1e-4, 0.2, True, True, None)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert (ours.eps, ours.momentum, ours.process_group) == (theirs.eps, theirs.momentum, None)
    theirs.load_state_dict(ours.state_dict())  # both ways
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 6, 5)
    bn = hpml_ops.nn.BatchNorm1d(6, eps=1e-4, momentum=0.2, activation="relu")
    bn.load_state_dict(theirs.state_dict())
    assert torch.equal(ours(x), bn(x))
    assert torch.equal(ours.running_var, bn.running_var) and int(ours.num_batches_tracked) == 1
    ours.eval()
    bn.eval()
    assert torch.equal(ours(x), bn(x))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(6))
    with pytest.raises(ValueError, match="input channels should be non-zero"):
        ours(torch.randn(4, 0))
    with pytest.raises(ValueError, match="activation"):
        hpml_ops.nn.SyncBatchNorm(3, activation="gelu")
    # DDP takes it in a CPU module (it refuses torch's SyncBatchNorm there).
    assert not isinstance(ours, torch.nn.SyncBatchNorm)


def test_convert_sync_batchnorm():
    """Every BatchNorm (torch's or ours, nested) becomes ours, sharing parameters and buffers;
    our fused activation is kept; the state_dict is unchanged."""
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 1), hpml_ops.nn.BatchNorm2d(3, activation="relu")
        ),
    )
    model[2][1].eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = model[1].weight
    conv = hpml_ops.nn.convert_sync_batchnorm(model)
    assert isinstance(conv[1], hpml_ops.nn.SyncBatchNorm) and conv[1].activation is None
    assert isinstance(conv[2][1], hpml_ops.nn.SyncBatchNorm) and conv[2][1].activation == "relu"
    assert conv[1].weight is w and not conv[2][1].training
    assert all(torch.equal(v, sd[k]) for k, v in conv.state_dict().items())
    assert conv.state_dict().keys() == sd.keys()
