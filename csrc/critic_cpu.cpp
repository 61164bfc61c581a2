// Fused stages of the Wasserstein critic + zero-centred gradient penalty on the CPU
// (xlt_fast/ops/critic.py orchestrates them around ATen GEMMs; math in its docstring).
//
// Notation: N = n + m rows (source then target), K = min(n, m) interpolated rows, H hidden units,
// k classes (k = 1 without CDAN). y = Z W1v^T is (N, H*k) with y[r, j*k + c] = W1[j, c, :] . z_r,
// so the pre-activation is h_rj = b1_j + sum_c p_rc y[r, j*k + c] (h_rj = b1_j + y_rj without CDAN).
// Sums run in at::acc_type (double for float inputs).
// fast_exp.h first: its no-trapping-math pragma lets the ReLU selects (h > 0 ? h : 0, the masks)
// vectorise; with trapping math they are branches, mispredicted half the time on ReLU signs (the row
// stages ran 10-20x slower than an elementwise torch op).
#include "fast_exp.h"
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

// Compiled once, out of line: inlined into the parallel_for lambdas, GCC kept one of the copies a
// scalar loop with a branch per entry.
#define XLT_ROW __attribute__((noinline))
// Row loops as functions of plain pointer arguments: a pointer captured by reference in a lambda
// is reloaded after every store (the extension builds with -fno-strict-aliasing, as Python's flags
// say), which kept these loops scalar.
template <typename T>
XLT_ROW void preact_row(const T* y, const T* b1, T* h, int64_t H) {  // h may be y (same index)
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) h[j] = b1[j] + y[j];
}

template <typename T>
XLT_ROW acc_type<T, false> relu_dot(const T* __restrict h, const T* __restrict w2, int64_t H) {
  acc_type<T, false> acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) acc += static_cast<acc_type<T, false>>(w2[j]) * (h[j] > 0 ? h[j] : T(0));
  return acc;
}

template <typename T>
XLT_ROW void mix_row(const T* __restrict hs, const T* __restrict ht, T a, T b, const T* __restrict w2,
                    T* __restrict mask, T* __restrict u, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T on = static_cast<T>(a * hs[j] + b * ht[j] > 0);  // 0 or 1, no branch
    mask[j] = on;
    u[j] = on * w2[j];  // w2 is finite (checked): +-0 where off
  }
}

template <typename T>
XLT_ROW void e_row(const T* __restrict h, const T* __restrict w2, T c, T* __restrict e, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) e[j] = static_cast<T>(h[j] > 0) * (c * w2[j]);  // no branch
}

template <typename T, typename A>
XLT_ROW void colsum_row(const T* __restrict h, A c, A* __restrict sb, A* __restrict sw, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {  // branch-free (0/1 factor, h finite): vectorises
    const A on = static_cast<A>(h[j] > 0) * c;
    sb[j] += on;
    sw[j] += on * h[j];
  }
}

template <typename T>
XLT_ROW acc_type<T, false> sq_norm(const T* __restrict g, int64_t D) {
  acc_type<T, false> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t x = 0; x < D; ++x) s += static_cast<acc_type<T, false>>(g[x]) * g[x];
  return s;
}

// g += sw t; returns W1_j . t (the epilogue's row j).
template <typename T>
XLT_ROW acc_type<T, false> epilogue_row(T* __restrict g, const T* __restrict t, const T* __restrict w, T sw,
                                       int64_t D) {
#pragma omp simd
  for (int64_t x = 0; x < D; ++x) g[x] += sw * t[x];
  acc_type<T, false> dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t x = 0; x < D; ++x) dot += static_cast<acc_type<T, false>>(w[x]) * t[x];
  return dot;
}

template <typename scalar_t>
void rows_fwd(const scalar_t* y, const scalar_t* p, const scalar_t* b1, const scalar_t* w2, scalar_t b2,
              const scalar_t* coef, const scalar_t* alpha, int64_t N, int64_t n_src, int64_t K, int64_t H,
              int64_t k, scalar_t* f, scalar_t* h, scalar_t* mask_mix, scalar_t* u_mix, scalar_t* estimate) {
  using acc_t = acc_type<scalar_t, false>;
  const int64_t Hk = H * k;
  // Rows 0..N-1: pre-activations and critic values (h may be y itself when k == 1: entry j is
  // read before it is written).
  at::parallel_for(0, N, grain(Hk), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* yr = y + r * Hk;
      const scalar_t* pr = p ? p + r * k : nullptr;
      scalar_t* hr = h + r * H;
      if (pr == nullptr) {
        preact_row(yr, b1, hr, H);
      } else {
        for (int64_t j = 0; j < H; ++j) hr[j] = preact(yr, pr, j, k, b1[j]);
      }
      f[r] = static_cast<scalar_t>(relu_dot(hr, w2, H)) + b2;
    }
  });
  // Interpolated points: x~ = a x_s + (1 - a) x_t (x = p (x) z with CDAN) enters W1 linearly, so
  // its pre-activation is a h_s + (1 - a) h_t, from the two rows' h (the same values preact gives).
  at::parallel_for(0, K, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t a = alpha[i], b = 1 - alpha[i];
      const scalar_t* hs = h + i * H;
      const scalar_t* ht = h + (n_src + i) * H;
      mix_row(hs, ht, a, b, w2, mask_mix + i * H, u_mix + i * H, H);
    }
  });
  acc_t est = 0;
  for (int64_t r = 0; r < N; ++r) est += static_cast<acc_t>(coef[r]) * f[r];
  *estimate = static_cast<scalar_t>(est);
}

// h_out / u_out: caller-owned buffers of shape (N, H) and (K, H) to write h and u_mix into (h_out
// may be y itself when k == 1: each entry is read before it is written); absent, fresh ones.
std::vector<at::Tensor> rows_fwd_impl(const at::Tensor& y_in, const c10::optional<at::Tensor>& p_in,
                                      const at::Tensor& b1_in, const at::Tensor& w2_in, const at::Tensor& b2_in,
                                      const at::Tensor& coef_in, const at::Tensor& alpha_in, int64_t n_src,
                                      const c10::optional<at::Tensor>& h_out,
                                      const c10::optional<at::Tensor>& u_out) {
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
  auto out_or_new = [&](const c10::optional<at::Tensor>& o, int64_t rows, const char* name) {
    if (!o.has_value()) return at::empty({rows, H}, opts);
    TORCH_CHECK(o->scalar_type() == y.scalar_type() && o->is_contiguous() && o->dim() == 2 && o->size(0) == rows &&
                o->size(1) == H, name, " must be a contiguous (", rows, ", ", H, ") tensor of y's dtype");
    return *o;
  };
  TORCH_CHECK(!h_out.has_value() || k == 1 || !h_out->is_same(y), "h may alias y only when k == 1");
  at::Tensor estimate = at::empty({}, opts), f = at::empty({N}, opts), h = out_or_new(h_out, N, "h");
  at::Tensor mask_mix = at::empty({K, H}, opts), u_mix = out_or_new(u_out, K, "u_mix");
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "critic_rows_fwd_cpu", [&] {
    rows_fwd<scalar_t>(y.data_ptr<scalar_t>(), p.defined() ? p.data_ptr<scalar_t>() : nullptr,
                       b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), b2_in.item<scalar_t>(),
                       coef.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), N, n_src, K, H, k,
                       f.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), mask_mix.data_ptr<scalar_t>(),
                       u_mix.data_ptr<scalar_t>(), estimate.data_ptr<scalar_t>());
  });
  return {estimate, f, h, mask_mix, u_mix};
}

std::vector<at::Tensor> critic_rows_fwd_cpu(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                            const at::Tensor& coef, const at::Tensor& alpha, int64_t n_src) {
  return rows_fwd_impl(y, p, b1, w2, b2, coef, alpha, n_src, c10::nullopt, c10::nullopt);
}

std::vector<at::Tensor> critic_rows_fwd_out_cpu(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                const at::Tensor& coef, const at::Tensor& alpha, int64_t n_src,
                                                at::Tensor& h, at::Tensor& u_mix) {
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous when h is written into a buffer");
  return rows_fwd_impl(y, p, b1, w2, b2, coef, alpha, n_src, h, u_mix);
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
        norms[i] = sq_norm(gp + i * D, D);
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
// e_out: a caller-owned contiguous (N, H*k) buffer for e (absent: a fresh one).
std::vector<at::Tensor> rows_bwd_impl(const at::Tensor& h_in, const c10::optional<at::Tensor>& p_in,
                                      const at::Tensor& w2_in, const at::Tensor& coef_in,
                                      const c10::optional<at::Tensor>& e_out) {
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
  at::Tensor e = e_out.has_value() ? *e_out : at::empty({N, H * k}, h.options());
  TORCH_CHECK(e.scalar_type() == h.scalar_type() && e.is_contiguous() && e.dim() == 2 && e.size(0) == N &&
              e.size(1) == H * k, "e must be a contiguous (", N, ", ", H * k, ") tensor of h's dtype");
  at::Tensor gb1 = at::empty({H}, h.options()), gw2 = at::empty({H}, h.options());
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
          e_row(hr, w2p, cr, er, H);
        } else {
          const scalar_t* pr = pp + r * k;
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t d = static_cast<scalar_t>(hr[j] > 0) * (cr * w2p[j]);
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
        colsum_row(hr + begin, c, sb.data(), sw.data(), end - begin);
      }
      for (int64_t j = begin; j < end; ++j) {
        gb1p[j] = static_cast<scalar_t>(sb[j - begin] * w2p[j]);
        gw2p[j] = static_cast<scalar_t>(sw[j - begin]);
      }
    });
  });
  return {e, gb1, gw2};
}

std::vector<at::Tensor> critic_rows_bwd_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& p,
                                            const at::Tensor& w2, const at::Tensor& coef) {
  return rows_bwd_impl(h, p, w2, coef, c10::nullopt);
}

std::vector<at::Tensor> critic_rows_bwd_out_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& p,
                                                const at::Tensor& w2, const at::Tensor& coef, at::Tensor& e) {
  auto r = rows_bwd_impl(h, p, w2, coef, e);
  return {r[1], r[2]};
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
        const acc_t dot = epilogue_row(gp + j * D, tp + j * D, w1p + j * D, static_cast<scalar_t>(scale * w2p[j]), D);
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
  // CPU only: the same stages writing into caller-owned buffers (xlt_fast/ops/critic.py reuses them
  // across calls: a fresh multi-MiB buffer costs a page fault per 4 KiB on first touch).
  m.def("critic_rows_fwd_out(Tensor y, Tensor? p, Tensor b1, Tensor w2, Tensor b2, Tensor coef, Tensor alpha, "
        "int n_src, Tensor(a!) h, Tensor(b!) u_mix) -> Tensor[]");
  m.def("critic_rows_bwd_out(Tensor h, Tensor? p, Tensor w2, Tensor coef, Tensor(a!) e) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("critic_rows_fwd", &critic_rows_fwd_cpu);
  m.impl("critic_penalty", &critic_penalty_cpu);
  m.impl("critic_rows_bwd", &critic_rows_bwd_cpu);
  m.impl("critic_gp_epilogue", &critic_gp_epilogue_cpu);
  m.impl("critic_rows_fwd_out", &critic_rows_fwd_out_cpu);
  m.impl("critic_rows_bwd_out", &critic_rows_bwd_out_cpu);
}

}  // namespace xlt_fast
