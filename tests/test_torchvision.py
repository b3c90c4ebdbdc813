"""Code nobody here wrote: torchvision's models and building blocks, converted, against the same
model in torch (float64, train and eval: outputs, every gradient, running statistics), and
torchvision's FX feature extractor on a converted model. torchvision is a test dependency
(requirements-dev.txt pins it to the torch version)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import hpml_ops

from .helpers import DEVICE, backend_params

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test dependency")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402
from torchvision.ops import MLP, Conv2dNormActivation  # noqa: E402

F64 = dict(device=DEVICE, dtype=torch.float64)


def _models():
    return {
        "ops.MLP": (lambda: MLP(12, [16, 16, 5], norm_layer=nn.BatchNorm1d), (10, 12)),
        "ops.MLP dropout=0": (lambda: MLP(12, [9, 4], activation_layer=nn.Tanh), (7, 12)),
        "Conv2dNormActivation": (lambda: Conv2dNormActivation(3, 5, 3), (4, 3, 8, 8)),
        # 64 x 64: the last batch norms see 2 x 2 x 2 values per channel (at 32 x 32 only two,
        # whose normalisation is so ill-conditioned that fp64 rounding shows in the gradients).
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=7), (2, 3, 64, 64)),
        "mobilenet_v3_small": (
            lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
            (2, 3, 64, 64),
        ),
    }


MODELS = _models()


def _run(model, x, seed):
    xi = x.clone().requires_grad_()
    torch.manual_seed(100 + seed)  # the same dropout masks for both models
    out = model(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(g.to(out.device))
    return out.detach(), xi.grad


_SLOW = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the whole convnets take minutes under the Triton interpreter; there ops.MLP and "
    "Conv2dNormActivation run the Triton kernels (every model runs on the cpp, cuda-emu and "
    "reference backends, and on triton on a GPU)",
)


def _params():
    out = []
    for b in backend_params(op="batch_norm"):
        for name in MODELS:
            slow = b.values[0] == "triton" and name in ("resnet18", "mobilenet_v3_small")
            out.append(
                pytest.param(
                    b.values[0],
                    name,
                    marks=[*b.marks, *([_SLOW] if slow else [])],
                    id=f"{b.id}-{name}",
                )
            )
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "name"), _params())
def test_converted_model_matches_torch(backend, name, training):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(**F64).train(training)
    ours = hpml_ops.convert(copy.deepcopy(model), backend=backend)
    assert type(ours) is type(model)
    fused = [m for m in ours.modules() if type(m).__module__.startswith("hpml_ops")]
    assert fused, f"convert fused nothing in {name}"
    x = torch.randn(shape, **F64)
    for call in range(2):  # the running statistics move between the calls
        want, gx_want = _run(model, x, call)
        got, gx_got = _run(ours, x, call)
        torch.testing.assert_close(
            got, want, msg=lambda m, c=call: f"{name}: output, call {c}: {m}"
        )
        torch.testing.assert_close(gx_got, gx_want, msg=f"{name}: input gradient, call {call}")
    for (k, p), q in zip(model.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, k=k: f"{name}: grad {k}: {m}")
    sd = ours.state_dict()
    assert list(sd) == list(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, msg=f"{name}: {k}")


def test_sequential_subclasses_keep_their_class():
    """torchvision's MLP and Conv2dNormActivation are nn.Sequential subclasses: convert fuses
    inside them and keeps their class."""
    mlp = hpml_ops.convert(MLP(6, [8, 3], norm_layer=nn.BatchNorm1d), fuse_mlp=False)
    assert type(mlp) is MLP
    assert type(mlp[1]) is hpml_ops.nn.BatchNorm1d and mlp[1].activation == "relu"
    block = hpml_ops.convert(Conv2dNormActivation(3, 5, 3))
    assert type(block) is Conv2dNormActivation and block.out_channels == 5
    assert type(block[1]) is hpml_ops.nn.BatchNorm2d and block[1].activation == "relu"


def test_feature_extractor_on_a_converted_model():
    """torchvision's FX-based feature extractor traces a converted resnet18; the features are the
    torch model's."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=3).to(**F64).eval()
    ours = hpml_ops.convert(copy.deepcopy(model))
    nodes = {"layer1": "l1", "layer4": "l4", "fc": "fc"}
    want = create_feature_extractor(model, nodes)
    got = create_feature_extractor(ours, nodes)
    x = torch.randn(2, 3, 32, 32, **F64)
    a, b = got(x), want(x)
    for k in nodes.values():
        torch.testing.assert_close(a[k], b[k], msg=k)
