// hpml::linear_act on CUDA: one shared-memory tiled GEMM template serving the forward and both
// backward products.
//   forward  Y[M,N]  = act(X[M,K] W[N,K]^T + b), epilogue: bias, activation, bit-packed mask
//   backward dX[M,K] = dZ[M,N] W[N,K],  dW[N,K] = dZ^T[N,M] X[M,K],  dZ = dY * act'(.)
// dZ is formed while its tiles are loaded (the prologue), never written out. fp16/bf16 multiply
// on the tensor cores (WMMA 16x16x16, fp32 accumulation); fp32/fp64 on the FMA units (SIMT, 4x4
// outputs per thread). Plain operands move in 16-byte packs when aligned. The bias gradient is a
// separate deterministic column reduction of dZ (fixed order, no atomics).
// Operands are K-contiguous (a row stride is allowed); the launcher copies the rare others.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "common.cuh"
#include "linear_act.h"

namespace hpml {
namespace {

using gpu::Pack;

template <typename T>
constexpr int kVec = gpu::kVec16<T>;

// ---- operand sources: element (r, c) of a tile's global coordinates --------------------------

// Element (r, c) of a plain operand: src[r * ld + c] (row-major, contiguous along c) or, for
// COL_MAJOR, src[c * ld + r] (contiguous along r).
template <typename T, bool COL_MAJOR>
struct Strided {
  static constexpr bool kContigCols = !COL_MAJOR;
  static constexpr int kPack = kVec<T>;
  const T* p;
  int64_t ld;
  bool vec;  // 16-byte packs allowed: p aligned and ld a multiple of the pack
  __device__ __forceinline__ int64_t offset(int64_t r, int64_t c) const {
    return COL_MAJOR ? c * ld + r : r * ld + c;
  }
  __device__ __forceinline__ T get(int64_t r, int64_t c) const { return p[offset(r, c)]; }
  __device__ __forceinline__ Pack<T, kPack> pack(int64_t r, int64_t c) const {
    return *reinterpret_cast<const Pack<T, kPack>*>(p + offset(r, c));
  }
};
template <typename T>
using RowMajor = Strided<T, false>;
template <typename T>
using ColMajor = Strided<T, true>;

// dZ[m, n] = dY[m, n] * act'(.), from dY and the mask (relu, leaky relu) or the output.
template <typename T, Act A>
struct Dz {
  using acc_t = at::opmath_type<T>;
  const T* g;
  int64_t ldg;
  const T* y;  // output, row-major (M, N): sigmoid / tanh
  const uint8_t* mask;  // (M, ceil(N / 8)): relu / leaky relu
  int64_t n_cols, mask_ld;
  acc_t slope;
  __device__ __forceinline__ acc_t value(int64_t m, int64_t n) const {
    const acc_t gv = static_cast<acc_t>(g[m * ldg + n]);
    if constexpr (A == Act::Relu || A == Act::LeakyRelu) {
      const bool on = (mask[m * mask_ld + (n >> 3)] >> (n & 7)) & 1;
      // A select, as torch's threshold_backward: a NaN gradient where the mask is off is 0.
      return on ? gv : (A == Act::Relu ? acc_t(0) : gv * slope);
    } else if constexpr (A == Act::Sigmoid || A == Act::Tanh) {
      return math::activation_grad_from_output<A>(gv, static_cast<acc_t>(y[m * n_cols + n]));
    } else {
      return gv;
    }
  }
};

// A tile of dZ, formed from dY while it is loaded: rows m, columns n (the dX product,
// contiguous along columns) or, TRANSPOSED, dZ^T with rows n, columns m (the dW product,
// contiguous along rows).
template <typename T, Act A, bool TRANSPOSED>
struct DzTile {
  static constexpr bool kContigCols = !TRANSPOSED;
  static constexpr int kPack = 1;
  Dz<T, A> dz;
  bool vec = false;
  __device__ __forceinline__ T get(int64_t r, int64_t c) const {
    return T(TRANSPOSED ? dz.value(c, r) : dz.value(r, c));
  }
  __device__ __forceinline__ Pack<T, 1> pack(int64_t r, int64_t c) const { return {get(r, c)}; }
};

// Copies a ROWS x COLS tile, global rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) limited to
// R x C (zero outside), into smem[r * LD + c]. Threads walk the source's contiguous dimension.
template <int ROWS, int COLS, int LD, int THREADS, typename T, typename Src>
__device__ __forceinline__ void load_tile(T* smem, const Src& src, int64_t r0, int64_t c0,
                                          int64_t R, int64_t C) {
  constexpr int P = Src::kPack;
  if constexpr (Src::kContigCols) {
    static_assert(COLS % P == 0, "tile width must hold whole packs");
#pragma unroll 1
    for (int idx = threadIdx.x; idx < ROWS * (COLS / P); idx += THREADS) {
      const int r = idx / (COLS / P), c = (idx % (COLS / P)) * P;
      const int64_t gr = r0 + r, gc = c0 + c;
      if (P > 1 && src.vec && gr < R && gc + P <= C) {
        const auto pk = src.pack(gr, gc);
#pragma unroll
        for (int v = 0; v < P; ++v) smem[r * LD + c + v] = pk.v[v];
      } else {
#pragma unroll
        for (int v = 0; v < P; ++v)
          smem[r * LD + c + v] = (gr < R && gc + v < C) ? src.get(gr, gc + v) : T(0);
      }
    }
  } else {
    static_assert(ROWS % P == 0, "tile height must hold whole packs");
#pragma unroll 1
    for (int idx = threadIdx.x; idx < COLS * (ROWS / P); idx += THREADS) {
      const int c = idx / (ROWS / P), r = (idx % (ROWS / P)) * P;
      const int64_t gr = r0 + r, gc = c0 + c;
      if (P > 1 && src.vec && gc < C && gr + P <= R) {
        const auto pk = src.pack(gr, gc);
#pragma unroll
        for (int v = 0; v < P; ++v) smem[(r + v) * LD + c] = pk.v[v];
      } else {
#pragma unroll
        for (int v = 0; v < P; ++v)
          smem[(r + v) * LD + c] = (gr + v < R && gc < C) ? src.get(gr + v, gc) : T(0);
      }
    }
  }
}

// ---- tile configurations ------------------------------------------------------------------------

template <typename T>
struct Cfg;  // BM x BN outputs per block, BK deep, THREADS threads

template <>
struct Cfg<at::Half> {
  static constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
  static constexpr bool kMma = true;
  using wmma_t = __half;
};
template <>
struct Cfg<at::BFloat16> {
  static constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
  static constexpr bool kMma = true;
  using wmma_t = __nv_bfloat16;
};
template <>
struct Cfg<float> {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
  static constexpr bool kMma = false;
};
template <>
struct Cfg<double> {
  static constexpr int BM = 64, BN = 64, BK = 8, THREADS = 256;
  static constexpr bool kMma = false;
};

// Shared-memory leading dimensions: padded against bank conflicts; for WMMA multiples of 8
// elements (16 bytes) so every fragment pointer is 32-byte aligned.
template <typename T>
struct Lds {
  static constexpr int A = Cfg<T>::kMma ? Cfg<T>::BK + 8 : Cfg<T>::BK + 1;
  static constexpr int B = Cfg<T>::kMma ? Cfg<T>::BN + 8 : Cfg<T>::BN;
  static constexpr int C = Cfg<T>::kMma ? Cfg<T>::BN + 4 : Cfg<T>::BN + 1;
};

// ---- epilogues: consume the accumulator tile from shared memory ---------------------------------

// Y = act(C + b), plus the mask byte of each 8 columns. Each thread takes groups of 8 columns:
// a group is exactly one mask byte (n0 is a multiple of 8).
template <typename T, Act A>
struct ForwardEpilogue {
  using acc_t = at::opmath_type<T>;
  T* y;
  const T* bias;  // or null
  uint8_t* mask;  // or null
  int64_t M, N, mask_ld;
  acc_t slope;
  bool vec;  // y and N allow 16-byte stores of 8 elements (T of 2 bytes) / two packs
  template <int BM, int BN, int LDC, int THREADS>
  __device__ __forceinline__ void operator()(const acc_t* cs, int64_t m0, int64_t n0) const {
    for (int idx = threadIdx.x; idx < BM * (BN / 8); idx += THREADS) {
      const int r = idx / (BN / 8), cg = (idx % (BN / 8)) * 8;
      const int64_t m = m0 + r, n = n0 + cg;
      if (m >= M || n >= N) continue;
      uint8_t byte = 0;
      T out[8];
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        acc_t z = cs[r * LDC + cg + v];
        if (bias != nullptr && n + v < N) z += static_cast<acc_t>(bias[n + v]);
        // ReLU's bit is also set for NaN (torch's backward passes its gradient there).
        const bool on = A == Act::Relu ? !(z <= acc_t(0)) : z > acc_t(0);
        byte |= static_cast<uint8_t>(n + v < N && on) << v;
        out[v] = static_cast<T>(math::activate<A>(z, slope));
      }
      T* dst = y + m * N + n;
      if (vec && n + 8 <= N) {
        constexpr int P = kVec<T>;
#pragma unroll
        for (int q = 0; q < 8 / P; ++q) {
          Pack<T, P> pk;
#pragma unroll
          for (int v = 0; v < P; ++v) pk.v[v] = out[q * P + v];
          *reinterpret_cast<Pack<T, P>*>(dst + q * P) = pk;
        }
      } else {
        for (int v = 0; v < 8 && n + v < N; ++v) dst[v] = out[v];
      }
      if (mask != nullptr) mask[m * mask_ld + (n >> 3)] = byte;
    }
  }
};

// C stored as is (row-major, leading dimension ld): dX and dW.
template <typename T>
struct StoreEpilogue {
  using acc_t = at::opmath_type<T>;
  T* c;
  int64_t M, N, ld;
  template <int BM, int BN, int LDC, int THREADS>
  __device__ __forceinline__ void operator()(const acc_t* cs, int64_t m0, int64_t n0) const {
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS) {
      const int r = idx / BN, cc = idx % BN;
      const int64_t m = m0 + r, n = n0 + cc;
      if (m < M && n < N) c[m * ld + n] = static_cast<T>(cs[r * LDC + cc]);
    }
  }
};

// ---- the GEMM -------------------------------------------------------------------------------------

// C[M, N] = A[M, K] B[K, N], tile (blockIdx.y, blockIdx.x), handed to the epilogue.
template <typename T, typename ASrc, typename BSrc, typename Epi>
__global__ void __launch_bounds__(Cfg<T>::THREADS)
    gemm_kernel(ASrc a, BSrc b, Epi epi, int64_t M, int64_t N, int64_t K) {
  using C = Cfg<T>;
  using acc_t = at::opmath_type<T>;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, THREADS = C::THREADS;
  constexpr int LDA = Lds<T>::A, LDB = Lds<T>::B, LDC = Lds<T>::C;
  __shared__ __align__(128) T As[BM * LDA];
  __shared__ __align__(128) T Bs[BK * LDB];
  __shared__ __align__(128) acc_t Cs[BM * LDC];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;

  if constexpr (C::kMma) {
    using namespace nvcuda;
    using W = typename C::wmma_t;
    // 4 warps in 2 x 2, each 32 x 32 outputs = 2 x 2 fragments of 16 x 16.
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      load_tile<BM, BK, LDA, THREADS>(As, a, m0, k0, M, K);
      load_tile<BK, BN, LDB, THREADS>(Bs, b, k0, n0, K, N);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], reinterpret_cast<const W*>(As) + (wm + 16 * i) * LDA + kk,
                                 LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], reinterpret_cast<const W*>(Bs) + kk * LDB + wn + 16 * j,
                                 LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC,
                                wmma::mem_row_major);
  } else {
    // 16 x 16 threads, each 4 x 4 outputs strided by 16 (conflict-free shared reads).
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    acc_t acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      load_tile<BM, BK, LDA, THREADS>(As, a, m0, k0, M, K);
      load_tile<BK, BN, LDB, THREADS>(Bs, b, k0, n0, K, N);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        acc_t av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[(ty + 16 * i) * LDA + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * LDB + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * LDC + tx + 16 * j] = acc[i][j];
  }
  __syncthreads();
  epi.template operator()<BM, BN, LDC, THREADS>(Cs, m0, n0);
}

// db[n] = sum_m dZ[m, n]: 32 columns x 8 row lanes per block, the 8 lanes added in a fixed order.
template <typename T, Act A>
__global__ void __launch_bounds__(256) bias_grad_kernel(Dz<T, A> dz, T* db, int64_t M, int64_t N) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t part[8][33];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t s = 0;
  if (n < N)
    for (int64_t m = threadIdx.y; m < M; m += 8) s += dz.value(m, n);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    acc_t t = 0;
#pragma unroll
    for (int l = 0; l < 8; ++l) t += part[l][threadIdx.x];
    db[n] = static_cast<T>(t);
  }
}

template <typename T, typename ASrc, typename BSrc, typename Epi>
void launch_gemm(const ASrc& a, const BSrc& b, const Epi& epi, int64_t M, int64_t N, int64_t K) {
  using C = Cfg<T>;
  const int64_t gx = (N + C::BN - 1) / C::BN, gy = (M + C::BM - 1) / C::BM;
  TORCH_CHECK(gy < 65536, "hpml::linear_act: too many rows for one launch (", M, ")");
  gpu::launch<gemm_kernel<T, ASrc, BSrc, Epi>>(dim3(gx, gy), C::THREADS, 0,
                                               at::cuda::getCurrentCUDAStream(), a, b, epi, M, N,
                                               K);
}

using gpu::aligned16;

// A 2-D operand with unit stride along its last dimension (a row stride is fine).
at::Tensor k_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

template <typename T>
bool packs_ok(const at::Tensor& t) {
  return aligned16(t.const_data_ptr()) && t.stride(0) % kVec<T> == 0;
}

std::tuple<at::Tensor, at::Tensor> linear_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   int64_t activation, double negative_slope) {
  const Act act = check_linear_act(input, weight, bias, activation);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor mask = at::empty(act_uses_mask(act) ? at::IntArrayRef{M, mask_row_bytes(N)}
                                                 : at::IntArrayRef{0},
                              input.options().dtype(at::kByte));
  if (M == 0 || N == 0) return {out, mask};
  const at::Tensor x = k_contiguous(input), w = k_contiguous(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::linear_act (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const RowMajor<scalar_t> asrc{x.const_data_ptr<scalar_t>(), x.stride(0),
                                      packs_ok<scalar_t>(x)};
        const ColMajor<scalar_t> bsrc{w.const_data_ptr<scalar_t>(), w.stride(0),
                                      packs_ok<scalar_t>(w)};
        dispatch_act(act, [&](auto a) {
          constexpr Act A = decltype(a)::value;
          const ForwardEpilogue<scalar_t, A> epi{
              out.mutable_data_ptr<scalar_t>(),
              has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
              act_uses_mask(act) ? mask.mutable_data_ptr<uint8_t>() : nullptr,
              M, N, mask_row_bytes(N), static_cast<acc_t>(negative_slope),
              aligned16(out.const_data_ptr()) && N % 8 == 0};
          launch_gemm<scalar_t>(asrc, bsrc, epi, M, N, K);
        });
      });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& mask, int64_t activation, double negative_slope,
    bool input_grad, bool weight_grad, bool bias_grad) {
  const Act act = check_linear_act_backward(grad, input, weight, output, mask, activation);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  at::Tensor dx = at::empty(input_grad ? at::IntArrayRef{M, K} : at::IntArrayRef{0},
                            input.options());
  at::Tensor dw = at::empty(weight_grad ? at::IntArrayRef{N, K} : at::IntArrayRef{0},
                            input.options());
  at::Tensor db = at::empty(bias_grad ? at::IntArrayRef{N} : at::IntArrayRef{0}, input.options());
  const at::Tensor g = k_contiguous(grad);
  const at::Tensor y = act_uses_output(act) ? output.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::linear_act_backward (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_act(act, [&](auto a) {
          constexpr Act A = decltype(a)::value;
          const Dz<scalar_t, A> dz{g.const_data_ptr<scalar_t>(), g.stride(0),
                                   y.defined() ? y.const_data_ptr<scalar_t>() : nullptr,
                                   act_uses_mask(act) ? mask.const_data_ptr<uint8_t>() : nullptr,
                                   N, mask_row_bytes(N), static_cast<acc_t>(negative_slope)};
          if (input_grad && M * K > 0) {
            // dX = dZ W: A = dZ (rows m, columns n), B = W read as (rows n, columns k).
            const at::Tensor w = k_contiguous(weight);
            launch_gemm<scalar_t>(
                DzTile<scalar_t, A, false>{dz},
                RowMajor<scalar_t>{w.const_data_ptr<scalar_t>(), w.stride(0), packs_ok<scalar_t>(w)},
                StoreEpilogue<scalar_t>{dx.mutable_data_ptr<scalar_t>(), M, K, K}, M, K, N);
          }
          if (weight_grad && N * K > 0) {
            // dW = dZ^T X: A = dZ^T (rows n, columns m), B = X (rows m, columns k).
            const at::Tensor x = k_contiguous(input);
            launch_gemm<scalar_t>(
                DzTile<scalar_t, A, true>{dz},
                RowMajor<scalar_t>{x.const_data_ptr<scalar_t>(), x.stride(0), packs_ok<scalar_t>(x)},
                StoreEpilogue<scalar_t>{dw.mutable_data_ptr<scalar_t>(), N, K, K}, N, K, M);
          }
          if (bias_grad && N > 0) {
            gpu::launch<bias_grad_kernel<scalar_t, A>>(dim3((N + 31) / 32), dim3(32, 8), 0,
                                                       at::cuda::getCurrentCUDAStream(), dz,
                                                       db.mutable_data_ptr<scalar_t>(), M, N);
          }
        });
      });
  return {dx, dw, db};
}

}  // namespace

HPML_REGISTER_KERNELS(linear_act, CUDA, _cuda)

}  // namespace hpml
