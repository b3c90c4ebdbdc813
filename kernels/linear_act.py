"""Triton kernels for the fused linear + activation, ``act(x @ W.T + b)``, and their launchers.

Forward: a tiled product with an fp32 accumulator (fp64 for fp64), grouped tile order for L2
reuse; the bias, the activation and, for ReLU / leaky ReLU, the bit-packed mask (1 bit per output
element, rows padded to whole bytes) are applied while the tile is still in registers.
Backward: dZ = dY * act'(.) is formed in the prologue of both products (dX = dZ W, dW = dZ^T X)
from dY and the mask (or the output, for sigmoid / tanh), never written out; the bias gradient
is the column sum of dZ, accumulated by the dW programs of the first K tile in a fixed order
(deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..constants import ACT_USES_MASK, ACT_USES_OUTPUT, ACTIVATIONS, mask_row_bytes
from ..ops.linear_act import _allow_tf32, check_args, check_backward_args
from ._common import INTERPRET, sigmoid, tanh, tile_ids, tl_acc_dtype, to_dtype

RELU, LEAKY_RELU, SIGMOID, TANH = (
    ACTIVATIONS[a] for a in ("relu", "leaky_relu", "sigmoid", "tanh")
)
# The same codes inside @triton.jit code.
_RELU, _LEAKY_RELU, _SIGMOID, _TANH = (tl.constexpr(c) for c in (RELU, LEAKY_RELU, SIGMOID, TANH))


def _configs() -> list[triton.Config]:
    """Autotuned on a GPU, pruned per dtype by _prune; the interpreter takes one config (several
    fail there), large blocks being fastest interpreted."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 16-bit tiles for the tensor cores; fp32 / fp64
    # dots run on FMA / DMMA units, where 128-wide tiles spill on sm_80 (gpu-build-check).
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
        (32, 64, 32, 4, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st
        )
        for m, n, k, w, st in shapes
    ]


def _prune(configs, named_args, **kwargs):
    dtype = next(a.dtype for a in named_args.values() if isinstance(a, torch.Tensor))
    wide = dtype in (torch.float16, torch.bfloat16)
    keep = [c for c in configs if (c.kwargs["BLOCK_K"] == 64) == wide]
    if dtype == torch.float64:  # 64 x 64 fp64 tiles spill on sm_80 (gpu-build-check)
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 64]
    return keep or configs


def _quick_bench(kernel_call, quantiles):
    """HPML_TRITON_QUICK_TUNE=1 (the test suite on a GPU sets it): every config still compiles and
    runs, but is timed over a few milliseconds instead of triton's 125 per config and shape."""
    return triton.testing.do_bench(kernel_call, warmup=1, rep=5, quantiles=quantiles)


_AUTOTUNE = dict(
    configs=_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune}
)
if os.environ.get("HPML_TRITON_QUICK_TUNE", "0") == "1":
    _AUTOTUNE["do_bench"] = _quick_bench


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    # torch's formulas: relu keeps NaN, leaky relu is z > 0 ? z : z * slope.
    if ACT == _RELU:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == _LEAKY_RELU:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == _SIGMOID:
        z = sigmoid(z)
    elif ACT == _TANH:
        z = tanh(z)
    return z


@triton.jit
def _dz_tile(
    g_ptr,
    y_ptr,
    mask_ptr,
    offs_m,
    n0,
    M,
    N,
    stride_gm,
    stride_gn,
    stride_ym,
    mask_row_bytes,
    slope,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """dZ = dY * act'(.) for the ROWS rows offs_m and the columns [n0, n0 + COLS), in ACC;
    zero outside (M, N). n0 and COLS are multiples of 8, so the tile reads whole mask bytes."""
    offs_n = n0 + tl.arange(0, COLS)
    rows = offs_m[:, None].to(tl.int64)
    inb = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    g = tl.load(g_ptr + rows * stride_gm + offs_n[None, :] * stride_gn, mask=inb, other=0.0)
    g = g.to(ACC)
    if ACT == _RELU or ACT == _LEAKY_RELU:
        offs_b = n0 // 8 + tl.arange(0, COLS // 8)
        byte = tl.load(
            mask_ptr + rows * mask_row_bytes + offs_b[None, :],
            mask=(offs_m[:, None] < M) & (offs_b[None, :] < mask_row_bytes),
            other=0,
        )
        bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        on = tl.reshape(bits, (ROWS, COLS)) != 0
        # A select, as torch's threshold_backward: a NaN gradient where the mask is off is 0.
        if ACT == _RELU:
            g = tl.where(on, g, 0.0)
        else:
            g = tl.where(on, g, g * slope)
    elif ACT == _SIGMOID or ACT == _TANH:
        y = tl.load(y_ptr + rows * stride_ym + offs_n[None, :], mask=inb, other=0.0).to(ACC)
        if ACT == _SIGMOID:
            g = g * ((1.0 - y) * y)
        else:
            g = g * (1.0 - y * y)
    return g


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _linear_act_fwd_kernel(
    x_ptr,  # input (M, K), any strides
    w_ptr,  # weight (N, K), any strides
    b_ptr,  # bias (N,), contiguous; unused without HAS_BIAS
    y_ptr,  # output (M, N), row-major
    mask_ptr,  # uint8 (M, mask_row_bytes): bit j % 8 of byte [m, j // 8] = z[m, j] > 0
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    mask_row_bytes,
    slope,  # leaky ReLU's negative slope
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" (fp32 means fp32) or "tf32", as torch's matmul switch says
    DOT_FP32: tl.constexpr,  # interpreter + bf16: its bf16 dot is wrong, do the dot in fp32
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # Epilogue, on the fp32 (fp64) accumulator still in registers. Columns >= N hold z = 0, so
    # their mask bits are 0.
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if WRITE_MASK:
        on = z > 0
        if ACT == _RELU:  # NaN too: torch's ReLU backward passes the gradient unless z <= 0
            on = on | (z != z)
        bits = tl.reshape(on.to(tl.int32), (BLOCK_M, BLOCK_N // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        offs_b = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        tl.store(
            mask_ptr + rows * mask_row_bytes + offs_b[None, :],
            packed,
            mask=(offs_m[:, None] < M) & (offs_b[None, :] < mask_row_bytes),
        )
    y = _activate(z, slope, ACT)
    tl.store(
        y_ptr + rows * N + offs_n[None, :],
        to_dtype(y, y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _linear_act_bwd_dx_kernel(
    g_ptr,  # dY (M, N), any strides
    y_ptr,  # output (M, N), row-major (sigmoid / tanh)
    mask_ptr,  # the forward's mask (relu / leaky relu)
    w_ptr,  # weight (N, K), any strides
    dx_ptr,  # dX (M, K), row-major
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    mask_row_bytes,
    slope,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tiles of dX are (BLOCK_M, BLOCK_N) over (M, K); the reduction runs over N in steps of
    # BLOCK_K, so the three kernels share one meaning of the block sizes (and their configs).
    pid_m, pid_k = tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for n0 in range(0, N, BLOCK_K):
        dz = _dz_tile(
            g_ptr,
            y_ptr,
            mask_ptr,
            offs_m,
            n0,
            M,
            N,
            stride_gm,
            stride_gn,
            N,
            mask_row_bytes,
            slope,
            ACT,
            ACC,
            BLOCK_M,
            BLOCK_K,
        )
        # dZ in the storage dtype, as torch materialises it, feeds the tensor cores.
        dz = to_dtype(dz, w_ptr.dtype.element_ty)
        offs_n = n0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
            other=0.0,
        )
        if DOT_FP32:
            dz = dz.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dz, w, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(
        dx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
        to_dtype(acc, dx_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _linear_act_bwd_dw_kernel(
    g_ptr,  # dY (M, N), any strides
    y_ptr,  # output (M, N), row-major (sigmoid / tanh)
    mask_ptr,  # the forward's mask (relu / leaky relu)
    x_ptr,  # input (M, K), any strides
    dw_ptr,  # dW (N, K), row-major; written when NEED_DW
    db_ptr,  # dB (N,); written by the programs of the first K tile when NEED_DB
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    mask_row_bytes,
    slope,
    ACT: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tiles of dW are (BLOCK_M, BLOCK_N) over (N, K); the reduction runs over M in steps of
    # BLOCK_K (dZ tiles of (BLOCK_K, BLOCK_M), used transposed).
    num_k = 1
    if NEED_DW:
        num_k = tl.cdiv(K, BLOCK_N)
    pid_n, pid_k = tile_ids(tl.program_id(0), tl.cdiv(N, BLOCK_M), num_k, GROUP_M)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    for m0 in range(0, M, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        dz = _dz_tile(
            g_ptr,
            y_ptr,
            mask_ptr,
            offs_m,
            pid_n * BLOCK_M,
            M,
            N,
            stride_gm,
            stride_gn,
            N,
            mask_row_bytes,
            slope,
            ACT,
            ACC,
            BLOCK_K,
            BLOCK_M,
        )
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            x = tl.load(
                x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            dzt = tl.trans(to_dtype(dz, x_ptr.dtype.element_ty))
            if DOT_FP32:
                dzt = dzt.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(dzt, x, acc, input_precision=PRECISION, out_dtype=ACC)
    if NEED_DW:
        tl.store(
            dw_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
            to_dtype(acc, dw_ptr.dtype.element_ty),
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
        )
    if NEED_DB:
        tl.store(
            db_ptr + offs_n, to_dtype(db, db_ptr.dtype.element_ty), mask=(offs_n < N) & (pid_k == 0)
        )


def _precision(dtype: torch.dtype) -> str:
    # input_precision only matters for fp32 operands.
    return "tf32" if (dtype == torch.float32 and _allow_tf32()) else "ieee"


def _dot_fp32(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def linear_act(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: int,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hpml::linear_act_triton: act(input @ weight.T + bias) for input (M, K), weight (N, K),
    bias (N,) or None, one dtype. Returns (output (M, N), mask): uint8 (M, ceil(N / 8)) for
    relu / leaky relu, else an empty uint8 tensor."""
    check_args(input, weight, bias, activation, negative_slope)
    M, K = input.shape
    N = weight.shape[0]
    dev = input.device
    out = torch.empty((M, N), dtype=input.dtype, device=dev)
    write_mask = activation in ACT_USES_MASK
    nb = mask_row_bytes(N)
    mask = torch.empty((M, nb) if write_mask else (0,), dtype=torch.uint8, device=dev)
    if M == 0 or N == 0:
        return out, mask
    b = bias.contiguous() if bias is not None else out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _linear_act_fwd_kernel[grid](
        input,
        weight,
        b,
        out,
        mask if write_mask else out,
        M,
        N,
        K,
        input.stride(0),
        input.stride(1),
        weight.stride(0),
        weight.stride(1),
        nb,
        float(negative_slope),
        HAS_BIAS=bias is not None,
        ACT=activation,
        WRITE_MASK=write_mask,
        PRECISION=_precision(input.dtype),
        DOT_FP32=_dot_fp32(input.dtype),
        ACC=tl_acc_dtype(input.dtype),
    )
    return out, mask


def linear_act_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    output: torch.Tensor,
    mask: torch.Tensor,
    activation: int,
    negative_slope: float,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hpml::linear_act_backward_triton: (grad_input (M, K), grad_weight (N, K), grad_bias (N,)),
    each an empty tensor when not asked for; dZ is never materialised."""
    check_backward_args(grad, input, weight, output, mask, activation)
    M, K = input.shape
    N = weight.shape[0]
    dev, dt = input.device, input.dtype
    dx = torch.empty((M, K) if input_grad else (0,), dtype=dt, device=dev)
    dw = torch.empty((N, K) if weight_grad else (0,), dtype=dt, device=dev)
    db = torch.empty((N,) if bias_grad else (0,), dtype=dt, device=dev)
    y = output.contiguous() if activation in ACT_USES_OUTPUT else grad
    msk = mask if activation in ACT_USES_MASK else grad
    if dt == torch.float64 and activation in ACT_USES_MASK:
        # Triton 3.8 cannot lower an 8/16-bit load next to an fp64 dot (gpu-build-check:
        # ConvertTritonGPUToLLVM fails); the mask bytes go in as int32, 4 bytes per 8 elements.
        msk = mask.to(torch.int32)
    common = dict(
        ACT=activation, PRECISION=_precision(dt), DOT_FP32=_dot_fp32(dt), ACC=tl_acc_dtype(dt)
    )
    nb = mask_row_bytes(N)
    if input_grad and M * K > 0:
        if N == 0:
            dx.zero_()
        else:
            _linear_act_bwd_dx_kernel[
                lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ](
                grad,
                y,
                msk,
                weight,
                dx,
                M,
                N,
                K,
                grad.stride(0),
                grad.stride(1),
                weight.stride(0),
                weight.stride(1),
                nb,
                float(negative_slope),
                **common,
            )
    need_dw = weight_grad and N * K > 0
    need_db = bias_grad and N > 0
    if weight_grad and M == 0:
        dw.zero_()
        need_dw = False
    if bias_grad and M == 0:
        db.zero_()
        need_db = False
    if need_dw or need_db:

        def grid(meta):
            n_k = triton.cdiv(K, meta["BLOCK_N"]) if need_dw else 1
            return (triton.cdiv(N, meta["BLOCK_M"]) * n_k,)

        _linear_act_bwd_dw_kernel[grid](
            grad,
            y,
            msk,
            input,
            dw if need_dw else grad,
            db if need_db else grad,
            M,
            N,
            K,
            grad.stride(0),
            grad.stride(1),
            input.stride(0),
            input.stride(1),
            nb,
            float(negative_slope),
            NEED_DW=need_dw,
            NEED_DB=need_db,
            **common,
        )
    return dx, dw, db


def aot_specs() -> list[dict]:
    """The configurations `make gpu-build-check` compiles for sm_80/sm_90: each kernel in each
    dtype with the largest autotune block; fp16/bf16 products must use the tensor cores (HMMA on
    sm_80, Hopper's warpgroup HGMMA on sm_90)."""
    from ._common import aot_spec

    specs = []
    dts = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
    for dt, acc in dts.items():
        mma = {80: ["HMMA"], 90: ["HGMMA"]} if dt in ("fp16", "bf16") else {}
        if dt == "fp64":
            mma = {80: ["DMMA"], 90: ["DMMA"]}
        bk = 64 if dt in ("fp16", "bf16") else 32
        blocks = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8)
        if dt == "fp32":
            blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        if dt == "fp64":
            blocks = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        warps = 8 if blocks["BLOCK_M"] == 128 else 4
        mask_t = "*i32" if dt == "fp64" else "*u8"  # as linear_act_backward passes it
        common = dict(PRECISION="ieee", DOT_FP32=False, ACC=acc, **blocks)
        ints = {"M": "i32", "N": "i32", "K": "i32", "mask_row_bytes": "i32", "slope": "fp32"}
        for act, bias in ((RELU, True), (TANH, False)):
            specs.append(
                aot_spec(
                    _linear_act_fwd_kernel.fn,
                    f"linear_act_fwd[{dt},act={act},bias={int(bias)}]",
                    {
                        "x_ptr": f"*{dt}",
                        "w_ptr": f"*{dt}",
                        "b_ptr": f"*{dt}",
                        "y_ptr": f"*{dt}",
                        "mask_ptr": "*u8",
                        "stride_xm": "i32",
                        "stride_xk": "i32",
                        "stride_wn": "i32",
                        "stride_wk": "i32",
                        **ints,
                    },
                    dict(HAS_BIAS=bias, ACT=act, WRITE_MASK=act == RELU, **common),
                    num_warps=warps,
                    num_stages=3,
                    expect_sass=mma,
                    aligned=(
                        "x_ptr",
                        "w_ptr",
                        "b_ptr",
                        "y_ptr",
                        "mask_ptr",
                        "M",
                        "N",
                        "K",
                        "stride_xm",
                        "stride_wn",
                    ),
                )
            )
        specs.append(
            aot_spec(
                _linear_act_bwd_dx_kernel.fn,
                f"linear_act_bwd_dx[{dt},relu]",
                {
                    "g_ptr": f"*{dt}",
                    "y_ptr": f"*{dt}",
                    "mask_ptr": mask_t,
                    "w_ptr": f"*{dt}",
                    "dx_ptr": f"*{dt}",
                    "stride_gm": "i32",
                    "stride_gn": "i32",
                    "stride_wn": "i32",
                    "stride_wk": "i32",
                    **ints,
                },
                dict(ACT=RELU, **common),
                num_warps=warps,
                num_stages=3,
                expect_sass=mma,
                aligned=(
                    "g_ptr",
                    "y_ptr",
                    "mask_ptr",
                    "w_ptr",
                    "dx_ptr",
                    "M",
                    "N",
                    "K",
                    "stride_gm",
                    "stride_wn",
                ),
            )
        )
        specs.append(
            aot_spec(
                _linear_act_bwd_dw_kernel.fn,
                f"linear_act_bwd_dw[{dt},relu,db]",
                {
                    "g_ptr": f"*{dt}",
                    "y_ptr": f"*{dt}",
                    "mask_ptr": mask_t,
                    "x_ptr": f"*{dt}",
                    "dw_ptr": f"*{dt}",
                    "db_ptr": f"*{dt}",
                    "stride_gm": "i32",
                    "stride_gn": "i32",
                    "stride_xm": "i32",
                    "stride_xk": "i32",
                    **ints,
                },
                dict(ACT=RELU, NEED_DW=True, NEED_DB=True, **common),
                num_warps=warps,
                num_stages=3,
                expect_sass=mma,
                aligned=(
                    "g_ptr",
                    "y_ptr",
                    "mask_ptr",
                    "x_ptr",
                    "dw_ptr",
                    "db_ptr",
                    "M",
                    "N",
                    "K",
                    "stride_gm",
                    "stride_xm",
                ),
            )
        )
    return specs
