"""Benchmark: batch normalization (training unless "fwd-eval"), forward, backward and
forward+backward, for every provider, side by side in one run.

Providers are timed interleaved (eager first) on the CPU; "vs_eager" is the median of the
per-round ratios. Bytes (N values, s bytes each): the training forward reads x twice (statistics,
then normalisation: x does not stay in cache at these sizes) and writes y, 3Ns; the eval forward
reads x and writes y, 2Ns; the backward reads x and dy and writes dx, 3Ns (ours reads x and dy
twice, once for the two channel sums and once for dx: 5Ns moved); forward+backward 6Ns. Rates are
reported against the copy bandwidth measured in the same run.

    python benchmarks/bench_batch_norm.py [--device cpu|cuda] [--shapes 65536x256,...]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import (
    base_parser,
    bench_side_by_side,
    finish,
    parse,
    provider_fns,
    record_bandwidth,
    start,
)

import hpml_ops

PROVIDERS = ("eager", "compile", "cpp", "triton")
MODES = ("fwd", "fwd-eval", "bwd", "fwd+bwd")
BYTES = {"fwd": 3, "fwd-eval": 2, "bwd": 3, "fwd+bwd": 6}


def _torch_fn(x, w, b, rm, rv, training):
    return F.batch_norm(x, rm, rv, w, b, training)


def _ours_fn(x, w, b, rm, rv, training):
    return hpml_ops.batch_norm(x, rm, rv, w, b, training)


def make_case(fn, mode: str, shape, dtype, device: str):
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

    def clear():
        x.grad = w.grad = b.grad = None

    if mode == "fwd":
        return (lambda: fn(x, w, b, rm, rv, True)), None
    if mode == "fwd-eval":
        xd = x.detach()
        return (lambda: fn(xd, w.detach(), b.detach(), rm, rv, False)), None
    gy = torch.randn(shape, device=device, dtype=dtype)
    if mode == "bwd":
        y = fn(x, w, b, rm, rv, True)
        return (lambda: y.backward(gy, retain_graph=True)), clear
    return (lambda: fn(x, w, b, rm, rv, True).backward(gy)), clear


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="65536x256,4096x1024,256x64x56x56")
    args = parse(p, argv, PROVIDERS, modes=MODES)
    device, dtype, modes = args.device, args.dtype, args.modes
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elt = torch.empty((), dtype=dtype).element_size()
    meta, live = start("batch_norm", device, dtype, args.providers, copy=True)
    copy_gbs = meta["copy_GBps"]
    rows = []
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        torch._dynamo.reset()
        fns = provider_fns(_torch_fn, _ours_fn, live)
        name = "x".join(map(str, shape))
        for mode in modes:
            nbytes = BYTES[mode] * numel * elt
            res = bench_side_by_side(
                {p: make_case(fns[p], mode, shape, dtype, device) for p in live},
                device,
                min_time=args.min_time,
            )
            key = {"shape": name, "mode": mode}
            record_bandwidth(rows, key, f"{name:>14} {mode:>9}", res, nbytes, copy_gbs, 3)
    return finish("batch_norm", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
