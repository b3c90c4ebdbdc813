// Emulator stand-in for cuda_fp16.h: __half as CUDA lays it out (IEEE binary16 bits), with
// CUDA's conversions (round to nearest even from float, exact to float).
#pragma once

#include <c10/util/Half.h>

#include "hpml_emu/runtime.h"

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(c10::Half(f).x) {}  // NOLINT: implicit, as CUDA's
  operator float() const { return static_cast<float>(c10::Half(__x, c10::Half::from_bits())); }
};
static_assert(sizeof(__half) == 2, "__half is 2 bytes");

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
