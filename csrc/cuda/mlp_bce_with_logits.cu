// hpml::mlp_bce_with_logits and its backward on CUDA: the net's op and the loss's in one op call
// each way (csrc/mlp_bce_with_logits.h), on the library's CUDA kernels.
#include "mlp_bce_with_logits.h"

namespace hpml {

HPML_REGISTER_KERNELS(mlp_bce_with_logits, CUDA, _layers)

}  // namespace hpml
