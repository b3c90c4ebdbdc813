// hpml::linear_act on CPU: the product through ATen's BLAS (at::mm_out: MKL/oneDNN), then one
// vectorized pass over the output that adds the bias, applies the activation in place and packs
// the ReLU mask. Backward: one pass that forms dZ = dY * act'(.) and the bias gradient together
// (per-row-chunk partial sums added in chunk order: the same bits whatever the thread count),
// then the two products dX = dZ W and dW = dZ^T X through BLAS.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cpu_alloc.h"
#include "cpu_blas.h"
#include "cpu_dispatch.h"
#include "cpu_vec.h"
#include "cpu_epilogue.h"
#include "linear_act.h"

namespace hpml {
namespace {

// Rows per unit of parallel work and per partial bias-gradient sum (fixed).
constexpr int64_t kRowChunk = 16;
// Fewer elements than this run on the calling thread, as ATen's elementwise ops do
// (at::internal::GRAIN_SIZE): a parallel region costs a few us, and on two shared cores far more
// whenever the other thread is descheduled; a small layer's epilogue (256 x 120) takes ~5 us.
constexpr int64_t kSerialElems = 32768;

// oneDNN's inner product (mkldnn::_linear_pointwise, the op Inductor's CPU fusion calls) for the
// large fp32 forward when this torch has it and cpu::large_forward_onednn() says so (on which
// CPUs it was the faster: csrc/cpu_dispatch.cpp); otherwise the tiled products over MKL's sgemm
// with their packed operand (cpu_blas.h). Looked up at run time, so a torch built without oneDNN
// takes the tiled products. Same fp32 arithmetic (no reduced-precision mode).
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = [] {
    if (!cpu::large_forward_onednn()) return std::optional<c10::OperatorHandle>();
    return c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  }();
  return op ? &*op : nullptr;
}

// Only for large products: each call builds (or looks up) a oneDNN primitive, ~60 us here, which
// made a 32x30x64 product 4x slower than at::mm (81 vs 20 us): the training step of a small MLP
// is mostly such calls. From 2^30 multiply-adds (e.g. 1024^3) that overhead is below 0.2%.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 30;

// fp32 only. bf16 was tried (2026-12-06, Intel Xeon with AMX): its inner product ran 4096 x 1024
// -> 1024 with the bias in 2.9-3.0 ms where at::addmm took 3.2-3.4 (the same bits), but its
// output and scratch come from glibc's heap, and interleaved with eager's bf16 net (bench_mlp
// `wide`) the process took 3.7x the page faults (137k -> 519k) and both sides ran 1.3-1.5x
// slower; see benchmarks/NOTES.md.
bool use_onednn(const at::Tensor& t, int64_t M, int64_t N, int64_t K) {
  // oneDNN rejects empty products (K == 0 fails to create its primitive).
  return t.scalar_type() == at::kFloat && M > 0 && N > 0 && K > 0 &&
         static_cast<double>(M) * N * K >= static_cast<double>(kOneDnnMinMacs) &&
         onednn_linear_op() != nullptr;
}

// bf16 dW = dZ^T X on a CPU with AMX-BF16: oneDNN's matmul reads dZ^T in place (dZ transposed
// in memory, its "ba" layout) up to twice as slow as a row-major operand once both sides of dW
// are 1024 or more; below that it is as fast or faster. Measured on the Intel Xeon with AMX
// (model 167, 2 threads), linear_act_backward's dW alone (the dZ pass, then the product), in
// place against dZ^T written out first by the tiles below, for M rows and N = K: N = K = 1024,
// M = 1024 1.54 / 1.96 ms, 2048 3.63 / 2.75, 4096 7.2-13.9 / 5.6, 8192 15.1 / 13.5; N = K =
// 2048, M = 1024 6.5 / 4.0, 2048 17-19.5 / 9.1, 4096 33.8 / 19.3, 8192 65.8 / 44.9; but N = K
// = 512 1.9 / 2.8 at 4096 rows and 3.7 / 6.3 at 8192 (oneDNN's other blockings), 256 about
// even. So dZ^T is written out where N and K are at least 1024 and the product has at least 2^31
// multiply-adds. HPML_DW_TRANSPOSE=0 / 1 turns that off / on for every bf16 product (to compare).
bool transpose_dz_for_dw(at::ScalarType dt, int64_t M, int64_t N, int64_t K) {
  static const int forced = [] {
    const char* v = std::getenv("HPML_DW_TRANSPOSE");
    return v == nullptr ? -1 : (std::string(v) == "1" ? 1 : 0);
  }();
  static const bool amx_bf16 = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  }();
  if (dt != at::kBFloat16 || M == 0 || N == 0 || K == 0 || forced == 0) return false;
  return forced == 1 || (amx_bf16 && N >= 1024 && K >= 1024 &&
                          static_cast<double>(M) * N * K >= static_cast<double>(int64_t(1) << 31));
}

// Whether an fp16/bf16 product runs in fp32 here: its operands widened (exactly), the fp32 op's
// products (tiled sgemm, the same bits on any thread count), each result rounded once to the
// dtype, as torch's fp32-accumulating bf16/fp16 GEMMs round theirs. Chosen where torch's own
// fp16/bf16 products do not run on oneDNN: a CPU without AVX-512 for bf16, without AVX512-FP16 or
// AMX-FP16 for fp16 (torch's mkldnn::_is_mkldnn_bf16_supported / _is_mkldnn_fp16_supported, which
// honour ONEDNN_MAX_CPU_ISA), or torch.backends.mkldnn turned off. There at::mm runs ATen's own
// reduced-precision GEMM loops, slowest for dZ W: on the Intel Xeon with ATEN_CPU_CAPABILITY=avx2
// and oneDNN off, bf16 1024 x 1024 x 1024 took 2175 ms for dZ W, 148 ms for dZ^T X and 58 ms for
// x W^T (1-15 GFLOP/s), where fp32 sgemm runs at ~200 GFLOP/s (benchmarks/NOTES.md).
// HPML_REDUCED_GEMM=fp32 / native forces one way (to compare and to test).
bool reduced_in_fp32(c10::ScalarType dt) {
  if (!at::isReducedFloatingType(dt)) return false;
  static const int forced = [] {
    const char* v = std::getenv("HPML_REDUCED_GEMM");
    if (v == nullptr) return -1;
    return std::string(v) == "fp32" ? 1 : (std::string(v) == "native" ? 0 : -1);
  }();
  if (forced >= 0) return forced == 1;
  const auto supported = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findOp({name, ""});
    if (!op) return false;  // a torch without oneDNN: ATen's own GEMM
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return !stack.empty() && stack[0].isBool() && stack[0].toBool();
  };
  static const bool bf16 = supported("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = supported("mkldnn::_is_mkldnn_fp16_supported");
  const bool onednn = dt == at::kBFloat16 ? bf16 : fp16;
  return !(onednn && at::globalContext().userEnabledMkldnn());
}

at::Tensor as_fp32(const at::Tensor& t) { return t.to(at::kFloat); }

std::optional<at::Tensor> as_fp32(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(at::kFloat);
}

// dst (cols x rows, row-major) = src (rows x cols, row-major) transposed, by 32 x 32 tiles, each
// thread a band of the source's columns (rows of dst).
template <typename scalar_t>
void transpose_rows(const scalar_t* src, int64_t rows, int64_t cols, scalar_t* dst) {
  constexpr int64_t kT = 32;
  at::parallel_for(0, (cols + kT - 1) / kT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kT;
      const int nj = static_cast<int>(std::min(kT, cols - j0));
      for (int64_t i0 = 0; i0 < rows; i0 += kT) {
        const int ni = static_cast<int>(std::min(kT, rows - i0));
        transpose_tile16(src + i0 * cols + j0, cols, dst + j0 * rows + i0, rows, ni, nj);
      }
    }
  });
}

// x (M, K) times w (N, K) transposed, plus b: (M, N). The op reads its operands as dense
// row-major buffers (a strided bias came out wrong), hence the contiguous copies (none when the
// operands already are).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& b) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x.contiguous());
  stack.emplace_back(w.contiguous());
  stack.emplace_back(b.has_value() ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return std::move(stack[0]).toTensor().contiguous();
}

// A 2-D operand as BLAS reads it in place: row-major with leading dimension ld (trans false), or
// its transpose row-major (trans true: a column-major view such as w.t()); none (a copy is made)
// for other strides, e.g. an expanded operand's stride 0, or a leading dimension over int.
struct BlasOperand {
  at::Tensor t;  // t itself, or its contiguous copy
  bool trans = false;
  int64_t ld = 0;
};

BlasOperand blas_operand(const at::Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  constexpr int64_t kMaxLd = std::numeric_limits<int>::max();
  if ((s1 == 1 || c == 1) && s0 >= std::max<int64_t>(c, 1) && s0 <= kMaxLd) return {t, false, s0};
  if ((s0 == 1 || r == 1) && s1 >= std::max<int64_t>(r, 1) && s1 <= kMaxLd) return {t, true, s1};
  return {t.contiguous(), false, std::max<int64_t>(c, 1)};
}

// fp32/fp64 out (M x N, contiguous) = a (M x K) times b^T (b: N x K) or b (b: K x N) on
// cpu_blas.h's tiled product, the same bits on any thread count (at::mm lets MKL split a long
// contraction between threads); operands read in place where their strides allow (blas_operand).
// false, doing nothing, where blas_product says no: the caller then runs at::mm.
bool tiled_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool transpose_b) {
  const auto dt = a.scalar_type();
  const int64_t M = a.size(0), K = a.size(1), N = transpose_b ? b.size(0) : b.size(1);
  if (!blas_product(dt, M, N, K)) return false;
  const BlasOperand ao = blas_operand(a), bo = blas_operand(b);
  AT_DISPATCH_FLOATING_TYPES(dt, "hpml::linear_act product (CPU)", [&] {
    // op(B) is K x N: b^T when transpose_b, so B is transposed in memory exactly when b is not.
    ::hpml::tiled_product<scalar_t>(ao.trans, transpose_b != bo.trans, M, N, K,
                                    ao.t.const_data_ptr<scalar_t>(), ao.ld,
                                    bo.t.const_data_ptr<scalar_t>(), bo.ld,
                                    out.mutable_data_ptr<scalar_t>(), N);
  });
  return true;
}

std::tuple<at::Tensor, at::Tensor> linear_act_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  int64_t activation, double negative_slope) {
  const Act act = check_linear_act(input, weight, bias, activation);
  const int64_t M = input.size(0), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  // fp16/bf16: the bias goes into the product (addmm), so the output is rounded once, after it,
  // and the sign the mask records is that of the fp32 accumulation, as torch's. fp32/fp64: the
  // bias is added in the epilogue pass, which saves addmm's copy of the bias into the output.
  const bool reduced = at::isReducedFloatingType(input.scalar_type());
  const bool onednn = use_onednn(input, M, N, input.size(1));
  at::Tensor out;
  if (reduced_in_fp32(input.scalar_type())) {
    // x W^T + b in fp32 (the fp32 op, no activation), rounded once; the activation below.
    out = std::get<0>(linear_act_cpu(as_fp32(input), as_fp32(weight), as_fp32(bias),
                                     static_cast<int64_t>(Act::None), 0.0))
              .to(input.scalar_type());
  } else if (onednn) {
    out = onednn_linear(input, weight, has_bias ? bias : std::nullopt);  // bias included
  } else {
    out = empty_cpu_output({M, N}, input.scalar_type());
    if (reduced && has_bias) {
      at::addmm_out(out, *bias, input, weight.t());
    } else if (!tiled_mm(out, input, weight, /*transpose_b=*/true)) {
      at::mm_out(out, input, weight.t());  // ATen handles any strides of input and weight
    }
  }
  at::Tensor mask = at::empty(act_uses_mask(act) ? at::IntArrayRef{M, mask_row_bytes(N)}
                                                 : at::IntArrayRef{0},
                              input.options().dtype(at::kByte));
  const bool bias_in_epilogue = has_bias && !reduced && !onednn;
  if (M * N == 0 || (act == Act::None && !bias_in_epilogue)) return {out, mask};
  const at::Tensor b = bias_in_epilogue ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "hpml::linear_act (CPU)", [&] {
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        const scalar_t* bp = bias_in_epilogue ? b.const_data_ptr<scalar_t>() : nullptr;
        uint8_t* mp = act_uses_mask(act) ? mask.mutable_data_ptr<uint8_t>() : nullptr;
        const auto slope = static_cast<opmath_t<scalar_t>>(negative_slope);
        dispatch_act(act, [&](auto a) {
          const int64_t grain = std::max<int64_t>(kRowChunk, kSerialElems / N);  // N > 0 here
          at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
            epilogue_rows<scalar_t, decltype(a)::value>(o, bp, mp, r0, r1, N, slope);
          });
        });
      });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& mask, int64_t activation, double negative_slope,
    bool input_grad, bool weight_grad, bool bias_grad) {
  const Act act = check_linear_act_backward(grad, input, weight, output, mask, activation);
  const int64_t M = input.size(0), N = weight.size(0);
  const auto dt = input.scalar_type();
  const at::Tensor g = grad.contiguous();
  // With no activation dZ is the incoming gradient itself.
  const bool need_dz = act != Act::None && (input_grad || weight_grad);
  at::Tensor dz = need_dz ? empty_cpu_output({M, N}, dt) : g;
  at::Tensor db = at::empty(bias_grad ? at::IntArrayRef{N} : at::IntArrayRef{0}, input.options());
  if ((need_dz || bias_grad) && M * N > 0) {
    const at::Tensor y = act_uses_output(act) ? output.contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dt, "hpml::linear_act_backward (CPU)", [&] {
          using acc_t = opmath_t<scalar_t>;
          const int64_t nchunks = (M + kRowChunk - 1) / kRowChunk;
          std::vector<acc_t> parts(bias_grad ? nchunks * N : 0, acc_t(0));
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
          const uint8_t* mp = act_uses_mask(act) ? mask.const_data_ptr<uint8_t>() : nullptr;
          scalar_t* dzp = need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr;
          const auto slope = static_cast<acc_t>(negative_slope);
          dispatch_act(act, [&](auto a) {
            const int64_t grain = std::max<int64_t>(1, kSerialElems / (kRowChunk * N));
            at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
              for (int64_t c = c0; c < c1; ++c) {
                dz_rows<scalar_t, decltype(a)::value>(
                    gp, yp, mp, dzp, bias_grad ? parts.data() + c * N : nullptr, c * kRowChunk,
                    std::min(M, (c + 1) * kRowChunk), N, slope);
              }
            });
          });
          if (bias_grad) {
            // Chunk order, in double: independent of the thread count, and over 8192 rows 5x
            // more accurate than adding the fp32 partials in fp32 (2.1e-4 -> 4e-5 absolute).
            std::vector<double> total(N, 0.0);
            for (int64_t c = 0; c < nchunks; ++c)
              for (int64_t j = 0; j < N; ++j) total[j] += parts[c * N + j];
            scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
            for (int64_t j = 0; j < N; ++j) dbp[j] = static_cast<scalar_t>(total[j]);
          }
        });
  } else if (bias_grad) {
    db.zero_();
  }
  if (reduced_in_fp32(dt) && (input_grad || weight_grad)) {
    // dZ W and dZ^T X in fp32 (the fp32 op with no activation), each rounded once.
    const auto none = [&](c10::ScalarType t) { return at::empty({0}, input.options().dtype(t)); };
    auto [dx32, dw32, unused] = linear_act_backward_cpu(
        as_fp32(dz), as_fp32(input), as_fp32(weight), none(at::kFloat), none(at::kByte),
        static_cast<int64_t>(Act::None), 0.0, input_grad, weight_grad, false);
    return {dx32.to(dt), dw32.to(dt), db};
  }
  // dZ W on the BLAS (fp32/fp64: tiled_mm, thread-count invariant; else at::mm), not oneDNN: with
  // a copy of W^T it ran 20% faster at 4096x1024x1024 but with 3x torch's fp32 error (1.5e-5
  // against 4.9e-6 at 8192x64 -> 2048, over the parity tolerance), where the forward's oneDNN
  // product stays within it.
  at::Tensor dx = empty_cpu_output(input_grad ? input.sizes() : at::IntArrayRef{0}, dt);
  if (input_grad && !tiled_mm(dx, dz, weight, /*transpose_b=*/false)) at::mm_out(dx, dz, weight);
  // dZ^T X not on oneDNN either: its inner product would need both operands transposed in
  // memory, and those copies cost more than it saves (110 ms against 87 ms here).
  at::Tensor dw = empty_cpu_output(weight_grad ? weight.sizes() : at::IntArrayRef{0}, dt);
  // fp32/fp64: cpu_blas.h's blocked product, the same bits on any thread count (at::mm lets MKL
  // split the sum over the batch rows between its threads). fp16/bf16 stay on at::mm (oneDNN's
  // reduced-precision kernels).
  if (weight_grad && blas_product(dt, N, input.size(1), M)) {
    const BlasOperand x = blas_operand(input);  // dz is contiguous: ours, or g
    AT_DISPATCH_FLOATING_TYPES(dt, "hpml::linear_act_backward dW (CPU)", [&] {
      ::hpml::weight_grad<scalar_t>(dz.const_data_ptr<scalar_t>(), x.t.const_data_ptr<scalar_t>(),
                                    M, N, input.size(1), dw.mutable_data_ptr<scalar_t>(), x.ld,
                                    x.trans);
    });
  } else if (weight_grad && transpose_dz_for_dw(dt, M, N, input.size(1))) {
    at::Tensor dzt = empty_cpu_output({N, M}, dt);  // dz is contiguous: ours, or g
    transpose_rows<at::BFloat16>(dz.const_data_ptr<at::BFloat16>(), M, N,  // bf16 only
                                 dzt.mutable_data_ptr<at::BFloat16>());
    at::mm_out(dw, dzt, input);
  } else if (weight_grad) {
    at::mm_out(dw, dz.t(), input);
  }
  return {dx, dw, db};
}

}  // namespace

HPML_REGISTER_CPU_KERNELS(linear_act)

}  // namespace hpml
