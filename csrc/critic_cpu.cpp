// Fused stages of the Wasserstein critic + zero-centred gradient penalty on the CPU
// (xlt_fast/ops/critic.py orchestrates them around ATen GEMMs; math in its docstring).
//
// Notation: N = n + m rows (source then target), K = min(n, m) interpolated rows, H hidden units,
// k classes (k = 1 without CDAN). y = Z W1v^T is (N, H*k) with y[r, j*k + c] = W1[j, c, :] . z_r,
// so the pre-activation is h_rj = b1_j + sum_c p_rc y[r, j*k + c] (h_rj = b1_j + y_rj without CDAN).
// Sums run in at::acc_type (double for float inputs).
#include "common.h"

#include <ATen/AccumulateType.h>

#include <algorithm>
#include <vector>

namespace xlt_fast {
namespace {

using at::acc_type;

// Grain (items per task) so that a task touches at least kMinWork entries: small stages run inline
// instead of paying a parallel region's wake-up (costly when the cores are shared).
constexpr int64_t kMinWork = int64_t(1) << 18;
inline int64_t grain(int64_t entries_per_item) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, entries_per_item));
}

// h_j = b1_j + sum_c p_c y[j*k + c] for one row (p == nullptr: k == 1, no weighting).
template <typename scalar_t>
inline scalar_t preact(const scalar_t* y, const scalar_t* p, int64_t j, int64_t k, scalar_t b1j) {
  if (p == nullptr) return b1j + y[j];
  acc_type<scalar_t, false> s = 0;
  for (int64_t c = 0; c < k; ++c) s += static_cast<acc_type<scalar_t, false>>(p[c]) * y[j * k + c];
  return b1j + static_cast<scalar_t>(s);
}

template <typename scalar_t>
void rows_fwd(const scalar_t* y, const scalar_t* p, const scalar_t* b1, const scalar_t* w2, scalar_t b2,
              const scalar_t* coef, const scalar_t* alpha, int64_t N, int64_t n_src, int64_t K, int64_t H,
              int64_t k, scalar_t* f, scalar_t* h, scalar_t* mask_mix, scalar_t* u_mix, scalar_t* estimate) {
  using acc_t = acc_type<scalar_t, false>;
  const int64_t Hk = H * k;
  // Rows 0..N-1: pre-activations and critic values; rows N..N+K-1: interpolated points.
  at::parallel_for(0, N + K, grain(Hk), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r < N) {
        const scalar_t* yr = y + r * Hk;
        const scalar_t* pr = p ? p + r * k : nullptr;
        scalar_t* hr = h + r * H;
        if (pr == nullptr) {
          for (int64_t j = 0; j < H; ++j) hr[j] = b1[j] + yr[j];
        } else {
          for (int64_t j = 0; j < H; ++j) hr[j] = preact(yr, pr, j, k, b1[j]);
        }
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < H; ++j) acc += static_cast<acc_t>(w2[j]) * (hr[j] > 0 ? hr[j] : scalar_t(0));
        f[r] = static_cast<scalar_t>(acc) + b2;
      } else {
        // x~ = a x_s + (1 - a) x_t (x = p (x) z with CDAN) enters W1 linearly, so its pre-activation
        // is a h_s + (1 - a) h_t, formed from y and p of the two rows.
        const int64_t i = r - N;
        const scalar_t a = alpha[i], b = 1 - alpha[i];
        const scalar_t* ys = y + i * Hk;
        const scalar_t* yt = y + (n_src + i) * Hk;
        const scalar_t* ps = p ? p + i * k : nullptr;
        const scalar_t* pt = p ? p + (n_src + i) * k : nullptr;
        scalar_t* mr = mask_mix + i * H;
        scalar_t* ur = u_mix + i * H;
        for (int64_t j = 0; j < H; ++j) {
          const bool on = a * preact(ys, ps, j, k, b1[j]) + b * preact(yt, pt, j, k, b1[j]) > 0;
          mr[j] = on ? scalar_t(1) : scalar_t(0);
          ur[j] = on ? w2[j] : scalar_t(0);
        }
      }
    }
  });
  acc_t est = 0;
  for (int64_t r = 0; r < N; ++r) est += static_cast<acc_t>(coef[r]) * f[r];
  *estimate = static_cast<scalar_t>(est);
}

std::vector<at::Tensor> critic_rows_fwd_cpu(const at::Tensor& y_in, const c10::optional<at::Tensor>& p_in,
                                            const at::Tensor& b1_in, const at::Tensor& w2_in,
                                            const at::Tensor& b2_in, const at::Tensor& coef_in,
                                            const at::Tensor& alpha_in, int64_t n_src) {
  check_cpu_float(y_in, "y");
  check_dim(y_in, 2, "y");
  const at::Tensor y = y_in.contiguous();
  const auto opts = y.options();
  const int64_t N = y.size(0), H = b1_in.numel(), K = alpha_in.numel();
  TORCH_CHECK(H > 0 && y.size(1) % H == 0, "y must have H*k columns for b1 of size H");
  const int64_t k = y.size(1) / H;
  TORCH_CHECK(p_in.has_value() || k == 1, "p is required when y has H*k columns with k > 1");
  TORCH_CHECK(coef_in.numel() == N, "coef must have one entry per row of y");
  TORCH_CHECK(n_src >= K && N - n_src >= K, "alpha must have at most min(n, m) entries");
  at::Tensor p;
  if (p_in.has_value()) {
    p = p_in->to(y.scalar_type()).contiguous();
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N && p.size(1) == k, "p must have shape (N, k)");
  }
  const at::Tensor b1 = b1_in.to(y.scalar_type()).contiguous(), w2 = w2_in.to(y.scalar_type()).contiguous();
  const at::Tensor coef = coef_in.to(y.scalar_type()).contiguous(), alpha = alpha_in.to(y.scalar_type()).contiguous();
  at::Tensor estimate = at::empty({}, opts), f = at::empty({N}, opts), h = at::empty({N, H}, opts);
  at::Tensor mask_mix = at::empty({K, H}, opts), u_mix = at::empty({K, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "critic_rows_fwd_cpu", [&] {
    rows_fwd<scalar_t>(y.data_ptr<scalar_t>(), p.defined() ? p.data_ptr<scalar_t>() : nullptr,
                       b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), b2_in.item<scalar_t>(),
                       coef.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), N, n_src, K, H, k,
                       f.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), mask_mix.data_ptr<scalar_t>(),
                       u_mix.data_ptr<scalar_t>(), estimate.data_ptr<scalar_t>());
  });
  return {estimate, f, h, mask_mix, u_mix};
}

// mean_i |g_i|^2: per-row squared norms, then their mean.
at::Tensor critic_penalty_cpu(const at::Tensor& g_in) {
  check_cpu_float(g_in, "g");
  check_dim(g_in, 2, "g");
  const at::Tensor g = g_in.contiguous();
  const int64_t K = g.size(0), D = g.size(1);
  at::Tensor out = at::empty({}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "critic_penalty_cpu", [&] {
    using acc_t = acc_type<scalar_t, false>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    std::vector<acc_t> norms(K);
    at::parallel_for(0, K, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
        for (int64_t x = 0; x < D; ++x) s += static_cast<acc_t>(gp[i * D + x]) * gp[i * D + x];
        norms[i] = s;
      }
    });
    acc_t total = 0;
    for (int64_t i = 0; i < K; ++i) total += norms[i];
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(total / static_cast<acc_t>(K));
  });
  return out;
}

// Estimate backward: e[r, j*k + c] = coef_r 1[h_rj > 0] w2_j p_rc (the GEMM operand of dW1 and dz),
// grad_b1_j = sum_r coef_r 1[h_rj > 0] w2_j, grad_w2_j = sum_r coef_r relu(h_rj).
std::vector<at::Tensor> critic_rows_bwd_cpu(const at::Tensor& h_in, const c10::optional<at::Tensor>& p_in,
                                            const at::Tensor& w2_in, const at::Tensor& coef_in) {
  check_cpu_float(h_in, "h");
  check_dim(h_in, 2, "h");
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0), H = h.size(1);
  at::Tensor p;
  int64_t k = 1;
  if (p_in.has_value()) {
    p = p_in->to(h.scalar_type()).contiguous();
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N, "p must have shape (N, k)");
    k = p.size(1);
  }
  TORCH_CHECK(w2_in.numel() == H && coef_in.numel() == N, "w2 must have H entries and coef N entries");
  const at::Tensor w2 = w2_in.to(h.scalar_type()).contiguous(), coef = coef_in.to(h.scalar_type()).contiguous();
  at::Tensor e = at::empty({N, H * k}, h.options()), gb1 = at::empty({H}, h.options()), gw2 = at::empty({H}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "critic_rows_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t, false>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *w2p = w2.data_ptr<scalar_t>(), *cp = coef.data_ptr<scalar_t>();
    const scalar_t* pp = p.defined() ? p.data_ptr<scalar_t>() : nullptr;
    scalar_t* ep = e.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(H * k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* hr = hp + r * H;
        scalar_t* er = ep + r * H * k;
        const scalar_t cr = cp[r];
        if (pp == nullptr) {
          for (int64_t j = 0; j < H; ++j) er[j] = hr[j] > 0 ? cr * w2p[j] : scalar_t(0);
        } else {
          const scalar_t* pr = pp + r * k;
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t d = hr[j] > 0 ? cr * w2p[j] : scalar_t(0);
            for (int64_t c = 0; c < k; ++c) er[j * k + c] = d * pr[c];
          }
        }
      }
    });
    // Column sums: each task owns a block of columns and reads the rows' contiguous slices.
    scalar_t *gb1p = gb1.data_ptr<scalar_t>(), *gw2p = gw2.data_ptr<scalar_t>();
    at::parallel_for(0, H, std::max<int64_t>(64, grain(N)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sb(end - begin, 0), sw(end - begin, 0);
      for (int64_t r = 0; r < N; ++r) {
        const scalar_t* hr = hp + r * H;
        const acc_t c = cp[r];
        acc_t* sbp = sb.data() - begin;
        acc_t* swp = sw.data() - begin;
        for (int64_t j = begin; j < end; ++j) {  // branch-free: vectorises
          const bool on = hr[j] > 0;
          sbp[j] += on ? c : acc_t(0);
          swp[j] += on ? c * hr[j] : acc_t(0);
        }
      }
      for (int64_t j = begin; j < end; ++j) {
        gb1p[j] = static_cast<scalar_t>(sb[j - begin] * w2p[j]);
        gw2p[j] = static_cast<scalar_t>(sw[j - begin]);
      }
    });
  });
  return {e, gb1, gw2};
}

// Penalty epilogue with t = M~^T G (H, k*d), t_j = sum_i m_ij g_i: grad_w1_j += scale w2_j t_j (in
// place) and returns grad_w2_j = scale (W1_j . t_j) = scale sum_i m_ij (W1 g_i)_j.
at::Tensor critic_gp_epilogue_cpu(at::Tensor& grad_w1, const at::Tensor& t_in, const at::Tensor& w1_in,
                                  const at::Tensor& w2_in, const at::Tensor& scale_in) {
  check_cpu_float(grad_w1, "grad_w1");
  check_dim(grad_w1, 2, "grad_w1");
  TORCH_CHECK(grad_w1.is_contiguous(), "grad_w1 must be contiguous");
  TORCH_CHECK(t_in.sizes() == grad_w1.sizes() && w1_in.sizes() == grad_w1.sizes(),
              "t and w1 must have the shape of grad_w1 (H, k*d)");
  const auto st = grad_w1.scalar_type();
  const at::Tensor t = t_in.to(st).contiguous(), w1 = w1_in.to(st).contiguous(), w2 = w2_in.to(st).contiguous();
  const int64_t H = grad_w1.size(0), D = grad_w1.size(1);
  TORCH_CHECK(w2.numel() == H && scale_in.numel() == 1, "w2 must have H entries and scale one");
  at::Tensor gw2 = at::empty({H}, grad_w1.options());
  AT_DISPATCH_FLOATING_TYPES(st, "critic_gp_epilogue_cpu", [&] {
    using acc_t = acc_type<scalar_t, false>;
    const scalar_t *tp = t.data_ptr<scalar_t>(), *w1p = w1.data_ptr<scalar_t>(), *w2p = w2.data_ptr<scalar_t>();
    scalar_t *gp = grad_w1.data_ptr<scalar_t>(), *outp = gw2.data_ptr<scalar_t>();
    const scalar_t scale = scale_in.item<scalar_t>();
    at::parallel_for(0, H, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t sw = scale * w2p[j];
        const scalar_t *tj = tp + j * D, *wj = w1p + j * D;
        scalar_t* gj = gp + j * D;
        for (int64_t x = 0; x < D; ++x) gj[x] += sw * tj[x];
        acc_t dot = 0;
_Pragma("omp simd reduction(+ : dot)")
        for (int64_t x = 0; x < D; ++x) dot += static_cast<acc_t>(wj[x]) * tj[x];
        outp[j] = static_cast<scalar_t>(scale * dot);
      }
    });
  });
  return gw2;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("critic_rows_fwd(Tensor y, Tensor? p, Tensor b1, Tensor w2, Tensor b2, Tensor coef, Tensor alpha, "
        "int n_src) -> Tensor[]");
  m.def("critic_penalty(Tensor g) -> Tensor");
  m.def("critic_rows_bwd(Tensor h, Tensor? p, Tensor w2, Tensor coef) -> Tensor[]");
  m.def("critic_gp_epilogue(Tensor(a!) grad_w1, Tensor t, Tensor w1, Tensor w2, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("critic_rows_fwd", &critic_rows_fwd_cpu);
  m.impl("critic_penalty", &critic_penalty_cpu);
  m.impl("critic_rows_bwd", &critic_rows_bwd_cpu);
  m.impl("critic_gp_epilogue", &critic_gp_epilogue_cpu);
}

}  // namespace xlt_fast
