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
    copy_bandwidth,
    env_note,
    machine,
    write_results,
)

import hpml_ops

PROVIDERS = ("eager", "compile", "cpp", "triton")
MODES = ("fwd", "fwd-eval", "bwd", "fwd+bwd")
BYTES = {"fwd": 3, "fwd-eval": 2, "bwd": 3, "fwd+bwd": 6}


def _torch_fn(x, w, b, rm, rv, training):
    return F.batch_norm(x, rm, rv, w, b, training)


def _ours_fn(x, w, b, rm, rv, training):
    return hpml_ops.batch_norm(x, rm, rv, w, b, training)


def with_backend(fn, backend: str):
    def run(*args):
        with hpml_ops.use_backend(backend):
            return fn(*args)

    return run


def unavailable(provider: str, device: str) -> str | None:
    if provider in ("eager", "compile"):
        return None
    dt = torch.device(device).type
    if provider == "triton" and dt == "cpu":
        return "Triton runs interpreted on CPU: not a speed measurement"
    return hpml_ops._backend.unavailable_reason(provider, dt)


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
    args = p.parse_args(argv)
    args.modes = ",".join(MODES) if args.modes == "fwd,bwd,fwd+bwd" else args.modes
    device = args.device
    on_gpu = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
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
        f"# batch_norm on {device} ({meta.get('gpu', meta['cpu'])}), {meta['dtype']}, "
        f"copy bandwidth {copy_gbs:.1f} GB/s",
        flush=True,
    )
    for prov in providers:
        why = unavailable(prov, device)
        if why:
            print(f"# {prov}: skipped: {why}")
    live = [p for p in providers if not unavailable(p, device)]
    rows = []
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        torch._dynamo.reset()
        fns = {
            "eager": _torch_fn,
            "cpp": with_backend(_ours_fn, "cpp"),
            "triton": with_backend(_ours_fn, "triton"),
        }
        if "compile" in live:
            fns["compile"] = torch.compile(_torch_fn, dynamic=False)
        name = "x".join(map(str, shape))
        for mode in modes:
            nbytes = BYTES[mode] * numel * elt
            res = bench_side_by_side(
                {p: make_case(fns[p], mode, shape, dtype, device) for p in live},
                device,
                min_time=args.min_time,
            )
            for prov in live:
                r = res[prov]
                gbs = nbytes / (r["ms"] * 1e-3) / 1e9
                rows.append(
                    {
                        "shape": name,
                        "mode": mode,
                        "provider": prov,
                        "ms": round(r["ms"], 3),
                        "ms_p20": round(r["p20"], 3),
                        "ms_p80": round(r["p80"], 3),
                        "GBps": round(gbs, 2),
                        "of_copy": round(gbs / copy_gbs, 3),
                        "vs_eager": round(r["vs_first"], 2) if live[0] == "eager" else None,
                    }
                )
                print(
                    f"{name:>14} {mode:>9} {prov:>8}: {r['ms']:9.3f} ms {gbs:7.2f} GB/s "
                    f"({gbs / copy_gbs:.1%} of copy) {r['vs_first']:5.2f}x eager",
                    flush=True,
                )
    path = write_results("batch_norm", meta, rows, args.out, args.tag)
    print()
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
