// hpml::mlp_bce_with_logits and its backward: an MLP (csrc/mlp.h, no output activation) and the
// sigmoid BCE-with-logits loss of its output (csrc/bce_with_logits.h) as one op each way. The
// argument contract (the same checks, order and words as hpml_ops/ops/mlp_bce_with_logits.py's
// check_args: the net's, then the loss's, all before any kernel runs) and the implementation
// every device shares: the net through hpml::mlp and the loss through hpml::bce_with_logits
// (and their backwards), called below autograd through the dispatcher. The CPU backward of
// fp32/fp64 nets starts from the loss inside the whole-network kernel instead
// (csrc/mlp_bce_with_logits.cpp).
#pragma once

#include <ATen/core/Reduction.h>

#include <string>
#include <tuple>
#include <vector>

#include "bce_with_logits.h"
#include "mlp.h"

namespace hpml {
inline namespace HPML_LIB_NAMESPACE {  // csrc/common.h

// The loss's operands against logits of shape (M, N) in the input's dtype and device.
inline void check_mlp_bce_loss(const at::Tensor& input, int64_t M, int64_t N,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  constexpr const char* op = "mlp_bce_with_logits";
  TORCH_CHECK(reduction >= at::Reduction::None && reduction <= at::Reduction::Sum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef({M, N}), "Target size (",
                    torch_size(target.sizes()), ") must be the same as input size (",
                    torch_size({M, N}), ")");
  check_floating(op, target, "target");
  check_same_device(op, input, target, "target");
  check_same_dtype(op, input, target, "target");
  for (auto [t, name] : {std::pair{&weight, "weight"}, std::pair{&pos_weight, "pos_weight"}}) {
    if (!present(*t)) continue;
    check_floating(op, **t, name);
    check_same_device(op, input, **t, name);
    check_same_dtype(op, input, **t, name);
    make_bcast(op, **t, {M, N}, name);
  }
}

inline void check_mlp_bce(const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                          at::TensorList weights, OptTensorList biases,
                          const c10::List<bool>& batch_norm, OptTensorList bn_weights,
                          OptTensorList bn_biases, OptTensorList running_means,
                          OptTensorList running_vars, bool training, double eps,
                          int64_t activation) {
  check_mlp(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
            running_vars, training, eps, activation, /*output_activation=*/0);
  check_mlp_bce_loss(input, input.size(0), weights[weights.size() - 1].size(0), target, weight,
                     pos_weight, reduction);
}

// hpml::mlp_bce_with_logits_backward's contract: the net's (its batch-norm statistics
// unchecked), the loss's, the logits (M, N), grad (0-d for mean / sum, the logits' shape for
// none), the saved tensors' count and a gradient flag per layer.
inline void check_mlp_bce_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, const at::Tensor& logits, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, at::TensorList saved,
    int64_t activation, const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const c10::List<bool>& bn_weight_grads, const c10::List<bool>& bn_bias_grads) {
  constexpr const char* op = "hpml::mlp_bce_with_logits_backward";
  const int64_t L = static_cast<int64_t>(weights.size());
  const std::vector<at::Tensor> no_stats_v(std::max<int64_t>(L - 1, 0));
  const OptTensorList no_stats(no_stats_v);
  check_mlp(input, weights, biases, batch_norm, bn_weights, no_stats, no_stats, no_stats,
            /*training=*/true, /*eps=*/1.0, activation, 0, /*batch_norm_mode=*/false);
  const int64_t M = input.size(0), N = weights[L - 1].size(0);
  check_mlp_bce_loss(input, M, N, target, weight, pos_weight, reduction);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({M, N}), op, ": logits of shape ",
              py_shape(logits.sizes()), " do not match the net's output ", py_shape({M, N}));
  check_same_dtype(op, input, logits, "logits");
  check_same_device(op, input, logits, "logits");
  check_mlp_saved_and_flags(op, L, saved, weight_grads, bias_grads, bn_weight_grads,
                            bn_bias_grads);
  check_same_device(op, input, grad, "grad");
  check_loss_grad(op, grad, reduction, logits, "the logits' shape");
}

// The ops' signatures, as the dispatcher calls them (here and in csrc/autograd.cpp).
namespace mlp_bce_ops {

using MlpSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, at::TensorList, const c10::List<bool>&, at::TensorList,
    at::TensorList, at::TensorList, at::TensorList, bool, double, int64_t, double, int64_t);
using MlpBwdSig = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
    const c10::List<bool>&, at::TensorList, at::TensorList, bool, int64_t, double, int64_t, bool,
    const c10::List<bool>&, const c10::List<bool>&, const c10::List<bool>&,
    const c10::List<bool>&);
using MlpBceSig = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t,
    at::TensorList, at::TensorList, const c10::List<bool>&, at::TensorList, at::TensorList,
    at::TensorList, at::TensorList, bool, double, int64_t, double);
using MlpBceBwdSig = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                                std::vector<at::Tensor>, std::vector<at::Tensor>,
                                std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    int64_t, const at::Tensor&, at::TensorList, at::TensorList, const c10::List<bool>&,
    at::TensorList, at::TensorList, bool, int64_t, double, bool, bool, const c10::List<bool>&,
    const c10::List<bool>&, const c10::List<bool>&, const c10::List<bool>&);
using BceSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                          const OptTensor&, int64_t);
using BceBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const OptTensor&,
                                                     const OptTensor&, int64_t, bool, bool);

}  // namespace mlp_bce_ops

// The kernels of hpml::mlp_bce_with_logits[_backward] for every dispatch key (registered as
// HPML_REGISTER_KERNELS(mlp_bce_with_logits, <key>, _layers)).
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_bce_with_logits_layers(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction, at::TensorList weights,
    OptTensorList biases, const c10::List<bool>& batch_norm, OptTensorList bn_weights,
    OptTensorList bn_biases, OptTensorList running_means, OptTensorList running_vars,
    bool training, double eps, int64_t activation, double negative_slope) {
  using namespace mlp_bce_ops;
  check_mlp_bce(input, target, weight, pos_weight, reduction, weights, biases, batch_norm,
                bn_weights, bn_biases, running_means, running_vars, training, eps, activation);
  static const auto mlp = mlp_ops::handle<MlpSig>(HPML_OP("mlp"));
  static const auto bce = mlp_ops::handle<BceSig>(HPML_OP("bce_with_logits"));
  auto [logits, saved] = mlp.call(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                  running_means, running_vars, training, eps, activation,
                                  negative_slope, /*output_activation=*/0);
  at::Tensor loss = bce.call(logits, target, weight, pos_weight, reduction);
  return {loss, logits, saved};
}

using MlpBceGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                               std::vector<at::Tensor>, std::vector<at::Tensor>,
                               std::vector<at::Tensor>>;

// Whether any gradient of the net (not the target's) is asked for.
inline bool mlp_bce_net_grads(bool input_grad, const c10::List<bool>& weight_grads,
                              const c10::List<bool>& bias_grads,
                              const c10::List<bool>& bn_weight_grads,
                              const c10::List<bool>& bn_bias_grads) {
  bool any = input_grad;
  for (const c10::List<bool>* l : {&weight_grads, &bias_grads, &bn_weight_grads, &bn_bias_grads})
    for (size_t i = 0; i < l->size(); ++i) any = any || l->get(i);
  return any;
}

inline MlpBceGrads mlp_bce_with_logits_backward_layers(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, const at::Tensor& logits, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, at::TensorList saved,
    bool training, int64_t activation, double negative_slope, bool input_grad, bool target_grad,
    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const c10::List<bool>& bn_weight_grads, const c10::List<bool>& bn_bias_grads) {
  using namespace mlp_bce_ops;
  check_mlp_bce_backward(grad, input, target, weight, pos_weight, reduction, logits, weights,
                         biases, batch_norm, bn_weights, saved, activation, weight_grads,
                         bias_grads, bn_weight_grads, bn_bias_grads);
  static const auto bce_bwd = mlp_ops::handle<BceBwdSig>(HPML_OP("bce_with_logits_backward"));
  static const auto mlp_bwd = mlp_ops::handle<MlpBwdSig>(HPML_OP("mlp_backward"));
  const bool net = mlp_bce_net_grads(input_grad, weight_grads, bias_grads, bn_weight_grads,
                                     bn_bias_grads);
  auto [g_logits, g_target] =
      bce_bwd.call(grad, logits, target, weight, pos_weight, reduction, net, target_grad);
  if (!net) {
    const auto none = [&] { return at::empty({0}, input.options()); };
    const int64_t L = static_cast<int64_t>(weights.size());
    std::vector<at::Tensor> gw, gb, gbw, gbb;
    for (int64_t i = 0; i < L; ++i) {
      gw.push_back(none());
      gb.push_back(none());
      if (i < L - 1) {
        gbw.push_back(none());
        gbb.push_back(none());
      }
    }
    return {none(), g_target, gw, gb, gbw, gbb};
  }
  auto [gx, gw, gb, gbw, gbb] =
      mlp_bwd.call(g_logits, input, logits, weights, biases, batch_norm, bn_weights, saved,
                   training, activation, negative_slope, /*output_activation=*/0, input_grad,
                   weight_grads, bias_grads, bn_weight_grads, bn_bias_grads);
  return {gx, g_target, gw, gb, gbw, gbb};
}

}  // namespace HPML_LIB_NAMESPACE
}  // namespace hpml
