"""Shared test helpers: devices, backends, the tolerance table and the comparison rule."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import hpml_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NON_REFERENCE = ("cpp", "triton", "cuda-emu")

# One table for every op. fp32/fp64: against the float64 oracle, (atol, rtol).
# fp16/bf16: the error against the float64 oracle may be at most LOWP_FACTOR x torch's own error
# in that dtype, plus one unit in the last place of the largest reference value (fp32 -> bf16
# casts truncate under the Triton interpreter, costing up to one ulp).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1.3e-6),
}
LOWP_FACTOR = 2.0
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def backend_params(include_reference: bool = True, op: str | None = None):
    """pytest params for every backend; unavailable ones (for ``op``, when given) are skipped
    with the reason."""
    names = (*NON_REFERENCE, "reference") if include_reference else NON_REFERENCE
    out = []
    for b in names:
        reason = hpml_ops._backend.unavailable_reason(b, torch.device(DEVICE).type, op)
        marks = [pytest.mark.skip(reason=f"backend {b} unavailable: {reason}")] if reason else []
        out.append(pytest.param(b, marks=marks, id=b))
    return out


def dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def assert_close_to_oracle(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor | None = None,
    *,
    what: str = "",
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Compare a result with the float64 oracle by the tolerance table.

    ``compute_dtype`` (default: ``ours.dtype``) is the precision the result comes from: an fp32
    weight gradient of an fp16/bf16 computation is judged by the fp16/bf16 rule. For those,
    ``torch_same_dtype`` is PyTorch's own result computed the same way; it is required.

    Given for fp32/fp64, it widens the absolute tolerance by twice torch's own worst error in
    that dtype (the fp16/bf16 yardstick): for a deep network whose gradients amplify every
    rounding (tests/test_mlp.py's deep-odd), where torch's own fp32 result misses the table's
    tolerance on most random draws. Where torch's error is far below the table's, as in every
    well-conditioned case, the check is the table's."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    o = ours.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    # Non-finite values must match exactly (NaN where torch has NaN, same infinities).
    assert torch.equal(o.isnan(), r.isnan()), f"{what}: NaN positions differ"
    fin = r.isfinite()
    assert torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()]), f"{what}: infinities differ"
    o, r = o[fin], r[fin]
    if o.numel() == 0:
        return
    if (compute_dtype or ours.dtype) in TOL:
        atol, rtol = TOL[compute_dtype or ours.dtype]
        if torch_same_dtype is not None:
            t = torch_same_dtype.detach().to(torch.float64).cpu()[fin]
            atol += LOWP_FACTOR * (t - r).abs().max().item()
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    assert torch_same_dtype is not None, "fp16/bf16 comparisons need torch's own result"
    t = torch_same_dtype.detach().to(torch.float64).cpu()[fin]
    ulp = torch.finfo(compute_dtype or ours.dtype).eps * max(1.0, r.abs().max().item())
    ours_err = (o - r).abs().max().item()
    torch_err = (t - r).abs().max().item()
    bound = LOWP_FACTOR * torch_err + ulp
    assert ours_err <= bound, (
        f"{what}: max error {ours_err:.3e} > {LOWP_FACTOR} x torch's {torch_err:.3e} + {ulp:.1e}"
    )


def up(t: torch.Tensor | None) -> torch.Tensor | None:
    """The float64 copy the oracle runs on (None stays None)."""
    return None if t is None else t.detach().to(torch.float64)


def forward_backward(fn, args, need, seed: int, gout_dtype: torch.dtype | None = None):
    """Run ``out = fn(*args)`` with the arguments flagged in ``need`` requiring grad, then the
    gradients of <out, gout> for a random gout drawn from ``seed`` in ``gout_dtype`` (default: the
    output's dtype). Returns (out, [grad or None per argument], gout)."""
    leaves = [
        a.detach().requires_grad_(True) if (n and a is not None) else a
        for a, n in zip(args, need, strict=True)
    ]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g).to(gout_dtype or out.dtype).to(out.dtype)
    gout = gout.to(out.device)
    grads = [None] * len(args)
    wanted = [i for i, (a, n) in enumerate(zip(args, need, strict=True)) if n and a is not None]
    if wanted and out.numel() > 0:
        got = torch.autograd.grad(out, [leaves[i] for i in wanted], gout)
        for i, gr in zip(wanted, got, strict=True):
            grads[i] = gr
    return out.detach(), grads, gout


def check_against_oracle(ours_fn, torch_fn, args, need, seed: int = 0, names=()):
    """Forward and every requested gradient of ``ours_fn`` against ``torch_fn`` run in float64 on
    the same values (and, for fp16/bf16, against ``torch_fn``'s own error in that dtype)."""
    ours, ograds, _ = forward_backward(ours_fn, args, need, seed)
    ref, rgrads, _ = forward_backward(
        torch_fn, [up(a) for a in args], need, seed, gout_dtype=ours.dtype
    )
    lowp = ours.dtype in (torch.float16, torch.bfloat16)
    tout, tgrads = None, [None] * len(args)
    if lowp:
        tout, tgrads, _ = forward_backward(torch_fn, args, need, seed)
    assert_close_to_oracle(ours, ref, tout, what="output")
    names = list(names) or [f"arg{i}" for i in range(len(args))]
    for name, a, o, r, t in zip(names, args, ograds, rgrads, tgrads, strict=True):
        if r is None:
            assert o is None, f"grad_{name}: computed but not asked for"
            continue
        assert o.dtype == a.dtype and o.shape == a.shape, f"grad_{name}: {o.dtype} {o.shape}"
        assert_close_to_oracle(o, r, t, what=f"grad_{name}", compute_dtype=ours.dtype)
    return ours


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def digests_in_subprocess(script: str, *args: str, unset=(), **env_vars: str) -> dict:
    """Run ``script`` (Python source printing "key digest" lines) in a fresh interpreter at the
    repository root, with the environment variables in ``unset`` removed and ``env_vars`` set;
    returns key -> digest. For what is read once per process (environment variables read by the
    C++ kernels, oneDNN's ISA), where a path is told apart by its bits."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_vars)
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split() for line in r.stdout.splitlines())
