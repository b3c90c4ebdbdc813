// hpml::mlp and hpml::mlp_backward on CUDA: the whole network in one op call, layer by layer
// through the library's CUDA kernels (csrc/mlp.h); the fully fused kernel for narrow
// fp16/bf16 nets is the next step (issue 12).
#include "mlp.h"

namespace hpml {

HPML_REGISTER_KERNELS(mlp, CUDA, _layers)

}  // namespace hpml
