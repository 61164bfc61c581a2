// Pairwise squared distances (or dot products) on the CPU.
//
// D_ij = |x_i|^2 + |y_j|^2 - 2 <x_i, y_j> by one batched GEMM. That expansion loses digits when
// D_ij is small next to the norms (cancellation), so entries with D_ij <= refine_tol * (|x_i|^2 +
// |y_j|^2) are recomputed as sum_k (x_ik - y_jk)^2: exact zero for identical rows, full relative
// accuracy for close pairs. Callers center x and y first, which keeps the norms small.
#include "common.h"

namespace xlt_fast {
namespace {

template <typename scalar_t>
void expand_and_refine(const scalar_t* x, const scalar_t* y, const scalar_t* nx, const scalar_t* ny,
                       scalar_t* out, int64_t B, int64_t n, int64_t m, int64_t d, double tol) {
  at::parallel_for(0, B * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n;
      const scalar_t* xi = x + r * d;
      const scalar_t* nyb = ny + b * m;
      const scalar_t* yb = y + b * m * d;
      scalar_t* row = out + r * m;
      for (int64_t j = 0; j < m; ++j) {
        const scalar_t scale = nx[r] + nyb[j];
        scalar_t v = scale - 2 * row[j];
        if (scale > 0 && v <= static_cast<scalar_t>(tol) * scale) {  // zero rows: exact 0 already
          const scalar_t* yj = yb + j * d;
          scalar_t acc = 0;
          for (int64_t k = 0; k < d; ++k) {
            const scalar_t diff = xi[k] - yj[k];
            acc += diff * diff;
          }
          v = acc;
        }
        row[j] = v > 0 ? v : scalar_t(0);
      }
    }
  });
}

at::Tensor pairwise_sqdist_cpu(const at::Tensor& x_in, const at::Tensor& y_in, bool dot, double refine_tol) {
  check_cpu_float(x_in, "x");
  check_cpu_float(y_in, "y");
  check_dim(x_in, 3, "x");
  check_dim(y_in, 3, "y");
  TORCH_CHECK(x_in.size(0) == y_in.size(0) && x_in.size(2) == y_in.size(2),
              "x (B, n, d) and y (B, m, d) must share B and d");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.to(x.scalar_type()).contiguous();
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("pairwise_sqdist(Tensor x, Tensor y, bool dot, float refine_tol) -> Tensor");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) { m.impl("pairwise_sqdist", &pairwise_sqdist_cpu); }

}  // namespace xlt_fast
