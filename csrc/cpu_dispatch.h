// Run-time choice of the CPU kernels' vector ISA, as ATen's DispatchStub makes it.
//
// Each file of CPU kernels (csrc/<op>.cpp, the ones that end in HPML_REGISTER_CPU_KERNELS) is
// compiled once per capability that setup.py builds: DEFAULT (the compiler's baseline for the
// architecture, so it builds wherever torch does) with the other sources, and AVX2 and AVX-512
// each again into objects of their own, with that ISA's flags and CPU_CAPABILITY set to its name.
// Every compilation fills its capability's slot of each op; the DEFAULT one also registers, for
// the CPU dispatch key, a trampoline that calls the slot of the capability in use:
// torch's (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), capped at the best built.
//
// What keeps the variants apart in one shared object: the kernels live in each file's anonymous
// namespace, and the headers whose code depends on the vector width (cpu_vec.h, cpu_epilogue.h,
// hpml_math.h) put it in `inline namespace CPU_CAPABILITY`, as at::vec does, so that their
// symbols differ per variant. Code that is the same in every variant (argument checks, the
// standard library) is merged by the linker; setup.py links the DEFAULT objects first, so that
// the copy kept is one that runs on every CPU (GNU ld keeps the first of identical COMDATs).
#pragma once

#include <cstdint>
#include <utility>

#include "hpml_schemas.h"

namespace hpml {
namespace cpu {

enum Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kNumCapabilities = 3 };

// "DEFAULT", "AVX2", "AVX512": torch's names (torch.backends.cpu.get_cpu_capability()).
const char* capability_name(int cap);
// The capability whose kernels run: the best built that torch's capability allows (see above).
// Read on every call of an op: a load of a global after the first call.
int active_capability();
// Tests: run the kernels of `cap` (at most torch's capability and built), or go back to the
// choice above with -1. Returns the capability in use before. Not for use while ops run.
int force_capability(int cap);
// Bit c set when the kernels of capability c were built (they registered their slots).
int built_capabilities();
void mark_built(int cap);

// Whether the large fp32 linear forwards (csrc/linear_act.cpp) go to oneDNN's inner product,
// where this torch has it, rather than to the tiled products over torch's BLAS (csrc/cpu_blas.h):
// by default only on an x86 CPU other than Intel's with AVX-512 (and off x86); HPML_NO_ONEDNN=1
// never, =0 always. Decided once; hpml_ops._C._large_forward_onednn() reports it.
bool large_forward_onednn();

// One tag type per op (incomplete, the same in every translation unit): the key of its slots.
namespace tag {
#define HPML_CPU_TAG(name, schema) struct name;
HPML_SCHEMAS(HPML_CPU_TAG)
#undef HPML_CPU_TAG
}  // namespace tag

// The kernel of each capability, for op Tag (a function pointer; null where not built).
template <typename Tag>
struct Slots {
  static inline void* fn[kNumCapabilities] = {};
};

// What the DEFAULT compilation registers for an op: calls the kernel of the capability in use.
template <typename Tag, typename Fn>
struct Trampoline;
template <typename Tag, typename R, typename... A>
struct Trampoline<Tag, R (*)(A...)> {
  static R call(A... args) {
    using Fn = R (*)(A...);
    void* f = Slots<Tag>::fn[active_capability()];
    // Every kernel file is built for the same variants; should one not be, its DEFAULT kernel
    // runs rather than nothing.
    if (f == nullptr) f = Slots<Tag>::fn[kDefault];
    return reinterpret_cast<Fn>(f)(std::forward<A>(args)...);
  }
};

}  // namespace cpu
}  // namespace hpml

// The capability this compilation builds (setup.py defines one of these for every compilation of
// the CPU kernel files; anything else is the DEFAULT build).
#if defined(CPU_CAPABILITY_AVX512)
#define HPML_CPU_CAP ::hpml::cpu::kAvx512
#elif defined(CPU_CAPABILITY_AVX2)
#define HPML_CPU_CAP ::hpml::cpu::kAvx2
#else
#define HPML_CPU_CAP ::hpml::cpu::kDefault
#define HPML_CPU_CAP_IS_DEFAULT 1
#endif

// In a file of CPU kernels, after them: HPML_REGISTER_CPU_KERNELS(batch_norm) fills this
// compilation's slot of each op of the family with <op>_cpu, and in the DEFAULT compilation
// registers the trampolines with torch.
#define HPML_CPU_SLOT_ONE(op, unused)                                                   \
  [[maybe_unused]] const bool op##_slot_filled = [] {                                  \
    ::hpml::cpu::Slots<::hpml::cpu::tag::op>::fn[HPML_CPU_CAP] =                        \
        reinterpret_cast<void*>(&op##_cpu);                                             \
    ::hpml::cpu::mark_built(HPML_CPU_CAP);                                              \
    return true;                                                                        \
  }();
#define HPML_CPU_IMPL_ONE(op, unused) \
  m.impl(#op, &::hpml::cpu::Trampoline<::hpml::cpu::tag::op, decltype(&op##_cpu)>::call);
#ifdef HPML_CPU_CAP_IS_DEFAULT
#define HPML_REGISTER_CPU_KERNELS(family)                  \
  namespace {                                              \
  HPML_OPS_##family(HPML_CPU_SLOT_ONE, )                   \
  }                                                        \
  TORCH_LIBRARY_IMPL(HPML_LIBRARY, CPU, m) { HPML_OPS_##family(HPML_CPU_IMPL_ONE, ) }
#else
#define HPML_REGISTER_CPU_KERNELS(family) \
  namespace {                             \
  HPML_OPS_##family(HPML_CPU_SLOT_ONE, )  \
  }
#endif
