// lowrank_kernels._C, the package's CUDA backend: the module, whose functions each op's binding
// file (csrc/<op>_binding.cpp) registers through binding.h's Registrar.
#include "binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank_kernels CUDA backend (called by lowrank_kernels.ops; not a public API)";
  for (const lowrank_kernels::binding::Definitions define : lowrank_kernels::binding::definitions()) define(m);
}
