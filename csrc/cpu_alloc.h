// Outputs of the CPU kernels. Large ones come from 2 MiB-aligned memory advised as transparent
// huge pages (what torch does for every allocation under THP_MEM_ALLOC_ENABLE=1): a first touch
// then faults once per 2 MiB instead of once per 4 KiB. Measured on the 2-core CI VM: writing a
// fresh 64 MB tensor costs 35-55 ms in 4 KiB pages, 11-13 ms with huge pages, 5-9 ms when the
// memory is already mapped; that fault cost was most of the CPU backward's time.
// Only from 32 MiB up: glibc's malloc serves smaller blocks from its heap, reused without faults
// once its mmap threshold has risen (it rises to the size of a freed mapping, up to 32 MiB on
// 64-bit), where an aligned huge-page block would be mapped and zeroed afresh each time
// (measured: 5.8 ms for a 16 MB backward this way vs 0.95 ms for torch.empty + fill).
#pragma once

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cmath>
#include <cstdlib>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hpml {

class HugePageCPUAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kThreshold = size_t(32) << 20;

  c10::DataPtr allocate(size_t n) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kThreshold) {
      const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* p = nullptr;
      if (posix_memalign(&p, kHugePage, size) == 0) {
        madvise(p, size, MADV_HUGEPAGE);  // advice only: ignored where THP is off
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) { std::free(p); }
};

inline c10::Allocator* huge_page_allocator() {
  static HugePageCPUAllocator alloc;
  return &alloc;
}

// at::empty for a CPU output, from the allocator above. Honours torch's deterministic mode the way
// at::empty does (uninitialised floating memory filled with NaN), so a test that poisons outputs
// that way still sees every element we fail to write.
inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, c10::ScalarType dtype) {
  at::Tensor t = at::detail::empty_generic(
      sizes, huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
      std::nullopt);
  if (at::globalContext().deterministicAlgorithms() &&
      at::globalContext().deterministicFillUninitializedMemory() &&
      at::isFloatingType(dtype)) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

}  // namespace hpml
