// Fused affine coupling epilogue on the CPU (Real-NVP, Dinh et al. 2017, eqs. 4-8).
//
// One pass per row after the conditioner's GEMM: scale map s = g(s_raw), the affine map of the
// transformed features (mask True), the copy of the others, and the log-det row sum:
//   forward  y_m = x_m * exp(s) + t,     logdet = +sum s
//   inverse  y_m = (x_m - t) * exp(-s),  logdet = -sum s
// g: 0 "exp" g(u) = u; 1 "tanh" c tanh(u/c); 2 "atan" c (2/pi) atan(u/c).
// The backward gives dL/dx and [dL/ds_raw | dL/dt] (one (N, 2 d_m) tensor, the gradient of the
// conditioner's packed output) from dL/dy and dL/dlogdet in one pass too. Inputs may have any row
// stride (unit feature stride), so the packed [s_raw | t] output is read in place.
//
// fp32 rows use branchless exp/atan (Cephes-style polynomials, ~2 ulp) so that the inner loop
// vectorises; the row functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC target_clones). fp64 rows use the C library's exact functions.
#include "fast_exp.h"  // first: its pragma applies to the whole file
#include "common.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>


namespace xlt_fast {
namespace {

constexpr double kTwoOverPi = 0.63661977236758134308;

// atan(x) in fp32: reduction to |x| <= tan(pi/8), odd polynomial (Cephes atanf), branchless.
XLT_INLINE float atan_f32(float x) {
  const float a = x < 0 ? -x : x;
  const bool big = a > 2.414213562373095f;
  const bool mid = a > 0.4142135623730950f;
  const float xr = big ? -1.0f / (a > 0 ? a : 1.0f) : (mid ? (a - 1.0f) / (a + 1.0f) : a);
  const float y0 = big ? 1.5707963267948966f : (mid ? 0.7853981633974483f : 0.0f);
  const float z = xr * xr;
  const float p = (((8.05374449538e-2f * z - 1.38776856032e-1f) * z + 1.99777106478e-1f) * z -
                   3.33329491539e-1f) * z * xr + xr;
  const float r = y0 + p;
  return x < 0 ? -r : r;
}

template <typename T> struct Math;
template <> struct Math<float> {
  XLT_INLINE static float exp(float x) { return exp_f32(x); }
  XLT_INLINE static float atan(float x) { return atan_f32(x); }
  // tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|): no overflow, absolute error ~1e-7
  XLT_INLINE static float tanh(float z) {
    const float e = exp_f32(-2.0f * (z < 0 ? -z : z));
    const float r = (1.0f - e) / (1.0f + e);
    return z < 0 ? -r : r;
  }
};
template <> struct Math<double> {
  static double exp(double x) { return std::exp(x); }
  static double atan(double x) { return std::atan(x); }
  static double tanh(double x) { return std::tanh(x); }
};

// s = g(u) and ds/du for the scale map S with soft-clamp bound c (S is a template argument so that
// the inner loops hold no branch on it).
template <typename T> struct LogScale { T s, ds; };

template <typename T, int S>
XLT_INLINE LogScale<T> scale_map(T u, T c) {
  if constexpr (S == 1) {
    const T th = Math<T>::tanh(u / c);
    return {c * th, T(1) - th * th};
  } else if constexpr (S == 2) {
    const T z = u / c;
    return {c * T(kTwoOverPi) * Math<T>::atan(z), T(kTwoOverPi) / (T(1) + z * z)};
  } else {
    return {u, T(1)};
  }
}

// One row's transformed features, contiguous buffers: out = affine(xin), returns sum of s.
template <typename T, int S>
XLT_INLINE T fwd_span(const T* __restrict xin, const T* __restrict sr,
                                                 const T* __restrict t, T* __restrict out, int64_t n, T c,
                                                 bool inverse) {
  T acc = 0;
  if (!inverse) {
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) {
      const T s = scale_map<T, S>(sr[k], c).s;
      out[k] = xin[k] * Math<T>::exp(s) + t[k];
      acc += s;
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) {
      const T s = scale_map<T, S>(sr[k], c).s;
      out[k] = (xin[k] - t[k]) * Math<T>::exp(-s);
      acc += s;
    }
  }
  return inverse ? -acc : acc;
}

// Backward of fwd_span for one row: gx = dL/dxin, gs = dL/ds_raw, gt = dL/dt from g = dL/dout.
template <typename T, int S>
XLT_INLINE void bwd_span(const T* __restrict g, T gl, const T* __restrict xin,
                                                    const T* __restrict sr, const T* __restrict t,
                                                    T* __restrict gx, T* __restrict gs, T* __restrict gt,
                                                    int64_t n, T c, bool inverse) {
  if (!inverse) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const LogScale<T> m = scale_map<T, S>(sr[k], c);
      const T e = Math<T>::exp(m.s);
      gx[k] = g[k] * e;
      gt[k] = g[k];
      gs[k] = (g[k] * xin[k] * e + gl) * m.ds;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const LogScale<T> m = scale_map<T, S>(sr[k], c);
      const T ge = g[k] * Math<T>::exp(-m.s);
      gx[k] = ge;
      gt[k] = -ge;
      gs[k] = -(ge * (xin[k] - t[k]) + gl) * m.ds;
    }
  }
}

// Dispatch on the scale map; float goes through the target clones, double stays scalar.
template <typename T>
XLT_INLINE T fwd_dispatch(const T* xin, const T* sr, const T* t, T* out, int64_t n,
                                                     int scale, T c, bool inverse) {
  if (scale == 1) return fwd_span<T, 1>(xin, sr, t, out, n, c, inverse);
  if (scale == 2) return fwd_span<T, 2>(xin, sr, t, out, n, c, inverse);
  return fwd_span<T, 0>(xin, sr, t, out, n, c, inverse);
}
template <typename T>
XLT_INLINE void bwd_dispatch(const T* g, T gl, const T* xin, const T* sr, const T* t,
                                                        T* gx, T* gs, T* gt, int64_t n, int scale, T c,
                                                        bool inverse) {
  if (scale == 1) return bwd_span<T, 1>(g, gl, xin, sr, t, gx, gs, gt, n, c, inverse);
  if (scale == 2) return bwd_span<T, 2>(g, gl, xin, sr, t, gx, gs, gt, n, c, inverse);
  bwd_span<T, 0>(g, gl, xin, sr, t, gx, gs, gt, n, c, inverse);
}

XLT_CLONES float fwd_span_any(const float* xin, const float* sr, const float* t, float* out, int64_t n, int scale,
                              float c, bool inverse) {
  return fwd_dispatch<float>(xin, sr, t, out, n, scale, c, inverse);
}
double fwd_span_any(const double* xin, const double* sr, const double* t, double* out, int64_t n, int scale,
                    double c, bool inverse) {
  return fwd_dispatch<double>(xin, sr, t, out, n, scale, c, inverse);
}
XLT_CLONES void bwd_span_any(const float* g, float gl, const float* xin, const float* sr, const float* t,
                             float* gx, float* gs, float* gt, int64_t n, int scale, float c, bool inverse) {
  bwd_dispatch<float>(g, gl, xin, sr, t, gx, gs, gt, n, scale, c, inverse);
}
void bwd_span_any(const double* g, double gl, const double* xin, const double* sr, const double* t, double* gx,
                  double* gs, double* gt, int64_t n, int scale, double c, bool inverse) {
  bwd_dispatch<double>(g, gl, xin, sr, t, gx, gs, gt, n, scale, c, inverse);
}

// The features of one role (transformed, or copied) in increasing order: an arithmetic progression
// off + k * step when possible (the "half" masks: step 1, "alternating": step 2), else an index list.
struct Features {
  std::vector<int64_t> idx;
  int64_t off = 0, step = 0;  // step 0: irregular, use idx
  int64_t n = 0;
};

Features features(std::vector<int64_t> idx) {
  Features f;
  f.n = static_cast<int64_t>(idx.size());
  f.off = f.n ? idx[0] : 0;
  f.step = f.n > 1 ? idx[1] - idx[0] : 1;
  for (int64_t k = 1; k < f.n && f.step; ++k)
    if (idx[k] - idx[k - 1] != f.step) f.step = 0;
  f.idx = std::move(idx);
  return f;
}

// dst[k] = src[f_k] (gather), dst[f_k] = src[k] (scatter), dst[f_k] = src[f_k] (copy).
template <typename T>
void gather(const T* __restrict src, const Features& f, T* __restrict dst) {
  if (f.step == 1) std::memcpy(dst, src + f.off, f.n * sizeof(T));
  else if (f.step) for (int64_t k = 0; k < f.n; ++k) dst[k] = src[f.off + k * f.step];
  else for (int64_t k = 0; k < f.n; ++k) dst[k] = src[f.idx[k]];
}
template <typename T>
void scatter(const T* __restrict src, const Features& f, T* __restrict dst) {
  if (f.step == 1) std::memcpy(dst + f.off, src, f.n * sizeof(T));
  else if (f.step) for (int64_t k = 0; k < f.n; ++k) dst[f.off + k * f.step] = src[k];
  else for (int64_t k = 0; k < f.n; ++k) dst[f.idx[k]] = src[k];
}
template <typename T>
void copy(const T* __restrict src, const Features& f, T* __restrict dst) {
  if (f.step == 1) std::memcpy(dst + f.off, src + f.off, f.n * sizeof(T));
  else if (f.step) for (int64_t k = 0; k < f.n; ++k) dst[f.off + k * f.step] = src[f.off + k * f.step];
  else for (int64_t j : f.idx) dst[j] = src[j];
}

// The mask's transformed (t) and copied (i) features. A contiguous transformed block is read and
// written in place; other masks go through per-thread gather/scatter buffers.
struct Split {
  Features t, i;
};

Split split_mask(const at::Tensor& mask, int64_t d, int64_t d2) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == d, "mask must have shape (", d, ",), got ", mask.sizes());
  const at::Tensor m = mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  std::vector<int64_t> tidx, iidx;
  for (int64_t j = 0; j < d; ++j) (p[j] ? tidx : iidx).push_back(j);
  TORCH_CHECK(static_cast<int64_t>(tidx.size()) == d2, "mask has ", tidx.size(),
              " True entries but s_raw and t have ", d2, " features; they must match");
  return {features(std::move(tidx)), features(std::move(iidx))};
}

void check_inputs(const at::Tensor& x, const at::Tensor& s_raw, const at::Tensor& t) {
  check_cpu_float(x, "x");
  check_dim(x, 2, "x");
  check_dim(s_raw, 2, "s_raw");
  check_dim(t, 2, "t");
  TORCH_CHECK(s_raw.scalar_type() == x.scalar_type() && t.scalar_type() == x.scalar_type(),
              "x, s_raw and t must share a dtype");
  TORCH_CHECK(s_raw.device().is_cpu() && t.device().is_cpu(), "s_raw and t must be CPU tensors");
  TORCH_CHECK(s_raw.sizes() == t.sizes() && s_raw.size(0) == x.size(0),
              "s_raw and t must have shape (N, d_m) with x's N, got ", s_raw.sizes(), " and ", t.sizes());
}

constexpr int64_t kGrain = 8;

// Rows with unit feature stride (any row stride): the conditioner's packed [s_raw | t] output is
// read in place.
at::Tensor rows(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> coupling_forward_cpu(const at::Tensor& x_in, const at::Tensor& s_in,
                                                        const at::Tensor& t_in, const at::Tensor& mask,
                                                        int64_t scale, double clamp, bool inverse) {
  check_inputs(x_in, s_in, t_in);
  TORCH_CHECK(scale >= 0 && scale <= 2, "scale must be 0 (exp), 1 (tanh) or 2 (atan), got ", scale);
  const at::Tensor x = rows(x_in), sr = rows(s_in), t = rows(t_in);
  const int64_t N = x.size(0), d = x.size(1), d2 = sr.size(1);
  const int64_t sx = x.stride(0), ss = sr.stride(0), st = t.stride(0);
  const Split sp = split_mask(mask, d, d2);
  at::Tensor y = at::empty({N, d}, x.options());
  at::Tensor logdet = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coupling_forward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp_ = sr.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* lp = logdet.data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(clamp);
    const int sc = static_cast<int>(scale);
    const bool in_place = sp.t.step == 1;
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> xin(in_place ? 0 : d2), out(in_place ? 0 : d2);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * sx;
        scalar_t* yr = yp + r * d;
        copy(xr, sp.i, yr);
        if (in_place) {
          lp[r] = fwd_span_any(xr + sp.t.off, sp_ + r * ss, tp + r * st, yr + sp.t.off, d2, sc, c, inverse);
        } else {
          gather(xr, sp.t, xin.data());
          lp[r] = fwd_span_any(xin.data(), sp_ + r * ss, tp + r * st, out.data(), d2, sc, c, inverse);
          scatter(out.data(), sp.t, yr);
        }
      }
    });
  });
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> coupling_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& grad_logdet_in, const at::Tensor& x_in, const at::Tensor& s_in,
    const at::Tensor& t_in, const at::Tensor& mask, int64_t scale, double clamp, bool inverse) {
  check_inputs(x_in, s_in, t_in);
  TORCH_CHECK(scale >= 0 && scale <= 2, "scale must be 0 (exp), 1 (tanh) or 2 (atan), got ", scale);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "grad_y must have x's shape ", x_in.sizes());
  TORCH_CHECK(grad_logdet_in.dim() == 1 && grad_logdet_in.size(0) == x_in.size(0),
              "grad_logdet must have shape (N,)");
  const at::Tensor x = rows(x_in), sr = rows(s_in), t = rows(t_in);
  const at::Tensor g = rows(grad_y_in.to(x.scalar_type()));
  const at::Tensor gld = grad_logdet_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), d = x.size(1), d2 = sr.size(1);
  const int64_t sx = x.stride(0), ss = sr.stride(0), st = t.stride(0), sg = g.stride(0);
  const Split sp = split_mask(mask, d, d2);
  at::Tensor gx = at::empty({N, d}, x.options()), gst = at::empty({N, 2 * d2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coupling_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* srp = sr.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* glp = gld.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gsp = gst.data_ptr<scalar_t>();
    scalar_t* gtp = gsp + d2;
    const int64_t sgst = 2 * d2;
    const scalar_t c = static_cast<scalar_t>(clamp);
    const int sc = static_cast<int>(scale);
    const bool in_place = sp.t.step == 1;
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      const int64_t buf = in_place ? 0 : d2;
      std::vector<scalar_t> gin(buf), xin(buf), gout(buf);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gr = gp + r * sg;
        const scalar_t* xr = xp + r * sx;
        scalar_t* gxr = gxp + r * d;
        copy(gr, sp.i, gxr);
        if (in_place) {
          const int64_t o = sp.t.off;
          bwd_span_any(gr + o, glp[r], xr + o, srp + r * ss, tp + r * st, gxr + o, gsp + r * sgst, gtp + r * sgst, d2,
                       sc, c, inverse);
        } else {
          gather(gr, sp.t, gin.data());
          gather(xr, sp.t, xin.data());
          bwd_span_any(gin.data(), glp[r], xin.data(), srp + r * ss, tp + r * st, gout.data(), gsp + r * sgst,
                       gtp + r * sgst, d2, sc, c, inverse);
          scatter(gout.data(), sp.t, gxr);
        }
      }
    });
  });
  return {gx, gst};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("coupling_forward(Tensor x, Tensor s_raw, Tensor t, Tensor mask, int scale, float clamp, bool inverse)"
        " -> (Tensor, Tensor)");
  m.def("coupling_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor s_raw, Tensor t, Tensor mask,"
        " int scale, float clamp, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("coupling_forward", &coupling_forward_cpu);
  m.impl("coupling_backward", &coupling_backward_cpu);
}

}  // namespace xlt_fast
