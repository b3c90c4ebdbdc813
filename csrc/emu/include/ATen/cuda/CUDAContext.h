// Emulator stand-in for the parts of ATen's CUDA context the launchers use: the current stream
// (one, the emulator's) and the device properties (a small multiprocessor count, so that
// grid-stride loops are exercised at test sizes).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }  // NOLINT: implicit, as ATen's
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

struct DeviceProp {
  int multiProcessorCount = ::hpml_emu::kMultiProcessors;
  int maxThreadsPerBlock = 1024;
};
inline const DeviceProp* getCurrentDeviceProperties() {
  static const DeviceProp prop;
  return &prop;
}

}  // namespace cuda
}  // namespace at
