"""Benchmark: binary cross-entropy with logits (reduction="mean", no weights), forward, backward and
forward+backward, for every provider, side by side in one run.

Providers are timed interleaved (eager first) on the CPU; "vs_eager" is the median of the per-
round ratios. Bytes the op must move (s = element size, N elements): forward reads input and
target, 2Ns; backward reads them again and writes grad_input, 3Ns (the upstream gradient is one
scalar); forward+backward 5Ns. (A forward that also wrote grad_input would move 3Ns in all, but it
writes N elements that an evaluation-only forward never needs, and the backward must still scale
them by the upstream gradient unless it reads that gradient on the host.) Rates are reported
against the copy bandwidth measured in the same run. Per element the forward also does one exp,
one division and a degree-7 polynomial (log1p), the backward one exp and one division: compute,
not only bytes, bounds the CPU.

    python benchmarks/bench_bce_with_logits.py [--device cpu|cuda] [--sizes 16,18,...]
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


def _torch_fn(x, y):
    return F.binary_cross_entropy_with_logits(x, y)


def _ours_fn(x, y):
    return hpml_ops.binary_cross_entropy_with_logits(x, y)


def make_case(fn, mode: str, n: int, dtype, device: str):
    """(call, setup) for one mode on fresh inputs of n elements."""
    g = torch.Generator(device="cpu").manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(device, dtype).requires_grad_()
    y = torch.rand(n, generator=g).to(device, dtype)

    def clear():
        x.grad = None

    if mode == "fwd":
        return (lambda: fn(x, y)), None
    if mode == "bwd":
        loss = fn(x, y)
        return (lambda: loss.backward(retain_graph=True)), clear
    return (lambda: fn(x, y).backward()), clear


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="log2 of the element counts")
    args = parse(p, argv, PROVIDERS, gpu_dtype="float32")
    device, dtype, modes = args.device, args.dtype, args.modes
    default_sizes = "16,18,20,22,24,26" if args.on_gpu else "16,18,20,22,24"
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    elt = torch.empty((), dtype=dtype).element_size()
    meta, live = start("bce_with_logits", device, dtype, args.providers, copy=True)
    copy_gbs = meta["copy_GBps"]
    rows = []
    for log2n in sizes:
        n = 1 << log2n
        # One compiled function per size (shapes static): forward and backward graphs are
        # compiled on its first call and reused by every mode.
        torch._dynamo.reset()
        fns = provider_fns(_torch_fn, _ours_fn, live)
        for mode in modes:
            nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n * elt
            res = bench_side_by_side(
                {p: make_case(fns[p], mode, n, dtype, device) for p in live},
                device,
                min_time=args.min_time,
            )
            key = {"n": f"2^{log2n}", "mode": mode}
            record_bandwidth(rows, key, f"2^{log2n:<3} {mode:>8}", res, nbytes, copy_gbs, 4)
    return finish("bce_with_logits", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
