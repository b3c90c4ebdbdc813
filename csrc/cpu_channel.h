// Per-channel vectors on the host (batch-norm weights, biases, statistics), shared by the CPU
// kernels of hpml::batch_norm (batch_norm.cpp) and hpml::mlp (mlp.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace hpml {

// t's first C values as acc_t (converted); C times `fill` where t is absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<acc_t> v(C, static_cast<acc_t>(fill));
  if (t.has_value() && t->defined()) {
    constexpr auto dt = c10::CppTypeToScalarType<acc_t>::value;
    if (t->scalar_type() == dt && t->is_contiguous()) {  // (no dispatcher call: ~1 us each)
      std::copy(t->const_data_ptr<acc_t>(), t->const_data_ptr<acc_t>() + C, v.begin());
    } else {
      const at::Tensor d = t->to(dt).contiguous();
      std::copy(d.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>() + C, v.begin());
    }
  }
  return v;
}

// v as a new 1-D CPU tensor of its dtype.
template <typename acc_t>
at::Tensor channel_tensor(const std::vector<acc_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<acc_t>());
  return t;
}

}  // namespace hpml
