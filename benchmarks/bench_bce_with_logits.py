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
    copy_bandwidth,
    env_note,
    machine,
    write_results,
)

import hpml_ops

PROVIDERS = ("eager", "compile", "cpp", "triton")


def _torch_fn(x, y):
    return F.binary_cross_entropy_with_logits(x, y)


def _ours_fn(x, y):
    return hpml_ops.binary_cross_entropy_with_logits(x, y)


def unavailable(provider: str, device: str) -> str | None:
    if provider in ("eager", "compile"):
        return None
    dt = torch.device(device).type
    if provider == "triton" and dt == "cpu":
        return "Triton runs interpreted on CPU: not a speed measurement"
    return hpml_ops._backend.unavailable_reason(provider, dt)


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


def with_backend(fn, backend: str):
    def run(*args):
        with hpml_ops.use_backend(backend):
            return fn(*args)

    return run


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="log2 of the element counts")
    args = p.parse_args(argv)
    device = args.device
    on_gpu = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or "float32")
    sizes = [
        int(s)
        for s in (args.sizes or ("16,18,20,22,24,26" if on_gpu else "16,18,20,22,24")).split(",")
    ]  # noqa: E501
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    modes = args.modes.split(",")
    elt = torch.empty((), dtype=dtype).element_size()

    meta = machine(device)
    meta["dtype"] = str(dtype).replace("torch.", "")
    copy_gbs = copy_bandwidth(device)
    meta["copy_GBps"] = round(copy_gbs, 1)
    if env_note():
        meta["env"] = env_note()
    print(
        f"# bce_with_logits on {device} ({meta.get('gpu', meta['cpu'])}), {meta['dtype']}, "
        f"copy bandwidth {copy_gbs:.1f} GB/s",
        flush=True,
    )
    for prov in providers:
        why = unavailable(prov, device)
        if why:
            print(f"# {prov}: skipped: {why}")

    live = [p for p in providers if not unavailable(p, device)]
    rows = []
    for log2n in sizes:
        n = 1 << log2n
        # One compiled function per size (shapes static): forward and backward graphs are
        # compiled on its first call and reused by every mode.
        torch._dynamo.reset()
        fns = {
            "eager": _torch_fn,
            "cpp": with_backend(_ours_fn, "cpp"),
            "triton": with_backend(_ours_fn, "triton"),
        }
        if "compile" in live:
            fns["compile"] = torch.compile(_torch_fn, dynamic=False)
        for mode in modes:
            nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n * elt
            res = bench_side_by_side(
                {p: make_case(fns[p], mode, n, dtype, device) for p in live},
                device,
                min_time=args.min_time,
            )
            for prov in live:
                r = res[prov]
                gbs = nbytes / (r["ms"] * 1e-3) / 1e9
                rows.append(
                    {
                        "n": f"2^{log2n}",
                        "mode": mode,
                        "provider": prov,
                        "ms": round(r["ms"], 4),
                        "ms_p20": round(r["p20"], 4),
                        "ms_p80": round(r["p80"], 4),
                        "GBps": round(gbs, 2),
                        "of_copy": round(gbs / copy_gbs, 3),
                        "vs_eager": round(r["vs_first"], 2) if live[0] == "eager" else None,
                    }
                )
                print(
                    f"2^{log2n:<3} {mode:>8} {prov:>8}: {r['ms']:9.3f} ms  {gbs:7.2f} GB/s "
                    f"({gbs / copy_gbs:.1%} of copy)  {r['vs_first']:5.2f}x eager",
                    flush=True,
                )
    path = write_results("bce_with_logits", meta, rows, args.out, args.tag)
    print()
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
