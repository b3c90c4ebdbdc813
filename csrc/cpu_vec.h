// Loads and stores between storage dtypes and at::vec vectors of the accumulation type, shared
// by the C++ CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace hpml {

using at::vec::Vectorized;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Load `count` (<= vector size) elements, widened to the accumulation type.
template <typename scalar_t>
inline Vectorized<opmath_t<scalar_t>> load(const scalar_t* p, int64_t count) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::loadu(p, count);
  } else {
    __at_align__ acc_t buf[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) buf[k] = k < count ? static_cast<acc_t>(p[k]) : 0;
    return Vec::loadu(buf);
  }
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vectorized<opmath_t<scalar_t>>& v, int64_t count) {
  using acc_t = opmath_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// store(), but full fp32/fp64 vectors at 32-byte aligned addresses go around the cache
// (_mm256_stream_*): a streamed line is not read before it is written (no read-for-ownership),
// which saves a quarter of the traffic of a pass that reads two inputs and writes one output.
// For outputs far larger than the cache only; the writing thread calls stream_fence() before
// the data is read by another thread.
template <typename scalar_t>
inline void store_stream(scalar_t* p, const Vectorized<opmath_t<scalar_t>>& v, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == 8 && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, static_cast<__m256>(v));
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (count == 4 && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_pd(p, static_cast<__m256d>(v));
      return;
    }
  }
#endif
  store(p, v, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Bit k set where lane k of v is > 0, for k < count (other bits 0); with kNanSet also where it
// is NaN (ReLU's mask: torch's threshold_backward passes the gradient unless x <= 0, so a NaN
// pre-activation passes it; leaky ReLU's is x > 0). One movemask on AVX2.
template <bool kNanSet = false, typename T>
inline uint32_t positive_bits(const Vectorized<T>& v, int64_t count) {
  constexpr int64_t V = Vectorized<T>::size();
  const uint32_t keep = count >= V ? (V >= 32 ? ~0u : (1u << V) - 1) : (1u << count) - 1;
#if defined(CPU_CAPABILITY_AVX2)
  constexpr int kPred = kNanSet ? _CMP_NLE_UQ : _CMP_GT_OQ;
  if constexpr (std::is_same_v<T, float> && V == 8) {
    return static_cast<uint32_t>(
               _mm256_movemask_ps(_mm256_cmp_ps(__m256(v), _mm256_setzero_ps(), kPred))) &
           keep;
  } else if constexpr (std::is_same_v<T, double> && V == 4) {
    return static_cast<uint32_t>(
               _mm256_movemask_pd(_mm256_cmp_pd(__m256d(v), _mm256_setzero_pd(), kPred))) &
           keep;
  }
#endif
  __at_align__ T buf[V];
  v.store(buf);
  uint32_t bits = 0;
  for (int64_t k = 0; k < V; ++k) {
    const bool set = kNanSet ? !(buf[k] <= T(0)) : buf[k] > T(0);
    bits |= static_cast<uint32_t>(set) << k;
  }
  return bits & keep;
}

// A lane mask (all ones where bit k of bits is set) for a select.
template <typename T>
inline Vectorized<T> lanes_from_bits(uint32_t bits) {
  constexpr int64_t V = Vectorized<T>::size();
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> && V == 8) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i hit = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(hit, sel));
  } else if constexpr (std::is_same_v<T, double> && V == 4) {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i hit = _mm256_and_si256(_mm256_set1_epi64x(static_cast<int64_t>(bits)), sel);
    return _mm256_castsi256_pd(_mm256_cmpeq_epi64(hit, sel));
  }
#endif
  __at_align__ T buf[V];
  for (int64_t k = 0; k < V; ++k) buf[k] = ((bits >> k) & 1) ? T(1) : T(0);
  return Vectorized<T>::loadu(buf) > Vectorized<T>(T(0));
}

}  // namespace hpml
