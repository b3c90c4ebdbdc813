// hpml_ops._C_emu: the CUDA kernels of csrc/cuda, compiled as host C++ and run by the emulator
// (csrc/emu/runtime.cpp) on CPU tensors, as the ops of the library hpml_emu (the schemas of
// hpml_ops/ops/schema.py, like hpml). The kernels' files are the ones nvcc builds; setup.py
// compiles each through a generated wrapper with the emulator's headers first on the include
// path and the instrumentation on.
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "hpml_emu/op_scope.h"

namespace {

PyObject* set_seed(PyObject*, PyObject* arg) {
  const unsigned long long seed = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred() != nullptr) return nullptr;
  hpml_emu::set_seed(seed);
  Py_RETURN_NONE;
}

PyObject* stats(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (const auto& [key, value] : hpml_emu::stats()) {
    PyObject* v = PyLong_FromUnsignedLongLong(value);
    if (v == nullptr || PyDict_SetItemString(d, key, v) != 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}

PyObject* launched_kernels(PyObject*, PyObject*) {
  const std::vector<uint64_t> ks = hpml_emu::launched_kernels();
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (uint64_t k : ks) {
    PyObject* v = PyLong_FromUnsignedLongLong(k);
    if (v == nullptr || PyList_Append(list, v) != 0) {
      Py_XDECREF(v);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return list;
}

PyMethodDef methods[] = {
    {"set_seed", &set_seed, METH_O,
     "set_seed(seed): the seed of the orders of blocks and threads and of the WMMA layouts; "
     "every launch after it draws from it in turn."},
    {"stats", &stats, METH_NOARGS,
     "stats() -> dict: launches, blocks, threads, fiber switches, checked accesses so far."},
    {"launched_kernels", &launched_kernels, METH_NOARGS,
     "launched_kernels() -> list[int]: the kernels launched so far, as the offsets of their "
     "code in the library file (the values of their symbols)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_emu",
      "hpml_ops' CUDA kernels run on CPU tensors by an emulator (torch.ops.hpml_emu)", -1, methods,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // Without the allocator wrapped, the outputs an op allocates are unknown: accesses outside
  // the op's tensors would go unchecked (the flag says so).
  PyModule_AddIntConstant(m, "CHECKS_GLOBAL_MEMORY", hpml_emu::install_allocator() ? 1 : 0);
  return m;
}
}

HPML_DEFINE_LIBRARY()
