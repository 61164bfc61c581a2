// The Python module xlt_fast._C. Kernels register themselves as torch ops in the namespace
// `xlt_fast_C` (TORCH_LIBRARY_FRAGMENT in each source file); importing this module loads them.
#include <Python.h>

static struct PyModuleDef xlt_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&xlt_fast_c_module); }
