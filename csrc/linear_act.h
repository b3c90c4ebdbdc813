// Host-side argument checks for hpml::linear_act and its backward, shared by the CPU and CUDA
// launchers.
#pragma once

#include "common.h"
#include "hpml_math.h"

namespace hpml {

using math::Act;

inline int64_t mask_row_bytes(int64_t n) { return (n + 7) / 8; }
inline bool act_uses_mask(Act a) { return a == Act::Relu || a == Act::LeakyRelu; }
inline bool act_uses_output(Act a) { return a == Act::Sigmoid || a == Act::Tanh; }

inline Act check_linear_act(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(input.dim() == 2, "hpml::linear_act: expected a 2-D input (M, in_features), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 2,
              "hpml::linear_act: expected a 2-D weight (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), "hpml::linear_act: input of shape ", input.sizes(),
              " has in_features=", input.size(1), " but weight of shape ", weight.sizes(),
              " expects ", weight.size(1));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "hpml::linear_act: expected a floating-point input, got ", input.scalar_type());
  check_floating_same_dtype(input, weight, "weight");
  check_same_device(input, weight, "weight");
  if (bias.has_value() && bias->defined()) {
    check_floating_same_dtype(input, *bias, "bias");
    check_same_device(input, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "hpml::linear_act: bias of shape ",
                bias->sizes(), " does not match out_features=", weight.size(0));
  }
  TORCH_CHECK(activation >= 0 && activation <= 4,
              "hpml::linear_act: activation must be 0 (none), 1 (relu), 2 (leaky_relu), "
              "3 (sigmoid) or 4 (tanh), got ", activation);
  return static_cast<Act>(activation);
}

inline Act check_linear_act_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& weight, const at::Tensor& output,
                                     const at::Tensor& mask, int64_t activation) {
  const Act act = check_linear_act(input, weight, std::nullopt, activation);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == N,
              "hpml::linear_act_backward: grad of shape ", grad.sizes(), ", expected [", M, ", ", N,
              "]");
  check_floating_same_dtype(input, grad, "grad");
  check_same_device(input, grad, "grad");
  if (act_uses_mask(act)) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == M &&
                    mask.size(1) == mask_row_bytes(N) && mask.is_contiguous(),
                "hpml::linear_act_backward: expected a contiguous uint8 mask of shape [", M, ", ",
                mask_row_bytes(N), "], got ", mask.scalar_type(), " ", mask.sizes());
    check_same_device(input, mask, "mask");
  }
  if (act_uses_output(act)) {
    TORCH_CHECK(output.sizes() == grad.sizes(), "hpml::linear_act_backward: output of shape ",
                output.sizes(), " does not match grad ", grad.sizes());
    check_floating_same_dtype(input, output, "output");
    check_same_device(input, output, "output");
  }
  return act;
}

// Calls f(std::integral_constant<Act, A>) for the runtime activation a.
template <typename F>
inline void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::None: f(std::integral_constant<Act, Act::None>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Sigmoid: f(std::integral_constant<Act, Act::Sigmoid>{}); break;
    case Act::Tanh: f(std::integral_constant<Act, Act::Tanh>{}); break;
  }
}

}  // namespace hpml
