// What the CUDA kernels of every op share: 16-byte packs, the alignment test, a deterministic
// block reduction, the vector-width dispatch and the one launch helper every launch site goes
// through (the launch check in one place; the seam where a host build of these sources would put
// its own launch).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace hpml {
namespace gpu {

// N values of T moved as one aligned load or store (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in a 16-byte pack.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int64_t off) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + off);
}

// v[0..VEC) rounded to T and stored as one pack at p + off.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t off, const acc_t (&v)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(v[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p + off) = pk;
}

// Sums each of v[0..N) over the THREADS threads of a 1-D block (THREADS a power of 2 from 32 to
// 1024): warp shuffles, then the warps' sums in shared memory, in a fixed order whatever the
// values, so the bits depend on nothing but the inputs. The sums are in thread 0. Every thread of
// the block must call it (it holds a barrier); its shared memory may be reused after a barrier.
template <int THREADS, int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  constexpr int kWarps = THREADS / 32;
  static_assert(THREADS >= 32 && THREADS <= 1024 && (THREADS & (THREADS - 1)) == 0,
                "block_sum: THREADS must be a power of 2 from 32 to 1024");
  __shared__ T sh[N][kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) sh[k][wid] = v[k];
  }
  __syncthreads();
  if (wid == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = lane < kWarps ? sh[k][lane] : T(0);
#pragma unroll
    for (int o = kWarps / 2; o > 0; o >>= 1) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
}

// Calls f(std::integral_constant<int, V>) when `vec`, else f(std::integral_constant<int, 1>): a
// kernel instantiated for 16-byte packs and for single elements, chosen at run time.
template <int V, typename F>
inline void dispatch_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, V>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// kKernel<<<grid, block, smem, stream>>>(args...), then the launch check (an invalid
// configuration raises here). In the emulated build (csrc/emu) the emulator runs it on the CPU,
// naming the kernel in what it reports.
template <auto kKernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#ifdef HPML_EMU
  (void)stream;
  ::hpml_emu::launch(kKernel, __PRETTY_FUNCTION__, grid, block, smem, std::forward<Args>(args)...);
#else
  kKernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace gpu
}  // namespace hpml
