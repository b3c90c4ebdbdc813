// hpml::bce_with_logits on CPU: at::vec (AVX2 + Sleef when built for it), at::parallel_for over
// fixed-size chunks. The reduction sums each chunk in a fixed lane order and then the chunk
// partials in index order, so the bits do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bce_with_logits.h"
#include "cpu_alloc.h"
#include "cpu_dispatch.h"
#include "cpu_vec.h"
#include "hpml_math.h"

namespace hpml {
namespace {

// Elements per chunk: a unit of parallel work and of the reduction (fixed, never derived from the
// number of threads). Eight thousand elements keep a chunk's operands in L1/L2.
constexpr int64_t kChunk = 8192;
// Fewer chunks than this run on the calling thread: an OpenMP region costs more than they do.
constexpr int64_t kGrainChunks = 4;

// The values of a broadcast operand for elements [start, start + n): a pointer into its data when
// it is a full tensor, else copied (runs of memcpy or fill) into `buf`.
template <typename scalar_t>
const scalar_t* gather(const Bcast& b, int64_t numel, int64_t start, int64_t n, scalar_t* buf) {
  const scalar_t* d = b.data.const_data_ptr<scalar_t>();
  if (b.full(numel)) return d + start;
  for (int64_t i = 0; i < n;) {
    const int64_t g = start + i;
    const int64_t idx = (g / b.inner) % b.period;
    int64_t len;
    if (b.inner == 1) {
      len = std::min(n - i, b.period - idx);
      std::copy(d + idx, d + idx + len, buf + i);
    } else {
      len = std::min(n - i, b.inner - g % b.inner);
      std::fill(buf + i, buf + i + len, d[idx]);
    }
    i += len;
  }
  return buf;
}

// Per-chunk scratch for the broadcast operands, and the pointers to read them through.
template <typename scalar_t>
struct BcastReader {
  const Bcast* b;
  int64_t numel;
  std::vector<scalar_t> buf;
  BcastReader(const std::optional<Bcast>& bc, int64_t numel_) : b(bc ? &*bc : nullptr), numel(numel_) {
    if (b && !b->full(numel)) buf.resize(kChunk);
  }
  const scalar_t* at(int64_t start, int64_t n) {
    return b ? gather<scalar_t>(*b, numel, start, n, buf.data()) : nullptr;
  }
};

// One chunk of the forward: writes the per-element loss to `out`, or returns its sum. Two vectors
// per step, with two accumulators: the math is a long dependency chain (exp, a division, a
// degree-7 polynomial), and two independent chains keep the core busy while one waits.
template <typename scalar_t, bool HAS_W, bool HAS_PW>
opmath_t<scalar_t> forward_chunk(const scalar_t* x, const scalar_t* y, const scalar_t* w,
                                 const scalar_t* pw, scalar_t* out, int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  auto loss = [&](int64_t i, int64_t c) {
    const Vec vpw = HAS_PW ? load(pw + i, c) : Vec(acc_t(1));
    Vec l = math::bce_logits_loss<HAS_PW>(load(x + i, c), load(y + i, c), vpw);
    if constexpr (HAS_W) l = l * load(w + i, c);
    return l;
  };
  Vec acc0(acc_t(0)), acc1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    prefetch_ahead(x + i, 2 * V);
    prefetch_ahead(y + i, 2 * V);
    if constexpr (HAS_W) prefetch_ahead(w + i, 2 * V);
    if constexpr (HAS_PW) prefetch_ahead(pw + i, 2 * V);
    const Vec l0 = loss(i, V), l1 = loss(i + V, V);
    if (out != nullptr) {
      store(out + i, l0, V);
      store(out + i + V, l1, V);
    } else {
      acc0 += l0;
      acc1 += l1;
    }
  }
  for (; i < n; i += V) {
    const int64_t c = std::min<int64_t>(V, n - i);
    const Vec l = loss(i, c);
    if (out != nullptr) {
      store(out + i, l, c);
    } else {
      acc0 += (c == V) ? l : Vec::set(Vec(acc_t(0)), l, c);
    }
  }
  __at_align__ acc_t lanes[V];
  (acc0 + acc1).store(lanes);
  acc_t s = 0;
  for (int64_t k = 0; k < V; ++k) s += lanes[k];
  return s;
}

// One chunk of the backward; `g` is the per-element grad (GRAD_ELEMWISE) or null, and `scale`
// multiplies it (or is the whole grad, already divided by numel for mean). Two vectors per step,
// as the forward.
template <typename scalar_t, bool HAS_W, bool HAS_PW, bool GRAD_ELEMWISE>
void backward_chunk(const scalar_t* g, opmath_t<scalar_t> scale, const scalar_t* x,
                    const scalar_t* y, const scalar_t* w, const scalar_t* pw, scalar_t* gx,
                    scalar_t* gy, int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vscale(scale);
  auto step = [&](int64_t i, int64_t c) {
    const Vec vx = load(x + i, c);
    const Vec vpw = HAS_PW ? load(pw + i, c) : Vec(acc_t(1));
    Vec gw = GRAD_ELEMWISE ? load(g + i, c) : vscale;
    if constexpr (HAS_W) gw = load(w + i, c) * gw;
    if (gx != nullptr) {
      store(gx + i, math::bce_logits_dinput<HAS_PW>(vx, load(y + i, c), vpw) * gw, c);
    }
    if (gy != nullptr) {
      store(gy + i, math::bce_logits_dtarget<HAS_PW>(vx, vpw) * gw, c);
    }
  };
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    prefetch_ahead(x + i, 2 * V);
    prefetch_ahead(y + i, 2 * V);
    if constexpr (GRAD_ELEMWISE) prefetch_ahead(g + i, 2 * V);
    step(i, V);
    step(i + V, V);
  }
  for (; i < n; i += V) step(i, std::min<int64_t>(V, n - i));
}

at::Tensor bce_with_logits_cpu(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  const BceArgs a = prepare_bce(input, target, weight, pos_weight, reduction);
  const int64_t n = a.numel;
  const bool reduce = reduction != at::Reduction::None;
  at::Tensor out = empty_cpu_output(reduce ? at::IntArrayRef{} : input.sizes(), a.x.scalar_type());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "hpml::bce_with_logits (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        std::vector<acc_t> partials(reduce ? nchunks : 0);
        const scalar_t* x = a.x.const_data_ptr<scalar_t>();
        const scalar_t* y = a.y.const_data_ptr<scalar_t>();
        scalar_t* o = reduce ? nullptr : out.mutable_data_ptr<scalar_t>();
        dispatch_bool(a.w.has_value(), [&](auto has_w) {
          dispatch_bool(a.pw.has_value(), [&](auto has_pw) {
            at::parallel_for(0, nchunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
              BcastReader<scalar_t> rw(a.w, n), rpw(a.pw, n);
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t s = c * kChunk, len = std::min(kChunk, n - s);
                const acc_t part = forward_chunk<scalar_t, decltype(has_w)::value,
                                                 decltype(has_pw)::value>(
                    x + s, y + s, rw.at(s, len), rpw.at(s, len), o ? o + s : nullptr, len);
                if (reduce) partials[c] = part;
              }
            });
          });
        });
        if (reduce) {
          // Index order, in double: independent of how the chunks were spread over threads.
          double total = 0;
          for (const acc_t p : partials) total += static_cast<double>(p);
          // Mean of an empty tensor is 0/0 = NaN, as torch gives.
          if (reduction == at::Reduction::Mean) total /= static_cast<double>(n);
          out.fill_(total);
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, bool input_grad, bool target_grad) {
  const BceArgs a = prepare_bce(input, target, weight, pos_weight, reduction);
  check_bce_grad(grad, input, reduction);
  const int64_t n = a.numel;
  const bool elemwise = reduction == at::Reduction::None;
  const at::Tensor g = elemwise ? grad.to(a.x.scalar_type()).contiguous() : grad;
  const auto dt = a.x.scalar_type();
  at::Tensor gx = empty_cpu_output(input_grad ? input.sizes() : at::IntArrayRef{0}, dt);
  at::Tensor gy = empty_cpu_output(target_grad ? input.sizes() : at::IntArrayRef{0}, dt);
  if (n == 0 || !(input_grad || target_grad)) return {gx, gy};
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "hpml::bce_with_logits_backward (CPU)", [&] {
        using acc_t = opmath_t<scalar_t>;
        acc_t scale = 1;
        if (!elemwise) {
          scale = g.item<double>();
          if (reduction == at::Reduction::Mean) scale = scale / static_cast<acc_t>(n);
        }
        const scalar_t* x = a.x.const_data_ptr<scalar_t>();
        const scalar_t* y = a.y.const_data_ptr<scalar_t>();
        const scalar_t* gp = elemwise ? g.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gxp = input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gyp = target_grad ? gy.mutable_data_ptr<scalar_t>() : nullptr;
        dispatch_bool(a.w.has_value(), [&](auto has_w) {
          dispatch_bool(a.pw.has_value(), [&](auto has_pw) {
            dispatch_bool(elemwise, [&](auto grad_elemwise) {
              at::parallel_for(0, nchunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
                BcastReader<scalar_t> rw(a.w, n), rpw(a.pw, n);
                for (int64_t c = c0; c < c1; ++c) {
                  const int64_t s = c * kChunk, len = std::min(kChunk, n - s);
                  backward_chunk<scalar_t, decltype(has_w)::value, decltype(has_pw)::value,
                                 decltype(grad_elemwise)::value>(
                      gp ? gp + s : nullptr, scale, x + s, y + s, rw.at(s, len),
                      rpw.at(s, len), gxp ? gxp + s : nullptr, gyp ? gyp + s : nullptr, len);
                }
              });
            });
          });
        });
      });
  return {gx, gy};
}

}  // namespace

HPML_REGISTER_CPU_KERNELS(bce_with_logits)

}  // namespace hpml
