// Emulator stand-in for CUDA's runtime header (csrc/emu: CUDA kernels compiled as host C++ and run
// on CPU tensors). Everything the kernels of csrc/cuda use comes from hpml_emu/runtime.h.
#pragma once

#include "hpml_emu/runtime.h"
