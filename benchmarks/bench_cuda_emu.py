"""Benchmark: the speed of the CUDA emulator (hpml_ops._C_emu) on the kernels of csrc/cuda, at the
sizes the tests use and a little larger: CUDA threads run per second, fiber switches per second,
checked memory accesses per second, and the time of one op call against the same op's C++ CPU
kernel (what the emulation costs). One thread; the emulator runs one block at a time.

    python benchmarks/bench_cuda_emu.py [--repeats 5]
"""

from __future__ import annotations

import sys
import time

import torch
from common import base_parser, finish, machine

import hpml_ops


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    x, y = r(4096, 16), torch.rand(4096, 16, generator=g)
    xa, wa, ba = r(256, 128), r(96, 128) * 0.1, r(96)
    xh, wh = xa.half(), wa.half()
    xb = r(64, 32, 16, 16)
    wb, bb = torch.rand(32, generator=g) + 0.5, r(32)
    xr = r(8192, 40)
    return {
        "bce_with_logits fwd 4096x16 fp32": ("bce_with_logits", (x, y, None, None, 1)),
        "linear_act fwd 256x128x96 fp32": ("linear_act", (xa, wa, ba, 1, 0.0)),
        "linear_act fwd 256x128x96 fp16 (WMMA)": ("linear_act", (xh, wh, ba.half(), 1, 0.0)),
        "batch_norm fwd 64x32x16x16 fp32 (planes)": (
            "batch_norm",
            (xb, wb, bb, None, None, True, 1e-5, 1),
        ),
        "batch_norm fwd 8192x40 fp32 (rows)": (
            "batch_norm",
            (xr, wb.repeat(2)[:40], bb.repeat(2)[:40], None, None, True, 1e-5, 0),
        ),
    }


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    why = hpml_ops._backend.unavailable_reason("cuda-emu", "cpu")
    if why:
        print(f"the CUDA emulator is unavailable: {why}")
        return 1
    emu = hpml_ops._backend._C_EMU
    meta = machine("cpu")
    meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(meta, flush=True)
    rows = []
    for name, (op, a) in _cases().items():
        fn, cpu = getattr(torch.ops.hpml_emu, op), getattr(torch.ops.hpml, op)
        fn(*a)  # warm-up (first-use allocations)
        before = emu.stats()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn(*a)
        secs = (time.perf_counter() - t0) / args.repeats
        after = emu.stats()
        per = {k: (after[k] - before[k]) / args.repeats for k in after}
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            cpu(*a)
        cpu_secs = (time.perf_counter() - t0) / args.repeats
        rows.append(
            {
                "case": name,
                "ms_per_call": round(secs * 1e3, 2),
                "cpu_kernel_ms": round(cpu_secs * 1e3, 3),
                "slowdown": round(secs / cpu_secs, 1),
                "blocks": int(per["blocks"]),
                "threads": int(per["threads"]),
                "threads_per_s": round(per["threads"] / secs),
                "switches_per_s": round(per["switches"] / secs),
                "accesses_per_s": round(per["accesses"] / secs),
            }
        )
    return finish("cuda_emu", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
