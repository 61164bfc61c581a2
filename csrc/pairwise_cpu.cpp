// Pairwise squared distances (or dot products) on the CPU.
//
// D_ij = |x_i|^2 + |y_j|^2 - 2 <x_i, y_j> by one batched GEMM. That expansion loses digits when
// D_ij is small next to the norms (cancellation), so entries with D_ij <= refine_tol * (|x_i|^2 +
// |y_j|^2) are recomputed as sum_k (x_ik - y_jk)^2: exact zero for identical rows, full relative
// accuracy for close pairs. Callers center x and y first, which keeps the norms small. For small d
// (pairwise_sqdist_centered, d <= direct_max_d) D_ij = sum_k (x_ik - y_jk)^2 is summed directly.
#include "fast_exp.h"  // first: its no-trapping-math pragma lets the selects below vectorise
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace xlt_fast {
namespace {

// The entry points' checks: x (B, n, d) and y (B, m, d), float32/float64 CPU tensors sharing B and d;
// returns both contiguous, y in x's dtype.
std::pair<at::Tensor, at::Tensor> checked_pair(const at::Tensor& x, const at::Tensor& y) {
  check_cpu_float(x, "x");
  check_cpu_float(y, "y");
  check_dim(x, 3, "x");
  check_dim(y, 3, "y");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), "x (B, n, d) and y (B, m, d) must share B and d");
  return {x.contiguous(), y.to(x.scalar_type()).contiguous()};
}

// One row of the expansion, in place: row_j <- max(0, nx + ny_j - 2 row_j) with row_j = <x_i, y_j>
// from the GEMM. Returns whether some entry has v <= tol * (nx + ny_j) with a nonzero scale (a pair
// of zero rows is exact 0 already), i.e. needs the exact recompute. Plain restrict pointers, not
// lambda captures, so that the loop vectorises under -fno-strict-aliasing.
template <typename T>
XLT_CLONES bool expand_row(T* __restrict row, const T* __restrict ny, T nx, T tol, int64_t m) {
  int refine = 0;
#pragma omp simd reduction(| : refine)
  for (int64_t j = 0; j < m; ++j) {
    const T scale = nx + ny[j];
    const T v = scale - 2 * row[j];
    refine |= (scale > 0) & (v <= tol * scale);
    row[j] = v > 0 ? v : T(0);
  }
  return refine;
}

// The entries of one row that expand_row flagged, recomputed as sum_k (x_ik - y_jk)^2.
template <typename T>
void refine_row(T* row, const T* xi, const T* y, const T* ny, T nx, T tol, int64_t m, int64_t d) {
  for (int64_t j = 0; j < m; ++j) {
    const T scale = nx + ny[j];
    if (scale > 0 && row[j] <= tol * scale) {
      const T* yj = y + j * d;
      T acc = 0;
      for (int64_t k = 0; k < d; ++k) {
        const T diff = xi[k] - yj[k];
        acc += diff * diff;
      }
      row[j] = acc;
    }
  }
}

// out holds the GEMM's <x_i, y_j>; turns it into squared distances (one pass over out, plus the
// exact recompute of the rare flagged entries).
template <typename scalar_t>
void expand_and_refine(const scalar_t* x, const scalar_t* y, const scalar_t* nx, const scalar_t* ny,
                       scalar_t* out, int64_t B, int64_t n, int64_t m, int64_t d, double tol) {
  const scalar_t tol_s = static_cast<scalar_t>(tol);
  at::parallel_for(0, B * n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n;
      scalar_t* row = out + r * m;
      if (expand_row(row, ny + b * m, nx[r], tol_s, m))
        refine_row(row, x + r * d, y + b * m * d, ny + b * m, nx[r], tol_s, m, d);
    }
  });
}

at::Tensor pairwise_sqdist_cpu(const at::Tensor& x_in, const at::Tensor& y_in, bool dot, double refine_tol) {
  at::Tensor x, y;
  std::tie(x, y) = checked_pair(x_in, y_in);  // not a structured binding: the lambdas below capture them
  at::Tensor out = at::bmm(x, y.transpose(1, 2)).contiguous();
  if (dot) return out;
  const at::Tensor nx = x.square().sum(-1).contiguous();
  const at::Tensor ny = y.square().sum(-1).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_sqdist_cpu", [&] {
    expand_and_refine<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nx.data_ptr<scalar_t>(),
                                ny.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                y.size(1), x.size(2), refine_tol);
  });
  return out;
}

// The direct sum D_ij = sum_k (x_ik - y_jk)^2 for small d, where a GEMM's packing and the
// expansion's extra pass over D cost more than the arithmetic: exact (no expansion, so no centring
// and no refinement), and D is written once. y is packed in blocks of kBlock points, feature-major:
// block c holds yp[(c d + k) kBlock + jj] = y_{c kBlock + jj, k} (zero past m), so that one block's
// partial sums stay in registers across k and its reads are contiguous.
template <typename T>
constexpr int64_t kBlock = 256 / sizeof(T);  // 256 bytes of sums: 4 AVX-512 or 8 AVX2 registers

template <typename T>
void pack_blocks(const T* __restrict y, T* __restrict yp, int64_t m, int64_t d) {
  constexpr int64_t JB = kBlock<T>;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t k = 0; k < d; ++k) yp[((j / JB) * d + k) * JB + j % JB] = y[j * d + k];
}

// Entries j0 <= j < j0 + len of one output row, from the packed y (j0 a multiple of kBlock); returns
// whether they are all finite (<= max: false for NaN and inf).
template <typename T>
XLT_CLONES bool direct_row(const T* __restrict xi, const T* __restrict yp, T* __restrict row, int64_t j0,
                           int64_t len, int64_t d) {
  constexpr int64_t JB = kBlock<T>;
  for (int64_t j = j0; j < j0 + len; j += JB) {
    const T* __restrict blk = yp + j * d;
    T acc[JB] = {};
    for (int64_t k = 0; k < d; ++k) {
      const T xk = xi[k];
#pragma omp simd
      for (int64_t jj = 0; jj < JB; ++jj) {
        const T diff = xk - blk[k * JB + jj];
        acc[jj] += diff * diff;
      }
    }
    std::copy(acc, acc + std::min(JB, j0 + len - j), row + j);
  }
  const T big = std::numeric_limits<T>::max();
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = j0; j < j0 + len; ++j) bad |= row[j] <= big ? 0 : 1;
  return !bad;
}

// Returns false if an entry is not finite (a NaN/inf input reaches every entry of its row or column;
// a finite overflow also says false). Each thread's rows sweep y in tiles of columns whose packed
// block (<= 16 KiB) stays in L1 across the rows.
template <typename T>
bool direct_sqdist(const T* x, const T* y, T* out, int64_t B, int64_t n, int64_t m, int64_t d) {
  constexpr int64_t JB = kBlock<T>;
  const int64_t packed = (m + JB - 1) / JB * JB * d;  // per batch
  const int64_t tile = std::max<int64_t>(1, 16384 / (sizeof(T) * JB * std::max<int64_t>(1, d))) * JB;
  std::vector<T> yp(B * packed, T(0));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, m * d));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) pack_blocks(y + b * m * d, yp.data() + b * packed, m, d);
  });
  std::atomic<bool> finite{true};
  at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t j0 = 0; j0 < m; j0 += tile)
      for (int64_t r = begin; r < end; ++r)
        ok &= direct_row(x + r * d, yp.data() + (r / n) * packed, out + r * m, j0, std::min(tile, m - j0), d);
    if (!ok) finite = false;
  });
  return finite;
}

// acc_k += sum_i src_ik over the rows of one point set (fp64 sums, vectorised across k).
template <typename T>
XLT_CLONES void add_columns(const T* __restrict src, double* __restrict acc, int64_t rows, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) acc[k] += src[i * d + k];
  }
}

// dst_i = src_i - c row by row, with norms_i = |dst_i|^2 summed in fp64 (the expansion cancels
// against it); returns the sum of the norms.
template <typename T>
XLT_CLONES double shift_rows(const T* __restrict src, const T* __restrict c, T* __restrict dst, T* __restrict norms,
                             int64_t rows, int64_t d) {
  double total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d; ++k) {
      const T v = src[i * d + k] - c[k];
      dst[i * d + k] = v;
      s += static_cast<double>(v) * static_cast<double>(v);
    }
    norms[i] = static_cast<T>(s);
    total += s;
  }
  return total;
}

// x and y minus the mean c of all their rows (per batch), with the centred rows' squared norms, in
// two passes over the inputs. Returns false if a sum or a norm is not finite (any NaN/inf input
// makes its batch's column sum non-finite; a finite overflow also says false).
template <typename scalar_t>
bool center_with_norms(const scalar_t* x, const scalar_t* y, scalar_t* xc, scalar_t* yc, scalar_t* nx,
                       scalar_t* ny, int64_t B, int64_t n, int64_t m, int64_t d) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (n + m) * d)), [&](int64_t begin, int64_t end) {
    std::vector<double> acc(d);
    std::vector<scalar_t> c(d);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      add_columns(x + b * n * d, acc.data(), n, d);
      add_columns(y + b * m * d, acc.data(), m, d);
      double check = 0;
      for (int64_t k = 0; k < d; ++k) {
        c[k] = static_cast<scalar_t>(acc[k] / static_cast<double>(n + m));
        check += acc[k];
      }
      check += shift_rows(x + b * n * d, c.data(), xc + b * n * d, nx + b * n, n, d);
      check += shift_rows(y + b * m * d, c.data(), yc + b * m * d, ny + b * m, m, d);
      if (!std::isfinite(check)) finite = false;
    }
  });
  return finite;
}

// Squared distances of x and y centred here (the CPU path without masks): the centring, the norms
// and the finiteness of the inputs in two passes, one GEMM, then the expansion with refinement.
// Returns (D, finite): finite is a bool scalar, false when an input may hold NaN/inf (the caller
// then runs its exact check, which names the argument).
std::tuple<at::Tensor, at::Tensor> pairwise_sqdist_centered_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                double refine_tol, int64_t direct_max_d) {
  at::Tensor x, y;
  std::tie(x, y) = checked_pair(x_in, y_in);  // not a structured binding: the lambdas below capture them
  const int64_t B = x.size(0), n = x.size(1), m = y.size(1), d = x.size(2);
  at::Tensor out = at::empty({B, n, m}, x.options());
  bool finite = true;
  if (d <= direct_max_d) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_sqdist_direct", [&] {
      finite = direct_sqdist<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                       B, n, m, d);
    });
    return {out, at::scalar_tensor(finite, x.options().dtype(at::kBool))};
  }
  at::Tensor xc = at::empty_like(x), yc = at::empty_like(y);
  at::Tensor nx = at::empty({B, n}, x.options()), ny = at::empty({B, m}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_sqdist_center", [&] {
    finite = center_with_norms<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                         yc.data_ptr<scalar_t>(), nx.data_ptr<scalar_t>(), ny.data_ptr<scalar_t>(),
                                         B, n, m, d);
  });
  at::bmm_out(out, xc, yc.transpose(1, 2));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_sqdist_refine", [&] {
    expand_and_refine<scalar_t>(xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), nx.data_ptr<scalar_t>(),
                                ny.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, n, m, d, refine_tol);
  });
  return {out, at::scalar_tensor(finite, x.options().dtype(at::kBool))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("pairwise_sqdist(Tensor x, Tensor y, bool dot, float refine_tol) -> Tensor");
  m.def("pairwise_sqdist_centered(Tensor x, Tensor y, float refine_tol, int direct_max_d) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("pairwise_sqdist", &pairwise_sqdist_cpu);
  m.impl("pairwise_sqdist_centered", &pairwise_sqdist_centered_cpu);
}

}  // namespace xlt_fast
