// Batched log-domain Sinkhorn loop on the CPU: one task per problem (at::parallel_for over the
// batch), the problem's cost block and potentials copied into a thread-local buffer that stays in
// cache through all iterations.
//
// Symmetric updates with the softmin  softmin_eps(C, h)_i = -eps log sum_j exp(h_j - C_ij / eps):
//   ft = softmin_eps(C, log b + g / eps),  gt = softmin_eps(C^T, log a + f / eps),
//   f <- (f + ft) / 2,  g <- (g + gt) / 2
// (Feydy's thesis Alg. 3.5, GeomLoss `sinkhorn_loop`), eps of step t: exp(log_eps0 + max(t-1, 0)
// log_ratio) for the n_anneal annealing steps, then up to n_iters steps at eps (early exit once the
// L1 marginal violation sum_i a_i |1 - exp((f_i - ft_i)/eps)| + sum_j b_j |...| < tol, tol > 0),
// then one extrapolation from the previous potentials: f' = softmin(C, log b + g/eps), g' likewise.
// `symmetric` (C = C^T, a = b: the debiasing problems OT(a, a)) keeps g = f and skips the column
// pass. Padded points have log weight -inf; only the leading block up to the last real point is
// touched. A problem without a real point on a side returns zeros and 0 iterations.
#include "fast_exp.h"  // first: its pragma applies to the whole file
#include "common.h"

#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <limits>
#include <vector>

namespace xlt_fast {
namespace {

// The two hot row loops: tmp_j = h_j - c_j * inv with its maximum, and tmp_j <- exp(tmp_j - mx)
// with its sum. float versions exist for AVX2+FMA (chosen at run time when the CPU has it; the exp
// written with intrinsics, the same polynomial as exp_f32 in fast_exp.h) and for the baseline ISA, so the
// build needs no -march flag.
#define XLT_SINKHORN_ROW_MAX(SUFFIX, ATTR)                                                      \
  ATTR float row_max##SUFFIX(const float* h, const float* c, float inv, float* tmp, int64_t len) { \
    float mx = -std::numeric_limits<float>::infinity();                                        \
    _Pragma("omp simd reduction(max : mx)") for (int64_t j = 0; j < len; ++j) {                \
      tmp[j] = h[j] - c[j] * inv;                                                              \
      mx = tmp[j] > mx ? tmp[j] : mx;                                                          \
    }                                                                                          \
    return mx;                                                                                 \
  }

XLT_SINKHORN_ROW_MAX(_avx2, __attribute__((target("avx2,fma"))))
XLT_SINKHORN_ROW_MAX(_base, )

float row_expsum_base(float* tmp, float mx, int64_t len) {
  float s = 0;
  for (int64_t j = 0; j < len; ++j) {
    tmp[j] = exp_any(tmp[j] - mx);
    s += tmp[j];
  }
  return s;
}

__attribute__((target("avx2,fma"))) float row_expsum_avx2(float* tmp, float mx, int64_t len) {
  const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-87.0f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(2.12194440e-4f);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 xin = _mm256_sub_ps(_mm256_loadu_ps(tmp + j), vmx);
    const __m256 x = _mm256_max_ps(xin, lo);
    const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(x, log2e, magic), magic);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, x);
    r = _mm256_fmadd_ps(k, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 v = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    v = _mm256_and_ps(v, _mm256_cmp_ps(xin, lo, _CMP_GE_OQ));  // exactly 0 below -87
    _mm256_storeu_ps(tmp + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  for (; j < len; ++j) {
    tmp[j] = exp_any(tmp[j] - mx);
    s += tmp[j];
  }
  return s;
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

inline float row_max(const float* h, const float* c, float inv, float* tmp, int64_t len) {
  return has_avx2() ? row_max_avx2(h, c, inv, tmp, len) : row_max_base(h, c, inv, tmp, len);
}

inline float row_expsum(float* tmp, float mx, int64_t len) {
  return has_avx2() ? row_expsum_avx2(tmp, mx, len) : row_expsum_base(tmp, mx, len);
}

inline double row_max(const double* h, const double* c, double inv, double* tmp, int64_t len) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    tmp[j] = h[j] - c[j] * inv;
    mx = tmp[j] > mx ? tmp[j] : mx;
  }
  return mx;
}

inline double row_expsum(double* tmp, double mx, int64_t len) {
  double s = 0;
  for (int64_t j = 0; j < len; ++j) {
    tmp[j] = std::exp(tmp[j] - mx);
    s += tmp[j];
  }
  return s;
}

// out_i = -eps log sum_j exp(h_j - C_ij / eps) over rows of the row-major (rows, cols) block C with
// leading dimension ld; out_i = 0 when every h_j is -inf. tmp: scratch of size cols.
template <typename T>
void softmin(const T* C, int64_t ld, int64_t rows, int64_t cols, const T* h, T eps, T* out, T* tmp) {
  const T inv = T(1) / eps;
  for (int64_t i = 0; i < rows; ++i) {
    const T mx = row_max(h, C + i * ld, inv, tmp, cols);
    out[i] = mx > -std::numeric_limits<T>::infinity() ? -eps * (mx + std::log(row_expsum(tmp, mx, cols))) : T(0);
  }
}

// The stopping rule's violation over real points (w_i = exp(logw_i)), in double with expm1 (no
// cancellation in 1 - exp(x) at small x; xlt_fast.reference.sinkhorn.stop_error computes the same
// numbers, so the reported violation and this test agree): sum_i w_i |expm1((p_i - pt_i) / eps)|
// (l2 = false), or sum_i (w_i expm1(...))^2 (l2 = true, the square of POT's L2 norm).
template <typename T>
double marginal_error(const T* logw, const T* p, const T* pt, int64_t len, double eps, bool l2) {
  double err = 0;
  for (int64_t i = 0; i < len; ++i) {
    if (!(logw[i] > -std::numeric_limits<T>::infinity())) continue;
    const double v = std::exp(static_cast<double>(logw[i])) *
                     std::abs(std::expm1((static_cast<double>(p[i]) - static_cast<double>(pt[i])) / eps));
    err += l2 ? v * v : v;
  }
  return err;
}

// One past the last real point (log weight > -inf).
template <typename T>
int64_t extent(const T* logw, int64_t len) {
  int64_t e = len;
  while (e > 0 && !(logw[e - 1] > -std::numeric_limits<T>::infinity())) --e;
  return e;
}

template <typename T>
void solve_problems(const T* Cg, const T* la, const T* lb, const double* log_eps0, const int32_t* n_anneal,
                    double log_ratio, double eps_t, int64_t n_iters, double tol, bool symmetric, int64_t rule, int64_t B,
                    int64_t n, int64_t m, T* fp_out, T* gp_out, T* f_out, T* g_out, int32_t* it_out) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    for (int64_t b = begin; b < end; ++b) {
      const T* loga = la + b * n;
      const T* logb = lb + b * m;
      T* fp = fp_out + b * n;
      T* gp = gp_out + b * m;
      T* fo = f_out + b * n;
      T* go = g_out + b * m;
      std::fill(fp, fp + n, T(0));
      std::fill(gp, gp + m, T(0));
      std::fill(fo, fo + n, T(0));
      std::fill(go, go + m, T(0));
      it_out[b] = 0;
      const int64_t ne = extent(loga, n), me = extent(logb, m);
      if (ne == 0 || me == 0) continue;
      // cache-resident copies: C (ne, me) and, for the column pass, C^T (me, ne)
      buf.assign(static_cast<size_t>(ne * me * (symmetric ? 1 : 2) + 6 * std::max(ne, me)), T(0));
      T* C = buf.data();
      T* CT = C + ne * me;
      const T* src = Cg + b * n * m;
      for (int64_t i = 0; i < ne; ++i)
        for (int64_t j = 0; j < me; ++j) C[i * me + j] = src[i * m + j];
      if (!symmetric)
        for (int64_t j = 0; j < me; ++j)
          for (int64_t i = 0; i < ne; ++i) CT[j * ne + i] = src[i * m + j];
      const int64_t L = std::max(ne, me);
      T* f = buf.data() + ne * me * (symmetric ? 1 : 2);
      T* g = f + L;
      T* ft = g + L;
      T* gt = ft + L;
      T* h = gt + L;
      T* tmp = h + L;
      const T* Ccol = symmetric ? C : CT;

      T e = static_cast<T>(std::exp(log_eps0[b]));
      softmin(C, me, ne, me, logb, e, f, tmp);
      if (symmetric) std::copy(f, f + ne, g);
      else softmin(Ccol, ne, me, ne, loga, e, g, tmp);

      const int64_t na = n_anneal[b];
      const int64_t total = na + n_iters;
      int32_t iters = 0;
      const bool alternate = rule & 1, l2 = rule & 2;
      const double tol2 = tol * tol;
      for (int64_t t = 0; t < total; ++t) {
        e = t < na ? static_cast<T>(std::exp(log_eps0[b] + static_cast<double>(std::max<int64_t>(t - 1, 0)) * log_ratio))
                   : static_cast<T>(eps_t);
        const T inv = T(1) / e;
        for (int64_t j = 0; j < me; ++j) h[j] = logb[j] + g[j] * inv;
        softmin(C, me, ne, me, h, e, ft, tmp);
        if (alternate) {
          // Gauss-Seidel (POT): f <- softmin(C, log b + g/eps), then g <- softmin(C^T, log a + f/eps).
          // After a g update at the target eps the columns of the plan of (f, g) are exact, so the
          // row pass above gives its whole violation: test it once the previous update ran at eps.
          if (tol > 0 && t > na) {
            const double err = marginal_error(loga, f, ft, ne, eps_t, l2);
            if (l2 ? err < tol2 : err < tol) break;
          }
          std::copy(ft, ft + ne, f);
          for (int64_t i = 0; i < ne; ++i) h[i] = loga[i] + f[i] * inv;
          softmin(Ccol, ne, me, ne, h, e, g, tmp);
          ++iters;
          continue;
        }
        if (!symmetric) {
          for (int64_t i = 0; i < ne; ++i) h[i] = loga[i] + f[i] * inv;
          softmin(Ccol, ne, me, ne, h, e, gt, tmp);
        }
        if (tol > 0 && t >= na) {
          double err = marginal_error(loga, f, ft, ne, eps_t, false);
          err += symmetric ? err : marginal_error(logb, g, gt, me, eps_t, false);
          if (err < tol) break;
        }
        for (int64_t i = 0; i < ne; ++i) f[i] = T(0.5) * (f[i] + ft[i]);
        if (symmetric) std::copy(f, f + ne, g);
        else
          for (int64_t j = 0; j < me; ++j) g[j] = T(0.5) * (g[j] + gt[j]);
        ++iters;
      }
      // last extrapolation at the target eps, from the previous potentials
      e = static_cast<T>(eps_t);
      const T inv = T(1) / e;
      for (int64_t j = 0; j < me; ++j) h[j] = logb[j] + g[j] * inv;
      softmin(C, me, ne, me, h, e, fo, tmp);
      if (symmetric) {
        std::copy(fo, fo + ne, go);
      } else {
        for (int64_t i = 0; i < ne; ++i) h[i] = loga[i] + f[i] * inv;
        softmin(Ccol, ne, me, ne, h, e, go, tmp);
      }
      std::copy(f, f + ne, fp);
      std::copy(g, g + me, gp);
      it_out[b] = iters;
    }
  });
}

std::vector<at::Tensor> sinkhorn_solve_cpu(const at::Tensor& C_in, const at::Tensor& loga_in,
                                           const at::Tensor& logb_in, const at::Tensor& log_eps0_in,
                                           const at::Tensor& n_anneal_in, double log_ratio, double eps,
                                           int64_t n_iters, double tol, bool symmetric, int64_t rule) {
  check_cpu_float(C_in, "C");
  check_dim(C_in, 3, "C");
  check_dim(loga_in, 2, "loga");
  check_dim(logb_in, 2, "logb");
  const int64_t B = C_in.size(0), n = C_in.size(1), m = C_in.size(2);
  TORCH_CHECK(loga_in.size(0) == B && loga_in.size(1) == n, "loga must have shape (B, n)");
  TORCH_CHECK(logb_in.size(0) == B && logb_in.size(1) == m, "logb must have shape (B, m)");
  TORCH_CHECK(log_eps0_in.numel() == B && n_anneal_in.numel() == B, "log_eps0 and n_anneal must have B entries");
  TORCH_CHECK(!symmetric || n == m, "a symmetric problem needs a square cost");
  TORCH_CHECK(eps > 0 && n_iters >= 1, "eps must be > 0 and n_iters >= 1");
  TORCH_CHECK(rule >= 0 && rule <= 3, "rule must be 0..3 (bit 0: alternate updates, bit 1: POT's L2 row test)");
  TORCH_CHECK(!(symmetric && (rule & 1)), "alternate updates have no symmetric (g = f) form");
  TORCH_CHECK((rule & 1) || !(rule & 2), "POT's L2 row test needs alternate updates (exact columns)");
  const at::Tensor C = C_in.contiguous();
  const at::Tensor loga = loga_in.to(C.scalar_type()).contiguous();
  const at::Tensor logb = logb_in.to(C.scalar_type()).contiguous();
  const at::Tensor log_eps0 = log_eps0_in.to(at::kDouble).contiguous();
  const at::Tensor n_anneal = n_anneal_in.to(at::kInt).contiguous();
  at::Tensor fp = at::empty({B, n}, C.options()), gp = at::empty({B, m}, C.options());
  at::Tensor f = at::empty({B, n}, C.options()), g = at::empty({B, m}, C.options());
  at::Tensor iters = at::empty({B}, C.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_solve_cpu", [&] {
    solve_problems<scalar_t>(C.data_ptr<scalar_t>(), loga.data_ptr<scalar_t>(), logb.data_ptr<scalar_t>(),
                             log_eps0.data_ptr<double>(), n_anneal.data_ptr<int32_t>(), log_ratio, eps, n_iters,
                             tol, symmetric, rule, B, n, m, fp.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(),
                             f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), iters.data_ptr<int32_t>());
  });
  return {fp, gp, f, g, iters};
}

// W_ij = w_i softmax_j(h_j - C_ij / eps) (cols = false, W (B, n, m)), or, over C's columns,
// W_ji = w_j softmax_i(h_i - C_ij / eps) (cols = true, W (B, m, n)): the one-sided plans of the
// envelope-theorem gradient. A row whose h is all -inf (no mass) gives 0.
template <typename T>
void plans(const T* Cg, const T* hg, const T* wg, T eps, bool cols, int64_t B, int64_t n, int64_t m, T* out) {
  const int64_t rows = cols ? m : n, len = cols ? n : m;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(static_cast<size_t>(len * (cols ? rows + 1 : 1)));
    const T inv = T(1) / eps;
    for (int64_t b = begin; b < end; ++b) {
      const T* src = Cg + b * n * m;
      const T* C = src;
      T* tmp = buf.data();
      if (cols) {
        T* CT = buf.data() + len;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < m; ++j) CT[j * n + i] = src[i * m + j];
        C = CT;
      }
      const T* h = hg + b * len;
      const T* w = wg + b * rows;
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + (b * rows + r) * len;
        const T mx = row_max(h, C + r * len, inv, tmp, len);
        if (!(mx > -std::numeric_limits<T>::infinity()) || w[r] == T(0)) {
          std::fill(o, o + len, T(0));
          continue;
        }
        const T scale = w[r] / row_expsum(tmp, mx, len);
        for (int64_t j = 0; j < len; ++j) o[j] = tmp[j] * scale;
      }
    }
  });
}

at::Tensor sinkhorn_plan_cpu(const at::Tensor& C_in, const at::Tensor& h_in, const at::Tensor& w_in, double eps,
                             bool cols) {
  check_cpu_float(C_in, "C");
  check_dim(C_in, 3, "C");
  const int64_t B = C_in.size(0), n = C_in.size(1), m = C_in.size(2);
  const int64_t rows = cols ? m : n, len = cols ? n : m;
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(0) == B && h_in.size(1) == len, "h must have shape (B, ", len, ")");
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == B && w_in.size(1) == rows, "w must have shape (B, ", rows, ")");
  TORCH_CHECK(eps > 0, "eps must be > 0");
  const at::Tensor C = C_in.contiguous();
  const at::Tensor h = h_in.to(C.scalar_type()).contiguous();
  const at::Tensor w = w_in.to(C.scalar_type()).contiguous();
  at::Tensor out = at::empty({B, rows, len}, C.options());
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_plan_cpu", [&] {
    plans<scalar_t>(C.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                    static_cast<scalar_t>(eps), cols, B, n, m, out.data_ptr<scalar_t>());
  });
  return out;
}

// sum of the real rows of src (rows x d) into acc (double), returning their count. Plain restrict
// pointers (captured ones are reloaded and keep a loop scalar); target_clones: AVX-512 / AVX2 code
// where the CPU has it (the build has no -march flag).
template <typename T>
XLT_CLONES int64_t add_rows(const T* __restrict src, const bool* __restrict real, int64_t rows, int64_t d,
                 double* __restrict acc) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (!real[i]) continue;
    ++cnt;
    const T* __restrict r = src + i * d;
#pragma omp simd
    for (int64_t q = 0; q < d; ++q) acc[q] += r[q];
  }
  return cnt;
}

// dst = the real rows of src minus c (padded rows: zeros), their squared norms, and the bounding box
// [lo, hi] of the centred real rows widened in place.
template <typename T>
XLT_CLONES void centre_rows(const T* __restrict src, const bool* __restrict real, const T* __restrict c, int64_t rows,
                 int64_t d, T* __restrict dst, T* __restrict norms, T* __restrict lo, T* __restrict hi) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict o = dst + i * d;
    if (!real[i]) {
      std::fill(o, o + d, T(0));
      norms[i] = 0;
      continue;
    }
    const T* __restrict r = src + i * d;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t q = 0; q < d; ++q) {
      const T val = r[q] - c[q];
      o[q] = val;
      s += val * val;
      lo[q] = val < lo[q] ? val : lo[q];
      hi[q] = val > hi[q] ? val : hi[q];
    }
    norms[i] = s;
  }
}

// Squared-distance costs of one call, per problem in one task (at::parallel_for over the batch):
// the real points of x and y minus their common mean (padded rows become zeros), the diameter of
// their bounding box, and k |x_i - y_j|^2 for the pairs (x, y) and, with debias, (x, x) and (y, y),
// by the expansion |u|^2 + |v|^2 - 2 <u, v> (one GEMM each) with the entries at or below
// refine_tol (|u|^2 + |v|^2) recomputed directly (csrc/pairwise_cpu.cpp's rule). The quantities of
// xlt_fast.ops.sinkhorn._centred followed by the pairwise kernel (equal to rounding: sums run in
// vector order), without the passes over the (B, n, d) inputs that those make one op at a time.
template <typename T>
void sq_block(const T* u, const T* v, const T* nu, const T* nv, int64_t rows, int64_t cols, int64_t d, T k,
              double refine_tol, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = out + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const T scale = nu[i] + nv[j];
      T val = scale - 2 * row[j];
      if (scale > 0 && val <= static_cast<T>(refine_tol) * scale) {
        const T* ui = u + i * d;
        const T* vj = v + j * d;
        T acc = 0;
        for (int64_t q = 0; q < d; ++q) {
          const T diff = ui[q] - vj[q];
          acc += diff * diff;
        }
        val = acc;
      }
      row[j] = k * (val > 0 ? val : T(0));
    }
  }
}

std::vector<at::Tensor> sinkhorn_sq_costs_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& xm_in,
                                              const at::Tensor& ym_in, double k, bool debias, double refine_tol) {
  check_cpu_float(x_in, "x");
  check_dim(x_in, 3, "x");
  check_dim(y_in, 3, "y");
  const int64_t B = x_in.size(0), n = x_in.size(1), m = y_in.size(1), d = x_in.size(2);
  TORCH_CHECK(y_in.size(0) == B && y_in.size(2) == d, "x (B, n, d) and y (B, m, d) must share B and d");
  TORCH_CHECK(xm_in.dim() == 2 && xm_in.size(0) == B && xm_in.size(1) == n && ym_in.dim() == 2 &&
                  ym_in.size(0) == B && ym_in.size(1) == m,
              "masks must have shapes (B, n) and (B, m)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.to(x.scalar_type()).contiguous();
  const at::Tensor xm = xm_in.to(at::kBool).contiguous(), ym = ym_in.to(at::kBool).contiguous();
  at::Tensor C = at::empty({B, n, m}, x.options());
  at::Tensor Cxx = debias ? at::empty({B, n, n}, x.options()) : at::empty({0, 0, 0}, x.options());
  at::Tensor Cyy = debias ? at::empty({B, m, m}, x.options()) : at::empty({0, 0, 0}, x.options());
  at::Tensor diam = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_sq_costs_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    const bool* xmp = xm.data_ptr<bool>();
    const bool* ymp = ym.data_ptr<bool>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(static_cast<size_t>((n + m) * (d + 1) + 3 * d));
      std::vector<double> acc(d);
      T* X = buf.data();
      T* Y = X + n * d;
      T* nx = Y + m * d;
      T* ny = nx + n;
      T* c = ny + m;
      T* lo = c + d;
      T* hi = lo + d;
      const auto opts = x.options();
      const at::Tensor Xt = at::from_blob(X, {n, d}, opts), Yt = at::from_blob(Y, {m, d}, opts);
      for (int64_t b = begin; b < end; ++b) {
        const T* xb = xp + b * n * d;
        const T* yb = yp + b * m * d;
        const bool* xr = xmp + b * n;
        const bool* yr = ymp + b * m;
        std::fill(acc.begin(), acc.end(), 0.0);
        const int64_t cnt = add_rows(xb, xr, n, d, acc.data()) + add_rows(yb, yr, m, d, acc.data());
        const double inv_cnt = 1.0 / static_cast<double>(std::max<int64_t>(cnt, 1));
        for (int64_t q = 0; q < d; ++q) c[q] = static_cast<T>(acc[q] * inv_cnt);
        std::fill(lo, lo + d, T(0));  // the centroid 0 lies in the box of the real points
        std::fill(hi, hi + d, T(0));
        centre_rows(xb, xr, c, n, d, X, nx, lo, hi);
        centre_rows(yb, yr, c, m, d, Y, ny, lo, hi);
        double span = 0;
        for (int64_t q = 0; q < d; ++q) span += static_cast<double>(hi[q] - lo[q]) * static_cast<double>(hi[q] - lo[q]);
        diam.data_ptr<T>()[b] = static_cast<T>(std::sqrt(span));
        const T kk = static_cast<T>(k);
        // GEMMs over the leading blocks up to the last real point only (padded rows are zeros, their
        // products 0): a problem gives the same bits padded or not, and ragged batches do less work
        int64_t ne = n, me = m;
        while (ne > 0 && !xr[ne - 1]) --ne;
        while (me > 0 && !yr[me - 1]) --me;
        auto gram = [&](at::Tensor out, const at::Tensor& U, int64_t ru, const at::Tensor& W, int64_t rw) {
          if (ru < out.size(0) || rw < out.size(1)) out.zero_();
          if (ru > 0 && rw > 0) {  // the GEMM writes its block of out (leading dimension out's row)
            at::Tensor blk = out.narrow(0, 0, ru).narrow(1, 0, rw);
            at::mm_out(blk, U.narrow(0, 0, ru), W.narrow(0, 0, rw).t());
          }
        };
        at::Tensor Cb = C.select(0, b);
        gram(Cb, Xt, ne, Yt, me);
        sq_block<T>(X, Y, nx, ny, n, m, d, kk, refine_tol, Cb.data_ptr<T>());
        if (debias) {
          at::Tensor Cxb = Cxx.select(0, b), Cyb = Cyy.select(0, b);
          gram(Cxb, Xt, ne, Xt, ne);
          sq_block<T>(X, X, nx, nx, n, n, d, kk, refine_tol, Cxb.data_ptr<T>());
          gram(Cyb, Yt, me, Yt, me);
          sq_block<T>(Y, Y, ny, ny, m, m, d, kk, refine_tol, Cyb.data_ptr<T>());
        }
      }
    });
  });
  return {C, Cxx, Cyy, diam};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("sinkhorn_solve(Tensor C, Tensor loga, Tensor logb, Tensor log_eps0, Tensor n_anneal, float log_ratio, "
        "float eps, int n_iters, float tol, bool symmetric, int rule=0) -> Tensor[]");
  m.def("sinkhorn_plan(Tensor C, Tensor h, Tensor w, float eps, bool cols) -> Tensor");
  m.def("sinkhorn_sq_costs(Tensor x, Tensor y, Tensor x_mask, Tensor y_mask, float k, bool debias, "
        "float refine_tol) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("sinkhorn_solve", &sinkhorn_solve_cpu);
  m.impl("sinkhorn_plan", &sinkhorn_plan_cpu);
  m.impl("sinkhorn_sq_costs", &sinkhorn_sq_costs_cpu);
}

}  // namespace xlt_fast
