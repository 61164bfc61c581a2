// Contrastive losses on the CPU (seed 004: eqs. 1, 2, 3, 6).
//
// contrastive_dense: anchors a (N, d) against candidates c (M, d). Logit s_ij = sim(a_i, c_j) / tau
// with sim = <a, c> (metric 0; cosine arrives as unit rows), -|a - c|^2 (1) or -|a - c| (2).
// Denominator set D(i) = valid j (minus j = i when exclude_self); positives P(i) = j in D(i) with
// c_label_j == a_label_i. loss_i = logsumexp_{D(i)} s_i - mean_{P(i)} s_i over valid anchors with
// |P(i)| > 0; the op returns their mean. Rows are processed in blocks (logits by one GEMM per
// block, memory O(block * M)); with need_grad the same pass forms dL/ds (softmax minus the
// positive indicator over |P|) and the input gradients by two more GEMMs, so backward is a scale.
#include "common.h"

#include <cmath>
#include <limits>

namespace xlt_fast {
namespace {

constexpr int64_t kRowBlock = 256;

enum Metric : int64_t { kDot = 0, kSqEuclidean = 1, kEuclidean = 2 };

template <typename scalar_t>
struct RowStats {
  scalar_t loss;
  bool included;
};

// Turns one row of inner products into logits, computes the row loss, and (need_grad) overwrites
// the row with dL/d(inner product) for a unit weight on this row.
template <typename scalar_t>
RowStats<scalar_t> dense_row(scalar_t* row, const scalar_t* norm_c, scalar_t norm_a, const int64_t* c_lab,
                             int64_t a_lab, const bool* c_valid, int64_t self, int64_t M, scalar_t inv_temp,
                             int64_t metric, bool need_grad, scalar_t* dist) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  scalar_t mx = neg_inf;
  scalar_t pos_sum = 0;
  int64_t n_pos = 0;
  for (int64_t j = 0; j < M; ++j) {
    scalar_t s = row[j];
    if (metric != kDot) {
      scalar_t d2 = norm_a + norm_c[j] - 2 * s;
      d2 = d2 > 0 ? d2 : scalar_t(0);
      dist[j] = metric == kEuclidean ? std::sqrt(d2) : d2;
      s = -dist[j];
    }
    s *= inv_temp;
    const bool den = c_valid[j] && j != self;
    row[j] = den ? s : neg_inf;
    if (den) {
      mx = s > mx ? s : mx;
      if (c_lab[j] == a_lab) {
        pos_sum += s;
        ++n_pos;
      }
    }
  }
  if (n_pos == 0) {
    if (need_grad) std::fill(row, row + M, scalar_t(0));
    return {scalar_t(0), false};
  }
  scalar_t sum = 0;
  for (int64_t j = 0; j < M; ++j) sum += std::exp(row[j] - mx);  // exp(-inf) = 0 off D(i)
  const scalar_t lse = mx + std::log(sum);
  if (need_grad) {
    const scalar_t inv_pos = scalar_t(1) / static_cast<scalar_t>(n_pos);
    for (int64_t j = 0; j < M; ++j) {
      const bool den = c_valid[j] && j != self;
      scalar_t g = den ? std::exp(row[j] - lse) - (c_lab[j] == a_lab ? inv_pos : scalar_t(0)) : scalar_t(0);
      g *= inv_temp;  // d s / d sim
      if (metric == kDot) {
        row[j] = g;  // dL/d<a, c>
      } else if (metric == kSqEuclidean) {
        row[j] = -g;  // dL/dD, D = |a - c|^2
      } else {
        row[j] = dist[j] > 0 ? -g / (2 * dist[j]) : scalar_t(0);  // dL/dD via D^(1/2)
      }
    }
  }
  return {lse - pos_sum / static_cast<scalar_t>(n_pos), true};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_dense_cpu(
    const at::Tensor& a_in, const at::Tensor& c_in, const at::Tensor& a_lab_in, const at::Tensor& c_lab_in,
    const at::Tensor& a_valid_in, const at::Tensor& c_valid_in, double temperature, int64_t metric,
    bool exclude_self, bool need_grad) {
  check_cpu_float(a_in, "a");
  check_cpu_float(c_in, "c");
  check_dim(a_in, 2, "a");
  check_dim(c_in, 2, "c");
  TORCH_CHECK(a_in.size(1) == c_in.size(1), "a and c must share the feature size d");
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric code must be 0 (dot), 1 (sqeuclidean) or 2 (euclidean)");
  const at::Tensor a = a_in.contiguous(), c = c_in.to(a.scalar_type()).contiguous();
  const at::Tensor a_lab = a_lab_in.to(at::kLong).contiguous(), c_lab = c_lab_in.to(at::kLong).contiguous();
  const at::Tensor a_valid = a_valid_in.to(at::kBool).contiguous(), c_valid = c_valid_in.to(at::kBool).contiguous();
  const int64_t N = a.size(0), M = c.size(0);
  TORCH_CHECK(!exclude_self || N == M, "exclude_self needs as many anchors as candidates");
  at::Tensor grad_a = need_grad ? at::zeros_like(a) : at::empty({0}, a.options());
  at::Tensor grad_c = need_grad ? at::zeros_like(c) : at::empty({0}, c.options());
  const at::Tensor norm_a = metric == kDot ? a.new_empty({0}) : a.square().sum(1).contiguous();
  const at::Tensor norm_c = metric == kDot ? c.new_empty({0}) : c.square().sum(1).contiguous();
  double total = 0;
  int64_t n_included = 0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "contrastive_dense_cpu", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    at::Tensor dist = metric == kDot ? a.new_empty({0}) : a.new_empty({std::min(kRowBlock, N), M});
    for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, N - r0);
      const at::Tensor a_blk = a.narrow(0, r0, rows);
      at::Tensor blk = at::mm(a_blk, c.t()).contiguous();  // inner products, then dL/d(.)
      std::vector<scalar_t> row_loss(rows);
      std::vector<char> row_in(rows);
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          const bool valid = a_valid.data_ptr<bool>()[i];
          scalar_t* row = blk.data_ptr<scalar_t>() + r * M;
          if (!valid) {
            std::fill(row, row + M, scalar_t(0));
            row_in[r] = 0;
            continue;
          }
          auto st = dense_row<scalar_t>(row, metric == kDot ? nullptr : norm_c.data_ptr<scalar_t>(),
                                        metric == kDot ? scalar_t(0) : norm_a.data_ptr<scalar_t>()[i],
                                        c_lab.data_ptr<int64_t>(), a_lab.data_ptr<int64_t>()[i],
                                        c_valid.data_ptr<bool>(), exclude_self ? i : -1, M, inv_temp, metric,
                                        need_grad, metric == kDot ? nullptr : dist.data_ptr<scalar_t>() + r * M);
          row_loss[r] = st.loss;
          row_in[r] = st.included;
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        if (row_in[r]) {
          total += row_loss[r];
          ++n_included;
        }
      }
      if (!need_grad) continue;
      // Input gradients from G = dL/d(inner product) (dot) or dL/dD (distances):
      //   dot: grad_a = G c, grad_c = G^T a;  D = |a|^2 + |c|^2 - 2<a, c>:
      //   grad_a = 2 (rowsum(G) a - G c), grad_c = 2 (colsum(G) c - G^T a).
      at::Tensor ga = grad_a.narrow(0, r0, rows);
      if (metric == kDot) {
        ga.copy_(at::mm(blk, c));
        grad_c.add_(at::mm(blk.t(), a_blk));
      } else {
        ga.copy_((blk.sum(1, true) * a_blk - at::mm(blk, c)) * 2);
        grad_c.add_((blk.sum(0).unsqueeze(1) * c - at::mm(blk.t(), a_blk)) * 2);
      }
    }
  });
  const double scale = n_included > 0 ? 1.0 / static_cast<double>(n_included) : 0.0;
  if (need_grad) {
    grad_a.mul_(scale);
    grad_c.mul_(scale);
  }
  return {at::scalar_tensor(total * scale, a.options()), grad_a, grad_c};
}

// negative_contrastive (seed 004 eq. 6): anchor (B, d) against its own candidates (B, K1, d),
// candidate 0 being the positive. loss_i = logsumexp_{valid k} s_ik - s_i0, distances computed
// directly (no expansion); the same pass writes the gradients for a unit upstream weight / B.
std::tuple<at::Tensor, at::Tensor, at::Tensor> candidate_softmax_cpu(
    const at::Tensor& anchor_in, const at::Tensor& cands_in, const at::Tensor& cand_valid_in, double temperature,
    int64_t metric, bool need_grad) {
  check_cpu_float(anchor_in, "anchor");
  check_cpu_float(cands_in, "candidates");
  check_dim(anchor_in, 2, "anchor");
  check_dim(cands_in, 3, "candidates");
  const at::Tensor anchor = anchor_in.contiguous(), cands = cands_in.to(anchor.scalar_type()).contiguous();
  const at::Tensor valid = cand_valid_in.to(at::kBool).contiguous();
  const int64_t B = anchor.size(0), K1 = cands.size(1), d = anchor.size(1);
  TORCH_CHECK(cands.size(0) == B && cands.size(2) == d, "candidates must be (B, K+1, d) matching anchor (B, d)");
  at::Tensor grad_anchor = need_grad ? at::zeros_like(anchor) : at::empty({0}, anchor.options());
  at::Tensor grad_cands = need_grad ? at::zeros_like(cands) : at::empty({0}, cands.options());
  at::Tensor row_loss = at::zeros({B}, anchor.options());
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "candidate_softmax_cpu", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    const scalar_t inv_b = scalar_t(1) / static_cast<scalar_t>(B);
    at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> s(K1), dist(K1);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* a = anchor.data_ptr<scalar_t>() + i * d;
        const scalar_t* cb = cands.data_ptr<scalar_t>() + i * K1 * d;
        const bool* v = valid.data_ptr<bool>() + i * K1;
        scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t k = 0; k < K1; ++k) {
          const scalar_t* c = cb + k * d;
          scalar_t acc = 0;
          if (metric == kDot) {
            for (int64_t t = 0; t < d; ++t) acc += a[t] * c[t];
          } else {
            for (int64_t t = 0; t < d; ++t) acc += (a[t] - c[t]) * (a[t] - c[t]);
            dist[k] = metric == kEuclidean ? std::sqrt(acc) : acc;
            acc = -dist[k];
          }
          s[k] = acc * inv_temp;
          if (v[k] && s[k] > mx) mx = s[k];
        }
        scalar_t sum = 0;
        for (int64_t k = 0; k < K1; ++k) sum += v[k] ? std::exp(s[k] - mx) : scalar_t(0);
        const scalar_t lse = mx + std::log(sum);
        row_loss.data_ptr<scalar_t>()[i] = lse - s[0];
        if (!need_grad) continue;
        scalar_t* ga = grad_anchor.data_ptr<scalar_t>() + i * d;
        scalar_t* gcb = grad_cands.data_ptr<scalar_t>() + i * K1 * d;
        for (int64_t k = 0; k < K1; ++k) {
          if (!v[k]) continue;
          // dL/ds_k = p_k - [k == 0]; ds/dsim = 1/tau
          const scalar_t g = (std::exp(s[k] - lse) - (k == 0 ? scalar_t(1) : scalar_t(0))) * inv_temp * inv_b;
          const scalar_t* c = cb + k * d;
          scalar_t* gc = gcb + k * d;
          if (metric == kDot) {
            for (int64_t t = 0; t < d; ++t) {
              ga[t] += g * c[t];
              gc[t] += g * a[t];
            }
          } else {
            // sim = -D or -sqrt(D), D = |a - c|^2: dsim/da = -2 (a - c) or -(a - c) / sqrt(D)
            const scalar_t coef = metric == kSqEuclidean ? -2 * g : (dist[k] > 0 ? -g / dist[k] : scalar_t(0));
            for (int64_t t = 0; t < d; ++t) {
              const scalar_t diff = coef * (a[t] - c[t]);
              ga[t] += diff;
              gc[t] -= diff;
            }
          }
        }
      }
    });
  });
  return {row_loss.mean(), grad_anchor, grad_cands};
}

// negative_learning (seed 004 eq. 1): mean_i sum_k w_ik * -log(1 - p_ik), p = softmax(z_i).
// -log(1 - p_k) = lse(z) - lse_{j != k}(z). For k other than the row's argmax, sum_{j != k} e^{z_j - M}
// = S - e^{z_k - M} keeps the max term (>= 1), so the subtraction loses at most a few ulps; for the
// argmax the sum without it is formed directly. Gradient: d/dz_j = sum_k w_k (p_j - q^(k)_j),
// q^(k) the softmax over j != k.
std::tuple<at::Tensor, at::Tensor> negative_learning_cpu(const at::Tensor& logits_in, const at::Tensor& weights_in,
                                                         bool need_grad) {
  check_cpu_float(logits_in, "logits");
  check_dim(logits_in, 2, "logits");
  const at::Tensor z = logits_in.contiguous(), w = weights_in.to(z.scalar_type()).contiguous();
  TORCH_CHECK(w.sizes() == z.sizes(), "weights must have the shape of logits");
  const int64_t B = z.size(0), C = z.size(1);
  at::Tensor grad = need_grad ? at::zeros_like(z) : at::empty({0}, z.options());
  at::Tensor row_loss = at::zeros({B}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "negative_learning_cpu", [&] {
    const scalar_t inv_b = scalar_t(1) / static_cast<scalar_t>(B);
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> e(C);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* zi = z.data_ptr<scalar_t>() + i * C;
        const scalar_t* wi = w.data_ptr<scalar_t>() + i * C;
        int64_t am = 0;
        for (int64_t j = 1; j < C; ++j) am = zi[j] > zi[am] ? j : am;
        const scalar_t mx = zi[am];
        scalar_t sum = 0;
        for (int64_t j = 0; j < C; ++j) sum += (e[j] = std::exp(zi[j] - mx));
        scalar_t sum_wo_max = 0;
        for (int64_t j = 0; j < C; ++j) sum_wo_max += j == am ? scalar_t(0) : e[j];
        scalar_t loss = 0, wsum = 0;
        scalar_t* gi = need_grad ? grad.data_ptr<scalar_t>() + i * C : nullptr;
        for (int64_t k = 0; k < C; ++k) {
          if (wi[k] == 0) continue;
          const scalar_t rest = k == am ? sum_wo_max : sum - e[k];  // sum_{j != k} e^{z_j - M}
          loss += wi[k] * (std::log(sum) - std::log(rest));
          wsum += wi[k];
          if (need_grad) {
            for (int64_t j = 0; j < C; ++j) gi[j] -= j == k ? scalar_t(0) : wi[k] * e[j] / rest;
          }
        }
        row_loss.data_ptr<scalar_t>()[i] = loss;
        if (need_grad) {
          for (int64_t j = 0; j < C; ++j) gi[j] = (gi[j] + wsum * e[j] / sum) * inv_b;
        }
      }
    });
  });
  return {row_loss.mean(), grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xlt_fast_C, m) {
  m.def("contrastive_dense(Tensor a, Tensor c, Tensor a_labels, Tensor c_labels, Tensor a_valid, Tensor c_valid, "
        "float temperature, int metric, bool exclude_self, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("candidate_softmax(Tensor anchor, Tensor candidates, Tensor candidate_valid, float temperature, int metric, "
        "bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("negative_learning(Tensor logits, Tensor weights, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("contrastive_dense", &contrastive_dense_cpu);
  m.impl("candidate_softmax", &candidate_softmax_cpu);
  m.impl("negative_learning", &negative_learning_cpu);
}

}  // namespace xlt_fast
