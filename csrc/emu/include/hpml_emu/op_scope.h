// The CUDA emulator's op boundary: which memory the kernels of one op may touch, and the
// registration wrapper that sets it up (HPML_REGISTER_KERNELS in the emulated build).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace hpml_emu {

// While an OpScope is alive on a thread, the kernels that thread launches may touch the tensors
// added to it (their views' extents) and whatever the CPU allocator hands out meanwhile; any other
// global access is reported as out of bounds.
class OpScope {
 public:
  struct Range {
    uintptr_t lo, hi;
  };
  OpScope();
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  void add(uintptr_t lo, uintptr_t hi);
  void add(const at::Tensor& t);
  void add(const std::optional<at::Tensor>& t) {
    if (t.has_value()) add(*t);
  }
  // Tensor[] arguments (the whole-MLP ops' weights, biases, saved tensors, ...).
  void add(at::TensorList ts) {
    for (const at::Tensor& t : ts) add(t);
  }
  template <typename T>
  void add(const T&) {}
  // The range with the largest start <= a, or nullptr.
  const Range* find(uintptr_t a);

 private:
  OpScope* prev_;
  std::vector<Range> ranges_;
  bool sorted_ = true;
};

// op(args...) inside an OpScope holding its tensor arguments: what the emulated build registers.
template <auto F>
struct EmuOp;
template <typename R, typename... A, R (*F)(A...)>
struct EmuOp<F> {
  static R call(A... args) {
    OpScope scope;
    (scope.add(args), ...);
    return F(std::forward<A>(args)...);
  }
};

// The CPU allocator wrapped to record an op's allocations; false if another allocator of higher
// priority is installed (then global accesses are not checked).
bool install_allocator();
void set_seed(uint64_t seed);
std::vector<std::pair<const char*, uint64_t>> stats();
// The kernels launched so far, as offsets of their code from the library's load address (the
// symbol values of the library file).
std::vector<uint64_t> launched_kernels();

}  // namespace hpml_emu
