// Loads and stores between storage dtypes and at::vec vectors of the accumulation type, shared
// by the C++ CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

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

}  // namespace hpml
