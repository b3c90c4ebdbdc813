// The run-time choice of the CPU kernels' ISA variant (csrc/cpu_dispatch.h); compiled once.
#include "cpu_dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace hpml {
namespace cpu {
namespace {

// Written while the shared object's static constructors run, before any op can be called.
int g_built = 0;
// The capability in use; -1 until the first call decides it.
std::atomic<int> g_active{-1};

// torch's capability: at::get_cpu_capability() names it ("DEFAULT", "AVX2", "AVX512", or an
// ISA of another architecture, whose kernels here are the DEFAULT ones), ATEN_CPU_CAPABILITY
// honoured.
int torch_capability() {
  const std::string s = at::get_cpu_capability();
  if (s == "AVX512") return kAvx512;
  if (s == "AVX2") return kAvx2;
  return kDefault;
}

int best_allowed() {
  const int limit = torch_capability();
  int best = kDefault;
  for (int c = 0; c <= limit; ++c)
    if (g_built & (1 << c)) best = c;
  return best;
}

}  // namespace

const char* capability_name(int cap) {
  switch (cap) {
    case kAvx2: return "AVX2";
    case kAvx512: return "AVX512";
    default: return "DEFAULT";
  }
}

void mark_built(int cap) { g_built |= 1 << cap; }
int built_capabilities() { return g_built; }

int active_capability() {
  int a = g_active.load(std::memory_order_relaxed);
  if (a < 0) {
    a = best_allowed();
    g_active.store(a, std::memory_order_relaxed);
  }
  return a;
}

int force_capability(int cap) {
  const int before = active_capability();
  if (cap < 0) {
    g_active.store(best_allowed(), std::memory_order_relaxed);
    return before;
  }
  TORCH_CHECK_VALUE(cap < kNumCapabilities && (g_built & (1 << cap)),
                    "hpml_ops: no CPU kernels were built for ", capability_name(cap));
  TORCH_CHECK_VALUE(cap <= torch_capability(), "hpml_ops: this CPU runs torch's ",
                    capability_name(torch_capability()), " kernels; ", capability_name(cap),
                    " kernels would use instructions it may not have");
  g_active.store(cap, std::memory_order_relaxed);
  return before;
}

}  // namespace cpu
}  // namespace hpml
