// The op `xlt_fast_C::cuda_built() -> bool`. This file is compiled only when the extension is built
// with its CUDA sources, so the op's existence is what xlt_fast._backend.has_cuda_kernels() tests.
#include <torch/library.h>

namespace xlt_fast {
namespace {

bool cuda_built() { return true; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) { m.def("cuda_built() -> bool"); }

// No tensor arguments, so no backend key to dispatch on: one kernel serves every device.
TORCH_LIBRARY_IMPL(xlt_fast_C, CompositeExplicitAutograd, m) { m.impl("cuda_built", &cuda_built); }

}  // namespace xlt_fast
