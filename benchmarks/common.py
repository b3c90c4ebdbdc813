"""Shared benchmark machinery: timing (CPU: median of repeats after warm-up; GPU:
triton.testing.do_bench, which flushes L2), the machine's copy bandwidth measured in the same run,
run metadata, and the results table / files. Benchmarks are programs, never tests."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


DEFAULT_MODES = "fwd,bwd,fwd+bwd"


def parse(
    p: argparse.ArgumentParser,
    argv,
    providers: tuple[str, ...],
    *,
    gpu_dtype: str = "bfloat16",
    modes: tuple[str, ...] | None = None,
) -> argparse.Namespace:
    """``p.parse_args(argv)`` with the common options made usable: ``args.on_gpu``;
    ``args.dtype`` a torch dtype (``--dtype``, else float32 on a CPU and ``gpu_dtype`` on a
    GPU); ``args.providers`` and ``args.modes`` lists (``providers`` and ``modes``, else
    fwd, bwd, fwd+bwd, when not given)."""
    args = p.parse_args(argv)
    args.on_gpu = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or (gpu_dtype if args.on_gpu else "float32"))
    args.providers = args.providers.split(",") if args.providers else list(providers)
    known_modes = tuple(modes) if modes is not None else tuple(DEFAULT_MODES.split(","))
    args.modes = args.modes.split(",") if args.modes else list(known_modes)
    check_names(p, "provider", args.providers, providers)
    check_names(p, "mode", args.modes, known_modes)
    return args


def check_names(p: argparse.ArgumentParser, what: str, names, known) -> None:
    """Exit with a usage error naming any of ``names`` not in ``known`` (an unknown provider
    would otherwise run as plain PyTorch under its name)."""
    bad = [n for n in names if n not in known]
    if bad:
        p.error(f"unknown {what} {', '.join(bad)}; expected some of {', '.join(known)}")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU; bfloat16 on a GPU by default")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument("--modes", default=None, help="comma-separated subset of the modes")
    p.add_argument("--min-time", type=float, default=0.5, help="CPU: seconds of repeats per row")
    p.add_argument("--out", default=str(RESULTS), help="directory for the CSV/JSON/markdown")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p


def _git_commit() -> str:
    if os.environ.get("HPML_COMMIT"):  # a copy without .git (the lent GPU machine's)
        return os.environ["HPML_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> dict:
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    # The ISA variants: torch's kernels' and ours (csrc/cpu_dispatch.h), each result names them.
    info["torch_cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    try:
        import hpml_ops

        info["hpml_cpu_isa"] = hpml_ops.cpu_capability()
    except ImportError:
        info["hpml_cpu_isa"] = None
    # What limits the libraries below the CPU's ISA (a machine made to act as an AVX2-only one):
    # named in the results where set.
    for var in ISA_LIMITS:
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


# Environment variables that limit torch's, MKL's and oneDNN's instruction sets.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(
    fn: Callable[[], object],
    device: str,
    *,
    setup: Callable[[], None] | None = None,
    min_time: float = 0.5,
    warmup: int = 2,
) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of ``fn`` in ms. ``setup`` runs before each call,
    outside the timed region (e.g. clearing .grad)."""
    if device.startswith("cuda"):
        import triton.testing

        def call():
            if setup is not None:
                setup()
            fn()

        q = triton.testing.do_bench(call, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return tuple(float(v) for v in q)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 200):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10)
    return statistics.median(times), qs[1], qs[7]


def bench_side_by_side(
    cases: dict[str, tuple[Callable[[], object], Callable[[], None] | None]],
    device: str,
    *,
    min_time: float = 0.5,
    warmup: int = 2,
) -> dict[str, dict]:
    """Time several providers of the same work. On the CPU their repeats are interleaved (A, B,
    C, A, B, C, ...) so that every provider sees the same moments of a shared, noisy machine, and
    each provider's speed relative to the first is the median of the per-round ratios; on a GPU
    each is timed by do_bench in turn. ``cases``: name -> (fn, setup or None), setup running
    before each call outside the timed region. Returns name -> {ms, p20, p80, vs_first}."""
    names = list(cases)
    if device.startswith("cuda"):
        out = {}
        for name in names:
            fn, setup = cases[name]
            ms, lo, hi = bench(fn, device, setup=setup)
            out[name] = {"ms": ms, "p20": lo, "p80": hi}
        for name in names:
            out[name]["vs_first"] = out[names[0]]["ms"] / out[name]["ms"]
        return out
    for _ in range(warmup):
        for fn, setup in cases.values():
            if setup is not None:
                setup()
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_time * len(names) and rounds < 200):
        for name in names:
            fn, setup = cases[name]
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    out = {}
    for name in names:
        qs = statistics.quantiles(times[name], n=10)
        ratios = [a / b for a, b in zip(times[names[0]], times[name], strict=True)]
        out[name] = {
            "ms": statistics.median(times[name]),
            "p20": qs[1],
            "p80": qs[7],
            "vs_first": statistics.median(ratios),
        }
    return out


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """GB/s of a large device copy, counting bytes read plus written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = bench(lambda: dst.copy_(src), device, min_time=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_results(name: str, meta: dict, rows: list[dict], out_dir: str, tag: str = "") -> Path:
    """Write rows (dicts with the same keys) to <name>_<device><tag>.{csv,json,md} in out_dir;
    returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{meta['device'].split(':')[0]}{tag}"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(out / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(meta, rows)
    (out / f"{stem}.md").write_text(md)
    return out / f"{stem}.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(meta: dict, rows: list[dict]) -> str:
    head = ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, dict | list))
    keys = list(rows[0].keys())
    lines = [f"_{head}_", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def env_note() -> str:
    """What in the environment changes CPU timings (printed with the results)."""
    notes = []
    if os.environ.get("THP_MEM_ALLOC_ENABLE"):
        notes.append("THP_MEM_ALLOC_ENABLE=" + os.environ["THP_MEM_ALLOC_ENABLE"])
    return ", ".join(notes)


# ---- what every benchmark program does the same way -----------------------------------------


def with_backend(fn: Callable, backend: str) -> Callable:
    """``fn`` run under ``hpml_ops.use_backend(backend)``."""
    import hpml_ops

    def run(*args):
        with hpml_ops.use_backend(backend):
            return fn(*args)

    return run


def unavailable(provider: str, device: str) -> str | None:
    """Why ``provider`` cannot be timed on ``device`` (None: it can). torch's own providers run
    everywhere but max-autotune (which tunes GPU kernels); Triton on a CPU runs interpreted,
    which measures the interpreter; ours, as ``hpml_ops.backend_status`` says."""
    import hpml_ops

    dt = torch.device(device).type
    if provider == "compile-max-autotune" and dt != "cuda":
        return "max-autotune tunes GPU kernels"
    if provider in ("eager", "compile", "compile-max-autotune"):
        return None
    if provider == "triton" and dt == "cpu":
        return "Triton runs interpreted on CPU: not a speed measurement"
    return hpml_ops._backend.unavailable_reason(provider, dt)


def start(
    title: str, device: str, dtype: torch.dtype, providers: list[str], *, copy: bool = False
) -> tuple[dict, list[str]]:
    """The run's metadata (with the copy bandwidth when ``copy``: ``meta["copy_GBps"]``), its
    header line and a line per skipped provider; returns (meta, the providers that run)."""
    meta = machine(device)
    meta["dtype"] = str(dtype).replace("torch.", "")
    head = f"# {title} on {device} ({meta.get('gpu', meta['cpu'])}), {meta['dtype']}"
    if not device.startswith("cuda"):
        head += f", CPU kernels: torch {meta['torch_cpu_isa']}, hpml {meta['hpml_cpu_isa']}"
    if copy:
        meta["copy_GBps"] = round(copy_bandwidth(device), 1)
        head += f", copy bandwidth {meta['copy_GBps']:.1f} GB/s"
    if env_note():
        meta["env"] = env_note()
    print(head, flush=True)
    live = []
    for prov in providers:
        why = unavailable(prov, device)
        if why:
            print(f"# {prov}: skipped: {why}")
        else:
            live.append(prov)
    return meta, live


def provider_fns(torch_fn: Callable, ours_fn: Callable, live: list[str]) -> dict[str, Callable]:
    """The function each provider runs: torch's eagerly, torch.compile'd (a fresh compile: call
    ``torch._dynamo.reset()`` per shape first), ours on each backend."""
    fns = {
        "eager": torch_fn,
        "cpp": with_backend(ours_fn, "cpp"),
        "triton": with_backend(ours_fn, "triton"),
    }
    if "compile" in live:
        fns["compile"] = torch.compile(torch_fn, dynamic=False)
    if "compile-max-autotune" in live:
        fns["compile-max-autotune"] = torch.compile(torch_fn, dynamic=False, mode="max-autotune")
    return fns


def timing_columns(r: dict, live: list[str], digits: int) -> dict:
    """A result row's timing columns from ``bench_side_by_side``'s ``r``: median, 20th and 80th
    percentile in ms, and the speed relative to eager (when eager ran first)."""
    return {
        "ms": round(r["ms"], digits),
        "ms_p20": round(r["p20"], digits),
        "ms_p80": round(r["p80"], digits),
        "vs_eager": round(r["vs_first"], 3) if live[0] == "eager" else None,
    }


def finish(name: str, meta: dict, rows: list[dict], args) -> int:
    """Write the results (``write_results``) and print their table; the program's exit code."""
    if not rows:
        print("nothing to measure: every provider was skipped")
        return 1
    path = write_results(name, meta, rows, args.out, args.tag)
    print()
    print(path.read_text())
    return 0


def record_bandwidth(
    rows: list[dict],
    key: dict,
    label: str,
    res: dict[str, dict],
    nbytes: int,
    copy_gbs: float,
    digits: int,
) -> None:
    """For each provider timed in ``res`` (``bench_side_by_side``'s result): a row (the ``key``
    columns, the provider, the timing columns, the rate of ``nbytes`` moved in GB/s and as a
    fraction of the copy bandwidth) and a printed line starting with ``label``."""
    live = list(res)
    for prov, r in res.items():
        gbs = nbytes / (r["ms"] * 1e-3) / 1e9
        rows.append(
            {**key, "provider": prov}
            | timing_columns(r, live, digits)
            | {"GBps": round(gbs, 2), "of_copy": round(gbs / copy_gbs, 3)}
        )
        print(
            f"{label} {prov:>8}: {r['ms']:9.3f} ms {gbs:7.2f} GB/s ({gbs / copy_gbs:.1%} of copy) "
            f"{r['vs_first']:5.2f}x eager",
            flush=True,
        )


def record_flops(
    rows: list[dict], key: dict, label: str, res: dict[str, dict], flops: float, unit: str = "ms"
) -> None:
    """For each provider timed in ``res``: a row (the ``key`` columns, the provider, the timing
    columns and the rate of ``flops`` in GFLOP/s) and a printed line starting with ``label``."""
    live = list(res)
    for prov, r in res.items():
        rows.append(
            {**key, "provider": prov}
            | timing_columns(r, live, 3)
            | {"GFLOP/s": round(flops / (r["ms"] * 1e-3) / 1e9, 2)}
        )
        print(f"{label} {prov:>12}: {r['ms']:9.3f} {unit} {r['vs_first']:6.3f}x eager", flush=True)
