// The numbers the C++/CUDA side and the Python side (hpml_ops/constants.py) must agree on, written
// once per language; the extension reports these (hpml_ops._C.CONSTANTS, csrc/ops.cpp) and
// tests/test_registry.py checks them against the Python module. Host and device code.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace hpml {

// X(enumerator, Python name, code): the activations of hpml::linear_act. hpml::batch_norm takes
// None and Relu only.
#define HPML_ACTIVATIONS(X)   \
  X(None, "none", 0)            \
  X(Relu, "relu", 1)            \
  X(LeakyRelu, "leaky_relu", 2) \
  X(Sigmoid, "sigmoid", 3)      \
  X(Tanh, "tanh", 4)

#define HPML_ACT_ENUMERATOR(E, name, code) E = code,
enum class Act : int64_t { HPML_ACTIVATIONS(HPML_ACT_ENUMERATOR) };
#undef HPML_ACT_ENUMERATOR
constexpr int64_t kNumActivations = 5;

// The backward reads the 1-bit mask (relu, leaky relu) or the forward's output (sigmoid, tanh).
C10_HOST_DEVICE constexpr bool act_uses_mask(Act a) {
  return a == Act::Relu || a == Act::LeakyRelu;
}
C10_HOST_DEVICE constexpr bool act_uses_output(Act a) {
  return a == Act::Sigmoid || a == Act::Tanh;
}
inline bool valid_activation(int64_t code) { return code >= 0 && code < kNumActivations; }

// X(Python name, code): hpml::bce_with_logits's reduction, at::Reduction's values.
#define HPML_REDUCTIONS(X) \
  X("none", 0)             \
  X("mean", 1)             \
  X("sum", 2)

// The layout of linear_act's ReLU mask: bit (j % 8) of byte [m, j / 8], rows padded to whole
// bytes.
constexpr int kMaskBitsPerByte = 8;
C10_HOST_DEVICE constexpr int64_t mask_row_bytes(int64_t n) {
  return (n + kMaskBitsPerByte - 1) / kMaskBitsPerByte;
}

// The dtype sums and products accumulate in: fp32, or fp64 for fp64 (at::opmath_type in kernels).
inline c10::ScalarType acc_scalar_type(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

}  // namespace hpml
