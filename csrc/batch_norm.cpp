// hpml::batch_norm on CPU, over the input seen as (outer, C, inner) (batch_norm.h).
// Statistics: per-channel shifted sums S1 = sum(x - K), S2 = sum((x - K)^2) with K the channel's
// first value (shifting keeps the variance of data with a large offset exact where E[x^2] - E[x]^2
// would cancel), in the accumulation dtype over fixed chunks, then the chunk partials added in
// chunk order in double: the same bits whatever the thread count. Backward: the same reduction for
// sum(dz) and sum(dz (x - mean)), then one pass for dx.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "batch_norm.h"
#include "cpu_channel.h"
#include "cpu_alloc.h"
#include "cpu_dispatch.h"
#include "cpu_vec.h"
#include "hpml_math.h"

namespace hpml {
namespace {

// Elements per reduction chunk and per unit of parallel work (fixed).
constexpr int64_t kChunkElems = 32768;
// Values summed in the accumulation dtype before they are added into double: sums over ~10^4
// terms of mixed sign (sum dz (x - mean)) lost ~1e-5 relative in fp32 alone. Per lane at most
// kFlush rows (inner == 1), or kFlushElems / V vectors (inner > 1: every ISA variant's lanes sum
// as many terms in fp32 as AVX2's 8 lanes did, 256; 16 AVX-512 lanes summing 256 each missed the
// fp32 tolerance on the parity suite's 3 x 4 x 128 x 129 input).
constexpr int64_t kFlush = 256;
constexpr int64_t kFlushElems = 2048;

// Outputs of at least this many bytes are written with streaming stores: far larger than the
// cache, they would only evict the input the same pass still reads. (4096 x 1024 fp32, 16 MB,
// stays cache-resident for the op that reads it next.) Inputs of this size are prefetched.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// The tensors a pass reads (up to three; null where absent) and their element size. Where they
// are at least kStreamBytes and inner == 1, each row is asked for kPrefetchBytes before the pass
// reaches it (cpu_vec.h's prefetch_ahead): on the 2-core Intel Xeon VM the hardware prefetchers
// alone left the passes latency-bound (65536 x 256 fp32 backward 10.9 -> 8.3 ms). The
// cache-resident 4096 x 1024 backward got slower with it (1.8 -> 2.2 ms), hence the threshold.
struct Streams {
  const void* p[3] = {nullptr, nullptr, nullptr};
  int64_t elem = 0;
  bool on = false;
  void ahead(int64_t off, int64_t n) const {
    if (!on) return;
    for (const void* q : p)
      if (q != nullptr) prefetch_ahead(static_cast<const char*>(q) + off * elem, n * elem);
  }
};

template <typename scalar_t>
Streams streams(const BnLayout& l, const scalar_t* a, const scalar_t* b = nullptr,
                const scalar_t* c = nullptr) {
  const int64_t bytes = l.x.numel() * static_cast<int64_t>(sizeof(scalar_t));
  return Streams{{a, b, c}, static_cast<int64_t>(sizeof(scalar_t)), bytes >= kStreamBytes};
}

// Per channel (sum a, sum b) of f over every element. f(offset, count, par) returns the two
// vectors for `count` elements at `offset` (lanes >= count must be 0); par(array) gives the
// per-lane channel parameter. inner == 1: lanes run across channels (rows of C), chunks are
// blocks of rows. inner > 1: lanes run along a channel's contiguous run, chunks are blocks of
// `outer` for one channel. Each worker runs local copies of f and the bounds (see map_channels).
template <typename acc_t, typename F>
void reduce_channels(int64_t outer, int64_t C, int64_t inner, const Streams& in, const F& f,
                     std::vector<double>& sa, std::vector<double>& sb) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  sa.assign(C, 0.0);
  sb.assign(C, 0.0);
  if (outer == 0 || C == 0 || inner == 0) return;
  if (inner == 1) {
    // At least kFlush rows a chunk: each chunk's partials are C doubles twice, written, kept and
    // merged on one thread; with 64-row chunks a 4096 x 1024 input made 1 MB of them (and flushed
    // its accumulators into double every 64 rows, not 256): 256-row chunks took its forward from
    // 1.47-1.54 ms to 1.30-1.36 ms and its backward from 3.1-3.9 to 2.7-2.9 ms, 65536 x 256
    // unchanged (benchmarks/NOTES.md). Summing 4 rows in registers before each visit of the
    // accumulators was tried too: it helped the cache-resident shape no further and made the
    // streaming 65536 x 256 1.5x slower (likely: more concurrent streams than the prefetchers
    // follow).
    const int64_t rows = std::max<int64_t>(kFlush, kChunkElems / C);
    const int64_t nchunks = (outer + rows - 1) / rows;
    std::vector<double> pa(nchunks * C), pb(nchunks * C);
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> av(C), bv(C);
      // Local copies (see map_channels): kept in registers through the loop.
      acc_t* const a = av.data();
      acc_t* const b = bv.data();
      const F fn = f;
      const Streams s = in;
      const int64_t cols = C, n_rows = outer;
      for (int64_t k = k0; k < k1; ++k) {
        double* da = pa.data() + k * C;
        double* db = pb.data() + k * C;
        std::fill(da, da + cols, 0.0);
        std::fill(db, db + cols, 0.0);
        const int64_t r_end = std::min(n_rows, (k + 1) * rows);
        for (int64_t r0 = k * rows; r0 < r_end; r0 += kFlush) {
          // Row by row (the memory order), the accumulators in an L1-resident array. (Blocks of
          // channels with register accumulators, walking down the rows, ran 2x slower here.)
          std::fill(a, a + cols, acc_t(0));
          std::fill(b, b + cols, acc_t(0));
          const int64_t r_stop = std::min(r_end, r0 + kFlush);
          for (int64_t r = r0; r < r_stop; ++r) {
            s.ahead(r * cols, cols);
            for (int64_t c = 0; c < cols; c += V) {
              const int64_t n = std::min(V, cols - c);
              const auto [va, vb] =
                  fn(r * cols + c, n, [&](const acc_t* p) { return Vec::loadu(p + c, n); });
              (Vec::loadu(a + c, n) + va).store(a + c, n);
              (Vec::loadu(b + c, n) + vb).store(b + c, n);
            }
          }
          for (int64_t c = 0; c < cols; ++c) {
            da[c] += a[c];
            db[c] += b[c];
          }
        }
      }
    });
    for (int64_t k = 0; k < nchunks; ++k)
      for (int64_t c = 0; c < C; ++c) {
        sa[c] += pa[k * C + c];
        sb[c] += pb[k * C + c];
      }
    return;
  }
  const int64_t outers = std::max<int64_t>(1, kChunkElems / inner);
  const int64_t nchunks = (outer + outers - 1) / outers;
  std::vector<double> pa(C * nchunks), pb(C * nchunks);
  at::parallel_for(0, C * nchunks, 1, [&](int64_t t0, int64_t t1) {
    const F fn = f;
    const int64_t chans = C, len = inner, n_outer = outer;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nchunks, k = t % nchunks;
      double ta = 0, tb = 0;
      Vec a(acc_t(0)), b(acc_t(0));
      int64_t pending = 0;
      auto flush = [&] {
        __at_align__ acc_t la[V], lb[V];
        a.store(la);
        b.store(lb);
        for (int64_t l = 0; l < V; ++l) {
          ta += la[l];
          tb += lb[l];
        }
        a = Vec(acc_t(0));
        b = Vec(acc_t(0));
        pending = 0;
      };
      for (int64_t o = k * outers; o < std::min(n_outer, (k + 1) * outers); ++o) {
        const int64_t base = (o * chans + c) * len;
        for (int64_t i = 0; i < len; i += V) {
          const auto [va, vb] = fn(base + i, std::min(V, len - i),
                                   [&](const acc_t* p) { return Vec(p[c]); });
          a = a + va;
          b = b + vb;
          if (++pending == kFlushElems / V) flush();
        }
      }
      flush();
      pa[t] = ta;
      pb[t] = tb;
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < nchunks; ++k) {
      sa[c] += pa[c * nchunks + k];
      sb[c] += pb[c * nchunks + k];
    }
}

// Calls f(offset, count, par) for every vector of elements, in parallel (no reduction); each
// worker fences its streaming stores (store_stream) before it returns.
//
// The kernels' closures (f here and in reduce_channels) capture by value (pointers, flags), and
// each worker calls a local copy of its closure, with local copies of the loop bounds: at::vec's
// stores go through a may_alias type, so anything reached through a reference (a [&] capture,
// a std::vector's data pointer, a bound captured by the parallel region) was reloaded after
// every store. On the AMD EPYC without AVX-512 (Zen 3) that was ~10 extra loads per 8 floats:
// the cache-resident 4096 x 1024 eval forward ran 0.63-0.76x eager, the training forward
// 0.69-0.78x, the backward 0.88-0.90x; with the copies 0.78-0.91x, 0.96-1.12x and 1.13-1.18x
// (alternating processes; benchmarks/NOTES.md).
template <typename acc_t, typename F>
void map_channels(int64_t outer, int64_t C, int64_t inner, const Streams& in, const F& f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (outer == 0 || C == 0 || inner == 0) return;
  if (inner == 1) {
    at::parallel_for(0, outer, std::max<int64_t>(1, kChunkElems / C), [&](int64_t r0, int64_t r1) {
      // Local copies of the closure, the streams and the bound (see above).
      const F fn = f;
      const Streams s = in;
      const int64_t cols = C;
      for (int64_t r = r0; r < r1; ++r) {
        s.ahead(r * cols, cols);
        for (int64_t c = 0; c < cols; c += V) {
          const int64_t n = std::min(V, cols - c);
          fn(r * cols + c, n, [&](const acc_t* p) { return Vec::loadu(p + c, n); });
        }
      }
      stream_fence();
    });
    return;
  }
  at::parallel_for(0, outer * C, std::max<int64_t>(1, kChunkElems / inner), [&](int64_t t0, int64_t t1) {
    const F fn = f;
    const int64_t chans = C, len = inner;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chans;
      for (int64_t i = 0; i < len; i += V)
        fn(t * len + i, std::min(V, len - i), [&](const acc_t* p) { return Vec(p[c]); });
    }
    stream_fence();
  });
}

// An output with l.x's layout (contiguous, or channels last), from the huge-page allocator of
// cpu_alloc.h: a 64 MB output first-touched in 4 KiB pages cost ~40 ms here, more than the whole
// normalisation.
at::Tensor empty_like_layout(const BnLayout& l) {
  if (l.x.is_contiguous()) return empty_cpu_output(l.x.sizes(), l.x.scalar_type());
  std::vector<int64_t> perm(l.x.sizes().begin(), l.x.sizes().end());
  const int64_t c = perm[1];
  perm.erase(perm.begin() + 1);
  perm.push_back(c);
  return empty_cpu_output(perm, l.x.scalar_type()).movedim(-1, 1);
}

inline bool stream_output(const at::Tensor& t) { return t.numel() * t.element_size() >= kStreamBytes; }

// Per-channel batch mean and biased variance (in double) of l.x: shifted sums with the shift K
// each channel's first value (math::bn_shift: 0 where that is not finite).
template <typename scalar_t>
void batch_stats(const BnLayout& l, std::vector<double>& mean, std::vector<double>& var) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t C = l.channels, n = l.count();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  std::vector<acc_t> shift(C, acc_t(0));
  if (n > 0)
    for (int64_t c = 0; c < C; ++c) shift[c] = math::bn_shift(static_cast<acc_t>(x[c * l.inner]));
  std::vector<double> s1, s2;
  const acc_t* const sh = shift.data();
  reduce_channels<acc_t>(l.outer, C, l.inner, streams(l, x),
                         [=](int64_t off, int64_t cnt, const auto& par) {
                           const Vec d = load(x + off, cnt) - par(sh);
                           const Vec d0 = cnt == Vec::size() ? d : Vec::set(Vec(acc_t(0)), d, cnt);
                           return std::make_pair(d0, d0 * d0);
                         },
                         s1, s2);
  mean.resize(C);
  var.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const double m1 = n > 0 ? s1[c] / n : 0.0;
    mean[c] = shift[c] + m1;
    var[c] = n > 0 ? std::max(s2[c] / n - m1 * m1, 0.0) : 0.0;
  }
}

// Per-channel sum(dz) and sum(dz (x - mean)), dz = dy, or dy where the ReLU output is > 0 (a
// select, as torch's threshold_backward). g and y are in l.x's layout.
template <typename scalar_t>
void backward_sums(const BnLayout& l, const at::Tensor& g, const at::Tensor& y, bool relu,
                   const std::vector<opmath_t<scalar_t>>& mean, std::vector<double>& sdz,
                   std::vector<double>& sdzx) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* yp = relu ? y.const_data_ptr<scalar_t>() : nullptr;
  const Vec zero(acc_t(0));
  const acc_t* const mp = mean.data();
  reduce_channels<acc_t>(l.outer, l.channels, l.inner, streams(l, x, gp, yp),
                         [=](int64_t off, int64_t cnt, const auto& par) {
                           const Vec dy = load(gp + off, cnt);
                           const Vec dz = relu ? math::vselect(load(yp + off, cnt) <= zero, zero, dy) : dy;
                           return std::make_pair(dz, dz * (load(x + off, cnt) - par(mp)));
                         },
                         sdz, sdzx);
}

// dx = (dz - gmean - (x - mean) k) scale, or dz scale when !batch_terms.
template <typename scalar_t>
void backward_dx(const BnLayout& l, const at::Tensor& g, const at::Tensor& y, bool relu,
                 bool batch_terms, const std::vector<opmath_t<scalar_t>>& mean,
                 const std::vector<opmath_t<scalar_t>>& gmean,
                 const std::vector<opmath_t<scalar_t>>& k,
                 const std::vector<opmath_t<scalar_t>>& scale, at::Tensor& dx) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* yp = relu ? y.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool stream = stream_output(dx);
  const Vec zero(acc_t(0));
  const Streams in = streams(l, gp, yp, batch_terms ? x : nullptr);
  const acc_t *const gm = gmean.data(), *const mp = mean.data(), *const kp = k.data(),
                     *const sp = scale.data();
  map_channels<acc_t>(l.outer, l.channels, l.inner, in, [=](int64_t off, int64_t cnt, const auto& par) {
    const Vec dy = load(gp + off, cnt);
    Vec v = relu ? math::vselect(load(yp + off, cnt) <= zero, zero, dy) : dy;
    if (batch_terms) v = v - par(gm) - (load(x + off, cnt) - par(mp)) * par(kp);
    if (stream)
      store_stream(dxp + off, v * par(sp), cnt);
    else
      store(dxp + off, v * par(sp), cnt);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t activation) {
  check_batch_norm(input, weight, bias, running_mean, running_var, training, eps, activation);
  const BnLayout l = bn_layout(input);
  const int64_t C = l.channels, n = l.count();
  at::Tensor out = empty_like_layout(l);
  at::Tensor mean_t, invstd_t, var_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        using Vec = Vectorized<acc_t>;
        const scalar_t* x = l.x.const_data_ptr<scalar_t>();
        std::vector<acc_t> mean(C), invstd(C);
        if (training) {
          std::vector<double> bmean, bvar;
          batch_stats<scalar_t>(l, bmean, bvar);
          std::vector<acc_t> unbiased(C);
          for (int64_t c = 0; c < C; ++c) {
            mean[c] = static_cast<acc_t>(bmean[c]);
            invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(bvar[c] + eps));
            unbiased[c] = static_cast<acc_t>(n > 1 ? bvar[c] * n / (n - 1) : bvar[c]);
          }
          var_t = channel_tensor(unbiased);
        } else {
          mean = channel_values<acc_t>(running_mean, C, 0.0);
          const std::vector<acc_t> var = channel_values<acc_t>(running_var, C, 1.0);
          for (int64_t c = 0; c < C; ++c)
            invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
          var_t = at::empty({0}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
        // y = (x - mean) * (gamma invstd) + beta: subtracting first keeps a large offset exact.
        const std::vector<acc_t> gamma = channel_values<acc_t>(weight, C, 1.0);
        const std::vector<acc_t> beta = channel_values<acc_t>(bias, C, 0.0);
        std::vector<acc_t> scale(C);
        for (int64_t c = 0; c < C; ++c) scale[c] = gamma[c] * invstd[c];
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        const bool relu = bn_relu(activation);
        const bool stream = stream_output(out);
        const acc_t *const mp = mean.data(), *const sp = scale.data(), *const bp = beta.data();
        map_channels<acc_t>(l.outer, C, l.inner, streams(l, x),
                            [=](int64_t off, int64_t cnt, const auto& par) {
          Vec v = (load(x + off, cnt) - par(mp)) * par(sp) + par(bp);
          if (relu) v = math::activate<math::Act::Relu>(v, Vec(acc_t(0)));
          if (stream)
            store_stream(y + off, v, cnt);
          else
            store(y + off, v, cnt);
        });
        mean_t = channel_tensor(mean);
        invstd_t = channel_tensor(invstd);
      });
  return {out, mean_t, invstd_t, var_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& output, const at::Tensor& mean_t, const at::Tensor& invstd_t, bool training,
    int64_t activation, bool input_grad, bool weight_grad, bool bias_grad) {
  check_backward("hpml::batch_norm_backward", grad, input, weight, output, activation, mean_t,
                 invstd_t);
  const BnLayout l = bn_layout(input);
  const int64_t C = l.channels, n = l.count();
  // grad and output in the input's layout, so that one offset addresses all three.
  const at::Tensor g = same_layout(grad, l);
  const bool relu = bn_relu(activation);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  at::Tensor dx = input_grad ? empty_like_layout(l) : at::empty({0}, input.options());
  const auto wdt = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  at::Tensor dw = at::empty(weight_grad ? at::IntArrayRef{C} : at::IntArrayRef{0}, input.options().dtype(wdt));
  at::Tensor db = at::empty(bias_grad ? at::IntArrayRef{C} : at::IntArrayRef{0}, input.options().dtype(wdt));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        const std::vector<acc_t> mean = channel_values<acc_t>(mean_t, C, 0.0);
        const std::vector<acc_t> invstd = channel_values<acc_t>(invstd_t, C, 1.0);
        const std::vector<acc_t> gamma = channel_values<acc_t>(weight, C, 1.0);
        std::vector<double> sdz, sdzx;
        // With running statistics and only dx asked for, the sums are not needed.
        if (training || weight_grad || bias_grad) backward_sums<scalar_t>(l, g, y, relu, mean, sdz, sdzx);
        if (weight_grad) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wdt, "bn dw", [&] {
            for (int64_t c = 0; c < C; ++c)
              dw.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sdzx[c] * invstd[c]);
          });
        }
        if (bias_grad) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wdt, "bn db", [&] {
            for (int64_t c = 0; c < C; ++c)
              db.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sdz[c]);
          });
        }
        if (!input_grad) return;
        // Training: dx = (dz - mean(dz) - (x - mean) invstd^2 mean(dz (x - mean))) gamma invstd;
        // with running statistics the batch terms vanish: dx = dz gamma invstd.
        std::vector<acc_t> scale(C), gmean(C, acc_t(0)), k(C, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          scale[c] = gamma[c] * invstd[c];
          if (training && n > 0) {
            gmean[c] = static_cast<acc_t>(sdz[c] / n);
            k[c] = static_cast<acc_t>(sdzx[c] / n * invstd[c] * invstd[c]);
          }
        }
        backward_dx<scalar_t>(l, g, y, relu, training, mean, gmean, k, scale, dx);
      });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_bn_input("hpml::batch_norm_stats", input, 0);
  const BnLayout l = bn_layout(input);
  at::Tensor mean_t, var_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_stats (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        std::vector<double> mean, var;
        batch_stats<scalar_t>(l, mean, var);
        mean_t = channel_tensor(std::vector<acc_t>(mean.begin(), mean.end()));
        var_t = channel_tensor(std::vector<acc_t>(var.begin(), var.end()));
      });
  return {mean_t, var_t};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(const at::Tensor& grad,
                                                                 const at::Tensor& input,
                                                                 const at::Tensor& output,
                                                                 const at::Tensor& mean_t,
                                                                 int64_t activation) {
  check_backward("hpml::batch_norm_backward_reduce", grad, input, std::nullopt, output, activation,
                 mean_t, std::nullopt);
  const BnLayout l = bn_layout(input);
  const bool relu = bn_relu(activation);
  const at::Tensor g = same_layout(grad, l);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  at::Tensor sdz_t, sdzx_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward_reduce (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        const std::vector<acc_t> mean = channel_values<acc_t>(mean_t, l.channels, 0.0);
        std::vector<double> sdz, sdzx;
        backward_sums<scalar_t>(l, g, y, relu, mean, sdz, sdzx);
        sdz_t = channel_tensor(std::vector<acc_t>(sdz.begin(), sdz.end()));
        sdzx_t = channel_tensor(std::vector<acc_t>(sdzx.begin(), sdzx.end()));
      });
  return {sdz_t, sdzx_t};
}

at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad, const at::Tensor& input,
                                         const std::optional<at::Tensor>& weight,
                                         const at::Tensor& output, const at::Tensor& mean_t,
                                         const at::Tensor& invstd_t, const at::Tensor& sum_dz_t,
                                         const at::Tensor& sum_dz_xmu_t, int64_t count,
                                         int64_t activation) {
  check_backward_elemt(grad, input, weight, output, activation, mean_t, invstd_t, sum_dz_t,
                       sum_dz_xmu_t, count);
  const BnLayout l = bn_layout(input);
  const int64_t C = l.channels;
  const bool relu = bn_relu(activation);
  const at::Tensor g = same_layout(grad, l);
  const at::Tensor y = relu ? same_layout(output, l) : at::Tensor();
  at::Tensor dx = empty_like_layout(l);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::batch_norm_backward_elemt (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        const std::vector<acc_t> mean = channel_values<acc_t>(mean_t, C, 0.0);
        const std::vector<acc_t> invstd = channel_values<acc_t>(invstd_t, C, 1.0);
        const std::vector<acc_t> gamma = channel_values<acc_t>(weight, C, 1.0);
        const std::vector<double> sdz = channel_values<double>(sum_dz_t, C, 0.0);
        const std::vector<double> sdzx = channel_values<double>(sum_dz_xmu_t, C, 0.0);
        std::vector<acc_t> scale(C), gmean(C), k(C);
        for (int64_t c = 0; c < C; ++c) {
          scale[c] = gamma[c] * invstd[c];
          gmean[c] = static_cast<acc_t>(sdz[c] / count);
          k[c] = static_cast<acc_t>(sdzx[c] / count * invstd[c] * invstd[c]);
        }
        backward_dx<scalar_t>(l, g, y, relu, true, mean, gmean, k, scale, dx);
      });
  return dx;
}

}  // namespace

HPML_REGISTER_CPU_KERNELS(batch_norm)

}  // namespace hpml
