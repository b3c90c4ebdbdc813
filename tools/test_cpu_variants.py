"""The C++ CPU kernels' parity tests once more under each ISA variant below the one `pytest` ran
(csrc/cpu_dispatch.h): ATEN_CPU_CAPABILITY=avx2 and =default on an AVX-512 CPU, =default on an
AVX2 one. Run by `make test` after the whole suite; any failure fails it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

import hpml_ops
from hpml_ops import _backend

ORDER = ("DEFAULT", "AVX2", "AVX512")
# The tests of the C++ CPU kernels (their `cpp` cases) and the variant checks.
FILES = [
    "tests/test_linear_act.py",
    "tests/test_bce_with_logits.py",
    "tests/test_batch_norm.py",
    "tests/test_mlp.py",
    "tests/test_torch_samples.py",
    "tests/test_cpu_dispatch.py",
]


def main() -> int:
    if _backend._C is None or torch.cuda.is_available():
        print("test_cpu_variants: no CPU kernels to vary here (no extension, or a GPU session)")
        return 0
    best = hpml_ops.cpu_capability()
    below = [v for v in _backend._C.cpu_capabilities_built() if ORDER.index(v) < ORDER.index(best)]
    for v in reversed(below):
        print(f"== the C++ CPU kernels' tests with ATEN_CPU_CAPABILITY={v.lower()}", flush=True)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                "cpp or variant",
                *FILES,
            ],
            # Inductor's caches (its precompiled headers) kept apart from the best variant's.
            env={
                **os.environ,
                "ATEN_CPU_CAPABILITY": v.lower(),
                "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix=f"inductor-{v.lower()}-"),
            },
        )
        if r.returncode != 0:
            return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
