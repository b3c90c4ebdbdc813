// The hpml library: every schema, from the one list in hpml_ops/ops/schema.py (generated into
// hpml_schemas.h by setup.py; the Triton ops hpml::<op>_triton take the same schemas from it).
// Kernels register per dispatch key in the file that implements them (csrc/<stem>.cpp for CPU,
// csrc/cuda/<stem>.cu for CUDA: HPML_REGISTER_KERNELS), the forward ops' autograd formulas in
// csrc/autograd.cpp; fake kernels and autocast policies are registered from Python
// (hpml_ops/ops/_registry.py, from each op's spec).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"

namespace {

using Items = std::vector<std::pair<std::string, PyObject*>>;

// A new dict of the items (each value's reference is taken over); nullptr on a Python error.
PyObject* make_dict(const Items& items) {
  PyObject* d = PyDict_New();
  bool ok = d != nullptr;
  for (const auto& [key, value] : items) {
    ok = ok && value != nullptr && PyDict_SetItemString(d, key.c_str(), value) == 0;
    Py_XDECREF(value);
  }
  if (!ok) Py_XDECREF(d);
  return ok ? d : nullptr;
}

PyObject* py_int(long long v) { return PyLong_FromLongLong(v); }
PyObject* py_str(const std::string& v) { return PyUnicode_FromString(v.c_str()); }

// hpml_ops._C.CONSTANTS: what csrc/constants.h says, for tests/test_registry.py to compare with
// hpml_ops/constants.py.
PyObject* constants() {
  using hpml::Act;
#define HPML_ACT_CODE(E, name, code) {name, py_int(static_cast<int64_t>(Act::E))},
#define HPML_ACT_MASK(E, name, code) {name, py_int(hpml::act_uses_mask(Act::E))},
#define HPML_ACT_OUTPUT(E, name, code) {name, py_int(hpml::act_uses_output(Act::E))},
#define HPML_REDUCTION(name, code) {name, py_int(code)},
  Items acc;
  for (auto t : {c10::kFloat, c10::kDouble, c10::kHalf, c10::kBFloat16}) {
    acc.emplace_back(hpml::py_dtype(t), py_str(hpml::py_dtype(hpml::acc_scalar_type(t))));
  }
  return make_dict({
      {"activations", make_dict({HPML_ACTIVATIONS(HPML_ACT_CODE)})},
      {"act_uses_mask", make_dict({HPML_ACTIVATIONS(HPML_ACT_MASK)})},
      {"act_uses_output", make_dict({HPML_ACTIVATIONS(HPML_ACT_OUTPUT)})},
      {"reductions", make_dict({HPML_REDUCTIONS(HPML_REDUCTION)})},
      {"acc_dtypes", make_dict(acc)},
      {"mask_bits_per_byte", py_int(hpml::kMaskBitsPerByte)},
  });
#undef HPML_ACT_CODE
#undef HPML_ACT_MASK
#undef HPML_ACT_OUTPUT
#undef HPML_REDUCTION
}

// hpml_ops._C.cpu_capability(): the ISA variant of the CPU kernels in use ("AVX512", ...).
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(hpml::cpu::capability_name(hpml::cpu::active_capability()));
}

// hpml_ops._C.cpu_capabilities_built(): the variants this build holds, e.g. ("DEFAULT", "AVX2").
PyObject* cpu_capabilities_built(PyObject*, PyObject*) {
  const int built = hpml::cpu::built_capabilities();
  PyObject* out = PyList_New(0);
  for (int c = 0; out != nullptr && c < hpml::cpu::kNumCapabilities; ++c) {
    if (!(built & (1 << c))) continue;
    PyObject* name = PyUnicode_FromString(hpml::cpu::capability_name(c));
    if (name == nullptr || PyList_Append(out, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return out;
}

// hpml_ops._C._force_cpu_capability(name or None) -> the name in use before (tests: every
// variant the CPU can run, in one process).
PyObject* force_cpu_capability(PyObject*, PyObject* arg) {
  int cap = -1;
  if (arg != Py_None) {
    for (int c = 0; c < hpml::cpu::kNumCapabilities && cap < 0; ++c)
      if (PyUnicode_Check(arg) &&
          PyUnicode_CompareWithASCIIString(arg, hpml::cpu::capability_name(c)) == 0)
        cap = c;
    if (cap < 0) {
      PyErr_Format(PyExc_ValueError, "unknown CPU capability %R; expected DEFAULT, AVX2 or AVX512",
                   arg);
      return nullptr;
    }
  }
  try {
    return PyUnicode_FromString(hpml::cpu::capability_name(hpml::cpu::force_capability(cap)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// hpml_ops._C._large_forward_onednn(): whether large fp32 linear forwards go to oneDNN's inner
// product where torch has it (cpu::large_forward_onednn()).
PyObject* large_forward_onednn(PyObject*, PyObject*) {
  return PyBool_FromLong(hpml::cpu::large_forward_onednn() ? 1 : 0);
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The ISA variant of the CPU kernels in use."},
    {"cpu_capabilities_built", cpu_capabilities_built, METH_NOARGS,
     "The ISA variants of the CPU kernels this build holds."},
    {"_large_forward_onednn", large_forward_onednn, METH_NOARGS,
     "Whether large fp32 linear forwards go to oneDNN's inner product where torch has it."},
    {"_force_cpu_capability", force_cpu_capability, METH_O,
     "Run the CPU kernels of this variant (None: the automatic choice); returns the one before."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing hpml_ops._C loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "hpml_ops compiled kernels (torch.ops.hpml)", -1, methods,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef HPML_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  PyObject* c = constants();
  if (c == nullptr || PyModule_AddObject(m, "CONSTANTS", c) != 0) {
    Py_XDECREF(c);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

HPML_DEFINE_LIBRARY()
