// hpml::mlp_bce_with_logits and its backward on CUDA, one op call each way. Forward: the net's
// op (its fused kernel where it applies, csrc/cuda/mlp.cu), then the loss's
// (csrc/mlp_bce_with_logits.h).
// Backward: for a net the fused kernels run, the fused backward kernel starts from the loss (the
// last layer's dZ computed from logits, target, weight and pos_weight, the target's gradient in
// the same pass: no logits-gradient tensor, one launch less); other nets, the loss's backward op
// and then the net's.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

#include "mlp_bce_with_logits.h"
#include "mlp_fused.cuh"

namespace hpml {
namespace {

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_bce_with_logits_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction, at::TensorList weights,
    OptTensorList biases, const c10::List<bool>& batch_norm, OptTensorList bn_weights,
    OptTensorList bn_biases, OptTensorList running_means, OptTensorList running_vars,
    bool training, double eps, int64_t activation, double negative_slope) {
  return mlp_bce_with_logits_layers(input, target, weight, pos_weight, reduction, weights, biases,
                                    batch_norm, bn_weights, bn_biases, running_means,
                                    running_vars, training, eps, activation, negative_slope);
}

MlpBceGrads mlp_bce_with_logits_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, const at::Tensor& logits, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, at::TensorList saved,
    bool training, int64_t activation, double negative_slope, bool input_grad, bool target_grad,
    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const c10::List<bool>& bn_weight_grads, const c10::List<bool>& bn_bias_grads) {
  check_mlp_bce_backward(grad, input, target, weight, pos_weight, reduction, logits, weights,
                         biases, batch_norm, bn_weights, saved, activation, weight_grads,
                         bias_grads, bn_weight_grads, bn_bias_grads);
  const bool net = mlp_bce_net_grads(input_grad, weight_grads, bias_grads, bn_weight_grads,
                                     bn_bias_grads);
  if (!net || !mlp_cuda_fusable(input, weights, batch_norm)) {
    return mlp_bce_with_logits_backward_layers(
        grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
        bn_weights, saved, training, activation, negative_slope, input_grad, target_grad,
        weight_grads, bias_grads, bn_weight_grads, bn_bias_grads);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const auto full = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->expand(logits.sizes()).contiguous() : at::Tensor();
  };
  const at::Tensor y = target.contiguous();
  const MlpCudaLoss loss{y, full(weight), full(pos_weight),
                         target_grad ? at::empty_like(y) : at::Tensor(), reduction};
  auto [gx, gw, gb, gbw, gbb] = mlp_cuda_fused_backward(grad, input, logits, weights, biases,
                                                        saved, activation, negative_slope, 0,
                                                        input_grad, weight_grads, bias_grads,
                                                        &loss);
  const at::Tensor gt = target_grad ? loss.target_grad : at::empty({0}, input.options());
  return {gx, gt, gw, gb, gbw, gbb};
}

}  // namespace

HPML_REGISTER_KERNELS(mlp_bce_with_logits, CUDA, _cuda)

}  // namespace hpml
