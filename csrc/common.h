// Host-side helpers shared by the CPU and CUDA launchers: argument checks and the description of
// a broadcast operand. Nothing here runs per element.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "constants.h"
#include "hpml_schemas.h"  // generated from hpml_ops/ops/schema.py (build/generated/)
#ifdef HPML_EMU
#include "hpml_emu/op_scope.h"
#endif

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>

namespace hpml {

// ---- argument checks, with the messages the Python contracts (hpml_ops/ops/<op>.py) give -------
// A public function calls the C++ op straight away and lets its error through: every check a C++
// op shares with its Python contract must raise the same exception with the same words.

// torch's Python name of a dtype: "torch.float32".
inline std::string py_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    case c10::kShort: return "torch.int16";
    case c10::kChar: return "torch.int8";
    case c10::kByte: return "torch.uint8";
    case c10::kBool: return "torch.bool";
    case c10::kComplexHalf: return "torch.complex32";
    case c10::kComplexFloat: return "torch.complex64";
    case c10::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints a tuple: "(4, 6)", "(5,)", "()".
inline std::string py_shape(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  return out + (s.size() == 1 ? ",)" : ")");
}

// A float as Python's repr prints it for the values error messages show: "0.0", "-1.0", "1e-05".
// The shortest form that reads back the same, as repr does (17 digits always do).
inline std::string py_float(double v) {
  std::string s;
  for (int p = 1; p <= 17; ++p) {
    std::ostringstream t;
    t.precision(p);
    t << v;
    s = t.str();
    if (std::stod(s) == v) break;
  }
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // integral: "0" -> "0.0"
  return s;
}

// torch's batch-norm eps rule (batch_norm and the whole-MLP op's batch norms): positive in
// training, non-negative in evaluation; ValueError in torch's words.
inline void check_bn_eps(double eps, bool training) {
  TORCH_CHECK_VALUE(!training || eps > 0.0,
                    "batch_norm eps must be positive during training, but got ", py_float(eps));
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", py_float(eps));
}

// A shape as torch prints a torch.Size: "torch.Size([4, 6])".
inline std::string torch_size(at::IntArrayRef s) {
  std::string out = "torch.Size([";
  for (size_t i = 0; i < s.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  return out + "])";
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating-point ", name,
              ", got ", py_dtype(t.scalar_type()));
}

inline void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              " (the input's device), got ", t.device());
}

inline void check_same_dtype(const char* op, const at::Tensor& ref, const at::Tensor& t,
                             const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ",
              py_dtype(ref.scalar_type()), " (the input's dtype), got ", py_dtype(t.scalar_type()));
}

// t of other's shape, on ref's device in ref's dtype.
inline void check_like(const char* op, const at::Tensor& ref, const at::Tensor& t,
                       const char* name, const at::Tensor& other, const char* other_name) {
  TORCH_CHECK(t.sizes() == other.sizes(), op, ": ", name, " of shape ", py_shape(t.sizes()),
              " does not match ", other_name, " ", py_shape(other.sizes()));
  check_same_dtype(op, ref, t, name);
  check_same_device(op, ref, t, name);
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A per-channel vector (n,), floating point, on ref's device; absent passes (check.per_channel).
inline void check_per_channel(const char* op, const std::optional<at::Tensor>& t, int64_t n,
                              const at::Tensor& ref, const char* name) {
  if (!present(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " should contain ", n,
              " elements (one per channel), got shape ", py_shape(t->sizes()));
  check_floating(op, *t, name);
  check_same_device(op, ref, *t, name);
}

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

inline Bcast make_bcast(const char* op, const at::Tensor& t, at::IntArrayRef shape,
                        const char* name) {
  TORCH_CHECK(at::is_expandable_to(t.sizes(), shape), op, ": ", name, " of shape ",
              py_shape(t.sizes()), " cannot be broadcast to the input's shape ", py_shape(shape));
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

// Registers the kernels <op><suffix> of every op of a family (hpml_ops/ops/schema.py) for a
// dispatch key: HPML_REGISTER_KERNELS(batch_norm, CPU, _cpu) in csrc/batch_norm.cpp,
// HPML_REGISTER_KERNELS(batch_norm, CUDA, _cuda) in csrc/cuda/batch_norm.cu. The library is
// HPML_LIBRARY, hpml unless a build of the same sources defines another.
// In the emulated build (csrc/emu: the CUDA sources compiled as host C++, -DHPML_EMU) the CUDA
// kernels register for CPU tensors in the library hpml_emu, each inside an op scope that tells the
// emulator's checks which memory the op's kernels may touch.
#ifndef HPML_LIBRARY
#define HPML_LIBRARY hpml
#endif
// "library::name" of an op of this build's library (hpml, or hpml_emu in the emulated build).
#define HPML_STR2(x) #x
#define HPML_STR(x) HPML_STR2(x)
#define HPML_OP(name) HPML_STR(HPML_LIBRARY) "::" name
// An inline namespace of its own per built library (lib_hpml, lib_hpml_emu), for the inline and
// shared functions whose behaviour depends on the library (csrc/mlp.h's dispatcher handles, the
// fused CUDA MLP's entry points): both libraries are loaded into one process, and a function of
// the same mangled name in both is one function there (the dynamic linker binds every call to
// the first definition loaded), so without it the emulated library's per-layer MLP path called
// the real library's ops once the real one had run first.
#define HPML_NS_CAT2(a, b) a##b
#define HPML_NS_CAT(a, b) HPML_NS_CAT2(a, b)
#define HPML_LIB_NAMESPACE HPML_NS_CAT(lib_, HPML_LIBRARY)
#ifdef HPML_EMU
#define HPML_IMPL_ONE(op, suffix) m.impl(#op, &::hpml_emu::EmuOp<&op##suffix>::call);
#define HPML_REGISTER_KERNELS(family, key, suffix) \
  TORCH_LIBRARY_IMPL(HPML_LIBRARY, CPU, m) { HPML_OPS_##family(HPML_IMPL_ONE, suffix) }
#else
#define HPML_IMPL_ONE(op, suffix) m.impl(#op, &op##suffix);
#define HPML_REGISTER_KERNELS(family, key, suffix) \
  TORCH_LIBRARY_IMPL(HPML_LIBRARY, key, m) { HPML_OPS_##family(HPML_IMPL_ONE, suffix) }
#endif

// TORCH_LIBRARY(HPML_LIBRARY, m) with every schema of hpml_ops/ops/schema.py (one level of
// expansion, so that HPML_LIBRARY is replaced before TORCH_LIBRARY pastes it): csrc/ops.cpp for
// hpml, csrc/emu/module.cpp for hpml_emu.
#define HPML_DEF_ONE(name, schema) m.def(#name schema);
#define HPML_TORCH_LIBRARY(ns) \
  TORCH_LIBRARY(ns, m) { HPML_SCHEMAS(HPML_DEF_ONE) }
#define HPML_DEFINE_LIBRARY() HPML_TORCH_LIBRARY(HPML_LIBRARY)

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
