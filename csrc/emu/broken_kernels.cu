// Deliberately broken kernels, each with the bug a check of the CUDA emulator must catch
// (tests/test_cuda_emu.py): built into the emulated library only, as the ops of hpml_emu_test.
// Each kernel is the correct one with one thing wrong, said next to it.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <mma.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/common.cuh"

namespace hpml {
namespace {

// A block tree sum of 64 values whose loop lacks the __syncthreads between its steps: a thread
// reads a partial sum another thread may still be writing.
__global__ void tree_sum_without_barrier(const float* x, float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  buf[t] = x[t];
  __syncthreads();
  for (int s = 32; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    // missing: __syncthreads();
  }
  if (t == 0) out[0] = buf[0];
}

// A copy whose bound is off by one: the last thread writes one element past the output.
__global__ void copy_off_by_one(const float* x, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = i < n ? x[i] : 0.0f;  // should be i < n
}

// A warp sum where half the warp skips the shuffle its full mask names.
__global__ void shuffle_with_wrong_mask(const float* x, float* out) {
  const int t = threadIdx.x;
  float v = x[t];
  if (t < 16) v += __shfl_down_sync(0xffffffffu, v, 16);  // should be every lane, or 0xffff
  out[t] = v;
}

// Reads the half of a shared buffer that no thread wrote.
__global__ void read_unwritten_shared(const float* x, float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  buf[t] = x[t];  // 32 threads: buf[32, 64) is never written
  __syncthreads();
  out[t] = buf[t + 32];
}

// A barrier inside a branch that half the block does not take.
__global__ void barrier_in_branch(const float* x, float* out) {
  __shared__ float buf[32];
  const int t = threadIdx.x;
  buf[t] = x[t];
  if (t < 16) {
    __syncthreads();  // threads 16..31 never get here
    out[t] = buf[31 - t];
  }
}

// Copies a 16 x 16 tile through an accumulator fragment. Correct (store_matrix_sync) when
// `assume_layout` is false; with it, each lane writes its fragment's elements where it believes
// they belong (lane l holds row l / 2, columns 8 (l % 2) ...): a layout CUDA does not promise.
__global__ void tile_through_fragment(const float* x, float* out, bool assume_layout) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, x, 16, wmma::mem_row_major);
  if (!assume_layout) {
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
    return;
  }
  const int lane = threadIdx.x;
  for (int i = 0; i < acc.num_elements; ++i) out[(lane / 2) * 16 + (lane % 2) * 8 + i] = acc.x[i];
}

// kernel(x, out) on one block of x.numel() threads (n, when given, the last argument).
template <auto kKernel>
at::Tensor one_block(const at::Tensor& x, int64_t size, unsigned threads) {
  TORCH_CHECK(x.numel() == size && x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor out = at::zeros_like(x);
  gpu::launch<kKernel>(1, threads, 0, nullptr, x.const_data_ptr<float>(),
                       out.mutable_data_ptr<float>());
  return out;
}

at::Tensor broken_tree_sum(const at::Tensor& x) {
  return one_block<tree_sum_without_barrier>(x, 64, 64).narrow(0, 0, 1);
}
at::Tensor broken_shuffle(const at::Tensor& x) {
  return one_block<shuffle_with_wrong_mask>(x, 32, 32);
}
at::Tensor broken_shared_read(const at::Tensor& x) {
  return one_block<read_unwritten_shared>(x, 32, 32);
}
at::Tensor broken_barrier(const at::Tensor& x) { return one_block<barrier_in_branch>(x, 32, 32); }

at::Tensor broken_copy(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  gpu::launch<copy_off_by_one>((n + 1 + 63) / 64, 64, 0, nullptr, x.const_data_ptr<float>(),
                               out.mutable_data_ptr<float>(), n);
  return out;
}

// A launch of more threads per block than CUDA allows (1024).
at::Tensor broken_launch(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor out = at::empty_like(x);
  gpu::launch<copy_off_by_one>(1, 2048, 0, nullptr, x.const_data_ptr<float>(),
                               out.mutable_data_ptr<float>(), x.numel() - 1);
  return out;
}

at::Tensor fragment_tile(const at::Tensor& x, bool assume_layout) {
  TORCH_CHECK(x.numel() == 256 && x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor out = at::empty_like(x);
  gpu::launch<tile_through_fragment>(1, 32, 0, nullptr, x.const_data_ptr<float>(),
                                     out.mutable_data_ptr<float>(), assume_layout);
  return out;
}

}  // namespace

TORCH_LIBRARY(hpml_emu_test, m) {
  m.def("tree_sum_without_barrier(Tensor x) -> Tensor");
  m.def("copy_off_by_one(Tensor x) -> Tensor");
  m.def("launch_too_many_threads(Tensor x) -> Tensor");
  m.def("shuffle_with_wrong_mask(Tensor x) -> Tensor");
  m.def("read_unwritten_shared(Tensor x) -> Tensor");
  m.def("barrier_in_branch(Tensor x) -> Tensor");
  m.def("tile_through_fragment(Tensor x, bool assume_layout) -> Tensor");
}

TORCH_LIBRARY_IMPL(hpml_emu_test, CPU, m) {
  m.impl("tree_sum_without_barrier", &::hpml_emu::EmuOp<&broken_tree_sum>::call);
  m.impl("copy_off_by_one", &::hpml_emu::EmuOp<&broken_copy>::call);
  m.impl("launch_too_many_threads", &::hpml_emu::EmuOp<&broken_launch>::call);
  m.impl("shuffle_with_wrong_mask", &::hpml_emu::EmuOp<&broken_shuffle>::call);
  m.impl("read_unwritten_shared", &::hpml_emu::EmuOp<&broken_shared_read>::call);
  m.impl("barrier_in_branch", &::hpml_emu::EmuOp<&broken_barrier>::call);
  m.impl("tile_through_fragment", &::hpml_emu::EmuOp<&fragment_tile>::call);
}

}  // namespace hpml
