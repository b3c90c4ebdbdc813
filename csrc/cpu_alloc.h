// Outputs of the CPU kernels. Large ones come from 2 MiB-aligned memory advised as transparent
// huge pages (what torch does for every allocation under THP_MEM_ALLOC_ENABLE=1): a first touch
// then faults once per 2 MiB instead of once per 4 KiB. Measured on the 2-core CI VM: writing a
// fresh 64 MB tensor costs 35-55 ms in 4 KiB pages, 11-13 ms with huge pages, 5-9 ms when the
// memory is already mapped; that fault cost was most of the CPU backward's time.
// From 4 MiB up: glibc's malloc serves blocks below its mmap threshold (which rises to the size
// of a freed mapping, up to 32 MiB on 64-bit) from its heap, but which block a 16 MB output gets
// depends on what else the program allocates and frees in between: in the benchmark, interleaved
// with eager's calls, batch norm's 4096 x 1024 fwd+bwd took 4.1-4.9 ms where it takes 3.0 ms
// alone (its outputs written to memory not in cache, or faulted afresh). From the cache below,
// the block is the one of this size freed last, in cache (3.6-4.0 ms interleaved;
// benchmarks/NOTES.md). Below 4 MiB the rounding up to 2 MiB would waste up to half a block.
#pragma once

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cmath>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hpml {

// Freed blocks are kept (up to kMaxCached bytes) and handed out again for the same rounded size,
// the last freed first, as torch's CUDA caching allocator does on the GPU: in a training loop
// every step allocates the same outputs, and a kept block is already mapped (no fault, no zeroing
// by the kernel) and, if freed recently, still in cache. Measured: a 64 MB output written into a
// kept block costs 5-9 ms against 11-13 ms fresh.
class HugePageCPUAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kThreshold = size_t(4) << 20;  // bytes
  static constexpr size_t kMaxCached = size_t(512) << 20;

  c10::DataPtr allocate(size_t n) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kThreshold) {
      const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* p = take_cached(size);
      if (p == nullptr && posix_memalign(&p, kHugePage, size) == 0) {
        madvise(p, size, MADV_HUGEPAGE);  // advice only: ignored where THP is off
      } else if (p == nullptr) {
        return c10::GetDefaultCPUAllocator()->allocate(n);
      }
      return {p, new Block{p, size}, &release, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static HugePageCPUAllocator* instance() {
    static auto* alloc = new HugePageCPUAllocator();  // never destroyed: tensors may outlive exit
    return alloc;
  }

 private:
  struct Block {
    void* p;
    size_t size;
  };

  void* take_cached(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    // The block freed last (still in cache, where a training step's next output of this size
    // is written): equal keys keep their insertion order, so the last of the range.
    const auto range = free_.equal_range(size);
    if (range.first == range.second) return nullptr;
    const auto it = std::prev(range.second);
    void* p = it->second;
    free_.erase(it);
    cached_ -= size;
    return p;
  }

  void give_back(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + size <= kMaxCached) {
        free_.emplace(size, p);
        cached_ += size;
        return;
      }
    }
    std::free(p);
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    instance()->give_back(b->p, b->size);
    delete b;
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

inline c10::Allocator* huge_page_allocator() { return HugePageCPUAllocator::instance(); }

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
