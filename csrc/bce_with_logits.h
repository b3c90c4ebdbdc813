// Host-side argument checks and preparation for hpml::bce_with_logits, shared by the CPU and the
// CUDA launchers.
#pragma once

#include <ATen/core/Reduction.h>

#include <tuple>

#include "common.h"

namespace hpml {

struct BceArgs {
  at::Tensor x, y;  // contiguous input and target
  std::optional<Bcast> w, pw;
  int64_t numel = 0;
};

// The argument contract of hpml::bce_with_logits, the same checks in the same order with the same
// messages as the Python contract (hpml_ops/ops/bce_with_logits.py, check_args with op=True);
// then the operands as the kernels read them.
inline BceArgs prepare_bce(const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  constexpr const char* op = "binary_cross_entropy_with_logits";
  TORCH_CHECK(reduction >= at::Reduction::None && reduction <= at::Reduction::Sum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(input.sizes() == target.sizes(), "Target size (", torch_size(target.sizes()),
                    ") must be the same as input size (", torch_size(input.sizes()), ")");
  check_floating(op, input, "input");
  check_floating(op, target, "target");
  check_same_device(op, input, target, "target");
  check_same_dtype(op, input, target, "target");
  BceArgs a;
  a.x = input.contiguous();
  a.y = target.contiguous();
  a.numel = input.numel();
  for (auto [t, name, dst] : {std::tuple{&weight, "weight", &a.w},
                              std::tuple{&pos_weight, "pos_weight", &a.pw}}) {
    if (!present(*t)) continue;
    check_floating(op, **t, name);
    check_same_device(op, input, **t, name);
    check_same_dtype(op, input, **t, name);
    *dst = make_bcast(op, **t, input.sizes(), name);
  }
  return a;
}

// A loss's gradient: `like`'s shape for reduction none, else one element.
inline void check_loss_grad(const char* op, const at::Tensor& grad, int64_t reduction,
                            const at::Tensor& like, const char* like_name) {
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad.sizes() == like.sizes(), op, ": grad of shape ", py_shape(grad.sizes()),
                " does not match ", like_name, " ", py_shape(like.sizes()));
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": expected a one-element grad for a reduced loss, got "
                "shape ", py_shape(grad.sizes()));
  }
}

inline void check_bce_grad(const at::Tensor& grad, const at::Tensor& input, int64_t reduction) {
  constexpr const char* op = "hpml::bce_with_logits_backward";
  check_same_device(op, input, grad, "grad");
  check_loss_grad(op, grad, reduction, input, "the input's shape");
}

}  // namespace hpml
