// Torch-facing binding of the CUDA pairwise kernel (pairwise.cu): validates the tensors, makes
// them contiguous, launches on the current stream and reports launch errors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_common.h"
#include "pairwise.cuh"

namespace xlt_fast {
namespace {

constexpr const char* kOp = "pairwise_sqdist";

void check_cuda_points(const at::Tensor& t, const char* name) {
  check_cuda_float(t, kOp, name);
  TORCH_CHECK(t.dim() == 3, "xlt_fast_C::pairwise_sqdist: ", name, " must have shape (B, rows, d), got ",
              t.sizes());
}
at::Tensor pairwise_sqdist_cuda(const at::Tensor& x_in, const at::Tensor& y_in, bool dot, double refine_tol) {
  check_cuda_points(x_in, "x");
  check_cuda_points(y_in, "y");
  TORCH_CHECK(x_in.device() == y_in.device(), "xlt_fast_C::pairwise_sqdist: x is on ", x_in.device(),
              " but y is on ", y_in.device());
  TORCH_CHECK(x_in.size(0) == y_in.size(0) && x_in.size(2) == y_in.size(2),
              "xlt_fast_C::pairwise_sqdist: x (B, n, d) and y (B, m, d) must share B and d, got ", x_in.sizes(),
              " and ", y_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), n = x.size(1), m = y.size(1), d = x.size(2);
  at::Tensor out = at::empty({B, n, m}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // at::cuda:: re-exports this
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_sqdist_cuda", [&] {
    cuda::launch_pairwise_sqdist<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                           B, n, m, d, dot, refine_tol, stream);
  });
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "xlt_fast_C::pairwise_sqdist: CUDA kernel launch failed for x ", x.sizes(),
              ", y ", y.sizes(), ": ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xlt_fast_C, CUDA, m) { m.impl("pairwise_sqdist", &pairwise_sqdist_cuda); }

}  // namespace xlt_fast
