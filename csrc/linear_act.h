// Host-side argument checks for hpml::linear_act and its backward, shared by the CPU and CUDA
// launchers.
#pragma once

#include "common.h"
#include "hpml_math.h"

namespace hpml {

// The argument contract of hpml::linear_act, the same checks in the same order with the same
// messages as the Python contract (hpml_ops/ops/linear_act.py, check_args with op=True).
inline Act check_linear_act(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t activation) {
  constexpr const char* op = "linear_act";
  TORCH_CHECK(valid_activation(activation), op,
              ": activation must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (sigmoid) or 4 (tanh), "
              "got ", activation);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
              py_shape(weight.sizes()));
  TORCH_CHECK(input.dim() == 2, op, ": expected a 2-D input (M, in_features), got shape ",
              py_shape(input.sizes()));
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input of shape ", py_shape(input.sizes()),
              " has in_features=", input.size(1), " but weight of shape ", py_shape(weight.sizes()),
              " expects in_features=", weight.size(1));
  const bool has_bias = present(bias);
  check_floating(op, input, "input");
  check_floating(op, weight, "weight");
  if (has_bias) check_floating(op, *bias, "bias");
  check_same_device(op, input, weight, "weight");
  if (has_bias) {
    check_same_device(op, input, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias of shape ",
                py_shape(bias->sizes()), " does not match out_features=", weight.size(0));
  }
  check_same_dtype(op, input, weight, "weight");
  if (has_bias) check_same_dtype(op, input, *bias, "bias");
  return static_cast<Act>(activation);
}

// hpml::linear_act_backward's: the forward's (input, weight, activation), then grad and what the
// forward saved (hpml_ops/ops/linear_act.py, check_backward_args).
inline Act check_linear_act_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& weight, const at::Tensor& output,
                                     const at::Tensor& mask, int64_t activation) {
  constexpr const char* op = "hpml::linear_act_backward";
  const Act act = check_linear_act(input, weight, std::nullopt, activation);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == N, op, ": grad of shape ",
              py_shape(grad.sizes()), ", expected ", py_shape({M, N}));
  check_same_dtype(op, input, grad, "grad");
  check_same_device(op, input, grad, "grad");
  if (act_uses_mask(act)) {
    const int64_t nb = mask_row_bytes(N);
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == M &&
                    mask.size(1) == nb && mask.is_contiguous(),
                op, ": expected a contiguous torch.uint8 mask of shape ", py_shape({M, nb}),
                ", got ", py_dtype(mask.scalar_type()), " ", py_shape(mask.sizes()));
    check_same_device(op, input, mask, "mask");
  }
  if (act_uses_output(act)) check_like(op, input, output, "output", grad, "grad");
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
