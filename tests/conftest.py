"""Test setup: with no GPU visible, Triton kernels run on CPU tensors under the interpreter, so
every kernel runs in every CI run. This must happen before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Autotuning still compiles and runs every config, timed over milliseconds, not 125 ms each.
    os.environ.setdefault("HPML_TRITON_QUICK_TUNE", "1")
# cuBLAS needs this to run deterministically, which the poisoned-output fixture turns on.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402

import hpml_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    return [
        f"hpml_ops backends on {DEVICE}: {hpml_ops.backend_status(DEVICE)}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
    ]


@pytest.fixture
def poisoned():
    """Every torch.empty / at::empty in the block is NaN-filled (torch's deterministic mode), so
    an output element a kernel fails to write shows up as NaN."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
