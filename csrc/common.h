// Host-side helpers shared by the CPU and CUDA launchers: argument checks and the description of
// a broadcast operand. Nothing here runs per element.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>

namespace hpml {

// A tensor broadcast to a shape S, read as: element i of the row-major flattening of S reads
// data[(i / inner) % period]. This covers a full tensor (inner 1, period numel), a per-feature
// vector broadcast over rows (inner 1, period C), a per-row value (inner C), and a scalar
// (period 1) without materialising the broadcast. Any other pattern is materialised once.
struct Bcast {
  at::Tensor data;  // contiguous, 1-D, `period` elements
  int64_t inner = 1;
  int64_t period = 1;
  bool full(int64_t numel) const { return inner == 1 && period == numel; }
};

inline Bcast make_bcast(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(at::is_expandable_to(t.sizes(), shape), name, " of shape ", t.sizes(),
              " cannot be broadcast to the input's shape ", shape);
  at::Tensor e = t.expand(shape);
  const int64_t nd = static_cast<int64_t>(shape.size());
  const int64_t numel = c10::multiply_integers(shape);
  // Dimensions of size > 1 are either real (stride != 0) or broadcast (stride 0); the real ones
  // must form one run for the (inner, period) form.
  int64_t first = -1, last = -1;
  bool one_run = true, broadcast_after_real = false;
  for (int64_t d = 0; d < nd; ++d) {
    if (shape[d] <= 1) continue;
    if (e.stride(d) != 0) {
      if (first < 0) first = d;
      if (broadcast_after_real) one_run = false;
      last = d;
    } else if (first >= 0) {
      broadcast_after_real = true;
    }
  }
  Bcast b;
  if (first < 0) {  // one value for every element
    b.data = t.reshape({-1}).narrow(0, 0, std::min<int64_t>(1, t.numel())).contiguous();
    b.inner = std::max<int64_t>(numel, 1);
    b.period = 1;
    return b;
  }
  if (!one_run) {
    b.data = e.contiguous().reshape({-1});
    b.inner = 1;
    b.period = numel;
    return b;
  }
  at::Tensor block = e;
  int64_t inner = 1, period = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    if (d < first || d > last) {
      block = block.narrow(d, 0, 1);
      if (d > last) inner *= shape[d];
    } else {
      period *= shape[d];
    }
  }
  b.data = block.contiguous().reshape({-1});
  b.inner = inner;
  b.period = period;
  return b;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "Expected ", name, " on ", ref.device(),
              " (the input's device), got ", t.device());
}

inline void check_floating_same_dtype(const at::Tensor& ref, const at::Tensor& t,
                                      const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "Expected ", name, " of dtype ",
              ref.scalar_type(), " (the input's dtype), got ", t.scalar_type());
}

// Calls f(std::true_type) or f(std::false_type): a runtime flag made a template argument.
template <typename F>
inline void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace hpml
