"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..constants import acc_dtype

# Read when the kernels are decorated: @triton.jit decides then whether to interpret.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET_C = tl.constexpr(INTERPRET)  # the same, visible inside @triton.jit code


def tl_acc_dtype(dtype: torch.dtype):
    """The accumulation dtype of ``dtype`` (hpml_ops/constants.py) as a Triton type."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


class Bcast:
    """A tensor broadcast to a shape, read as ``data[(i // inner) % period]`` for element ``i`` of
    the row-major flattening; ``mode`` 0 absent, 1 full (``data[i]``), 2 periodic. Mirrors
    ``hpml::Bcast`` in csrc/common.h: a per-feature vector, a per-row value and a scalar are read in
    place; any other pattern is materialised once."""

    __slots__ = ("data", "inner", "period", "mode")

    def __init__(self, t: torch.Tensor | None, shape: torch.Size, like: torch.Tensor):
        if t is None:
            self.data, self.inner, self.period, self.mode = like, 1, 1, 0
            return
        numel = math.prod(shape)
        e = t.expand(shape)
        first = last = -1
        one_run, bcast_after_real = True, False
        for d, size in enumerate(shape):
            if size <= 1:
                continue
            if e.stride(d) != 0:
                if first < 0:
                    first = d
                if bcast_after_real:
                    one_run = False
                last = d
            elif first >= 0:
                bcast_after_real = True
        if first < 0:
            self.data = t.reshape(-1)[: min(1, t.numel())].contiguous()
            self.inner, self.period = max(numel, 1), 1
        elif not one_run:
            self.data = e.contiguous().reshape(-1)
            self.inner, self.period = 1, numel
        else:
            block = e
            inner = period = 1
            for d in range(len(shape) - 1, -1, -1):
                if d < first or d > last:
                    block = block.narrow(d, 0, 1)
                    if d > last:
                        inner *= shape[d]
                else:
                    period *= shape[d]
            self.data = block.contiguous().reshape(-1)
            self.inner, self.period = inner, period
        self.mode = 1 if (self.inner == 1 and self.period == numel) else 2

    @property
    def args(self) -> tuple:
        """The kernel arguments (pointer, inner, period) that ``load_bcast`` reads it by."""
        return self.data, self.inner, self.period


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even into bf16 under the interpreter too: its fp32 ->
    bf16 cast truncates (a GPU rounds), which would cost up to a whole ulp per cast."""
    if _INTERPRET_C and DTYPE == tl.bfloat16:
        xf = x.to(tl.float32)
        u = xf.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(xf != xf, xf.to(tl.bfloat16), r)
    else:
        return x.to(DTYPE)


@triton.jit
def load_bcast(ptr, offs, mask, inner, period, MODE: tl.constexpr):
    """Values of a broadcast operand (see ``Bcast``) for the flat indices ``offs``, in fp32/fp64
    as loaded (the caller casts)."""
    if MODE == 1:
        v = tl.load(ptr + offs, mask=mask, other=0)
    else:
        v = tl.load(ptr + (offs // inner) % period, mask=mask, other=0)
    return v


@triton.jit
def log1p_unit(u):
    """log(1 + u) for u in [0, 1], as hpml::math::log1p_unit (csrc/hpml_math.h): in fp32,
    2 atanh(s) with s = u / (2 + u), a degree-7 polynomial in s^2; in fp64, log(1 + u) with
    Goldberg's correction (the interpreter has no libdevice, so no log1p to call)."""
    if u.dtype == tl.float64:
        w = 1.0 + u
        return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    else:
        s = u / (2.0 + u)
        z = s * s
        p = z * (1.0 / 15.0) + (1.0 / 13.0)
        p = p * z + (1.0 / 11.0)
        p = p * z + (1.0 / 9.0)
        p = p * z + (1.0 / 7.0)
        p = p * z + (1.0 / 5.0)
        p = p * z + (1.0 / 3.0)
        p = p * z + 1.0
        return 2.0 * s * p


@triton.jit
def log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)); exp never overflows."""
    return tl.minimum(x, 0.0) - log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


def aot_spec(
    fn,
    label: str,
    types: dict,
    constexprs: dict,
    *,
    num_warps: int,
    num_stages: int = 1,
    aligned: tuple[str, ...] = (),
    expect_sass: dict | None = None,
) -> dict:
    """One ahead-of-time compilation of a Triton kernel for tools/gpu_build_check.py.

    ``types``: Triton type of each runtime argument ("*fp32", "i32", ...); ``constexprs``: value
    of each constexpr; ``aligned``: arguments the JIT would see as multiples of 16 (pointers from
    torch's allocator, sizes divisible by 16), which is what enables 16-byte accesses;
    ``expect_sass``: {arch: [instruction substrings that must appear]}."""
    names = fn.arg_names
    missing = [a for a in names if a not in types and a not in constexprs]
    if missing:
        raise ValueError(f"aot_spec {label}: no type for {missing}")
    signature = {a: ("constexpr" if a in constexprs else types[a]) for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return dict(
        label=label,
        fn=fn,
        signature=signature,
        constexprs=dict(constexprs),
        attrs=attrs,
        num_warps=num_warps,
        num_stages=num_stages,
        expect_sass=expect_sass or {},
    )


@triton.jit
def tanh(x):
    """tanh from exp alone (the interpreter has no libdevice): odd Taylor series below a threshold,
    1 - 2 / (1 + exp(2|x|)) above, where that subtraction no longer cancels. Measured against
    float64 numpy over [-3, 3] and 1e-12..10: at most 2.0 ulp in fp32 (7 terms, |x| < 0.4) and in
    fp64 (12 terms, |x| < 0.3)."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * a))
    big = tl.where(x < 0, -big, big)
    z = x * x
    if x.dtype == tl.float64:
        # fp64 constants (a Python float would become an fp32 constant).
        p = tl.full([], -3.927832388331683e-05, tl.float64)
        p = p * z + tl.full([], 9.691537956929451e-05, tl.float64)
        p = p * z + tl.full([], -0.00023912911424355248, tl.float64)
        p = p * z + tl.full([], 0.000590027440945586, tl.float64)
        p = p * z + tl.full([], -0.0014558343870513183, tl.float64)
        p = p * z + tl.full([], 0.003592128036572481, tl.float64)
        p = p * z + tl.full([], -0.008863235529902197, tl.float64)
        p = p * z + tl.full([], 0.021869488536155203, tl.float64)
        p = p * z + tl.full([], -0.05396825396825397, tl.float64)
        p = p * z + tl.full([], 0.13333333333333333, tl.float64)
        p = p * z + tl.full([], -0.3333333333333333, tl.float64)
        p = p * z + 1.0
        out = tl.where(a < 0.3, x * p, big)
    else:
        p = z * 0.003592128036572481 - 0.008863235529902197
        p = p * z + 0.021869488536155203
        p = p * z - 0.05396825396825397
        p = p * z + 0.13333333333333333
        p = p * z - 0.3333333333333333
        p = p * z + 1.0
        out = tl.where(a < 0.4, x * p, big)
    return out


@triton.jit
def tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order (Triton tutorial 03): GROUP_M row tiles share each column tile while it
    is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
