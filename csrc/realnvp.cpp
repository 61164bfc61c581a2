// A whole Real-NVP flow (a chain of affine couplings, csrc/coupling_cpu.cpp) as one op each way, so
// that a flow costs one autograd node and no per-layer Python dispatch (xlt_fast/nn/flows.py).
//
// Coupling k (in the order applied) has parameters params[6k .. 6k+5] = W1, b1, W2, b2, W3, b3, its
// conditioning features x[:, cond[3k] : cond[3k+1] : cond[3k+2]] = x_1, and its mask, scale map and
// clamp. Forward, per coupling:
//   h1 = relu(x_1 W1^T + b1),  h2 = relu(h1 W2^T + b2),  [s_raw | t] = h2 W3^T + b3,
//   (x, ld) = coupling_forward(x, s_raw, t, mask),  logdet += ld  (in place, in coupling order).
// Backward, couplings in reverse, with G3 = dL/d[s_raw | t] from coupling_backward:
//   G2 = (G3 W3) * 1[h2 > 0],  G1 = (G2 W2) * 1[h1 > 0],  dL/dx_1 += G1 W1 (a GEMM into dL/dx's
//   conditioning columns),  dW_l = G_l^T h_{l-1},  db_l = sum_rows G_l  (h_0 = x_1).
// These are the GEMMs and reductions of autograd through the conditioner, in its order (tested bit-
// identical to the per-coupling path it replaced, and to the fp64 reference within 1e-12; against
// plain autograd the in-place addmm_ accumulation into dL/dx may round differently). Only ATen ops and the coupling ops (through the dispatcher, below
// its autograd keys: the caller records the one graph node) are called, so one function serves CPU
// and CUDA tensors.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace xlt_fast {
namespace {

using Tensors = std::vector<at::Tensor>;

// The flow's per-coupling arguments, checked once: K couplings, 6 parameters, 3 slice ints each.
int64_t couplings(const char* op, at::TensorList params, at::TensorList masks, at::IntArrayRef cond,
                  at::IntArrayRef scale, at::ArrayRef<double> clamp) {
  const int64_t K = static_cast<int64_t>(masks.size());
  TORCH_CHECK(K >= 1, "xlt_fast_C::", op, ": masks must hold one mask per coupling, got none");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 6 * K, "xlt_fast_C::", op, ": params must hold 6 tensors "
              "(W1, b1, W2, b2, W3, b3) per coupling, ", 6 * K, " for ", K, " masks, got ", params.size());
  TORCH_CHECK(static_cast<int64_t>(cond.size()) == 3 * K, "xlt_fast_C::", op, ": cond must hold 3 ints "
              "(start, stop, step) per coupling, ", 3 * K, ", got ", cond.size());
  TORCH_CHECK(static_cast<int64_t>(scale.size()) == K && static_cast<int64_t>(clamp.size()) == K, "xlt_fast_C::",
              op, ": scale and clamp must hold one entry per coupling (", K, "), got ", scale.size(), " and ",
              clamp.size());
  return K;
}

// x_1 of coupling k: the strided view of its conditioning columns.
at::Tensor conditioning(const at::Tensor& x, at::IntArrayRef cond, int64_t k) {
  return x.slice(1, cond[3 * k], cond[3 * k + 1], cond[3 * k + 2]);
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair coupling_forward(const at::Tensor& x, const at::Tensor& s_raw, const at::Tensor& t, const at::Tensor& mask,
                      int64_t scale, double clamp, bool inverse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xlt_fast_C::coupling_forward", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, double, bool)>();
  return op.call(x, s_raw, t, mask, scale, clamp, inverse);
}

Pair coupling_backward(const at::Tensor& gy, const at::Tensor& gl, const at::Tensor& x, const at::Tensor& s_raw,
                       const at::Tensor& t, const at::Tensor& mask, int64_t scale, double clamp, bool inverse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xlt_fast_C::coupling_backward", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         double, bool)>();
  return op.call(gy, gl, x, s_raw, t, mask, scale, clamp, inverse);
}

// (y, logdet, saved). saved (empty unless `save`) holds what the backward reads: per coupling k its
// input x_k (k >= 1; x_0 is the op's input) at 4k - 1, then h1, h2, [s_raw | t] at 4k .. 4k + 2.
std::tuple<at::Tensor, at::Tensor, Tensors> realnvp_forward(const at::Tensor& x_in, at::TensorList params,
                                                            at::TensorList masks, at::IntArrayRef cond,
                                                            at::IntArrayRef scale, at::ArrayRef<double> clamp,
                                                            bool inverse, bool save) {
  const int64_t K = couplings("realnvp_forward", params, masks, cond, scale, clamp);
  TORCH_CHECK(x_in.dim() == 2, "xlt_fast_C::realnvp_forward: x must have shape (N, d), got ", x_in.sizes());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // no graph: skip the autograd kernels
  at::Tensor x = x_in, logdet;
  Tensors saved;
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor* p = params.data() + 6 * k;
    // bias + ReLU in the GEMM's epilogue where the BLAS has one (cuBLASLt), else addmm + relu_
    at::Tensor h1 = at::_addmm_activation(p[1], conditioning(x, cond, k), p[0].t());
    at::Tensor h2 = at::_addmm_activation(p[3], h1, p[2].t());
    at::Tensor st = at::addmm(p[5], h2, p[4].t());
    const int64_t d_m = st.size(1) / 2;
    auto [y, ld] = coupling_forward(x, st.slice(1, 0, d_m), st.slice(1, d_m), masks[k], scale[k], clamp[k], inverse);
    if (save) {
      if (k > 0) saved.push_back(x);
      saved.insert(saved.end(), {h1, h2, st});
    }
    if (k == 0) logdet = ld;
    else logdet.add_(ld);
    x = y;
  }
  return {x, logdet, saved};
}

// The gradients flagged in `need` (1 + 6K flags: x, then each coupling's W1, b1, W2, b2, W3, b3), in
// that order, from dL/dy and dL/dlogdet.
Tensors realnvp_backward(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x_in,
                         at::TensorList saved, at::TensorList params, at::TensorList masks, at::IntArrayRef cond,
                         at::IntArrayRef scale, at::ArrayRef<double> clamp, bool inverse,
                         const c10::List<bool>& need_in) {
  const int64_t K = couplings("realnvp_backward", params, masks, cond, scale, clamp);
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 4 * K - 1, "xlt_fast_C::realnvp_backward: saved must hold "
              "realnvp_forward's ", 4 * K - 1, " saved tensors, got ", saved.size());
  const std::vector<bool> need = need_in.vec();
  TORCH_CHECK(static_cast<int64_t>(need.size()) == 1 + 6 * K, "xlt_fast_C::realnvp_backward: need must hold ",
              1 + 6 * K, " flags (x and 6 parameters per coupling), got ", need.size());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensors grads(1 + 6 * K);
  at::Tensor gy = grad_y;
  for (int64_t k = K - 1; k >= 0; --k) {
    const at::Tensor& x = k == 0 ? x_in : saved[4 * k - 1];
    const at::Tensor &h1 = saved[4 * k], &h2 = saved[4 * k + 1], &st = saved[4 * k + 2];
    const at::Tensor* p = params.data() + 6 * k;
    const int64_t d_m = st.size(1) / 2;
    auto [gx, g3] = coupling_backward(gy, grad_logdet, x, st.slice(1, 0, d_m), st.slice(1, d_m), masks[k],
                                      scale[k], clamp[k], inverse);
    at::Tensor g2 = at::mm(g3, p[4]);
    at::threshold_backward_out(g2, g2, h2, 0);  // ReLU mask applied in place
    at::Tensor g1 = at::mm(g2, p[2]);
    at::threshold_backward_out(g1, g1, h1, 0);
    const at::Tensor x1 = conditioning(x, cond, k);
    if (k > 0 || need[0]) conditioning(gx, cond, k).addmm_(g1, p[0]);
    const auto layer = [&](int64_t l, const at::Tensor& g, const at::Tensor& h) {  // dW_l, db_l
      const int64_t i = 1 + 6 * k + 2 * l;
      if (need[i]) grads[i] = at::mm(g.t(), h);
      if (need[i + 1]) grads[i + 1] = at::sum(g, at::IntArrayRef{0});
    };
    layer(0, g1, x1);
    layer(1, g2, h1);
    layer(2, g3, h2);
    gy = gx;
  }
  if (need[0]) grads[0] = gy;
  Tensors out;
  for (size_t i = 0; i < grads.size(); ++i)
    if (need[i]) out.push_back(std::move(grads[i]));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("realnvp_forward(Tensor x, Tensor[] params, Tensor[] masks, int[] cond, int[] scale, float[] clamp,"
        " bool inverse, bool save) -> (Tensor, Tensor, Tensor[])");
  m.def("realnvp_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor[] saved, Tensor[] params,"
        " Tensor[] masks, int[] cond, int[] scale, float[] clamp, bool inverse, bool[] need) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("realnvp_forward", &realnvp_forward);
  m.impl("realnvp_backward", &realnvp_backward);
}

#ifdef XLT_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(xlt_fast_C, CUDA, m) {
  m.impl("realnvp_forward", &realnvp_forward);
  m.impl("realnvp_backward", &realnvp_backward);
}
#endif

}  // namespace xlt_fast
