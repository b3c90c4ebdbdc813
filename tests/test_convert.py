"""hpml_ops.convert: which modules it replaces (and which it leaves), that the converted model
computes what the original computes (outputs, every gradient, running statistics; each backend),
that parameters and buffers are the same objects (an optimizer built before still works) and the
state_dict the same both ways, train/eval flags, dtype, the per-module backend, bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hpml_ops
from hpml_ops.nn._absorbed import AbsorbedTanh
from tests.helpers import DEVICE, TOL, assert_close_to_oracle, backend_params

FP32_ATOL, FP32_RTOL = TOL[torch.float32]


def _mlp() -> nn.Sequential:
    """Every activation Linear can absorb, a trailing lone Linear, a nested Sequential."""
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 9),
        nn.LeakyReLU(0.2),
        nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5), nn.Sigmoid()),
        nn.Linear(5, 3),
    )


def _convnet() -> nn.Sequential:
    """Conv + BatchNorm2d + ReLU blocks, then an MLP head with BatchNorm1d + ReLU."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(
            nn.Linear(4 * 4 * 4, 10),
            nn.ReLU(),
            nn.Linear(10, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 2),
        ),
    )


class _Custom(nn.Module):
    """Linears outside any Sequential: an attribute and the items of a ModuleList (whose order of
    use only forward knows, so nothing is fused there)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])
        self.head = nn.Sequential(nn.Linear(8, 3), nn.Tanh())

    def forward(self, x):
        h = self.blocks[1](self.blocks[0](torch.relu(self.proj(x))))
        return self.head(h)


def _count(model: nn.Module) -> dict[str, int]:
    """How many modules of each kind, FusedLinear and our BatchNorm by activation."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, hpml_ops.nn.FusedLinear):
            key = f"FusedLinear[{m.activation}]"
        elif isinstance(m, hpml_ops.nn.BatchNorm1d | hpml_ops.nn.BatchNorm2d):
            key = f"hpml.{type(m).__name__}[{m.activation}]"
        elif isinstance(m, hpml_ops.nn.BCEWithLogitsLoss):
            key = "hpml.BCEWithLogitsLoss"
        else:
            key = type(m).__name__
        out[key] = out.get(key, 0) + 1
    return out


def _step(model, loss_fn, x, target):
    """One forward + loss + backward; returns (output, loss, input gradient)."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    loss = loss_fn(y, target)
    loss.backward()
    return y.detach(), loss.detach(), x.grad


def _assert_same_training(converted, original, x, target, backend):
    """The converted model, run on ``backend``, against the original run by torch: output, loss,
    the input's and every parameter's gradient, and every buffer afterwards, in fp32."""
    loss_ref = nn.BCEWithLogitsLoss(pos_weight=torch.full((target.shape[1],), 2.0, device=DEVICE))
    loss_ours = hpml_ops.convert(copy.deepcopy(loss_ref))
    assert type(loss_ours) is hpml_ops.nn.BCEWithLogitsLoss
    assert torch.equal(loss_ours.pos_weight, loss_ref.pos_weight)
    y_ref, l_ref, gx_ref = _step(original, loss_ref, x, target)
    with hpml_ops.use_backend(backend):
        y, loss, gx = _step(converted, loss_ours, x, target)
    tol = {"atol": FP32_ATOL, "rtol": FP32_RTOL}
    torch.testing.assert_close(y, y_ref, **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(loss, l_ref, **tol, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(gx, gx_ref, **tol, msg=lambda m: f"input grad: {m}")
    params = dict(converted.named_parameters())
    ref_params = dict(original.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(
            p.grad, ref_params[name].grad, **tol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    buffers = dict(converted.named_buffers())
    ref_buffers = dict(original.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    for name, b in buffers.items():
        torch.testing.assert_close(
            b, ref_buffers[name], **tol, msg=lambda m, n=name: f"buffer {n}: {m}"
        )


@pytest.mark.parametrize("fuse_mlp", [False, True], ids=["per-layer", "fuse-mlp"])
@pytest.mark.parametrize("backend", backend_params())
def test_mlp_matches_original(backend, fuse_mlp):
    torch.manual_seed(0)
    model = _mlp().to(DEVICE)
    original = copy.deepcopy(model)
    report: list[str] = []
    converted = hpml_ops.convert(model, fuse_mlp=fuse_mlp, report=report)
    if fuse_mlp:
        # The top level is not a whole MLP (a nested block, a lone Linear after it) but starts
        # with a run of two layers: a FusedRuns (returned: the top-level module is replaced, as a
        # whole-MLP one is by a FusedMLP); the nested block is a whole MLP; the lone Linear is
        # converted alone.
        assert type(converted) is hpml_ops.nn.FusedRuns and converted.runs == [("0", "3")]
        assert _count(converted) == {
            "FusedRuns": 1,
            "Linear": 4,
            "ReLU": 1,
            "LeakyReLU": 1,
            "FusedMLP": 1,
            "Tanh": 1,
            "Sigmoid": 1,
            "FusedLinear[none]": 1,
        }
        assert report == [
            "(model): 0-3 (Linear, ReLU, Linear, LeakyReLU) -> one hpml_ops.mlp op (FusedRuns)",
            "4: Linear, Tanh, Linear, Sigmoid -> FusedMLP",
        ]
        assert converted[3].negative_slope == 0.2
    else:
        assert converted is model
        assert converted[2].negative_slope == 0.2
        assert report == []
        assert _count(converted) == {
            "Sequential": 2,
            "FusedLinear[relu]": 1,
            "FusedLinear[leaky_relu]": 1,
            "FusedLinear[tanh]": 1,
            "FusedLinear[sigmoid]": 1,
            "FusedLinear[none]": 1,
            "AbsorbedReLU": 1,
            "AbsorbedLeakyReLU": 1,
            "AbsorbedTanh": 1,
            "AbsorbedSigmoid": 1,
        }
    x = torch.randn(17, 12, device=DEVICE)
    target = torch.rand(17, 3, device=DEVICE)
    _assert_same_training(converted, original, x, target, backend)


@pytest.mark.parametrize("fuse_mlp", [False, True], ids=["per-layer", "fuse-mlp"])
@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_convnet_matches_original(backend, fuse_mlp):
    torch.manual_seed(1)
    model = _convnet().to(DEVICE)
    original = copy.deepcopy(model)
    converted = hpml_ops.convert(model, fuse_mlp=fuse_mlp)
    common = {"Conv2d": 2, "hpml.BatchNorm2d[relu]": 2, "Flatten": 1}
    if fuse_mlp:  # the head (Linear, ReLU, Linear, BatchNorm1d, ReLU, Linear) as one op
        assert _count(converted) == dict(
            common, Sequential=1, FusedMLP=1, Linear=3, ReLU=2, BatchNorm1d=1, AbsorbedReLU=2
        )
    else:
        assert _count(converted) == dict(
            common,
            Sequential=2,
            AbsorbedReLU=4,
            **{"FusedLinear[relu]": 1, "FusedLinear[none]": 2, "hpml.BatchNorm1d[relu]": 1},
        )
    x = torch.randn(5, 3, 6, 6, device=DEVICE)
    target = torch.rand(5, 2, device=DEVICE)
    _assert_same_training(converted, original, x, target, backend)
    assert converted[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_eval_mode_matches_original(backend):
    """Converted in eval mode: modules stay in eval, the running statistics are used, outputs
    match; a module left in training mode inside the eval model keeps its flag."""
    torch.manual_seed(2)
    model = _convnet().to(DEVICE)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    model[4].train()
    original = copy.deepcopy(model)
    converted = hpml_ops.convert(model)
    assert converted[1].training is False and converted[2].training is False
    assert converted[4].training is True
    assert [m.training for m in converted.modules()] == [m.training for m in original.modules()]
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    with torch.no_grad():
        y_ref = original(x)
        with hpml_ops.use_backend(backend):
            y = converted(x)
    torch.testing.assert_close(y, y_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    for name, b in converted.named_buffers():  # eval: unchanged; [4] in training: updated alike
        torch.testing.assert_close(b, dict(original.named_buffers())[name])


def test_same_objects_and_optimizer_built_before():
    """Parameters and buffers are the very same tensors, so an optimizer created before the
    conversion updates the converted model."""
    torch.manual_seed(3)
    model = _convnet().to(DEVICE)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hpml_ops.convert(model)
    for name, p in model.named_parameters():
        assert p is params[name], name
    for name, b in model.named_buffers():
        assert b is buffers[name], name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 3, 6, 6, device=DEVICE)
    model(x).square().mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        # SGD's first step with momentum: the buffer is the gradient, p -= lr * grad.
        assert p.grad is not None, name
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad), name
        torch.testing.assert_close(p.detach(), before[name].add(p.grad, alpha=-0.1), msg=name)
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_state_dict_round_trip():
    """Same keys and values; the original's checkpoint loads strictly into the converted model
    and the converted model's into a fresh original."""
    torch.manual_seed(4)
    model = _convnet().to(DEVICE)
    model(torch.randn(3, 3, 6, 6, device=DEVICE))  # running statistics away from their init
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    hpml_ops.convert(model)
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    for k, v in sd.items():
        assert torch.equal(v, sd_before[k]), k
    torch.manual_seed(5)
    fresh_original = _convnet().to(DEVICE)
    fresh_original.load_state_dict(sd, strict=True)
    for k, v in fresh_original.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.manual_seed(6)
    fresh_converted = hpml_ops.convert(_convnet().to(DEVICE))
    fresh_converted.load_state_dict(sd_before, strict=True)
    for k, v in fresh_converted.state_dict().items():
        assert torch.equal(v, sd_before[k]), k


def test_outside_sequential_and_left_alone():
    """A Linear outside a Sequential becomes FusedLinear("none") (in a ModuleList too, not fused
    with the ReLU after it); subclasses, our own modules, modules with hooks, and shared modules'
    fusion are left alone; a bare module is returned converted."""

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(7)
    model = _Custom()
    ours = hpml_ops.nn.FusedLinear(3, 3, activation="tanh")
    sub = MyLinear(3, 3)
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, i, o: None)
    shared = nn.Linear(3, 3)
    extra = nn.Sequential(ours, sub, nn.ReLU(), hooked, nn.ReLU(), shared, nn.ReLU(), shared)
    model.extra = extra
    original = copy.deepcopy(model)
    hpml_ops.convert(model, fuse_mlp=False)
    assert type(model.proj) is hpml_ops.nn.FusedLinear and model.proj.activation == "none"
    assert type(model.blocks[0]) is hpml_ops.nn.FusedLinear
    assert model.blocks[0].activation == "none" and type(model.blocks[1]) is nn.ReLU
    assert model.head[0].activation == "tanh" and type(model.head[1]) is AbsorbedTanh
    assert extra[0] is ours and extra[1] is sub and type(extra[2]) is nn.ReLU
    assert extra[3] is hooked and type(extra[4]) is nn.ReLU
    assert type(extra[5]) is hpml_ops.nn.FusedLinear and extra[5].activation == "none"
    assert extra[7] is extra[5] and type(extra[6]) is nn.ReLU
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), original(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    x3 = torch.randn(4, 3)
    torch.testing.assert_close(extra(x3), original.extra(x3), atol=FP32_ATOL, rtol=FP32_RTOL)

    lin = nn.Linear(5, 4, bias=False)
    new = hpml_ops.convert(lin)
    assert type(new) is hpml_ops.nn.FusedLinear and new.activation == "none"
    assert new.weight is lin.weight and new.bias is None
    bn = nn.BatchNorm1d(4, momentum=None, affine=False)
    new_bn = hpml_ops.convert(bn)
    assert type(new_bn) is hpml_ops.nn.BatchNorm1d and new_bn.activation is None
    assert new_bn.momentum is None and new_bn.weight is None
    assert new_bn.running_mean is bn.running_mean
    relu = nn.ReLU()
    assert hpml_ops.convert(relu) is relu


def test_dtype_device_requires_grad_kept():
    torch.manual_seed(8)
    model = _mlp().to(DEVICE, torch.float64)
    model[0].weight.requires_grad_(False)
    original = copy.deepcopy(model)
    hpml_ops.convert(model)
    for p in model.parameters():
        assert p.dtype == torch.float64 and p.device.type == torch.device(DEVICE).type
    assert model[0].weight.requires_grad is False and model[0].bias.requires_grad is True
    x = torch.randn(6, 12, device=DEVICE, dtype=torch.float64)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(model(x), original(x), atol=atol, rtol=rtol)


def _hpml_ops_run(model, *args) -> set[str]:
    """The names of the hpml:: ops that running ``model(*args)`` called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*args)
    return {e.key for e in prof.key_averages() if e.key.startswith("hpml::")}


def test_backend_attribute_honoured():
    """convert(backend=...) pins the modules to that backend, whatever the global choice; the
    default (None) follows the global choice."""
    if hpml_ops._backend.unavailable_reason("cpp", torch.device(DEVICE).type, "batch_norm"):
        pytest.skip("needs the cpp backend's linear_act and batch_norm on this device")
    torch.manual_seed(9)
    x = torch.randn(3, 3, 6, 6, device=DEVICE)
    for fuse_mlp, head in ((False, "hpml::linear_act"), (True, "hpml::mlp")):
        pinned = hpml_ops.convert(_convnet().to(DEVICE), backend="cpp", fuse_mlp=fuse_mlp)
        free = hpml_ops.convert(_convnet().to(DEVICE), fuse_mlp=fuse_mlp)
        kinds = hpml_ops.nn.FusedLinear | hpml_ops.nn.BatchNorm2d | hpml_ops.nn.FusedMLP
        assert all(m.backend == "cpp" for m in pinned.modules() if isinstance(m, kinds))
        with hpml_ops.use_backend("reference"):
            assert _hpml_ops_run(pinned, x) == {head, "hpml::batch_norm"}
            assert _hpml_ops_run(free, x) == set()
        with hpml_ops.use_backend("cpp"):
            assert _hpml_ops_run(free, x) == {head, "hpml::batch_norm"}
    loss = hpml_ops.convert(nn.BCEWithLogitsLoss(), backend="reference")
    assert loss.backend == "reference"
    y = torch.randn(4, 2, device=DEVICE)
    with hpml_ops.use_backend("cpp"):
        assert _hpml_ops_run(loss, y, torch.rand_like(y)) == set()


@pytest.mark.parametrize("fuse_mlp", [True, False], ids=["fused-mlp", "pairs"])
def test_compile_converted_fullgraph(fuse_mlp):
    """A model converted with a pinned backend compiles with no graph break (the use_backend
    block inside each forward traces; with fuse_mlp=False the fused pairs' hand-over to their
    activation slots too) and trains as in eager."""
    if hpml_ops._backend.unavailable_reason("cpp", torch.device(DEVICE).type, "batch_norm"):
        pytest.skip("needs the cpp backend's linear_act and batch_norm on this device")
    torch._dynamo.reset()
    torch.manual_seed(10)
    eager = hpml_ops.convert(
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1), nn.Tanh()),
        backend="cpp",
        fuse_mlp=fuse_mlp,
    ).to(DEVICE)
    comp = copy.deepcopy(eager)
    x = torch.randn(16, 6, device=DEVICE)
    with hpml_ops.use_backend("reference"):
        ye = eager(x)
        ye.sum().backward()
        yc = torch.compile(comp, fullgraph=True)(x)
        yc.sum().backward()
    torch.testing.assert_close(yc, ye, atol=FP32_ATOL, rtol=FP32_RTOL)
    for (name, pc), pe in zip(comp.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, atol=FP32_ATOL, rtol=FP32_RTOL, msg=name)
    torch.testing.assert_close(comp[1].running_mean, eager[1].running_mean)


def test_bad_backend(monkeypatch):
    model = _mlp()
    with pytest.raises(ValueError, match=r"convert: backend must be None or one of .* 'cuda'"):
        hpml_ops.convert(model, backend="cuda")
    with pytest.raises(ValueError, match="convert: backend"):
        hpml_ops.convert(model, backend=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hpml_ops.convert(model.state_dict())
    with pytest.raises(ValueError, match="FusedLinear: backend must be None"):
        hpml_ops.nn.FusedLinear(3, 4, backend="fast")
    with pytest.raises(ValueError, match="BatchNorm2d: backend must be None"):
        hpml_ops.nn.BatchNorm2d(3, backend="fast")
    with pytest.raises(ValueError, match="BCEWithLogitsLoss: backend must be None"):
        hpml_ops.nn.BCEWithLogitsLoss(backend="fast")

    def nothing_runs(name, device_type, op=None):
        return None if name == "reference" else f"{name} switched off for this test"

    monkeypatch.setattr(hpml_ops._backend, "unavailable_reason", nothing_runs)
    monkeypatch.setattr(hpml_ops._backend, "_usable", set())  # as in a process that never ran one
    with pytest.raises(hpml_ops.BackendUnavailableError, match="switched off for this test"):
        hpml_ops.convert(model, backend="cpp")
    assert type(model[0]) is nn.Linear, "a failed convert must leave the model untouched"


def test_fuse_mlp_replaces_whole_mlps_and_says_what_it_leaves():
    """A whole-MLP nn.Sequential becomes a FusedMLP with the same children (same objects, same
    state_dict keys, train flag kept; a bare one is returned); a Sequential with a Dropout, a
    hook, a shared module or a SyncBatchNorm in it gets the per-layer fusion, and the report says
    why."""
    torch.manual_seed(11)

    def net(*extra):
        return nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), *extra, nn.Linear(9, 2))

    bare = net()
    bare.eval()
    bare[2].train()  # a child in another mode keeps it
    params = dict(bare.named_parameters())
    keys = list(bare.state_dict())
    original = copy.deepcopy(bare)
    report: list[str] = []
    fused = hpml_ops.convert(bare, report=report)
    assert type(fused) is hpml_ops.nn.FusedMLP and not fused.training
    assert [m.training for m in fused.modules()] == [m.training for m in original.modules()]
    assert report == ["(model): Linear, BatchNorm1d, ReLU, Linear -> FusedMLP"]
    assert list(fused.state_dict()) == keys
    assert all(p is params[n] for n, p in fused.named_parameters())
    x = torch.randn(5, 6, device=DEVICE)
    torch.testing.assert_close(fused.to(DEVICE)(x), original.to(DEVICE)(x), atol=FP32_ATOL,
                               rtol=FP32_RTOL)  # fmt: skip

    hooked = net()
    hooked[1].register_forward_hook(lambda m, i, o: None)
    shared_lin = nn.Linear(9, 9)
    model = nn.Module()
    model.a = net(nn.Dropout(0.1))
    model.b = hooked
    model.c = net(shared_lin, nn.ReLU(), shared_lin, nn.ReLU())
    model.d = net(nn.SyncBatchNorm(9))
    model.e = nn.Sequential(net(), nn.Dropout(0.1))  # the inner block is fused in its slot
    model.f = nn.Sequential(net())  # a Sequential of one whole MLP is one
    relu = nn.ReLU()  # one activation module in several slots: still a whole MLP
    model.g = nn.Sequential(nn.Linear(6, 5), relu, nn.Linear(5, 5), relu, nn.Linear(5, 1))
    report = []
    hpml_ops.convert(model, report=report)
    assert type(model.e[0]) is hpml_ops.nn.FusedMLP and type(model.e) is nn.Sequential
    assert type(model.f) is hpml_ops.nn.FusedMLP and type(model.f[0]) is nn.Sequential
    assert type(model.g) is hpml_ops.nn.FusedMLP and model.g[1] is model.g[3]
    for name in "abcd":
        assert type(getattr(model, name)) is nn.Sequential, name
    assert type(model.a[0]) is hpml_ops.nn.FusedLinear  # the per-layer fusion instead
    why = dict(line.split(": ", 1) for line in report)
    assert "Dropout" in why["a"] and "is not Linear, [BatchNorm1d]" in why["a"]
    assert why["b"] == "left to the per-layer ops: a module in it has hooks"
    assert why["c"] == "left to the per-layer ops: a module in it sits in more than one place"
    assert "SyncBatchNorm" in why["d"]
    assert "Dropout" in why["e"]
    assert why["e.0"] == why["f"] == "Linear, BatchNorm1d, ReLU, Linear -> FusedMLP"


def _with_runs() -> nn.Sequential:
    """An MLP with a Flatten before it, a Dropout inside, a change of activation and a batch norm
    on its last layer: two runs (1-6 and 8-11) and per-layer modules around them."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 9),
        nn.BatchNorm1d(9),
        nn.ReLU(),
        nn.Linear(9, 7),
        nn.Dropout(0.25),
        nn.Linear(7, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
        nn.BatchNorm1d(3),
        nn.ReLU(),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", backend_params(op="mlp"))
def test_runs_inside_a_sequential_are_fused(backend, mode):
    """Issue 12: convert fuses each maximal run of Linear, [BatchNorm1d], activation, ..., Linear
    inside a larger nn.Sequential into one hpml_ops.mlp op (a FusedRuns with the same children:
    the same state_dict keys, loading both ways) and converts the rest per layer; training steps
    (Dropout with the same random draws) give torch's outputs, gradients and running statistics."""
    torch.manual_seed(3)
    model = _with_runs().to(DEVICE)
    getattr(model, mode)()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    report: list[str] = []
    converted = hpml_ops.convert(model, report=report)
    assert type(converted) is hpml_ops.nn.FusedRuns
    assert converted.runs == [("1", "6"), ("8", "11")]
    assert report == [
        "(model): 1-6 (Linear, ReLU, Linear, BatchNorm1d, ReLU, Linear) -> one hpml_ops.mlp op "
        "(FusedRuns)",
        "(model): 8-11 (Linear, Tanh, Linear, Tanh) -> one hpml_ops.mlp op (FusedRuns)",
    ]
    # The runs keep torch's modules; the rest is converted (Linear alone, BatchNorm1d + ReLU).
    assert [type(m).__name__ for m in converted][:12] == [type(m).__name__ for m in original][:12]
    assert type(converted[12]) is hpml_ops.nn.FusedLinear
    assert type(converted[13]) is hpml_ops.nn.BatchNorm1d and converted[13].activation == "relu"
    assert list(converted.state_dict()) == keys
    converted.load_state_dict(original.state_dict())
    original.load_state_dict(converted.state_dict())
    x = torch.randn(10, 3, 4, device=DEVICE)
    target = torch.rand(10, 3, device=DEVICE)
    oracle = copy.deepcopy(original).double()
    for _ in range(2):  # two steps: the running statistics after each
        runs = []
        for m, inp, tgt in ((oracle, x.double(), target.double()), (original, x, target)):
            torch.manual_seed(7)  # the same Dropout draws in every run
            runs.append((_step(m, nn.MSELoss(), inp, tgt), m))
        torch.manual_seed(7)
        with hpml_ops.use_backend(backend):
            runs.append((_step(converted, nn.MSELoss(), x, target), converted))
        # Against torch in float64, torch's own fp32 error the yardstick (the bias before the
        # last batch norm has a gradient of rounding noise only, in torch's fp32 too).
        (ref, m64), (same, m32), (ours, mine) = runs
        for what, o, r, t in zip(("output", "loss", "input grad"), ours, ref, same, strict=True):
            assert_close_to_oracle(o, r, t, what=what)
        for (name, p), q, t in zip(
            mine.named_parameters(), m64.parameters(), m32.parameters(), strict=True
        ):
            assert_close_to_oracle(p.grad, q.grad, t.grad, what=f"grad {name}")
        for (name, b), c, t in zip(mine.named_buffers(), m64.buffers(), m32.buffers(), strict=True):
            if b.is_floating_point():
                assert_close_to_oracle(b, c, t, what=name)
            else:
                assert torch.equal(b, c), name


def test_runs_use_one_op_and_fall_back_when_they_must():
    """Each run is one hpml::mlp call forward (and one hpml::mlp_backward); a hook on a run's
    module, added after convert, makes that run go module by module (the hook sees its module's
    own output); a run whose child was replaced by something else does too."""
    torch.manual_seed(4)
    model = _with_runs().eval()
    converted = hpml_ops.convert(copy.deepcopy(model))
    x = torch.randn(6, 3, 4, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        converted(x).sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("hpml::mlp") == 2 and names.count("hpml::mlp_backward") == 2
    seen = []
    converted[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(converted(x), model(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert seen == [torch.Size([6, 9])]
    converted[9] = nn.Sigmoid()  # 8-11 is now Linear, Sigmoid, Linear, Tanh: still one op
    model[9] = nn.Sigmoid()
    torch.testing.assert_close(converted(x), model(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    converted[11] = nn.GELU()  # no longer an MLP hpml_ops.mlp runs: module by module
    model[11] = nn.GELU()
    torch.testing.assert_close(converted(x), model(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    del converted[9], model[9]  # a child deleted (the others renumbered): runs by their names
    torch.testing.assert_close(converted(x), model(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    with pytest.raises(ValueError, match=r"run \('3', '8'\) overlaps"):
        hpml_ops.nn.FusedRuns(*_with_runs(), runs=[("1", "6"), ("3", "8")])
    with pytest.raises(ValueError, match=r"run \('6', '1'\) is not in order"):
        hpml_ops.nn.FusedRuns(*_with_runs(), runs=[("6", "1")])
    with pytest.raises(ValueError, match="names a missing child"):
        hpml_ops.nn.FusedRuns(*_with_runs(), runs=[("1", "99")])
    assert hpml_ops.nn.FusedRuns(*_with_runs()).runs == [("1", "6"), ("8", "11")]


@pytest.mark.parametrize("backend", backend_params(op="mlp", include_reference=False))
def test_runs_compile_fullgraph(backend):
    """A FusedRuns compiles with no graph break and gives the numbers it gives eagerly (Dropout
    at p=0: compiled code draws other random numbers than eager)."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = _with_runs().to(DEVICE)
    model[7].p = 0.0
    converted = hpml_ops.convert(model)
    eager = copy.deepcopy(converted)
    x = torch.randn(6, 3, 4, device=DEVICE)
    with hpml_ops.use_backend(backend):
        y = torch.compile(converted, fullgraph=True)(x)
        y.square().sum().backward()
        y_ref = eager(x)
        y_ref.square().sum().backward()
    tol = {"atol": FP32_ATOL, "rtol": FP32_RTOL}
    torch.testing.assert_close(y, y_ref, **tol)
    for (name, p), q in zip(converted.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), c in zip(converted.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_runs_under_torch_tools():
    """A converted model with runs works where torch's own does (issue 15's table): on the meta
    device, through torch.fx.symbolic_trace, torch.export, torch.func.grad of functional_call
    (after which it still deep-copies: no functorch wrapper is kept in its caches; FusedMLP too),
    SyncBatchNorm.convert_sync_batchnorm (the run with a SyncBatchNorm in it then runs module by
    module) and non-reentrant checkpointing, with torch's numbers."""
    torch.manual_seed(6)
    original = _with_runs().eval()
    converted = hpml_ops.convert(copy.deepcopy(original))
    x = torch.randn(5, 3, 4)
    tol = {"atol": FP32_ATOL, "rtol": FP32_RTOL}
    with torch.device("meta"):
        y = hpml_ops.convert(_with_runs())(torch.randn(5, 3, 4))
    assert y.shape == (5, 3) and y.device.type == "meta"
    torch.testing.assert_close(torch.fx.symbolic_trace(converted)(x), original(x), **tol)
    exported = torch.export.export(converted, (x,))
    assert any("hpml" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), original(x), **tol)
    whole = hpml_ops.convert(nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)))
    assert type(whole) is hpml_ops.nn.FusedMLP
    for model, inp in ((converted, x), (whole, x.flatten(1))):

        def loss(params, model=model, inp=inp):
            return torch.func.functional_call(model, params, (inp,)).sum()

        params = dict(model.named_parameters())
        grads = torch.func.grad(loss)(params)
        assert grads.keys() == params.keys()
        copy.deepcopy(model)(inp)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(converted))
    assert type(synced) is hpml_ops.nn.FusedRuns and type(synced[4]) is nn.SyncBatchNorm
    torch.testing.assert_close(synced(x), original(x), **tol)
    train, ref = copy.deepcopy(converted).train(), copy.deepcopy(original).train()
    train[7].p = ref[7].p = 0.0
    xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(train, xi, use_reentrant=False).sum().backward()
    ref(xr).sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad, **tol)


def test_runs_leave_out_what_they_cannot_fuse():
    """A module with hooks or in two places ends a run; a Sequential whose runs are all a single
    layer stays a Sequential (per-layer fusion); convert(fuse_mlp=False) makes no FusedRuns."""
    shared = nn.Linear(5, 5)
    hooked = nn.Linear(5, 5)
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Module()
    model.a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), hooked, nn.ReLU(), nn.Linear(5, 2))
    model.b = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), shared, nn.ReLU(), shared, nn.Dropout())
    model.c = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Dropout())
    model.d = copy.deepcopy(model.c)
    model.c.eval()
    hpml_ops.convert(model.d, fuse_mlp=False)
    hpml_ops.convert(model)
    assert type(model.a) is nn.Sequential and type(model.b) is nn.Sequential
    assert type(model.c) is hpml_ops.nn.FusedRuns and model.c.runs == [("0", "3")]
    assert type(model.d) is nn.Sequential and type(model.d[0]) is hpml_ops.nn.FusedLinear


@pytest.mark.parametrize("fuse_mlp", [False, True], ids=["per-layer", "fuse-mlp"])
def test_meta_device(fuse_mlp):
    """Built on the meta device (deferred initialisation, shape inference), a converted model runs
    forward and backward there as torch's does: the same shapes, dtypes and device."""
    with torch.device("meta"):
        original = _convnet()
        converted = hpml_ops.convert(copy.deepcopy(original), fuse_mlp=fuse_mlp)
        x = torch.randn(5, 3, 6, 6)
        target = torch.rand(5, 2)
        results = []
        for model in (original, converted):
            loss_fn = (
                nn.BCEWithLogitsLoss() if model is original else hpml_ops.nn.BCEWithLogitsLoss()
            )
            y = model(x)
            loss_fn(y, target).backward()
            results.append([y, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        assert (a.shape, a.dtype, a.device.type) == (b.shape, b.dtype, "meta")


def test_non_reentrant_checkpoint():
    """torch.utils.checkpoint with use_reentrant=False (torch's recommended mode) and
    checkpoint_sequential recompute our per-layer ops in the backward and give torch's outputs,
    gradients and running statistics (fp64). Not yet with fuse_mlp: a FusedMLP at the end of a
    checkpointed region updates its running statistics once where torch's modules update them
    twice (checkpoint stops the recomputation when the op has saved its tensors, before the
    Python-side update): issue 15."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    torch.manual_seed(12)
    original = _convnet().to(DEVICE, torch.float64)
    converted = hpml_ops.convert(copy.deepcopy(original), fuse_mlp=False)
    x = torch.randn(5, 3, 6, 6, device=DEVICE, dtype=torch.float64)
    results = []
    for model in (original, converted):
        y = checkpoint(model, x, use_reentrant=False)
        y.square().sum().backward()
        y2 = checkpoint_sequential(model, 2, x, use_reentrant=False)
        y2.square().sum().backward()
        results.append([y, y2, *(p.grad for p in model.parameters()), *model.buffers()])
    atol, rtol = TOL[torch.float64]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)


def _pairs_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.Sigmoid(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
        nn.Tanh(),
    )


@pytest.mark.parametrize("backend", backend_params(op="batch_norm"))
def test_fused_activation_survives_torch_helpers(backend):
    """A torch helper that rebuilds a fused module from its class (convert_sync_batchnorm,
    fuse_conv_bn_eval) or a hook that returns another tensor neither loses nor doubles the fused
    activation: its slot applies it to anything but the fused module's own output."""
    torch.manual_seed(7)
    model = _pairs_model().to(DEVICE).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 3, 6, 6, device=DEVICE)
    want = model(x)
    ours = hpml_ops.convert(copy.deepcopy(model), backend=backend, fuse_mlp=False)
    assert type(ours[2]).__name__ == "AbsorbedReLU" and isinstance(ours[2], nn.ReLU)
    torch.testing.assert_close(ours(x), want)
    # torch's SyncBatchNorm rebuilds both batch norms without our ReLU (eval: no process group).
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[7]) is nn.SyncBatchNorm
    torch.testing.assert_close(synced(x), want)
    # ours keeps the ReLU in the batch norm, and its slot passes the output through
    ours_synced = hpml_ops.nn.convert_sync_batchnorm(copy.deepcopy(ours))
    assert ours_synced[1].activation == "relu"
    torch.testing.assert_close(ours_synced(x), want)
    # conv + batch norm folded by hand, as torch's helper is used
    folded = copy.deepcopy(ours)
    folded[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(folded[0], folded[1])
    folded[1] = nn.Identity()
    torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=1e-4)
    # a hook that returns another tensor: it flows into the activation, as in torch's model
    for m in (model, ours):
        m[4].register_forward_hook(lambda mod, i, o: o * 2.0)
    torch.testing.assert_close(ours(x), model(x))


@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_forward_hook_sees_the_pre_activation_output(backend):
    """A forward hook added after convert on a fused Linear sees what it sees on torch's Linear
    (the product, before the activation); the model's output and gradients stay torch's."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.ReLU()).to(DEVICE)
    ours = hpml_ops.convert(copy.deepcopy(model), backend=backend, fuse_mlp=False)
    seen = {}
    for name, m in (("torch", model), ("ours", ours)):
        m[0].register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.detach()))
    x = torch.randn(6, 4, device=DEVICE)
    want, got = model(x), ours(x)
    torch.testing.assert_close(seen["ours"], seen["torch"])
    assert seen["ours"].min() < 0 or seen["ours"].abs().max() > 1  # not tanh's output
    torch.testing.assert_close(got, want)
    want.square().sum().backward()
    got.square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_fused_pairs_pickle_and_copy():
    """The hand-over between a fused module and its slot is not state: the state_dict is torch's,
    a pickled or copied model still fuses (one kernel applies the activation) and is right."""
    import io

    torch.manual_seed(9)
    model = _pairs_model().eval()
    ours = hpml_ops.convert(copy.deepcopy(model), fuse_mlp=False)
    assert list(ours.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    ours(x)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (loaded, copy.deepcopy(ours)):
        assert m[4].__dict__["_hpml_absorbed"] is m[5]
        torch.testing.assert_close(m(x), model(x))
        assert "_fused_out" not in m[5].__dict__  # popped by the slot


class _SequentialSubclass(nn.Sequential):
    """As torchvision's ops.MLP / Conv2dNormActivation: an nn.Sequential subclass that builds its
    layers and keeps nn.Sequential's forward, with an attribute of its own."""

    def __init__(self, widths):
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(widths[-2], widths[-1]))
        self.widths = tuple(widths)


class _OwnForward(nn.Sequential):
    def forward(self, x):  # not in order: the ReLU's slot must not be fused with the Linear
        return self[1](x) + self[0](x)


@pytest.mark.parametrize("backend", backend_params(op="linear_act"))
def test_fuses_inside_sequential_subclasses(backend):
    torch.manual_seed(11)
    model = nn.Sequential(
        _SequentialSubclass([5, 7, 6, 2]), _OwnForward(nn.Linear(2, 2), nn.ReLU())
    )
    model = model.to(DEVICE)
    original = copy.deepcopy(model)
    ours = hpml_ops.convert(copy.deepcopy(model), backend=backend)
    sub = ours[0]
    assert type(sub) is _SequentialSubclass and sub.widths == (5, 7, 6, 2)
    assert type(sub[0]) is hpml_ops.nn.FusedLinear and sub[0].activation == "relu"
    assert type(sub[1]).__name__ == "AbsorbedReLU" and sub[1].inplace
    assert type(ours[1][0]) is hpml_ops.nn.FusedLinear and ours[1][0].activation == "none"
    assert type(ours[1][1]) is nn.ReLU
    assert list(ours.state_dict()) == list(original.state_dict())
    x = torch.randn(9, 5, device=DEVICE)
    torch.testing.assert_close(ours(x), original(x))
