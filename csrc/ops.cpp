// Every schema of the hpml namespace, defined once. Kernels register per dispatch key in the file
// that implements them (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA), the forward ops'
// autograd formulas in csrc/autograd.cpp; fake kernels and autocast policies are registered from
// Python (hpml_ops/ops/<op>.py).
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

  // act(input @ weight.T + bias) for a 2-D input (M, K), weight (N, K), bias (N) or None; one
  // dtype. activation: 0 none, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh. Returns (output (M, N),
  // mask): for relu and leaky_relu the mask holds bit (j % 8) of byte [m, j / 8] = (z[m, j] > 0),
  // uint8 (M, ceil(N / 8)); for the others it is an empty uint8 tensor.
  m.def(
      "linear_act(Tensor input, Tensor weight, Tensor? bias, int activation, "
      "float negative_slope) -> (Tensor, Tensor)");
  // Gradients of linear_act from grad (M, N) and what the forward saved: the mask (relu, leaky
  // relu) or the output (sigmoid, tanh; an empty tensor otherwise). Returns (grad_input (M, K),
  // grad_weight (N, K), grad_bias (N)); one not asked for is an empty tensor.
  m.def(
      "linear_act_backward(Tensor grad, Tensor input, Tensor weight, Tensor output, Tensor mask, "
      "int activation, float negative_slope, bool input_grad, bool weight_grad, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor)");

  // Batch normalization over the channel dimension 1 of input (N, C, *), contiguous or channels
  // last; then ReLU when activation == 1. training: normalise with the batch statistics, else with
  // running_mean / running_var (read only: the op is functional, so it has an autograd formula;
  // hpml_ops.batch_norm updates the running statistics in place from the returned batch ones).
  // Returns (output, mean, invstd, var): the statistics used per channel, in fp32 (fp64 for fp64
  // input), and in training the unbiased batch variance (else an empty tensor).
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, int activation) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients from grad (input's shape), the forward's output (read for the ReLU mask) and the
  // statistics it used. training: those were batch statistics (their gradient flows to input).
  // Returns (grad_input, grad_weight, grad_bias); one not asked for is an empty tensor.
  m.def(
      "batch_norm_backward(Tensor grad, Tensor input, Tensor? weight, Tensor output, Tensor mean, "
      "Tensor invstd, bool training, int activation, bool input_grad, bool weight_grad, "
      "bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // The pieces of a batch norm whose statistics are merged across processes (SyncBatchNorm):
  // per-channel mean and biased variance of input (N, C, *), in fp32 (fp64 for fp64 input), from
  // the same shifted sums as batch_norm.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // Per-channel (sum dz, sum dz (x - mean)) in fp32 (fp64 for fp64), dz = grad, or grad where the
  // ReLU output is > 0 when activation == 1.
  m.def(
      "batch_norm_backward_reduce(Tensor grad, Tensor input, Tensor output, Tensor mean, "
      "int activation) -> (Tensor, Tensor)");
  // grad_input from sums over the whole batch of `count` values per channel (all processes):
  // dx = (dz - sum_dz / count - (x - mean) invstd^2 sum_dz_xmu / count) weight invstd.
  m.def(
      "batch_norm_backward_elemt(Tensor grad, Tensor input, Tensor? weight, Tensor output, "
      "Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xmu, int count, int activation) "
      "-> Tensor");
}
