// Products on the BLAS the torch build links (MKL's sgemm_/dgemm_), one sequential call per block
// of work whose size depends on the shapes alone: the same bits on any number of threads, where
// at::mm lets MKL split a product's sums over its threads (on the 2-core Intel Xeon, a weight
// gradient dZ^T X over 4099 rows differed in the last bits between 1 and 2 threads). Shared by
// the whole-MLP kernel (mlp.cpp) and linear_act's backward (linear_act.cpp); in the ISA variant's
// namespace like the files that include it (csrc/cpu_dispatch.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_alloc.h"

// The Fortran BLAS of the torch build (MKL's LP64 interface, or OpenBLAS's), and MKL's per-thread
// thread count; weak, so that a build without them loads and takes the layer-by-layer path.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // mkl_service.h's C entry
// MKL's packed-operand interface (mkl_blas.h): an operand packed once into MKL's internal layout
// and used by several products ('P' as its trans argument of sgemm_compute).
size_t sgemm_pack_get_size_(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
void sgemm_pack_(const char* identifier, const char* trans, const int* m, const int* n,
                 const int* k, const float* alpha, const float* src, const int* ld, float* dest)
    __attribute__((weak));
void sgemm_compute_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                    const float* a, const int* lda, const float* b, const int* ldb,
                    const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace hpml {
inline namespace CPU_CAPABILITY {

// Multiply-adds below which a parallel region costs more than it saves (a few us to start, far
// more on two shared cores when the other thread is descheduled).
constexpr int64_t kParallelMacs = int64_t(1) << 18;

// A product's output (a weight gradient's, or x W^T's and dZ W's in linear_act) is computed by
// tiles of at most kTileRows x kTileCols of its elements, halved (rows first, then columns, to
// kMinTile) until there are kMinTiles, each tile one sequential product over the whole
// contraction: a 64 x 1024 tile of dW re-read (and re-packed) all of X for half the work of a
// 256 x 512 one, which reads half of X (4096 x 1024 x 1024 fp32, 2-core Xeon: 38.2 ms against
// 26.1 ms, at::mm's threaded product 25.5 ms); narrow columns lose more than narrow rows
// (1024 x 256 x 784: 1.61 ms halving columns first, 1.18 ms with 64 x 784). The tiles depend on
// the shape alone.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCols = 512;
constexpr int64_t kMinTile = 64;
constexpr int64_t kMinTiles = 4;
// The batch rows are summed in chunks of at least this many, each into its own partial when there
// are several (added in chunk order), with at most kDwPartialElems partial elements in all.
constexpr int64_t kDwRows = 16384;
constexpr int64_t kDwPartialElems = int64_t(1) << 24;

// MKL runs sequentially on this thread while in scope: the kernel's own blocks are the parallel
// work, and a BLAS call that split its sums over threads would change their order with the
// thread count.
struct SequentialBlas {
  int prev = -1;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// Whether an (M x K) (K x N) product of dtype dt runs here: fp32/fp64 with the BLAS linked,
// nothing empty (the callers' fallback, at::mm, writes the zeros), every size within BLAS's int.
inline bool blas_product(c10::ScalarType dt, int64_t M, int64_t N, int64_t K) {
  const bool blas = (dt == c10::ScalarType::Float && have_blas<float>()) ||
                    (dt == c10::ScalarType::Double && have_blas<double>());
  return blas && M > 0 && N > 0 && K > 0 &&
         std::max({M, N, K}) <= std::numeric_limits<int>::max();
}

// Row-major C (m x n, ldc) = op(A) op(B) (+ C when accumulate), op(A) m x k, op(B) k x n; as the
// column-major BLAS sees it, C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  const char fa = tb ? 'T' : 'N', fb = ta ? 'T' : 'N';
  const int fm = static_cast<int>(n), fn = static_cast<int>(m), fk = static_cast<int>(k);
  const int flda = static_cast<int>(ldb), fldb = static_cast<int>(lda);
  const int fldc = static_cast<int>(ldc);
  const T one(1), beta(accumulate ? 1 : 0);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&fa, &fb, &fm, &fn, &fk, &one, b, &flda, a, &fldb, &beta, c, &fldc);
  } else {
    dgemm_(&fa, &fb, &fm, &fn, &fk, &one, b, &flda, a, &fldb, &beta, c, &fldc);
  }
}

// Runs f(block) for blocks [0, nblocks), in parallel when a block's work (macs) makes it pay.
template <typename F>
void for_blocks(int64_t nblocks, int64_t macs_per_block, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kParallelMacs / std::max<int64_t>(macs_per_block, 1));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    const SequentialBlas seq;
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// The tiles of an M x N output: tm x tn each, sm x sn of them.
struct Tiles {
  int64_t tm, tn, sm, sn;
  int64_t count() const { return sm * sn; }
};

inline Tiles tiles_of(int64_t M, int64_t N) {
  Tiles t{std::min(M, kTileRows), std::min(N, kTileCols), 0, 0};
  const auto update = [&] {
    t.sm = (M + t.tm - 1) / std::max<int64_t>(t.tm, 1);
    t.sn = (N + t.tn - 1) / std::max<int64_t>(t.tn, 1);
  };
  // half of v, rounded up to a multiple of 16, at least kMinTile
  const auto halve = [](int64_t v) { return std::max(kMinTile, ((v + 1) / 2 + 15) / 16 * 16); };
  for (update(); t.count() < kMinTiles; update()) {
    if (t.tm > kMinTile) {
      t.tm = halve(t.tm);
    } else if (t.tn > kMinTile) {
      t.tn = halve(t.tn);
    } else {
      break;
    }
  }
  return t;
}

// Where tile `i` of an M x N output lies: its first row and column, its rows and columns (the
// last row and column of tiles may be short). Tiles are numbered row of tiles by row of tiles.
struct TileSpan {
  int64_t m0, n0, ms, ns;
};
inline TileSpan span_of(const Tiles& t, int64_t i, int64_t M, int64_t N) {
  const int64_t m0 = i / t.sn * t.tm, n0 = i % t.sn * t.tn;
  return {m0, n0, std::min(t.tm, M - m0), std::min(t.tn, N - n0)};
}

// Tile `i` of C (M x N, ldc) = op(A) op(B) over the whole K, one sequential BLAS call; op(A) is
// M x K (A stored K x M when ta), op(B) K x N (B stored N x K when tb).
template <typename T>
void product_tile(const Tiles& t, int64_t i, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                  const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc) {
  const auto [m0, n0, ms, ns] = span_of(t, i, M, N);
  gemm<T>(ta, tb, ms, ns, K, ta ? a + m0 : a + m0 * lda, lda, tb ? b + n0 * ldb : b + n0, ldb,
          false, c + m0 * ldc + n0, ldc);
}

// Per-tile multiply-adds from which the tiles of one column share its operand packed once
// (below); smaller products keep one plain call per tile (4096 x 256 x 256's 256 x 256 x 256
// tiles ran its backward 3-5% slower packed).
constexpr int64_t kPackMacs = int64_t(1) << 26;
// At most this much packed operand per product (about op(B)'s size): a weight gradient's chunk of
// 65536 rows x 1024 would otherwise take 256 MB more memory.
constexpr int64_t kPackMaxBytes = int64_t(64) << 20;

// Whether the column tiles of op(B) are packed once (MKL's sgemm_pack) for the row tiles that
// share them: each plain tile call packs its own copy of the column, kc x tn at a time, so with
// 256 x 512 tiles op(B) was packed M / 256 times. fp32 only (the interface this torch exports);
// HPML_BLAS_PACK=0 turns it off (to compare). Shapes alone decide, as they decide the tiles.
template <typename T>
bool pack_columns(const Tiles& t, int64_t N, int64_t K) {
  static const bool off = [] {
    const char* v = std::getenv("HPML_BLAS_PACK");
    return v != nullptr && v[0] == '0';
  }();
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    return !off && sgemm_pack_get_size_ != nullptr && sgemm_pack_ != nullptr &&
           sgemm_compute_ != nullptr && t.sm > 1 && t.tm * t.tn * K >= kPackMacs &&
           N * K * static_cast<int64_t>(sizeof(float)) <= kPackMaxBytes;
  }
}

// Product p's operands in tiled_products: its contraction length, A, B and C.
template <typename T>
struct Operands {
  int64_t K;
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  T* c;
};

// `products` products of one shape, C_p (M x N, ldc) = op(A_p) op(B_p) over K_p, by the tiles
// t: each tile one sequential BLAS call over its whole contraction, in parallel. operands(p)
// gives {K, a, lda, b, ldb, c} of product p. Where pack_columns says so, each product's column
// tiles of op(B) are packed first (in parallel), then its tiles run on them; the packing depends
// on the shapes alone, like the tiles.
template <typename T, typename F>
void tiled_products(const Tiles& t, int64_t products, bool ta, bool tb, int64_t M, int64_t N,
                    int64_t ldc, const F& operands) {
  const int64_t k0 = operands(0).K;
  if (!pack_columns<T>(t, N, k0)) {
    for_blocks(t.count() * products, t.tm * t.tn * k0, [&](int64_t i) {
      const Operands<T> o = operands(i / t.count());
      product_tile(t, i % t.count(), ta, tb, M, N, o.K, o.a, o.lda, o.b, o.ldb, o.c, ldc);
    });
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    // As gemm(): column-major, C^T = op(B)^T op(A)^T, so op(B)^T is MKL's A operand: a column
    // tile of C is a row block of it, packed with identifier 'A'.
    const char id = 'A', trans = tb ? 'T' : 'N', ta_f = ta ? 'T' : 'N', packed = 'P';
    const int tm = static_cast<int>(t.tm);
    const auto round_up = [](size_t v) { return (v + 4095) / 4096 * 4096; };
    for (int64_t p = 0; p < products; ++p) {
      const Operands<T> o = operands(p);
      const int fk = static_cast<int>(o.K), ldb = static_cast<int>(o.ldb);
      const int tn = static_cast<int>(t.tn);
      const size_t bytes = round_up(sgemm_pack_get_size_(&id, &tn, &tm, &fk));
      const c10::DataPtr buf = huge_page_allocator()->allocate(bytes * t.sn);
      char* base = static_cast<char*>(buf.get());
      at::parallel_for(0, t.sn, 1, [&](int64_t j0, int64_t j1) {
        const SequentialBlas seq;
        const float one = 1.0f;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t n0 = j * t.tn;
          const int ns = static_cast<int>(std::min(t.tn, N - n0));
          sgemm_pack_(&id, &trans, &ns, &tm, &fk, &one, tb ? o.b + n0 * o.ldb : o.b + n0, &ldb,
                      reinterpret_cast<float*>(base + j * bytes));
        }
      });
      for_blocks(t.count(), t.tm * t.tn * o.K, [&](int64_t i) {
        const TileSpan sp = span_of(t, i, M, N);
        const int64_t m0 = sp.m0, n0 = sp.n0;
        const int ms = static_cast<int>(sp.ms), ns = static_cast<int>(sp.ns);
        const int lda = static_cast<int>(o.lda), fldc = static_cast<int>(ldc);
        const float zero = 0.0f;
        const float* pb = reinterpret_cast<const float*>(base + i % t.sn * bytes);
        sgemm_compute_(&packed, &ta_f, &ns, &ms, &fk, pb, &ns, ta ? o.a + m0 : o.a + m0 * o.lda,
                       &lda, &zero, o.c + m0 * ldc + n0, &fldc);
      });
    }
  }
}

// C = op(A) op(B) (as product_tile), by tiles: the same bits on any thread count, where at::mm
// lets MKL split a long contraction between threads (on the 2-core Intel Xeon, at::mm's bits
// changed between 1 and 2 threads for 256 x 4096 x 256 and 16 x 100000 x 16, not 4099 x 33 x 67).
// Needs M, N, K, lda, ldb, ldc within int and K > 0.
template <typename T>
void tiled_product(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T* c, int64_t ldc) {
  tiled_products<T>(tiles_of(M, N), 1, ta, tb, M, N, ldc,
                    [&](int64_t) { return Operands<T>{K, a, lda, b, ldb, c}; });
}

// dW (N x K) = dz^T in over M rows, by tiles of dW and chunks of rows, each a fixed product
// whatever the thread count; several chunks go to partials added in chunk order. `in` (M x K) is
// row-major with leading dimension ld_in (K when 0), or with in_trans its transpose is (K x M,
// leading dimension ld_in).
template <typename T>
void weight_grad(const T* dz, const T* in, int64_t M, int64_t N, int64_t K, T* dw,
                 int64_t ld_in = 0, bool in_trans = false) {
  if (ld_in == 0) ld_in = K;
  const Tiles t = tiles_of(N, K);
  int64_t rows = kDwRows;
  while ((M + rows - 1) / rows > 1 && (M + rows - 1) / rows * N * K > kDwPartialElems) rows *= 2;
  const int64_t chunks = (M + rows - 1) / rows;
  std::vector<T> parts(chunks > 1 ? chunks * N * K : 0);
  tiled_products<T>(t, chunks, true, in_trans, N, K, K, [&](int64_t c) {
    const int64_t m0 = c * rows, mr = std::min(M, m0 + rows) - m0;
    return Operands<T>{mr, dz + m0 * N, N, in_trans ? in + m0 : in + m0 * ld_in, ld_in,
                       chunks > 1 ? parts.data() + c * N * K : dw};
  });
  if (chunks == 1) return;
  const int64_t total = N * K;
  at::parallel_for(0, total, 16384, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      T s = parts[e];
      for (int64_t c = 1; c < chunks; ++c) s += parts[c * total + e];
      dw[e] = s;
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace hpml
