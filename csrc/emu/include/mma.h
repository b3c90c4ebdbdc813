// Emulator stand-in for CUDA's WMMA API (nvcuda::wmma), for the shapes the kernels use:
// m16n16k16 with __half or __nv_bfloat16 operands (row- or column-major) and a float accumulator.
//
// A fragment holds 8 of its tile's 256 elements in each of the 32 lanes. Which element sits in
// which lane and slot is drawn afresh from the seed at every launch (hpml_emu::wmma_map): CUDA
// does not promise a layout, and code that assumes one gives different results under different
// seeds. Loads and stores are warp-wide calls (every lane, the same pointer and leading
// dimension, checked); each lane moves its own elements, so the shared-memory checks see them.
// mma_sync is a warp collective computed from every lane's fragments in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "hpml_emu/runtime.h"

namespace hpml_emu {
// The tile positions (row * 16 + column) of the calling lane's 8 slots of a fragment of kind
// `use` (0 matrix_a, 1 matrix_b, 2 accumulator), copied into pos.
void wmma_positions(int use, uint16_t pos[8]) noexcept;
// D = A B + C for the warp: each lane passes its fragments; returns when every lane has.
// `a_bf16`: the operands are bfloat16 (else half).
void wmma_mma(float* d, const uint16_t* a, const uint16_t* b, const float* c, bool a_bf16,
              bool b_bf16);
}  // namespace hpml_emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements m16n16k16");
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[num_elements];
};

namespace detail {
template <typename Use>
constexpr int use_id() {
  return std::is_same_v<Use, matrix_a> ? 0 : std::is_same_v<Use, matrix_b> ? 1 : 2;
}
// Every lane of the warp passes the same (pointer, leading dimension, layout).
inline void uniform(const void* p, unsigned ldm, int layout, const char* what) {
  const uint64_t h = reinterpret_cast<uintptr_t>(p) * 1000003u ^ (uint64_t(ldm) << 1) ^ layout;
  ::hpml_emu::warp_collective(::hpml_emu::Coll::Uniform, 0xffffffffu, h, 0, 32, what);
}
// f(slot, row, column) for each of the calling lane's 8 slots of a fragment of kind `use`.
template <typename F>
inline void each_element(int use, F&& f) {
  uint16_t pos[8];
  ::hpml_emu::wmma_positions(use, pos);
  for (int i = 0; i < 8; ++i) f(i, pos[i] / 16, pos[i] % 16);
}
template <typename T>
inline uint16_t bits16(const T& v) {
  static_assert(sizeof(T) == 2, "half or bfloat16");
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (int i = 0; i < 8; ++i) f.x[i] = static_cast<T>(v);
}

// Operand fragments: element (r, c) of the tile at p[r * ldm + c] (row_major) or
// p[c * ldm + r] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout");
  constexpr bool kCol = std::is_same_v<Layout, col_major>;
  detail::uniform(p, ldm, kCol, "wmma::load_matrix_sync");
  detail::each_element(detail::use_id<Use>(), [&](int i, int r, int c) {
    f.x[i] = kCol ? p[c * ldm + r] : p[r * ldm + c];
  });
}

// Accumulator fragments: element (r, c) at p[r * ldm + c] (mem_row_major) or p[c * ldm + r].
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::uniform(p, ldm, layout, "wmma::load_matrix_sync");
  detail::each_element(2, [&](int i, int r, int c) {
    f.x[i] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  });
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::uniform(p, ldm, layout, "wmma::store_matrix_sync");
  detail::each_element(2, [&](int i, int r, int c) {
    (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[i];
  });
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  static_assert(sizeof(TA) == 2 && sizeof(TB) == 2, "half or bfloat16 operands");
  uint16_t ab[8], bb[8];
  for (int i = 0; i < 8; ++i) {
    ab[i] = detail::bits16(a.x[i]);
    bb[i] = detail::bits16(b.x[i]);
  }
  ::hpml_emu::wmma_mma(d.x, ab, bb, c.x, std::is_same_v<TA, __nv_bfloat16>,
                       std::is_same_v<TB, __nv_bfloat16>);
}

}  // namespace wmma
}  // namespace nvcuda
