// The Python extension module instrumented_adam._C. Loading it runs the TORCH_LIBRARY
// registrations; the module itself only exports the statistics table, so that Python uses the
// same names in the same order as the kernels. No pybind11 needed.
#include <Python.h>

#include "stats_table.h"

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "instrumented_adam kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* names = PyTuple_New(instrumented_adam::kNumStats);
  if (names == nullptr) return nullptr;
  for (int i = 0; i < instrumented_adam::kNumStats; ++i) {
    PyTuple_SET_ITEM(names, i, PyUnicode_FromString(instrumented_adam::kStatNames[i]));
  }
  if (PyModule_AddObject(module, "STAT_NAMES", names) < 0) return nullptr;
  return module;
}
