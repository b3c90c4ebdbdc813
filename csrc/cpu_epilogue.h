// The row passes of a linear layer on CPU, shared by hpml::linear_act (linear_act.cpp) and the
// whole-MLP kernel (mlp.cpp): the forward's epilogue (bias, activation, ReLU bit mask, in place
// over the product) and the backward's dZ = dY act'(.) with its column sums (the bias gradient).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "cpu_vec.h"
#include "hpml_math.h"

namespace hpml {
// A namespace per ISA variant of the CPU kernels (csrc/cpu_dispatch.h).
inline namespace CPU_CAPABILITY {

// ReLU in place over one row of N fp16/bf16 values (no bias), on their 16-bit patterns: a value
// is kept where it is > 0 (sign clear, not zero) or NaN (either sign: torch's relu keeps NaN),
// else replaced by +0, and the kept ones' bits set in mrow (when not null; zeroed by the caller).
// The same values and bits as widening to fp32 and back (a NaN keeps its payload), without the
// conversions: 32 lanes a vector on AVX-512, 16 on AVX2.
template <typename scalar_t>
inline void relu16_row(scalar_t* row, uint8_t* mrow, int64_t N) {
  static_assert(sizeof(scalar_t) == 2, "16-bit floating types only");
  uint16_t* u = reinterpret_cast<uint16_t*>(row);
  const uint16_t inf = std::is_same_v<scalar_t, at::BFloat16> ? 0x7f80 : 0x7c00;
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i vinf = _mm512_set1_epi16(static_cast<short>(inf));
  const __m512i abs_bits = _mm512_set1_epi16(0x7fff);
  for (; j + 32 <= N; j += 32) {
    const __m512i x = _mm512_loadu_si512(u + j);
    const __mmask32 keep = _mm512_cmpgt_epi16_mask(x, _mm512_setzero_si512()) |
                           _mm512_cmpgt_epu16_mask(_mm512_and_si512(x, abs_bits), vinf);
    _mm512_storeu_si512(u + j, _mm512_maskz_mov_epi16(keep, x));
    if (mrow != nullptr) {
      const uint32_t bits = keep;  // bit k: element j + k; bytes in little-endian order
      std::memcpy(mrow + j / 8, &bits, 4);
    }
  }
  if (j < N) {  // the tail, masked
    const int64_t rem = N - j;
    const __mmask32 lanes = static_cast<__mmask32>((1u << rem) - 1);  // rem < 32
    const __m512i x = _mm512_maskz_loadu_epi16(lanes, u + j);
    const __mmask32 keep = lanes & (_mm512_cmpgt_epi16_mask(x, _mm512_setzero_si512()) |
                                    _mm512_cmpgt_epu16_mask(_mm512_and_si512(x, abs_bits), vinf));
    _mm512_mask_storeu_epi16(u + j, lanes, _mm512_maskz_mov_epi16(keep, x));
    if (mrow != nullptr) {
      const uint32_t bits = keep;
      std::memcpy(mrow + j / 8, &bits, static_cast<size_t>((rem + 7) / 8));
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i vinf = _mm256_set1_epi16(static_cast<short>(inf));
  const __m256i abs_bits = _mm256_set1_epi16(0x7fff);
  for (; j + 16 <= N; j += 16) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + j));
    // (x & 0x7fff) > inf as a signed compare: both sides are below 0x8000.
    const __m256i keep =
        _mm256_or_si256(_mm256_cmpgt_epi16(x, _mm256_setzero_si256()),
                        _mm256_cmpgt_epi16(_mm256_and_si256(x, abs_bits), vinf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + j), _mm256_and_si256(x, keep));
    if (mrow != nullptr) {
      // One bit per lane: packed to bytes (0 / -1 saturate to themselves), then their signs.
      const __m128i b =
          _mm_packs_epi16(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1));
      const uint16_t bits = static_cast<uint16_t>(_mm_movemask_epi8(b));
      std::memcpy(mrow + j / 8, &bits, 2);
    }
  }
#endif
  for (; j < N; ++j) {  // the row's tail, and the DEFAULT variant
    const uint16_t x = u[j];
    const bool keep = static_cast<int16_t>(x) > 0 || (x & 0x7fff) > inf;
    if (!keep) u[j] = 0;
    if (mrow != nullptr && keep) mrow[j >> 3] |= static_cast<uint8_t>(1u << (j & 7));
  }
}

// Rows [r0, r1) of out (N columns, row-major): out = act(out + bias) (bias may be null), and
// where mask is not null the rows' bits of out > 0 (before the activation; for ReLU NaN too, as
// torch's backward passes its gradient), 8 per byte.
template <typename scalar_t, Act A>
inline void epilogue_rows(scalar_t* out, const scalar_t* bias, uint8_t* mask, int64_t r0, int64_t r1,
                   int64_t N, opmath_t<scalar_t> slope) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nb = mask_row_bytes(N);
  const Vec vslope(slope);
  for (int64_t m = r0; m < r1; ++m) {
    scalar_t* row = out + m * N;
    uint8_t* mrow = mask != nullptr ? mask + m * nb : nullptr;
    if (mrow != nullptr) std::memset(mrow, 0, nb);
    if constexpr (A == Act::Relu && at::vec::is_reduced_floating_point_v<scalar_t>) {
      if (bias == nullptr) {  // (linear_act's fp16/bf16 forward: the bias is in the product)
        relu16_row(row, mrow, N);
        continue;
      }
    }
    for (int64_t j = 0; j < N; j += V) {
      const int64_t c = std::min<int64_t>(V, N - j);
      Vec z = load(row + j, c);
      if (bias != nullptr) z = z + load(bias + j, c);
      if (mrow != nullptr) put_mask_bits<V>(mrow, j, positive_bits<A == Act::Relu>(z, c), c);
      store(row + j, math::activate<A>(z, vslope), c);
    }
  }
}

// dZ for rows [r0, r1) into dz (may alias nothing else), and their column sums into db_part.
template <typename scalar_t, Act A>
inline void dz_rows(const scalar_t* g, const scalar_t* y, const uint8_t* mask, scalar_t* dz,
             opmath_t<scalar_t>* db_part, int64_t r0, int64_t r1, int64_t N,
             opmath_t<scalar_t> slope) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t nb = mask_row_bytes(N);
  const Vec vslope(slope), zero(acc_t(0));
  for (int64_t m = r0; m < r1; ++m) {
    const scalar_t* grow = g + m * N;
    for (int64_t j = 0; j < N; j += V) {
      const int64_t c = std::min<int64_t>(V, N - j);
      const Vec gv = load(grow + j, c);
      Vec d;
      if constexpr (A == Act::Relu || A == Act::LeakyRelu) {
        const uint32_t bits = get_mask_bits<V>(mask + m * nb, j, c);
        const Vec on = lanes_from_bits<acc_t>(bits);
        // A select, as torch's threshold_backward: a NaN gradient where the mask is off is 0.
        d = math::vselect(on, gv, A == Act::Relu ? zero : gv * vslope);
      } else if constexpr (A == Act::Sigmoid || A == Act::Tanh) {
        d = math::activation_grad_from_output<A>(gv, load(y + m * N + j, c));
      } else {
        d = gv;
      }
      if (dz != nullptr) store(dz + m * N + j, d, c);
      if (db_part != nullptr) {
        if (c < V) d = Vec::set(zero, d, c);
        (Vec::loadu(db_part + j, c) + d).store(db_part + j, c);
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace hpml
