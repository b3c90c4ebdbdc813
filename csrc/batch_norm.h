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

// ---- the argument contracts, the same checks in the same order with the same messages as the
// Python ones (hpml_ops/ops/batch_norm.py) ----------------------------------------------------

inline void check_channel_vector(const char* op, const std::optional<at::Tensor>& t,
                                 const at::Tensor& input, const char* name) {
  check_per_channel(op, t, input.size(1), input, name);
}

// Whether batch norm's activation code asks for the fused ReLU (else none).
inline bool bn_relu(int64_t activation) { return activation == static_cast<int64_t>(Act::Relu); }

// The input (N, C, *), floating point, and the activation code (0 none, 1 relu).
inline void check_bn_input(const char* op, const at::Tensor& input, int64_t activation) {
  TORCH_CHECK(activation == static_cast<int64_t>(Act::None) ||
                  activation == static_cast<int64_t>(Act::Relu),
              op, ": activation must be 0 (none) or 1 (relu), got ", activation);
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input of shape (N, C, *), got shape ",
              py_shape(input.sizes()));
  check_floating(op, input, "input");
}

inline void check_batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training,
                             double eps, int64_t activation) {
  constexpr const char* op = "batch_norm";
  check_bn_input(op, input, activation);
  check_channel_vector(op, weight, input, "weight");
  check_channel_vector(op, bias, input, "bias");
  check_channel_vector(op, running_mean, input, "running_mean");
  check_channel_vector(op, running_var, input, "running_var");
  // torch's rule: one dtype for all of them, the input's, or float32 for fp16/bf16 input.
  {
    const std::pair<const std::optional<at::Tensor>*, const char*> params[] = {
        {&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
        {&running_var, "running_var"}};
    std::optional<c10::ScalarType> want;
    bool ok = true;
    std::string got;
    for (const auto& [t, name] : params) {
      if (!present(*t)) continue;
      const c10::ScalarType d = (*t)->scalar_type();
      if (!want) want = d;
      ok = ok && d == *want;
      got += std::string(got.empty() ? "" : ", ") + name + " " + py_dtype(d);
    }
    const c10::ScalarType x = input.scalar_type();
    const bool low = x == at::kHalf || x == at::kBFloat16;
    ok = ok && (!want || *want == x || (low && *want == at::kFloat));
    TORCH_CHECK(ok, op,
                ": expected weight, bias, running_mean and running_var of one dtype, the input's (",
                py_dtype(x), ") or torch.float32 for float16/bfloat16 input; got ", got);
  }
  TORCH_CHECK(training || (present(running_mean) && present(running_var)),
              "running_mean must be defined in evaluation mode");
  TORCH_CHECK_VALUE(present(running_mean) == present(running_var),
                    "running_mean and running_var must either both be None or neither be None");
  if (training) {
    // torch's rule (F.batch_norm's _verify_batch_size): N times the spatial size, C aside.
    int64_t per_channel = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.size(d);
    TORCH_CHECK_VALUE(per_channel != 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      torch_size(input.sizes()));
  }
  check_bn_eps(eps, training);
}

// The checks shared by the backward ops: grad (and the output, read for the ReLU mask) of the
// input's shape, the per-channel vectors of C values.
inline void check_backward(const char* op, const at::Tensor& grad, const at::Tensor& input,
                           const std::optional<at::Tensor>& weight, const at::Tensor& output,
                           int64_t activation, const at::Tensor& mean,
                           const std::optional<at::Tensor>& invstd) {
  check_bn_input(op, input, activation);
  check_channel_vector(op, weight, input, "weight");
  check_channel_vector(op, mean, input, "mean");
  check_channel_vector(op, invstd, input, "invstd");
  check_like(op, input, grad, "grad", input, "the input's");
  if (bn_relu(activation)) check_like(op, input, output, "output", input, "the input's");
}

// hpml::batch_norm_backward_elemt's: check_backward's, the group's sums, a positive count.
inline void check_backward_elemt(const at::Tensor& grad, const at::Tensor& input,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& output,
                                 int64_t activation, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& sum_dz,
                                 const at::Tensor& sum_dz_xmu, int64_t count) {
  constexpr const char* op = "hpml::batch_norm_backward_elemt";
  check_backward(op, grad, input, weight, output, activation, mean, invstd);
  check_channel_vector(op, sum_dz, input, "sum_dz");
  check_channel_vector(op, sum_dz_xmu, input, "sum_dz_xmu");
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
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
