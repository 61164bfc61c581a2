// Torch-facing binding of the CUDA affine coupling epilogue (coupling.cu): validates the tensors,
// builds the feature -> transformed-index map on the device (no host sync), launches on the current
// stream and reports launch errors. Registers the CUDA kernels of the ops defined in
// csrc/coupling_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "coupling.cuh"

namespace xlt_fast {
namespace {

void check_cuda_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "xlt_fast_C::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "xlt_fast_C::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "xlt_fast_C::", op, ": ", name, " must have 2 dimensions, got ", t.sizes());
}

// Rows with unit feature stride, as the kernels read them.
at::Tensor rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& s_raw, const at::Tensor& t,
                  const at::Tensor& mask, int64_t scale) {
  check_cuda_float(x, op, "x");
  check_cuda_float(s_raw, op, "s_raw");
  check_cuda_float(t, op, "t");
  TORCH_CHECK(s_raw.scalar_type() == x.scalar_type() && t.scalar_type() == x.scalar_type(), "xlt_fast_C::", op,
              ": x, s_raw and t must share a dtype");
  TORCH_CHECK(s_raw.device() == x.device() && t.device() == x.device() && mask.device() == x.device(),
              "xlt_fast_C::", op, ": x, s_raw, t and mask must be on one device");
  TORCH_CHECK(s_raw.sizes() == t.sizes() && s_raw.size(0) == x.size(0), "xlt_fast_C::", op,
              ": s_raw and t must have shape (N, d_m) with x's N, got ", s_raw.sizes(), " and ", t.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.size(0) == x.size(1), "xlt_fast_C::", op,
              ": mask must be a bool tensor of shape (", x.size(1), ",)");
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, "xlt_fast_C::", op, ": too many rows or features");
  TORCH_CHECK(scale >= 0 && scale <= 2, "xlt_fast_C::", op, ": scale must be 0 (exp), 1 (tanh) or 2 (atan)");
}

// pos[j] = index of feature j among the transformed features, or -1. The count of True entries
// must equal s_raw's width; the Python op checks it (checking here would need a host sync).
at::Tensor positions(const at::Tensor& mask) {
  const at::Tensor rank = mask.to(at::kInt).cumsum(0, at::kInt) - 1;
  return at::where(mask, rank, at::full({}, -1, rank.options())).to(at::kInt).contiguous();
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "xlt_fast_C::", op, ": CUDA kernel launch failed for x ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> coupling_forward_cuda(const at::Tensor& x_in, const at::Tensor& s_in,
                                                         const at::Tensor& t_in, const at::Tensor& mask,
                                                         int64_t scale, double clamp, bool inverse) {
  const char* op = "coupling_forward";
  check_inputs(op, x_in, s_in, t_in, mask, scale);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows(x_in), sr = rows(s_in), t = rows(t_in);
  const at::Tensor pos = positions(mask);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor logdet = at::empty({x.size(0)}, x.options());
  cuda::CouplingArgs a;
  a.double_precision = x.scalar_type() == at::kDouble;
  a.n = x.size(0);
  a.d = x.size(1);
  a.scale = static_cast<int>(scale);
  a.clamp = clamp;
  a.inverse = inverse;
  a.pos = pos.data_ptr<int32_t>();
  a.x = x.data_ptr();
  a.sx = x.stride(0);
  a.s_raw = sr.data_ptr();
  a.ss = sr.stride(0);
  a.t = t.data_ptr();
  a.st = t.stride(0);
  a.y = y.data_ptr();
  a.sy = y.stride(0);
  a.logdet = logdet.data_ptr();
  check_launch(cuda::coupling_forward(a, c10::cuda::getCurrentCUDAStream()), op, x);
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coupling_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& grad_logdet_in, const at::Tensor& x_in, const at::Tensor& s_in,
    const at::Tensor& t_in, const at::Tensor& mask, int64_t scale, double clamp, bool inverse) {
  const char* op = "coupling_backward";
  check_inputs(op, x_in, s_in, t_in, mask, scale);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes() && grad_y_in.device() == x_in.device(), "xlt_fast_C::", op,
              ": grad_y must have x's shape ", x_in.sizes(), " and device");
  TORCH_CHECK(grad_logdet_in.dim() == 1 && grad_logdet_in.size(0) == x_in.size(0) &&
                  grad_logdet_in.device() == x_in.device(),
              "xlt_fast_C::", op, ": grad_logdet must have shape (N,) on x's device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows(x_in), sr = rows(s_in), t = rows(t_in);
  const at::Tensor g = rows(grad_y_in.to(x.scalar_type()));
  const at::Tensor gl = grad_logdet_in.to(x.scalar_type()).contiguous();
  const at::Tensor pos = positions(mask);
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gs = at::empty(sr.sizes(), sr.options());
  at::Tensor gt = at::empty(t.sizes(), t.options());
  cuda::CouplingArgs a;
  a.double_precision = x.scalar_type() == at::kDouble;
  a.n = x.size(0);
  a.d = x.size(1);
  a.scale = static_cast<int>(scale);
  a.clamp = clamp;
  a.inverse = inverse;
  a.pos = pos.data_ptr<int32_t>();
  a.x = x.data_ptr();
  a.sx = x.stride(0);
  a.s_raw = sr.data_ptr();
  a.ss = sr.stride(0);
  a.t = t.data_ptr();
  a.st = t.stride(0);
  a.grad_y = g.data_ptr();
  a.sgy = g.stride(0);
  a.grad_logdet = gl.data_ptr();
  a.grad_x = gx.data_ptr();
  a.sgx = gx.stride(0);
  a.grad_s = gs.data_ptr();
  a.sgs = gs.stride(0);
  a.grad_t = gt.data_ptr();
  a.sgt = gt.stride(0);
  check_launch(cuda::coupling_backward(a, c10::cuda::getCurrentCUDAStream()), op, x);
  return {gx, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlt_fast_C, CUDA, m) {
  m.impl("coupling_forward", &coupling_forward_cuda);
  m.impl("coupling_backward", &coupling_backward_cuda);
}

}  // namespace xlt_fast
