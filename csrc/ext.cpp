// linattn._C: the Python module that carries the CUDA ops. Importing it loads this
// shared library, whose static initializers register the ops (TORCH_LIBRARY_* in the
// .cu files) under torch.ops.linattn. The module itself only records which torch it
// was built against and the ops' contract, so linattn can refuse a mismatched build with a warning.
#include <Python.h>

#include <string>

// The ops' contract, bumped whenever what an op computes or writes changes under the same schema (2: the
// context op writes qkv's own heads too): linattn/_extension.py `ABI` must match, so a build made from older
// sources (an editable install not rebuilt) is refused rather than run.
#define LINATTN_ABI 2

// The torch version this build is for, e.g. -DLINATTN_TORCH_VERSION="2.8.0+cu128".
// Build tools differ in whether the quotes survive the shell, so the value is
// stringized either way and quotes around it are dropped.
#ifndef LINATTN_TORCH_VERSION
#define LINATTN_TORCH_VERSION unknown
#endif
#define LINATTN_STRINGIZE_(x) #x
#define LINATTN_STRINGIZE(x) LINATTN_STRINGIZE_(x)

static std::string torch_version() {
  std::string version = LINATTN_STRINGIZE(LINATTN_TORCH_VERSION);
  if (version.size() >= 2 && version.front() == '"' && version.back() == '"') {
    version = version.substr(1, version.size() - 2);
  }
  return version;
}

static struct PyModuleDef linattn_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                     // m_name
    "linattn CUDA ops (registered under torch.ops.linattn)",  // m_doc
    -1,                                                       // m_size
    nullptr,                                                  // m_methods
    nullptr,                                                  // m_slots
    nullptr,                                                  // m_traverse
    nullptr,                                                  // m_clear
    nullptr,                                                  // m_free
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&linattn_c_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "torch_version", torch_version().c_str()) < 0 ||
      PyModule_AddIntConstant(module, "abi", LINATTN_ABI) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
