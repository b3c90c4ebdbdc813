"""Build ``hpml_ops._C``: the C++ CPU kernels always, the CUDA kernels whenever nvcc and a CUDA
build of torch are present (a GPU is not needed to compile them).

Environment:
  HPML_NO_CUDA=1          skip the CUDA sources (the build says so and why)
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "8.0;9.0"
  CUDA_HOME               CUDA toolkit; default: /usr/local/cuda if it has bin/nvcc, else the
                          toolkit that the nvcc on PATH resolves to
  HPML_SKIP_EXT=1         install the Python package only (the Makefile then builds the extension
                          in place with `setup.py build_ext --inplace`, incrementally, with its log)
  HPML_NO_EMU=1           leave the CUDA emulator hpml_ops._C_emu out (its tests then skip)
  HPML_CPU_ISA            the best ISA variant of the CPU kernels to build: "default", "avx2" or
                          "avx512" (default: avx512 on x86-64, else default). Every variant up to
                          it is built and the one to run is chosen at run time from the CPU
                          (csrc/cpu_dispatch.h; ATEN_CPU_CAPABILITY honoured): this only limits
                          what is built (a faster build, or a compiler without AVX-512)
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[hpml_ops build] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    # /usr/local/bin/nvcc can be a wrapper script: the toolkit is where the real nvcc lives.
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _cuda_plan() -> tuple[bool, str]:
    """Decide whether to build the CUDA sources; the reason is printed either way."""
    if os.environ.get("HPML_NO_CUDA", "0") == "1":
        return False, "HPML_NO_CUDA=1 is set"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (no libtorch_cuda)"
    home = _find_cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = home
    # With no GPU visible and no arch list, cpp_extension fails with an IndexError.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return True, (
        f"nvcc in {home}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
    )


# The ISA variants of the CPU kernels, as ATen builds its own (cmake/Codegen.cmake): flags that
# select at::vec's implementation (and Sleef's) through CPU_CAPABILITY_<NAME>.
CPU_VARIANTS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # GCC 12's own avx512fintrin.h trips its -W(maybe-)uninitialized (its `__Y = __Y` idiom).
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    + ["-Wno-maybe-uninitialized", "-Wno-uninitialized"],
}


def _capability_flags(variant: str) -> list[str]:
    name = variant.upper()
    return [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"]


def _cpu_variants() -> list[str]:
    """The variants to build, DEFAULT first (it goes with the other sources; the others are
    compiled again and linked after it: see csrc/cpu_dispatch.h)."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    best = os.environ.get("HPML_CPU_ISA") or ("avx512" if x86 else "default")
    if best not in CPU_VARIANTS:
        raise SystemExit(f"HPML_CPU_ISA={best!r}: expected one of {', '.join(CPU_VARIANTS)}")
    if best != "default" and not x86:
        raise SystemExit(f"HPML_CPU_ISA={best!r} needs an x86-64 build machine")
    names = list(CPU_VARIANTS)
    return names[: names.index(best) + 1]


def _cpu_kernel_sources() -> list[str]:
    """The files of CPU kernels: each is compiled once per ISA variant."""
    return [
        p
        for p in sorted(glob.glob(os.path.join("csrc", "*.cpp")))
        if "HPML_REGISTER_CPU_KERNELS(" in open(os.path.join(ROOT, p)).read()
    ]


GENERATED = os.path.join(ROOT, "build", "generated")


def _write_generated_headers() -> None:
    """build/generated/hpml_schemas.h from hpml_ops/ops/schema.py (the one list of ops and their
    schemas); rewritten only when it changes, so that an unchanged list recompiles nothing."""
    import runpy

    schema = runpy.run_path(os.path.join(ROOT, "hpml_ops", "ops", "schema.py"))
    text = schema["cpp_header"]()
    path = os.path.join(GENERATED, "hpml_schemas.h")
    os.makedirs(GENERATED, exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    _say(f"wrote {os.path.relpath(path, ROOT)}")


def _extension():
    _write_generated_headers()
    with_cuda, reason = _cuda_plan()
    _say(("building" if with_cuda else "NOT building") + f" the CUDA kernels: {reason}")

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # Every source is compiled for the DEFAULT capability; the CPU kernel files again for each
    # other variant (Build below).
    # -Wno-psabi: GCC's note that passing 32-byte vectors by value changed ABI in GCC 4.6, about
    # at::vec's DEFAULT types (our kernels' own functions, never an interface).
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    cxx += _capability_flags("default")
    variants = _cpu_variants()
    _say(
        "CPU kernels built for "
        + ", ".join(v.upper() for v in variants)
        + " (the one to run is chosen at run time)"
    )
    kwargs = dict(
        name="hpml_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), GENERATED],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if not with_cuda:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
        ext.hpml_cpu_variants = variants[1:]
        return ext

    import torch

    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers; a minimal toolkit lacks them,
    # torch's nvidia-* wheels ship them.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    extra_inc = sorted(
        {
            os.path.dirname(h)
            for pat in ("nvidia/*/include/*.h", "nvidia/*/*/include/*.h")
            for h in glob.glob(os.path.join(site, pat))
            if os.path.basename(h) in ("cusparse.h", "cublas_v2.h")
        }
    )
    nvcc = ["-O3", "-lineinfo", "-Xptxas=-v", "-DHPML_WITH_CUDA"]
    kwargs["sources"] = sources
    kwargs["include_dirs"] = kwargs["include_dirs"] + extra_inc
    ext = CUDAExtension(
        extra_compile_args={"cxx": cxx + ["-DHPML_WITH_CUDA"], "nvcc": nvcc}, **kwargs
    )
    ext.hpml_cpu_variants = variants[1:]
    return ext


# The CUDA emulator (csrc/emu): the kernels of csrc/cuda compiled as host C++, each through a
# generated wrapper, with every load and store instrumented (GCC's thread-sanitizer
# instrumentation, without its run-time library: csrc/emu/runtime.cpp provides the call-backs;
# unlike the address sanitizer's, it reports every access, a store after a load of the same
# address and in-bounds accesses to statics included); the emulator's own sources are compiled
# plainly.
EMU_INSTRUMENT = [
    "-fsanitize=thread",
    "--param",
    "tsan-instrument-func-entry-exit=0",
    "-U__SANITIZE_THREAD__",  # torch's headers would otherwise take their TSan paths
]


def _emu_wrappers() -> list[str]:
    """build/generated/emu/<stem>.cpp for every csrc/cuda/<stem>.cu (and csrc/emu/<stem>.cu, the
    test fixtures): the kernel file itself, included after the emulator's runtime header."""
    out_dir = os.path.join(GENERATED, "emu")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join(ROOT, "csrc", "emu", "*.cu"))
    ):
        rel = os.path.relpath(cu, os.path.join(ROOT, "csrc"))
        stem = rel.replace(os.sep, "_").removesuffix(".cu")
        text = (
            f"// Generated by setup.py: csrc/{rel} compiled as host C++ for the CUDA emulator.\n"
            '#include "hpml_emu/runtime.h"\n'
            f'#include "{rel}"\n'
        )
        path = os.path.join(out_dir, f"{stem}.cpp")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        paths.append(os.path.relpath(path, ROOT))
    return paths


def _emu_extension():
    from torch.utils.cpp_extension import CppExtension

    ext = CppExtension(
        name="hpml_ops._C_emu",
        sources=[
            os.path.join("csrc", "emu", "runtime.cpp"),
            os.path.join("csrc", "emu", "module.cpp"),
            # The same autograd formulas as hpml's, for the ops of hpml_emu.
            os.path.join("csrc", "autograd.cpp"),
        ],
        include_dirs=[
            os.path.join(ROOT, "csrc", "emu", "include"),
            os.path.join(ROOT, "csrc"),
            GENERATED,
        ],
        extra_compile_args={
            "cxx": ["-O2", "-Wall", "-Wno-unknown-pragmas", "-DHPML_EMU", "-DHPML_LIBRARY=hpml_emu"]
        },
        py_limited_api=True,
    )
    ext.hpml_instrumented = _emu_wrappers()
    return ext


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def _compile(self, ext, sources, output_dir, cxx):
            return self.compiler.compile(
                sources,
                output_dir=os.path.join(self.build_temp, output_dir),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx} if self.use_ninja else cxx,
            )

        def build_extension(self, ext):
            # The CPU kernel files once more per ISA variant, with that variant's flags in place
            # of DEFAULT's (torch's flags added by now), linked after the DEFAULT objects.
            variants = getattr(ext, "hpml_cpu_variants", [])
            if variants:
                base = [
                    f
                    for f in ext.extra_compile_args["cxx"]
                    if f not in _capability_flags("default")
                ]
                objects = []
                for v in variants:
                    flags = base + CPU_VARIANTS[v] + _capability_flags(v)
                    objects += self._compile(ext, _cpu_kernel_sources(), f"cpu_{v}", flags)
                ext.extra_objects = objects
            instrumented = getattr(ext, "hpml_instrumented", None)
            if instrumented:
                # Compiled with the extension's flags (torch's added by now) plus the
                # instrumentation, into objects the extension links.
                cxx = ext.extra_compile_args["cxx"] + EMU_INSTRUMENT
                ext.extra_objects = self._compile(ext, instrumented, "emu_instrumented", cxx)
            super().build_extension(ext)

    return Build.with_options(use_ninja=True)


if os.environ.get("HPML_SKIP_EXT", "0") == "1":
    setup()
    sys.exit(0)

# HPML_NO_EMU=1: leave the emulator out (the one-shot GPU check, where the real GPU runs the
# kernels and build time is device time); its tests then skip, saying so.
_EXTENSIONS = [_extension()]
if os.environ.get("HPML_NO_EMU", "0") != "1":
    _EXTENSIONS.append(_emu_extension())
else:
    _say("NOT building the CUDA emulator hpml_ops._C_emu: HPML_NO_EMU=1 is set")

setup(
    ext_modules=_EXTENSIONS,
    cmdclass={"build_ext": _build_ext()},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
