// Torch-facing binding of the CUDA critic + gradient-penalty stages (critic.cu): validates the
// tensors, makes them contiguous in one dtype, allocates outputs and scratch, launches on the
// current stream and reports launch errors. The op schemas are defined in csrc/critic_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "binding_common.h"
#include "critic.cuh"

namespace xlt_fast {
namespace {

// `t` on `like`'s device and dtype, contiguous.
at::Tensor like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "xlt_fast_C::", op, ": ", name, " is on ", t.device(), " but expected ",
              ref.device());
  return t.to(ref.scalar_type()).contiguous();
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "xlt_fast_C::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::vector<at::Tensor> critic_rows_fwd_cuda(const at::Tensor& y_in, const c10::optional<at::Tensor>& p_in,
                                             const at::Tensor& b1_in, const at::Tensor& w2_in,
                                             const at::Tensor& b2_in, const at::Tensor& coef_in,
                                             const at::Tensor& alpha_in, int64_t n_src) {
  const char* op = "critic_rows_fwd";
  check_cuda_float(y_in, op, "y");
  TORCH_CHECK(y_in.dim() == 2, "xlt_fast_C::critic_rows_fwd: y must be (N, H*k), got ", y_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const int64_t N = y.size(0), H = b1_in.numel(), K = alpha_in.numel();
  TORCH_CHECK(H > 0 && y.size(1) % H == 0, "xlt_fast_C::critic_rows_fwd: y must have H*k columns, b1 H entries");
  const int64_t k = y.size(1) / H;
  TORCH_CHECK(p_in.has_value() || k == 1, "xlt_fast_C::critic_rows_fwd: p is required when k > 1");
  TORCH_CHECK(coef_in.numel() == N && w2_in.numel() == H && b2_in.numel() == 1,
              "xlt_fast_C::critic_rows_fwd: coef must have N entries, w2 H and b2 one");
  TORCH_CHECK(n_src >= K && N - n_src >= K, "xlt_fast_C::critic_rows_fwd: alpha must have at most min(n, m) entries");
  TORCH_CHECK(N + K <= std::numeric_limits<int32_t>::max(), "xlt_fast_C::critic_rows_fwd: too many rows");
  at::Tensor p;
  if (p_in.has_value()) {
    p = like(*p_in, y, op, "p");
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N && p.size(1) == k, "xlt_fast_C::critic_rows_fwd: p must be (N, k)");
  }
  const at::Tensor b1 = like(b1_in, y, op, "b1"), w2 = like(w2_in, y, op, "w2"), b2 = like(b2_in, y, op, "b2");
  const at::Tensor coef = like(coef_in, y, op, "coef"), alpha = like(alpha_in, y, op, "alpha");
  const auto opts = y.options();
  at::Tensor estimate = at::empty({}, opts), f = at::empty({N}, opts), h = at::empty({N, H}, opts);
  at::Tensor mask_mix = at::empty({K, H}, opts), u_mix = at::empty({K, H}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "critic_rows_fwd_cuda", [&] {
    cuda::launch_critic_rows_fwd<scalar_t>(
        y.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(p), b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
        b2.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), N, n_src, K, H, k,
        f.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), mask_mix.data_ptr<scalar_t>(), u_mix.data_ptr<scalar_t>(),
        estimate.data_ptr<scalar_t>(), stream);
  });
  check_launch(op);
  return {estimate, f, h, mask_mix, u_mix};
}

at::Tensor critic_penalty_cuda(const at::Tensor& g_in) {
  const char* op = "critic_penalty";
  check_cuda_float(g_in, op, "g");
  TORCH_CHECK(g_in.dim() == 2 && g_in.size(0) > 0, "xlt_fast_C::critic_penalty: g must be (K, D) with K >= 1");
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  at::Tensor out = at::empty({}, g.options()), work = at::empty({g.size(0)}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "critic_penalty_cuda", [&] {
    cuda::launch_critic_penalty<scalar_t>(g.data_ptr<scalar_t>(), g.size(0), g.size(1), work.data_ptr<scalar_t>(),
                                          out.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  check_launch(op);
  return out;
}

std::vector<at::Tensor> critic_rows_bwd_cuda(const at::Tensor& h_in, const c10::optional<at::Tensor>& p_in,
                                             const at::Tensor& w2_in, const at::Tensor& coef_in) {
  const char* op = "critic_rows_bwd";
  check_cuda_float(h_in, op, "h");
  TORCH_CHECK(h_in.dim() == 2, "xlt_fast_C::critic_rows_bwd: h must be (N, H), got ", h_in.sizes());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0), H = h.size(1);
  at::Tensor p;
  int64_t k = 1;
  if (p_in.has_value()) {
    p = like(*p_in, h, op, "p");
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N, "xlt_fast_C::critic_rows_bwd: p must be (N, k)");
    k = p.size(1);
  }
  TORCH_CHECK(w2_in.numel() == H && coef_in.numel() == N,
              "xlt_fast_C::critic_rows_bwd: w2 must have H entries and coef N entries");
  const at::Tensor w2 = like(w2_in, h, op, "w2"), coef = like(coef_in, h, op, "coef");
  const auto opts = h.options();
  at::Tensor e = at::empty({N, H * k}, opts), gb1 = at::empty({H}, opts), gw2 = at::empty({H}, opts);
  at::Tensor work = at::empty({cuda::critic_rows_bwd_work(N, H)}, opts);
  if (N == 0) return {e, gb1.zero_(), gw2.zero_()};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "critic_rows_bwd_cuda", [&] {
    cuda::launch_critic_rows_bwd<scalar_t>(h.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(p), w2.data_ptr<scalar_t>(),
                                           coef.data_ptr<scalar_t>(), N, H, k, e.data_ptr<scalar_t>(),
                                           gb1.data_ptr<scalar_t>(), gw2.data_ptr<scalar_t>(),
                                           work.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  check_launch(op);
  return {e, gb1, gw2};
}

at::Tensor critic_gp_epilogue_cuda(at::Tensor& grad_w1, const at::Tensor& t_in, const at::Tensor& w1_in,
                                   const at::Tensor& w2_in, const at::Tensor& scale_in) {
  const char* op = "critic_gp_epilogue";
  check_cuda_float(grad_w1, op, "grad_w1");
  TORCH_CHECK(grad_w1.dim() == 2 && grad_w1.is_contiguous(), "xlt_fast_C::critic_gp_epilogue: grad_w1 must be a "
              "contiguous (H, D) tensor");
  TORCH_CHECK(t_in.sizes() == grad_w1.sizes() && w1_in.sizes() == grad_w1.sizes(),
              "xlt_fast_C::critic_gp_epilogue: t and w1 must have the shape of grad_w1");
  const c10::cuda::CUDAGuard guard(grad_w1.device());
  const at::Tensor t = like(t_in, grad_w1, op, "t"), w1 = like(w1_in, grad_w1, op, "w1");
  const at::Tensor w2 = like(w2_in, grad_w1, op, "w2"), scale = like(scale_in, grad_w1, op, "scale");
  const int64_t H = grad_w1.size(0), D = grad_w1.size(1);
  TORCH_CHECK(w2.numel() == H && scale.numel() == 1,
              "xlt_fast_C::critic_gp_epilogue: w2 must have H entries and scale one");
  at::Tensor gw2 = at::empty({H}, grad_w1.options());
  if (H == 0) return gw2;
  AT_DISPATCH_FLOATING_TYPES(grad_w1.scalar_type(), "critic_gp_epilogue_cuda", [&] {
    cuda::launch_critic_gp_epilogue<scalar_t>(grad_w1.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                              w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                                              scale.data_ptr<scalar_t>(), H, D, gw2.data_ptr<scalar_t>(),
                                              c10::cuda::getCurrentCUDAStream());
  });
  check_launch(op);
  return gw2;
}

}  // namespace

TORCH_LIBRARY_IMPL(xlt_fast_C, CUDA, m) {
  m.impl("critic_rows_fwd", &critic_rows_fwd_cuda);
  m.impl("critic_penalty", &critic_penalty_cuda);
  m.impl("critic_rows_bwd", &critic_rows_bwd_cuda);
  m.impl("critic_gp_epilogue", &critic_gp_epilogue_cuda);
}

}  // namespace xlt_fast
