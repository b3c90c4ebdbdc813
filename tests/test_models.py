"""hpml_ops.models.MLP: layout, state_dict round trip with the plain-PyTorch twin, forward and
backward parity with it, and the initialisers' statistics."""

from __future__ import annotations

import math

import pytest
import torch

import hpml_ops
from hpml_ops.models import MLP, init_linear_, plain_mlp

from .helpers import TOL, backend_params

ACTS = ("relu", "leaky_relu", "sigmoid", "tanh", "none")


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no_bn"])
@pytest.mark.parametrize("activation", ACTS)
def test_state_dict_round_trip(activation, batch_norm):
    """Same keys, shapes and (same seed) values in the fused and the plain model; a state_dict
    of either loads strictly into the other and back."""
    torch.manual_seed(0)
    fused = MLP(7, [12, 5], 3, activation=activation, batch_norm=batch_norm)
    torch.manual_seed(0)
    plain = plain_mlp(7, [12, 5], 3, activation=activation, batch_norm=batch_norm)
    sf, sp = fused.state_dict(), plain.state_dict()
    assert list(sf) == list(sp)
    for k in sf:
        assert torch.equal(sf[k], sp[k]), k
    # The same modules (PyTorch's) in both; the fused one runs them as one op.
    for m in (fused, plain):
        assert type(m[0][0]) is torch.nn.Linear and type(m[-1]) is torch.nn.Linear
        if batch_norm:
            assert type(m[0][1]) is torch.nn.BatchNorm1d
    assert isinstance(fused, hpml_ops.nn.FusedMLP) and fused.fused and not plain.fused
    # Round trip: perturb, save from one, load into the other, and back.
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p))
        for b in fused.buffers():
            if b.is_floating_point():
                b.add_(1.5)
    plain.load_state_dict(fused.state_dict())
    back = MLP(7, [12, 5], 3, activation=activation, batch_norm=batch_norm)
    back.load_state_dict(plain.state_dict())
    for k, v in fused.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
        assert torch.equal(back.state_dict()[k], v), k


def test_twin_and_config():
    m = MLP(4, [6], 2, activation="tanh", batch_norm=True, init="xavier")
    t = m.twin()
    assert t.fused is False and m.fused is True
    assert t.config() == m.config()
    assert MLP(**m.config()).config() == m.config()
    for k, v in m.state_dict().items():
        assert torch.equal(t.state_dict()[k], v)
    assert t.twin().fused is True


def test_no_hidden_layers_is_logistic_regression():
    m = MLP(5, [], 1)
    assert len(m) == 1 and type(m[0]) is torch.nn.Linear
    assert m(torch.randn(3, 5)).shape == (3, 1)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_forward_backward_match_plain(backend, activation):
    """Outputs, input gradient, parameter gradients and running statistics of the fused model
    equal the plain model's within the suite's fp32 tolerance (tests/helpers.TOL)."""
    torch.manual_seed(1)
    fused = MLP(9, [16, 8], 2, activation=activation)
    plain = fused.twin()
    x = torch.randn(13, 9)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with hpml_ops.use_backend(backend):
        out_f = fused(xf)
        out_f.square().sum().backward()
    out_p = plain(xp)
    out_p.square().sum().backward()
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out_f, out_p, atol=atol, rtol=rtol)
    torch.testing.assert_close(xf.grad, xp.grad, atol=atol, rtol=rtol)
    pp = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, pp[name].grad, atol=atol, rtol=rtol, msg=name)
    bp = dict(plain.named_buffers())
    assert set(bp) == {n for n, _ in fused.named_buffers()}
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, bp[name], atol=atol, rtol=rtol, msg=name)


def _gain(act):
    return torch.nn.init.calculate_gain("linear" if act == "none" else act, 0.01)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("init", ["he", "he_uniform", "xavier", "xavier_uniform"])
def test_init_statistics(init, activation):
    """Weight std is the initialiser's target within 2% (512 x 1024 = 524k draws: the std of the
    sample std is ~0.1%), mean ~0, uniform draws within their bound, biases exactly zero; the
    head (logits) gets gain 1."""
    torch.manual_seed(0)
    fan_in, fan_out = 1024, 512
    m = MLP(fan_in, [fan_out], 256, activation=activation, batch_norm=False, init=init)
    layers = [(m[0][0], activation, fan_in, fan_out), (m[1], "none", fan_out, 256)]
    for layer, act, fi, fo in layers:
        w = layer.weight.detach().double()
        if init.startswith("he"):
            target = _gain(act) / math.sqrt(fi)  # the lecture's sqrt(2 / r_in) for ReLU
        else:
            target = _gain(act) * math.sqrt(2.0 / (fi + fo))  # Glorot
        assert abs(w.std().item() / target - 1) < 0.02, (init, act, w.std().item(), target)
        assert abs(w.mean().item()) < 0.02 * target
        if init.endswith("uniform"):
            assert w.abs().max().item() <= math.sqrt(3) * target * (1 + 1e-6)
        else:
            assert w.abs().max().item() > math.sqrt(3) * target  # Gaussian tails
        assert torch.count_nonzero(layer.bias) == 0


def test_he_is_the_lecture_formula():
    """He for ReLU: Gaussian, std sqrt(2 / r_in)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(2000, 400)
    init_linear_(lin, "he", "relu")
    assert abs(lin.weight.std().item() / math.sqrt(2 / 2000) - 1) < 0.01


def test_torch_init_keeps_default():
    torch.manual_seed(3)
    ref = torch.nn.Linear(6, 4)
    torch.manual_seed(3)
    m = MLP(6, [], 4, init="torch")
    assert torch.equal(m[0].weight, ref.weight) and torch.equal(m[0].bias, ref.bias)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "gelu"}, "activation"),
        ({"init": "orthogonal"}, "init"),
        ({"hidden_sizes": [4, 0]}, "positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"in_features": 3, "hidden_sizes": [4], **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)


def test_fused_runs_the_whole_network_as_one_op():
    """MLP(fused=True) runs one hpml::mlp forward and one hpml::mlp_backward per step (below
    autograd: what a TorchDispatchMode sees), and no matrix product of torch's; the plain form
    runs torch's ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(9, 7)
    for fused in (True, False):
        m = MLP(7, [12, 5], 3, fused=fused)
        with Record() as rec:
            m(x).square().sum().backward()
        mine = [op.removesuffix("_triton") for op in rec.ops if op.startswith("hpml.")]
        products = [op for op in rec.ops if op in ("aten.addmm", "aten.mm", "aten.linear")]
        if fused:
            assert mine == ["hpml.mlp", "hpml.mlp_backward"] and not products, rec.ops
        else:
            assert not mine and products, rec.ops
