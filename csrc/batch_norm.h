// Host-side checks and the memory layout of hpml::batch_norm, shared by the CPU and CUDA
// launchers, and the per-channel / per-element arithmetic of the CUDA kernels (C10_HOST_DEVICE).
#pragma once

#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>

#include <cmath>

#include "common.h"

namespace hpml {

// The input seen as a dense (outer, C, inner) array: contiguous (N, C, S) has outer = N,
// inner = S; channels last (N, S, C), and 2-D (N, C), have outer = N * S, inner = 1. Any other
// strides are copied to contiguous first.
struct BnLayout {
  at::Tensor x;  // the input, or its contiguous copy
  int64_t outer = 0, channels = 0, inner = 1;
  int64_t count() const { return outer * inner; }  // values per channel
};

inline BnLayout bn_layout(const at::Tensor& input) {
  BnLayout l;
  const int64_t n = input.size(0), c = input.size(1), s = input.numel() / std::max<int64_t>(n * c, 1);
  l.channels = c;
  if (input.dim() == 2) {
    l.x = input.contiguous();
    l.outer = n;
    l.inner = 1;
  } else if (!input.is_contiguous() && input.movedim(1, -1).is_contiguous()) {
    l.x = input;  // channels last
    l.outer = n * s;
    l.inner = 1;
  } else {
    l.x = input.contiguous();
    l.outer = n;
    l.inner = s;
  }
  return l;
}

// t (the input's shape) with the same strides as l.x: contiguous, or channels last.
inline at::Tensor same_layout(const at::Tensor& t, const BnLayout& l) {
  if (l.x.is_contiguous()) return t.contiguous();
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

inline void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& input,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == input.size(1), "hpml::batch_norm: ", name,
              " should contain ", input.size(1), " elements (one per channel), got shape ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "hpml::batch_norm: expected a floating-point ",
              name, ", got ", t->scalar_type());
  check_same_device(input, *t, name);
}

// The input (N, C, *), floating point, and the activation code.
inline void check_bn_input(const at::Tensor& input, int64_t activation) {
  TORCH_CHECK(input.dim() >= 2, "hpml::batch_norm: expected an input of shape (N, C, *), got ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "hpml::batch_norm: expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK(activation == 0 || activation == 1,
              "hpml::batch_norm: activation must be 0 (none) or 1 (relu), got ", activation);
}

inline void check_batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training,
                             int64_t activation) {
  check_bn_input(input, activation);
  check_channel_vector(weight, input, "weight");
  check_channel_vector(bias, input, "bias");
  check_channel_vector(running_mean, input, "running_mean");
  check_channel_vector(running_var, input, "running_var");
  const bool have_stats = running_mean.has_value() && running_mean->defined() &&
                          running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || have_stats,
              "hpml::batch_norm: running_mean and running_var must be defined in evaluation mode");
  if (training) {
    const int64_t per_channel = input.numel() / std::max<int64_t>(input.size(1), 1);
    TORCH_CHECK(per_channel != 1 || input.size(1) == 0,
                "Expected more than 1 value per channel when training, got input size ",
                input.sizes());
  }
}

// The checks shared by the backward ops: grad (and the output, read for the ReLU mask) of the
// input's shape, the per-channel vectors of C values.
inline void check_backward(const char* op, const at::Tensor& grad, const at::Tensor& input,
                           const std::optional<at::Tensor>& weight, const at::Tensor& output,
                           int64_t activation, const at::Tensor& mean,
                           const std::optional<at::Tensor>& invstd) {
  check_bn_input(input, activation);
  check_channel_vector(weight, input, "weight");
  check_channel_vector(mean, input, "mean");
  check_channel_vector(invstd, input, "invstd");
  TORCH_CHECK(grad.sizes() == input.sizes(), op, ": grad of shape ", grad.sizes(),
              " does not match the input's ", input.sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), op, ": grad has dtype ",
              grad.scalar_type(), ", the input ", input.scalar_type());
  check_same_device(input, grad, "grad");
  if (activation == 1) {
    TORCH_CHECK(output.sizes() == input.sizes() && output.scalar_type() == input.scalar_type(), op,
                ": output (read for the ReLU mask) should match the input's shape and dtype, got ",
                output.sizes(), " ", output.scalar_type());
    check_same_device(input, output, "output");
  }
}

// hpml::batch_norm_backward_elemt's: check_backward's, the group's sums, a positive count.
inline void check_backward_elemt(const at::Tensor& grad, const at::Tensor& input,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& output,
                                 int64_t activation, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& sum_dz,
                                 const at::Tensor& sum_dz_xmu, int64_t count) {
  check_backward("hpml::batch_norm_backward_elemt", grad, input, weight, output, activation, mean,
                 invstd);
  check_channel_vector(sum_dz, input, "sum_dz");
  check_channel_vector(sum_dz_xmu, input, "sum_dz_xmu");
  TORCH_CHECK(count > 0, "hpml::batch_norm_backward_elemt: count must be positive, got ", count);
}

// ---- per-channel and per-element arithmetic (C10_HOST_DEVICE) ------------------------------------
// Used by the CUDA kernels (csrc/cuda/batch_norm.cu); the CPU launcher (batch_norm.cpp) spells the
// same expressions inline, in the same order, except that a division by n is a product with
// inv_n = 1 / n here (computed once on the host: on the GPU a double division is a called
// subroutine). Results differ from the CPU's by the order of the sums and an ulp of double.

// Mean and biased variance (double) of n values from the shifted sums s1 = sum(x - shift) and
// s2 = sum((x - shift)^2), inv_n = 1 / n (0 for n == 0: mean shift, variance 0). The variance is
// clamped at 0 as std::max(v, 0.0) does (a NaN stays NaN).
struct BnMoments {
  double mean = 0.0, var = 0.0;
};
C10_HOST_DEVICE inline BnMoments bn_moments(double inv_n, double shift, double s1, double s2) {
  const double m1 = s1 * inv_n;
  const double v = s2 * inv_n - m1 * m1;
  BnMoments m;
  m.mean = shift + m1;
  m.var = v < 0.0 ? 0.0 : v;
  return m;
}

C10_HOST_DEVICE inline double bn_invstd(double var, double eps) { return 1.0 / ::sqrt(var + eps); }

// The factor n / (n - 1) from the biased to the unbiased variance (1 for n <= 1).
inline double bn_unbias_factor(int64_t n) {
  return n > 1 ? static_cast<double>(n) / static_cast<double>(n - 1) : 1.0;
}
inline double bn_inv_count(int64_t n) { return n > 0 ? 1.0 / static_cast<double>(n) : 0.0; }

// Backward coefficients: dx = (dz - gmean - (x - mean) k) scale with gmean = sum(dz) / n and
// k = sum(dz (x - mean)) / n invstd^2 (invstd as stored, in the accumulation dtype).
C10_HOST_DEVICE inline double bn_grad_mean(double sum_dz, double inv_n) { return sum_dz * inv_n; }
C10_HOST_DEVICE inline double bn_grad_k(double sum_dz_xmu, double inv_n, double invstd) {
  return sum_dz_xmu * inv_n * invstd * invstd;
}

// y = (x - mean) scale + beta: subtracting first keeps a large offset exact.
template <typename T>
C10_HOST_DEVICE inline T bn_normalize(T x, T mean, T scale, T beta) {
  return (x - mean) * scale + beta;
}

// dx with the batch terms (training, and SyncBatchNorm's elementwise step).
template <typename T>
C10_HOST_DEVICE inline T bn_dx(T dz, T x, T mean, T gmean, T k, T scale) {
  return (dz - gmean - (x - mean) * k) * scale;
}

}  // namespace hpml
