// hpml::batch_norm and its SyncBatchNorm pieces on CUDA, with the semantics of the CPU kernels
// (csrc/batch_norm.cpp): statistics from per-channel shifted sums S1 = sum(x - K),
// S2 = sum((x - K)^2), K the channel's first value, in fp32 (fp64 for fp64 input); outputs in
// the input's layout; per-channel results in fp32 (fp64).
//
// The input is seen as (outer, C, inner) (batch_norm.h). An op is at most three launches:
//   1. reduce   per-channel partial sums (S1, S2; or sum dz, sum dz (x - mean) for the backward)
//               over fixed chunks of the batch (~kChunkElems values per block), one fp32 (fp64)
//               partial per (chunk, column) in a workspace: no atomics, and chunks that depend
//               on the shape only, so the bits depend neither on the GPU nor on the run. Every
//               channel with more than one chunk's worth of values is split over several blocks
//               (the two-stage grid reduction); small ones are one chunk.
//   2. finalize per channel, the partials added in a fixed order in fp64 (stripes of chunks, then
//               a tree), then the op's per-channel outputs and the coefficients of the
//               elementwise pass: (mean, gamma invstd, beta) or (mean, gamma invstd, gmean, k).
//   3. apply    one elementwise pass: normalise, scale, shift, ReLU; or dx.
// Two walks of the data, for the reduce and the apply alike:
//   planes  inner >= kRowsMaxInner (contiguous (N, C, H, W)): a channel is `outer` runs of
//           `inner` contiguous values. Reduce: grid (C, chunks), a block sums kChunkElems values
//           of one channel (16-byte packs when inner allows), warp shuffles + shared memory.
//           Apply: flat over the tensor, each pack within one run.
//   rows    inner < kRowsMaxInner (channels last, 2-D, small spatial): rows of C * inner columns.
//           Block (TX, TY): TX threads across columns (a 16-byte pack of columns each), TY down
//           the rows; the reduce sums a chunk of rows per column in registers, then down TY in a
//           shared-memory tree; a column's channel is column / inner, merged in the finalize.
// One channel (C == 1) is a single run of the whole batch (the planes walk from 32 values on).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "batch_norm.h"
#include "common.cuh"
#include "hpml_math.h"

namespace hpml {
namespace {

constexpr int kThreads = 256;
// Values per reduction block: one partial per chunk. Fixed, not derived from the device.
constexpr int64_t kChunkElems = 16384;
// Below this run length the rows walk: runs of a few values would leave most of a warp's loads
// unused in the planes walk.
constexpr int64_t kRowsMaxInner = 32;
constexpr int64_t kMaxGridY = 65535;
// Finalize: 32 channels per block, each summed by kMergeStripes threads over interleaved chunks.
constexpr int kMergeStripes = 32;

// 16-byte packs in flight per thread and tensor: with one tensor read (forward) 4, with two or
// three (backward) 2 -- enough bytes in flight to cover the memory latency at ~50% occupancy.
template <bool BWD>
constexpr int kItems = BWD ? 2 : 4;

using gpu::load_pack;
using gpu::Pack;
using gpu::store_pack;

// A per-channel vector argument (weight, bias, running statistics, mean, invstd, sums) of any
// floating dtype and stride, read as double. Kernels round it to acc_t where the CPU code converts
// the tensor to acc_t first, so both see the same values.
struct ChannelIn {
  const void* p = nullptr;
  int64_t stride = 0;
  int kind = 0;  // 0 absent (the fill value), 1 float, 2 double, 3 half, 4 bfloat16
  __device__ __forceinline__ double get(int64_t c, double fill) const {
    const int64_t o = c * stride;
    switch (kind) {
      case 1: return static_cast<const float*>(p)[o];
      case 2: return static_cast<const double*>(p)[o];
      case 3: return static_cast<float>(static_cast<const c10::Half*>(p)[o]);
      case 4: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[o]);
      default: return fill;
    }
  }
};

// A per-channel output (grad_weight, grad_bias) in the weight's dtype, contiguous.
struct ChannelOut {
  void* p = nullptr;
  int kind = 0;  // as ChannelIn; 0: not asked for
  __device__ __forceinline__ void set(int64_t c, double v) const {
    switch (kind) {
      case 1: static_cast<float*>(p)[c] = static_cast<float>(v); break;
      case 2: static_cast<double*>(p)[c] = v; break;
      case 3: static_cast<c10::Half*>(p)[c] = static_cast<c10::Half>(v); break;
      case 4: static_cast<c10::BFloat16*>(p)[c] = static_cast<c10::BFloat16>(v); break;
      default: break;
    }
  }
};

int dtype_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 1;
    case at::kDouble: return 2;
    case at::kHalf: return 3;
    case at::kBFloat16: return 4;
    default: return 0;
  }
}

// Host side of a ChannelIn: keeps a converted copy alive for the rare other floating dtypes.
struct ChannelArg {
  at::Tensor keep;
  ChannelIn in;
};

ChannelArg channel_arg(const std::optional<at::Tensor>& t) {
  ChannelArg a;
  if (!t.has_value() || !t->defined()) return a;
  a.keep = dtype_kind(t->scalar_type()) != 0 ? *t : t->to(at::kDouble);
  a.in.p = a.keep.const_data_ptr();
  a.in.stride = a.keep.stride(0);
  a.in.kind = dtype_kind(a.keep.scalar_type());
  return a;
}

ChannelOut channel_out(at::Tensor& t) {
  ChannelOut o;
  if (t.numel() == 0) return o;
  o.kind = dtype_kind(t.scalar_type());
  TORCH_CHECK(o.kind != 0, "hpml::batch_norm_backward: weight gradients in ", t.scalar_type(),
              " are not supported");
  o.p = t.mutable_data_ptr();
  return o;
}

// ---- the walks ----------------------------------------------------------------------------------

struct Walk {
  int64_t outer = 0, C = 0, inner = 1;
  bool rows = false;
  int64_t ncols() const { return rows ? C * inner : C; }  // columns of the partials
  int64_t group() const { return rows ? inner : 1; }      // partial columns per channel
  int64_t count() const { return outer * inner; }
  int64_t numel() const { return outer * C * inner; }
};

Walk make_walk(const BnLayout& l) {
  Walk w;
  w.outer = l.outer;
  w.C = l.channels;
  w.inner = l.inner;
  if (w.C == 1) {  // one channel: one run
    w.inner = w.outer * w.inner;
    w.outer = 1;
  }
  w.rows = w.inner < kRowsMaxInner;
  return w;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// n / d for 0 <= n < 2^63 by a multiply-high and two shifts (Granlund & Montgomery, the
// "round-up" magic number with the add step, valid for every n and every d >= 1): a 64-bit
// division is a called subroutine on the GPU, and its register saves are local-memory traffic.
struct FastDiv {
  uint64_t d = 1, m = 1;
  int s1 = 0, s2 = 0;
  __device__ __forceinline__ int64_t div(int64_t n) const {
    const uint64_t un = static_cast<uint64_t>(n);
    const uint64_t t = __umul64hi(m, un);
    return static_cast<int64_t>((t + ((un - t) >> s1)) >> s2);
  }
  __device__ __forceinline__ int64_t mod(int64_t n) const {
    return n - div(n) * static_cast<int64_t>(d);
  }
};

FastDiv make_fastdiv(int64_t divisor) {
  TORCH_CHECK(divisor >= 1, "hpml::batch_norm: internal error, divisor ", divisor);
  FastDiv f;
  f.d = static_cast<uint64_t>(divisor);
  int l = 0;  // ceil(log2(d))
  while ((uint64_t(1) << l) < f.d) ++l;
  using u128 = unsigned __int128;
  f.m = static_cast<uint64_t>((u128(1) << 64) * ((u128(1) << l) - f.d) / f.d + 1);
  f.s1 = l < 1 ? l : 1;
  f.s2 = l > 1 ? l - 1 : 0;
  return f;
}

// 16-byte packs when every pointer is 16-byte aligned and a pack never straddles a run (planes)
// or a row (rows).
template <typename scalar_t>
int pick_vec(const Walk& w, std::initializer_list<const void*> ptrs) {
  constexpr int V = gpu::kVec16<scalar_t>;
  const int64_t run = w.rows ? w.ncols() : w.inner;
  if (run % V != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !gpu::aligned16(p)) return 1;
  return V;
}

// Rows walk: TX threads across columns (a power of 2 up to a warp, no wider than the row), TY down.
struct RowsTile {
  int tx = 1, ty = kThreads;
};

RowsTile rows_tile(int64_t ncols, int vec) {
  const int64_t packs = ceil_div(ncols, vec);
  RowsTile t;
  while (t.tx < 32 && t.tx < packs) t.tx *= 2;
  t.ty = kThreads / t.tx;
  return t;
}

// ---- shared per-element steps -------------------------------------------------------------------

// One value into the running sums: statistics (a += d, b += d^2, d = x - K) or backward
// (a += dz, b += dz (x - mean)); dz = dy, or dy where the ReLU output is > 0 (a select, as
// torch's threshold_backward).
template <bool GRAD, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t x, acc_t ref, acc_t dy, acc_t y, bool relu,
                                           acc_t& sa, acc_t& sb) {
  const acc_t d = x - ref;
  if constexpr (GRAD) {
    const acc_t dz = relu ? math::vselect(y <= acc_t(0), acc_t(0), dy) : dy;
    sa += dz;
    sb += dz * d;
  } else {
    sa += d;
    sb += d * d;
  }
}

// Per-channel coefficients of the apply pass, (C, 4) acc_t: forward (mean, gamma invstd, beta, 0),
// backward (mean, gamma invstd, gmean, k).
template <typename acc_t>
using Coef = Pack<acc_t, 4>;

template <bool BWD, typename acc_t>
__device__ __forceinline__ acc_t apply_one(const Coef<acc_t>& k, acc_t x, acc_t dy, acc_t y,
                                           bool relu, bool batch_terms) {
  if constexpr (BWD) {
    const acc_t dz = relu ? math::vselect(y <= acc_t(0), acc_t(0), dy) : dy;
    return batch_terms ? bn_dx(dz, x, k.v[0], k.v[2], k.v[3], k.v[1]) : dz * k.v[1];
  } else {
    const acc_t v = bn_normalize(x, k.v[0], k.v[1], k.v[2]);
    return relu ? math::activate<math::Act::Relu>(v, acc_t(0)) : v;
  }
}

// Sums a[v] and b[v] over threadIdx.y for each column (threadIdx.x, v) of a (TX, TY) block by a
// tree in shared memory (TY a power of 2): a fixed order. The result is in the threads with
// threadIdx.y == 0.
template <int VEC, typename T>
__device__ __forceinline__ void column_sum2(T (&a)[VEC], T (&b)[VEC]) {
  __shared__ T sh[2][kThreads * VEC];
  const int TX = blockDim.x, ty = threadIdx.y;
  const int me = (ty * TX + threadIdx.x) * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sh[0][me + v] = a[v];
    sh[1][me + v] = b[v];
  }
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int other = me + s * TX * VEC;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        a[v] += sh[0][other + v];
        b[v] += sh[1][other + v];
        sh[0][me + v] = a[v];
        sh[1][me + v] = b[v];
      }
    }
    __syncthreads();
  }
}

// ---- 1. reduce ------------------------------------------------------------------------------------

template <typename scalar_t>
struct ReduceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;   // input, (outer, C, inner) dense
  const scalar_t* dy = nullptr;  // GRAD: the gradient, same layout
  const scalar_t* y = nullptr;   // GRAD and relu: the forward's output, same layout
  bool relu = false;
  ChannelIn mean;                // GRAD: the mean subtracted from x (else K = first value)
  acc_t* pa = nullptr;           // (nchunks, ncols) partials: sum(x - K) or sum(dz)
  acc_t* pb = nullptr;           // (nchunks, ncols) partials: sum((x - K)^2) or sum(dz (x - mean))
  int64_t outer = 0, C = 0, inner = 1, ncols = 0;
  FastDiv inner_div;             // / inner
  int64_t chunk = 0;             // planes: values of a channel per block
  int64_t step = 0, step_o = 0, step_i = 0;  // planes: kThreads * VEC as (runs, within a run)
  int64_t rows_chunk = 0;        // rows: rows per block
};

// Planes walk: block (c = blockIdx.x, chunk k = blockIdx.y) sums the channel's values
// [k chunk, (k + 1) chunk) in the order (run, position), each thread every kThreads-th pack.
template <typename scalar_t, int VEC, bool GRAD>
__global__ void __launch_bounds__(kThreads) bn_reduce_planes_kernel(const ReduceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int ITEMS = kItems<GRAD>;
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const int64_t end = min(a.outer * a.inner, (k + 1) * a.chunk);
  const int64_t plane = a.C * a.inner, coff = c * a.inner;
  const acc_t ref =
      GRAD ? static_cast<acc_t>(a.mean.get(c, 0.0)) : static_cast<acc_t>(a.x[coff]);
  // The thread's cursor: value j of the channel is run o, position i.
  int64_t j = k * a.chunk + static_cast<int64_t>(threadIdx.x) * VEC;
  int64_t o = a.inner_div.div(j), i = j - o * a.inner;
  acc_t sa = 0, sb = 0;
#pragma unroll 1
  while (j < end) {
    Pack<scalar_t, VEC> xv[ITEMS], gv[ITEMS], yv[ITEMS];
    bool ok[ITEMS];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {  // issue every load first
      ok[u] = j < end;
      const int64_t off = o * plane + coff + i;
      if (ok[u]) {
        xv[u] = load_pack<VEC>(a.x, off);
        if constexpr (GRAD) {
          gv[u] = load_pack<VEC>(a.dy, off);
          if (a.relu) yv[u] = load_pack<VEC>(a.y, off);
        }
      }
      j += a.step;
      o += a.step_o;
      i += a.step_i;
      if (i >= a.inner) {
        i -= a.inner;
        ++o;
      }
    }
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      if (!ok[u]) continue;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t dyv = 0, yvv = 0;
        if constexpr (GRAD) {
          dyv = static_cast<acc_t>(gv[u].v[v]);
          if (a.relu) yvv = static_cast<acc_t>(yv[u].v[v]);
        }
        accumulate<GRAD>(static_cast<acc_t>(xv[u].v[v]), ref, dyv, yvv, a.relu, sa, sb);
      }
    }
  }
  acc_t sums[2] = {sa, sb};
  gpu::block_sum<kThreads>(sums);
  if (threadIdx.x == 0) {
    a.pa[k * a.ncols + c] = sums[0];
    a.pb[k * a.ncols + c] = sums[1];
  }
}

// Rows walk: block (column tile blockIdx.x, chunk of rows blockIdx.y); thread (tx, ty) sums the
// VEC columns of its pack down rows ty, ty + TY, ... of the chunk, then the tile's TY sums are
// added per column.
template <typename scalar_t, int VEC, bool GRAD>
__global__ void __launch_bounds__(kThreads) bn_reduce_rows_kernel(const ReduceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int ITEMS = kItems<GRAD>;
  const int64_t TY = blockDim.y;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = col0 < a.ncols;  // whole packs: ncols % VEC == 0 when VEC > 1
  const int64_t k = blockIdx.y;
  const int64_t r_end = min(a.outer, (k + 1) * a.rows_chunk);
  acc_t ref[VEC], sa[VEC], sb[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sa[v] = sb[v] = ref[v] = 0;
    if (active) {
      const int64_t c = a.inner_div.div(col0 + v);
      ref[v] = GRAD ? static_cast<acc_t>(a.mean.get(c, 0.0))
                    : math::bn_shift(static_cast<acc_t>(a.x[c * a.inner]));
    }
  }
#pragma unroll 1
  for (int64_t r = k * a.rows_chunk + threadIdx.y; active && r < r_end; r += TY * ITEMS) {
    Pack<scalar_t, VEC> xv[ITEMS], gv[ITEMS], yv[ITEMS];
    bool ok[ITEMS];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      const int64_t rr = r + u * TY;
      ok[u] = rr < r_end;
      const int64_t off = rr * a.ncols + col0;
      if (ok[u]) {
        xv[u] = load_pack<VEC>(a.x, off);
        if constexpr (GRAD) {
          gv[u] = load_pack<VEC>(a.dy, off);
          if (a.relu) yv[u] = load_pack<VEC>(a.y, off);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      if (!ok[u]) continue;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t dyv = 0, yvv = 0;
        if constexpr (GRAD) {
          dyv = static_cast<acc_t>(gv[u].v[v]);
          if (a.relu) yvv = static_cast<acc_t>(yv[u].v[v]);
        }
        accumulate<GRAD>(static_cast<acc_t>(xv[u].v[v]), ref[v], dyv, yvv, a.relu, sa[v], sb[v]);
      }
    }
  }
  column_sum2<VEC>(sa, sb);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      a.pa[k * a.ncols + col0 + v] = sa[v];
      a.pb[k * a.ncols + col0 + v] = sb[v];
    }
  }
}

// The workspace of one reduction and how it was laid out.
template <typename acc_t>
struct Partials {
  at::Tensor buf;
  const acc_t* pa = nullptr;
  const acc_t* pb = nullptr;
  int64_t nchunks = 0, ncols = 0, group = 1;
};

template <typename scalar_t, bool GRAD>
Partials<at::opmath_type<scalar_t>> reduce(const Walk& w, ReduceArgs<scalar_t> a,
                                           const at::TensorOptions& acc_opts,
                                           cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  Partials<acc_t> p;
  p.ncols = w.ncols();
  p.group = w.group();
  const int vec = pick_vec<scalar_t>(w, {a.x, a.dy, a.y});
  dim3 grid, block;
  if (w.rows) {
    const RowsTile t = rows_tile(p.ncols, vec);
    const int64_t width = int64_t(t.tx) * vec;
    int64_t rows = std::max<int64_t>(t.ty, kChunkElems / width / t.ty * t.ty);
    rows = std::max(rows, round_up(ceil_div(w.outer, kMaxGridY), t.ty));
    p.nchunks = ceil_div(w.outer, rows);
    a.rows_chunk = rows;
    grid = dim3(static_cast<unsigned>(ceil_div(p.ncols, width)), static_cast<unsigned>(p.nchunks));
    block = dim3(t.tx, t.ty);
  } else {
    const int64_t n = w.count();
    // A multiple of every kThreads * VEC, so each thread's packs stay whole.
    a.chunk = std::max(kChunkElems, round_up(ceil_div(n, kMaxGridY), kThreads * 8));
    p.nchunks = ceil_div(n, a.chunk);
    a.step = int64_t(kThreads) * vec;
    a.step_o = a.step / w.inner;
    a.step_i = a.step % w.inner;
    TORCH_CHECK(w.C < (int64_t(1) << 31), "hpml::batch_norm: too many channels");
    grid = dim3(static_cast<unsigned>(w.C), static_cast<unsigned>(p.nchunks));
    block = dim3(kThreads);
  }
  a.outer = w.outer;
  a.C = w.C;
  a.inner = w.inner;
  a.inner_div = make_fastdiv(w.inner);
  a.ncols = p.ncols;
  p.buf = at::empty({2, p.nchunks, p.ncols}, acc_opts);
  a.pa = p.buf.template mutable_data_ptr<acc_t>();
  a.pb = a.pa + p.nchunks * p.ncols;
  p.pa = a.pa;
  p.pb = a.pb;
  gpu::dispatch_vec<gpu::kVec16<scalar_t>>(vec > 1, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (w.rows) {
      gpu::launch<bn_reduce_rows_kernel<scalar_t, V, GRAD>>(grid, block, 0, stream, a);
    } else {
      gpu::launch<bn_reduce_planes_kernel<scalar_t, V, GRAD>>(grid, block, 0, stream, a);
    }
  });
  return p;
}

// ---- 2. finalize ----------------------------------------------------------------------------------

// Channel c's fp64 sums of the partials over every chunk (and, rows walk, the `group` columns of
// the channel): thread stripe threadIdx.y takes chunks y, y + kMergeStripes, ..., then a tree over
// the stripes. A fixed order. The result is in the threads with threadIdx.y == 0.
template <typename part_t>
__device__ __forceinline__ void merge_partials(const part_t* __restrict__ pa,
                                               const part_t* __restrict__ pb, int64_t nchunks,
                                               int64_t ncols, int64_t group, int64_t c,
                                               bool active, double& sa, double& sb) {
  __shared__ double sh[2][kMergeStripes][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  double ta = 0, tb = 0;
  if (active) {
    if (group == 1) {
#pragma unroll 4
      for (int64_t k = ty; k < nchunks; k += kMergeStripes) {
        ta += static_cast<double>(pa[k * ncols + c]);
        tb += static_cast<double>(pb[k * ncols + c]);
      }
    } else {
      for (int64_t k = ty; k < nchunks; k += kMergeStripes) {
        const int64_t base = k * ncols + c * group;
        for (int64_t g = 0; g < group; ++g) {
          ta += static_cast<double>(pa[base + g]);
          tb += static_cast<double>(pb[base + g]);
        }
      }
    }
  }
  sh[0][ty][tx] = ta;
  sh[1][ty][tx] = tb;
  __syncthreads();
  for (int s = kMergeStripes / 2; s > 0; s >>= 1) {
    if (ty < s) {
      ta += sh[0][ty + s][tx];
      tb += sh[1][ty + s][tx];
      sh[0][ty][tx] = ta;
      sh[1][ty][tx] = tb;
    }
    __syncthreads();
  }
  sa = ta;
  sb = tb;
}

// What every finalize launch fills the same way: the reduction's partials (none when the batch is
// empty) and the number of values per channel they are over.
template <typename Args, typename acc_t>
void set_partials(Args& f, const Partials<acc_t>& p, int64_t C, int64_t n) {
  f.pa = p.pa;
  f.pb = p.pb;
  f.nchunks = p.nchunks;
  f.ncols = p.ncols;
  f.group = p.group;
  f.C = C;
  f.n = n;
  f.inv_n = bn_inv_count(n);
}

template <typename scalar_t>
struct ForwardFinalizeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* pa = nullptr;  // training: the statistics partials
  const acc_t* pb = nullptr;
  int64_t nchunks = 0, ncols = 0, group = 1;
  const scalar_t* x = nullptr;  // training: the shift K of channel c is x[c * inner]
  int64_t inner = 1, C = 0, n = 0;
  double inv_n = 0, unbias = 1;  // 1 / n, n / (n - 1)
  bool training = false;
  double eps = 0;
  ChannelIn running_mean, running_var, weight, bias;
  acc_t* mean_out = nullptr;    // (C): the mean used
  acc_t* invstd_out = nullptr;  // (C): 1 / sqrt(var + eps)
  acc_t* var_out = nullptr;     // (C): training, the unbiased variance
  acc_t* bvar_out = nullptr;    // (C): training, the biased variance (batch_norm_stats)
  acc_t* coef = nullptr;        // (C, 4): (mean, gamma invstd, beta, 0) for the apply pass
};

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kMergeStripes)
    bn_forward_finalize_kernel(const ForwardFinalizeArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool active = c < a.C;
  double s1 = 0, s2 = 0;
  if (a.training) merge_partials(a.pa, a.pb, a.nchunks, a.ncols, a.group, c, active, s1, s2);
  if (threadIdx.y != 0 || !active) return;
  acc_t mean, invstd;
  if (a.training) {
    const acc_t shift = a.n > 0 ? math::bn_shift(static_cast<acc_t>(a.x[c * a.inner])) : acc_t(0);
    const BnMoments m = bn_moments(a.inv_n, static_cast<double>(shift), s1, s2);
    mean = static_cast<acc_t>(m.mean);
    invstd = static_cast<acc_t>(bn_invstd(m.var, a.eps));
    if (a.var_out != nullptr) a.var_out[c] = static_cast<acc_t>(m.var * a.unbias);
    if (a.bvar_out != nullptr) a.bvar_out[c] = static_cast<acc_t>(m.var);
  } else {
    mean = static_cast<acc_t>(a.running_mean.get(c, 0.0));
    const acc_t var = static_cast<acc_t>(a.running_var.get(c, 1.0));
    invstd = static_cast<acc_t>(bn_invstd(static_cast<double>(var), a.eps));
  }
  if (a.mean_out != nullptr) a.mean_out[c] = mean;
  if (a.invstd_out != nullptr) a.invstd_out[c] = invstd;
  if (a.coef != nullptr) {
    const acc_t gamma = static_cast<acc_t>(a.weight.get(c, 1.0));
    const acc_t beta = static_cast<acc_t>(a.bias.get(c, 0.0));
    Coef<acc_t> k;
    k.v[0] = mean;
    k.v[1] = gamma * invstd;
    k.v[2] = beta;
    k.v[3] = 0;
    *reinterpret_cast<Coef<acc_t>*>(a.coef + 4 * c) = k;
  }
}

template <typename acc_t>
struct GradFinalizeArgs {
  const acc_t* pa = nullptr;  // from_partials: the backward partials (nchunks may be 0)
  const acc_t* pb = nullptr;
  int64_t nchunks = 0, ncols = 0, group = 1;
  bool from_partials = true;
  ChannelIn sum_dz, sum_dz_xmu;  // !from_partials: the sums over the whole batch, given
  int64_t C = 0, n = 0;          // n: values per channel the sums are over
  double inv_n = 0;              // 1 / n
  bool batch_terms = false;      // training: dx has the terms of the batch statistics
  ChannelIn mean, invstd, weight;
  ChannelOut dw, db;                // grad_weight = sum(dz (x - mean)) invstd, grad_bias = sum(dz)
  acc_t* sdz_out = nullptr;         // batch_norm_backward_reduce
  acc_t* sdz_xmu_out = nullptr;
  acc_t* coef = nullptr;            // (C, 4): (mean, gamma invstd, gmean, k) for dx
};

template <typename acc_t>
__global__ void __launch_bounds__(32 * kMergeStripes)
    bn_grad_finalize_kernel(const GradFinalizeArgs<acc_t> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool active = c < a.C;
  double sdz = 0, sdzx = 0;
  if (a.from_partials) merge_partials(a.pa, a.pb, a.nchunks, a.ncols, a.group, c, active, sdz, sdzx);
  if (threadIdx.y != 0 || !active) return;
  if (!a.from_partials) {
    sdz = a.sum_dz.get(c, 0.0);
    sdzx = a.sum_dz_xmu.get(c, 0.0);
  }
  const acc_t invstd = static_cast<acc_t>(a.invstd.get(c, 1.0));
  a.dw.set(c, sdzx * static_cast<double>(invstd));
  a.db.set(c, sdz);
  if (a.sdz_out != nullptr) a.sdz_out[c] = static_cast<acc_t>(sdz);
  if (a.sdz_xmu_out != nullptr) a.sdz_xmu_out[c] = static_cast<acc_t>(sdzx);
  if (a.coef != nullptr) {
    const bool batch = a.batch_terms && a.n > 0;
    Coef<acc_t> k;
    k.v[0] = static_cast<acc_t>(a.mean.get(c, 0.0));
    k.v[1] = static_cast<acc_t>(a.weight.get(c, 1.0)) * invstd;
    k.v[2] = batch ? static_cast<acc_t>(bn_grad_mean(sdz, a.inv_n)) : acc_t(0);
    k.v[3] = batch ? static_cast<acc_t>(bn_grad_k(sdzx, a.inv_n, static_cast<double>(invstd)))
                   : acc_t(0);
    *reinterpret_cast<Coef<acc_t>*>(a.coef + 4 * c) = k;
  }
}

dim3 finalize_grid(int64_t C) { return dim3(static_cast<unsigned>(ceil_div(C, 32))); }
dim3 finalize_block() { return dim3(32, kMergeStripes); }

// ---- 3. apply -------------------------------------------------------------------------------------

template <typename scalar_t>
struct ApplyArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;   // input (forward; backward with batch terms)
  const scalar_t* dy = nullptr;  // BWD: the gradient
  const scalar_t* y = nullptr;   // BWD and relu: the forward's output
  scalar_t* out = nullptr;       // output, or dx; the input's layout
  const acc_t* coef = nullptr;   // (C, 4)
  bool relu = false, batch_terms = false;
  int64_t outer = 0, C = 0, inner = 1, ncols = 0, numel = 0;
  FastDiv inner_div, c_div;        // / inner, % C
  int64_t step_i = 0, step_c = 0;  // planes: kThreads * VEC values as (position, channel) steps
};

// Planes walk, flat: block b covers ITEMS * kThreads packs; a thread takes every kThreads-th
// pack, tracking (position in the run, channel) incrementally after one division.
template <typename scalar_t, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) bn_apply_planes_kernel(const ApplyArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int ITEMS = kItems<BWD>;
  const bool need_x = !BWD || a.batch_terms;
  int64_t e = (static_cast<int64_t>(blockIdx.x) * ITEMS * kThreads + threadIdx.x) * VEC;
  const int64_t q = a.inner_div.div(e);
  int64_t i = e - q * a.inner, c = a.c_div.mod(q);
  Pack<scalar_t, VEC> xv[ITEMS], gv[ITEMS], yv[ITEMS];
  int64_t off[ITEMS], ch[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    off[u] = e;
    ch[u] = c;
    // Past the end, load the last pack again (its result is not stored): loads without
    // branches, every pack register defined on every path.
    const int64_t le = e < a.numel ? e : a.numel - VEC;
    if (need_x) xv[u] = load_pack<VEC>(a.x, le);
    if constexpr (BWD) {
      gv[u] = load_pack<VEC>(a.dy, le);
      if (a.relu) yv[u] = load_pack<VEC>(a.y, le);
    }
    e += int64_t(kThreads) * VEC;
    i += a.step_i;
    c += a.step_c;
    if (i >= a.inner) {
      i -= a.inner;
      ++c;
    }
    if (c >= a.C) c -= a.C;
  }
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    if (off[u] >= a.numel) continue;
    const Coef<acc_t> k = *reinterpret_cast<const Coef<acc_t>*>(a.coef + 4 * ch[u]);
    acc_t r[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t xx = need_x ? static_cast<acc_t>(xv[u].v[v]) : acc_t(0);
      acc_t dyv = 0, yvv = 0;
      if constexpr (BWD) {
        dyv = static_cast<acc_t>(gv[u].v[v]);
        if (a.relu) yvv = static_cast<acc_t>(yv[u].v[v]);
      }
      r[v] = apply_one<BWD>(k, xx, dyv, yvv, a.relu, a.batch_terms);
    }
    store_pack<VEC>(a.out, off[u], r);
  }
}

// Rows walk: the thread's VEC columns (and their coefficients) are fixed; it walks rows
// blockIdx.y * TY + ty, then every gridDim.y * TY rows.
template <typename scalar_t, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) bn_apply_rows_kernel(const ApplyArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int ITEMS = kItems<BWD>;
  const bool need_x = !BWD || a.batch_terms;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col0 >= a.ncols) return;
  Coef<acc_t> k[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    k[v] = *reinterpret_cast<const Coef<acc_t>*>(a.coef + 4 * a.inner_div.div(col0 + v));
  const int64_t rstep = static_cast<int64_t>(gridDim.y) * blockDim.y;
#pragma unroll 1
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.outer;
       r += rstep * ITEMS) {
    Pack<scalar_t, VEC> xv[ITEMS], gv[ITEMS], yv[ITEMS];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      // Rows past the end load row r again (not stored): loads without branches.
      const int64_t rr = r + u * rstep;
      const int64_t off = (rr < a.outer ? rr : r) * a.ncols + col0;
      if (need_x) xv[u] = load_pack<VEC>(a.x, off);
      if constexpr (BWD) {
        gv[u] = load_pack<VEC>(a.dy, off);
        if (a.relu) yv[u] = load_pack<VEC>(a.y, off);
      }
    }
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      const int64_t rr = r + u * rstep;
      if (rr >= a.outer) continue;
      acc_t res[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t xx = need_x ? static_cast<acc_t>(xv[u].v[v]) : acc_t(0);
        acc_t dyv = 0, yvv = 0;
        if constexpr (BWD) {
          dyv = static_cast<acc_t>(gv[u].v[v]);
          if (a.relu) yvv = static_cast<acc_t>(yv[u].v[v]);
        }
        res[v] = apply_one<BWD>(k[v], xx, dyv, yvv, a.relu, a.batch_terms);
      }
      store_pack<VEC>(a.out, rr * a.ncols + col0, res);
    }
  }
}

template <typename scalar_t, bool BWD>
void apply(const Walk& w, ApplyArgs<scalar_t> a, cudaStream_t stream) {
  constexpr int ITEMS = kItems<BWD>;
  constexpr int V = gpu::kVec16<scalar_t>;
  const int vec = pick_vec<scalar_t>(w, {a.x, a.dy, a.y, a.out});
  a.outer = w.outer;
  a.C = w.C;
  a.inner = w.inner;
  a.ncols = w.ncols();
  a.numel = w.numel();
  a.inner_div = make_fastdiv(w.inner);
  a.c_div = make_fastdiv(w.C);
  if (w.rows) {
    const RowsTile t = rows_tile(a.ncols, vec);
    const int64_t width = int64_t(t.tx) * vec;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.ncols, width)),
                    static_cast<unsigned>(std::min(ceil_div(w.outer, int64_t(t.ty) * ITEMS), kMaxGridY)));
    const dim3 block(t.tx, t.ty);
    gpu::dispatch_vec<V>(vec > 1, [&](auto v) {
      gpu::launch<bn_apply_rows_kernel<scalar_t, decltype(v)::value, BWD>>(grid, block, 0,
                                                                           stream, a);
    });
  } else {
    const int64_t step = int64_t(kThreads) * vec;
    a.step_i = step % w.inner;
    a.step_c = (step / w.inner) % w.C;
    const int64_t blocks = ceil_div(a.numel, step * ITEMS);
    TORCH_CHECK(blocks < (int64_t(1) << 31), "hpml::batch_norm: input too large");
    gpu::dispatch_vec<V>(vec > 1, [&](auto v) {
      gpu::launch<bn_apply_planes_kernel<scalar_t, decltype(v)::value, BWD>>(
          static_cast<unsigned>(blocks), kThreads, 0, stream, a);
    });
  }
}

// ---- the ops --------------------------------------------------------------------------------------

// An uninitialised tensor with l.x's layout: contiguous, or channels last.
at::Tensor empty_layout(const BnLayout& l) {
  if (l.x.is_contiguous()) return at::empty(l.x.sizes(), l.x.options());
  std::vector<int64_t> perm(l.x.sizes().begin(), l.x.sizes().end());
  const int64_t c = perm[1];
  perm.erase(perm.begin() + 1);
  perm.push_back(c);
  return at::empty(perm, l.x.options()).movedim(-1, 1);
}

at::TensorOptions acc_options(const at::Tensor& input) {
  return input.options().dtype(acc_scalar_type(input.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t activation) {
  check_batch_norm(input, weight, bias, running_mean, running_var, training, eps, activation);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnLayout l = bn_layout(input);
  const Walk w = make_walk(l);
  const int64_t C = l.channels;
  const auto acc_opts = acc_options(input);
  at::Tensor out = empty_layout(l);
  at::Tensor mean = at::empty({C}, acc_opts), invstd = at::empty({C}, acc_opts);
  at::Tensor var = at::empty({training ? C : 0}, acc_opts);
  if (C == 0) return {out, mean, invstd, var};
  const ChannelArg wa = channel_arg(weight), ba = channel_arg(bias);
  const ChannelArg rma = channel_arg(running_mean), rva = channel_arg(running_var);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const bool apply_pass = w.numel() > 0;
        at::Tensor coef = at::empty({apply_pass ? C : 0, 4}, acc_opts);
        ForwardFinalizeArgs<scalar_t> f;
        Partials<acc_t> p;
        if (training && w.count() > 0) {
          ReduceArgs<scalar_t> r;
          r.x = l.x.const_data_ptr<scalar_t>();
          p = reduce<scalar_t, false>(w, r, acc_opts, stream);
        }
        set_partials(f, p, C, w.count());
        f.x = l.x.const_data_ptr<scalar_t>();
        f.inner = w.inner;
        f.unbias = bn_unbias_factor(f.n);
        f.training = training;
        f.eps = eps;
        f.running_mean = rma.in;
        f.running_var = rva.in;
        f.weight = wa.in;
        f.bias = ba.in;
        f.mean_out = mean.mutable_data_ptr<acc_t>();
        f.invstd_out = invstd.mutable_data_ptr<acc_t>();
        f.var_out = training ? var.mutable_data_ptr<acc_t>() : nullptr;
        f.coef = apply_pass ? coef.mutable_data_ptr<acc_t>() : nullptr;
        gpu::launch<bn_forward_finalize_kernel<scalar_t>>(finalize_grid(C), finalize_block(), 0,
                                                  stream, f);
        if (apply_pass) {
          ApplyArgs<scalar_t> ap;
          ap.x = l.x.const_data_ptr<scalar_t>();
          ap.out = out.mutable_data_ptr<scalar_t>();
          ap.coef = coef.const_data_ptr<acc_t>();
          ap.relu = bn_relu(activation);
          apply<scalar_t, false>(w, ap, stream);
        }
      });
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& output, const at::Tensor& mean_t, const at::Tensor& invstd_t, bool training,
    int64_t activation, bool input_grad, bool weight_grad, bool bias_grad) {
  check_backward("hpml::batch_norm_backward", grad, input, weight, output, activation, mean_t,
                 invstd_t);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnLayout l = bn_layout(input);
  const Walk w = make_walk(l);
  const int64_t C = l.channels;
  const bool relu = bn_relu(activation);
  // grad and output in the input's layout, so that one offset addresses all three.
  const at::Tensor g = same_layout(grad, l);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  at::Tensor dx = input_grad ? empty_layout(l) : at::empty({0}, input.options());
  const auto wdt =
      weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  at::Tensor dw = at::empty({weight_grad ? C : 0}, input.options().dtype(wdt));
  at::Tensor db = at::empty({bias_grad ? C : 0}, input.options().dtype(wdt));
  // With running statistics and only dx asked for, the sums are not needed.
  const bool sums = training || weight_grad || bias_grad;
  const bool dx_pass = input_grad && w.numel() > 0;
  if (C == 0 || !(sums || dx_pass)) return {dx, dw, db};
  const ChannelArg ma = channel_arg(mean_t), ia = channel_arg(invstd_t), wa = channel_arg(weight);
  const auto acc_opts = acc_options(input);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Partials<acc_t> p;
        if (sums && w.count() > 0) {
          ReduceArgs<scalar_t> r;
          r.x = l.x.const_data_ptr<scalar_t>();
          r.dy = g.const_data_ptr<scalar_t>();
          r.y = relu ? y.const_data_ptr<scalar_t>() : nullptr;
          r.relu = relu;
          r.mean = ma.in;
          p = reduce<scalar_t, true>(w, r, acc_opts, stream);
        }
        at::Tensor coef = at::empty({dx_pass ? C : 0, 4}, acc_opts);
        GradFinalizeArgs<acc_t> f;
        set_partials(f, p, C, w.count());
        f.from_partials = true;
        f.batch_terms = training;
        f.mean = ma.in;
        f.invstd = ia.in;
        f.weight = wa.in;
        f.dw = channel_out(dw);
        f.db = channel_out(db);
        f.coef = dx_pass ? coef.mutable_data_ptr<acc_t>() : nullptr;
        gpu::launch<bn_grad_finalize_kernel<acc_t>>(finalize_grid(C), finalize_block(), 0,
                                                  stream, f);
        if (dx_pass) {
          ApplyArgs<scalar_t> ap;
          ap.x = training ? l.x.const_data_ptr<scalar_t>() : nullptr;
          ap.dy = g.const_data_ptr<scalar_t>();
          ap.y = relu ? y.const_data_ptr<scalar_t>() : nullptr;
          ap.out = dx.mutable_data_ptr<scalar_t>();
          ap.coef = coef.const_data_ptr<acc_t>();
          ap.relu = relu;
          ap.batch_terms = training;
          apply<scalar_t, true>(w, ap, stream);
        }
      });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_bn_input("hpml::batch_norm_stats", input, 0);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnLayout l = bn_layout(input);
  const Walk w = make_walk(l);
  const int64_t C = l.channels;
  const auto acc_opts = acc_options(input);
  at::Tensor mean = at::empty({C}, acc_opts), var = at::empty({C}, acc_opts);
  if (C == 0) return {mean, var};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_stats (CUDA)", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Partials<acc_t> p;
        if (w.count() > 0) {
          ReduceArgs<scalar_t> r;
          r.x = l.x.const_data_ptr<scalar_t>();
          p = reduce<scalar_t, false>(w, r, acc_opts, stream);
        }
        ForwardFinalizeArgs<scalar_t> f;
        set_partials(f, p, C, w.count());
        f.x = l.x.const_data_ptr<scalar_t>();
        f.inner = w.inner;
        f.training = true;
        f.mean_out = mean.mutable_data_ptr<acc_t>();
        f.bvar_out = var.mutable_data_ptr<acc_t>();
        gpu::launch<bn_forward_finalize_kernel<scalar_t>>(finalize_grid(C), finalize_block(), 0,
                                                  stream, f);
      });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad,
                                                                  const at::Tensor& input,
                                                                  const at::Tensor& output,
                                                                  const at::Tensor& mean_t,
                                                                  int64_t activation) {
  check_backward("hpml::batch_norm_backward_reduce", grad, input, std::nullopt, output, activation,
                 mean_t, std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnLayout l = bn_layout(input);
  const Walk w = make_walk(l);
  const int64_t C = l.channels;
  const bool relu = bn_relu(activation);
  const at::Tensor g = same_layout(grad, l);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  const auto acc_opts = acc_options(input);
  at::Tensor sdz = at::empty({C}, acc_opts), sdzx = at::empty({C}, acc_opts);
  if (C == 0) return {sdz, sdzx};
  const ChannelArg ma = channel_arg(mean_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward_reduce (CUDA)",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Partials<acc_t> p;
        if (w.count() > 0) {
          ReduceArgs<scalar_t> r;
          r.x = l.x.const_data_ptr<scalar_t>();
          r.dy = g.const_data_ptr<scalar_t>();
          r.y = relu ? y.const_data_ptr<scalar_t>() : nullptr;
          r.relu = relu;
          r.mean = ma.in;
          p = reduce<scalar_t, true>(w, r, acc_opts, stream);
        }
        GradFinalizeArgs<acc_t> f;
        set_partials(f, p, C, w.count());
        f.from_partials = true;
        f.sdz_out = sdz.mutable_data_ptr<acc_t>();
        f.sdz_xmu_out = sdzx.mutable_data_ptr<acc_t>();
        gpu::launch<bn_grad_finalize_kernel<acc_t>>(finalize_grid(C), finalize_block(), 0,
                                                  stream, f);
      });
  return {sdz, sdzx};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad, const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight,
                                          const at::Tensor& output, const at::Tensor& mean_t,
                                          const at::Tensor& invstd_t, const at::Tensor& sum_dz_t,
                                          const at::Tensor& sum_dz_xmu_t, int64_t count,
                                          int64_t activation) {
  check_backward_elemt(grad, input, weight, output, activation, mean_t, invstd_t, sum_dz_t,
                       sum_dz_xmu_t, count);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnLayout l = bn_layout(input);
  const Walk w = make_walk(l);
  const int64_t C = l.channels;
  const bool relu = bn_relu(activation);
  const at::Tensor g = same_layout(grad, l);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  at::Tensor dx = empty_layout(l);
  if (w.numel() == 0) return dx;
  const ChannelArg ma = channel_arg(mean_t), ia = channel_arg(invstd_t), wa = channel_arg(weight);
  const ChannelArg sa = channel_arg(sum_dz_t), sb = channel_arg(sum_dz_xmu_t);
  const auto acc_opts = acc_options(input);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward_elemt (CUDA)",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor coef = at::empty({C, 4}, acc_opts);
        GradFinalizeArgs<acc_t> f;
        f.from_partials = false;
        f.sum_dz = sa.in;
        f.sum_dz_xmu = sb.in;
        f.C = C;
        f.n = count;
        f.inv_n = bn_inv_count(count);
        f.batch_terms = true;
        f.mean = ma.in;
        f.invstd = ia.in;
        f.weight = wa.in;
        f.coef = coef.mutable_data_ptr<acc_t>();
        gpu::launch<bn_grad_finalize_kernel<acc_t>>(finalize_grid(C), finalize_block(), 0,
                                                  stream, f);
        ApplyArgs<scalar_t> ap;
        ap.x = l.x.const_data_ptr<scalar_t>();
        ap.dy = g.const_data_ptr<scalar_t>();
        ap.y = relu ? y.const_data_ptr<scalar_t>() : nullptr;
        ap.out = dx.mutable_data_ptr<scalar_t>();
        ap.coef = coef.const_data_ptr<acc_t>();
        ap.relu = relu;
        ap.batch_terms = true;
        apply<scalar_t, true>(w, ap, stream);
      });
  return dx;
}

}  // namespace

HPML_REGISTER_KERNELS(batch_norm, CUDA, _cuda)

}  // namespace hpml
