// The run-time choice of the CPU kernels' ISA variant (csrc/cpu_dispatch.h); compiled once.
#include "cpu_dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
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

// The best capability whose instructions this CPU has (the flags each variant is compiled with,
// setup.py): torch takes ATEN_CPU_CAPABILITY=avx512 at its word even on a CPU without AVX-512
// (seen on an AMD EPYC Zen 3), where our AVX-512 kernels would stop the process.
int hardware_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kDefault;
}

int best_allowed() {
  const int limit = std::min(torch_capability(), hardware_capability());
  int best = kDefault;
  for (int c = 0; c <= limit; ++c)
    if (g_built & (1 << c)) best = c;
  return best;
}

}  // namespace

// Measured with bench_linear_act and alternating processes, 4096x1024x1024 fp32, 2 threads
// (benchmarks/NOTES.md): on an AMD EPYC with AVX-512 (Zen 4) oneDNN's inner product ran the
// forward in 66.9 ms where MKL's sgemm (torch.addmm) took 88.5; on an AMD EPYC without it (Zen 3,
// AVX2) oneDNN's forward ran at 0.83-0.93x eager against 0.98-1.02x for MKL on the tiles; on the
// Intel Xeon (AVX-512, AMX) MKL on the tiles was faster too, also under AVX2 limits. The likely
// reason: MKL runs its AVX-512 kernels on Intel's CPUs only, so oneDNN's own AVX-512 code wins
// where only oneDNN uses it.
bool large_forward_onednn() {
  static const bool on = [] {
    const char* env = std::getenv("HPML_NO_ONEDNN");
    const std::string v = env != nullptr ? env : "";
    if (v == "1") return false;
    if (v == "0") return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();  // before __builtin_cpu_is (hardware_capability() calls it too)
    return !__builtin_cpu_is("intel") && hardware_capability() == kAvx512;
#else
    return true;
#endif
  }();
  return on;
}

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
  TORCH_CHECK_VALUE(cap <= hardware_capability(), "hpml_ops: ", capability_name(cap),
                    " kernels would use instructions this CPU does not have");
  TORCH_CHECK_VALUE(cap <= torch_capability(), "hpml_ops: this CPU runs torch's ",
                    capability_name(torch_capability()), " kernels; ", capability_name(cap),
                    " kernels would use instructions it may not have");
  g_active.store(cap, std::memory_order_relaxed);
  return before;
}

}  // namespace cpu
}  // namespace hpml
