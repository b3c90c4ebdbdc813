// Per-element math shared by the C++ CPU kernels and the CUDA kernels.
//
// Every function here is a template over T, instantiated with a scalar (float/double, on host and
// device) or with at::vec::Vectorized<float/double> (CPU, host only). The CPU tests therefore run
// the same expressions, in the same order of operations, as the GPU kernels; only the libm behind
// exp/log1p differs (Sleef on the CPU, CUDA's libdevice on the GPU).
//
// The formulas follow ATen's own order of operations (aten/src/ATen/native/Loss.cpp), so that the
// non-finite cases (x = +-inf, NaN) give torch's results bit for bit, not merely the same limit.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "constants.h"

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace hpml {
namespace math {
// A namespace per ISA variant of the CPU kernels (csrc/cpu_dispatch.h).
inline namespace CPU_CAPABILITY {

// The shift K of batch norm's shifted sums S1 = sum(x - K), S2 = sum((x - K)^2): a channel's
// first value, or 0 where that is not finite (an infinite K turns every difference into NaN,
// where torch's mean of a channel holding an inf is that inf). v - v is 0 exactly when v is finite.
template <typename T>
C10_HOST_DEVICE inline T bn_shift(T v) {
  return v - v == T(0) ? v : T(0);
}

// ---- primitive overloads: scalars (host + device) ----------------------------------------------
C10_HOST_DEVICE inline float vexp(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double vexp(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float vlog1p(float x) { return ::log1pf(x); }
C10_HOST_DEVICE inline double vlog1p(double x) { return ::log1p(x); }
C10_HOST_DEVICE inline float vtanh(float x) { return ::tanhf(x); }
C10_HOST_DEVICE inline double vtanh(double x) { return ::tanh(x); }
C10_HOST_DEVICE inline float vabs(float x) { return ::fabsf(x); }
C10_HOST_DEVICE inline double vabs(double x) { return ::fabs(x); }
// min(a, b) that propagates a NaN in `a` (as std::min(a, b) and at::vec::minimum do).
template <typename T>
C10_HOST_DEVICE inline T vmin(T a, T b) {
  return (b < a) ? b : a;
}

// ---- primitive overloads: at::vec vectors (host) ------------------------------------------------
#if !defined(__CUDACC__)
template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& x) {
  return x.exp();
}
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The instructions exp_ps below needs, at this variant's width (csrc/cpu_dispatch.h): one
// algorithm, written once, for 8 and for 16 lanes. Those both widths name alike (P is _mm256 or
// _mm512), the two they name apart (ROUND, CAST_PS), then where() per width.
#define HPML_EXP_ISA_COMMON(P, PS, PI, ROUND, CAST_PS)                  \
  using ps = PS;                                                        \
  using pi = PI;                                                        \
  static ps set1(float v) { return P##_set1_ps(v); }                    \
  static pi set1i(int v) { return P##_set1_epi32(v); }                  \
  static ps min(ps a, ps b) { return P##_min_ps(a, b); }                \
  static ps max(ps a, ps b) { return P##_max_ps(a, b); }                \
  static ps mul(ps a, ps b) { return P##_mul_ps(a, b); }                \
  static ps add(ps a, ps b) { return P##_add_ps(a, b); }                \
  static ps fmadd(ps a, ps b, ps c) { return P##_fmadd_ps(a, b, c); }   \
  static ps fnmadd(ps a, ps b, ps c) { return P##_fnmadd_ps(a, b, c); } \
  static pi to_int(ps a) { return P##_cvtps_epi32(a); }                 \
  static pi half(pi a) { return P##_srai_epi32(a, 1); }                 \
  static pi addi(pi a, pi b) { return P##_add_epi32(a, b); }            \
  static pi subi(pi a, pi b) { return P##_sub_epi32(a, b); }            \
  static ps round(ps a) {                                               \
    return ROUND(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);     \
  }                                                                     \
  static ps exponent(pi e) { return CAST_PS(P##_slli_epi32(e, 23)); }
#if defined(CPU_CAPABILITY_AVX512)
struct ExpIsa {
  HPML_EXP_ISA_COMMON(_mm512, __m512, __m512i, _mm512_roundscale_ps, _mm512_castsi512_ps)
  template <int kPred>
  static ps where(ps a, ps b, ps yes, ps no) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, kPred), no, yes);
  }
};
#else
struct ExpIsa {
  HPML_EXP_ISA_COMMON(_mm256, __m256, __m256i, _mm256_round_ps, _mm256_castsi256_ps)
  template <int kPred>
  static ps where(ps a, ps b, ps yes, ps no) {
    return _mm256_blendv_ps(no, yes, _mm256_cmp_ps(a, b, kPred));
  }
};
#endif
#undef HPML_EXP_ISA_COMMON

// exp in registers, no call: Sleef's expf8/expf16 is an out-of-line call, around which the
// compiler spills every live vector (perf annotate of the BCE forward). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r (about 1 ulp), 2^n built in
// the exponent field. Overflow gives +inf, underflow 0 (no denormal results), NaN stays NaN.
template <typename I>
inline typename I::ps exp_ps(typename I::ps x) {
  using ps = typename I::ps;
  using pi = typename I::pi;
  // ln(FLT_MAX) and ln(FLT_MIN): beyond them the result is +inf / 0.
  const ps hi = I::set1(88.72283935546875f), lo = I::set1(-87.3365447505531f);
  const ps xc = I::min(I::max(x, lo), hi);
  const ps n = I::round(I::mul(xc, I::set1(1.44269504088896341f)));
  ps r = I::fnmadd(n, I::set1(0.693359375f), xc);
  r = I::fnmadd(n, I::set1(-2.12194440e-4f), r);
  ps p = I::set1(1.9875691500e-4f);
  p = I::fmadd(p, r, I::set1(1.3981999507e-3f));
  p = I::fmadd(p, r, I::set1(8.3334519073e-3f));
  p = I::fmadd(p, r, I::set1(4.1665795894e-2f));
  p = I::fmadd(p, r, I::set1(1.6666665459e-1f));
  p = I::fmadd(p, r, I::set1(5.0000001201e-1f));
  const ps r2 = I::mul(r, r);
  const ps y = I::add(I::fmadd(p, r2, r), I::set1(1.0f));
  // 2^n as two factors 2^(n/2) 2^(n - n/2): n reaches 128 near ln(FLT_MAX), past the exponent
  // field of one float.
  const pi ni = I::to_int(n), n1 = I::half(ni);
  const pi bias = I::set1i(127);
  const ps s1 = I::exponent(I::addi(n1, bias));
  const ps s2 = I::exponent(I::addi(I::subi(ni, n1), bias));
  ps out = I::mul(I::mul(y, s1), s2);
  out = I::template where<_CMP_GT_OQ>(x, hi, I::set1(INFINITY), out);
  out = I::template where<_CMP_LT_OQ>(x, lo, I::set1(0.0f), out);
  return I::template where<_CMP_UNORD_Q>(x, x, x, out);  // NaN in, NaN out
}

inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) {
  return exp_ps<ExpIsa>(x);
}
#endif
template <typename T>
inline at::vec::Vectorized<T> vlog1p(const at::vec::Vectorized<T>& x) {
  return x.log1p();
}
template <typename T>
inline at::vec::Vectorized<T> vtanh(const at::vec::Vectorized<T>& x) {
  return x.tanh();
}
template <typename T>
inline at::vec::Vectorized<T> vabs(const at::vec::Vectorized<T>& x) {
  return x.abs();
}
template <typename T>
inline at::vec::Vectorized<T> vmin(const at::vec::Vectorized<T>& a,
                                   const at::vec::Vectorized<T>& b) {
  return at::vec::minimum(a, b);
}
#endif

// ---- log1p on [0, 1] -----------------------------------------------------------------------------
// log1p(u) = 2 atanh(s), s = u / (2 + u) in [0, 1/3]: a division and a polynomial in s^2, no
// range reduction and no bit manipulation, so the same code serves scalars and vectors. Taylor
// terms up to s^14/15: the first one dropped is below (1/9)^8 / 17 = 1.4e-9 relative, and the
// whole stays within a few ulp in fp32 -- where Sleef's general log1pf8 costs ~6x an expf8 (it
// took a third of the CPU forward's time). fp64 keeps the library's log1p.
template <typename T>
C10_HOST_DEVICE inline T log1p_unit_series(T u) {
  const T s = u / (T(2.f) + u);
  const T z = s * s;
  T p = T(1.f / 15.f);
  p = p * z + T(1.f / 13.f);
  p = p * z + T(1.f / 11.f);
  p = p * z + T(1.f / 9.f);
  p = p * z + T(1.f / 7.f);
  p = p * z + T(1.f / 5.f);
  p = p * z + T(1.f / 3.f);
  p = p * z + T(1.f);
  return T(2.f) * s * p;
}
C10_HOST_DEVICE inline float log1p_unit(float u) { return log1p_unit_series(u); }
C10_HOST_DEVICE inline double log1p_unit(double u) { return vlog1p(u); }
#if !defined(__CUDACC__)
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& u) {
  return log1p_unit_series(u);
}
inline at::vec::Vectorized<double> log1p_unit(const at::vec::Vectorized<double>& u) {
  return vlog1p(u);
}
#endif

// ---- activations and their pieces ---------------------------------------------------------------

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): exp never overflows, exp(-|x|) is in [0, 1].
template <typename T>
C10_HOST_DEVICE inline T log_sigmoid(T x) {
  return vmin(x, T(0.f)) - log1p_unit(vexp(-vabs(x)));
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return T(1.f) / (T(1.f) + vexp(-x));
}

// ---- activations of linear_act ------------------------------------------------------------------
// The codes: csrc/constants.h.
using ::hpml::Act;

// Select a where pred is true (scalar or vector predicate from a comparison).
C10_HOST_DEVICE inline float vselect(bool pred, float a, float b) { return pred ? a : b; }
C10_HOST_DEVICE inline double vselect(bool pred, double a, double b) { return pred ? a : b; }
#if !defined(__CUDACC__)
template <typename T>
inline at::vec::Vectorized<T> vselect(const at::vec::Vectorized<T>& pred,
                                      const at::vec::Vectorized<T>& a,
                                      const at::vec::Vectorized<T>& b) {
  return at::vec::Vectorized<T>::blendv(b, a, pred);
}
#endif

// act(z), with torch's formulas: relu keeps NaN (clamp_min), leaky relu is z > 0 ? z : z * slope,
// sigmoid 1 / (1 + exp(-z)). The ReLU/leaky-ReLU mask bit is z > 0, taken by the caller.
template <Act A, typename T>
C10_HOST_DEVICE inline T activate(T z, T slope) {
  if constexpr (A == Act::Relu) {
    return vselect(z < T(0.f), T(0.f), z);
  } else if constexpr (A == Act::LeakyRelu) {
    return vselect(z > T(0.f), z, z * slope);
  } else if constexpr (A == Act::Sigmoid) {
    return sigmoid(z);
  } else if constexpr (A == Act::Tanh) {
    return vtanh(z);
  } else {
    return z;
  }
}

// dL/dz from dL/dy for sigmoid and tanh, from their output y (torch's sigmoid_backward and
// tanh_backward formulas).
template <Act A, typename T>
C10_HOST_DEVICE inline T activation_grad_from_output(T g, T y) {
  if constexpr (A == Act::Sigmoid) {
    return g * ((T(1.f) - y) * y);
  } else if constexpr (A == Act::Tanh) {
    return g * (T(1.f) - y * y);
  } else {
    return g;
  }
}

// ---- binary cross-entropy with logits ----------------------------------------------------------
// loss = (1 - y) x - l_w log(sigmoid(x)),  l_w = 1 + (pw - 1) y  (l_w = 1 without pos_weight).
// Algebraically max(x, 0) - x y + log1p(exp(-|x|)) when l_w = 1, and stable for any finite x.
template <bool HAS_PW, typename T>
C10_HOST_DEVICE inline T bce_logits_loss(T x, T y, T pw) {
  T ls = log_sigmoid(x);
  if constexpr (HAS_PW) {
    ls = ls * ((pw - T(1.f)) * y + T(1.f));
  }
  return (T(1.f) - y) * x - ls;
}

// d loss / d x = (pw y + 1 - y) sigmoid(x) - pw y   (sigmoid(x) - y without pos_weight)
template <bool HAS_PW, typename T>
C10_HOST_DEVICE inline T bce_logits_dinput(T x, T y, T pw) {
  T s = sigmoid(x);
  if constexpr (HAS_PW) {
    T t = pw * y;
    return (t + T(1.f) - y) * s - t;
  } else {
    return s - y;
  }
}

// d loss / d y = log(sigmoid(-x)) - pw log(sigmoid(x))   (-x without pos_weight)
template <bool HAS_PW, typename T>
C10_HOST_DEVICE inline T bce_logits_dtarget(T x, T pw) {
  if constexpr (HAS_PW) {
    return log_sigmoid(-x) - log_sigmoid(x) * pw;
  } else {
    return -x;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace math
}  // namespace hpml
