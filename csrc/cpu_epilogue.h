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
