"""Triton kernels for batch normalization (+ fused ReLU) and their launchers.

The input is seen as (outer, C, inner) (see csrc/batch_norm.h): contiguous (N, C, S) or channels
last (N*S, C, 1); element (r, c) of the flattened (outer * inner, C) view sits at
(r // inner) * C * inner + c * inner + r % inner (Triton folds inner == 1 away).
Statistics: per-channel shifted sums S1 = sum(x - K), S2 = sum((x - K)^2), K the channel's first
value, the terms in fp32 (fp64 for fp64), summed per tile of rows in fp64 and the tile partials
added in row-tile order by a second kernel: deterministic, and exact for data with a large
offset. Then one pass normalises, scales, shifts and applies the ReLU. Backward: the same
two-stage reduction for sum(dz) and sum(dz (x - mean)) (dz = dy, masked by output > 0 for ReLU),
then one pass for dx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import ACTIVATIONS, acc_dtype
from ..ops.batch_norm import _check_input, check_args, check_backward_args, check_elemt_args
from ._common import INTERPRET, tl_acc_dtype, to_dtype

NUM_WARPS = 4
_RELU = ACTIVATIONS["relu"]


def _layout(input: torch.Tensor):
    """(x, outer, C, inner): the input, or a contiguous copy, seen as (outer, C, inner)."""
    n, c = input.shape[0], input.shape[1]
    s = input.numel() // max(n * c, 1)
    if input.dim() == 2:
        return input.contiguous(), n, c, 1
    if not input.is_contiguous() and input.movedim(1, -1).is_contiguous():
        return input, n * s, c, 1
    return input.contiguous(), n, c, s


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous():
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _blocks(C: int, inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): across channels for channels-last data, one channel's run otherwise."""
    elems = 4096 if INTERPRET else 2048
    if inner == 1:
        bc = min(64, triton.next_power_of_2(max(C, 1)))
        return max(1, elems // bc), bc
    return elems, 1


@triton.jit
def _offsets(offs_r, offs_c, C, inner):
    r = offs_r.to(tl.int64)
    return (
        (r // inner)[:, None] * (C * inner)
        + offs_c[None, :].to(tl.int64) * inner
        + (r % inner)[:, None]
    )


@triton.jit
def _bn_partial_sums_kernel(
    x_ptr,  # input, (outer, C, inner) dense
    dy_ptr,  # BACKWARD: the gradient, same layout
    y_ptr,  # BACKWARD and RELU: the forward's output, same layout
    ref_ptr,  # per-channel value subtracted from x: the shift K (forward) or the mean (backward)
    pa_ptr,  # (n_row_tiles, C) fp64 partial sums: sum(x - K), or sum(dz)
    pb_ptr,  # (n_row_tiles, C) fp64 partial sums: sum((x - K)^2), or sum(dz (x - mean))
    R,  # outer * inner
    C,
    inner,
    BACKWARD: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mask = (offs_r < R)[:, None] & cmask[None, :]
    offs = _offsets(offs_r, offs_c, C, inner)
    ref = tl.load(ref_ptr + offs_c, mask=cmask, other=0.0).to(ACC)
    d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - ref[None, :], 0.0)
    if BACKWARD:
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            # A select, as torch's threshold_backward.
            dz = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC) <= 0, 0.0, dz)
        a = dz
        b = dz * d
    else:
        a = d
        b = d * d
    # The tile's column sums in fp64: a reduction along rows can be a plain running sum (the
    # interpreter's numpy sum along axis 0 is), which in fp32 cost 1.4e-6 relative over 40000
    # values; the elementwise terms stay in ACC.
    dst = pid_r.to(tl.int64) * C + offs_c
    tl.store(pa_ptr + dst, tl.sum(a.to(tl.float64), axis=0), mask=cmask)
    tl.store(pb_ptr + dst, tl.sum(b.to(tl.float64), axis=0), mask=cmask)


@triton.jit
def _bn_sum_partials_kernel(
    pa_ptr,  # (n_tiles, C) partials
    pb_ptr,
    sa_ptr,  # (C,) fp64 totals, summed in tile order
    sb_ptr,
    n_tiles,
    C,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    sa = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sb = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t in range(0, n_tiles):
        sa += tl.load(pa_ptr + t * C + offs_c, mask=cmask, other=0.0).to(tl.float64)
        sb += tl.load(pb_ptr + t * C + offs_c, mask=cmask, other=0.0).to(tl.float64)
    tl.store(sa_ptr + offs_c, sa, mask=cmask)
    tl.store(sb_ptr + offs_c, sb, mask=cmask)


@triton.jit
def _bn_apply_kernel(
    x_ptr,  # input, (outer, C, inner) dense
    out_ptr,  # FORWARD: y; BACKWARD: dx; same layout as x
    dy_ptr,  # BACKWARD: the gradient
    y_ptr,  # BACKWARD and RELU: the forward's output
    mean_ptr,  # per-channel mean (ACC)
    scale_ptr,  # per-channel gamma * invstd (ACC)
    beta_ptr,  # FORWARD: per-channel beta (ACC)
    gmean_ptr,  # BACKWARD and TRAINING: per-channel mean of dz (ACC)
    k_ptr,  # BACKWARD and TRAINING: per-channel invstd^2 mean(dz (x - mean)) (ACC)
    R,
    C,
    inner,
    BACKWARD: tl.constexpr,
    TRAINING: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mask = (offs_r < R)[:, None] & cmask[None, :]
    offs = _offsets(offs_r, offs_c, C, inner)
    xc = (
        tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        - tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    )
    scale = tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    if BACKWARD:
        v = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            v = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC) <= 0, 0.0, v)
        if TRAINING:
            gmean = tl.load(gmean_ptr + offs_c, mask=cmask, other=0.0)[None, :]
            k = tl.load(k_ptr + offs_c, mask=cmask, other=0.0)[None, :]
            v = v - gmean - xc * k
        v = v * scale
    else:
        # (x - mean) first: a large offset cancels exactly before the scaling.
        v = xc * scale + tl.load(beta_ptr + offs_c, mask=cmask, other=0.0)[None, :]
        if RELU:
            v = tl.where(v < 0, 0.0, v)
    tl.store(out_ptr + offs, to_dtype(v, out_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    return acc_dtype(dtype), tl_acc_dtype(dtype)


def _channel_sums(x, dy, y, ref, R, C, inner, backward, relu):
    """Per-channel fp64 (sum a, sum b), two deterministic stages."""
    br, bc = _blocks(C, inner)
    acc_t, acc_tl = _acc(x.dtype)
    n_tiles = triton.cdiv(R, br)
    pa = torch.empty((n_tiles, C), dtype=torch.float64, device=x.device)
    pb = torch.empty_like(pa)
    _bn_partial_sums_kernel[(n_tiles, triton.cdiv(C, bc))](
        x,
        dy if backward else x,
        y if relu and backward else x,
        ref,
        pa,
        pb,
        R,
        C,
        inner,
        BACKWARD=backward,
        RELU=relu,
        ACC=acc_tl,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=NUM_WARPS,
    )
    sa = torch.empty(C, dtype=torch.float64, device=x.device)
    sb = torch.empty_like(sa)
    _bn_sum_partials_kernel[(triton.cdiv(C, 128),)](pa, pb, sa, sb, n_tiles, C, BLOCK_C=128)
    return sa, sb


def _batch_stats(x, R, C, inner):
    """Per-channel (mean, biased variance) in fp64 from the shifted sums (R > 0)."""
    acc_t, _ = _acc(x.dtype)
    first = _first_values(x, C, inner).to(acc_t)
    shift = torch.where(first.isfinite(), first, 0.0).contiguous()  # csrc/hpml_math.h bn_shift
    s1, s2 = _channel_sums(x, None, None, shift, R, C, inner, False, False)
    m1 = s1 / R
    return shift.double() + m1, (s2 / R - m1 * m1).clamp_min(0.0)


def batch_norm(input, weight, bias, running_mean, running_var, training, eps, activation):
    """hpml::batch_norm_triton: (output, mean, invstd, var), the output in the input's layout;
    per-channel statistics in fp32 (fp64 for fp64 input); var the unbiased batch variance in
    training, else empty."""
    check_args(input, weight, bias, running_mean, running_var, training, eps, activation)
    x, outer, C, inner = _layout(input)
    R = outer * inner
    acc_t, acc_tl = _acc(x.dtype)
    dev = x.device
    out = torch.empty_like(x)
    relu = activation == _RELU
    if training:
        if R > 0:
            mean, var_b = _batch_stats(x, R, C, inner)
            mean = mean.to(acc_t)
            invstd = torch.rsqrt(var_b + eps).to(acc_t)
            var = (var_b * R / (R - 1) if R > 1 else var_b).to(acc_t)
        else:
            mean = torch.zeros(C, dtype=acc_t, device=dev)
            invstd = torch.full((C,), 1.0 / (eps**0.5), dtype=acc_t, device=dev)
            var = torch.zeros(C, dtype=acc_t, device=dev)
    else:
        mean = running_mean.to(acc_t, copy=True)  # an output must not alias an input
        invstd = torch.rsqrt(running_var.double() + eps).to(acc_t)
        var = torch.empty(0, dtype=acc_t, device=dev)
    gamma = weight.to(acc_t) if weight is not None else torch.ones(C, dtype=acc_t, device=dev)
    beta = bias.to(acc_t) if bias is not None else torch.zeros(C, dtype=acc_t, device=dev)
    scale = (gamma * invstd).contiguous()
    if R > 0 and C > 0:
        br, bc = _blocks(C, inner)
        _bn_apply_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
            x,
            out,
            x,
            x,
            mean.contiguous(),
            scale,
            beta.contiguous(),
            scale,
            scale,
            R,
            C,
            inner,
            BACKWARD=False,
            TRAINING=training,
            RELU=relu,
            ACC=acc_tl,
            BLOCK_R=br,
            BLOCK_C=bc,
            num_warps=NUM_WARPS,
        )
    return out, mean.contiguous(), invstd.contiguous(), var.contiguous()


def _first_values(x, C, inner):
    """Each channel's first value in memory (element (0, c) of the (outer, C, inner) view), the
    shift of the sums: a view, no copy of x."""
    return x.as_strided((C,), (inner,))


def _dx(x, dy, y, weight, mean, invstd, sdz, sdzx, n, batch_terms, relu):
    """dx = (dz - sdz / n - (x - mean) invstd^2 sdzx / n) gamma invstd (batch_terms), else
    dz gamma invstd; x, dy, y in one layout (outer, C, inner)."""
    _, _, C, inner = _layout(x)
    R = x.numel() // max(C, 1)
    acc_t, acc_tl = _acc(x.dtype)
    dev = x.device
    dx = torch.empty_like(x)
    gamma = weight.to(acc_t) if weight is not None else torch.ones(C, dtype=acc_t, device=dev)
    scale = (gamma * invstd).contiguous()
    gmean = (sdz.double() / n).to(acc_t).contiguous()
    k = (sdzx.double() / n * invstd.double() * invstd.double()).to(acc_t).contiguous()
    if R > 0 and C > 0:
        br, bc = _blocks(C, inner)
        _bn_apply_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
            x,
            dx,
            dy,
            y,
            mean.contiguous(),
            scale,
            scale,
            gmean,
            k,
            R,
            C,
            inner,
            BACKWARD=True,
            TRAINING=batch_terms,
            RELU=relu,
            ACC=acc_tl,
            BLOCK_R=br,
            BLOCK_C=bc,
            num_warps=NUM_WARPS,
        )
    return dx


def batch_norm_backward(
    grad,
    input,
    weight,
    output,
    mean,
    invstd,
    training,
    activation,
    input_grad,
    weight_grad,
    bias_grad,
):
    """hpml::batch_norm_backward_triton: (grad_input, grad_weight, grad_bias)."""
    check_backward_args(
        "hpml::batch_norm_backward", grad, input, weight, output, activation, mean, invstd
    )
    x, outer, C, inner = _layout(input)
    R = outer * inner
    acc_t, acc_tl = _acc(x.dtype)
    dev = x.device
    relu = activation == _RELU
    dy = _same_layout(grad, x)
    y = _same_layout(output, x) if relu else x
    wdt = weight.dtype if weight is not None else x.dtype
    if R > 0:
        sdz, sdzx = _channel_sums(x, dy, y, mean, R, C, inner, True, relu)
    else:
        sdz = sdzx = torch.zeros(C, dtype=torch.float64, device=dev)
    dw = (sdzx * invstd.double()).to(wdt) if weight_grad else torch.empty(0, dtype=wdt, device=dev)
    db = sdz.to(wdt) if bias_grad else torch.empty(0, dtype=wdt, device=dev)
    if not input_grad:
        return torch.empty(0, dtype=x.dtype, device=dev), dw, db
    dx = _dx(x, dy, y, weight, mean, invstd, sdz, sdzx, max(R, 1), training, relu)
    return dx, dw, db


def batch_norm_stats(input):
    """hpml::batch_norm_stats_triton: (mean, biased variance) per channel, in fp32 (fp64 for
    fp64)."""
    _check_input("hpml::batch_norm_stats", input, 0)
    x, outer, C, inner = _layout(input)
    R = outer * inner
    acc_t, _ = _acc(x.dtype)
    if R == 0:
        z = torch.zeros(C, dtype=acc_t, device=x.device)
        return z, z.clone()
    mean, var_b = _batch_stats(x, R, C, inner)
    return mean.to(acc_t), var_b.to(acc_t)


def batch_norm_backward_reduce(grad, input, output, mean, activation):
    """hpml::batch_norm_backward_reduce_triton: (sum dz, sum dz (x - mean)) per channel."""
    check_backward_args(
        "hpml::batch_norm_backward_reduce", grad, input, None, output, activation, mean, None
    )
    x, outer, C, inner = _layout(input)
    R = outer * inner
    acc_t, _ = _acc(x.dtype)
    relu = activation == _RELU
    if R == 0:
        z = torch.zeros(C, dtype=acc_t, device=x.device)
        return z, z.clone()
    dy = _same_layout(grad, x)
    y = _same_layout(output, x) if relu else x
    ref = mean.to(acc_t).contiguous()
    sdz, sdzx = _channel_sums(x, dy, y, ref, R, C, inner, True, relu)
    return sdz.to(acc_t), sdzx.to(acc_t)


def batch_norm_backward_elemt(
    grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation
):
    """hpml::batch_norm_backward_elemt_triton: grad_input from whole-batch sums."""
    check_elemt_args(
        grad, input, weight, output, mean, invstd, sum_dz, sum_dz_xmu, count, activation
    )
    x, _, _, _ = _layout(input)
    relu = activation == _RELU
    dy = _same_layout(grad, x)
    y = _same_layout(output, x) if relu else x
    acc_t, _ = _acc(x.dtype)
    return _dx(
        x, dy, y, weight, mean.to(acc_t), invstd.to(acc_t), sum_dz, sum_dz_xmu, count, True, relu
    )


def aot_specs() -> list[dict]:
    """The configurations `make gpu-build-check` compiles: each kernel in each dtype, for
    channels-last (inner = 1, tiles across channels) and contiguous data (one channel's run)."""
    from ._common import aot_spec

    specs = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        acc = tl.float64 if dt == "fp64" else tl.float32
        acc_s = "fp64" if dt == "fp64" else "fp32"
        for layout, (br, bc) in (("cl", (32, 64)), ("nchw", (2048, 1))):
            ints = {"R": "i32", "C": "i32", "inner": "i32"}
            for backward in (False, True):
                specs.append(
                    aot_spec(
                        _bn_partial_sums_kernel,
                        f"bn_partial_sums[{dt},{layout},bwd={int(backward)}]",
                        {
                            "x_ptr": f"*{dt}",
                            "dy_ptr": f"*{dt}",
                            "y_ptr": f"*{dt}",
                            "ref_ptr": f"*{acc_s}",
                            "pa_ptr": "*fp64",
                            "pb_ptr": "*fp64",
                            **ints,
                        },
                        dict(BACKWARD=backward, RELU=backward, ACC=acc, BLOCK_R=br, BLOCK_C=bc),
                        num_warps=NUM_WARPS,
                        aligned=("x_ptr", "dy_ptr", "y_ptr", "R", "C"),
                    )
                )
                specs.append(
                    aot_spec(
                        _bn_apply_kernel,
                        f"bn_apply[{dt},{layout},bwd={int(backward)}]",
                        {
                            "x_ptr": f"*{dt}",
                            "out_ptr": f"*{dt}",
                            "dy_ptr": f"*{dt}",
                            "y_ptr": f"*{dt}",
                            **{
                                p: f"*{acc_s}"
                                for p in ("mean_ptr", "scale_ptr", "beta_ptr", "gmean_ptr", "k_ptr")
                            },
                            **ints,
                        },
                        dict(
                            BACKWARD=backward,
                            TRAINING=True,
                            RELU=True,
                            ACC=acc,
                            BLOCK_R=br,
                            BLOCK_C=bc,
                        ),
                        num_warps=NUM_WARPS,
                        aligned=("x_ptr", "out_ptr", "dy_ptr", "y_ptr", "R", "C"),
                    )
                )
    specs.append(
        aot_spec(
            _bn_sum_partials_kernel,
            "bn_sum_partials",
            {
                "pa_ptr": "*fp64",
                "pb_ptr": "*fp64",
                "sa_ptr": "*fp64",
                "sb_ptr": "*fp64",
                "n_tiles": "i32",
                "C": "i32",
            },
            dict(BLOCK_C=128),
            num_warps=4,
            aligned=("pa_ptr", "pb_ptr", "sa_ptr", "sb_ptr"),
        )
    )
    return specs
