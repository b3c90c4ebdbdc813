"""Triton launchers of the whole-MLP ops (hpml::mlp_triton, hpml::mlp_backward_triton), with the
same saved tensors as the C++ op (csrc/mlp.h).

Forward: a net whose widths are all at most 128 (input included), of at most 8 layers, in
fp32/fp16/bf16, runs as one kernel per run of layers between batch norms
(``_mlp_fused_fwd_kernel``; a net without batch norm is one kernel): a program takes a block of
rows through every layer of the run, the products on ``tl.dot`` with fp32 accumulation (as
linear_act: the weights padded with zeros to one power-of-two width ``D``), the bias, activation
and ReLU mask in the epilogue, each hidden layer's output written once (it is what the backward
reads) and read back by the same program, a chunk of ``BLOCK_K`` columns at a time, as the next
layer's input (it is still in L1/L2; holding a whole 128-wide weight in registers would spill).
A run that ends at a batch-norm layer writes that layer's linear output z; the batch norm (its
statistics are over the whole batch, so it cannot be inside a block of rows) and the activation
then run with batch_norm's kernels, and the next run starts from their output. Other nets, and
every net under ``HPML_MLP_KERNEL=layers``, run the layers one after another through the Triton
kernels of linear_act and batch_norm inside the one op call.

Backward, for the nets the fused forward runs, one run of layers at a time from the last: one
kernel takes a block of rows down through every layer of the run (the output's gradient, or the
loss's, each layer's dZ from its mask or saved output, dY of the layer below from dZ re-read a
chunk at a time), writing every layer's dZ and the run's input gradient; each layer's dW and db
are then products over all rows, computed from its dZ by linear_act's weight-gradient kernel
(deterministic: no atomics); between runs, the batch norm's backward. Other nets: the layers one
after another."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..constants import ACT_USES_MASK, ACTIVATIONS, REDUCTIONS, mask_row_bytes
from ..ops.mlp import SAVED_PER_LAYER, check_args, check_backward_args, present
from ._common import Bcast, tl_acc_dtype, to_dtype
from .batch_norm import batch_norm as _batch_norm
from .batch_norm import batch_norm_backward as _batch_norm_backward
from .bce_with_logits import bce_backward_values
from .linear_act import _LEAKY_RELU as _LEAKY_C
from .linear_act import _RELU as _RELU_C
from .linear_act import _SIGMOID as _SIGMOID_C
from .linear_act import _TANH as _TANH_C
from .linear_act import _activate, _dot_fp32, _precision
from .linear_act import linear_act as _linear_act
from .linear_act import linear_act_backward as _linear_act_backward

# The fused forward's limits: layers (one pointer argument each), padded width.
MAX_FUSED_LAYERS = 8
MAX_FUSED_WIDTH = 128
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NONE, _RELU, _LEAKY = ACTIVATIONS["none"], ACTIVATIONS["relu"], ACTIVATIONS["leaky_relu"]
_SIGMOID, _TANH = ACTIVATIONS["sigmoid"], ACTIVATIONS["tanh"]
_NONE_REDUCTION, _MEAN_REDUCTION = REDUCTIONS["none"], REDUCTIONS["mean"]


@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The ``i``-th of eight arguments (``i`` known when compiling)."""
    if i == 0:
        r = p0
    elif i == 1:
        r = p1
    elif i == 2:
        r = p2
    elif i == 3:
        r = p3
    elif i == 4:
        r = p4
    elif i == 5:
        r = p5
    elif i == 6:
        r = p6
    else:
        r = p7
    return r


@triton.jit
def _epilogue(z, slope, m_ptr, rows, row_ok, N, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
              D: tl.constexpr):  # fmt: skip
    """The layer's ReLU mask written (relu, leaky relu; columns >= N hold z = 0: bits 0), then
    its activation."""
    if ACT == _RELU_C or ACT == _LEAKY_C:
        on = z > 0
        if ACT == _RELU_C:  # NaN too: torch's ReLU backward passes the gradient there
            on = on | (z != z)
        bits = tl.reshape(on.to(tl.int32), (BLOCK_M, D // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        offs_b = tl.arange(0, D // 8)
        row_bytes = (N + 7) // 8
        tl.store(m_ptr + rows * row_bytes + offs_b[None, :], packed,
                 mask=row_ok & (offs_b[None, :] < row_bytes))  # fmt: skip
    return _activate(z, slope, ACT)


@triton.jit
def _mlp_fused_fwd_kernel(
    x_ptr,  # input (M, d0), row stride stride_xm, unit column stride
    y_ptr,  # output (M, d_L)
    w0, w1, w2, w3, w4, w5, w6, w7,  # layer i's weight (d_{i+1}, d_i), contiguous
    b0, b1, b2, b3, b4, b5, b6, b7,  # its bias (d_{i+1},) when bit i of HAS_BIAS
    h0, h1, h2, h3, h4, h5, h6, h7,  # hidden layer i's output (M, d_{i+1}): saved, and re-read
    m0, m1, m2, m3, m4, m5, m6, m7,  # layer i's ReLU mask (M, ceil(d_{i+1} / 8)) when it has one
    d0, d1, d2, d3, d4, d5, d6, d7, d8,  # the widths: input, then each layer's output
    M,
    stride_xm,
    slope,
    L: tl.constexpr,  # layers (1..8)
    HAS_BIAS: tl.constexpr,  # bit i: layer i has a bias
    ACT: tl.constexpr,  # hidden activation
    OUT_ACT: tl.constexpr,  # output activation
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ACC: tl.constexpr,
    D: tl.constexpr,  # padded width, a power of two >= 16 and >= every d_i
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # columns of a layer's input read per product step (divides D)
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    row_ok = offs_m[:, None] < M
    offs_n = tl.arange(0, D)
    offs_k = tl.arange(0, BLOCK_K)
    for i in tl.static_range(L):
        K = _pick(i, d0, d1, d2, d3, d4, d5, d6, d7)
        if i == 7:
            N = d8
        else:
            N = _pick(i + 1, d0, d1, d2, d3, d4, d5, d6, d7)
        w_ptr = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7)
        if i == 0:
            src, stride_src = x_ptr, stride_xm
        else:
            src = _pick(i - 1, h0, h1, h2, h3, h4, h5, h6, h7)
            stride_src = K
            tl.debug_barrier()  # the previous layer's stores, visible to the whole block
        z = tl.zeros((BLOCK_M, D), dtype=ACC)
        for k0 in tl.static_range(0, D, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(src + rows * stride_src + kk[None, :], mask=row_ok & (kk[None, :] < K),
                        other=0.0)  # fmt: skip
            b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + kk[:, None],
                        mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            z = tl.dot(a, b, z, input_precision=PRECISION, out_dtype=ACC)
        if (HAS_BIAS >> i) & 1:
            b_ptr = _pick(i, b0, b1, b2, b3, b4, b5, b6, b7)
            z += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC)[None, :]
        m_ptr = _pick(i, m0, m1, m2, m3, m4, m5, m6, m7)
        if i == L - 1:
            out = _epilogue(z, slope, m_ptr, rows, row_ok, N, OUT_ACT, BLOCK_M, D)
            dst = y_ptr
        else:
            out = _epilogue(z, slope, m_ptr, rows, row_ok, N, ACT, BLOCK_M, D)
            dst = _pick(i, h0, h1, h2, h3, h4, h5, h6, h7)
        tl.store(dst + rows * N + offs_n[None, :], to_dtype(out, dst.dtype.element_ty),
                 mask=row_ok & (offs_n[None, :] < N))  # fmt: skip


@triton.jit
def _act_grad(g, slope, m_ptr, s_ptr, rows, row_ok, offs_n, N, ACT: tl.constexpr,
              BLOCK_M: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """dZ = dY * act'(Z) for a (BLOCK_M, D) tile: from the ReLU mask (relu, leaky relu) or the
    layer's saved output (sigmoid, tanh), as linear_act's backward (torch's formulas)."""
    if ACT == _RELU_C or ACT == _LEAKY_C:
        offs_b = tl.arange(0, D // 8)
        row_bytes = (N + 7) // 8
        byte = tl.load(m_ptr + rows * row_bytes + offs_b[None, :],
                       mask=row_ok & (offs_b[None, :] < row_bytes), other=0)  # fmt: skip
        bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        on = tl.reshape(bits, (BLOCK_M, D)) != 0
        if ACT == _RELU_C:  # a select, as torch's threshold_backward
            dz = tl.where(on, g, 0.0)
        else:
            dz = tl.where(on, g, g * slope)
    elif ACT == _SIGMOID_C or ACT == _TANH_C:
        y = tl.load(s_ptr + rows * N + offs_n[None, :], mask=row_ok & (offs_n[None, :] < N),
                    other=0.0).to(g.dtype)  # fmt: skip
        if ACT == _SIGMOID_C:
            dz = g * (1.0 - y) * y
        else:
            dz = g * (1.0 - y * y)
    else:
        dz = g
    return dz


@triton.jit
def _mlp_fused_bwd_kernel(
    g_ptr,  # the output's gradient (M, d_L), contiguous
    y_ptr,  # the output (M, d_L) (read for a sigmoid / tanh output activation)
    gx_ptr,  # the input's gradient (M, d0), when NEED_GX
    w0, w1, w2, w3, w4, w5, w6, w7,  # layer i's weight (d_{i+1}, d_i), contiguous
    h0, h1, h2, h3, h4, h5, h6, h7,  # hidden layer i's saved output (M, d_{i+1})
    m0, m1, m2, m3, m4, m5, m6, m7,  # layer i's ReLU mask, when it has one
    z0, z1, z2, z3, z4, z5, z6, z7,  # out: layer i's dZ (M, d_{i+1}), for its dW and db
    d0, d1, d2, d3, d4, d5, d6, d7, d8,
    M,
    slope,
    t_ptr,  # LOSS: the target (M, d_L), contiguous; g_ptr is then the loss's gradient and
    lw_ptr,  # y_ptr the logits; the loss's weight and pos_weight as Bcast (LW_MODE, LPW_MODE)
    lw_inner,
    lw_period,
    lpw_ptr,
    lpw_inner,
    lpw_period,
    gt_ptr,  # LOSS and NEED_GT: out, the target's gradient (M, d_L)
    mean_div,  # LOSS: M * d_L for a mean, 0 otherwise
    L: tl.constexpr,
    ACT: tl.constexpr,
    OUT_ACT: tl.constexpr,
    NEED_GX: tl.constexpr,
    LOSS: tl.constexpr,  # the last layer's dZ from the BCE-with-logits loss (OUT_ACT none)
    LW_MODE: tl.constexpr,
    LPW_MODE: tl.constexpr,
    GRAD_ELEMWISE: tl.constexpr,  # LOSS: the loss is unreduced, g_ptr (M, d_L)
    NEED_GT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ACC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A block of rows down through every layer: dZ of the last layer from the output's gradient,
    then dY_i = dZ_{i+1} W_{i+1} (dZ_{i+1} re-read a chunk at a time, as the forward re-reads its
    layer inputs) and dZ_i = dY_i * act'; every dZ written (the weight and bias gradients are
    products over all rows, left to linear_act's kernels), the input's gradient last. With LOSS
    the last layer's dZ is the BCE-with-logits gradient computed here from the logits and the
    target (no logits-gradient tensor), and the target's gradient is written in the same pass."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    row_ok = offs_m[:, None] < M
    offs_n = tl.arange(0, D)
    offs_k = tl.arange(0, BLOCK_K)
    for i in tl.static_range(L - 1, -1, -1):
        if i == 7:
            N = d8
        else:
            N = _pick(i + 1, d0, d1, d2, d3, d4, d5, d6, d7)
        z_ptr = _pick(i, z0, z1, z2, z3, z4, z5, z6, z7)
        if i == L - 1 and LOSS:
            # dZ = the loss's gradient (no output activation), BLOCK_K columns at a time and
            # indexed in int32 (`make gpu-build-check`: D-wide tiles spilled at fp32 D = 128 on
            # sm_80/sm_90, int64 indices (the broadcast operands' // and %) at fp32 D = 32)
            for c0 in tl.static_range(0, D, BLOCK_K):
                cc = c0 + offs_k
                offs = offs_m[:, None] * N + cc[None, :]  # int32: the launcher checks M * N
                ok = row_ok & (cc[None, :] < N)
                dz, gt = bce_backward_values(
                    g_ptr, y_ptr, t_ptr, lw_ptr, lw_inner, lw_period, lpw_ptr, lpw_inner,
                    lpw_period, offs, ok, mean_div, LW_MODE, LPW_MODE, GRAD_ELEMWISE, True,
                    NEED_GT, ACC,
                )  # fmt: skip
                tl.store(z_ptr + offs, to_dtype(dz, z_ptr.dtype.element_ty), mask=ok)
                if NEED_GT:
                    tl.store(gt_ptr + offs, to_dtype(gt, gt_ptr.dtype.element_ty), mask=ok)
        else:
            if i == L - 1:
                g = tl.load(g_ptr + rows * N + offs_n[None, :], mask=row_ok & (offs_n[None, :] < N),
                            other=0.0).to(ACC)  # fmt: skip
            else:
                # dY_i = dZ_{i+1} (BLOCK_M, N2) @ W_{i+1} (N2, N), N2 = d_{i+2}
                if i + 2 == 8:
                    N2 = d8
                else:
                    N2 = _pick(i + 2, d0, d1, d2, d3, d4, d5, d6, d7)
                z_next = _pick(i + 1, z0, z1, z2, z3, z4, z5, z6, z7)
                w_next = _pick(i + 1, w0, w1, w2, w3, w4, w5, w6, w7)
                tl.debug_barrier()  # the next layer's dZ stores, visible to the whole block
                g = tl.zeros((BLOCK_M, D), dtype=ACC)
                for c0 in tl.static_range(0, D, BLOCK_K):
                    cc = c0 + offs_k
                    a = tl.load(z_next + rows * N2 + cc[None, :], mask=row_ok & (cc[None, :] < N2),
                                other=0.0)  # fmt: skip
                    b = tl.load(w_next + cc[:, None].to(tl.int64) * N + offs_n[None, :],
                                mask=(cc[:, None] < N2) & (offs_n[None, :] < N),
                                other=0.0)  # fmt: skip
                    if DOT_FP32:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    g = tl.dot(a, b, g, input_precision=PRECISION, out_dtype=ACC)
            m_ptr = _pick(i, m0, m1, m2, m3, m4, m5, m6, m7)
            if i == L - 1:
                dz = _act_grad(g, slope, m_ptr, y_ptr, rows, row_ok, offs_n, N, OUT_ACT, BLOCK_M, D)
            else:
                s_ptr = _pick(i, h0, h1, h2, h3, h4, h5, h6, h7)
                dz = _act_grad(g, slope, m_ptr, s_ptr, rows, row_ok, offs_n, N, ACT, BLOCK_M, D)
            tl.store(z_ptr + rows * N + offs_n[None, :], to_dtype(dz, z_ptr.dtype.element_ty),
                     mask=row_ok & (offs_n[None, :] < N))  # fmt: skip
    if NEED_GX:  # dX = dZ_0 (BLOCK_M, d1) @ W_0 (d1, d0)
        tl.debug_barrier()
        gx = tl.zeros((BLOCK_M, D), dtype=ACC)
        for c0 in tl.static_range(0, D, BLOCK_K):
            cc = c0 + offs_k
            a = tl.load(z0 + rows * d1 + cc[None, :], mask=row_ok & (cc[None, :] < d1), other=0.0)
            b = tl.load(w0 + cc[:, None].to(tl.int64) * d0 + offs_n[None, :],
                        mask=(cc[:, None] < d1) & (offs_n[None, :] < d0), other=0.0)  # fmt: skip
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            gx = tl.dot(a, b, gx, input_precision=PRECISION, out_dtype=ACC)
        tl.store(gx_ptr + rows * d0 + offs_n[None, :], to_dtype(gx, gx_ptr.dtype.element_ty),
                 mask=row_ok & (offs_n[None, :] < d0))  # fmt: skip


def _fusable(input, weights) -> bool:
    """Whether the fused kernels run this net (module docstring)."""
    return (
        os.environ.get("HPML_MLP_KERNEL", "") != "layers"
        and 1 <= len(weights) <= MAX_FUSED_LAYERS
        and input.dtype in _FUSED_DTYPES
        and input.shape[0] > 0
        and max([input.shape[1], *(w.shape[0] for w in weights)]) <= MAX_FUSED_WIDTH
    )


def _config(d: int, wide: bool, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for padded width ``d``, 16-bit (``wide``: tensor-core dots)
    or fp32 (FMA dots unless TF32 is allowed), forward or backward: the largest row block that
    compiles without spilling registers on sm_80 and sm_90 (`make gpu-build-check`; e.g. with 4
    warps 32 x 128 16-bit forward tiles spilled on sm_90, 32-row fp32 tiles from D = 64 on, and
    the backward, which also unpacks masks, needs 8 warps for 64-wide 16-bit tiles)."""
    if wide:
        if d <= 32 or (d == 64 and not backward):
            return (64, 32, 4)
        return (64, 32, 8) if d == 64 else (32, 32, 8)
    if d == 128:
        return (16, 32, 8) if backward else (16, 16, 8)
    return {16: (64, 16, 4), 32: (64, 32, 4)}.get(d, (32, 32, 8))


def _pad(ts, filler):
    """``ts`` as the kernels' MAX_FUSED_LAYERS pointer arguments, ``filler`` for the unused."""
    return [*ts, *([filler] * (MAX_FUSED_LAYERS - len(ts)))]


def _fused_operands(input, weights, backward: bool):
    """What both fused launchers pass: the input with a unit column stride, the weights
    contiguous, the widths d0..d8 (0 past the last layer), the grid and the compile-time
    arguments for the padded width, dtype and direction."""
    x = input if input.stride(1) == 1 else input.contiguous()
    dims = [input.shape[1], *(w.shape[0] for w in weights)]
    dt = input.dtype
    d = max(16, triton.next_power_of_2(max(dims)))  # the padded width
    block_m, block_k, warps = _config(d, dt != torch.float32, backward)
    meta = dict(PRECISION=_precision(dt), DOT_FP32=_dot_fp32(dt), ACC=tl_acc_dtype(dt), D=d,
                BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)  # fmt: skip
    grid = (triton.cdiv(input.shape[0], block_m),)
    widths = [*dims, *([0] * (MAX_FUSED_LAYERS + 1 - len(dims)))]
    return x, [w.contiguous() for w in weights], dims, widths, grid, meta


def _mlp_fused(input, weights, biases, activation, negative_slope, output_activation):
    """The forward as one kernel: (output, saved) as ``mlp`` returns them."""
    M, n_layers = input.shape[0], len(weights)
    dev, dt = input.device, input.dtype
    x, ws, dims, widths, grid, meta = _fused_operands(input, weights, backward=False)
    bs = [b.contiguous() if b is not None else x for b in biases]
    hs = [torch.empty((M, n), dtype=dt, device=dev) for n in dims[1:-1]]
    acts = [activation] * (n_layers - 1) + [output_activation]
    masks = [
        torch.empty((M, mask_row_bytes(n)) if a in ACT_USES_MASK else (0,), dtype=torch.uint8,
                    device=dev)
        for n, a in zip(dims[1:], acts, strict=True)
    ]  # fmt: skip
    y = torch.empty((M, dims[-1]), dtype=dt, device=dev)
    _mlp_fused_fwd_kernel[grid](
        x, y, *_pad(ws, x), *_pad(bs, x), *_pad(hs, x),
        *_pad([m if m.numel() else x for m in masks], x), *widths, M, x.stride(0),
        float(negative_slope), L=n_layers,
        HAS_BIAS=sum(1 << i for i, b in enumerate(biases) if b is not None),
        ACT=activation, OUT_ACT=output_activation, **meta,
    )  # fmt: skip

    def none():
        return input.new_empty((0,))

    saved = []
    for i, h in enumerate(hs):
        saved += [h, masks[i], none(), none(), none(), none()]
    saved.append(masks[-1])
    return y, saved


class FusedLoss(NamedTuple):
    """The BCE-with-logits loss whose gradient the fused backward starts from
    (kernels/mlp_bce_with_logits.py): the target contiguous, weight and pos_weight as ``Bcast``
    of the logits' shape, the target's gradient to write (or None), the reduction's code."""

    target: torch.Tensor
    weight: Bcast
    pos_weight: Bcast
    target_grad: torch.Tensor | None
    reduction: int


def _mlp_backward_fused(
    grad, input, output, weights, saved, activation, negative_slope, output_activation,
    input_grad, weight_grads, bias_grads, biases, loss: FusedLoss | None = None,
):  # fmt: skip
    """The backward of a run of layers without batch norm that the fused forward ran: dZ of every
    layer and dX in one kernel, then each layer's dW and db from its dZ (linear_act's
    weight-gradient kernel, deterministic): (dX, [dW], [db]).
    With ``loss``, ``grad`` is the loss's gradient and ``output`` the logits: the kernel computes
    the last layer's dZ from the loss (and the target's gradient, if ``loss.target_grad``)."""
    M, n_layers = input.shape[0], len(weights)
    dev, dt = input.device, input.dtype
    x, ws, dims, widths, grid, meta = _fused_operands(input, weights, backward=True)
    hs = [saved[SAVED_PER_LAYER * i] for i in range(n_layers - 1)]
    masks = [saved[SAVED_PER_LAYER * i + 1] for i in range(n_layers - 1)] + [saved[-1]]
    zs = [torch.empty((M, n), dtype=dt, device=dev) for n in dims[1:]]
    gx = torch.empty_like(x) if input_grad else input.new_empty((0,))
    if loss is None:
        g = grad.contiguous()
        loss_args = [g, g, 1, 1, g, 1, 1, g, 0]
        loss_meta = dict(LOSS=False, LW_MODE=0, LPW_MODE=0, GRAD_ELEMWISE=False, NEED_GT=False)
    else:
        elemwise = loss.reduction == _NONE_REDUCTION
        g = grad.to(dt).contiguous() if elemwise else grad
        gt = loss.target_grad
        mean_div = output.numel() if loss.reduction == _MEAN_REDUCTION else 0
        loss_args = [loss.target, *loss.weight.args, *loss.pos_weight.args,
                     loss.target if gt is None else gt, mean_div]  # fmt: skip
        loss_meta = dict(LOSS=True, LW_MODE=loss.weight.mode, LPW_MODE=loss.pos_weight.mode,
                         GRAD_ELEMWISE=elemwise, NEED_GT=gt is not None)  # fmt: skip
    _mlp_fused_bwd_kernel[grid](
        g, output, gx if input_grad else g, *_pad(ws, g), *_pad(hs, g),
        *_pad([m if m.numel() else g for m in masks], g), *_pad(zs, g), *widths, M,
        float(negative_slope), *loss_args, L=n_layers, ACT=activation,
        OUT_ACT=output_activation, NEED_GX=bool(input_grad), **loss_meta, **meta,
    )  # fmt: skip
    gw = [input.new_empty((0,)) for _ in range(n_layers)]
    gb = [input.new_empty((0,)) for _ in range(n_layers)]
    for i in range(n_layers):
        wg, bg = bool(weight_grads[i]), bool(bias_grads[i]) and biases[i] is not None
        if wg or bg:
            a = x if i == 0 else hs[i - 1]
            _, gw[i], gb[i] = _linear_act_backward(
                zs[i], a, ws[i], input.new_empty((0,)), input.new_empty((0,), dtype=torch.uint8),
                _NONE, 0.0, False, wg, bg,
            )  # fmt: skip
    return gx, gw, gb


def _segments(batch_norm, n_layers) -> list[tuple[int, int]]:
    """The net cut after each batch-norm layer: (first, last) layer of each run that one fused
    kernel takes (the last layer of a run is a batch-norm layer, whose linear output z it writes,
    or the net's last layer)."""
    cuts = [i for i in range(n_layers - 1) if batch_norm[i]] + [n_layers - 1]
    return [(0 if k == 0 else cuts[k - 1] + 1, c) for k, c in enumerate(cuts)]


def _bn_act(z, i, bn_weights, bn_biases, running_means, running_vars, training, eps, activation,
            negative_slope):  # fmt: skip
    """Hidden layer ``i``'s batch norm and activation from its linear output ``z``: (its output,
    its six saved tensors) as hpml::mlp saves them (ReLU fused into the batch norm)."""
    a, mean, invstd, var = _batch_norm(
        z, bn_weights[i], bn_biases[i], running_means[i], running_vars[i], training, eps,
        1 if activation == _RELU else 0,
    )  # fmt: skip
    out, aux = a, z.new_empty((0,))
    if activation == _LEAKY:
        out, aux = torch.nn.functional.leaky_relu(a, negative_slope), a
    elif activation == _SIGMOID:
        out = torch.sigmoid(a)
    elif activation == _TANH:
        out = torch.tanh(a)
    return out, [out, aux, z, mean, invstd, var]


def _bn_act_backward(g, i, bn_weights, saved, training, activation, negative_slope, bn_weight_grads,
                     bn_bias_grads):  # fmt: skip
    """Hidden layer ``i``'s activation and batch norm backward from its output's gradient ``g``:
    (dZ, its batch-norm weight's and bias's gradients)."""
    s = SAVED_PER_LAYER * i
    h, aux = saved[s], saved[s + 1]
    ga = g
    if activation == _LEAKY:
        ga = torch.where(aux > 0, g, g * negative_slope)
    elif activation == _SIGMOID:
        ga = torch.ops.aten.sigmoid_backward(g, h)
    elif activation == _TANH:
        ga = torch.ops.aten.tanh_backward(g, h)
    return _batch_norm_backward(
        ga, saved[s + 2], bn_weights[i], h, saved[s + 3], saved[s + 4], training,
        1 if activation == _RELU else 0, True,
        bool(bn_weight_grads[i]) and bn_weights[i] is not None, bool(bn_bias_grads[i]),
    )  # fmt: skip


def mlp(
    input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
    training, eps, activation, negative_slope, output_activation,
):  # fmt: skip
    """hpml::mlp_triton: (output, saved) as hpml::mlp."""
    check_args(
        input, weights, biases, batch_norm, bn_weights, bn_biases, running_means, running_vars,
        training, eps, activation, negative_slope, output_activation,
    )  # fmt: skip
    biases, bn_weights, bn_biases = present(biases), present(bn_weights), present(bn_biases)
    running_means, running_vars = present(running_means), present(running_vars)
    bn = (bn_weights, bn_biases, running_means, running_vars, training, eps, activation,
          negative_slope)  # fmt: skip
    if _fusable(input, weights):
        # A fused kernel per run of layers between batch norms, the batch norm between them.
        saved, h = [], input
        for first, last in _segments(batch_norm, len(weights)):
            out_act = output_activation if last == len(weights) - 1 else _NONE
            h, part = _mlp_fused(
                h, weights[first : last + 1], biases[first : last + 1], activation,
                negative_slope, out_act,
            )  # fmt: skip
            saved += part[:-1]  # (the mask of a batch-norm layer's linear output: none)
            if last < len(weights) - 1:
                h, part = _bn_act(h, last, *bn)
                saved += part
        return h, [*saved, part[-1]]

    def none():  # a fresh one each time: the outputs of an op may not alias each other
        return input.new_empty((0,))

    saved = []
    h = input
    for i, w in enumerate(weights[:-1]):
        if not batch_norm[i]:
            out, mask = _linear_act(h, w, biases[i], activation, negative_slope)
            saved += [out, mask, none(), none(), none(), none()]
            h = out
            continue
        z, _ = _linear_act(h, w, biases[i], _NONE, 0.0)
        h, part = _bn_act(z, i, *bn)
        saved += part
    y, mask = _linear_act(h, weights[-1], biases[-1], output_activation, negative_slope)
    saved.append(mask)
    return y, saved


def _wanted_below(input_grad, weight_grads, bias_grads, bn_weight_grads, bn_bias_grads):
    """below[i]: a gradient is wanted from the layers before layer i (i = 0..L)."""
    below = [bool(input_grad)]
    for j in range(len(weight_grads)):
        here = weight_grads[j] or bias_grads[j]
        if j < len(weight_grads) - 1:
            here = here or bn_weight_grads[j] or bn_bias_grads[j]
        below.append(below[-1] or bool(here))
    return below


def backward_fused_net(
    grad, input, output, weights, biases, batch_norm, bn_weights, saved, training, activation,
    negative_slope, output_activation, input_grad, weight_grads, bias_grads, bn_weight_grads,
    bn_bias_grads, loss: FusedLoss | None = None,
):  # fmt: skip
    """The backward of a net the fused forward ran (``_fusable``), a run of layers between batch
    norms at a time from the last: one fused kernel per run (``_mlp_backward_fused``; the last
    run's from the loss with ``loss``), the batch norm's backward between runs."""
    n_layers = len(weights)
    below = _wanted_below(input_grad, weight_grads, bias_grads, bn_weight_grads, bn_bias_grads)
    gw = [input.new_empty((0,)) for _ in range(n_layers)]
    gb = [input.new_empty((0,)) for _ in range(n_layers)]
    gbw = [input.new_empty((0,)) for _ in range(n_layers - 1)]
    gbb = [input.new_empty((0,)) for _ in range(n_layers - 1)]
    g, gx = grad, input.new_empty((0,))
    for first, last in reversed(_segments(batch_norm, n_layers)):
        if not below[last + 1]:
            break
        top = last == n_layers - 1
        seg_in = input if first == 0 else saved[SAVED_PER_LAYER * (first - 1)]
        seg_out = output if top else saved[SAVED_PER_LAYER * last + 2]  # the output, or z
        tail = saved[-1] if top else input.new_empty((0,), dtype=torch.uint8)
        gx, gw[first : last + 1], gb[first : last + 1] = _mlp_backward_fused(
            g, seg_in, seg_out, weights[first : last + 1],
            [*saved[SAVED_PER_LAYER * first : SAVED_PER_LAYER * last], tail], activation,
            negative_slope, output_activation if top else _NONE, below[first],
            weight_grads[first : last + 1], bias_grads[first : last + 1],
            biases[first : last + 1], loss=loss if top else None,
        )  # fmt: skip
        if first > 0 and below[first]:
            g, gbw[first - 1], gbb[first - 1] = _bn_act_backward(
                gx, first - 1, bn_weights, saved, training, activation, negative_slope,
                bn_weight_grads, bn_bias_grads,
            )  # fmt: skip
    return (gx if input_grad else input.new_empty((0,))), gw, gb, gbw, gbb


def mlp_backward(
    grad, input, output, weights, biases, batch_norm, bn_weights, saved, training, activation,
    negative_slope, output_activation, input_grad, weight_grads, bias_grads, bn_weight_grads,
    bn_bias_grads,
):  # fmt: skip
    """hpml::mlp_backward_triton: the gradients as hpml::mlp_backward."""
    check_backward_args(grad, input, output, weights, biases, batch_norm, bn_weights, saved)
    biases, bn_weights = present(biases), present(bn_weights)
    n_layers = len(weights)
    if _fusable(input, weights):  # (the fused forward saved these tensors)
        return backward_fused_net(
            grad, input, output, weights, biases, batch_norm, bn_weights, saved, training,
            activation, negative_slope, output_activation, input_grad, weight_grads, bias_grads,
            bn_weight_grads, bn_bias_grads,
        )  # fmt: skip

    def none():
        return input.new_empty((0,))

    below = _wanted_below(input_grad, weight_grads, bias_grads, bn_weight_grads, bn_bias_grads)
    gw, gb = [none() for _ in range(n_layers)], [none() for _ in range(n_layers)]
    gbw, gbb = [none() for _ in range(n_layers - 1)], [none() for _ in range(n_layers - 1)]

    def layer_input(i):
        return input if i == 0 else saved[SAVED_PER_LAYER * (i - 1)]

    last = n_layers - 1
    g, gw[last], gb[last] = _linear_act_backward(
        grad, layer_input(last), weights[last], output, saved[-1], output_activation,
        negative_slope, below[last], weight_grads[last],
        bias_grads[last] and biases[last] is not None,
    )  # fmt: skip
    for i in range(n_layers - 2, -1, -1):
        if not below[i + 1]:
            break
        s = SAVED_PER_LAYER * i
        wg, bg = weight_grads[i], bias_grads[i] and biases[i] is not None
        if not batch_norm[i]:
            g, gw[i], gb[i] = _linear_act_backward(
                g, layer_input(i), weights[i], saved[s], saved[s + 1], activation,
                negative_slope, below[i], wg, bg,
            )  # fmt: skip
            continue
        gz, gbw[i], gbb[i] = _bn_act_backward(
            g, i, bn_weights, saved, training, activation, negative_slope, bn_weight_grads,
            bn_bias_grads,
        )  # fmt: skip
        g, gw[i], gb[i] = _linear_act_backward(
            gz, layer_input(i), weights[i], none(), none().to(torch.uint8), _NONE, 0.0, below[i],
            wg, bg,
        )  # fmt: skip
    return (g if input_grad else none()), gw, gb, gbw, gbb


def aot_specs() -> list[dict]:
    """The fused forward and backward as `make gpu-build-check` compiles them for sm_80/sm_90:
    each padded width (16, 32, 64, 128) in fp16, bf16 and fp32 (TF32 off), three layers (the
    forward with biases, ReLU hidden and sigmoid output; the backward with ReLU / sigmoid,
    tanh / leaky ReLU, and ReLU starting from the BCE-with-logits loss) (the layer-by-layer path
    runs the kernels of linear_act and batch_norm, which their modules' specs compile)."""
    from ._common import aot_spec

    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for d in (16, 32, 64, 128):
            block_m, block_k, warps = _config(d, dt != "fp32")
            types = {a: f"*{dt}" for a in ("x_ptr", "y_ptr")}
            for p in "wbh":
                types.update({f"{p}{i}": f"*{dt}" for i in range(MAX_FUSED_LAYERS)})
            types.update({f"m{i}": "*u8" for i in range(MAX_FUSED_LAYERS)})
            types.update({f"d{i}": "i32" for i in range(MAX_FUSED_LAYERS + 1)})
            types.update(M="i32", stride_xm="i32", slope="fp32")
            specs.append(
                aot_spec(
                    _mlp_fused_fwd_kernel,
                    f"mlp_fused_fwd[{dt},D={d}]",
                    types,
                    dict(
                        L=3,
                        HAS_BIAS=0b111,
                        ACT=ACTIVATIONS["relu"],
                        OUT_ACT=ACTIVATIONS["sigmoid"],
                        PRECISION="ieee",
                        DOT_FP32=False,
                        ACC=tl.float32,
                        D=d,
                        BLOCK_M=block_m,
                        BLOCK_K=block_k,
                    ),
                    num_warps=warps,
                    aligned=("x_ptr", "y_ptr", "w0", "w1", "w2", "h0", "h1"),
                )  # fmt: skip
            )
        for d in (16, 32, 64, 128):
            block_m, block_k, warps = _config(d, dt != "fp32", backward=True)
            types = {a: f"*{dt}" for a in ("g_ptr", "y_ptr", "gx_ptr")}
            for p in "whz":
                types.update({f"{p}{i}": f"*{dt}" for i in range(MAX_FUSED_LAYERS)})
            types.update({f"m{i}": "*u8" for i in range(MAX_FUSED_LAYERS)})
            types.update({f"d{i}": "i32" for i in range(MAX_FUSED_LAYERS + 1)})
            types.update(M="i32", slope="fp32", mean_div="i32")
            types.update({a: f"*{dt}" for a in ("t_ptr", "lw_ptr", "lpw_ptr", "gt_ptr")})
            types.update({a: "i32" for a in ("lw_inner", "lw_period", "lpw_inner", "lpw_period")})
            # The net's backward from the output's gradient, and from the loss (a per-row weight,
            # a per-output pos_weight, a mean, the target's gradient too).
            for act, out_act, loss in (
                ("relu", "sigmoid", False),
                ("tanh", "leaky_relu", False),
                ("relu", "none", True),
            ):
                loss_meta = dict(
                    LOSS=loss,
                    LW_MODE=2 if loss else 0,
                    LPW_MODE=2 if loss else 0,
                    GRAD_ELEMWISE=False,
                    NEED_GT=loss,
                )
                specs.append(
                    aot_spec(
                        _mlp_fused_bwd_kernel,
                        f"mlp_fused_bwd[{dt},D={d},{act},{out_act}{',bce' if loss else ''}]",
                        types,
                        dict(
                            L=3,
                            ACT=ACTIVATIONS[act],
                            OUT_ACT=ACTIVATIONS[out_act],
                            NEED_GX=True,
                            **loss_meta,
                            PRECISION="ieee",
                            DOT_FP32=False,
                            ACC=tl.float32,
                            D=d,
                            BLOCK_M=block_m,
                            BLOCK_K=block_k,
                        ),
                        num_warps=warps,
                        aligned=("g_ptr", "y_ptr", "gx_ptr", "w0", "w1", "w2", "z0", "z1"),
                    )  # fmt: skip
                )
    return specs
