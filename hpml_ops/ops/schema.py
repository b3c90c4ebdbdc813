"""Every op of the ``hpml`` namespace: its family (the op's stem, one per folder:
``kernels/<stem>.py``, ``csrc/<stem>.cpp``, ``csrc/cuda/<stem>.cu``, ``hpml_ops/ops/<stem>.py``,
``tests/test_<stem>.py``, ``benchmarks/bench_<stem>.py``) and its schema, written once.

From this one list:
- the C++ library defines the ops (``setup.py`` writes ``build/generated/hpml_schemas.h``, which
  ``csrc/ops.cpp`` expands inside ``TORCH_LIBRARY(hpml, m)``; the per-family lists register the
  CPU and CUDA kernels ``<op>_cpu`` / ``<op>_cuda``);
- the registry (``hpml_ops/ops/_registry.py``) defines ``hpml::<op>_triton`` with the same schema,
  implemented by ``hpml_ops.kernels.<stem>.<op>``;
- ``tools/gpu_build_check.py`` compiles the Triton kernels of every family.

Nothing here imports torch: ``setup.py`` reads this file before torch's build machinery runs.

A family's first op is the forward with the autograd formula (C++: ``csrc/autograd.cpp``; Triton:
the op's spec); its second op is that forward's backward. Further ops are building blocks that a
module combines itself (SyncBatchNorm).
"""

from __future__ import annotations

# stem -> {op name: schema without the name}. Integer codes: hpml_ops/constants.py (and
# csrc/constants.h): activation 0 none, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh; reduction
# 0 none, 1 mean, 2 sum (at::Reduction).
SCHEMAS: dict[str, dict[str, str]] = {
    "bce_with_logits": {
        # input and target: same shape and dtype; weight and pos_weight: that dtype, broadcastable
        # to the input's shape. Output: the input's shape for reduction 0, else 0-d.
        "bce_with_logits": (
            "(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) "
            "-> Tensor"
        ),
        # grad: the forward output's gradient (0-d for mean/sum). Returns (grad_input,
        # grad_target); a gradient not asked for is an empty tensor.
        "bce_with_logits_backward": (
            "(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
            "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)"
        ),
    },
    "linear_act": {
        # act(input @ weight.T + bias) for a 2-D input (M, K), weight (N, K), bias (N) or None;
        # one dtype. Returns (output (M, N), mask): for relu and leaky_relu the mask holds bit
        # (j % 8) of byte [m, j / 8] = (z[m, j] > 0) (for relu also set where z is NaN: torch's
        # backward passes the gradient unless z <= 0), uint8 (M, ceil(N / 8)); for the others
        # it is an empty uint8 tensor.
        "linear_act": (
            "(Tensor input, Tensor weight, Tensor? bias, int activation, float negative_slope) "
            "-> (Tensor, Tensor)"
        ),
        # Gradients from grad (M, N) and what the forward saved: the mask (relu, leaky relu) or
        # the output (sigmoid, tanh; an empty tensor otherwise). Returns (grad_input (M, K),
        # grad_weight (N, K), grad_bias (N)); one not asked for is an empty tensor.
        "linear_act_backward": (
            "(Tensor grad, Tensor input, Tensor weight, Tensor output, Tensor mask, "
            "int activation, float negative_slope, bool input_grad, bool weight_grad, "
            "bool bias_grad) -> (Tensor, Tensor, Tensor)"
        ),
    },
    "batch_norm": {
        # Batch normalization over dimension 1 of input (N, C, *), contiguous or channels last;
        # then ReLU when activation == 1. training: normalise with the batch statistics, else
        # with running_mean / running_var (read only: the op is functional, so it has an
        # autograd formula; hpml_ops.batch_norm updates the running statistics in place from the
        # returned batch ones). Returns (output, mean, invstd, var): the statistics used per
        # channel, in fp32 (fp64 for fp64 input), and in training the unbiased batch variance
        # (else an empty tensor).
        "batch_norm": (
            "(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
            "Tensor? running_var, bool training, float eps, int activation) "
            "-> (Tensor, Tensor, Tensor, Tensor)"
        ),
        # Gradients from grad (input's shape), the forward's output (read for the ReLU mask) and
        # the statistics it used. training: those were batch statistics (their gradient flows to
        # input). Returns (grad_input, grad_weight, grad_bias); one not asked for is empty.
        "batch_norm_backward": (
            "(Tensor grad, Tensor input, Tensor? weight, Tensor output, Tensor mean, "
            "Tensor invstd, bool training, int activation, bool input_grad, bool weight_grad, "
            "bool bias_grad) -> (Tensor, Tensor, Tensor)"
        ),
        # The pieces of a batch norm whose statistics are merged across processes
        # (SyncBatchNorm): per-channel mean and biased variance of input (N, C, *), in fp32
        # (fp64 for fp64 input), from the same shifted sums as batch_norm.
        "batch_norm_stats": "(Tensor input) -> (Tensor, Tensor)",
        # Per-channel (sum dz, sum dz (x - mean)) in fp32 (fp64 for fp64), dz = grad, or grad
        # where the ReLU output is not <= 0 (NaN passes, as torch's) when activation == 1.
        "batch_norm_backward_reduce": (
            "(Tensor grad, Tensor input, Tensor output, Tensor mean, int activation) "
            "-> (Tensor, Tensor)"
        ),
        # grad_input from sums over the whole batch of `count` values per channel (all
        # processes): dx = (dz - sum_dz / count - (x - mean) invstd^2 sum_dz_xmu / count)
        # weight invstd.
        "batch_norm_backward_elemt": (
            "(Tensor grad, Tensor input, Tensor? weight, Tensor output, Tensor mean, "
            "Tensor invstd, Tensor sum_dz, Tensor sum_dz_xmu, int count, int activation) "
            "-> Tensor"
        ),
    },
    "mlp": {
        # A whole MLP: L = len(weights) linear layers; hidden layer i < L - 1 computes
        # h_i = act(BN_i(h_{i-1} W_i^T + b_i)) (BN_i when batch_norm[i], with bn_weights[i],
        # bn_biases[i], running_means[i], running_vars[i]), the last
        # y = output_activation(h_{L-2} W^T + b). input (M, K), 2-D; one dtype for input, weights
        # and biases. An absent bias or batch-norm tensor is an empty (0, 0) tensor (lists of
        # optional tensors do not take gradients through torch.library). Returns (y, saved): per
        # hidden layer 6 tensors [h_i; the uint8 mask linear_act keeps for relu / leaky_relu
        # without BN, or the pre-activation for leaky_relu after BN (else empty); the BN input
        # z_i; mean_i; invstd_i; the unbiased batch variance var_i in training (empty without
        # BN)], then the output layer's mask (or empty).
        "mlp": (
            "(Tensor input, Tensor[] weights, Tensor[] biases, bool[] batch_norm, "
            "Tensor[] bn_weights, Tensor[] bn_biases, Tensor[] running_means, "
            "Tensor[] running_vars, bool training, float eps, int activation, "
            "float negative_slope, int output_activation) -> (Tensor, Tensor[])"
        ),
        # Gradients of mlp from grad (M, N) and what the forward returned (output, saved).
        # Returns (grad_input, grad_weights, grad_biases, grad_bn_weights, grad_bn_biases); a
        # gradient not asked for (input_grad, the per-layer flags) is an empty tensor.
        "mlp_backward": (
            "(Tensor grad, Tensor input, Tensor output, Tensor[] weights, Tensor[] biases, "
            "bool[] batch_norm, Tensor[] bn_weights, Tensor[] saved, bool training, "
            "int activation, float negative_slope, int output_activation, bool input_grad, "
            "bool[] weight_grads, bool[] bias_grads, bool[] bn_weight_grads, "
            "bool[] bn_bias_grads) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])"
        ),
    },
    "mlp_bce_with_logits": {
        # mlp (no output activation) and bce_with_logits on its output in one op: the loss of
        # the logits (M, N) = mlp(input, ...) against target (M, N), input's dtype, with weight
        # and pos_weight broadcastable to (M, N). Returns (loss, logits, saved): the loss as
        # bce_with_logits returns it (0-d for reduction 1 and 2), the logits (not
        # differentiable: for metrics; the backward reads them) and mlp's saved tensors.
        "mlp_bce_with_logits": (
            "(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction, "
            "Tensor[] weights, Tensor[] biases, bool[] batch_norm, Tensor[] bn_weights, "
            "Tensor[] bn_biases, Tensor[] running_means, Tensor[] running_vars, bool training, "
            "float eps, int activation, float negative_slope) -> (Tensor, Tensor, Tensor[])"
        ),
        # Gradients from grad (the loss's: 0-d for mean/sum, (M, N) for none), starting from
        # the loss inside the op: the logits' gradient is the last layer's, never a tensor of
        # its own. Returns (grad_input, grad_target, grad_weights, grad_biases,
        # grad_bn_weights, grad_bn_biases); a gradient not asked for is an empty tensor.
        "mlp_bce_with_logits_backward": (
            "(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
            "int reduction, Tensor logits, Tensor[] weights, Tensor[] biases, "
            "bool[] batch_norm, Tensor[] bn_weights, Tensor[] saved, bool training, "
            "int activation, float negative_slope, bool input_grad, bool target_grad, "
            "bool[] weight_grads, bool[] bias_grads, bool[] bn_weight_grads, "
            "bool[] bn_bias_grads) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor[], Tensor[])"
        ),
    },
}

FAMILIES: tuple[str, ...] = tuple(SCHEMAS)


def cpp_header() -> str:
    """The C++ form of this list (``build/generated/hpml_schemas.h``, written by setup.py)."""
    lines = [
        "// Generated from hpml_ops/ops/schema.py by setup.py: edit that file, not this one.",
        "#pragma once",
        "",
        '// X(name, schema) for every op; "name" "schema" is the full schema string.',
        "#define HPML_SCHEMAS(X) \\",
    ]
    ops = [(op, s) for fam in SCHEMAS.values() for op, s in fam.items()]
    lines += [f'  X({op}, "{s}") \\' for op, s in ops]
    lines.append("")
    for fam, members in SCHEMAS.items():
        lines.append(f"// The ops of family {fam}: X(name, ...) each.")
        lines.append(
            f"#define HPML_OPS_{fam}(X, ...) " + " ".join(f"X({op}, __VA_ARGS__)" for op in members)
        )
        lines.append("")
    return "\n".join(lines)
