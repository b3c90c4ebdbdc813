// Every schema of the hpml namespace, defined once. Kernels register per dispatch key in the file
// that implements them (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA); fake kernels and
// autograd formulas are registered from Python (hpml_ops/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing hpml_ops._C loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "hpml_ops compiled kernels (torch.ops.hpml)", -1, nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef HPML_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
#if defined(CPU_CAPABILITY_AVX2)
  PyModule_AddStringConstant(m, "CPU_ISA", "avx2");
#else
  PyModule_AddStringConstant(m, "CPU_ISA", "default");
#endif
  return m;
}
}

TORCH_LIBRARY(hpml, m) {
  // reduction: 0 none, 1 mean, 2 sum (at::Reduction). input and target: same shape and dtype;
  // weight and pos_weight: same dtype, broadcastable to the input's shape.
  m.def(
      "bce_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction) -> Tensor");
  // grad: the forward output's gradient (0-d for mean/sum). Returns (grad_input, grad_target);
  // a gradient not asked for is returned as an empty tensor.
  m.def(
      "bce_with_logits_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
}
