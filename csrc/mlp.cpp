// hpml::mlp and hpml::mlp_backward on CPU.
//
// fp32 and fp64 nets run the whole-network kernel below: the products straight on the BLAS the
// torch build links (MKL's sgemm_/dgemm_, one sequential call per block of work, no dispatcher,
// no tensor per step), the bias, activation, mask and batch-norm passes fused around them, and no
// allocation but the outputs and one workspace. The forward runs a block of rows through every
// layer while it is in cache, up to the next batch norm in training (whose statistics need the
// whole batch: they are taken between two such passes, from per-block shifted sums merged in block
// order). The backward runs layer by layer over the batch. Work is split into blocks whose size
// depends on the shapes alone (never on the thread count), and every sum over rows is taken per
// block and added in block order: the same bits on any number of threads.
//
// fp16/bf16 nets of small products (below 2^22 multiply-adds each) run the same kernel in fp32 on
// widened operands, each layer's outputs rounded to the net's dtype as they are made
// (reduced_native). Other nets run layer by layer through the library's ops (mlp_layers,
// csrc/mlp.h): larger fp16/bf16 ones (oneDNN's AMX/AVX512-BF16 products), an empty batch or
// layer, and products of 2^30 multiply-adds and more, where linear_act's oneDNN forward is faster
// than a blocked sgemm; HPML_MLP_KERNEL=layers sends every net there (to compare).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "batch_norm.h"
#include "cpu_alloc.h"
#include "cpu_blas.h"
#include "cpu_dispatch.h"
#include "cpu_channel.h"
#include "cpu_epilogue.h"
#include "hpml_math.h"
#include "linear_act.h"
#include "mlp.h"
#include "mlp_cpu.h"

namespace hpml {
namespace {

// Elements of the widest activation in one block of rows (64 KiB of fp32): the block's input and
// output of a layer, and the layer's weight when narrow, stay in L2 through the whole net.
constexpr int64_t kBlockElems = 16384;
constexpr int64_t kMinBlockRows = 128;
// From this many multiply-adds the per-layer op's oneDNN product beats a blocked sgemm.
constexpr int64_t kLayersMacs = int64_t(1) << 30;

bool layers_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("HPML_MLP_KERNEL");
    return v != nullptr && std::strcmp(v, "layers") == 0;
  }();
  return forced;
}

// A per-channel entry of the op's lists as n values of T (fill where absent).
template <typename T>
std::vector<T> values_of(const at::Tensor& t, int64_t n, double fill) {
  return channel_values<T>(mlp_absent(t) ? std::nullopt : std::optional<at::Tensor>(t), n, fill);
}

// v as a 1-D tensor of dtype dt.
at::Tensor from_doubles(const std::vector<double>& v, c10::ScalarType dt) {
  // Written in dt at once: a double tensor and a .to(dt) cost ~2 us of dispatch and allocation
  // per gradient, seven of them in a small net's backward.
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "hpml::mlp (CPU)", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

// Rows per block: kBlockElems of the widest activation, a multiple of 16 in [kMinBlockRows,
// 1024]. The floor: each block's sgemm packs the layer's whole weight for the block's rows alone,
// so wide layers in blocks of few rows cost up to twice one product over all rows (1 thread, Intel
// Xeon, 1024 x 1000 x 1000 by blocks of 16 / 64 / 128 / 1024 rows: 24.6 / 14.0 / 12.5 / 11.1 ms;
// a 1000-wide net's forward 0.54x eager with 16-row blocks). A block of 128 rows of a 1000-wide
// layer (512 KiB of fp32) still fits in L2.
int64_t block_rows(const std::vector<int64_t>& widths) {
  const int64_t w = *std::max_element(widths.begin(), widths.end());
  return std::clamp<int64_t>(kBlockElems / std::max<int64_t>(w, 1) / 16 * 16, kMinBlockRows, 1024);
}

// Adds the per-block partial vectors parts[b * n + j] in block order, in double.
template <typename T>
std::vector<double> sum_blocks(const std::vector<T>& parts, int64_t nblocks, int64_t n) {
  std::vector<double> s(n, 0.0);
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<double>(parts[b * n + j]);
  return s;
}

// ---- batch norm passes over rows ----------------------------------------------------------

// Per-channel shifted sums of rows [r0, r1) of z (N columns), shifted by row r0 (math::bn_shift:
// 0 where a value is not finite): into s1, s2.
template <typename T>
void block_moments(const T* z, int64_t r0, int64_t r1, int64_t N, T* s1, T* s2) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const T* k = z + r0 * N;
  T kb[V];
  for (int64_t j = 0; j < N; j += V) {
    const int64_t c = std::min<int64_t>(V, N - j);
    for (int64_t i = 0; i < c; ++i) kb[i] = math::bn_shift(k[j + i]);
    const Vec kv = load(kb, c);
    Vec a(T(0)), b(T(0));
    for (int64_t m = r0; m < r1; ++m) {
      const Vec d = load(z + m * N + j, c) - kv;
      a = a + d;
      b = b + d * d;
    }
    store(s1 + j, a, c);
    store(s2 + j, b, c);
  }
}

// out = act((z - mean) scale + beta) for rows [r0, r1), and aux = the pre-activation (when not
// null: the leaky ReLU's sign for the backward).
template <typename T, Act A>
void bn_apply_rows(const T* z, T* out, T* aux, const T* mean, const T* scale, const T* beta,
                   int64_t r0, int64_t r1, int64_t N, T slope) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec vslope(slope);
  for (int64_t m = r0; m < r1; ++m) {
    for (int64_t j = 0; j < N; j += V) {
      const int64_t c = std::min<int64_t>(V, N - j);
      const Vec a = (load(z + m * N + j, c) - load(mean + j, c)) * load(scale + j, c) +
                    load(beta + j, c);
      if (aux != nullptr) store(aux + m * N + j, a, c);
      store(out + m * N + j, math::activate<A>(a, vslope), c);
    }
  }
}

// The gradient at the batch norm's output through the activation: dL/da from g = dL/dh, with
// h = act(a) (relu: h > 0, as a select; leaky: aux = a > 0; sigmoid, tanh: from h).
template <typename T, Act A>
inline Vectorized<T> bn_act_grad(const Vectorized<T>& g, const T* h, const T* aux, int64_t off,
                                 int64_t c, T slope) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0));
  if constexpr (A == Act::Relu) {
    return math::vselect(load(h + off, c) <= zero, zero, g);  // a NaN output passes g, as torch
  } else if constexpr (A == Act::LeakyRelu) {
    return math::vselect(load(aux + off, c) > zero, g, g * Vec(slope));
  } else if constexpr (A == Act::Sigmoid || A == Act::Tanh) {
    return math::activation_grad_from_output<A>(g, load(h + off, c));
  } else {
    return g;
  }
}

// ---- the forward ----------------------------------------------------------------------------

// p[0, n) = their values rounded to S (fp16/bf16, round to nearest even) and widened back: an
// fp16/bf16 net's activations in the fp32 kernel, as eager's layers store them.
template <typename S>
void round_through(float* p, int64_t n) {
  using Vec = Vectorized<float>;
  constexpr int64_t V = Vec::size();
  S tmp[V];
  for (int64_t j = 0; j < n; j += V) {
    const int64_t c = std::min(V, n - j);
    store<S>(tmp, Vec::loadu(p + j, c), c);
    load<S>(tmp, c).store(p + j, c);
  }
}

// Rows [r0, r1) of p (N columns) through round_through for dtype rd (nothing for fp32/fp64).
template <typename T>
void round_rows(T* p, int64_t r0, int64_t r1, int64_t N, c10::ScalarType rd) {
  if constexpr (std::is_same_v<T, float>) {
    if (rd == at::kBFloat16) round_through<at::BFloat16>(p + r0 * N, (r1 - r0) * N);
    if (rd == at::kHalf) round_through<at::Half>(p + r0 * N, (r1 - r0) * N);
  }
}

template <typename T>
struct FwdLayer {
  int64_t K = 0, N = 0;
  const T* w = nullptr;
  const T* b = nullptr;
  Act act = Act::None;
  bool bn = false;
  T* out = nullptr;         // the layer's output (h, or y for the last layer)
  uint8_t* mask = nullptr;  // linear_act's mask of a layer without batch norm
  T* z = nullptr;           // with batch norm: the linear output
  T* aux = nullptr;         // with batch norm and leaky ReLU: the pre-activation
  std::vector<T> mean, scale, beta;
};

template <typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>> forward_native(
    const at::Tensor& input, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, OptTensorList bn_biases,
    OptTensorList running_means, OptTensorList running_vars, bool training, double eps,
    Act act, T slope, Act out_act, c10::ScalarType rd) {
  // rd: an fp16/bf16 net's dtype (reduced_native), to which every layer's outputs are rounded as
  // they are made (what eager's layers store and the next one reads); else T's own.
  const int64_t M = input.size(0), L = static_cast<int64_t>(weights.size());
  const auto dt = input.scalar_type();
  const at::TensorOptions acc = at::TensorOptions().dtype(dt);
  const auto none = [&] { return at::empty({0}, input.options()); };
  const at::Tensor x = input.contiguous();
  std::vector<at::Tensor> keep;  // contiguous weights and biases, alive for the call
  std::vector<FwdLayer<T>> layers(L);
  std::vector<at::Tensor> saved;
  saved.reserve(kMlpSavedPerLayer * (L - 1) + 1);
  at::Tensor y;
  std::vector<int64_t> widths{input.size(1)};
  for (int64_t i = 0; i < L; ++i) {
    FwdLayer<T>& f = layers[i];
    const at::Tensor w = weights[i].contiguous();
    keep.push_back(w);
    f.K = w.size(1);
    f.N = w.size(0);
    widths.push_back(f.N);
    f.w = w.const_data_ptr<T>();
    if (!mlp_absent(biases[i])) {
      keep.push_back(biases[i].contiguous());
      f.b = keep.back().const_data_ptr<T>();
    }
    const bool last = i == L - 1;
    f.bn = !last && batch_norm.get(i);
    f.act = last ? out_act : act;
    at::Tensor out = empty_cpu_output({M, f.N}, dt);
    f.out = out.mutable_data_ptr<T>();
    if (!f.bn) {
      at::Tensor mask = at::empty(act_uses_mask(f.act) ? at::IntArrayRef{M, mask_row_bytes(f.N)}
                                                       : at::IntArrayRef{0},
                                  input.options().dtype(at::kByte));
      f.mask = act_uses_mask(f.act) ? mask.mutable_data_ptr<uint8_t>() : nullptr;
      if (last) {
        y = out;
        saved.push_back(mask);
      } else {
        saved.insert(saved.end(), {out, mask, none(), none(), none(), none()});
      }
      continue;
    }
    at::Tensor z = empty_cpu_output({M, f.N}, dt);
    f.z = z.mutable_data_ptr<T>();
    at::Tensor aux = act == Act::LeakyRelu ? empty_cpu_output({M, f.N}, dt) : none();
    if (act == Act::LeakyRelu) f.aux = aux.mutable_data_ptr<T>();
    std::vector<T> gamma = values_of<T>(bn_weights[i], f.N, 1.0);
    f.beta = values_of<T>(bn_biases[i], f.N, 0.0);
    if (training) {  // mean and scale once the batch's statistics are known
      saved.insert(saved.end(), {out, aux, z});
      saved.push_back(at::Tensor());  // mean, invstd, var: below
      saved.push_back(at::Tensor());
      saved.push_back(at::Tensor());
      f.scale = std::move(gamma);  // gamma for now
      continue;
    }
    f.mean = values_of<T>(running_means[i], f.N, 0.0);
    const std::vector<T> var = values_of<T>(running_vars[i], f.N, 1.0);
    std::vector<T> invstd(f.N);
    f.scale.resize(f.N);
    for (int64_t c = 0; c < f.N; ++c) {
      invstd[c] = static_cast<T>(bn_invstd(static_cast<double>(var[c]), eps));
      f.scale[c] = gamma[c] * invstd[c];
    }
    saved.insert(saved.end(), {out, aux, z, channel_tensor(f.mean), channel_tensor(invstd),
                               at::empty({0}, acc)});
  }

  const int64_t rb = block_rows(widths);
  const int64_t nblocks = (M + rb - 1) / rb;
  const T* xp = x.const_data_ptr<T>();
  const auto layer_in = [&](int64_t i) -> const T* { return i == 0 ? xp : layers[i - 1].out; };

  // An fp16/bf16 net (rd reduced): eager rounds each op's output, so the linear output and the
  // batch norm's are rounded before the activation, then its output. That order matters for
  // sigmoid and tanh only (for ReLU, leaky ReLU and none rounding commutes with the activation up
  // to an ulp of the leaky slope's product, and never changes a sign): their activation runs as a
  // pass of its own over the rounded rows.
  const bool reduced = rd != c10::CppTypeToScalarType<T>::value;
  const bool act_apart = reduced && (act == Act::Sigmoid || act == Act::Tanh);
  // The batch norm of layer p (mean and scale known) for rows [r0, r1): z to its output.
  const auto bn_rows = [&](const FwdLayer<T>& p, int64_t r0, int64_t r1) {
    dispatch_act(act_apart ? Act::None : act, [&](auto a) {
      bn_apply_rows<T, decltype(a)::value>(p.z, p.out, p.aux, p.mean.data(), p.scale.data(),
                                           p.beta.data(), r0, r1, p.N, slope);
    });
    round_rows(p.out, r0, r1, p.N, rd);
    if (!act_apart) return;
    dispatch_act(act, [&](auto a) {
      epilogue_rows<T, decltype(a)::value>(p.out, nullptr, nullptr, r0, r1, p.N, slope);
    });
    round_rows(p.out, r0, r1, p.N, rd);
  };

  // Rows [r0, r1) through layer i, from its input to its output (or, with batch norm in
  // training, to its linear output z).
  const auto run_layer = [&](int64_t i, int64_t r0, int64_t r1) {
    FwdLayer<T>& f = layers[i];
    T* dst = f.bn ? f.z : f.out;
    gemm<T>(false, true, r1 - r0, f.N, f.K, layer_in(i) + r0 * f.K, f.K, f.w, f.K, false,
            dst + r0 * f.N, f.N);
    const bool apart = reduced && !f.bn && (f.act == Act::Sigmoid || f.act == Act::Tanh);
    dispatch_act(f.bn || apart ? Act::None : f.act, [&](auto a) {
      epilogue_rows<T, decltype(a)::value>(dst, f.b, f.mask, r0, r1, f.N, slope);
    });
    round_rows(dst, r0, r1, f.N, rd);
    if (apart) {  // (no mask: sigmoid and tanh's backward reads their output)
      dispatch_act(f.act, [&](auto a) {
        epilogue_rows<T, decltype(a)::value>(dst, nullptr, nullptr, r0, r1, f.N, slope);
      });
      round_rows(dst, r0, r1, f.N, rd);
    }
    if (f.bn && !training) bn_rows(f, r0, r1);
  };

  // Passes: each from a layer up to and including the next batch norm in training.
  int64_t first = 0, pending = -1;  // pending: a batch norm whose normalisation opens the pass
  while (first < L) {
    int64_t end = first;
    while (end < L && !(layers[end].bn && training)) ++end;
    end = std::min(end + 1, L);
    const FwdLayer<T>* stats_layer = layers[end - 1].bn && training ? &layers[end - 1] : nullptr;
    const int64_t sn = stats_layer != nullptr ? stats_layer->N : 0;
    std::vector<T> s1(nblocks * sn), s2(nblocks * sn);
    int64_t macs = 0;
    for (int64_t i = first; i < end; ++i) macs += rb * layers[i].K * layers[i].N;
    for_blocks(nblocks, macs, [&](int64_t blk) {
      const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
      if (pending >= 0) bn_rows(layers[pending], r0, r1);
      for (int64_t i = first; i < end; ++i) run_layer(i, r0, r1);
      if (stats_layer != nullptr)
        block_moments(stats_layer->z, r0, r1, sn, s1.data() + blk * sn, s2.data() + blk * sn);
    });
    if (stats_layer != nullptr) {
      // Merge the blocks' (count, mean, M2) in block order (Chan et al.), in double.
      FwdLayer<T>& f = layers[end - 1];
      std::vector<double> mean(sn, 0.0), m2(sn, 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t r0 = blk * rb, nb = std::min(M, r0 + rb) - r0, na = r0;
        const T* k = f.z + r0 * sn;
        for (int64_t c = 0; c < sn; ++c) {
          const double a1 = s1[blk * sn + c], a2 = s2[blk * sn + c];
          const double bmean = static_cast<double>(k[c]) + a1 / nb;
          const double bm2 = std::max(a2 - a1 * a1 / nb, 0.0);
          const double delta = bmean - mean[c];
          const double n = static_cast<double>(na + nb);
          mean[c] += delta * nb / n;
          m2[c] += bm2 + delta * delta * static_cast<double>(na) * nb / n;
        }
      }
      std::vector<T> tmean(sn), invstd(sn), unbiased(sn);
      f.mean.resize(sn);
      for (int64_t c = 0; c < sn; ++c) {
        const double var = m2[c] / static_cast<double>(M);
        tmean[c] = static_cast<T>(mean[c]);
        invstd[c] = static_cast<T>(bn_invstd(var, eps));
        unbiased[c] = static_cast<T>(var * bn_unbias_factor(M));
        f.scale[c] = f.scale[c] * invstd[c];  // gamma invstd
      }
      f.mean = tmean;
      const int64_t s = kMlpSavedPerLayer * (end - 1);
      saved[s + 3] = channel_tensor(tmean);
      saved[s + 4] = channel_tensor(invstd);
      saved[s + 5] = channel_tensor(unbiased);
      pending = end - 1;
    }
    first = end;
  }
  return {y, saved};
}

// ---- the backward -------------------------------------------------------------------------

// The last layer's dZ for rows [r0, r1) of an (M, N) output straight from the BCE-with-logits
// loss that ends the net (MlpLoss; output activation none): dZ = d loss / d logits, the
// arithmetic of bce_with_logits_backward's kernel element for element, written where the
// layer's dZ goes (never a logits gradient of its own); the target's gradient into gy (when not
// null) and dZ's column sums into db_part (when not null), as dz_rows adds them.
template <typename T, bool HAS_W, bool HAS_PW, bool ELEMWISE>
void loss_dz_rows(const T* x, const T* y, const T* w, const T* pw, const T* g, T scale, T* dz,
                  T* gy, T* db_part, int64_t r0, int64_t r1, int64_t N) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t end = r1 * N;
  const Vec vscale(scale);
  for (int64_t i = r0 * N; i < end; i += V) {
    const int64_t c = std::min<int64_t>(V, end - i);
    const Vec vx = load(x + i, c);
    const Vec vpw = HAS_PW ? load(pw + i, c) : Vec(T(1));
    Vec gw = ELEMWISE ? load(g + i, c) : vscale;
    if constexpr (HAS_W) gw = load(w + i, c) * gw;
    store(dz + i, math::bce_logits_dinput<HAS_PW>(vx, load(y + i, c), vpw) * gw, c);
    if (gy != nullptr) store(gy + i, math::bce_logits_dtarget<HAS_PW>(vx, vpw) * gw, c);
  }
  if (db_part == nullptr) return;
  const Vec zero(T(0));
  for (int64_t m = r0; m < r1; ++m) {
    for (int64_t j = 0; j < N; j += V) {
      const int64_t c = std::min<int64_t>(V, N - j);
      Vec d = load(dz + m * N + j, c);
      if (c < V) d = Vec::set(zero, d, c);
      (Vec::loadu(db_part + j, c) + d).store(db_part + j, c);
    }
  }
}

template <typename T>
MlpGrads backward_native(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& output,
                at::TensorList weights, OptTensorList biases, const c10::List<bool>& batch_norm,
                OptTensorList bn_weights, at::TensorList saved, bool training, Act act, T slope,
                Act out_act, bool input_grad, const c10::List<bool>& weight_grads,
                const c10::List<bool>& bias_grads, const c10::List<bool>& bn_weight_grads,
                const c10::List<bool>& bn_bias_grads, MlpLoss* loss) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t M = input.size(0), L = static_cast<int64_t>(weights.size());
  const auto dt = input.scalar_type();
  const auto none = [&](c10::ScalarType t) { return at::empty({0}, input.options().dtype(t)); };
  std::vector<bool> below(L + 1, input_grad);  // below[i]: a gradient wanted before layer i
  for (int64_t i = 1; i <= L; ++i) {
    bool here = weight_grads.get(i - 1) || bias_grads.get(i - 1);
    if (i - 1 < L - 1) here = here || bn_weight_grads.get(i - 1) || bn_bias_grads.get(i - 1);
    below[i] = below[i - 1] || here;
  }
  std::vector<at::Tensor> gw, gb, gbw, gbb;
  for (int64_t i = 0; i < L; ++i) {
    gw.push_back(none(dt));
    gb.push_back(none(dt));
    if (i < L - 1) {
      gbw.push_back(none(dt));
      gbb.push_back(none(dt));
    }
  }
  std::vector<int64_t> widths{input.size(1)};
  int64_t wmax = 0;
  for (int64_t i = 0; i < L; ++i) {
    widths.push_back(weights[i].size(0));
    if (i < L - 1) wmax = std::max(wmax, weights[i].size(0));
  }
  wmax = std::max(wmax, weights[L - 1].size(0));
  const int64_t rb = block_rows(widths);
  const int64_t nblocks = (M + rb - 1) / rb;
  const at::Tensor x = input.contiguous();
  const at::Tensor g0 = grad.contiguous();
  // Two workspaces for dL/dz of one layer and dL/d(input) of it, swapped per layer.
  at::Tensor ws[2] = {empty_cpu_output({M, wmax}, dt), empty_cpu_output({M, wmax}, dt)};
  int cur = 0;
  const T* g = g0.const_data_ptr<T>();  // dL/d(output of layer i), M x N_i
  at::Tensor gx = none(dt);
  for (int64_t i = L - 1; i >= 0 && below[i + 1]; --i) {
    const bool last = i == L - 1;
    const int64_t N = weights[i].size(0), K = weights[i].size(1);
    const at::Tensor w = weights[i].contiguous();
    const at::Tensor in_t = i == 0 ? x : saved[kMlpSavedPerLayer * (i - 1)].contiguous();
    const T* in = in_t.const_data_ptr<T>();
    const bool bn = !last && batch_norm.get(i);
    const bool want_db = bias_grads.get(i) && !mlp_absent(biases[i]);
    const bool want_dw = weight_grads.get(i);
    const Act a = last ? out_act : act;
    // dz (M x N): dL/d(linear output) of layer i, into the current workspace, with the
    // per-block column sums (the bias gradient).
    T* dz = ws[cur].mutable_data_ptr<T>();
    std::vector<T> db_parts(want_db ? nblocks * N : 0, T(0));
    if (last && loss != nullptr) {
      const at::Tensor lx = output.contiguous();
      const bool elemwise = loss->reduction == 0;
      const at::Tensor lg = elemwise ? loss->grad.to(dt).contiguous() : loss->grad;
      T scale = 1;  // as bce_with_logits_backward's kernel: grad, / numel for the mean
      if (!elemwise) {
        scale = static_cast<T>(lg.item<double>());
        if (loss->reduction == 1) scale = scale / static_cast<T>(M * N);
      }
      if (loss->target_grad) loss->grad_target = empty_cpu_output({M, N}, dt);
      const T* xp = lx.const_data_ptr<T>();
      const T* yp = loss->target.const_data_ptr<T>();
      const T* wp = loss->weight.defined() ? loss->weight.const_data_ptr<T>() : nullptr;
      const T* pwp = loss->pos_weight.defined() ? loss->pos_weight.const_data_ptr<T>() : nullptr;
      const T* gp = elemwise ? lg.const_data_ptr<T>() : nullptr;
      T* gyp = loss->target_grad ? loss->grad_target.mutable_data_ptr<T>() : nullptr;
      dispatch_bool(wp != nullptr, [&](auto has_w) {
        dispatch_bool(pwp != nullptr, [&](auto has_pw) {
          dispatch_bool(elemwise, [&](auto el) {
            for_blocks(nblocks, rb * N, [&](int64_t blk) {
              const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
              loss_dz_rows<T, decltype(has_w)::value, decltype(has_pw)::value,
                           decltype(el)::value>(
                  xp, yp, wp, pwp, gp, scale, dz, gyp,
                  want_db ? db_parts.data() + blk * N : nullptr, r0, r1, N);
            });
          });
        });
      });
    } else if (!bn) {
      const at::Tensor y = (last ? output : saved[kMlpSavedPerLayer * i]).contiguous();
      const at::Tensor mask =
          (last ? saved[saved.size() - 1] : saved[kMlpSavedPerLayer * i + 1]).contiguous();
      const T* yp = act_uses_output(a) ? y.const_data_ptr<T>() : nullptr;
      const uint8_t* mp = act_uses_mask(a) ? mask.const_data_ptr<uint8_t>() : nullptr;
      dispatch_act(a, [&](auto ac) {
        for_blocks(nblocks, rb * N, [&](int64_t blk) {
          const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
          dz_rows<T, decltype(ac)::value>(g, yp, mp, dz, want_db ? db_parts.data() + blk * N : nullptr,
                                          r0, r1, N, slope);
        });
      });
    } else {
      const int64_t s = kMlpSavedPerLayer * i;
      const at::Tensor h_t = saved[s].contiguous(), aux_t = saved[s + 1].contiguous(),
                       z_t = saved[s + 2].contiguous();
      const T* h = h_t.const_data_ptr<T>();
      const T* aux = act == Act::LeakyRelu ? aux_t.const_data_ptr<T>() : nullptr;
      const T* z = z_t.const_data_ptr<T>();
      const std::vector<T> mean = values_of<T>(saved[s + 3], N, 0.0);
      const std::vector<T> invstd = values_of<T>(saved[s + 4], N, 1.0);
      const std::vector<T> gamma = values_of<T>(bn_weights[i], N, 1.0);
      const bool want_gbw = bn_weight_grads.get(i) && !mlp_absent(bn_weights[i]);
      const bool want_gbb = bn_bias_grads.get(i);
      // Pass 1: ga = dL/da into dz; per block sum(ga) and sum(ga (z - mean)).
      const bool sums = training || want_gbw || want_gbb;
      std::vector<T> p1(sums ? nblocks * N : 0), p2(sums ? nblocks * N : 0);
      dispatch_act(act, [&](auto ac) {
        for_blocks(nblocks, rb * N, [&](int64_t blk) {
          const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
          for (int64_t j = 0; j < N; j += V) {
            const int64_t c = std::min<int64_t>(V, N - j);
            const Vec mv = load(mean.data() + j, c);
            Vec a1(T(0)), a2(T(0));
            for (int64_t m = r0; m < r1; ++m) {
              const int64_t off = m * N + j;
              Vec ga = bn_act_grad<T, decltype(ac)::value>(load(g + off, c), h, aux, off, c, slope);
              if (c < V) ga = Vec::set(Vec(T(0)), ga, c);
              store(dz + off, ga, c);
              if (sums) {
                a1 = a1 + ga;
                a2 = a2 + ga * (load(z + off, c) - mv);
              }
            }
            if (sums) {
              store(p1.data() + blk * N + j, a1, c);
              store(p2.data() + blk * N + j, a2, c);
            }
          }
        });
      });
      std::vector<T> gmean(N, T(0)), k(N, T(0)), scale(N);
      const at::Tensor wdt_src = mlp_absent(bn_weights[i]) ? input : bn_weights[i];
      if (sums) {
        const std::vector<double> sdz = sum_blocks(p1, nblocks, N), sdzx = sum_blocks(p2, nblocks, N);
        if (want_gbw) {
          std::vector<double> v(N);
          for (int64_t c = 0; c < N; ++c) v[c] = sdzx[c] * static_cast<double>(invstd[c]);
          gbw[i] = from_doubles(v, wdt_src.scalar_type());
        }
        if (want_gbb) gbb[i] = from_doubles(sdz, wdt_src.scalar_type());
        if (training) {
          const double inv_n = bn_inv_count(M);
          for (int64_t c = 0; c < N; ++c) {
            gmean[c] = static_cast<T>(bn_grad_mean(sdz[c], inv_n));
            k[c] = static_cast<T>(bn_grad_k(sdzx[c], inv_n, static_cast<double>(invstd[c])));
          }
        }
      }
      if (!want_gbw) gbw[i] = none(wdt_src.scalar_type());
      if (!want_gbb) gbb[i] = none(wdt_src.scalar_type());
      for (int64_t c = 0; c < N; ++c) scale[c] = gamma[c] * invstd[c];
      // Pass 2: dz = (ga - gmean - (z - mean) k) scale (training) or ga scale, in place, with
      // the linear bias gradient's per-block sums.
      for_blocks(nblocks, rb * N, [&](int64_t blk) {
        const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
        for (int64_t j = 0; j < N; j += V) {
          const int64_t c = std::min<int64_t>(V, N - j);
          const Vec mv = load(mean.data() + j, c), gm = load(gmean.data() + j, c);
          const Vec kv = load(k.data() + j, c), sv = load(scale.data() + j, c);
          Vec acc(T(0));
          for (int64_t m = r0; m < r1; ++m) {
            const int64_t off = m * N + j;
            Vec v = load(dz + off, c);
            if (training) v = v - gm - (load(z + off, c) - mv) * kv;
            v = v * sv;
            if (c < V) v = Vec::set(Vec(T(0)), v, c);
            store(dz + off, v, c);
            acc = acc + v;
          }
          if (want_db) store(db_parts.data() + blk * N + j, acc, c);
        }
      });
    }
    if (want_db) {
      const std::vector<double> s = sum_blocks(db_parts, nblocks, N);
      gb[i] = from_doubles(s, biases[i].scalar_type());  // dt, or an fp16/bf16 net's (below)
    }
    if (want_dw) {
      gw[i] = empty_cpu_output({N, K}, dt);
      weight_grad<T>(dz, in, M, N, K, gw[i].mutable_data_ptr<T>());
    }
    if (!below[i]) break;
    // dL/d(input of layer i) = dz W, by blocks of rows.
    T* gin;
    if (i == 0) {
      gx = empty_cpu_output({M, K}, dt);
      gin = gx.mutable_data_ptr<T>();
    } else {
      gin = ws[1 - cur].mutable_data_ptr<T>();
    }
    const T* wp = w.const_data_ptr<T>();
    for_blocks(nblocks, rb * N * K, [&](int64_t blk) {
      const int64_t r0 = blk * rb, r1 = std::min(M, r0 + rb);
      gemm<T>(false, false, r1 - r0, K, N, dz + r0 * N, N, wp, K, false, gin + r0 * K, K);
    });
    g = gin;
    cur = 1 - cur;
  }
  return {input_grad ? gx : none(dt), gw, gb, gbw, gbb};
}

// The saved tensors as hpml::mlp returns them: the kernel reads them through raw pointers, so
// their shapes and dtypes are checked first.
void check_saved(const at::Tensor& input, at::TensorList weights,
                 const c10::List<bool>& batch_norm, at::TensorList saved, Act act, Act out_act) {
  const int64_t M = input.size(0), L = static_cast<int64_t>(weights.size());
  const auto dt = input.scalar_type();
  const auto expect = [&](size_t k, at::IntArrayRef shape, c10::ScalarType want) {
    const at::Tensor& t = saved[k];
    TORCH_CHECK(t.sizes() == shape && t.scalar_type() == want, "hpml::mlp_backward: saved tensor ",
                k, " should be of shape ", py_shape(shape), " and dtype ", py_dtype(want), ", got ",
                py_shape(t.sizes()), " and ", py_dtype(t.scalar_type()),
                " (pass the saved tensors hpml::mlp returned)");
  };
  for (int64_t i = 0; i < L - 1; ++i) {
    const int64_t N = weights[i].size(0), s = kMlpSavedPerLayer * i;
    expect(s, {M, N}, dt);
    if (!batch_norm.get(i)) {
      if (act_uses_mask(act)) expect(s + 1, {M, mask_row_bytes(N)}, at::kByte);
      continue;
    }
    if (act == Act::LeakyRelu) expect(s + 1, {M, N}, dt);
    expect(s + 2, {M, N}, dt);
    expect(s + 3, {N}, dt);
    expect(s + 4, {N}, dt);
  }
  if (act_uses_mask(out_act))
    expect(saved.size() - 1, {M, mask_row_bytes(weights[L - 1].size(0))}, at::kByte);
}

// Whether the whole-network kernel takes this net (else mlp_layers, which also raises on
// arguments that break the op's contract: those never come here).
bool native(const at::Tensor& input, at::TensorList weights) {
  if (input.dim() != 2 || input.device().type() != c10::kCPU) return false;
  for (const at::Tensor& w : weights)
    if (w.dim() != 2 || w.scalar_type() != input.scalar_type()) return false;
  if (layers_forced()) return false;
  const int64_t M = input.size(0);
  for (const at::Tensor& w : weights) {
    const int64_t N = w.size(0), K = w.size(1);
    if (!blas_product(input.scalar_type(), M, N, K)) return false;
    if (static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >=
        static_cast<double>(kLayersMacs))
      return false;
  }
  return true;
}

// fp16/bf16 nets whose every product is below this many multiply-adds run the whole-network
// kernel in fp32 (reduced_native): there the layer-by-layer path's cost is per call (oneDNN's
// reduced-precision primitives, one op call per layer), while larger products are faster on its
// AMX/AVX512-BF16 kernels than on fp32 sgemm (4096 x 1024 x 1024 bf16: 3.7 ms against 29 ms
// fp32). bf16 forward + backward against eager, whole-net kernel / layer by layer (Intel Xeon
// with AMX, 2 threads): 64-64-64-1 + BN at 256 rows (largest product 2^20) 1.34-1.36x /
// 0.99-1.00x; 2^22 (64-wide at 1024 rows, 128-wide at 256) 0.95-0.99x / 0.91-0.94x; 128-256-
// 256-10 + BN at 128 rows (8.4 M) 0.88x / 1.01x. HPML_MLP_REDUCED_MACS overrides it (0: never).
int64_t reduced_macs() {
  static const int64_t macs = [] {
    const char* v = std::getenv("HPML_MLP_REDUCED_MACS");
    return v != nullptr ? std::atoll(v) : int64_t(1) << 22;
  }();
  return macs;
}

// Whether an fp16/bf16 net runs the whole-network kernel in fp32: its operands widened to fp32
// (exactly), the kernel's fp32 arithmetic (products accumulated in fp32, as oneDNN's), and the
// activations rounded to the net's dtype where eager's layers round theirs (forward_native's rd),
// so that each layer reads what eager's would; the backward reads the saved (rounded)
// activations, as eager's does, but keeps its gradients between layers in fp32 and rounds each
// result once (more accurate than eager's per-layer rounding).
bool reduced_native(const at::Tensor& input, at::TensorList weights) {
  if (input.dim() != 2 || input.device().type() != c10::kCPU ||
      !at::isReducedFloatingType(input.scalar_type()) || layers_forced() || weights.empty())
    return false;
  const int64_t M = input.size(0);
  for (const at::Tensor& w : weights) {
    if (w.dim() != 2 || w.scalar_type() != input.scalar_type()) return false;
    const int64_t N = w.size(0), K = w.size(1);
    if (!blas_product(at::kFloat, M, N, K)) return false;
    if (static_cast<double>(M) * N * K >= static_cast<double>(reduced_macs())) return false;
  }
  return true;
}

// ts widened to fp32 (absent entries and other dtypes as they are).
std::vector<at::Tensor> widened(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts)
    out.push_back(t.defined() && at::isReducedFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t);
  return out;
}

at::Tensor narrowed(const at::Tensor& t, c10::ScalarType dt) {
  return t.defined() && t.scalar_type() == at::kFloat ? t.to(dt) : t;
}

// The saved tensors of the fp32 kernel as the net's dtype returns them (csrc/mlp.h's layout, what
// the fake kernel gives): per hidden layer the activation, the aux/z tensors and the empty ones in
// dt, the batch-norm statistics (entries 3 to 5 of a batch-norm layer) in fp32; masks as they are.
// widen = true: the other way, for the backward.
std::vector<at::Tensor> convert_saved(at::TensorList saved, const c10::List<bool>& batch_norm,
                                      c10::ScalarType dt, bool widen) {
  std::vector<at::Tensor> out(saved.begin(), saved.end());
  for (size_t k = 0; k + 1 < out.size(); ++k) {
    const int64_t layer = static_cast<int64_t>(k) / kMlpSavedPerLayer;
    const int64_t pos = static_cast<int64_t>(k) % kMlpSavedPerLayer;
    if (batch_norm.get(layer) && pos >= 3) continue;
    at::Tensor& t = out[k];
    if (widen && t.defined() && t.scalar_type() == dt) t = t.to(at::kFloat);
    if (!widen) t = narrowed(t, dt);
  }
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cpu(
    const at::Tensor& input, at::TensorList weights, OptTensorList biases,
    const c10::List<bool>& batch_norm, OptTensorList bn_weights, OptTensorList bn_biases,
    OptTensorList running_means, OptTensorList running_vars, bool training, double eps,
    int64_t activation, double negative_slope, int64_t output_activation) {
  const bool reduced = reduced_native(input, weights);
  if (!reduced && !native(input, weights))
    return mlp_layers(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
                      running_vars, training, eps, activation, negative_slope, output_activation);
  check_mlp(input, weights, biases, batch_norm, bn_weights, bn_biases, running_means,
            running_vars, training, eps, activation, output_activation);
  const Act act = static_cast<Act>(activation), out_act = static_cast<Act>(output_activation);
  if (reduced) {
    // The batch norms' parameters and running statistics are read as values of any dtype.
    const auto dt = input.scalar_type();
    auto [y, saved] = forward_native<float>(
        input.to(at::kFloat), widened(weights), widened(biases), batch_norm, bn_weights,
        bn_biases, running_means, running_vars, training, eps, act,
        static_cast<float>(negative_slope), out_act, dt);
    return {y.to(dt), convert_saved(saved, batch_norm, dt, /*widen=*/false)};
  }
  if (input.scalar_type() == at::kFloat)
    return forward_native<float>(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                 running_means, running_vars, training, eps, act,
                                 static_cast<float>(negative_slope), out_act, at::kFloat);
  return forward_native<double>(input, weights, biases, batch_norm, bn_weights, bn_biases,
                                running_means, running_vars, training, eps, act, negative_slope,
                                out_act, at::kDouble);
}

MlpGrads mlp_backward_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& output,
                          at::TensorList weights, OptTensorList biases,
                          const c10::List<bool>& batch_norm, OptTensorList bn_weights,
                          at::TensorList saved, bool training, int64_t activation,
                          double negative_slope, int64_t output_activation, bool input_grad,
                          const c10::List<bool>& weight_grads, const c10::List<bool>& bias_grads,
                          const c10::List<bool>& bn_weight_grads,
                          const c10::List<bool>& bn_bias_grads) {
  const bool reduced = reduced_native(input, weights);
  if (!reduced && !native(input, weights))
    return mlp_backward_layers(grad, input, output, weights, biases, batch_norm, bn_weights, saved,
                               training, activation, negative_slope, output_activation,
                               input_grad, weight_grads, bias_grads, bn_weight_grads,
                               bn_bias_grads);
  check_mlp_backward(grad, input, output, weights, biases, batch_norm, bn_weights, saved,
                     training, activation, output_activation, weight_grads, bias_grads,
                     bn_weight_grads, bn_bias_grads);
  if (reduced) {
    // The fp32 kernel on the widened operands; the gradients of the biases and the batch norms'
    // parameters come out in their own dtype (rounded once, from the double sums), those of the
    // input and the weights in fp32, rounded here once.
    const auto dt = input.scalar_type();
    const std::vector<at::Tensor> ws = widened(weights);
    const std::vector<at::Tensor> sv = convert_saved(saved, batch_norm, dt, /*widen=*/true);
    auto [gx, gw, gb, gbw, gbb] = mlp_backward_cpu_native(
        grad.to(at::kFloat), input.to(at::kFloat), output.to(at::kFloat), ws, biases, batch_norm,
        bn_weights, sv, training, activation, negative_slope, output_activation, input_grad,
        weight_grads, bias_grads, bn_weight_grads, bn_bias_grads, nullptr);
    // Each gradient (or empty stand-in) in the dtype the op's contract gives it (the fake kernel's):
    // the net's dtype, a batch norm's parameters' gradients in its weight's dtype.
    const auto as = [](at::Tensor& t, c10::ScalarType want) {
      if (t.scalar_type() != want) t = t.to(want);
    };
    as(gx, dt);
    for (size_t i = 0; i < gw.size(); ++i) {
      as(gw[i], dt);
      as(gb[i], dt);
    }
    for (size_t i = 0; i < gbw.size(); ++i) {
      const bool own = batch_norm.get(i) && !mlp_absent(bn_weights[i]);
      const auto wdt = own ? bn_weights[i].scalar_type() : dt;
      as(gbw[i], wdt);
      as(gbb[i], wdt);
    }
    return {gx, gw, gb, gbw, gbb};
  }
  return mlp_backward_cpu_native(grad, input, output, weights, biases, batch_norm, bn_weights,
                                 saved, training, activation, negative_slope, output_activation,
                                 input_grad, weight_grads, bias_grads, bn_weight_grads,
                                 bn_bias_grads, nullptr);
}

}  // namespace

inline namespace CPU_CAPABILITY {

bool mlp_cpu_native(const at::Tensor& input, at::TensorList weights) {
  return native(input, weights);
}

MlpGrads mlp_backward_cpu_native(const at::Tensor& grad, const at::Tensor& input,
                                 const at::Tensor& output, at::TensorList weights,
                                 at::TensorList biases, const c10::List<bool>& batch_norm,
                                 at::TensorList bn_weights, at::TensorList saved, bool training,
                                 int64_t activation, double negative_slope,
                                 int64_t output_activation, bool input_grad,
                                 const c10::List<bool>& weight_grads,
                                 const c10::List<bool>& bias_grads,
                                 const c10::List<bool>& bn_weight_grads,
                                 const c10::List<bool>& bn_bias_grads, MlpLoss* loss) {
  const Act act = static_cast<Act>(activation), out_act = static_cast<Act>(output_activation);
  check_saved(input, weights, batch_norm, saved, act, out_act);
  if (input.scalar_type() == at::kFloat)
    return backward_native<float>(grad, input, output, weights, biases, batch_norm, bn_weights,
                                  saved, training, act, static_cast<float>(negative_slope),
                                  out_act, input_grad, weight_grads, bias_grads, bn_weight_grads,
                                  bn_bias_grads, loss);
  return backward_native<double>(grad, input, output, weights, biases, batch_norm, bn_weights,
                                 saved, training, act, negative_slope, out_act, input_grad,
                                 weight_grads, bias_grads, bn_weight_grads, bn_bias_grads, loss);
}

}  // namespace CPU_CAPABILITY

HPML_REGISTER_CPU_KERNELS(mlp)

}  // namespace hpml
