"""GPU build check, no GPU needed: compile every Triton kernel ahead of time for sm_80 and sm_90,
and read the CUDA kernels that the built extension hpml_ops._C carries; print one table (kernel,
arch, registers, spills, shared memory, stack) and fail on any compile error, any spill (a local
memory store or load in the SASS) or a missing expected instruction (e.g. HGMMA on sm_90).

Resource usage and SASS come from the cuobjdump that triton's wheel bundles. The full ptxas
report of the CUDA sources (-Xptxas=-v) is in build/build.log.

    python tools/gpu_build_check.py [--archs 80,90] [--filter SUBSTRING]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Ahead-of-time compilation needs the real JIT, not the interpreter.
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from hpml_ops.ops.schema import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "gpu_check"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Every op family's Triton kernel module (hpml_ops/ops/schema.py); each exposes aot_specs().
TRITON_MODULES = [f"hpml_ops.kernels.{family}" for family in FAMILIES]
SPILL_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\d+\s+)?(STL|LDL)\b", re.M)


def _run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def resource_usage(binary: Path) -> list[dict]:
    """[{arch, function, REG, STACK, SHARED, LOCAL}] from cuobjdump --dump-resource-usage."""
    rows, arch, func = [], None, None
    for line in _run([str(CUOBJDUMP), "--dump-resource-usage", str(binary)]).splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            func = m.group(1)
        elif func and "REG:" in line:
            vals = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append(
                {
                    "arch": arch,
                    "function": func,
                    **{k: int(vals.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")},
                }
            )
            func = None
    return rows


def sass_by_function(binary: Path) -> dict[tuple[str, str], str]:
    """{(arch, function): SASS text} from cuobjdump --dump-sass."""
    out, arch, func, buf = {}, None, None, []
    for line in _run([str(CUOBJDUMP), "--dump-sass", str(binary)]).splitlines():
        if m := re.match(r"\s*code for (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            if func:
                out[(arch, func)] = "\n".join(buf)
            func, buf = m.group(1), []
        elif func:
            buf.append(line)
    if func:
        out[(arch, func)] = "\n".join(buf)
    return out


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    pretty = res.stdout.splitlines()
    out = {}
    for raw, p in zip(names, pretty, strict=False):
        p = re.sub(r"\(anonymous namespace\)::|\b(hpml|c10|at|math)::|^void ", "", p)
        p = _drop_parameter_list(p)
        out[raw] = p
    return out


def _drop_parameter_list(name: str) -> str:
    """'k<int, (Act)1>(float*, int)' -> 'k<int, (Act)1>': cut at the '(' matching the last ')'."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def check_triton(archs: list[int], flt: str) -> list[dict]:
    rows = []
    specs = []
    for mod in TRITON_MODULES:
        specs += importlib.import_module(mod).aot_specs()
    for spec in specs:
        if flt and flt not in spec["label"]:
            continue
        for cc in archs:
            row = {"kind": "triton", "kernel": spec["label"], "arch": f"sm_{cc}"}
            t0 = time.perf_counter()
            try:
                src = triton.compiler.ASTSource(
                    fn=spec["fn"],
                    signature=spec["signature"],
                    constexprs=spec["constexprs"],
                    attrs=spec["attrs"],
                )
                compiled = triton.compile(
                    src,
                    target=GPUTarget("cuda", cc, 32),
                    options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]),
                )
            except Exception as e:  # a compile error is a result, reported in the table
                row.update(status=f"COMPILE ERROR: {type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                continue
            safe = re.sub(r"[^A-Za-z0-9_.=,-]", "_", spec["label"])
            cubin = OUT / f"{safe}.sm_{cc}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            (ru,) = resource_usage(cubin)
            sass = "\n".join(sass_by_function(cubin).values())
            missing = [s for s in spec["expect_sass"].get(cc, []) if s not in sass]
            row.update(
                regs=ru["REG"],
                spill_insts=len(SPILL_RE.findall(sass)),
                local=ru["LOCAL"],
                stack=ru["STACK"],
                shared=ru["SHARED"],
                secs=round(time.perf_counter() - t0, 1),
            )
            row["status"] = _status(row, missing)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def check_cuda(flt: str) -> list[dict]:
    import hpml_ops._C as C

    so = Path(C.__file__)
    if not C.WITH_CUDA:
        if os.environ.get("HPML_NO_CUDA") == "1":
            print("# CUDA kernels: skipped (HPML_NO_CUDA=1)")
            return []
        return [
            {
                "kind": "cuda",
                "kernel": str(so.name),
                "arch": "-",
                "status": "FAIL: hpml_ops._C was built without its CUDA kernels "
                "(see build/build.log)",
            }
        ]
    usage = resource_usage(so)
    sass = sass_by_function(so)
    names = demangle(sorted({u["function"] for u in usage}))
    rows = []
    for u in usage:
        name = names[u["function"]]
        if flt and flt not in name:
            continue
        text = sass.get((u["arch"], u["function"]), "")
        row = {
            "kind": "cuda",
            "kernel": name,
            "arch": u["arch"],
            "regs": u["REG"],
            "spill_insts": len(SPILL_RE.findall(text)),
            "local": u["LOCAL"],
            "stack": u["STACK"],
            "shared": u["SHARED"],
        }
        row["status"] = _status(row, [])
        rows.append(row)
    return rows


def _status(row: dict, missing: list[str]) -> str:
    problems = []
    if row.get("spill_insts") or row.get("local"):
        problems.append(f"SPILL ({row['spill_insts']} local-memory instructions)")
    if missing:
        problems.append(f"MISSING SASS {missing}")
    return "FAIL: " + "; ".join(problems) if problems else "ok"


def _line(r: dict) -> str:
    return (
        f"{r['kind']:<6} {r['arch']:<5} {r.get('regs', ''):>4} {r.get('spill_insts', ''):>6} "
        f"{r.get('local', ''):>5} {r.get('stack', ''):>5} {r.get('shared', ''):>6}  "
        f"{r['status']:<4}  {r['kernel']}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="80,90")
    p.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    if not CUOBJDUMP.exists():
        print(f"no cuobjdump at {CUOBJDUMP}: this triton wheel does not bundle it")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}; cubins in {OUT.relative_to(ROOT)}")
    header = (
        f"{'kind':<6} {'arch':<5} {'regs':>4} {'spills':>6} {'local':>5} {'stack':>5} "
        f"{'shared':>6}  status  kernel"
    )
    print(header)
    rows = check_triton(archs, args.filter)
    rows += check_cuda(args.filter)
    print()
    print(header)
    for r in rows:
        print(_line(r))
    bad = [r for r in rows if r["status"] != "ok"]
    n_t = sum(r["kind"] == "triton" for r in rows)
    n_c = sum(r["kind"] == "cuda" for r in rows)
    print(f"\n{n_t} Triton and {n_c} CUDA kernel builds checked; {len(bad)} problem(s)")
    for r in bad:
        print(f"  {r['kind']} {r['arch']} {r['kernel']}: {r['status']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
