"""Benchmark: binary cross-entropy with logits (reduction="mean", no weights), forward, backward
and forward+backward, for every provider, side by side in one run.

Bytes the op must move (s = element size, N elements): forward reads input and target, 2Ns;
backward reads them again and writes grad_input, 3Ns (the upstream gradient is one scalar);
forward+backward 5Ns. (A forward that also wrote grad_input would move 3Ns in all, but it writes
N elements that an evaluation-only forward never needs, and the backward must still scale them by
the upstream gradient unless it reads that gradient on the host.) Rates are reported against the
copy bandwidth measured in the same run. Per element the forward also does one exp, one
division and a degree-7 polynomial (log1p), the backward one exp and one division: compute, not
only bytes, bounds the CPU.

    python benchmarks/bench_bce_with_logits.py [--device cpu|cuda] [--sizes 16,18,...]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import base_parser, bench, copy_bandwidth, env_note, machine, write_results

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


def run_row(provider, fn, mode, n, dtype, device, min_time):
    g = torch.Generator(device="cpu").manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(device, dtype).requires_grad_()
    y = torch.rand(n, generator=g).to(device, dtype)

    def clear():
        x.grad = None

    if mode == "fwd":
        return bench(lambda: fn(x, y), device, min_time=min_time)
    if mode == "bwd":
        loss = fn(x, y)
        return bench(
            lambda: loss.backward(retain_graph=True), device, setup=clear, min_time=min_time
        )
    return bench(lambda: fn(x, y).backward(), device, setup=clear, min_time=min_time)


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

    rows = []
    for log2n in sizes:
        n = 1 << log2n
        # One compiled function per size (shapes static): forward and backward graphs are
        # compiled on its first call and reused by every mode.
        torch._dynamo.reset()
        compiled = torch.compile(_torch_fn, dynamic=False) if "compile" in providers else None
        for mode in modes:
            nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n * elt
            eager_ms = None
            for prov in providers:
                if unavailable(prov, device):
                    continue
                fn = {"eager": _torch_fn, "compile": compiled}.get(prov, _ours_fn)
                backend = prov if prov in ("cpp", "triton") else "auto"
                with hpml_ops.use_backend(backend):
                    ms, lo, hi = run_row(prov, fn, mode, n, dtype, device, args.min_time)
                if prov == "eager":
                    eager_ms = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        "n": f"2^{log2n}",
                        "mode": mode,
                        "provider": prov,
                        "ms": round(ms, 4),
                        "ms_p20": round(lo, 4),
                        "ms_p80": round(hi, 4),
                        "GBps": round(gbs, 2),
                        "of_copy": round(gbs / copy_gbs, 3),
                        "vs_eager": round(eager_ms / ms, 2) if eager_ms else None,
                    }
                )
                r = rows[-1]
                print(
                    f"{r['n']:>5} {mode:>8} {prov:>8}: {ms:9.3f} ms  {gbs:7.2f} GB/s "
                    f"({r['of_copy']:.1%} of copy)  {r['vs_eager'] or '':>5}x eager",
                    flush=True,
                )
    path = write_results("bce_with_logits", meta, rows, args.out, args.tag)
    print()
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
