// The Python extension module instrumented_adam._C. Loading it runs the TORCH_LIBRARY
// registrations; the module itself exports the statistics tables (stats_table.h), so that Python
// reads names, order, combination rules and families from the one place the kernels use.
// No pybind11 needed.
#include <Python.h>

#include "histogram.h"
#include "stats_table.h"

namespace {

const char* combine_name(instrumented_adam::Combine c) {
  switch (c) {
    case instrumented_adam::Combine::kSum: return "sum";
    case instrumented_adam::Combine::kMax: return "max";
    case instrumented_adam::Combine::kCount: return "count";
  }
  return "?";
}

// ((name, combine, (family, ...), definition), ...)
PyObject* table_to_python(const instrumented_adam::StatInfo* table, int n) {
  PyObject* rows = PyTuple_New(n);
  if (rows == nullptr) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* families = PyTuple_New(0);
    for (int f = 0; f < instrumented_adam::kNumFamilies; ++f) {
      if (!(table[i].families & (1u << f))) continue;
      PyObject* name = PyUnicode_FromString(instrumented_adam::kFamilyNames[f]);
      const Py_ssize_t size = PyTuple_GET_SIZE(families);
      if (_PyTuple_Resize(&families, size + 1) < 0) return nullptr;
      PyTuple_SET_ITEM(families, size, name);
    }
    PyObject* row = Py_BuildValue("(ssNs)", table[i].name, combine_name(table[i].combine), families,
                                  table[i].definition);
    if (row == nullptr) return nullptr;
    PyTuple_SET_ITEM(rows, i, row);
  }
  return rows;
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "instrumented_adam kernels", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* stats = table_to_python(instrumented_adam::kStatTable, instrumented_adam::kNumStats);
  PyObject* epoch = table_to_python(instrumented_adam::kEpochStatTable, instrumented_adam::kNumEpochStats);
  PyObject* families = PyTuple_New(instrumented_adam::kNumFamilies);
  if (stats == nullptr || epoch == nullptr || families == nullptr) return nullptr;
  for (int f = 0; f < instrumented_adam::kNumFamilies; ++f) {
    PyTuple_SET_ITEM(families, f, PyUnicode_FromString(instrumented_adam::kFamilyNames[f]));
  }
  if (PyModule_AddObject(module, "STAT_TABLE", stats) < 0) return nullptr;
  if (PyModule_AddObject(module, "EPOCH_STAT_TABLE", epoch) < 0) return nullptr;
  if (PyModule_AddObject(module, "FAMILIES", families) < 0) return nullptr;
  // The step histograms (histogram.h): ((name, definition), ...) and the bin layout.
  PyObject* histograms = PyTuple_New(instrumented_adam::kNumHistograms);
  if (histograms == nullptr) return nullptr;
  for (int k = 0; k < instrumented_adam::kNumHistograms; ++k) {
    PyObject* row = Py_BuildValue("(ss)", instrumented_adam::kHistogramTable[k].name,
                                  instrumented_adam::kHistogramTable[k].definition);
    if (row == nullptr) return nullptr;
    PyTuple_SET_ITEM(histograms, k, row);
  }
  if (PyModule_AddObject(module, "HISTOGRAM_TABLE", histograms) < 0) return nullptr;
  if (PyModule_AddIntConstant(module, "HISTOGRAM_BINS", instrumented_adam::kHistBins) < 0) return nullptr;
  if (PyModule_AddIntConstant(module, "HISTOGRAM_MIN_EXPONENT", instrumented_adam::kHistMinExponent) < 0) return nullptr;
  return module;
}
