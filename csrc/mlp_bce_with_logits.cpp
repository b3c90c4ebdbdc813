// hpml::mlp_bce_with_logits and its backward on CPU. The forward is the net's op and the loss's
// (csrc/mlp_bce_with_logits.h: for fp32/fp64 nets hpml::mlp runs the whole-network kernel). The
// backward of a net the whole-network kernel takes starts from the loss inside that kernel
// (csrc/mlp.cpp, MlpLoss): the last layer's dZ is the loss's gradient, computed a block of rows
// at a time where the layer's dZ goes, with the bias gradient's sums and the target's gradient
// in the same pass; no logits gradient is written and read back. Other nets (fp16/bf16, empty,
// very large products), and a backward that wants only the target's gradient, run the loss's
// backward op and then the net's.
#include <ATen/ops/empty.h>

#include "cpu_dispatch.h"
#include "mlp_bce_with_logits.h"
#include "mlp_cpu.h"

namespace hpml {
namespace {

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_bce_with_logits_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction, at::TensorList weights,
    OptTensorList biases, const c10::List<bool>& batch_norm, OptTensorList bn_weights,
    OptTensorList bn_biases, OptTensorList running_means, OptTensorList running_vars,
    bool training, double eps, int64_t activation, double negative_slope) {
  return mlp_bce_with_logits_layers(input, target, weight, pos_weight, reduction, weights, biases,
                                    batch_norm, bn_weights, bn_biases, running_means,
                                    running_vars, training, eps, activation, negative_slope);
}

MlpBceGrads mlp_bce_with_logits_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, const at::Tensor& logits, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, at::TensorList saved,
    bool training, int64_t activation, double negative_slope, bool input_grad, bool target_grad,
    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const c10::List<bool>& bn_weight_grads, const c10::List<bool>& bn_bias_grads) {
  const auto layers = [&] {
    return mlp_bce_with_logits_backward_layers(
        grad, input, target, weight, pos_weight, reduction, logits, weights, biases, batch_norm,
        bn_weights, saved, training, activation, negative_slope, input_grad, target_grad,
        weight_grads, bias_grads, bn_weight_grads, bn_bias_grads);
  };
  if (!mlp_cpu_native(input, weights) ||
      !mlp_bce_net_grads(input_grad, weight_grads, bias_grads, bn_weight_grads, bn_bias_grads))
    return layers();
  check_mlp_bce_backward(grad, input, target, weight, pos_weight, reduction, logits, weights,
                         biases, batch_norm, bn_weights, saved, activation, weight_grads,
                         bias_grads, bn_weight_grads, bn_bias_grads);
  const at::IntArrayRef shape = logits.sizes();
  const auto full = [&](const std::optional<at::Tensor>& t) {
    return present(t) ? t->expand(shape).contiguous() : at::Tensor();
  };
  MlpLoss loss;
  loss.grad = grad;
  loss.target = target.contiguous();
  loss.weight = full(weight);
  loss.pos_weight = full(pos_weight);
  loss.reduction = reduction;
  loss.target_grad = target_grad;
  auto [gx, gw, gb, gbw, gbb] = mlp_backward_cpu_native(
      grad, input, logits, weights, biases, batch_norm, bn_weights, saved, training, activation,
      negative_slope, /*output_activation=*/0, input_grad, weight_grads, bias_grads,
      bn_weight_grads, bn_bias_grads, &loss);
  at::Tensor gy = target_grad ? loss.grad_target : at::empty({0}, input.options());
  return {gx, gy, gw, gb, gbw, gbb};
}

}  // namespace

HPML_REGISTER_CPU_KERNELS(mlp_bce_with_logits)

}  // namespace hpml
