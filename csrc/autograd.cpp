// Autograd formulas of the C++ ops (every device: registered to the Autograd alias key), as
// torch::autograd::Function subclasses that call the forward op below autograd and the backward
// op from the saved tensors. They used to be registered from Python
// (torch.library.register_autograd), which put ~40-60 us of Python in front of every call and
// every backward: more than the arithmetic of a small layer (the training step of the lecture's
// 256-120-84-10 net is mostly such calls). The Triton ops keep their Python formulas
// (hpml_ops/ops/<op>.py), which compute the same thing: both must stay in step.
//
// The backward ops have no formula: under create_graph=True, when the gradients will themselves
// be differentiated, each formula computes them from differentiable ATen ops on the saved tensors
// instead (differentiable_backward below).
//
// torch.compile traces through these: AOTAutograd runs the forward under autograd with fake
// tensors, which records the forward op, and the backward through the saved node, which records
// the backward op (tests: test_*_compile_fullgraph, opcheck's test_aot_dispatch_dynamic).
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "common.h"
#include "constants.h"
#include "mlp_bce_with_logits.h"

namespace hpml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An optional argument saved as a (possibly undefined) tensor, handed back to an op.
OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Under create_graph=True, when a gradient will itself be differentiated (a Hessian, a gradient
// penalty), the backward computes its gradients with differentiable ATen ops from the saved
// tensors instead of our backward kernel, so that a second backward works as on torch's own ops.
bool differentiable_backward(const variable_list& inputs) {
  return at::GradMode::is_enabled() && torch::autograd::compute_requires_grad(inputs);
}

// Whether autograd has anything to record: grad mode on and an input that requires grad or
// carries a forward-mode tangent. When not (inference, evaluation, inputs that need no
// gradient), the op runs below autograd at once: torch::autograd::Function::apply would still
// make a node, a context and its saved data: ~3.5 us of a 1-row call (NOTES, per-call v4).
bool tracked(const at::Tensor& t) {
  return t.defined() && (t.requires_grad() || t._fw_grad(/*level=*/0).defined());
}
bool tracked(const OptTensor& t) { return t.has_value() && tracked(*t); }
bool tracked(at::TensorList ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return tracked(t); });
}
template <typename... Ts>
bool records(const Ts&... ts) {
  return at::GradMode::is_enabled() && (tracked(ts) || ...);
}

// torch's batch norm is not differentiable with respect to its running statistics and refuses
// ones that require grad (native_batch_norm: "... This input cannot have requires_grad True."),
// in training and in eval; ours give the same error before anything runs (their gradient would
// otherwise be None without a word). `what` names the argument (in a list, with the layer).
void check_running_stat(const char* op, const at::Tensor& t, const std::string& what) {
  TORCH_CHECK(!(t.defined() && t.requires_grad()), "The function '", op,
              "' is not differentiable with respect to argument '", what,
              "'. This input cannot have requires_grad True.");
}
void check_running_stats(const char* op, at::TensorList means, at::TensorList vars) {
  for (size_t i = 0; i < means.size(); ++i)
    check_running_stat(op, means[i], "running_means[" + std::to_string(i) + "]");
  for (size_t i = 0; i < vars.size(); ++i)
    check_running_stat(op, vars[i], "running_vars[" + std::to_string(i) + "]");
}

// The ReLU / leaky ReLU bit mask (uint8 (M, ceil(N / 8)), bit j % 8 of byte j / 8) as bool (M, N).
at::Tensor unpack_mask(const at::Tensor& mask, int64_t n) {
  const auto shifts = at::arange(8, mask.options());
  return mask.unsqueeze(-1)
      .bitwise_right_shift(shifts)
      .bitwise_and(1)
      .reshape({mask.size(0), -1})
      .narrow(1, 0, n)
      .to(at::kBool);
}

// dZ = dY * act'(Z) from what the forward saved (the mask, or the output y), differentiable.
at::Tensor linear_act_dz(const at::Tensor& g, const at::Tensor& y, const at::Tensor& mask,
                         Act act, double slope) {
  switch (act) {
    case Act::Relu: return g.masked_fill(unpack_mask(mask, g.size(1)).logical_not(), 0);
    case Act::LeakyRelu: return at::where(unpack_mask(mask, g.size(1)), g, g * slope);
    case Act::Sigmoid: return g * y * (1 - y);
    case Act::Tanh: return g * (1 - y * y);
    default: return g;
  }
}

// ---- linear_act ---------------------------------------------------------------------------------

using LinearActSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, int64_t, double);
using LinearActBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, double, bool, bool, bool);

class LinearActFn : public torch::autograd::Function<LinearActFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptTensor& bias, int64_t activation,
                               double negative_slope) {
    static const auto op = op_handle<LinearActSig>(HPML_OP("linear_act"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask] = op.call(input, weight, bias, activation, negative_slope);
    // Only what the backward reads: the mask (1 bit per element) for relu / leaky relu, the
    // output for sigmoid / tanh; never the pre-activation.
    const bool from_output = act_uses_output(static_cast<Act>(activation));
    ctx->save_for_backward({input, weight, from_output ? out : out.new_empty({0}), mask});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mask});
    ctx->set_materialize_grads(false);  // no zeros for the mask's absent gradient
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<LinearActBwdSig>(HPML_OP("linear_act_backward"));
    const bool ig = ctx->needs_input_grad(0), wg = ctx->needs_input_grad(1);
    const bool bg = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    variable_list result(5);
    if (!grads[0].defined() || !(ig || wg || bg)) return result;  // no gradient: none
    const auto saved = ctx->get_saved_variables();
    const auto act = static_cast<Act>(ctx->saved_data["activation"].toInt());
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    if (differentiable_backward({grads[0], saved[0], saved[1], saved[2]})) {
      const at::Tensor dz = linear_act_dz(grads[0], saved[2], saved[3], act, slope);
      if (ig) result[0] = dz.matmul(saved[1]);
      if (wg) result[1] = dz.t().matmul(saved[0]);
      if (bg) result[2] = dz.sum(0);
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gw, gb] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3],
                                static_cast<int64_t>(act), slope, ig, wg, bg);
    if (ig) result[0] = gx;
    if (wg) result[1] = gw;
    if (bg) result[2] = gb;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_act_autograd(const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const OptTensor& bias, int64_t activation,
                                                       double negative_slope) {
  if (!records(input, weight, bias)) {
    static const auto op = op_handle<LinearActSig>(HPML_OP("linear_act"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, activation, negative_slope);
  }
  auto r = LinearActFn::apply(input, weight, bias, activation, negative_slope);
  return {r[0], r[1]};
}

// ---- bce_with_logits ----------------------------------------------------------------------------

using BceSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                          int64_t);
using BceBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const OptTensor&,
                                                     const OptTensor&, int64_t, bool, bool);

class BceWithLogitsFn : public torch::autograd::Function<BceWithLogitsFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const OptTensor& weight,
                            const OptTensor& pos_weight, int64_t reduction) {
    static const auto op = op_handle<BceSig>(HPML_OP("bce_with_logits"));
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(input, target, weight, pos_weight, reduction);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()),
                            pos_weight.value_or(at::Tensor())});
    ctx->saved_data["reduction"] = reduction;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<BceBwdSig>(HPML_OP("bce_with_logits_backward"));
    const bool gi = ctx->needs_input_grad(0), gt = ctx->needs_input_grad(1);
    variable_list result(5);
    if (!(gi || gt)) return result;
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (differentiable_backward({grads[0], saved[0], saved[1], saved[2], saved[3]})) {
      // torch's own loss on the saved inputs, differentiated with a graph.
      const at::Tensor loss = at::binary_cross_entropy_with_logits(
          saved[0], saved[1], opt(saved[2]), opt(saved[3]), reduction);
      variable_list wrt;
      if (gi) wrt.push_back(saved[0]);
      if (gt) wrt.push_back(saved[1]);
      const auto g = torch::autograd::grad({loss}, wrt, {grads[0]}, /*retain_graph=*/true,
                                           /*create_graph=*/true);
      if (gi) result[0] = g[0];
      if (gt) result[1] = g[gi ? 1 : 0];
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_target] = op.call(grads[0], saved[0], saved[1], opt(saved[2]),
                                             opt(saved[3]), reduction, gi, gt);
    if (gi) result[0] = grad_input;
    if (gt) result[1] = grad_target;
    return result;
  }
};

at::Tensor bce_with_logits_autograd(const at::Tensor& input, const at::Tensor& target,
                                    const OptTensor& weight, const OptTensor& pos_weight,
                                    int64_t reduction) {
  if (!records(input, target, weight, pos_weight)) {
    static const auto op = op_handle<BceSig>(HPML_OP("bce_with_logits"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, target, weight, pos_weight, reduction);
  }
  return BceWithLogitsFn::apply(input, target, weight, pos_weight, reduction);
}

// ---- batch_norm ---------------------------------------------------------------------------------

using BatchNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    bool, double, int64_t);
using BatchNormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, int64_t, bool, bool, bool);

// Batch norm's gradients in differentiable ATen ops (differentiable_backward): the ReLU mask from
// the output (torch's threshold_backward: zero where y <= 0), then in training torch's own
// native_batch_norm_backward on the saved batch statistics (torch has its double backward); in
// evaluation the affine map's, y = (x - mean) invstd w + b.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_grads(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool relu, std::array<bool, 3> need) {
  const at::Tensor g = relu ? grad.masked_fill(output.le(0), 0) : grad;
  if (training) {
    auto [gx, gw, gb] = at::native_batch_norm_backward(
        g, input, opt(weight), std::nullopt, std::nullopt, mean, invstd, true, 0.0, need);
    return {need[0] ? gx : at::Tensor(), need[1] ? gw : at::Tensor(),
            need[2] ? gb : at::Tensor()};
  }
  std::vector<int64_t> shape(input.dim(), 1), dims;
  shape[1] = input.size(1);
  for (int64_t d = 0; d < input.dim(); ++d)
    if (d != 1) dims.push_back(d);
  const at::Tensor m = mean.to(input.scalar_type()).view(shape);
  const at::Tensor s = invstd.to(input.scalar_type()).view(shape);
  at::Tensor gx, gw, gb;
  if (need[0]) gx = weight.defined() ? g * (s * weight.view(shape)) : g * s;
  if (need[1]) gw = (g * (input - m) * s).sum(dims);
  if (need[2]) gb = g.sum(dims);
  return {gx, gw, gb};
}

class BatchNormFn : public torch::autograd::Function<BatchNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double eps, int64_t activation) {
    static const auto op = op_handle<BatchNormSig>(HPML_OP("batch_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd, var] =
        op.call(input, weight, bias, running_mean, running_var, training, eps, activation);
    // The output is read only for the ReLU mask.
    const bool relu = activation == static_cast<int64_t>(Act::Relu);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()),
                            relu ? out : out.new_empty({0}), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, invstd, var});
    ctx->set_materialize_grads(false);  // no zeros for the statistics' absent gradients
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<BatchNormBwdSig>(HPML_OP("batch_norm_backward"));
    const auto saved = ctx->get_saved_variables();
    const bool ig = ctx->needs_input_grad(0);
    const bool wg = saved[1].defined() && ctx->needs_input_grad(1);
    const bool bg = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    variable_list result(8);
    if (!grads[0].defined() || !(ig || wg || bg)) return result;  // no gradient: none
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    if (differentiable_backward({grads[0], saved[0], saved[1], saved[2]})) {
      const auto [gx, gw, gb] =
          batch_norm_grads(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], training,
                           activation == static_cast<int64_t>(Act::Relu), {ig, wg, bg});
      result[0] = gx, result[1] = gw, result[2] = gb;
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gw, gb] = op.call(grads[0], saved[0], opt(saved[1]), saved[2], saved[3], saved[4],
                                training, activation, ig, wg, bg);
    if (ig) result[0] = gx;
    if (wg) result[1] = gw;
    if (bg) result[2] = gb;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps,
    int64_t activation) {
  if (!records(input, weight, bias, running_mean, running_var)) {
    static const auto op = op_handle<BatchNormSig>(HPML_OP("batch_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, running_mean, running_var, training, eps, activation);
  }
  check_running_stat("hpml::batch_norm", running_mean.value_or(at::Tensor()), "running_mean");
  check_running_stat("hpml::batch_norm", running_var.value_or(at::Tensor()), "running_var");
  auto r = BatchNormFn::apply(input, weight, bias, running_mean, running_var, training, eps,
                              activation);
  return {r[0], r[1], r[2], r[3]};
}

// ---- mlp ------------------------------------------------------------------------------------

// Absent biases and batch-norm tensors are empty (0, 0) tensors in the lists (schema.py).
using mlp_bce_ops::MlpBwdSig;
using mlp_bce_ops::MlpSig;

at::Tensor activate(const at::Tensor& z, Act act, double slope) {
  switch (act) {
    case Act::Relu: return at::relu(z);
    case Act::LeakyRelu: return at::leaky_relu(z, slope);
    case Act::Sigmoid: return at::sigmoid(z);
    case Act::Tanh: return at::tanh(z);
    default: return z;
  }
}

// An entry of the op's lists that stands for None: an empty (0, 0) tensor.
OptTensor given(const at::Tensor& t) {
  return t.defined() && !(t.dim() == 2 && t.size(0) == 0 && t.size(1) == 0) ? OptTensor(t)
                                                                             : std::nullopt;
}

// hpml::mlp's forward again from differentiable ATen ops on the saved inputs, for a backward
// whose gradients will be differentiated again: batch norm in training from the batch (no running
// statistics to update), in eval from the mean and 1/std the forward used (saved per hidden layer
// at 3 and 4 of its six; csrc/mlp.h).
at::Tensor mlp_recompute(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                         const c10::List<bool>& batch_norm, at::TensorList bn_weights,
                         at::TensorList bn_biases, at::TensorList fwd_saved, bool training,
                         double eps, Act act, double slope, Act out_act) {
  constexpr int64_t kSavedPerLayer = 6;
  const int64_t L = static_cast<int64_t>(weights.size());
  at::Tensor h = input;
  for (int64_t i = 0; i < L; ++i) {
    h = at::linear(h, weights[i], given(biases[i]));
    if (i == L - 1) break;
    if (batch_norm.get(i)) {
      const OptTensor w = given(bn_weights[i]), b = given(bn_biases[i]);
      if (training) {
        h = at::batch_norm(h, w, b, {}, {}, /*training=*/true, 0.0, eps, /*cudnn_enabled=*/false);
      } else {
        const int64_t s = kSavedPerLayer * i;
        h = (h - fwd_saved[s + 3].to(h.scalar_type())) * fwd_saved[s + 4].to(h.scalar_type());
        if (w) h = h * *w;
        if (b) h = h + *b;
      }
    }
    h = activate(h, act, slope);
  }
  return activate(h, out_act, slope);
}

// The gradients of y (with grad y_grad) by torch::autograd::grad with a graph, for the inputs
// wanted, each placed at its argument's position in a formula's result (a backward whose
// gradients will be differentiated again).
struct GraphGrads {
  variable_list wrt;
  std::vector<int64_t> at_position;
  void want(bool needed, const at::Tensor& t, int64_t position) {
    if (!needed) return;
    wrt.push_back(t);
    at_position.push_back(position);
  }
  void into(variable_list& result, const at::Tensor& y, const at::Tensor& y_grad) const {
    const auto g = torch::autograd::grad({y}, wrt, {y_grad}, /*retain_graph=*/true,
                                         /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t k = 0; k < g.size(); ++k) result[at_position[k]] = g[k];
  }
};

// An MLP's parameters among a formula's inputs: which gradients are wanted (needs_input_grad,
// from the variable index of the first weight: weights, biases, bn_weights, bn_biases follow),
// and the argument positions they go to in the result (from the first weight's: weights (L),
// biases (L), the batch_norm flags, bn_weights (L - 1), bn_biases (L - 1)).
struct NetGrads {
  int64_t L, H, aw, ab, abw, abb;
  c10::List<bool> wg, bg, bwg, bbg;
  bool any = false;
  NetGrads(AutogradContext* ctx, int64_t L_, int64_t first_var, int64_t first_arg)
      : L(L_), H(L_ - 1), aw(first_arg), ab(aw + L), abw(ab + L + 1), abb(abw + H) {
    for (int64_t i = 0; i < L; ++i) {
      wg.push_back(ctx->needs_input_grad(first_var + i));
      bg.push_back(ctx->needs_input_grad(first_var + L + i));
      any = any || wg.get(i) || bg.get(i);
    }
    for (int64_t i = 0; i < H; ++i) {
      bwg.push_back(ctx->needs_input_grad(first_var + 2 * L + i));
      bbg.push_back(ctx->needs_input_grad(first_var + 2 * L + H + i));
      any = any || bwg.get(i) || bbg.get(i);
    }
  }
  // The end of the parameters' positions (the running statistics' two lists follow).
  int64_t end() const { return abb + 3 * H; }
  void want(GraphGrads& g, at::TensorList weights, at::TensorList biases,
            at::TensorList bn_weights, at::TensorList bn_biases) const {
    for (int64_t i = 0; i < L; ++i) {
      g.want(wg.get(i), weights[i], aw + i);
      g.want(bg.get(i), biases[i], ab + i);
    }
    for (int64_t i = 0; i < H; ++i) {
      g.want(bwg.get(i), bn_weights[i], abw + i);
      g.want(bbg.get(i), bn_biases[i], abb + i);
    }
  }
  // The backward op's gradients (empty where not asked) at their positions.
  void place(variable_list& result, const std::vector<at::Tensor>& gw,
             const std::vector<at::Tensor>& gb, const std::vector<at::Tensor>& gbw,
             const std::vector<at::Tensor>& gbb) const {
    for (int64_t i = 0; i < L; ++i) {
      if (wg.get(i)) result[aw + i] = gw[i];
      if (bg.get(i)) result[ab + i] = gb[i];
    }
    for (int64_t i = 0; i < H; ++i) {
      if (bwg.get(i)) result[abw + i] = gbw[i];
      if (bbg.get(i)) result[abb + i] = gbb[i];
    }
  }
};

// Autograd sees the tensors of every list as inputs, in order: input, weights (L), biases (L),
// bn_weights, bn_biases, running_means, running_vars (L - 1 each).
class MlpFn : public torch::autograd::Function<MlpFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               at::TensorList weights, at::TensorList biases,
                               c10::List<bool> batch_norm, at::TensorList bn_weights,
                               at::TensorList bn_biases, at::TensorList running_means,
                               at::TensorList running_vars, bool training, double eps,
                               int64_t activation, double negative_slope,
                               int64_t output_activation) {
    static const auto op = op_handle<MlpSig>(HPML_OP("mlp"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, saved] = op.call(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                running_means, running_vars, training, eps, activation,
                                negative_slope, output_activation);
    const int64_t L = static_cast<int64_t>(weights.size());
    variable_list keep{input, out};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), biases.begin(), biases.end());
    keep.insert(keep.end(), bn_weights.begin(), bn_weights.end());
    keep.insert(keep.end(), bn_biases.begin(), bn_biases.end());  // (for a second backward)
    keep.insert(keep.end(), saved.begin(), saved.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["L"] = L;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["batch_norm"] = batch_norm;
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["output_activation"] = output_activation;
    variable_list result{out};
    result.insert(result.end(), saved.begin(), saved.end());
    ctx->mark_non_differentiable(variable_list(result.begin() + 1, result.end()));
    ctx->set_materialize_grads(false);  // no zeros for the saved tensors' absent gradients
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MlpBwdSig>(HPML_OP("mlp_backward"));
    const int64_t L = ctx->saved_data["L"].toInt();
    const int64_t H = L - 1;
    // The parameters from variable 1 and argument 1; five scalars end the arguments.
    const NetGrads net(ctx, L, 1, 1);
    variable_list result(net.end() + 5);
    const bool ig = ctx->needs_input_grad(0);
    if (!grads[0].defined() || !(ig || net.any)) return result;  // no gradient: none
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& out = saved[1];
    const at::TensorList weights(saved.data() + 2, L);
    const at::TensorList biases(saved.data() + 2 + L, L);
    const at::TensorList bn_weights(saved.data() + 2 + 2 * L, H);
    const at::TensorList bn_biases(saved.data() + 2 + 2 * L + H, H);
    const int64_t n_inputs = 2 + 2 * L + 2 * H;
    const at::TensorList fwd_saved(saved.data() + n_inputs, saved.size() - n_inputs);
    const auto batch_norm = ctx->saved_data["batch_norm"].toBoolList();
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t act = ctx->saved_data["activation"].toInt();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const int64_t out_act = ctx->saved_data["output_activation"].toInt();
    variable_list differentiable{grads[0], input};
    differentiable.insert(differentiable.end(), saved.begin() + 2, saved.begin() + n_inputs);
    if (differentiable_backward(differentiable)) {
      // The gradients will be differentiated again: the net from differentiable ATen ops on the
      // saved inputs, differentiated with a graph (as the other ops' formulas do).
      const at::Tensor y = mlp_recompute(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                         fwd_saved, training, ctx->saved_data["eps"].toDouble(),
                                         static_cast<Act>(act), slope, static_cast<Act>(out_act));
      GraphGrads g;
      g.want(ig, input, 0);
      net.want(g, weights, biases, bn_weights, bn_biases);
      g.into(result, y, grads[0]);
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gw, gb, gbw, gbb] =
        op.call(grads[0], input, out, weights, biases, batch_norm, bn_weights, fwd_saved,
                training, act, slope, out_act, ig, net.wg, net.bg, net.bwg, net.bbg);
    if (ig) result[0] = gx;
    net.place(result, gw, gb, gbw, gbb);
    return result;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_autograd(
    const at::Tensor& input, at::TensorList weights, at::TensorList biases,
    const c10::List<bool>& batch_norm, at::TensorList bn_weights, at::TensorList bn_biases,
    at::TensorList running_means, at::TensorList running_vars, bool training, double eps,
    int64_t activation, double negative_slope, int64_t output_activation) {
  if (!records(input, weights, biases, bn_weights, bn_biases, running_means, running_vars)) {
    static const auto op = op_handle<MlpSig>(HPML_OP("mlp"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
                   running_vars, training, eps, activation, negative_slope, output_activation);
  }
  check_running_stats("hpml::mlp", running_means, running_vars);
  variable_list r = MlpFn::apply(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                 running_means, running_vars, training, eps, activation,
                                 negative_slope, output_activation);
  return {r[0], std::vector<at::Tensor>(r.begin() + 1, r.end())};
}

// ---- mlp_bce_with_logits ------------------------------------------------------------------

using mlp_bce_ops::MlpBceBwdSig;
using mlp_bce_ops::MlpBceSig;

// Autograd sees as inputs, in order: input, target, weight and pos_weight (when given), then the
// tensors of every list: weights (L), biases (L), bn_weights, bn_biases, running_means,
// running_vars (L - 1 each). Outputs: the loss, then the logits and the saved tensors (not
// differentiable).
class MlpBceFn : public torch::autograd::Function<MlpBceFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& target, const OptTensor& weight,
                               const OptTensor& pos_weight, int64_t reduction,
                               at::TensorList weights, at::TensorList biases,
                               c10::List<bool> batch_norm, at::TensorList bn_weights,
                               at::TensorList bn_biases, at::TensorList running_means,
                               at::TensorList running_vars, bool training, double eps,
                               int64_t activation, double negative_slope) {
    static const auto op = op_handle<MlpBceSig>(HPML_OP("mlp_bce_with_logits"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, logits, saved] =
        op.call(input, target, weight, pos_weight, reduction, weights, biases, batch_norm,
                bn_weights, bn_biases, running_means, running_vars, training, eps, activation,
                negative_slope);
    const int64_t L = static_cast<int64_t>(weights.size());
    variable_list keep{input, target, weight.value_or(at::Tensor()),
                       pos_weight.value_or(at::Tensor()), logits};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), biases.begin(), biases.end());
    keep.insert(keep.end(), bn_weights.begin(), bn_weights.end());
    keep.insert(keep.end(), bn_biases.begin(), bn_biases.end());  // (for a second backward)
    keep.insert(keep.end(), saved.begin(), saved.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["L"] = L;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["batch_norm"] = batch_norm;
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["extra"] = static_cast<int64_t>(present(weight)) + present(pos_weight);
    variable_list result{loss, logits};
    result.insert(result.end(), saved.begin(), saved.end());
    ctx->mark_non_differentiable(variable_list(result.begin() + 1, result.end()));
    ctx->set_materialize_grads(false);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MlpBceBwdSig>(HPML_OP("mlp_bce_with_logits_backward"));
    const int64_t L = ctx->saved_data["L"].toInt();
    const int64_t H = L - 1;
    // The parameters after input, target, weight and pos_weight (variables when given) and
    // reduction; four scalars end the arguments.
    const NetGrads net(ctx, L, 2 + ctx->saved_data["extra"].toInt(), 5);
    variable_list result(net.end() + 4);
    const bool ig = ctx->needs_input_grad(0), tg = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(ig || tg || net.any)) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &logits = saved[4];
    const OptTensor weight = opt(saved[2]), pos_weight = opt(saved[3]);
    const at::TensorList weights(saved.data() + 5, L);
    const at::TensorList biases(saved.data() + 5 + L, L);
    const at::TensorList bn_weights(saved.data() + 5 + 2 * L, H);
    const at::TensorList bn_biases(saved.data() + 5 + 2 * L + H, H);
    const int64_t n_inputs = 5 + 2 * L + 2 * H;
    const at::TensorList fwd_saved(saved.data() + n_inputs, saved.size() - n_inputs);
    const auto batch_norm = ctx->saved_data["batch_norm"].toBoolList();
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t act = ctx->saved_data["activation"].toInt();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list differentiable{grads[0], input, target};
    differentiable.insert(differentiable.end(), saved.begin() + 5, saved.begin() + n_inputs);
    if (differentiable_backward(differentiable)) {
      // A second backward to come: the net and torch's loss from differentiable ATen ops.
      const at::Tensor z = mlp_recompute(input, weights, biases, batch_norm, bn_weights,
                                         bn_biases, fwd_saved, training,
                                         ctx->saved_data["eps"].toDouble(),
                                         static_cast<Act>(act), slope, Act::None);
      const at::Tensor loss =
          at::binary_cross_entropy_with_logits(z, target, weight, pos_weight, reduction);
      GraphGrads g;
      g.want(ig, input, 0);
      g.want(tg, target, 1);
      net.want(g, weights, biases, bn_weights, bn_biases);
      g.into(result, loss, grads[0]);
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gy, gw, gb, gbw, gbb] =
        op.call(grads[0], input, target, weight, pos_weight, reduction, logits, weights, biases,
                batch_norm, bn_weights, fwd_saved, training, act, slope, ig, tg, net.wg, net.bg,
                net.bwg, net.bbg);
    if (ig) result[0] = gx;
    if (tg) result[1] = gy;
    net.place(result, gw, gb, gbw, gbb);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_bce_with_logits_autograd(
    const at::Tensor& input, const at::Tensor& target, const OptTensor& weight,
    const OptTensor& pos_weight, int64_t reduction, at::TensorList weights,
    at::TensorList biases, const c10::List<bool>& batch_norm, at::TensorList bn_weights,
    at::TensorList bn_biases, at::TensorList running_means, at::TensorList running_vars,
    bool training, double eps, int64_t activation, double negative_slope) {
  if (!records(input, target, weight, pos_weight, weights, biases, bn_weights, bn_biases,
               running_means, running_vars)) {
    static const auto op = op_handle<MlpBceSig>(HPML_OP("mlp_bce_with_logits"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, target, weight, pos_weight, reduction, weights, biases, batch_norm,
                   bn_weights, bn_biases, running_means, running_vars, training, eps,
                   activation, negative_slope);
  }
  check_running_stats("hpml::mlp_bce_with_logits", running_means, running_vars);
  variable_list r = MlpBceFn::apply(input, target, weight, pos_weight, reduction, weights,
                                    biases, batch_norm, bn_weights, bn_biases, running_means,
                                    running_vars, training, eps, activation, negative_slope);
  return {r[0], r[1], std::vector<at::Tensor>(r.begin() + 2, r.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(HPML_LIBRARY, Autograd, m) {
  m.impl("linear_act", &linear_act_autograd);
  m.impl("bce_with_logits", &bce_with_logits_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("mlp", &mlp_autograd);
  m.impl("mlp_bce_with_logits", &mlp_bce_with_logits_autograd);
}

}  // namespace hpml
