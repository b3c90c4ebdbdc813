// The fused CUDA MLP kernels' host entry points shared by hpml::mlp (csrc/cuda/mlp.cu) and
// hpml::mlp_bce_with_logits (csrc/cuda/mlp_bce_with_logits.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "mlp.h"

namespace hpml {
inline namespace HPML_LIB_NAMESPACE {  // csrc/common.h

// Whether the fused kernels run this net: fp16/bf16, no batch norm, at most 8 layers, every width
// (the input's included) at most 128, a non-empty 2-D input, HPML_MLP_KERNEL not "layers".
bool mlp_cuda_fusable(const at::Tensor& input, at::TensorList weights,
                      const c10::List<bool>& batch_norm);

// The BCE-with-logits loss the fused backward starts from: target, weight and pos_weight of the
// logits' shape and dtype, contiguous (weight / pos_weight undefined when absent), the target's
// gradient to write (undefined: not asked for), the reduction's code.
struct MlpCudaLoss {
  at::Tensor target, weight, pos_weight, target_grad;
  int64_t reduction;
};

// The backward of a net mlp_cuda_fusable accepts (arguments checked by the caller): every dZ and
// dX in one kernel from the output's gradient, or from the loss's when `loss` is given (then grad
// is the loss's gradient and output the logits), then each layer's dW and db; the batch-norm
// gradient lists hold an empty tensor per hidden layer.
MlpGrads mlp_cuda_fused_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& output,
    at::TensorList weights, OptTensorList biases, at::TensorList saved, int64_t activation,
    double negative_slope, int64_t output_activation, bool input_grad,
    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const MlpCudaLoss* loss);

}  // namespace HPML_LIB_NAMESPACE
}  // namespace hpml
