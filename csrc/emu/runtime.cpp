// The CUDA emulator's engine: fibers for the threads of a block, the scheduler (barriers, warp
// collectives, seeded orders), the memory checks behind the instrumentation call-backs, the op
// scope that says which memory a kernel may touch, and WMMA's collective product.
//
// This file is compiled without instrumentation; the kernels' files (csrc/cuda/*.cu, compiled as
// host C++ by the wrappers setup.py generates) are compiled with GCC's -fsanitize=thread
// instrumentation but without its run-time library, so every load and store of theirs calls
// __tsan_{read,write}N below. Outside a kernel (the launchers' host code) those return at once.
//
// Memory classes, checked in this order for an access of kernel code:
//   the thread's own stack   always fine (locals, parameters);
//   shared memory            the emulated library's .bss (its only zero-initialised statics are
//                            the kernels' __shared__ arrays): per-byte shadow state finds reads of
//                            bytes no thread of the block wrote, and two threads touching the same
//                            byte between two barriers, one of them writing;
//   global memory            must lie inside a tensor of the op: its tensor arguments (the view's
//                            extent) and whatever it allocated while it ran (the CPU allocator is
//                            wrapped to record that). One element past the end is caught.
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "hpml_emu/op_scope.h"
#include "hpml_emu/runtime.h"

namespace hpml_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr uint16_t kMulti = 0xffff;  // shadow: read by more than one thread
constexpr int kMma = 100;            // the collective kind of wmma::mma_sync

enum class St : uint8_t { Runnable, Barrier, Warp, Done };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  char* stack_lo = nullptr;  // usable stack [lo, hi)
  char* stack_hi = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0, lane = 0, warp = 0;
  St state = St::Done;
  int suppress = 1;    // >0: accesses are not the kernel's (not checked)
  bool atomic = false;  // inside an atomic read-modify-write
  // The pending warp collective.
  int kind = 0;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  const char* what = "";
  void* mma[4] = {nullptr, nullptr, nullptr, nullptr};  // d, a, b, c
  bool mma_bf16[2] = {false, false};
};

struct Launch {
  const char* name = "";
  dim3 grid, block;
  uint3 bidx{0, 0, 0};
  const void* args = nullptr;
  void* kernel = nullptr;
  Entry entry = nullptr;
  int nthreads = 0;
  std::string error;
  std::mt19937_64 rng;
  uint16_t wmma_maps[3][256];
};

struct Shadow {
  uint32_t init = 0;    // block serial of the last write (0: never)
  uint32_t wepoch = 0;  // epoch (barrier interval) of the last write
  uint32_t repoch = 0;  // epoch of the last read
  uint16_t writer = 0, reader = 0;
};

std::mutex g_mutex;  // one emulated launch at a time (shared memory is one set of statics)
Launch* g_launch = nullptr;
std::vector<Fiber> g_fibers;
void* g_sched_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_ctx;
#endif
thread_local Fiber* t_fiber = nullptr;
thread_local OpScope* t_scope = nullptr;

uint32_t g_block_serial = 0;  // one per block run: shadow init marks
uint32_t g_epoch = 0;         // one per barrier interval of any block: race marks
uintptr_t g_bss_lo = 0, g_bss_hi = 0;
std::vector<Shadow> g_shadow;
uint64_t g_seed = 0, g_launch_count = 0;
bool g_check_global = false;  // the allocator is wrapped: an op's allocations are known

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, accesses = 0;
  uint64_t shared_accesses = 0, global_accesses = 0;
} g_stats;
std::set<uintptr_t> g_launched;  // the kernels launched so far (addresses)

}  // namespace
}  // namespace hpml_emu

// ---- context switch ---------------------------------------------------------------------------
#if defined(__x86_64__)
// hpml_emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer in *save, switches to the stack `to` and restores
// what was saved there. A new fiber's stack is laid out so that the restore "returns" into
// hpml_emu_fiber_start with the fiber in r12.
extern "C" void hpml_emu_switch(void** save, void* to);
extern "C" void hpml_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl hpml_emu_switch
  .hidden hpml_emu_switch
  .type hpml_emu_switch, @function
hpml_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hpml_emu_switch, .-hpml_emu_switch

  .p2align 4
  .globl hpml_emu_fiber_start
  .hidden hpml_emu_fiber_start
  .type hpml_emu_fiber_start, @function
hpml_emu_fiber_start:
  movq %r12, %rdi
  call hpml_emu_fiber_main
  ud2
  .size hpml_emu_fiber_start, .-hpml_emu_fiber_start
)");
#endif

namespace hpml_emu {
namespace {

void fiber_body(Fiber* f);

}  // namespace
}  // namespace hpml_emu

extern "C" __attribute__((visibility("hidden"), used)) void hpml_emu_fiber_main(void* f) {
  hpml_emu::fiber_body(static_cast<hpml_emu::Fiber*>(f));
}

namespace hpml_emu {
namespace {

#if !defined(__x86_64__)
void ucontext_entry(unsigned lo, unsigned hi) {
  const uintptr_t p = (static_cast<uintptr_t>(hi) << 32) | lo;
  fiber_body(reinterpret_cast<Fiber*>(p));
}
#endif

void allocate_stack(Fiber& f) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(mem != MAP_FAILED, "hpml_emu: cannot map a fiber stack");
  mprotect(mem, page, PROT_NONE);  // a guard page below: an overflow faults
  f.stack_lo = static_cast<char*>(mem) + page;
  f.stack_hi = f.stack_lo + kStackBytes;
}

void init_fiber(Fiber& f) {
  if (f.stack_lo == nullptr) allocate_stack(f);
  f.state = St::Runnable;
  f.suppress = 1;
  f.atomic = false;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t(15));
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fcw) << 32);  // restored by ldmxcsr / fldcw
  sp[1] = 0;                                             // r15
  sp[2] = 0;                                             // r14
  sp[3] = 0;                                             // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);                // r12: the fiber
  sp[5] = 0;                                             // rbx
  sp[6] = 0;                                             // rbp
  sp[7] = reinterpret_cast<uint64_t>(&hpml_emu_fiber_start);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack_lo;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
              static_cast<unsigned>(p & 0xffffffffu), static_cast<unsigned>(p >> 32));
#endif
}

void resume(Fiber& f) {
  ++g_stats.switches;
  t_fiber = &f;
#if defined(__x86_64__)
  hpml_emu_switch(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched_ctx, &f.ctx);
#endif
  t_fiber = nullptr;
}

void yield(Fiber& f) {
#if defined(__x86_64__)
  hpml_emu_switch(&f.sp, g_sched_sp);
#else
  swapcontext(&f.ctx, &g_sched_ctx);
#endif
}

std::string dim_str(unsigned x, unsigned y, unsigned z) {
  std::ostringstream s;
  s << "(" << x << ", " << y << ", " << z << ")";
  return s.str();
}

std::string where(const Fiber& f) {
  const Launch& L = *g_launch;
  return "kernel " + std::string(L.name) + ", block " + dim_str(L.bidx.x, L.bidx.y, L.bidx.z) +
         ", thread " + dim_str(f.tid.x, f.tid.y, f.tid.z);
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%lx", static_cast<unsigned long>(a));
  return buf;
}

// Records the first error of the launch, if none yet, and leaves the fiber for good.
[[noreturn]] void fail(Fiber& f, const std::string& what) {
  if (g_launch->error.empty()) g_launch->error = "hpml_emu: " + where(f) + ": " + what;
  f.suppress = 1;
  f.state = St::Done;
  yield(f);
  std::abort();  // never resumed
}

void fail_block(const std::string& what) {
  if (!g_launch->error.empty()) return;
  const Launch& L = *g_launch;
  g_launch->error = "hpml_emu: kernel " + std::string(L.name) + ", block " +
                    dim_str(L.bidx.x, L.bidx.y, L.bidx.z) + ": " + what;
}

std::string thread_str(int linear) {
  const Fiber& f = g_fibers[linear];
  return "thread " + dim_str(f.tid.x, f.tid.y, f.tid.z);
}

void fiber_body(Fiber* f) {
  for (;;) {
    f->suppress = 1;
    try {
      g_launch->entry(g_launch->args, g_launch->kernel);
    } catch (const std::exception& e) {
      fail(*f, std::string("an exception escaped the kernel: ") + e.what());
    } catch (...) {
      fail(*f, "an exception escaped the kernel");
    }
    f->suppress = 1;
    f->state = St::Done;
    yield(*f);
  }
}

// ---- memory checks --------------------------------------------------------------------------

std::string shared_str(uintptr_t a, size_t n) {
  return std::to_string(n) + " bytes at shared " + hex(a) + " (byte " +
         std::to_string(a - g_bss_lo) + " of the emulated library's shared memory)";
}

void shared_access(Fiber& f, uintptr_t a, size_t n, bool write) {
  if (g_shadow.empty()) g_shadow.resize(g_bss_hi - g_bss_lo);
  const auto me = static_cast<uint16_t>(f.linear);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = g_shadow[a + i - g_bss_lo];
    if (!write || f.atomic) {
      if (s.init != g_block_serial) {
        fail(f, "reads " + shared_str(a, n) +
                    " that no thread of this block wrote (uninitialised shared memory)");
      }
    }
    if (f.atomic) {
      s.init = g_block_serial;
      continue;
    }
    if (write) {
      if (s.wepoch == g_epoch && s.writer != me) {
        fail(f, "writes " + shared_str(a, n) + " that " + thread_str(s.writer) +
                    " wrote since the last __syncthreads (a shared-memory race)");
      }
      if (s.repoch == g_epoch && s.reader != me) {
        fail(f, "writes " + shared_str(a, n) + " that " +
                    (s.reader == kMulti ? std::string("other threads")
                                        : thread_str(s.reader)) +
                    " read since the last __syncthreads (a shared-memory race)");
      }
      s.wepoch = g_epoch;
      s.writer = me;
      s.init = g_block_serial;
    } else {
      if (s.wepoch == g_epoch && s.writer != me) {
        fail(f, "reads " + shared_str(a, n) + " that " + thread_str(s.writer) +
                    " wrote since the last __syncthreads (a shared-memory race)");
      }
      if (s.repoch != g_epoch) {
        s.repoch = g_epoch;
        s.reader = me;
      } else if (s.reader != me) {
        s.reader = kMulti;
      }
    }
  }
}

void global_access(Fiber& f, uintptr_t a, size_t n, bool write) {
  OpScope* scope = t_scope;
  // A launch outside an emulated op, or allocations not recorded: nothing to check against.
  if (scope == nullptr || !g_check_global) return;
  const OpScope::Range* r = scope->find(a);
  if (r != nullptr && a + n <= r->hi) return;
  std::string near;
  if (r != nullptr && a < r->hi) {
    near = "; it runs past the end of the tensor [" + hex(r->lo) + ", " + hex(r->hi) + ")";
  } else if (r != nullptr) {
    near = "; the nearest tensor below, [" + hex(r->lo) + ", " + hex(r->hi) + "), ends " +
           std::to_string(a - r->hi) + " bytes before it";
  }
  fail(f, std::string(write ? "writes " : "reads ") + std::to_string(n) + " bytes at " + hex(a) +
              ", outside every tensor of the op (out of bounds)" + near);
}

inline void access(uintptr_t a, size_t n, bool write) {
  Fiber* f = t_fiber;
  if (f == nullptr || f->suppress > 0) return;
  ++g_stats.accesses;
  if (a >= reinterpret_cast<uintptr_t>(f->stack_lo) &&
      a + n <= reinterpret_cast<uintptr_t>(f->stack_hi)) {
    return;
  }
  if (a >= g_bss_lo && a + n <= g_bss_hi) {
    ++g_stats.shared_accesses;
    shared_access(*f, a, n, write);
    return;
  }
  ++g_stats.global_accesses;
  global_access(*f, a, n, write);
}

// ---- warp collectives -----------------------------------------------------------------------

const char* state_str(St s) {
  switch (s) {
    case St::Barrier: return "waits at __syncthreads";
    case St::Done: return "has exited";
    case St::Warp: return "waits at another warp collective";
    default: return "is running";
  }
}

std::string mask_str(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", m);
  return buf;
}

void wmma_product(Fiber* lanes[32]);

// Completes the collective of the lanes of `mask` (all pending with the same call); returns false
// after recording an error.
bool complete(Fiber* lanes[32], unsigned mask) {
  Fiber& first = *lanes[__builtin_ctz(mask)];
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1)) continue;
    Fiber& o = *lanes[l];
    if (o.kind != first.kind || o.mask != first.mask || o.width != first.width) {
      fail_block(std::string(first.what) + ": lane " + std::to_string(first.lane) + " of warp " +
                 std::to_string(first.warp) + " calls it with mask " + mask_str(first.mask) +
                 ", but lane " + std::to_string(l) + " named in the mask calls " + o.what +
                 " with mask " + mask_str(o.mask) + " (the lanes of a mask must make one call)");
      return false;
    }
  }
  if (first.kind == kMma) {
    wmma_product(lanes);
  }
  const int w = first.width;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1)) continue;
    Fiber& me = *lanes[l];
    const int seg = l & ~(w - 1);
    int src = l;
    bool shuffled = true;
    switch (static_cast<Coll>(me.kind)) {
      case Coll::ShflIdx: src = seg + (me.arg & (w - 1)); break;
      case Coll::ShflUp: src = (l - seg) >= me.arg ? l - me.arg : l; break;
      case Coll::ShflDown: src = (l - seg) + me.arg < w ? l + me.arg : l; break;
      case Coll::ShflXor: src = ((l ^ me.arg) & ~(w - 1)) == seg ? (l ^ me.arg) : l; break;
      default: shuffled = false;
    }
    if (src < seg || src >= seg + w) src = l;  // outside the lane's segment: its own value
    if (shuffled) {
      if (!((mask >> src) & 1)) {
        fail_block(std::string(me.what) + ": lane " + std::to_string(l) + " of warp " +
                   std::to_string(me.warp) + " reads the value of lane " + std::to_string(src) +
                   ", which the mask " + mask_str(mask) + " leaves out (undefined on a GPU)");
        return false;
      }
      me.result = lanes[src]->value;
      continue;
    }
    switch (static_cast<Coll>(me.kind)) {
      case Coll::Ballot:
      case Coll::Any:
      case Coll::All: {
        unsigned bits = 0;
        for (int k = 0; k < 32; ++k)
          if (((mask >> k) & 1) && lanes[k]->value) bits |= 1u << k;
        me.result = me.kind == static_cast<int>(Coll::Ballot) ? bits
                    : me.kind == static_cast<int>(Coll::Any)  ? (bits != 0)
                                                              : (bits == mask);
        break;
      }
      case Coll::Uniform:
        if (me.value != first.value) {
          fail_block(std::string(me.what) + ": lanes " + std::to_string(first.lane) + " and " +
                     std::to_string(l) + " of warp " + std::to_string(me.warp) +
                     " pass different arguments (a warp-wide call takes one pointer and leading "
                     "dimension)");
          return false;
        }
        me.result = 0;
        break;
      default: me.result = 0;
    }
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1) lanes[l]->state = St::Runnable;
  return true;
}

// The lanes of warp w of the block (nullptr past the block's last thread).
void warp_lanes(int w, Fiber* lanes[32]) {
  for (int l = 0; l < 32; ++l) {
    const int i = w * 32 + l;
    lanes[l] = i < g_launch->nthreads ? &g_fibers[i] : nullptr;
  }
}

// Completes every collective whose lanes have all arrived; true if any did.
bool complete_collectives() {
  bool any = false;
  const int nwarps = (g_launch->nthreads + 31) / 32;
  Fiber* lanes[32];
  for (int w = 0; w < nwarps; ++w) {
    warp_lanes(w, lanes);
    unsigned pending = 0;
    for (int l = 0; l < 32; ++l)
      if (lanes[l] != nullptr && lanes[l]->state == St::Warp) pending |= 1u << l;
    while (pending != 0) {
      const int l = __builtin_ctz(pending);
      const unsigned mask = lanes[l]->mask;
      for (int k = 0; k < 32; ++k) {
        if (((mask >> k) & 1) && lanes[k] == nullptr) {
          fail_block(std::string(lanes[l]->what) + ": lane " + std::to_string(l) + " of warp " +
                     std::to_string(w) + " names lane " + std::to_string(k) + " in its mask " +
                     mask_str(mask) + ", past the block's " +
                     std::to_string(g_launch->nthreads) + " threads");
          return false;
        }
      }
      if ((mask & pending) == mask) {
        if (!complete(lanes, mask)) return false;
        any = true;
      }
      pending &= ~(mask | (1u << l));
    }
  }
  return any;
}

// All live threads wait at the barrier: release them (a new barrier interval). True if released.
bool release_barrier() {
  const int n = g_launch->nthreads;
  int at = 0, done = 0, other = 0, first_done = -1;
  for (int i = 0; i < n; ++i) {
    switch (g_fibers[i].state) {
      case St::Barrier: ++at; break;
      case St::Done:
        if (first_done < 0) first_done = i;
        ++done;
        break;
      default: ++other;
    }
  }
  if (at == 0 || other > 0) return false;
  if (done > 0) {
    fail_block("__syncthreads: " + std::to_string(at) + " threads wait at a barrier that " +
               thread_str(first_done) + " (and " + std::to_string(done - 1) +
               " others) exited without reaching (every thread of a block must reach it)");
    return false;
  }
  for (int i = 0; i < n; ++i) g_fibers[i].state = St::Runnable;
  ++g_epoch;
  return true;
}

// Nothing can run: say why.
void diagnose_deadlock() {
  const int nwarps = (g_launch->nthreads + 31) / 32;
  Fiber* lanes[32];
  for (int w = 0; w < nwarps; ++w) {
    warp_lanes(w, lanes);
    for (int l = 0; l < 32; ++l) {
      if (lanes[l] == nullptr || lanes[l]->state != St::Warp) continue;
      const unsigned mask = lanes[l]->mask;
      for (int k = 0; k < 32; ++k) {
        if (!((mask >> k) & 1) || lanes[k] == nullptr || lanes[k]->state == St::Warp) continue;
        fail_block(std::string(lanes[l]->what) + ": lane " + std::to_string(l) + " of warp " +
                   std::to_string(w) + " calls it with mask " + mask_str(mask) + ", but lane " +
                   std::to_string(k) + " named in the mask " + state_str(lanes[k]->state) +
                   " (the mask must name exactly the lanes that make the call)");
        return;
      }
    }
  }
  fail_block("deadlock: no thread can run");
}

void run_block() {
  const int n = g_launch->nthreads;
  const dim3 b = g_launch->block;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    init_fiber(f);
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.tid = uint3{static_cast<unsigned>(i) % b.x, (static_cast<unsigned>(i) / b.x) % b.y,
                  static_cast<unsigned>(i) / (b.x * b.y)};
  }
  ++g_block_serial;
  ++g_epoch;
  ++g_stats.blocks;
  g_stats.threads += n;
  std::vector<int> order;
  order.reserve(n);
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (g_fibers[i].state == St::Runnable) order.push_back(i);
    if (!order.empty()) {
      std::shuffle(order.begin(), order.end(), g_launch->rng);
      for (int i : order) {
        resume(g_fibers[i]);
        if (!g_launch->error.empty()) return;
      }
      continue;
    }
    bool all_done = true;
    for (int i = 0; i < n; ++i) all_done = all_done && g_fibers[i].state == St::Done;
    if (all_done) return;
    if (complete_collectives()) continue;
    if (!g_launch->error.empty()) return;
    if (release_barrier()) continue;
    if (!g_launch->error.empty()) return;
    diagnose_deadlock();
    return;
  }
}

void draw_wmma_maps(Launch& L) {
  for (auto& map : L.wmma_maps) {
    for (int i = 0; i < 256; ++i) map[i] = static_cast<uint16_t>(i);
    std::shuffle(std::begin(map), std::end(map), L.rng);
  }
}

float half_bits(uint16_t b, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(b, c10::Half::from_bits()));
}

// D = A B + C of the warp, from every lane's fragments (the maps say which element each holds).
void wmma_product(Fiber* lanes[32]) {
  const Launch& L = *g_launch;
  float A[256], B[256], C[256];
  for (int l = 0; l < 32; ++l) {
    const Fiber& f = *lanes[l];
    const auto* a = static_cast<const uint16_t*>(f.mma[1]);
    const auto* b = static_cast<const uint16_t*>(f.mma[2]);
    const auto* c = static_cast<const float*>(f.mma[3]);
    for (int i = 0; i < 8; ++i) {
      A[L.wmma_maps[0][l * 8 + i]] = half_bits(a[i], f.mma_bf16[0]);
      B[L.wmma_maps[1][l * 8 + i]] = half_bits(b[i], f.mma_bf16[1]);
      C[L.wmma_maps[2][l * 8 + i]] = c[i];
    }
  }
  float D[256];
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      float acc = C[r * 16 + c];
      for (int k = 0; k < 16; ++k) acc = std::fma(A[r * 16 + k], B[k * 16 + c], acc);
      D[r * 16 + c] = acc;
    }
  }
  for (int l = 0; l < 32; ++l) {
    auto* d = static_cast<float*>(lanes[l]->mma[0]);
    for (int i = 0; i < 8; ++i) d[i] = D[L.wmma_maps[2][l * 8 + i]];
  }
}

// The .bss range of this library: its only zero-initialised statics that kernel code touches are
// the __shared__ arrays.
int find_bss(struct dl_phdr_info* info, size_t, void* data) {
  const auto self = reinterpret_cast<uintptr_t>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (self < lo || self >= hi) continue;
    // `self` is a .bss variable of this library: its writable segment ends with .bss.
    g_bss_lo = info->dlpi_addr + ph.p_vaddr + ph.p_filesz;
    g_bss_hi = hi;
    return 1;
  }
  return 0;
}

// A zero-initialised static of this library, to find its .bss.
char g_bss_anchor[16];

}  // namespace

// ---- the device-side API ---------------------------------------------------------------------

uint3 thread_idx() noexcept { return t_fiber->tid; }
int lane_id() noexcept { return t_fiber->lane; }
uint3 block_idx() noexcept { return g_launch->bidx; }
dim3 block_dim() noexcept { return g_launch->block; }
dim3 grid_dim() noexcept { return g_launch->grid; }
void threadfence() noexcept {}

void syncthreads() {
  Fiber& f = *t_fiber;
  f.state = St::Barrier;
  yield(f);
}

uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* what) {
  Fiber& f = *t_fiber;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(f, std::string(what) + ": width " + std::to_string(width) +
                " is not a power of 2 from 1 to 32");
  }
  if (!((mask >> f.lane) & 1)) {
    fail(f, std::string(what) + ": lane " + std::to_string(f.lane) + " calls it with mask " +
                mask_str(mask) + ", which leaves the calling lane out");
  }
  f.kind = static_cast<int>(kind);
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.what = what;
  f.state = St::Warp;
  yield(f);
  return f.result;
}

void atomic_begin(const void*, size_t) { t_fiber->atomic = true; }
void atomic_end() noexcept { t_fiber->atomic = false; }

void wmma_positions(int use, uint16_t pos[8]) noexcept {
  std::memcpy(pos, g_launch->wmma_maps[use] + t_fiber->lane * 8, 8 * sizeof(uint16_t));
}

void wmma_mma(float* d, const uint16_t* a, const uint16_t* b, const float* c, bool a_bf16,
              bool b_bf16) {
  Fiber& f = *t_fiber;
  f.mma[0] = d;
  f.mma[1] = const_cast<uint16_t*>(a);
  f.mma[2] = const_cast<uint16_t*>(b);
  f.mma[3] = const_cast<float*>(c);
  f.mma_bf16[0] = a_bf16;
  f.mma_bf16[1] = b_bf16;
  f.kind = kMma;
  f.mask = 0xffffffffu;
  f.width = 32;
  f.what = "wmma::mma_sync";
  f.state = St::Warp;
  yield(f);
}

void enter_kernel() noexcept { t_fiber->suppress = 0; }

// The kernel's name from gpu::launch's __PRETTY_FUNCTION__: "... [with auto kKernel = <the
// kernel>; ...]" (the whole string when it is not that).
std::string kernel_name(const char* pretty) {
  std::string k = pretty;
  const size_t at = k.find("kKernel = ");
  if (at == std::string::npos) return k;
  k = k.substr(at + 10);
  k = k.substr(0, std::min(k.find(';'), k.find(']')));
  if (!k.empty() && k[0] == '&') k = k.substr(k.size() > 1 && k[1] == ' ' ? 2 : 1);
  for (const std::string junk : {"hpml::{anonymous}::", "{anonymous}::", "hpml::"}) {
    for (size_t p; (p = k.find(junk)) != std::string::npos;) k.erase(p, junk.size());
  }
  return k;
}

void launch_grid(const char* pretty, dim3 grid, dim3 block, size_t smem, const void* args,
                 void* kernel, Entry entry) {
  const std::string name = kernel_name(pretty);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && block.x <= 1024 && block.y <= 1024 &&
                  block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 &&
                  grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "hpml_emu: kernel ", name, ": invalid launch configuration, grid ",
              dim_str(grid.x, grid.y, grid.z), ", block ", dim_str(block.x, block.y, block.z),
              " (CUDA: invalid configuration argument)");
  TORCH_CHECK(smem == 0, "hpml_emu: kernel ", name,
              ": dynamic shared memory is not emulated (", smem, " bytes asked for)");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_bss_lo == 0) dl_iterate_phdr(&find_bss, g_bss_anchor);
  if (g_fibers.empty()) g_fibers.resize(kMaxThreads);
  Launch L;
  L.name = name.c_str();
  L.grid = grid;
  L.block = block;
  L.args = args;
  L.kernel = kernel;
  L.entry = entry;
  L.nthreads = static_cast<int>(threads);
  L.rng.seed(g_seed * 0x9e3779b97f4a7c15ull + (++g_launch_count));
  draw_wmma_maps(L);
  g_launch = &L;
  ++g_stats.launches;
  g_launched.insert(reinterpret_cast<uintptr_t>(kernel));
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), L.rng);
  for (uint64_t b : order) {
    L.bidx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block();
    if (!L.error.empty()) break;
  }
  g_launch = nullptr;
  TORCH_CHECK(L.error.empty(), L.error);
}

// ---- the op scope and the allocator behind it ---------------------------------------------------

OpScope::OpScope() : prev_(t_scope) { t_scope = this; }
OpScope::~OpScope() { t_scope = prev_; }

void OpScope::add(uintptr_t lo, uintptr_t hi) {
  if (hi <= lo) return;
  ranges_.push_back({lo, hi});
  sorted_ = false;
}

void OpScope::add(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0 || t.data_ptr() == nullptr) return;
  int64_t lo = 0, hi = 0;  // element offsets of the view's first and last element
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = (t.size(d) - 1) * t.stride(d);
    (span < 0 ? lo : hi) += span;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  add(base + lo * item, base + (hi + 1) * item);
}

const OpScope::Range* OpScope::find(uintptr_t a) {
  if (!sorted_) {
    std::sort(ranges_.begin(), ranges_.end(),
              [](const Range& x, const Range& y) { return x.lo < y.lo; });
    std::vector<Range> merged;
    for (const Range& r : ranges_) {
      if (!merged.empty() && r.lo <= merged.back().hi) {
        merged.back().hi = std::max(merged.back().hi, r.hi);
      } else {
        merged.push_back(r);
      }
    }
    ranges_ = std::move(merged);
    sorted_ = true;
  }
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), a,
                             [](uintptr_t v, const Range& r) { return v < r.lo; });
  if (it == ranges_.begin()) return nullptr;
  return &*(it - 1);
}

namespace {

// The CPU allocator, wrapped: what an op allocates while it runs (outputs, workspaces, copies) is
// memory its kernels may touch.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner_->allocate(n);
    if (t_scope != nullptr && p.get() != nullptr) {
      const auto lo = reinterpret_cast<uintptr_t>(p.get());
      t_scope->add(lo, lo + n);
    }
    return p;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner_->copy_data(dest, src, count);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }

 private:
  c10::Allocator* inner_;
};

}  // namespace

bool install_allocator() {
  static TrackingAllocator* tracker = nullptr;
  if (tracker == nullptr) {
    tracker = new TrackingAllocator(c10::GetCPUAllocator());  // never destroyed
    c10::SetCPUAllocator(tracker, 0);
  }
  g_check_global = c10::GetCPUAllocator() == tracker;
  return g_check_global;
}

void set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_seed = seed;
  g_launch_count = 0;
}

std::vector<uint64_t> launched_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  Dl_info info{};
  dladdr(reinterpret_cast<void*>(&launch_grid), &info);
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::vector<uint64_t> out;
  for (uintptr_t k : g_launched) out.push_back(k - base);
  return out;
}

std::vector<std::pair<const char*, uint64_t>> stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {{"launches", g_stats.launches},
          {"blocks", g_stats.blocks},
          {"threads", g_stats.threads},
          {"switches", g_stats.switches},
          {"accesses", g_stats.accesses},
          {"shared_accesses", g_stats.shared_accesses},
          {"global_accesses", g_stats.global_accesses}};
}

}  // namespace hpml_emu

// ---- the instrumentation call-backs (GCC's -fsanitize=thread, with our own run-time) -------------
// Every load and store of the emulated library calls these; only a kernel's are checked. The
// atomics of its host code (reference counts in torch's headers) come here too, and must happen.
#define HPML_EMU_API extern "C" __attribute__((visibility("hidden")))
#define HPML_EMU_HOOKS(n)                                                                       \
  HPML_EMU_API void __tsan_read##n(void* a) { hpml_emu::access(uintptr_t(a), n, false); }       \
  HPML_EMU_API void __tsan_write##n(void* a) { hpml_emu::access(uintptr_t(a), n, true); }       \
  HPML_EMU_API void __tsan_unaligned_read##n(void* a) {                                       \
    hpml_emu::access(uintptr_t(a), n, false);                                               \
  }                                                                                         \
  HPML_EMU_API void __tsan_unaligned_write##n(void* a) {                                      \
    hpml_emu::access(uintptr_t(a), n, true);                                                \
  }                                                                                         \
  HPML_EMU_API void __tsan_volatile_read##n(void* a) { hpml_emu::access(uintptr_t(a), n, false); } \
  HPML_EMU_API void __tsan_volatile_write##n(void* a) { hpml_emu::access(uintptr_t(a), n, true); }
HPML_EMU_HOOKS(1)
HPML_EMU_HOOKS(2)
HPML_EMU_HOOKS(4)
HPML_EMU_HOOKS(8)
HPML_EMU_HOOKS(16)
#undef HPML_EMU_HOOKS
HPML_EMU_API void __tsan_read_range(void* a, size_t n) { hpml_emu::access(uintptr_t(a), n, false); }
HPML_EMU_API void __tsan_write_range(void* a, size_t n) { hpml_emu::access(uintptr_t(a), n, true); }
HPML_EMU_API void __tsan_vptr_update(void**, void*) {}
HPML_EMU_API void __tsan_vptr_read(void**) {}
HPML_EMU_API void __tsan_func_entry(void*) {}
HPML_EMU_API void __tsan_func_exit() {}
HPML_EMU_API void __tsan_init() {}
HPML_EMU_API void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
HPML_EMU_API void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// The atomics, done (sequentially consistent whatever order was asked: stronger is correct).
#define HPML_EMU_RMW(bits, T, op)                                                        \
  HPML_EMU_API T __tsan_atomic##bits##_##op(volatile T* a, T v, int) {                  \
    return __atomic_##op(a, v, __ATOMIC_SEQ_CST);                                        \
  }
#define HPML_EMU_CAS(bits, T, kind, weak)                                                \
  HPML_EMU_API int __tsan_atomic##bits##_compare_exchange_##kind(volatile T* a, T* c, T v, \
                                                                 int, int) {             \
    return __atomic_compare_exchange_n(a, c, v, weak, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }
#define HPML_EMU_ATOMICS(bits, T)                                                        \
  HPML_EMU_API T __tsan_atomic##bits##_load(const volatile T* a, int) {                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                         \
  }                                                                                      \
  HPML_EMU_API void __tsan_atomic##bits##_store(volatile T* a, T v, int) {              \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                            \
  }                                                                                      \
  HPML_EMU_API T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {              \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                  \
  }                                                                                      \
  HPML_EMU_RMW(bits, T, fetch_add)                                                       \
  HPML_EMU_RMW(bits, T, fetch_sub)                                                       \
  HPML_EMU_RMW(bits, T, fetch_and)                                                       \
  HPML_EMU_RMW(bits, T, fetch_or)                                                        \
  HPML_EMU_RMW(bits, T, fetch_xor)                                                       \
  HPML_EMU_RMW(bits, T, fetch_nand)                                                      \
  HPML_EMU_CAS(bits, T, strong, false)                                                   \
  HPML_EMU_CAS(bits, T, weak, true)                                                      \
  HPML_EMU_API T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, \
                                                            int) {                       \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);    \
    return c;                                                                            \
  }
HPML_EMU_ATOMICS(8, uint8_t)
HPML_EMU_ATOMICS(16, uint16_t)
HPML_EMU_ATOMICS(32, uint32_t)
HPML_EMU_ATOMICS(64, uint64_t)
#undef HPML_EMU_ATOMICS
#undef HPML_EMU_CAS
#undef HPML_EMU_RMW
