// hpml::bce_with_logits on CUDA. Forward: one pass over input/target (16-byte loads when the
// pointers allow), per-block sums written as fp32/fp64 partials and added up by a second
// single-block kernel in a fixed order: deterministic, no atomics. Backward: one elementwise pass
// that writes grad_input and grad_target together.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bce_with_logits.h"
#include "common.cuh"
#include "hpml_math.h"

namespace hpml {
namespace {

constexpr int kThreads = 256;
// Elements per block of the forward = one partial sum. Fixed (not derived from the device), so
// the reduction order, hence the bits, are the same on every GPU.
constexpr int64_t kBlockElems = 8192;

using gpu::Pack;

// A broadcast operand read as data[(i / inner) % period]. Kernels with VEC > 1 are launched only
// when every operand is full (data[i]); the index arithmetic lives in the VEC == 1 kernels.
template <typename T>
struct BcastPtr {
  const T* data = nullptr;
  int64_t inner = 1, period = 1;
  bool full = true;
  __device__ __forceinline__ T get(int64_t i) const {
    if (full) return data[i];
    const int64_t q = inner == 1 ? i : i / inner;
    return data[q % period];
  }
};

template <typename T>
BcastPtr<T> bcast_ptr(const std::optional<Bcast>& b, int64_t numel) {
  BcastPtr<T> p;
  if (b) {
    p.data = b->data.const_data_ptr<T>();
    p.inner = b->inner;
    p.period = b->period;
    p.full = b->full(numel);
  }
  return p;
}

// VEC consecutive elements [base, base + VEC) clipped to `end`, widened to acc_t; one 16-byte
// load when VEC > 1 and the pack is whole (the launcher checked the pointers' alignment).
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t base, int64_t end,
                                          acc_t (&v)[VEC]) {
  if (VEC > 1 && base + VEC <= end) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<acc_t>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = base + k < end ? static_cast<acc_t>(p[base + k]) : acc_t(0);
  }
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_pack(const BcastPtr<T>& p, int64_t base, int64_t end,
                                          acc_t (&v)[VEC]) {
  if constexpr (VEC > 1) {
    load_pack<VEC>(p.data, base, end, v);
  } else {
    v[0] = base < end ? static_cast<acc_t>(p.get(base)) : acc_t(0);
  }
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t base, int64_t end,
                                           const acc_t (&v)[VEC]) {
  if (VEC > 1 && base + VEC <= end) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p + base) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (base + k < end) p[base + k] = static_cast<T>(v[k]);
  }
}

template <typename scalar_t, int VEC, bool HAS_W, bool HAS_PW>
__global__ void __launch_bounds__(kThreads)
    bce_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                   BcastPtr<scalar_t> w, BcastPtr<scalar_t> pw, scalar_t* __restrict__ out,
                   at::opmath_type<scalar_t>* __restrict__ partials, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block_start = static_cast<int64_t>(blockIdx.x) * kBlockElems;
  const int64_t end = min(block_start + kBlockElems, n);
  acc_t acc = 0;
  for (int64_t base = block_start + static_cast<int64_t>(threadIdx.x) * VEC; base < end;
       base += static_cast<int64_t>(kThreads) * VEC) {
    acc_t xv[VEC], yv[VEC], wv[VEC], pv[VEC], lv[VEC];
    load_pack<VEC>(x, base, end, xv);
    load_pack<VEC>(y, base, end, yv);
    if constexpr (HAS_W) load_pack<VEC>(w, base, end, wv);
    if constexpr (HAS_PW) load_pack<VEC>(pw, base, end, pv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      lv[k] = math::bce_logits_loss<HAS_PW>(xv[k], yv[k], HAS_PW ? pv[k] : acc_t(1));
      if constexpr (HAS_W) lv[k] *= wv[k];
    }
    if (out != nullptr) {
      store_pack<VEC>(out, base, end, lv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (base + k < end) acc += lv[k];
    }
  }
  if (partials != nullptr) {
    acc_t sum[1] = {acc};
    gpu::block_sum<kThreads>(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum[0];
  }
}

// Sums the partials in a fixed order (strided per thread, then the block tree) into out[0].
constexpr int kSumThreads = 1024;

template <typename scalar_t>
__global__ void __launch_bounds__(kSumThreads)
    bce_sum_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ partials,
                            int64_t nparts, scalar_t* __restrict__ out, int64_t divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t acc[1] = {0};
  for (int64_t i = threadIdx.x; i < nparts; i += kSumThreads) acc[0] += partials[i];
  gpu::block_sum<kSumThreads>(acc);
  if (threadIdx.x == 0) {
    out[0] = static_cast<scalar_t>(divisor > 0 ? acc[0] / static_cast<acc_t>(divisor) : acc[0]);
  }
}

template <typename scalar_t, int VEC, bool HAS_W, bool HAS_PW, bool GRAD_ELEMWISE>
__global__ void __launch_bounds__(kThreads)
    bce_bwd_kernel(const scalar_t* __restrict__ g, int64_t mean_divisor,
                   const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                   BcastPtr<scalar_t> w, BcastPtr<scalar_t> pw, scalar_t* __restrict__ gx,
                   scalar_t* __restrict__ gy, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t gscale = 1;
  if constexpr (!GRAD_ELEMWISE) {
    // The grad of a reduced loss is read on the device: no host synchronisation.
    gscale = static_cast<acc_t>(g[0]);
    if (mean_divisor > 0) gscale /= static_cast<acc_t>(mean_divisor);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
       base < n; base += stride) {
    acc_t xv[VEC], yv[VEC], wv[VEC], pv[VEC], gv[VEC], out[VEC];
    load_pack<VEC>(x, base, n, xv);
    if constexpr (HAS_W) load_pack<VEC>(w, base, n, wv);
    if constexpr (HAS_PW) load_pack<VEC>(pw, base, n, pv);
    if constexpr (GRAD_ELEMWISE) load_pack<VEC>(g, base, n, gv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if constexpr (!GRAD_ELEMWISE) gv[k] = gscale;
      if constexpr (HAS_W) gv[k] = wv[k] * gv[k];
    }
    if (gx != nullptr) {
      load_pack<VEC>(y, base, n, yv);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        out[k] = math::bce_logits_dinput<HAS_PW>(xv[k], yv[k], HAS_PW ? pv[k] : acc_t(1)) * gv[k];
      store_pack<VEC>(gx, base, n, out);
    }
    if (gy != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        out[k] = math::bce_logits_dtarget<HAS_PW>(xv[k], HAS_PW ? pv[k] : acc_t(1)) * gv[k];
      store_pack<VEC>(gy, base, n, out);
    }
  }
}

using gpu::aligned16;

// 16-byte packs need every pointer aligned and every broadcast operand full.
template <typename T>
bool can_vectorize(std::initializer_list<const void*> ptrs, const BcastPtr<T>& w,
                   const BcastPtr<T>& pw) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  for (const BcastPtr<T>* b : {&w, &pw})
    if (b->data != nullptr && (!b->full || !aligned16(b->data))) return false;
  return true;
}

at::Tensor bce_with_logits_cuda(const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceArgs a = prepare_bce(input, target, weight, pos_weight, reduction);
  const int64_t n = a.numel;
  const bool reduce = reduction != at::Reduction::None;
  at::Tensor out = at::empty(reduce ? at::IntArrayRef{} : input.sizes(), a.x.options());
  if (n == 0) {
    if (reduce) out.fill_(reduction == at::Reduction::Mean ? NAN : 0.0);
    return out;
  }
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  TORCH_CHECK(nblocks < (int64_t(1) << 31), "hpml::bce_with_logits: input too large");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "hpml::bce_with_logits (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor partials;
        if (reduce) {
          partials = at::empty({nblocks}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
        const scalar_t* x = a.x.const_data_ptr<scalar_t>();
        const scalar_t* y = a.y.const_data_ptr<scalar_t>();
        scalar_t* o = reduce ? nullptr : out.mutable_data_ptr<scalar_t>();
        acc_t* part = reduce ? partials.mutable_data_ptr<acc_t>() : nullptr;
        constexpr int kVec = gpu::kVec16<scalar_t>;
        dispatch_bool(a.w.has_value(), [&](auto has_w) {
          dispatch_bool(a.pw.has_value(), [&](auto has_pw) {
            constexpr bool HW = decltype(has_w)::value, HP = decltype(has_pw)::value;
            const auto wp = bcast_ptr<scalar_t>(a.w, n), pwp = bcast_ptr<scalar_t>(a.pw, n);
            gpu::dispatch_vec<kVec>(can_vectorize({x, y, o}, wp, pwp), [&](auto vec) {
              gpu::launch<bce_fwd_kernel<scalar_t, decltype(vec)::value, HW, HP>>(
                  nblocks, kThreads, 0, stream, x, y, wp, pwp, o, part, n);
            });
          });
        });
        if (reduce) {
          gpu::launch<bce_sum_partials_kernel<scalar_t>>(
              1, kSumThreads, 0, stream, part, nblocks, out.mutable_data_ptr<scalar_t>(),
              reduction == at::Reduction::Mean ? n : int64_t(0));
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, bool input_grad, bool target_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceArgs a = prepare_bce(input, target, weight, pos_weight, reduction);
  check_bce_grad(grad, input, reduction);
  const int64_t n = a.numel;
  const bool elemwise = reduction == at::Reduction::None;
  const at::Tensor g = grad.to(a.x.scalar_type()).contiguous();
  at::Tensor gx = at::empty(input_grad ? input.sizes() : at::IntArrayRef{0}, a.x.options());
  at::Tensor gy = at::empty(target_grad ? input.sizes() : at::IntArrayRef{0}, a.x.options());
  if (n == 0 || !(input_grad || target_grad)) return {gx, gy};
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "hpml::bce_with_logits_backward (CUDA)", [&] {
        constexpr int kVec = gpu::kVec16<scalar_t>;
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const scalar_t* x = a.x.const_data_ptr<scalar_t>();
        const scalar_t* y = a.y.const_data_ptr<scalar_t>();
        scalar_t* gxp = input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gyp = target_grad ? gy.mutable_data_ptr<scalar_t>() : nullptr;
        const int64_t mean_div = reduction == at::Reduction::Mean ? n : 0;
        dispatch_bool(a.w.has_value(), [&](auto has_w) {
          dispatch_bool(a.pw.has_value(), [&](auto has_pw) {
            dispatch_bool(elemwise, [&](auto grad_elemwise) {
              constexpr bool HW = decltype(has_w)::value, HP = decltype(has_pw)::value,
                             GE = decltype(grad_elemwise)::value;
              const auto wp = bcast_ptr<scalar_t>(a.w, n), pwp = bcast_ptr<scalar_t>(a.pw, n);
              const bool vec = can_vectorize({x, y, gxp, gyp, GE ? gp : nullptr}, wp, pwp);
              gpu::dispatch_vec<kVec>(vec, [&](auto v) {
                constexpr int V = decltype(v)::value;
                const int64_t per_block = int64_t(kThreads) * V;
                const int64_t blocks =
                    std::min<int64_t>((n + per_block - 1) / per_block, int64_t(sms) * 16);
                gpu::launch<bce_bwd_kernel<scalar_t, V, HW, HP, GE>>(
                    blocks, kThreads, 0, stream, gp, mean_div, x, y, wp, pwp, gxp, gyp, n);
              });
            });
          });
        });
      });
  return {gx, gy};
}

}  // namespace

HPML_REGISTER_KERNELS(bce_with_logits, CUDA, _cuda)

}  // namespace hpml
