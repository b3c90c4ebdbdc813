"""Benchmark: fused linear + ReLU, relu(x @ W.T + b), forward, backward and forward+backward, for
every provider, side by side in one run.

Providers are timed interleaved (eager first) on the CPU; "vs_eager" is the median of the
per-round ratios. FLOPs (x: M x K, W: N x K): forward 2MNK, backward 4MNK (dX and dW; dZ and
the bias gradient are O(MN)), forward+backward 6MNK. Rates are reported against a plain
``torch.mm`` of the same shape and dtype timed in the same run (the ceiling a fused epilogue can
hope to keep). ``saved_MB``: what the forward keeps for the backward beyond the input and the
parameters (eager keeps the ReLU output; ours keeps 1 bit per output element).

    python benchmarks/bench_linear_act.py [--device cpu|cuda] [--shapes 4096x1024x1024,...]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import (
    base_parser,
    bench,
    bench_side_by_side,
    finish,
    parse,
    provider_fns,
    start,
    timing_columns,
)

import hpml_ops

PROVIDERS = ("eager", "compile", "compile-max-autotune", "cpp", "triton")


def _torch_fn(x, w, b):
    return F.relu(F.linear(x, w, b))


def _ours_fn(x, w, b):
    return hpml_ops.linear_act(x, w, b, "relu")


def saved_bytes(fn, x, w, b) -> int:
    """Bytes the forward saves for the backward, beyond x, w and b themselves."""
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, b)}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w, b)
    return sum(total)


def make_case(fn, mode: str, x, w, b):
    """(call, setup) for one mode; gradients are cleared in setup, outside the timed region."""

    def clear():
        x.grad = w.grad = b.grad = None

    if mode == "fwd":
        return (lambda: fn(x, w, b)), None
    gy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    if mode == "bwd":
        y = fn(x, w, b)
        return (lambda: y.backward(gy, retain_graph=True)), clear
    return (lambda: fn(x, w, b).backward(gy)), clear


def time_mm(x, w, device: str, min_time: float) -> float:
    xd, wd = x.detach(), w.detach()
    return bench(lambda: torch.mm(xd, wd.t()), device, min_time=min_time)[0]


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="MxKxN,...")
    args = parse(p, argv, PROVIDERS)
    device, dtype, modes, on_gpu = args.device, args.dtype, args.modes, args.on_gpu
    default = (
        "4096x256x256,4096x1024x1024,65536x1024x1024,8192x8192x8192"
        if on_gpu
        else "4096x256x256,4096x1024x1024"
    )
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or default).split(",")]
    providers = args.providers
    unit, scale = ("TFLOP/s", 1e12) if on_gpu else ("GFLOP/s", 1e9)

    meta, live = start("linear_act (relu)", device, dtype, providers)

    rows = []
    for m, k, n in shapes:
        g = torch.Generator().manual_seed(m + k + n)
        x = torch.randn(m, k, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).requires_grad_()
        b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
        mm_ms = time_mm(x, w, device, args.min_time)
        mm_rate = 2 * m * n * k / (mm_ms * 1e-3) / scale
        print(f"{m}x{k}x{n}: torch.mm {mm_ms:.3f} ms = {mm_rate:.1f} {unit}", flush=True)
        torch._dynamo.reset()
        fns = provider_fns(_torch_fn, _ours_fn, live)
        saved = {p: saved_bytes(fns[p], x, w, b) for p in live}
        for mode in modes:
            flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * m * n * k
            res = bench_side_by_side(
                {p: make_case(fns[p], mode, x, w, b) for p in live}, device, min_time=args.min_time
            )
            for prov in live:
                r = res[prov]
                rate = flops / (r["ms"] * 1e-3) / scale
                rows.append(
                    {"shape": f"{m}x{k}x{n}", "mode": mode, "provider": prov}
                    | timing_columns(r, live, 3)
                    | {
                        unit: round(rate, 2),
                        "of_mm": round(rate / mm_rate, 3),
                        "saved_MB": round(saved[prov] / 2**20, 3),
                    }
                )
                print(
                    f"{m}x{k}x{n:<6} {mode:>8} {prov:>21}: {r['ms']:9.3f} ms {rate:8.1f} {unit} "
                    f"({rate / mm_rate:.0%} of mm) {r['vs_first']:6.3f}x eager "
                    f"saved {saved[prov] / 2**20:.3f} MB",
                    flush=True,
                )
    return finish("linear_act", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
