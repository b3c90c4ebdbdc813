// hpml::mlp and hpml::mlp_backward on CPU: the whole network in one op call, layer by layer
// through the library's C++ CPU kernels (csrc/mlp.h).
#include "mlp.h"

namespace hpml {

HPML_REGISTER_KERNELS(mlp, CPU, _layers)

}  // namespace hpml
