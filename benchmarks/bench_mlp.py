"""Benchmark: a whole MLP, forward, forward+backward and a full SGD step, plain PyTorch vs the same
network as one op (``hpml_ops.nn.FusedMLP``) vs today's per-layer ops (``hpml_ops.convert``) vs
``torch.compile``, side by side in one run.

Models (the same weights for every provider):

- ``small``: ``make train``'s 30-64-32-1 with BatchNorm1d + ReLU, batch 32;
- ``net``: the lecture's 256-120-84-10 with ReLU, batch 256;
- ``mnist``: 784-256-256-10 with BatchNorm1d + ReLU, batch 512 (an MNIST-sized classifier);
- ``w1000``: 1000-1000-1000-1 with ReLU, batch 1024 (wide layers whose products, 2^30
  multiply-adds and less, the whole-net kernel still runs by blocks of rows);
- ``wide``: 1024-1024-1024-1 with BatchNorm1d + ReLU, batch 4096 (products over 2^30: the
  whole-net op calls the per-layer products);
- ``narrow64``: 64 wide, 4 hidden layers of 64 with ReLU, 16 outputs, batch 2^20 (the GPU case
  of tiny-cuda-nn's fully fused MLP; the default on a GPU, with ``wide``).

fp32 on the CPU, fp16 on a GPU by default (``--dtype``).

Providers: ``eager`` (the ``nn.Sequential``), ``fused-mlp`` (``FusedMLP``, then the library's
loss op), ``fused-loss`` (``FusedMLP.bce_with_logits``: the net and the loss as one op each way,
``hpml_ops.mlp_bce_with_logits``; its ``fwd`` and ``fwd+bwd`` are ``fused-mlp``'s), ``per-layer``
(``convert(fuse_mlp=False)``), ``compile`` (``torch.compile`` of the ``nn.Sequential``).

Modes: ``fwd`` (training-mode forward, no graph kept: under ``torch.no_grad``), ``fwd+bwd``
(forward, sum of squares, backward), ``loss`` (forward, BCE-with-logits loss against fixed
targets, backward), ``step`` (zero_grad, the ``loss`` mode, SGD with momentum 0.9). Providers
timed interleaved on the CPU; "vs_eager" is the median of the per-round ratios. FLOPs:
2 x batch x (sum of in x out) forward, twice that backward.

    python benchmarks/bench_mlp.py [--models small,net,mnist,w1000,wide] [--threads N]
"""

from __future__ import annotations

import copy
import sys

import torch
from common import (
    base_parser,
    bench_side_by_side,
    check_names,
    finish,
    machine,
    parse,
    record_flops,
    sync,
)
from torch import nn

import hpml_ops

PROVIDERS = ("eager", "fused-mlp", "fused-loss", "per-layer", "compile")
MODES = ("fwd", "fwd+bwd", "loss", "step")


def _stack(widths, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1], strict=True):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.BatchNorm1d(fan_out)] if bn else [])
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


MODELS = {
    # name: (widths, batch norm, batch)
    "small": ((30, 64, 32, 1), True, 32),
    "net": ((256, 120, 84, 10), False, 256),
    "wide": ((1024, 1024, 1024, 1), True, 4096),
    # layers of 256-1000 outputs whose products stay below the per-layer path's 2^30 multiply-adds
    "mnist": ((784, 256, 256, 10), True, 512),
    "w1000": ((1000, 1000, 1000, 1), False, 1024),
    "narrow64": ((64, 64, 64, 64, 64, 16), False, 1 << 20),
}
GPU_MODELS = ("narrow64", "wide")
CPU_MODELS = ("small", "net", "mnist", "w1000", "wide")


def build(provider: str, model: nn.Sequential, backend: str) -> tuple[nn.Module, nn.Module]:
    model = copy.deepcopy(model)
    loss: nn.Module = nn.BCEWithLogitsLoss()
    if provider in ("fused-mlp", "fused-loss"):
        model = hpml_ops.nn.FusedMLP(*model, backend=backend)
        loss = hpml_ops.convert(loss, backend=backend)
    elif provider == "per-layer":
        model = hpml_ops.convert(model, backend=backend, fuse_mlp=False)
        loss = hpml_ops.convert(loss, backend=backend)
    elif provider == "compile":
        model = torch.compile(model, dynamic=False)
    return model, loss


def make_case(mode: str, model: nn.Module, loss_fn: nn.Module, x, y, fused_loss: bool = False):
    params = list(model.parameters())
    if fused_loss:

        def loss_of(x, y):
            return model.bce_with_logits(x, y)

    else:

        def loss_of(x, y):
            return loss_fn(model(x), y)

    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                model(x)

        return fwd, None
    if mode == "fwd+bwd":

        def clear():
            for p in params:
                p.grad = None

        return (lambda: model(x).square().sum().backward()), clear
    if mode == "loss":

        def clear():
            for p in params:
                p.grad = None

        return (lambda: loss_of(x, y).backward()), clear

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()

    return step, None


def main(argv=None, name: str = "mlp") -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--models", default=None, help="small,net,mnist,w1000,wide (CPU); narrow64,wide (GPU)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None, help="cpp on the CPU, triton on a GPU by default")
    args = parse(p, argv, PROVIDERS, gpu_dtype="float16", modes=MODES)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    backend = args.backend or ("triton" if device.startswith("cuda") else "cpp")
    providers, modes = args.providers, args.modes
    meta = machine(device)
    meta["backend"] = backend
    on_gpu = args.on_gpu
    dtype = args.dtype
    meta["dtype"] = str(dtype).removeprefix("torch.")
    meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(meta, flush=True)
    rows = []
    models = args.models.split(",") if args.models else list(GPU_MODELS if on_gpu else CPU_MODELS)
    check_names(p, "model", models, MODELS)
    for model_name in models:
        widths, bn, batch = MODELS[model_name]
        torch.manual_seed(0)
        model = _stack(widths, bn).to(device, dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, widths[0], generator=g).to(device, dtype)
        y = torch.randint(0, 2, (batch, widths[-1]), generator=g).to(device, dtype)
        macs = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True)) * batch
        torch._dynamo.reset()
        built = {prov: build(prov, model, backend) for prov in providers}
        for mode in modes:
            cases = {
                prov: make_case(mode, m, lf, x, y, fused_loss=prov == "fused-loss")
                for prov, (m, lf) in built.items()
            }
            for fn, setup in cases.values():  # warm-up, compilation included
                for _ in range(2):
                    if setup:
                        setup()
                    fn()
            sync(device)
            res = bench_side_by_side(cases, device, min_time=args.min_time)
            flops = {"fwd": 2, "fwd+bwd": 6, "loss": 6, "step": 6}[mode] * macs
            key = {"model": model_name, "batch": batch, "mode": mode, "dtype": meta["dtype"]}
            record_flops(rows, key, f"{model_name:>5} {mode:>7}", res, flops)
    return finish(name, meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
