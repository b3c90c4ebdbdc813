"""The public functions honour ``__torch_function__`` as ``torch.nn.functional``'s do
(``has_torch_function`` / ``handle_torch_function``): tensor subclasses see the call, and
``torch.fx.symbolic_trace`` records it as a call (converted models included)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

import hpml_ops
from hpml_ops.ops.linear_act import _linear_act

from .helpers import DEVICE


class Logged(torch.Tensor):
    """A tensor subclass that records every function called on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def _logged(t):
    return t.as_subclass(Logged)


def test_subclasses_see_the_public_functions():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    cases = [
        (hpml_ops.linear_act, (_logged(x), w, b), (x, w, b)),
        (hpml_ops.linear_relu, (x, _logged(w), b), (x, w, b)),
        (
            hpml_ops.batch_norm,
            (_logged(x), torch.zeros(3), torch.ones(3), None, None, True),
            (x, torch.zeros(3), torch.ones(3), None, None, True),
        ),
        (
            hpml_ops.binary_cross_entropy_with_logits,
            (x, _logged(torch.rand(5, 3))),
            (x, torch.rand(5, 3, generator=torch.Generator().manual_seed(1))),
        ),
        (hpml_ops.mlp, (_logged(x), [w, torch.randn(2, 4)]), (x, [w, torch.randn(2, 4)])),
    ]
    for fn, args, _ in cases:
        Logged.calls.clear()
        out = fn(*args)
        assert Logged.calls[0] is (hpml_ops.linear_act if fn is hpml_ops.linear_relu else fn)
        assert type(out) is Logged, fn.__name__


def test_subclass_gets_the_same_values():
    torch.manual_seed(1)
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    out = hpml_ops.linear_act(_logged(x), w, b, "tanh")
    torch.testing.assert_close(out.as_subclass(torch.Tensor), hpml_ops.linear_act(x, w, b, "tanh"))


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(3, 6))
        self.register_buffer("rm", torch.zeros(6))
        self.register_buffer("rv", torch.ones(6))

    def forward(self, x, y):
        h = hpml_ops.linear_act(x, self.w1, None, "leaky_relu", 0.2)
        h = hpml_ops.batch_norm(h, self.rm, self.rv, None, None, False, 0.1, 1e-5, "relu")
        out = hpml_ops.mlp(h, [self.w2], activation="none")
        return hpml_ops.binary_cross_entropy_with_logits(out, y)


def test_symbolic_trace_records_the_functions():
    torch.manual_seed(2)
    m = _Functional().to(DEVICE)
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [
        hpml_ops.linear_act,
        hpml_ops.batch_norm,
        hpml_ops.mlp,
        hpml_ops.binary_cross_entropy_with_logits,
    ]
    x, y = torch.randn(7, 4, device=DEVICE), torch.rand(7, 3, device=DEVICE)
    torch.testing.assert_close(gm(x, y), m(x, y))
    gm.recompile()  # the generated code imports the functions by name
    torch.testing.assert_close(gm(x, y), m(x, y))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace_of_a_converted_model(training):
    """A converted model (FusedLinear, BatchNorm1d with its ReLU, a FusedMLP, the loss) traces;
    the GraphModule computes what the model does, running statistics included."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)),
        nn.Linear(2, 3),
    ).to(DEVICE)
    model.train(training)
    ours = hpml_ops.convert(copy.deepcopy(model), fuse_mlp=True)
    ours[3] = hpml_ops.nn.FusedMLP(*ours[3]) if type(ours[3]) is nn.Sequential else ours[3]
    assert isinstance(ours[3], hpml_ops.nn.FusedMLP)
    gm = torch.fx.symbolic_trace(copy.deepcopy(ours))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert _linear_act in targets
    x = torch.randn(9, 5, device=DEVICE)
    want = ours(x)
    got = gm(x)
    torch.testing.assert_close(got, want)
    got = gm(x)  # a second call: the statistics and the count move again, in both
    torch.testing.assert_close(got, ours(x))
    sd, gsd = ours.state_dict(), gm.state_dict()
    # In evaluation the graph reads no count, so the GraphModule keeps none.
    assert set(gsd) == set(sd) - (set() if training else {"1.num_batches_tracked"})
    for k, a in gsd.items():
        torch.testing.assert_close(a, sd[k], msg=k)


def test_symbolic_trace_refuses_a_cumulative_average():
    bn = hpml_ops.convert(nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(RuntimeError, match="momentum=None .* cannot be traced by torch.fx"):
        torch.fx.symbolic_trace(bn)
