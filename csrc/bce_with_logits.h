// Host-side argument checks and preparation for hpml::bce_with_logits, shared by the CPU and the
// CUDA launchers.
#pragma once

#include <ATen/core/Reduction.h>

#include "common.h"

namespace hpml {

struct BceArgs {
  at::Tensor x, y;  // contiguous input and target
  std::optional<Bcast> w, pw;
  int64_t numel = 0;
};

inline BceArgs prepare_bce(const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  TORCH_CHECK(input.sizes() == target.sizes(), "Target size (", target.sizes(),
              ") must be the same as input size (", input.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "hpml::bce_with_logits: expected a floating-point input, got ", input.scalar_type());
  check_floating_same_dtype(input, target, "target");
  check_same_device(input, target, "target");
  TORCH_CHECK(reduction >= at::Reduction::None && reduction <= at::Reduction::Sum,
              "hpml::bce_with_logits: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  BceArgs a;
  a.x = input.contiguous();
  a.y = target.contiguous();
  a.numel = input.numel();
  if (weight.has_value() && weight->defined()) {
    check_floating_same_dtype(input, *weight, "weight");
    check_same_device(input, *weight, "weight");
    a.w = make_bcast(*weight, input.sizes(), "weight");
  }
  if (pos_weight.has_value() && pos_weight->defined()) {
    check_floating_same_dtype(input, *pos_weight, "pos_weight");
    check_same_device(input, *pos_weight, "pos_weight");
    a.pw = make_bcast(*pos_weight, input.sizes(), "pos_weight");
  }
  return a;
}

inline void check_bce_grad(const at::Tensor& grad, const at::Tensor& input, int64_t reduction) {
  check_same_device(input, grad, "grad");
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad.sizes() == input.sizes(), "hpml::bce_with_logits_backward: grad of shape ",
                grad.sizes(), " does not match the input's shape ", input.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "hpml::bce_with_logits_backward: expected a one-element grad ",
                "for a reduced loss, got shape ", grad.sizes());
  }
}

}  // namespace hpml
