// Emulator stand-in for cuda_bf16.h: __nv_bfloat16 as CUDA lays it out (the upper 16 bits of an
// IEEE binary32), with CUDA's conversions (round to nearest even from float, exact to float).
#pragma once

#include <c10/util/BFloat16.h>

#include "hpml_emu/runtime.h"

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(c10::BFloat16(f).x) {}  // NOLINT: implicit, as CUDA's
  operator float() const {
    return static_cast<float>(c10::BFloat16(__x, c10::BFloat16::from_bits()));
  }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
