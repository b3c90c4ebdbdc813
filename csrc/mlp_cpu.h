// What csrc/mlp.cpp's whole-network CPU kernel offers the other CPU kernel files of the same ISA
// variant (csrc/mlp_bce_with_logits.cpp): in `inline namespace CPU_CAPABILITY`, so that each
// variant's file calls its own variant (csrc/cpu_dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "mlp.h"  // MlpGrads

namespace hpml {
inline namespace CPU_CAPABILITY {

// The sigmoid BCE-with-logits loss that ends a net, for the backward to start from: the last
// layer's dZ is computed from it a block of rows at a time (never a logits gradient of its own).
// target, and weight and pos_weight when defined, are contiguous (M, N) tensors of the logits'
// dtype (broadcast operands already expanded); grad is the loss's gradient (0-d for mean / sum,
// (M, N) for none).
struct MlpLoss {
  at::Tensor grad, target, weight, pos_weight;
  int64_t reduction = 1;
  bool target_grad = false;
  at::Tensor grad_target;  // out: (M, N) when target_grad, else left undefined
};

// Whether the whole-network kernel takes this net (else the layer-by-layer path).
bool mlp_cpu_native(const at::Tensor& input, at::TensorList weights);

// hpml::mlp_backward's whole-network kernel (after its checks), with output_activation none and
// the loss's gradient in place of grad when `loss` is given (then `grad` is ignored).
MlpGrads mlp_backward_cpu_native(const at::Tensor& grad, const at::Tensor& input,
                                 const at::Tensor& output, at::TensorList weights,
                                 at::TensorList biases, const c10::List<bool>& batch_norm,
                                 at::TensorList bn_weights, at::TensorList saved, bool training,
                                 int64_t activation, double negative_slope,
                                 int64_t output_activation, bool input_grad,
                                 const c10::List<bool>& weight_grads,
                                 const c10::List<bool>& bias_grads,
                                 const c10::List<bool>& bn_weight_grads,
                                 const c10::List<bool>& bn_bias_grads, MlpLoss* loss);

}  // namespace CPU_CAPABILITY
}  // namespace hpml
