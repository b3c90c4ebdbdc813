// The CUDA emulator's device side: what a kernel of csrc/cuda sees when its .cu file is compiled
// as host C++ (the emulated build, -DHPML_EMU; csrc/emu/README.md). CUDA's keywords and builtin
// variables, __syncthreads, the warp collectives, atomics, the math intrinsics the kernels call,
// and the launch that gpu::launch (csrc/cuda/common.cuh) turns into.
//
// Each CUDA thread of a block runs as a fiber; a fiber runs until a barrier, a warp collective or
// its end (csrc/emu/runtime.cpp). Every load and store of the kernel code is instrumented
// (GCC's -fsanitize=thread instrumentation, with our own call-backs) and checked there: shared-memory races and reads of
// unwritten shared memory, accesses outside the tensors of the op, all reported with the kernel,
// block, thread and address.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's vector types, stream type and keywords -------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)  // NOLINT
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as CUDA's
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: a zero-initialised static of the emulated library. The emulator knows the
// library's .bss range and treats accesses to it from kernel code as shared-memory accesses (one
// block runs at a time, so one copy serves every block).
#define __shared__ static

namespace hpml_emu {

// The multiprocessor count the emulated device reports (small: grid-stride loops loop).
constexpr int kMultiProcessors = 4;

// ---- the running thread --------------------------------------------------------------------
uint3 thread_idx() noexcept;
int lane_id() noexcept;  // the thread's lane in its warp (linear thread index % 32)
uint3 block_idx() noexcept;
dim3 block_dim() noexcept;
dim3 grid_dim() noexcept;
void syncthreads();
void threadfence() noexcept;

// ---- warp collectives ------------------------------------------------------------------------
enum class Coll : int {
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  SyncWarp,
  Uniform,  // every lane of the mask passes the same value (WMMA calls: same pointer, ldm)
};
// The calling lane's result of a collective over the lanes of `mask`: it returns once every lane
// named in the mask has made the same call (kind, mask, width); a lane that never does is
// reported. `value` carries up to 8 bytes; `arg` is the source lane, delta or xor mask.
uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* what);

// Atomic read-modify-write of `size` bytes at p (checked as one access, never a race).
void atomic_begin(const void* p, size_t size);
void atomic_end() noexcept;

// ---- launch ----------------------------------------------------------------------------------
using Entry = void (*)(const void* args, void* kernel);
// Runs kernel(args) on every thread of every block (blocks one after another, in an order drawn
// from the seed); raises (c10::Error) on an invalid configuration or on the first error a check
// finds, naming the kernel.
void launch_grid(const char* name, dim3 grid, dim3 block, size_t smem, const void* args,
                 void* kernel, Entry entry);
// Called by a thread once its copy of the arguments is made: from here on its accesses are the
// kernel's, and checked.
void enter_kernel() noexcept;

template <typename Tuple, typename... P>
void run_thread(const void* args, void* kernel) {
  Tuple local(*static_cast<const Tuple*>(args));  // on the fiber's stack, before the checks
  auto fn = reinterpret_cast<void (*)(P...)>(kernel);
  enter_kernel();
  std::apply(fn, local);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t smem,
            A&&... args) {
  using Tuple = std::tuple<std::decay_t<P>...>;
  const Tuple packed(std::forward<A>(args)...);  // the parameters, converted as a call would
  launch_grid(name, grid, block, smem, &packed, reinterpret_cast<void*>(kernel),
              &run_thread<Tuple, P...>);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a value of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace hpml_emu

#define threadIdx (::hpml_emu::thread_idx())
#define blockIdx (::hpml_emu::block_idx())
#define blockDim (::hpml_emu::block_dim())
#define gridDim (::hpml_emu::grid_dim())
#define warpSize 32

inline void __syncthreads() { ::hpml_emu::syncthreads(); }
inline void __threadfence() { ::hpml_emu::threadfence(); }
inline void __threadfence_block() { ::hpml_emu::threadfence(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace hpml_emu;
  return from_bits<T>(
      warp_collective(Coll::ShflIdx, mask, to_bits(v), src_lane, width, "__shfl_sync"));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace hpml_emu;
  return from_bits<T>(warp_collective(Coll::ShflUp, mask, to_bits(v), static_cast<int>(delta),
                                      width, "__shfl_up_sync"));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace hpml_emu;
  return from_bits<T>(warp_collective(Coll::ShflDown, mask, to_bits(v),
                                      static_cast<int>(delta), width, "__shfl_down_sync"));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace hpml_emu;
  return from_bits<T>(
      warp_collective(Coll::ShflXor, mask, to_bits(v), lane_mask, width, "__shfl_xor_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace hpml_emu;
  return static_cast<unsigned>(
      warp_collective(Coll::Ballot, mask, pred != 0, 0, 32, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int pred) {
  using namespace hpml_emu;
  return static_cast<int>(warp_collective(Coll::Any, mask, pred != 0, 0, 32, "__any_sync"));
}
inline int __all_sync(unsigned mask, int pred) {
  using namespace hpml_emu;
  return static_cast<int>(warp_collective(Coll::All, mask, pred != 0, 0, 32, "__all_sync"));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace hpml_emu;
  warp_collective(Coll::SyncWarp, mask, 0, 0, 32, "__syncwarp");
}

// ---- atomics (a fiber runs alone: a read-modify-write is atomic by construction) --------------
template <typename T, typename F>
inline T hpml_emu_atomic(T* p, F&& f) {
  hpml_emu::atomic_begin(p, sizeof(T));
  const T old = *p;
  *p = f(old);
  hpml_emu::atomic_end();
  return old;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  return hpml_emu_atomic(p, [&](T o) { return static_cast<T>(o + v); });
}
template <typename T>
inline T atomicSub(T* p, T v) {
  return hpml_emu_atomic(p, [&](T o) { return static_cast<T>(o - v); });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return hpml_emu_atomic(p, [&](T o) { return o < v ? v : o; });
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return hpml_emu_atomic(p, [&](T o) { return v < o ? v : o; });
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return hpml_emu_atomic(p, [&](T) { return v; });
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  return hpml_emu_atomic(p, [&](T o) { return o == compare ? v : o; });
}

// ---- integer and floating-point intrinsics ------------------------------------------------------
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
using std::fma;

// CUDA's min/max overloads for the types the kernels use (one type on both sides).
#define HPML_EMU_MINMAX(T)                                 \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
HPML_EMU_MINMAX(int)
HPML_EMU_MINMAX(unsigned int)
HPML_EMU_MINMAX(long)
HPML_EMU_MINMAX(unsigned long)
HPML_EMU_MINMAX(long long)
HPML_EMU_MINMAX(unsigned long long)
HPML_EMU_MINMAX(float)
HPML_EMU_MINMAX(double)
#undef HPML_EMU_MINMAX
