// hpml::mlp and hpml::mlp_backward on CUDA, the whole network in one op call.
//
// Forward of a narrow fp16/bf16 net (no batch norm, at most kMaxLayers layers, every width, the
// input's included, at most kMaxWidth): one kernel, mlp_fused_fwd_kernel. A block takes kRows
// rows through every layer: the rows' activations stay in shared memory between layers (zero
// padded to a multiple of 16 columns), each layer's weight streams through shared memory kChunk
// input columns at a time, the products run on the tensor cores (WMMA 16x16x16, fp32
// accumulation, the same k order as linear_act's kernel), and the epilogue adds the bias, applies
// the activation, writes the ReLU mask and the layer's output (the backward reads it; it is what
// the per-layer path saves) and, rounded to the dtype as that output is, the next layer's input.
// Any batch: the last block's missing rows are zeros that are never stored.
// The backward of the same nets: one kernel down through every layer for a block of rows
// (mlp_fused_bwd_kernel: each layer's dZ and the input's gradient, dZ of the layer above held in
// shared memory), then each layer's dW and db from its dZ by linear_act's kernels (products over
// all rows: deterministic, no atomics). Every other net (batch norm, wider layers, fp32/fp64,
// HPML_MLP_KERNEL=layers) runs layer by layer through the library's CUDA kernels inside the op
// (csrc/mlp.h); the saved tensors are the same either way.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Reduction.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "hpml_math.h"
#include "mlp.h"
#include "mlp_fused.cuh"

namespace hpml {
namespace {

constexpr int kMaxLayers = 8;
constexpr int kMaxWidth = 128;
constexpr int kRows = 32;     // rows per block
constexpr int kChunk = 32;    // input columns of a layer's weight in shared memory at a time
constexpr int kThreads = 128;  // 4 warps
// Shared-memory leading dimensions: multiples of 8 elements (16 bytes; WMMA's requirement for
// 16-bit operands, 4 for the fp32 accumulator), padded against bank conflicts.
constexpr int kLdH = kMaxWidth + 8, kLdW = kMaxWidth + 8, kLdC = kMaxWidth + 4;

template <typename T>
struct Wmma;
template <>
struct Wmma<at::Half> {
  using type = __half;
};
template <>
struct Wmma<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The layers, by value (kernel parameter space): layer i maps d[i] columns to d[i + 1].
template <typename T>
struct Layers {
  const T* w[kMaxLayers];  // (d[i + 1], d[i]), contiguous
  const T* b[kMaxLayers];  // (d[i + 1]) or null
  T* out[kMaxLayers];  // (M, d[i + 1]): hidden outputs, then the net's output
  uint8_t* mask[kMaxLayers];  // (M, ceil(d[i + 1] / 8)) or null
  int d[kMaxLayers + 1];
  int n;
};

template <typename acc_t>
__device__ __forceinline__ acc_t activate(Act a, acc_t z, acc_t slope) {
  switch (a) {
    case Act::Relu: return math::activate<Act::Relu>(z, slope);
    case Act::LeakyRelu: return math::activate<Act::LeakyRelu>(z, slope);
    case Act::Sigmoid: return math::activate<Act::Sigmoid>(z, slope);
    case Act::Tanh: return math::activate<Act::Tanh>(z, slope);
    default: return z;
  }
}

constexpr int round16(int n) { return (n + 15) / 16 * 16; }

// cs[kRows x n_pad] = as[kRows x k_pad] B[k_pad x n_pad] on the tensor cores, B streamed through
// ws kChunk rows at a time, zero outside K x N: the forward's B is the layer's weight w (N, K)
// transposed (WT), the backward's the weight of the layer above, w (K, N), as it is. as must be
// zero in its columns [K, k_pad). Ends with a barrier: cs is complete, as and ws free.
template <typename T, bool WT>
__device__ __forceinline__ void block_product(const T* as, T* ws, float* cs, const T* w, int K,
                                              int N) {
  using namespace nvcuda;
  using W = typename Wmma<T>::type;
  const int k_pad = round16(K), n_pad = round16(N), warp = threadIdx.x / 32;
  // Warp w: row fragment w % 2, column fragments w / 2, w / 2 + 2, ... (up to 4 of 8).
  const int rf = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) wmma::fill_fragment(acc[t], 0.0f);
  for (int k0 = 0; k0 < k_pad; k0 += kChunk) {
    // ws[k][n] = B[k0 + k, n], each thread walking w's contiguous dimension.
    for (int idx = threadIdx.x; idx < n_pad * kChunk; idx += kThreads) {
      const int n = WT ? idx / kChunk : idx % n_pad, k = WT ? idx % kChunk : idx / n_pad;
      const int64_t off = WT ? static_cast<int64_t>(n) * K + k0 + k
                             : static_cast<int64_t>(k0 + k) * N + n;
      ws[k * kLdW + n] = (n < N && k0 + k < K) ? w[off] : T(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kChunk && k0 + kk < k_pad; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, reinterpret_cast<const W*>(as) + 16 * rf * kLdH + k0 + kk, kLdH);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int cf = warp / 2 + 2 * t;
        if (16 * cf >= n_pad) break;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, reinterpret_cast<const W*>(ws) + kk * kLdW + 16 * cf, kLdW);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int cf = warp / 2 + 2 * t;
    if (16 * cf >= n_pad) break;
    wmma::store_matrix_sync(cs + 16 * rf * kLdC + 16 * cf, acc[t], kLdC, wmma::mem_row_major);
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mlp_fused_fwd_kernel(const T* x, int64_t ldx, Layers<T> p, int64_t M, Act hidden_act,
                         Act out_act, float slope) {
  __shared__ __align__(128) T hs[kRows * kLdH];  // the rows' current layer input
  __shared__ __align__(128) T ws[kChunk * kLdW];  // W^T rows [k0, k0 + kChunk)
  __shared__ __align__(128) float cs[kRows * kLdC];  // the accumulators
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;

  // The input rows, zero outside the batch and past d[0] (up to the padded width).
  const int k_pad0 = round16(p.d[0]);
  for (int idx = threadIdx.x; idx < kRows * k_pad0; idx += kThreads) {
    const int r = idx / k_pad0, c = idx % k_pad0;
    const int64_t m = m0 + r;
    hs[r * kLdH + c] = (m < M && c < p.d[0]) ? x[m * ldx + c] : T(0);
  }
  __syncthreads();

  for (int l = 0; l < p.n; ++l) {
    const int K = p.d[l], N = p.d[l + 1], n_pad = round16(N);
    block_product<T, true>(hs, ws, cs, p.w[l], K, N);

    // Epilogue, 8 columns (one mask byte) per thread at a time.
    const bool last = l == p.n - 1;
    const Act a = last ? out_act : hidden_act;
    const T* bias = p.b[l];
    T* out = p.out[l];
    uint8_t* mask = p.mask[l];
    const int64_t mask_ld = (N + 7) / 8;
    for (int idx = threadIdx.x; idx < kRows * (n_pad / 8); idx += kThreads) {
      const int r = idx / (n_pad / 8), c0 = (idx % (n_pad / 8)) * 8;
      const int64_t m = m0 + r;
      uint8_t byte = 0;
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        const int c = c0 + v;
        T o = T(0);
        if (c < N) {
          float z = cs[r * kLdC + c];
          if (bias != nullptr) z += static_cast<float>(bias[c]);
          // ReLU's bit is also set for NaN (torch's backward passes its gradient there).
          const bool on = a == Act::Relu ? !(z <= 0.0f) : z > 0.0f;
          byte |= static_cast<uint8_t>(on) << v;
          o = static_cast<T>(activate(a, z, slope));
          if (m < M) out[m * N + c] = o;
        }
        if (!last) hs[r * kLdH + c] = o;  // the next layer's input, zero past N
      }
      if (mask != nullptr && m < M && c0 < N) mask[m * mask_ld + c0 / 8] = byte;
    }
    __syncthreads();
  }
}

// The backward's view of the layers: layer i's weight (d[i + 1], d[i]), the mask (relu, leaky
// relu) or output (sigmoid, tanh) its activation's derivative reads, and its dZ (out).
template <typename T>
struct BackLayers {
  const T* w[kMaxLayers];
  const uint8_t* mask[kMaxLayers];  // (M, ceil(d[i + 1] / 8)) or null
  const T* y[kMaxLayers];  // (M, d[i + 1]) or null
  T* dz[kMaxLayers];  // (M, d[i + 1])
  int d[kMaxLayers + 1];
  int n;
};

// dZ = dY * act'(.) from the mask or the output, as linear_act's backward (torch's formulas).
template <typename T>
__device__ __forceinline__ float act_grad(Act a, float g, const uint8_t* mask, const T* y,
                                          int64_t m, int c, int N, float slope) {
  if (a == Act::Relu || a == Act::LeakyRelu) {
    const bool on = (mask[m * ((N + 7) / 8) + (c >> 3)] >> (c & 7)) & 1;
    // A select, as torch's threshold_backward: a NaN gradient where the mask is off is 0.
    return on ? g : (a == Act::Relu ? 0.0f : g * slope);
  }
  if (a == Act::Sigmoid) {
    return math::activation_grad_from_output<Act::Sigmoid>(g, static_cast<float>(y[m * N + c]));
  }
  if (a == Act::Tanh) {
    return math::activation_grad_from_output<Act::Tanh>(g, static_cast<float>(y[m * N + c]));
  }
  return g;
}

// The loss the backward starts from (target null: none): operands of the logits' shape,
// contiguous; g is then the loss's gradient, per element (elemwise) or one value (divided by
// mean_div when that is not 0).
template <typename T>
struct Loss {
  const T* logits;
  const T* target;
  const T* weight;  // or null
  const T* pos_weight;  // or null
  T* target_grad;  // or null
  int64_t mean_div;
  bool elemwise;
};

// dY of the net's output from the loss at (m, c), and the target's gradient there when asked
// for: the arithmetic of bce_with_logits' backward kernel (csrc/cuda/bce_with_logits.cu).
template <typename T>
__device__ __forceinline__ T loss_grad(const Loss<T>& loss, const T* g, float gscale, int64_t i) {
  float gv = loss.elemwise ? static_cast<float>(g[i]) : gscale;
  if (loss.weight != nullptr) gv = static_cast<float>(loss.weight[i]) * gv;
  const float x = static_cast<float>(loss.logits[i]), y = static_cast<float>(loss.target[i]);
  float dx, dy;
  if (loss.pos_weight != nullptr) {
    const float pw = static_cast<float>(loss.pos_weight[i]);
    dx = math::bce_logits_dinput<true>(x, y, pw);
    dy = math::bce_logits_dtarget<true>(x, pw);
  } else {
    dx = math::bce_logits_dinput<false>(x, y, 1.0f);
    dy = math::bce_logits_dtarget<false>(x, 1.0f);
  }
  if (loss.target_grad != nullptr) loss.target_grad[i] = static_cast<T>(dy * gv);
  return static_cast<T>(dx * gv);
}

// The backward of a block of kRows rows down through every layer: dZ of the last layer from the
// output's gradient (or from the loss, with the target's gradient in the same pass), then
// dY_i = dZ_{i+1} W_{i+1} on the tensor cores (dZ_{i+1} held in shared memory; dY and dZ rounded
// to the dtype as the per-layer path rounds them) and dZ_i = dY_i * act'; every dZ written (each
// layer's dW and db are products over all rows, left to linear_act's kernels: deterministic),
// and dX = dZ_0 W_0 when gx is given.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mlp_fused_bwd_kernel(const T* g, BackLayers<T> p, Loss<T> loss, T* gx, int64_t M,
                         Act hidden_act, Act out_act, float slope) {
  __shared__ __align__(128) T gs[kRows * kLdH];  // dZ of the layer above
  __shared__ __align__(128) T ws[kChunk * kLdW];
  __shared__ __align__(128) float cs[kRows * kLdC];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int L = p.n;
  float gscale = 1.0f;
  if (loss.target != nullptr && !loss.elemwise) {
    // The grad of a reduced loss is read on the device: no host synchronisation.
    gscale = static_cast<float>(g[0]);
    if (loss.mean_div > 0) gscale /= static_cast<float>(loss.mean_div);
  }
  for (int i = L - 1; i >= -1; --i) {
    const int N = p.d[i + 1], n_pad = round16(N);
    if (i < L - 1) {
      if (i < 0 && gx == nullptr) break;
      block_product<T, false>(gs, ws, cs, p.w[i + 1], p.d[i + 2], N);
    }
    const Act a = i == L - 1 ? out_act : hidden_act;
    for (int idx = threadIdx.x; idx < kRows * n_pad; idx += kThreads) {
      const int r = idx / n_pad, c = idx % n_pad;
      const int64_t m = m0 + r;
      T o = T(0);
      if (c < N && m < M) {
        // dY rounded to the dtype, as the per-layer path (and torch) materialise it
        const T dy_t = i < L - 1             ? static_cast<T>(cs[r * kLdC + c])
                       : loss.target != nullptr ? loss_grad(loss, g, gscale, m * N + c)
                                                : g[m * N + c];
        const float dy = static_cast<float>(dy_t);
        o = static_cast<T>(i < 0 ? dy : act_grad(a, dy, p.mask[i], p.y[i], m, c, N, slope));
        (i < 0 ? gx : p.dz[i])[m * N + c] = o;
      }
      gs[r * kLdH + c] = o;  // zero outside the batch and past N
    }
    __syncthreads();
  }
}

bool layers_forced() {
  const char* v = std::getenv("HPML_MLP_KERNEL");
  return v != nullptr && std::strcmp(v, "layers") == 0;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cuda(
    const at::Tensor& input, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, OptTensorList bn_biases,
    OptTensorList running_means, OptTensorList running_vars, bool training, double eps,
    int64_t activation, double negative_slope, int64_t output_activation) {
  check_mlp(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
            running_vars, training, eps, activation, output_activation);
  if (!mlp_cuda_fusable(input, weights, batch_norm)) {
    return mlp_layers(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
                      running_vars, training, eps, activation, negative_slope, output_activation);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), L = static_cast<int64_t>(weights.size());
  const Act act = static_cast<Act>(activation), out_act = static_cast<Act>(output_activation);
  const at::Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  std::vector<at::Tensor> ws, bs, outs, masks, saved;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t n = weights[i].size(0);
    const Act a = i == L - 1 ? out_act : act;
    ws.push_back(weights[i].contiguous());
    const OptTensor b = opt_at(biases, i);
    bs.push_back(b.has_value() ? b->contiguous() : at::Tensor());
    outs.push_back(at::empty({M, n}, input.options()));
    masks.push_back(at::empty(act_uses_mask(a) ? at::IntArrayRef{M, mask_row_bytes(n)}
                                               : at::IntArrayRef{0},
                              input.options().dtype(at::kByte)));
  }
  for (int64_t i = 0; i + 1 < L; ++i) {
    saved.insert(saved.end(), {outs[i], masks[i]});
    for (int j = 0; j < kMlpSavedPerLayer - 2; ++j)
      saved.push_back(at::empty({0}, input.options()));
  }
  saved.push_back(masks[L - 1]);
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    Layers<scalar_t> p{};
    p.n = static_cast<int>(L);
    p.d[0] = static_cast<int>(input.size(1));
    for (int64_t i = 0; i < L; ++i) {
      p.w[i] = ws[i].const_data_ptr<scalar_t>();
      p.b[i] = bs[i].defined() ? bs[i].const_data_ptr<scalar_t>() : nullptr;
      p.out[i] = outs[i].mutable_data_ptr<scalar_t>();
      p.mask[i] = masks[i].numel() ? masks[i].mutable_data_ptr<uint8_t>() : nullptr;
      p.d[i + 1] = static_cast<int>(weights[i].size(0));
    }
    gpu::launch<mlp_fused_fwd_kernel<scalar_t>>(
        dim3(static_cast<unsigned>((M + kRows - 1) / kRows)), dim3(kThreads), 0,
        at::cuda::getCurrentCUDAStream(), x.const_data_ptr<scalar_t>(), x.stride(0), p, M, act,
        out_act, static_cast<float>(negative_slope));
  };
  if (input.scalar_type() == at::kHalf) {
    run(at::Half{});
  } else {
    run(at::BFloat16{});
  }
  return {outs[L - 1], saved};
}

// The backward of a net the fused forward ran (or the per-layer path: the saved tensors are the
// same), csrc/mlp.h's layer-by-layer path for other nets.
MlpGrads mlp_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                           const at::Tensor& output, at::TensorList weights, OptTensorList biases,
                           const c10::List<bool>& batch_norm, OptTensorList bn_weights,
                           at::TensorList saved, bool training, int64_t activation,
                           double negative_slope, int64_t output_activation, bool input_grad,
                           const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
                           const c10::List<bool>& bn_weight_grads,
                           const c10::List<bool>& bn_bias_grads) {
  check_mlp_backward(grad, input, output, weights, biases, batch_norm, bn_weights, saved,
                     training, activation, output_activation, weight_grads, bias_grads,
                     bn_weight_grads, bn_bias_grads);
  if (!mlp_cuda_fusable(input, weights, batch_norm)) {
    return mlp_backward_layers(grad, input, output, weights, biases, batch_norm, bn_weights,
                               saved, training, activation, negative_slope, output_activation,
                               input_grad, weight_grads, bias_grads, bn_weight_grads,
                               bn_bias_grads);
  }
  return mlp_cuda_fused_backward(grad, input, output, weights, biases, saved, activation,
                                 negative_slope, output_activation, input_grad, weight_grads,
                                 bias_grads, nullptr);
}

}  // namespace

HPML_REGISTER_KERNELS(mlp, CUDA, _cuda)

inline namespace HPML_LIB_NAMESPACE {  // csrc/common.h

bool mlp_cuda_fusable(const at::Tensor& input, at::TensorList weights,
                      const c10::List<bool>& batch_norm) {
  const auto dt = input.scalar_type();
  if (layers_forced() || (dt != at::kHalf && dt != at::kBFloat16)) return false;
  if (weights.empty() || weights.size() > kMaxLayers || input.dim() != 2) return false;
  if (input.size(0) == 0 || input.size(0) > (int64_t(1) << 36)) return false;
  if (input.size(1) > kMaxWidth) return false;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i].size(0) > kMaxWidth) return false;
    if (i + 1 < weights.size() && batch_norm.get(i)) return false;
  }
  return true;
}

MlpGrads mlp_cuda_fused_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& output,
    at::TensorList weights, OptTensorList biases, at::TensorList saved, int64_t activation,
    double negative_slope, int64_t output_activation, bool input_grad,
    const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
    const MlpCudaLoss* loss) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), L = static_cast<int64_t>(weights.size());
  const Act act = static_cast<Act>(activation), out_act = static_cast<Act>(output_activation);
  const auto none = [&] { return at::empty({0}, input.options()); };
  const at::Tensor g = grad.contiguous(), y = output.contiguous();
  std::vector<at::Tensor> ws, dzs;
  for (int64_t i = 0; i < L; ++i) {
    ws.push_back(weights[i].contiguous());
    dzs.push_back(at::empty({M, weights[i].size(0)}, input.options()));
  }
  at::Tensor gx = input_grad ? at::empty({M, input.size(1)}, input.options()) : none();
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    BackLayers<scalar_t> p{};
    p.n = static_cast<int>(L);
    p.d[0] = static_cast<int>(input.size(1));
    for (int64_t i = 0; i < L; ++i) {
      const bool top = i == L - 1;
      const Act a = top ? out_act : act;
      const at::Tensor& mask = top ? saved.back() : saved[kMlpSavedPerLayer * i + 1];
      const at::Tensor& out = top ? y : saved[kMlpSavedPerLayer * i];
      p.w[i] = ws[i].const_data_ptr<scalar_t>();
      p.mask[i] = act_uses_mask(a) ? mask.const_data_ptr<uint8_t>() : nullptr;
      p.y[i] = act_uses_output(a) ? out.const_data_ptr<scalar_t>() : nullptr;
      p.dz[i] = dzs[i].mutable_data_ptr<scalar_t>();
      p.d[i + 1] = static_cast<int>(weights[i].size(0));
    }
    Loss<scalar_t> l{};
    if (loss != nullptr) {
      const auto ptr = [](const at::Tensor& t) {
        return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
      };
      l = {y.const_data_ptr<scalar_t>(), ptr(loss->target), ptr(loss->weight),
           ptr(loss->pos_weight),
           loss->target_grad.defined() ? loss->target_grad.mutable_data_ptr<scalar_t>() : nullptr,
           loss->reduction == at::Reduction::Mean ? y.numel() : 0,
           loss->reduction == at::Reduction::None};
    }
    gpu::launch<mlp_fused_bwd_kernel<scalar_t>>(
        dim3(static_cast<unsigned>((M + kRows - 1) / kRows)), dim3(kThreads), 0,
        at::cuda::getCurrentCUDAStream(), g.const_data_ptr<scalar_t>(), p, l,
        input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr, M, act, out_act,
        static_cast<float>(negative_slope));
  };
  if (input.scalar_type() == at::kHalf) {
    run(at::Half{});
  } else {
    run(at::BFloat16{});
  }
  std::vector<at::Tensor> gw, gb;
  for (int64_t i = 0; i < L; ++i) {
    const bool wg = weight_grads.get(i), bg = bias_grads.get(i) && !mlp_absent(biases[i]);
    at::Tensor dw = none(), db = none();
    if (wg || bg) {
      const at::Tensor& a = i == 0 ? input : saved[kMlpSavedPerLayer * (i - 1)];
      std::tie(std::ignore, dw, db) = mlp_ops::linear_act_backward(
          dzs[i], a, weights[i], none(), at::empty({0}, input.options().dtype(at::kByte)),
          static_cast<int64_t>(Act::None), 0.0, false, wg, bg);
    }
    gw.push_back(dw);
    gb.push_back(db);
  }
  // No batch norm in a net this kernel takes: its batch-norm gradient lists hold an empty tensor
  // per hidden layer.
  std::vector<at::Tensor> gbw, gbb;
  for (int64_t i = 0; i + 1 < L; ++i) {
    gbw.push_back(none());
    gbb.push_back(none());
  }
  return {gx, gw, gb, gbw, gbb};
}

}  // namespace HPML_LIB_NAMESPACE
}  // namespace hpml
