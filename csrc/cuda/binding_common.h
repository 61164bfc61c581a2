// Checks shared by the torch-facing CUDA bindings (C++, compiled only in CUDA builds).
#pragma once
#include <ATen/ATen.h>

namespace xlt_fast {

// A float32/float64 CUDA tensor, or an error naming the op and the argument.
inline void check_cuda_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "xlt_fast_C::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "xlt_fast_C::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

}  // namespace xlt_fast
