// Loads and stores between storage dtypes and at::vec vectors of the accumulation type, shared
// by the C++ CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace hpml {
// A namespace per ISA variant of the CPU kernels (csrc/cpu_dispatch.h).
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Load `count` (<= vector size) elements, widened to the accumulation type (fp16/bf16 -> fp32:
// a whole vector with the ISA's conversion, vcvtph2ps or a shift; torch's own kernels' rounding).
template <typename scalar_t>
inline Vectorized<opmath_t<scalar_t>> load(const scalar_t* p, int64_t count) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::loadu(p, count);
  } else {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      if (count == Vec::size()) {
        Vec out;
        at::vec::load_to_float<scalar_t>(p, out);
        return out;
      }
    }
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
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      // Round to nearest even, as c10's scalar conversion (a NaN may differ in its payload).
      if (count == Vectorized<acc_t>::size()) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
        // One register of V 16-bit values, stored whole (a Vectorized<BFloat16> holds 2V: a
        // store of half of it goes through a buffer and a memcpy).
        const auto h = [&] {
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return at::vec::cvtfp32_bf16(v);
          else return at::vec::cvtfp32_fp16(v);
        }();
#if defined(CPU_CAPABILITY_AVX512)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
#else
        at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
#endif
        return;
      }
    }
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// Software prefetch for the streaming passes: the cache lines of [p, p + n) asked for (a hint:
// never faults, also past the end of a buffer). Called kPrefetchBytes ahead of use: on the
// 2-core Intel Xeon (VM) the hardware prefetchers left most of the memory latency exposed in
// BCE's forward, whose arithmetic per line is long (2^24 fp32 in 15.3 ms without, 6.3 ms with
// 4 KB ahead: 8.4 -> 20 GB/s of the machine's 25.7 GB/s copy bandwidth).
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t k = 0; k < n * static_cast<int64_t>(sizeof(T)); k += 64) {
    __builtin_prefetch(c + k, 0, 3);
  }
}
// prefetch() of the n elements kPrefetchBytes past p.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t n) {
  prefetch(reinterpret_cast<const T*>(reinterpret_cast<const char*>(p) + kPrefetchBytes), n);
}

// store(), but full fp32/fp64 vectors at vector-aligned addresses go around the cache
// (_mm256_stream_* / _mm512_stream_*): a streamed line is not read before it is written (no
// read-for-ownership), which saves a quarter of the traffic of a pass that reads two inputs and
// writes one output. For outputs far larger than the cache only; the writing thread calls
// stream_fence() before the data is read by another thread.
template <typename scalar_t>
inline void store_stream(scalar_t* p, const Vectorized<opmath_t<scalar_t>>& v, int64_t count) {
  constexpr int64_t V = Vectorized<opmath_t<scalar_t>>::size();
  [[maybe_unused]] const bool aligned =
      count == V && (reinterpret_cast<uintptr_t>(p) & (V * sizeof(scalar_t) - 1)) == 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (aligned) return _mm512_stream_ps(p, static_cast<__m512>(v));
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (aligned) return _mm512_stream_pd(p, static_cast<__m512d>(v));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (aligned) return _mm256_stream_ps(p, static_cast<__m256>(v));
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (aligned) return _mm256_stream_pd(p, static_cast<__m256d>(v));
  }
#endif
  store(p, v, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for the rows x cols (each <= 32) of a tile of 16-bit
// values. AVX-512: ATen's transpose_mxn (32 registers of 32 lanes, unpacks and permutes). Other
// variants: a loop over the destination's rows, each read down a column of the tile (ATen's
// generic transpose_mxn, which runs the other way, took 7 ms for 4096 x 1024 bf16 on 2 threads of
// the Intel Xeon in the AVX2 variant; this loop ~1.3 ms, the AVX-512 one ~0.5).
template <typename T>
inline void transpose_tile16(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int rows,
                             int cols) {
  static_assert(sizeof(T) == 2, "a tile of 16-bit values");
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, rows, cols);
    return;
  }
#endif
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) d[j * ld_dst + i] = s[i * ld_src + j];
}

// Bit k set where lane k of v is > 0, for k < count (other bits 0); with kNanSet also where it
// is NaN (ReLU's mask: torch's threshold_backward passes the gradient unless x <= 0, so a NaN
// pre-activation passes it; leaky ReLU's is x > 0). One compare-to-mask (AVX-512) or movemask
// (AVX2).
template <bool kNanSet = false, typename T>
inline uint32_t positive_bits(const Vectorized<T>& v, int64_t count) {
  constexpr int64_t V = Vectorized<T>::size();
  static_assert(V <= 32, "a vector's bits must fit in 32");
  const uint32_t keep = count >= V ? (V >= 32 ? ~0u : (1u << V) - 1) : (1u << count) - 1;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int kPred = kNanSet ? _CMP_NLE_UQ : _CMP_GT_OQ;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && V == 16) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(__m512(v), _mm512_setzero_ps(), kPred)) & keep;
  } else if constexpr (std::is_same_v<T, double> && V == 8) {
    return static_cast<uint32_t>(_mm512_cmp_pd_mask(__m512d(v), _mm512_setzero_pd(), kPred)) &
           keep;
  }
#elif defined(CPU_CAPABILITY_AVX2)
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
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && V == 16) {
    return _mm512_castsi512_ps(_mm512_movm_epi32(static_cast<__mmask16>(bits)));
  } else if constexpr (std::is_same_v<T, double> && V == 8) {
    return _mm512_castsi512_pd(_mm512_movm_epi64(static_cast<__mmask8>(bits)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
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

// The 1-bit masks (ReLU's, leaky ReLU's) hold bit j of a row in byte j / 8, bit j % 8, whatever
// the vector width that wrote them. A vector of V lanes covers bits [j, j + count) with j a
// multiple of V: part of one byte when V < 8, V / 8 whole bytes when V >= 8.

// Or `count` bits into a row's mask (zeroed first) at bit j.
template <int64_t V>
inline void put_mask_bits(uint8_t* row, int64_t j, uint32_t bits, int64_t count) {
  if constexpr (V >= 8) {
    for (int64_t b = 0; b * 8 < count; ++b) row[(j >> 3) + b] = static_cast<uint8_t>(bits >> (8 * b));
  } else {
    static_assert(8 % V == 0, "a vector's mask bits must fall in one byte");
    row[j >> 3] |= static_cast<uint8_t>(bits << (j & 7));
  }
}

// The `count` bits of a row's mask at bit j.
template <int64_t V>
inline uint32_t get_mask_bits(const uint8_t* row, int64_t j, int64_t count) {
  const uint32_t keep = count >= 32 ? ~0u : (1u << count) - 1;
  if constexpr (V >= 8) {
    uint32_t w = 0;
    for (int64_t b = 0; b * 8 < count; ++b) w |= static_cast<uint32_t>(row[(j >> 3) + b]) << (8 * b);
    return w & keep;
  } else {
    return (static_cast<uint32_t>(row[j >> 3]) >> (j & 7)) & keep;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace hpml
