// Probe (not part of the build): is a GEMM of our own worth it for the whole-net kernel's block
// products? C (M x N) = A (M x K) W^T (W: N x K) by an AVX2 6 x 16 FMA micro-kernel (W packed in
// 16-column panels, A read in place), timed against MKL's sgemm_ from torch's own libtorch_cpu,
// both on one thread. Results and what they mean: benchmarks/NOTES.md ("A block-product micro-
// kernel of our own: a probe"). Build and run (x86-64 with AVX2 + FMA):
//   TL=.venv/lib/python3.11/site-packages/torch/lib
//   g++ -O3 -mavx2 -mfma -std=c++17 benchmarks/probes/gemm_block_probe.cpp -o /tmp/gemm_probe \
//       -L$TL -ltorch_cpu -lc10 -Wl,-rpath,$TL && /tmp/gemm_probe 128 256 120
// The unroll pragmas matter: without the one on the final store loop GCC kept the accumulator
// array in memory as well and stored all 12 registers after every FMA (30 GFLOP/s instead of 90).
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
#include <algorithm>
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*, const float*, const int*, const float*, float*, const int*);
extern "C" int MKL_Set_Num_Threads_Local(int);

// pack W (N x K) into panels of 16 rows of W (columns of C): panel p: K x 16, zero-padded
static void pack_w(const float* w, int N, int K, float* out) {
  for (int p = 0; p < (N + 15) / 16; ++p)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < 16; ++j) {
        int n = p * 16 + j;
        out[(size_t)p * K * 16 + k * 16 + j] = n < N ? w[(size_t)n * K + k] : 0.f;
      }
}

template <int MR>
static inline void kernel(const float* a, int lda, const float* bp, int K, float* c, int ldc, int ncols) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    __m256 b0 = _mm256_load_ps(bp + k * 16), b1 = _mm256_load_ps(bp + k * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m256 av = _mm256_broadcast_ss(a + (size_t)i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (ncols == 16) {
      _mm256_storeu_ps(c + (size_t)i * ldc, acc[i][0]);
      _mm256_storeu_ps(c + (size_t)i * ldc + 8, acc[i][1]);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, acc[i][0]); _mm256_store_ps(t + 8, acc[i][1]);
      for (int j = 0; j < ncols; ++j) c[(size_t)i * ldc + j] = t[j];
    }
  }
}

static void ours(const float* a, int M, int K, const float* wp, int N, float* c) {
  for (int p = 0; p < (N + 15) / 16; ++p) {
    const float* bp = wp + (size_t)p * K * 16;
    int nc = std::min(16, N - p * 16);
    int m = 0;
    for (; m + 6 <= M; m += 6) kernel<6>(a + (size_t)m * K, K, bp, K, c + (size_t)m * N + p * 16, N, nc);
    for (; m < M; ++m) kernel<1>(a + (size_t)m * K, K, bp, K, c + (size_t)m * N + p * 16, N, nc);
  }
}

int main(int argc, char** argv) {
  int M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]);
  MKL_Set_Num_Threads_Local(1);
  std::vector<float> a((size_t)M * K), w((size_t)N * K), c1((size_t)M * N), c2((size_t)M * N);
  for (auto& v : a) v = rand() / (float)RAND_MAX - 0.5f;
  for (auto& v : w) v = rand() / (float)RAND_MAX - 0.5f;
  float* wp = (float*)aligned_alloc(64, (size_t)((N + 15) / 16) * K * 16 * 4);
  const float one = 1, zero = 0;
  auto mkl = [&] { sgemm_("T", "N", &N, &M, &K, &one, w.data(), &K, a.data(), &K, &zero, c1.data(), &N); };
  auto our = [&] { pack_w(w.data(), N, K, wp); ours(a.data(), M, K, wp, N, c2.data()); };
  auto our_np = [&] { ours(a.data(), M, K, wp, N, c2.data()); };
  mkl(); our();
  double err = 0; for (size_t i = 0; i < c1.size(); ++i) err = std::max(err, (double)std::fabs(c1[i] - c2[i]));
  int reps = std::max(10, (int)(2e9 / (2.0 * M * N * K)));
  for (int round = 0; round < 3; ++round) {
    double t[3] = {1e9, 1e9, 1e9};
    for (int r = 0; r < 7; ++r) {
      auto f = [&](auto g, int idx) { auto s = std::chrono::steady_clock::now(); for (int i = 0; i < reps; ++i) g(); t[idx] = std::min(t[idx], std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count() / reps); };
      f(mkl, 0); f(our, 1); f(our_np, 2);
    }
    double fl = 2.0 * M * N * K;
    printf("%dx%dx%d mkl %.1f us (%.1f GF/s)  ours+pack %.1f us (%.1f)  ours prepacked %.1f us (%.1f)  maxdiff %.2e\n", M, K, N, t[0]*1e6, fl/t[0]/1e9, t[1]*1e6, fl/t[1]/1e9, t[2]*1e6, fl/t[2]/1e9, err);
  }
}
