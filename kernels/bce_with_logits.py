"""Triton kernels for binary cross-entropy with logits, and their launchers.

Forward: one pass over input/target; with a reduction each program writes one fp32 (fp64) partial
sum and a second single-program kernel adds the partials in index order: deterministic, no
atomics. Backward: one pass that writes grad_input and grad_target together.
The per-element formulas are ATen's (see csrc/hpml_math.h), so +-inf and NaN give torch's results.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..constants import REDUCTIONS, acc_dtype
from ..ops.bce_with_logits import check_args, check_backward_args
from ._common import (
    INTERPRET,
    Bcast,
    load_bcast,
    log_sigmoid,
    sigmoid,
    tl_acc_dtype,
    to_dtype,
)

# Elements per program: 1024 over 4 warps is 8 per thread, 16-byte loads, ~90 registers on sm_90
# (4096 over 8 warps needed ~200 and capped occupancy). The interpreter runs a block as numpy
# arrays, so bigger blocks are faster there.
BLOCK = 4096 if INTERPRET else 1024
NUM_WARPS = 4
REDUCE_BLOCK = 1024
_NONE, _MEAN = REDUCTIONS["none"], REDUCTIONS["mean"]


@triton.jit
def _bce_fwd_kernel(
    x_ptr,  # input (logits), contiguous, n elements
    y_ptr,  # target, same dtype and layout as x
    w_ptr,  # weight, read as Bcast(W_MODE, w_inner, w_period); unused when W_MODE == 0
    w_inner,
    w_period,
    pw_ptr,  # pos_weight, likewise with PW_MODE
    pw_inner,
    pw_period,
    out_ptr,  # REDUCE: one partial sum per program (ACC); else the per-element loss (x's dtype)
    n,  # number of elements
    W_MODE: tl.constexpr,
    PW_MODE: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 inputs
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Cast on load: arithmetic on bf16 values is wrong under the interpreter, and fp32 math is
    # what we want on the GPU anyway.
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
    ls = log_sigmoid(x)
    if PW_MODE != 0:
        pw = load_bcast(pw_ptr, offs, mask, pw_inner, pw_period, PW_MODE).to(ACC)
        ls = ls * ((pw - 1.0) * y + 1.0)
    loss = (1.0 - y) * x - ls
    if W_MODE != 0:
        loss = loss * load_bcast(w_ptr, offs, mask, w_inner, w_period, W_MODE).to(ACC)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(out_ptr + offs, to_dtype(loss, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(
    p_ptr,  # partial sums (fp32 or fp64)
    nparts,  # how many
    out_ptr,  # 0-d result, in the input's dtype
    divisor,  # n for a mean, 0 for a sum
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    for start in range(0, nparts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(p_ptr + offs, mask=offs < nparts, other=0)
    total = tl.sum(acc, axis=0).to(tl.float64)
    if divisor > 0:
        # In fp64: n need not be exact in fp32.
        total = total / divisor.to(tl.float64)
    # Through the accumulation dtype: the interpreter's fp64 -> bf16 cast is wrong.
    tl.store(out_ptr, to_dtype(total.to(p_ptr.dtype.element_ty), out_ptr.dtype.element_ty))


@triton.jit
def bce_backward_values(
    g_ptr, x_ptr, y_ptr, w_ptr, w_inner, w_period, pw_ptr, pw_inner, pw_period, offs, mask,
    mean_div, W_MODE: tl.constexpr, PW_MODE: tl.constexpr, GRAD_ELEMWISE: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_GY: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(d loss / d input, d loss / d target) in ``ACC`` for the flat indices ``offs`` of the
    loss's operands (0 where ``mask`` is off, or where not asked for): torch's formulas, the
    loss's gradient ``g_ptr`` per element (GRAD_ELEMWISE) or one value (divided by ``mean_div``
    for a mean). Shared by the loss's backward kernel and the fused net's (kernels/mlp.py), where
    the net's last layer starts from it."""
    if GRAD_ELEMWISE:
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    else:
        # Read on the device: no host synchronisation for the scalar grad.
        g = tl.load(g_ptr).to(ACC)
        if mean_div > 0:
            g = (g.to(tl.float64) / mean_div.to(tl.float64)).to(ACC)
        g = tl.where(mask, g, 0.0)
    if W_MODE != 0:
        g = load_bcast(w_ptr, offs, mask, w_inner, w_period, W_MODE).to(ACC) * g
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    if PW_MODE != 0:
        pw = load_bcast(pw_ptr, offs, mask, pw_inner, pw_period, PW_MODE).to(ACC)
    dx = tl.zeros_like(x)
    dy = tl.zeros_like(x)
    if NEED_GX:
        y = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
        s = sigmoid(x)
        if PW_MODE != 0:
            t = pw * y
            d = (t + 1.0 - y) * s - t
        else:
            d = s - y
        dx = d * g
    if NEED_GY:
        if PW_MODE != 0:
            d = log_sigmoid(-x) - log_sigmoid(x) * pw
        else:
            d = -x
        dy = d * g
    return dx, dy


@triton.jit
def _bce_bwd_kernel(
    g_ptr,  # grad of the loss: n elements (GRAD_ELEMWISE) or a single value
    x_ptr,  # input, contiguous
    y_ptr,  # target
    w_ptr,  # weight as Bcast (W_MODE)
    w_inner,
    w_period,
    pw_ptr,  # pos_weight as Bcast (PW_MODE)
    pw_inner,
    pw_period,
    gx_ptr,  # grad_input out (written when NEED_GX)
    gy_ptr,  # grad_target out (written when NEED_GY)
    n,
    mean_div,  # n for a mean, 0 otherwise
    W_MODE: tl.constexpr,
    PW_MODE: tl.constexpr,
    GRAD_ELEMWISE: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dx, dy = bce_backward_values(
        g_ptr, x_ptr, y_ptr, w_ptr, w_inner, w_period, pw_ptr, pw_inner, pw_period, offs, mask,
        mean_div, W_MODE, PW_MODE, GRAD_ELEMWISE, NEED_GX, NEED_GY, ACC,
    )  # fmt: skip
    if NEED_GX:
        tl.store(gx_ptr + offs, to_dtype(dx, gx_ptr.dtype.element_ty), mask=mask)
    if NEED_GY:
        tl.store(gy_ptr + offs, to_dtype(dy, gy_ptr.dtype.element_ty), mask=mask)


def _operands(input, target, weight, pos_weight):
    x, y = input.contiguous(), target.contiguous()
    w, pw = Bcast(weight, x.shape, x), Bcast(pos_weight, x.shape, x)
    return x, y, w, pw


def bce_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
) -> torch.Tensor:
    """hpml::bce_with_logits_triton: the loss of ``input`` (any shape, floating) against
    ``target`` (same shape and dtype); ``weight``/``pos_weight`` broadcastable to the input.
    ``reduction`` 0 none (output of the input's shape), 1 mean, 2 sum (0-d output). Output in the
    input's dtype."""
    check_args(input, target, weight, pos_weight, reduction)
    x, y, w, pw = _operands(input, target, weight, pos_weight)
    n = x.numel()
    reduce = reduction != _NONE
    out = torch.empty(() if reduce else x.shape, dtype=x.dtype, device=x.device)
    if n == 0:
        if reduce:
            out.fill_(math.nan if reduction == _MEAN else 0.0)  # torch: mean of nothing is NaN
        return out
    nprog = triton.cdiv(n, BLOCK)
    dst = torch.empty(nprog, dtype=acc_dtype(x.dtype), device=x.device) if reduce else out
    _bce_fwd_kernel[(nprog,)](
        x,
        y,
        *w.args,
        *pw.args,
        dst,
        n,
        W_MODE=w.mode,
        PW_MODE=pw.mode,
        REDUCE=reduce,
        ACC=tl_acc_dtype(x.dtype),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    if reduce:
        _sum_partials_kernel[(1,)](
            dst, nprog, out, n if reduction == _MEAN else 0, BLOCK=REDUCE_BLOCK, num_warps=4
        )
    return out


def bce_with_logits_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hpml::bce_with_logits_backward_triton: the gradients of the loss with respect to input and
    target, each of the input's shape and dtype, or an empty tensor when not asked for. ``grad``
    is 0-d for a reduced loss."""
    check_backward_args(grad, input, target, weight, pos_weight, reduction)
    x, y, w, pw = _operands(input, target, weight, pos_weight)
    n = x.numel()
    gx = torch.empty(x.shape if input_grad else (0,), dtype=x.dtype, device=x.device)
    gy = torch.empty(x.shape if target_grad else (0,), dtype=x.dtype, device=x.device)
    if n == 0 or not (input_grad or target_grad):
        return gx, gy
    elemwise = reduction == _NONE
    g = grad.to(x.dtype).contiguous() if elemwise else grad
    _bce_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        g,
        x,
        y,
        *w.args,
        *pw.args,
        gx if input_grad else x,
        gy if target_grad else x,
        n,
        n if reduction == _MEAN else 0,
        W_MODE=w.mode,
        PW_MODE=pw.mode,
        GRAD_ELEMWISE=elemwise,
        NEED_GX=input_grad,
        NEED_GY=target_grad,
        ACC=tl_acc_dtype(x.dtype),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return gx, gy


def aot_specs() -> list[dict]:
    """The configurations `make gpu-build-check` compiles for sm_80/sm_90: every dtype, the forward
    with and without reduction and broadcast operands, the backward with every operand."""
    from ._common import aot_spec

    specs = []
    tl_t = {"fp32": tl.float32, "fp16": tl.float32, "bf16": tl.float32, "fp64": tl.float64}
    for dt, acc in tl_t.items():
        acc_s = "fp64" if dt == "fp64" else "fp32"
        ptrs = {a: f"*{dt}" for a in ("x_ptr", "y_ptr", "w_ptr", "pw_ptr")}
        ints = {
            "w_inner": "i32",
            "w_period": "i32",
            "pw_inner": "i32",
            "pw_period": "i32",
            "n": "i32",
        }
        aligned = ("x_ptr", "y_ptr", "w_ptr", "pw_ptr", "out_ptr", "n")
        for reduce, wm, pm in ((True, 0, 0), (True, 1, 2), (False, 2, 1)):
            specs.append(
                aot_spec(
                    _bce_fwd_kernel,
                    f"bce_fwd[{dt},reduce={int(reduce)},w={wm},pw={pm}]",
                    {**ptrs, **ints, "out_ptr": f"*{acc_s}" if reduce else f"*{dt}"},
                    dict(W_MODE=wm, PW_MODE=pm, REDUCE=reduce, ACC=acc, BLOCK=1024),
                    num_warps=NUM_WARPS,
                    aligned=aligned,
                )
            )
        specs.append(
            aot_spec(
                _bce_bwd_kernel,
                f"bce_bwd[{dt},w=1,pw=2]",
                {
                    **ptrs,
                    **ints,
                    "g_ptr": f"*{dt}",
                    "gx_ptr": f"*{dt}",
                    "gy_ptr": f"*{dt}",
                    "mean_div": "i32",
                },
                dict(
                    W_MODE=1,
                    PW_MODE=2,
                    GRAD_ELEMWISE=False,
                    NEED_GX=True,
                    NEED_GY=True,
                    ACC=acc,
                    BLOCK=1024,
                ),
                num_warps=NUM_WARPS,
                aligned=aligned[:4] + ("gx_ptr", "gy_ptr", "n"),
            )
        )
        specs.append(
            aot_spec(
                _sum_partials_kernel,
                f"bce_sum_partials[{acc_s}->{dt}]",
                {"p_ptr": f"*{acc_s}", "nparts": "i32", "out_ptr": f"*{dt}", "divisor": "i32"},
                dict(BLOCK=REDUCE_BLOCK),
                num_warps=4,
                aligned=("p_ptr",),
            )
        )
    return specs
