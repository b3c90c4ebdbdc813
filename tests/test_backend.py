"""Backend selection and availability: the context manager, HPML_BACKEND, clear errors for an
unavailable backend, and a package that imports without its compiled extension or triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hpml_ops
from tests.helpers import DEVICE


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HPML_BACKEND")}
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
    )


def test_available_backends_and_status():
    avail = hpml_ops.available_backends(DEVICE)
    assert "reference" in avail
    status = hpml_ops.backend_status(DEVICE)
    assert set(status) == {"triton", "cpp", "cuda-emu", "reference"}
    for b in avail:
        if b == "cpp" and DEVICE == "cpu":
            # The C++ CPU kernels name their ISA variant (tests/test_cpu_dispatch.py).
            assert status[b].startswith(f"available: {hpml_ops.cpu_capability()} CPU kernels")
        else:
            assert status[b] == "available"


def test_use_backend_sets_and_restores():
    assert hpml_ops.get_backend() == "auto"
    with hpml_ops.use_backend("reference"):
        assert hpml_ops.get_backend() == "reference"
        with pytest.raises(RuntimeError), hpml_ops.use_backend("auto"):
            assert hpml_ops.get_backend() == "auto"
            raise RuntimeError("restored even on error")
        assert hpml_ops.get_backend() == "reference"
    assert hpml_ops.get_backend() == "auto"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of auto, triton"):
        with hpml_ops.use_backend("cuda"):
            pass


def test_auto_picks_cpp_on_cpu_when_built():
    if hpml_ops._backend.unavailable_reason("cpp", "cpu"):
        pytest.skip("the compiled extension is not built here")
    assert hpml_ops._backend.resolve(torch.device("cpu")) == "cpp"
    assert hpml_ops._backend.resolve(torch.device("meta")) == "reference"


@pytest.mark.parametrize("choice", ["auto", "cpp", "triton", "cuda-emu", "reference"])
def test_meta_tensors_run_as_torch_whatever_the_choice(choice):
    """Meta tensors carry shapes only: every choice runs them as torch's ops (no data to compute
    on, nothing a kernel could do differently), even one that cannot run here on real tensors."""
    assert hpml_ops._backend._resolve(choice, "meta", "linear_act") == "reference"


def test_env_variable_selects_the_backend():
    r = _run("import hpml_ops; print(hpml_ops.get_backend())", HPML_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    r = _run("import hpml_ops", HPML_BACKEND="fast")
    assert r.returncode != 0
    assert "HPML_BACKEND='fast' is not one of auto, triton, cpp, cuda-emu, reference" in r.stderr


def test_triton_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1 the Triton backend cannot take CPU tensors, and says why."""
    r = _run(
        """
        import torch, hpml_ops
        print(hpml_ops.backend_status("cpu")["triton"])
        x = torch.randn(3)
        try:
            with hpml_ops.use_backend("triton"):
                hpml_ops.binary_cross_entropy_with_logits(x, x.sigmoid())
        except hpml_ops.BackendUnavailableError as e:
            print("raised:", e)
        """
    )
    assert r.returncode == 0, r.stderr
    status, raised = r.stdout.splitlines()[:2]
    assert "set TRITON_INTERPRET=1 before importing triton" in status
    # On a machine with no GPU use_backend refuses at once; with one, the call does.
    assert raised.startswith("raised: backend 'triton'")
    assert "set TRITON_INTERPRET=1 before importing triton" in raised


BLOCK_IMPORTS = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("hpml_ops._C", "hpml_ops._C_emu", "triton") or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_imports_without_extension_and_triton():
    """The package imports with neither the compiled extensions (hpml_ops._C, the emulator
    hpml_ops._C_emu) nor triton; the missing backends say why, and the reference backend still
    works."""
    r = _run(
        BLOCK_IMPORTS
        + """
import torch, hpml_ops
st = hpml_ops.backend_status("cpu")
print("cpp:", st["cpp"])
print("triton:", st["triton"])
print("cuda-emu:", st["cuda-emu"])
print("available:", hpml_ops.available_backends("cpu"))
x, y = torch.randn(5, 3), torch.rand(5, 3)
out = hpml_ops.binary_cross_entropy_with_logits(x, y)
ref = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
print("equal:", torch.equal(out, ref))
try:
    with hpml_ops.use_backend("cpp"):
        pass
except hpml_ops.BackendUnavailableError as e:
    print("cpp raised:", e)
print("triton imported:", "triton" in sys.modules)
"""
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "cpp: the compiled extension hpml_ops._C could not be imported" in out
    assert "triton: triton is not installed" in out
    assert "cuda-emu: the CUDA emulator hpml_ops._C_emu could not be imported" in out
    assert "available: ['reference']" in out
    assert "equal: True" in out
    assert "cpp raised: backend 'cpp' is not available" in out
    assert "triton imported: False" in out
