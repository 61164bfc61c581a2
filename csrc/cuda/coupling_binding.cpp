// Torch-facing binding of the CUDA affine coupling epilogue (coupling.cu): validates the tensors,
// launches on the current stream and reports launch errors (no host sync: the mask's count of True
// entries is checked against s_raw's width in Python). Registers the CUDA kernels of the ops defined in
// csrc/coupling_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_common.h"
#include "coupling.cuh"

namespace xlt_fast {
namespace {

void check_cuda_rows(const at::Tensor& t, const char* op, const char* name) {
  check_cuda_float(t, op, name);
  TORCH_CHECK(t.dim() == 2, "xlt_fast_C::", op, ": ", name, " must have 2 dimensions, got ", t.sizes());
}

// Rows with unit feature stride, as the kernels read them.
at::Tensor rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& s_raw, const at::Tensor& t,
                  const at::Tensor& mask, int64_t scale) {
  check_cuda_rows(x, op, "x");
  check_cuda_rows(s_raw, op, "s_raw");
  check_cuda_rows(t, op, "t");
  TORCH_CHECK(s_raw.scalar_type() == x.scalar_type() && t.scalar_type() == x.scalar_type(), "xlt_fast_C::", op,
              ": x, s_raw and t must share a dtype");
  TORCH_CHECK(s_raw.device() == x.device() && t.device() == x.device() && mask.device() == x.device(),
              "xlt_fast_C::", op, ": x, s_raw, t and mask must be on one device");
  TORCH_CHECK(s_raw.sizes() == t.sizes() && s_raw.size(0) == x.size(0), "xlt_fast_C::", op,
              ": s_raw and t must have shape (N, d_m) with x's N, got ", s_raw.sizes(), " and ", t.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.size(0) == x.size(1), "xlt_fast_C::", op,
              ": mask must be a bool tensor of shape (", x.size(1), ",)");
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= 196608, "xlt_fast_C::", op,
              ": at most 2^31 - 1 rows and 196608 features, got ", x.sizes());
  TORCH_CHECK(scale >= 0 && scale <= 2, "xlt_fast_C::", op, ": scale must be 0 (exp), 1 (tanh) or 2 (atan)");
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "xlt_fast_C::", op, ": CUDA kernel launch failed for x ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

// The fields both directions share: sizes, the scale map and the inputs' pointers and row strides.
cuda::CouplingArgs input_args(const at::Tensor& x, const at::Tensor& sr, const at::Tensor& t, const at::Tensor& m,
                              int64_t scale, double clamp, bool inverse) {
  cuda::CouplingArgs a;
  a.double_precision = x.scalar_type() == at::kDouble;
  a.n = x.size(0);
  a.d = x.size(1);
  a.scale = static_cast<int>(scale);
  a.clamp = clamp;
  a.inverse = inverse;
  a.dm = sr.size(1);
  a.mask = m.data_ptr<bool>();
  a.x = x.data_ptr();
  a.sx = x.stride(0);
  a.s_raw = sr.data_ptr();
  a.ss = sr.stride(0);
  a.t = t.data_ptr();
  a.st = t.stride(0);
  return a;
}

std::tuple<at::Tensor, at::Tensor> coupling_forward_cuda(const at::Tensor& x_in, const at::Tensor& s_in,
                                                         const at::Tensor& t_in, const at::Tensor& mask,
                                                         int64_t scale, double clamp, bool inverse) {
  const char* op = "coupling_forward";
  check_inputs(op, x_in, s_in, t_in, mask, scale);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows(x_in), sr = rows(s_in), t = rows(t_in);
  const at::Tensor m = mask.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor logdet = at::empty({x.size(0)}, x.options());
  cuda::CouplingArgs a = input_args(x, sr, t, m, scale, clamp, inverse);
  a.y = y.data_ptr();
  a.sy = y.stride(0);
  a.logdet = logdet.data_ptr();
  check_launch(cuda::coupling_forward(a, c10::cuda::getCurrentCUDAStream()), op, x);
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> coupling_backward_cuda(
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
  const at::Tensor m = mask.contiguous();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gst = at::empty({x.size(0), 2 * sr.size(1)}, x.options());  // [dL/ds_raw | dL/dt]
  cuda::CouplingArgs a = input_args(x, sr, t, m, scale, clamp, inverse);
  a.grad_y = g.data_ptr();
  a.sgy = g.stride(0);
  a.grad_logdet = gl.data_ptr();
  a.grad_x = gx.data_ptr();
  a.sgx = gx.stride(0);
  a.grad_s = gst.data_ptr();
  a.sgs = gst.stride(0);
  a.grad_t = static_cast<char*>(gst.data_ptr()) + sr.size(1) * gst.element_size();
  a.sgt = gst.stride(0);
  check_launch(cuda::coupling_backward(a, c10::cuda::getCurrentCUDAStream()), op, x);
  return {gx, gst};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlt_fast_C, CUDA, m) {
  m.impl("coupling_forward", &coupling_forward_cuda);
  m.impl("coupling_backward", &coupling_backward_cuda);
}

}  // namespace xlt_fast
