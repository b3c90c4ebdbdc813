// hpml::mlp and hpml::mlp_backward: the argument contract (the same checks, order and words as
// hpml_ops/ops/mlp.py's check_args), and the layer-by-layer implementation every device shares:
// the whole network in one op call, each layer through the library's own ops (linear_act,
// batch_norm and their backwards, called below autograd through the dispatcher, so on CUDA
// tensors they are the CUDA kernels and in the emulated build the emulated ones).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/where.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace hpml {
inline namespace HPML_LIB_NAMESPACE {  // csrc/common.h

using OptTensor = std::optional<at::Tensor>;
// The lists of biases and batch-norm tensors: an absent entry is an empty (0, 0) tensor (an
// undefined one from C++ too).
using OptTensorList = at::TensorList;

// Per hidden layer, the forward returns 6 saved tensors (schema.py), then 1 for the output layer.
constexpr int64_t kMlpSavedPerLayer = 6;

// hpml::mlp_backward's result: the input's gradient, then the lists of the weights', biases',
// batch-norm weights' and batch-norm biases' gradients (empty tensors where not asked for).
using MlpGrads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                            std::vector<at::Tensor>, std::vector<at::Tensor>>;

inline bool mlp_absent(const at::Tensor& t) {
  return !t.defined() || (t.dim() == 2 && t.size(0) == 0 && t.size(1) == 0);
}
inline OptTensor opt_at(OptTensorList l, int64_t i) {
  return mlp_absent(l[i]) ? std::nullopt : OptTensor(l[i]);
}

inline std::string layer_name(int64_t i, const char* what) {
  return "layer " + std::to_string(i) + "'s " + what;
}

// The arguments hpml::mlp accepts (its backward's forward part too).
inline void check_mlp(const at::Tensor& input, at::TensorList weights, OptTensorList biases,
                      const c10::List<bool>& batch_norm, OptTensorList bn_weights,
                      OptTensorList bn_biases, OptTensorList running_means,
                      OptTensorList running_vars, bool training, double eps,
                      int64_t activation, int64_t output_activation, bool batch_norm_mode = true) {
  // batch_norm_mode: check the batch norms' statistics against the mode (the forward's
  // concern; the backward reads the statistics the forward saved).
  constexpr const char* op = "mlp";
  for (auto [code, name] : {std::pair{activation, "activation"},
                            std::pair{output_activation, "output_activation"}}) {
    TORCH_CHECK(valid_activation(code), op, ": ", name,
                " must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (sigmoid) or 4 (tanh), got ",
                code);
  }
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, op, ": expected at least one layer (weights is empty)");
  TORCH_CHECK(input.dim() == 2, op, ": expected a 2-D input (M, in_features), got shape ",
              py_shape(input.sizes()));
  check_floating(op, input, "input");
  const auto count = [&](int64_t got, int64_t want, const char* what, const char* per) {
    TORCH_CHECK(got == want, op, ": expected ", want, " ", what, " (", per, "), got ", got);
  };
  count(static_cast<int64_t>(biases.size()), L, "biases", "one per layer, or None");
  count(static_cast<int64_t>(batch_norm.size()), L - 1, "batch_norm flags",
        "one per hidden layer");
  count(static_cast<int64_t>(bn_weights.size()), L - 1, "bn_weights",
        "one per hidden layer, or None");
  count(static_cast<int64_t>(bn_biases.size()), L - 1, "bn_biases",
        "one per hidden layer, or None");
  count(static_cast<int64_t>(running_means.size()), L - 1, "running_means",
        "one per hidden layer, or None");
  count(static_cast<int64_t>(running_vars.size()), L - 1, "running_vars",
        "one per hidden layer, or None");
  int64_t fan_in = input.size(1);
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& w = weights[i];
    const std::string wn = layer_name(i, "weight");
    TORCH_CHECK(w.dim() == 2, op, ": ", wn, " must be 2-D (out_features, in_features), got shape ",
                py_shape(w.sizes()));
    if (i == 0) {
      TORCH_CHECK(w.size(1) == fan_in, op, ": input of shape ", py_shape(input.sizes()),
                  " has in_features=", fan_in, " but ", wn, " of shape ", py_shape(w.sizes()),
                  " expects in_features=", w.size(1));
    } else {
      TORCH_CHECK(w.size(1) == fan_in, op, ": ", wn, " of shape ", py_shape(w.sizes()),
                  " expects in_features=", w.size(1), " but layer ", i - 1,
                  " has out_features=", fan_in);
    }
    check_floating(op, w, wn.c_str());
    check_same_device(op, input, w, wn.c_str());
    check_same_dtype(op, input, w, wn.c_str());
    const int64_t n = w.size(0);
    if (const OptTensor b = opt_at(biases, i)) {
      const std::string bn = layer_name(i, "bias");
      check_floating(op, *b, bn.c_str());
      check_same_device(op, input, *b, bn.c_str());
      TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", bn, " of shape ",
                  py_shape(b->sizes()), " does not match out_features=", n);
      check_same_dtype(op, input, *b, bn.c_str());
    }
    if (i < L - 1) {
      const bool has_bn = batch_norm.get(i);
      for (auto [list, what] : {std::pair{&bn_weights, "bn_weight"},
                                std::pair{&bn_biases, "bn_bias"},
                                std::pair{&running_means, "running_mean"},
                                std::pair{&running_vars, "running_var"}}) {
        const OptTensor t = opt_at(*list, i);
        if (!t) continue;
        const std::string tn = layer_name(i, what);
        TORCH_CHECK(has_bn, op, ": layer ", i, " has no batch norm but a ", what, " was given");
        check_per_channel(op, t, n, input, tn.c_str());
      }
      if (has_bn && batch_norm_mode) {
        TORCH_CHECK(training || (opt_at(running_means, i) && opt_at(running_vars, i)), op,
                    ": layer ", i, "'s batch norm: running_mean must be defined in evaluation mode");
        TORCH_CHECK_VALUE(!training || input.size(0) != 1,
                          "Expected more than 1 value per channel when training, got input size ",
                          torch_size({input.size(0), n}));
        check_bn_eps(eps, training);
      }
    }
    fan_in = n;
  }
}

// A backward's saved tensors (as many as the forward returns) and gradient flags (one per layer
// for weights and biases, one per hidden layer for the batch norms').
inline void check_mlp_saved_and_flags(const char* op, int64_t L, at::TensorList saved,
                                      const c10::List<bool>& weight_grads,
                                      const c10::List<bool>& bias_grads,
                                      const c10::List<bool>& bn_weight_grads,
                                      const c10::List<bool>& bn_bias_grads) {
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == kMlpSavedPerLayer * (L - 1) + 1, op,
              ": expected ", kMlpSavedPerLayer * (L - 1) + 1, " saved tensors, got ",
              saved.size());
  TORCH_CHECK(static_cast<int64_t>(weight_grads.size()) == L &&
                  static_cast<int64_t>(bias_grads.size()) == L &&
                  static_cast<int64_t>(bn_weight_grads.size()) == L - 1 &&
                  static_cast<int64_t>(bn_bias_grads.size()) == L - 1,
              op, ": expected a gradient flag per layer (weights, biases) and per hidden layer "
              "(bn_weights, bn_biases)");
}

// hpml::mlp_backward's contract: the forward's (the batch norms' statistics unchecked), the
// saved tensors' count, a gradient flag per layer, grad like the output.
inline void check_mlp_backward(const at::Tensor& grad, const at::Tensor& input,
                               const at::Tensor& output, at::TensorList weights,
                               OptTensorList biases, const c10::List<bool>& batch_norm,
                               OptTensorList bn_weights, at::TensorList saved, bool training,
                               int64_t activation, int64_t output_activation,
                               const c10::List<bool>& weight_grads,
                               const c10::List<bool>& bias_grads,
                               const c10::List<bool>& bn_weight_grads,
                               const c10::List<bool>& bn_bias_grads) {
  constexpr const char* op = "hpml::mlp_backward";
  const int64_t L = static_cast<int64_t>(weights.size());
  const std::vector<at::Tensor> no_stats_v(std::max<int64_t>(L - 1, 0));
  const OptTensorList no_stats(no_stats_v);
  check_mlp(input, weights, biases, batch_norm, bn_weights, no_stats, no_stats, no_stats,
            training, /*eps=*/1.0, activation, output_activation, /*batch_norm_mode=*/false);
  check_mlp_saved_and_flags(op, L, saved, weight_grads, bias_grads, bn_weight_grads,
                            bn_bias_grads);
  check_like(op, input, grad, "grad", output, "the output");
}

// ---- the layer-by-layer implementation -------------------------------------------------------

namespace mlp_ops {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x, const at::Tensor& w,
                                                     const OptTensor& b, int64_t act,
                                                     double slope) {
  static const auto op =
      handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                const OptTensor&, int64_t, double)>(
          HPML_OP("linear_act"));
  return op.call(x, w, b, act, slope);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
    const at::Tensor& mask, int64_t act, double slope, bool ig, bool wg, bool bg) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, int64_t, double, bool, bool, bool)>(HPML_OP("linear_act_backward"));
  return op.call(g, x, w, out, mask, act, slope, ig, wg, bg);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& x, const OptTensor& w, const OptTensor& b, const OptTensor& rm,
    const OptTensor& rv, bool training, double eps, int64_t act) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      bool, double, int64_t)>(HPML_OP("batch_norm"));
  return op.call(x, w, b, rm, rv, training, eps, act);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& g, const at::Tensor& x, const OptTensor& w, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, int64_t act, bool ig, bool wg,
    bool bg) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, bool, int64_t, bool, bool, bool)>(
      HPML_OP("batch_norm_backward"));
  return op.call(g, x, w, out, mean, invstd, training, act, ig, wg, bg);
}

}  // namespace mlp_ops

// The kernels of hpml::mlp and hpml::mlp_backward for every dispatch key (registered as
// HPML_REGISTER_KERNELS(mlp, <key>, _layers)); no device guard of their own: every op they call
// runs on its arguments' device.
inline std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_layers(
    const at::Tensor& input, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights,
    OptTensorList bn_biases, OptTensorList running_means,
    OptTensorList running_vars, bool training, double eps, int64_t activation,
    double negative_slope, int64_t output_activation) {
  check_mlp(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
            running_vars, training, eps, activation, output_activation);
  const int64_t L = static_cast<int64_t>(weights.size());
  const Act act = static_cast<Act>(activation);
  // A fresh empty tensor for every empty slot: the outputs of an op may not alias each other.
  const auto none = [&] { return at::empty({0}, input.options()); };
  std::vector<at::Tensor> saved;
  saved.reserve(kMlpSavedPerLayer * (L - 1) + 1);
  at::Tensor h = input;
  for (int64_t i = 0; i < L - 1; ++i) {
    if (!batch_norm.get(i)) {
      auto [out, mask] = mlp_ops::linear_act(h, weights[i], opt_at(biases, i), activation,
                                             negative_slope);
      saved.insert(saved.end(), {out, mask, none(), none(), none(), none()});
      h = out;
      continue;
    }
    auto [z, unused] = mlp_ops::linear_act(h, weights[i], opt_at(biases, i),
                                           static_cast<int64_t>(Act::None), 0.0);
    auto [a, mean, invstd, var] = mlp_ops::batch_norm(
        z, opt_at(bn_weights, i), opt_at(bn_biases, i), opt_at(running_means, i),
        opt_at(running_vars, i), training, eps, act == Act::Relu ? 1 : 0);
    at::Tensor out = a, aux = none();
    switch (act) {
      case Act::LeakyRelu:
        out = at::leaky_relu(a, negative_slope);
        aux = a;  // the backward's sign test (a negative slope keeps no sign in the output)
        break;
      case Act::Sigmoid: out = at::sigmoid(a); break;
      case Act::Tanh: out = at::tanh(a); break;
      default: break;  // none; relu is fused into the batch norm
    }
    saved.insert(saved.end(), {out, aux, z, mean, invstd, var});
    h = out;
  }
  auto [y, mask] = mlp_ops::linear_act(h, weights[L - 1], opt_at(biases, L - 1),
                                       output_activation, negative_slope);
  saved.push_back(mask);
  return {y, saved};
}

inline std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                  std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_backward_layers(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& output,
                    at::TensorList weights, OptTensorList biases,
                    const c10::List<bool>& batch_norm, OptTensorList bn_weights,
                    at::TensorList saved, bool training, int64_t activation,
                    double negative_slope, int64_t output_activation, bool input_grad,
                    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
                    const c10::List<bool>& bn_weight_grads, const c10::List<bool>& bn_bias_grads) {
  check_mlp_backward(grad, input, output, weights, biases, batch_norm, bn_weights, saved,
                     training, activation, output_activation, weight_grads, bias_grads,
                     bn_weight_grads, bn_bias_grads);
  const int64_t L = static_cast<int64_t>(weights.size());
  const Act act = static_cast<Act>(activation);
  const auto none = [&] { return at::empty({0}, input.options()); };
  // below[i]: some gradient is wanted from the layers before layer i (or the input's).
  std::vector<bool> below(L + 1, input_grad);
  for (int64_t i = 1; i <= L; ++i) {
    const int64_t j = i - 1;
    bool here = weight_grads.get(j) || bias_grads.get(j);
    if (j < L - 1) here = here || bn_weight_grads.get(j) || bn_bias_grads.get(j);
    below[i] = below[i - 1] || here;
  }
  const auto nones = [&](int64_t n) {
    std::vector<at::Tensor> v;
    for (int64_t i = 0; i < n; ++i) v.push_back(none());
    return v;
  };
  std::vector<at::Tensor> gw = nones(L), gb = nones(L), gbw = nones(std::max<int64_t>(L - 1, 0)),
                          gbb = nones(std::max<int64_t>(L - 1, 0));
  const auto layer_input = [&](int64_t i) -> const at::Tensor& {
    return i == 0 ? input : saved[kMlpSavedPerLayer * (i - 1)];
  };
  const auto has = [&](OptTensorList l, int64_t i) { return !mlp_absent(l[i]); };
  auto [gx, w_last, b_last] = mlp_ops::linear_act_backward(
      grad, layer_input(L - 1), weights[L - 1], output, saved[saved.size() - 1],
      output_activation, negative_slope, below[L - 1], weight_grads.get(L - 1),
      bias_grads.get(L - 1) && has(biases, L - 1));
  gw[L - 1] = w_last;
  gb[L - 1] = b_last;
  at::Tensor g = gx;
  for (int64_t i = L - 2; i >= 0 && below[i + 1]; --i) {
    const int64_t s = kMlpSavedPerLayer * i;
    const at::Tensor &h = saved[s], &aux = saved[s + 1];
    const bool wg = weight_grads.get(i), bg = bias_grads.get(i) && has(biases, i);
    if (!batch_norm.get(i)) {
      auto [gxi, gwi, gbi] = mlp_ops::linear_act_backward(
          g, layer_input(i), weights[i], h, aux, activation, negative_slope, below[i], wg, bg);
      gw[i] = gwi;
      gb[i] = gbi;
      g = gxi;
      continue;
    }
    at::Tensor ga = g;  // the gradient at the batch norm's output
    switch (act) {
      case Act::LeakyRelu: ga = at::where(at::gt(aux, 0), g, at::mul(g, negative_slope)); break;
      case Act::Sigmoid: ga = at::sigmoid_backward(g, h); break;
      case Act::Tanh: ga = at::tanh_backward(g, h); break;
      default: break;  // none; relu: the batch norm's backward masks by !(h <= 0)
    }
    auto [gz, gbwi, gbbi] = mlp_ops::batch_norm_backward(
        ga, saved[s + 2], opt_at(bn_weights, i), h, saved[s + 3], saved[s + 4], training,
        act == Act::Relu ? 1 : 0, true, bn_weight_grads.get(i) && has(bn_weights, i),
        bn_bias_grads.get(i));
    gbw[i] = gbwi;
    gbb[i] = gbbi;
    auto [gxi, gwi, gbi] = mlp_ops::linear_act_backward(
        gz, layer_input(i), weights[i], none(), none().to(at::kByte), static_cast<int64_t>(Act::None),
        0.0, below[i], wg, bg);
    gw[i] = gwi;
    gb[i] = gbi;
    g = gxi;
  }
  return {input_grad ? g : none(), gw, gb, gbw, gbb};
}

}  // namespace HPML_LIB_NAMESPACE
}  // namespace hpml
