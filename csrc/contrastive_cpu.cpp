// Contrastive losses on the CPU (seed 004: eqs. 1, 2, 3, 6).
//
// contrastive_dense: anchors a (N, d) against candidates c (M, d). Logit s_ij = sim(a_i, c_j) / tau
// with sim = <a, c> (metric 0; cosine arrives as unit rows), -|a - c|^2 (1) or -|a - c| (2).
// Denominator set D(i) = valid j (minus j = i when exclude_self); positives P(i) = j in D(i) with
// c_label_j == a_label_i. loss_i = logsumexp_{D(i)} s_i - mean_{P(i)} s_i over valid anchors with
// |P(i)| > 0; the op returns their mean. Rows are processed in blocks (logits by one GEMM per
// block, memory O(block * M)); with need_grad the same pass forms dL/ds (softmax minus the
// positive indicator over |P|) and the input gradients by two more GEMMs, so backward is a scale.
#include "fast_exp.h"  // first: its pragma applies to the whole file
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace xlt_fast {
namespace {

// Rows per block: the logit block holds at most this many entries (16 MB in fp32).
constexpr int64_t kBlockEntries = int64_t(1) << 22;

enum Metric : int64_t { kDot = 0, kSqEuclidean = 1, kEuclidean = 2 };

struct RowResult {
  double loss;
  bool included;
};

// One anchor row, in place: inner products -> logits -> (need_grad) G = dL/d<a, c> (dot) or dL/dD.
// Three branch-free passes (logits and statistics, exp-sum, gradient) that vectorise; the
// target_clones let the loader pick AVX2 code where the CPU has it.
template <typename T, int64_t METRIC>
XLT_CLONES
RowResult dense_row(T* __restrict row, T* __restrict dist, const T* __restrict norm_c, T norm_a,
                    const int64_t* __restrict c_lab, int64_t a_lab, const bool* __restrict c_valid, int64_t self,
                    int64_t M, T inv_temp, bool need_grad) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T mx = neg_inf, pos_sum = 0, n_pos = 0;
#pragma omp simd reduction(max : mx) reduction(+ : pos_sum, n_pos)
  for (int64_t j = 0; j < M; ++j) {
    T s = row[j];
    if (METRIC != kDot) {
      T d2 = norm_a + norm_c[j] - 2 * s;
      d2 = d2 > 0 ? d2 : T(0);
      const T dj = METRIC == kEuclidean ? std::sqrt(d2) : d2;
      dist[j] = dj;
      s = -dj;
    }
    s *= inv_temp;
    const bool den = c_valid[j] && j != self;
    const bool pos = den && c_lab[j] == a_lab;
    row[j] = den ? s : neg_inf;
    mx = den && s > mx ? s : mx;
    pos_sum += pos ? s : T(0);
    n_pos += pos ? T(1) : T(0);
  }
  if (n_pos == 0) {
    if (need_grad) std::fill(row, row + M, T(0));
    return {0.0, false};
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < M; ++j) sum += exp_any(row[j] - mx);  // 0 off D(i) (row = -inf)
  const T lse = mx + std::log(sum);
  if (need_grad) {
    // G = softmax - [pos] / |P|, times ds/d(sim) = 1/tau; dL/dD = -G/tau or -G/(2 tau sqrt(D)).
    const T inv_pos = T(1) / n_pos;
    const T scale = METRIC == kDot ? inv_temp : -inv_temp;
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) {
      const bool pos = c_valid[j] && j != self && c_lab[j] == a_lab;
      T g = (exp_any(row[j] - lse) - (pos ? inv_pos : T(0))) * scale;
      if (METRIC == kEuclidean) g = dist[j] > 0 ? g / (2 * dist[j]) : T(0);
      row[j] = g;
    }
  }
  return {static_cast<double>(lse - pos_sum / n_pos), true};
}

template <typename T, int64_t METRIC>
void dense_block(at::Tensor& blk, at::Tensor& dist, const at::Tensor& norm_a, const at::Tensor& norm_c,
                 const at::Tensor& a_lab, const at::Tensor& c_lab, const at::Tensor& a_valid,
                 const at::Tensor& c_valid, int64_t r0, bool exclude_self, T inv_temp, bool need_grad,
                 std::vector<RowResult>& out) {
  const int64_t rows = blk.size(0), M = blk.size(1);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r0 + r;
      T* row = blk.data_ptr<T>() + r * M;
      if (!a_valid.data_ptr<bool>()[i]) {
        std::fill(row, row + M, T(0));
        out[r] = {0.0, false};
        continue;
      }
      out[r] = dense_row<T, METRIC>(row, METRIC == kDot ? nullptr : dist.data_ptr<T>() + r * M,
                                    METRIC == kDot ? nullptr : norm_c.data_ptr<T>(),
                                    METRIC == kDot ? T(0) : norm_a.data_ptr<T>()[i], c_lab.data_ptr<int64_t>(),
                                    a_lab.data_ptr<int64_t>()[i], c_valid.data_ptr<bool>(),
                                    exclude_self ? i : -1, M, inv_temp, need_grad);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_dense_cpu(
    const at::Tensor& a_in, const std::optional<at::Tensor>& c_opt, const at::Tensor& a_lab_in, const at::Tensor& c_lab_in,
    const at::Tensor& a_valid_in, const at::Tensor& c_valid_in, double temperature, int64_t metric,
    bool exclude_self, bool need_grad) {
  check_cpu_float(a_in, "a");
  check_dim(a_in, 2, "a");
  // c = None: the candidates are the anchors (supcon); then dL/dF = (G + G^T) F, one GEMM.
  const bool symmetric = !c_opt.has_value();
  if (!symmetric) {
    check_cpu_float(*c_opt, "c");
    check_dim(*c_opt, 2, "c");
    TORCH_CHECK(a_in.size(1) == c_opt->size(1), "a and c must share the feature size d");
  }
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric code must be 0 (dot), 1 (sqeuclidean) or 2 (euclidean)");
  const at::Tensor a = a_in.contiguous(), c = symmetric ? a : c_opt->to(a.scalar_type()).contiguous();
  const at::Tensor a_lab = a_lab_in.to(at::kLong).contiguous(), c_lab = c_lab_in.to(at::kLong).contiguous();
  const at::Tensor a_valid = a_valid_in.to(at::kBool).contiguous(), c_valid = c_valid_in.to(at::kBool).contiguous();
  const int64_t N = a.size(0), M = c.size(0);
  TORCH_CHECK(!exclude_self || N == M, "exclude_self needs as many anchors as candidates");
  TORCH_CHECK(a_lab.numel() == N && a_valid.numel() == N && c_lab.numel() == M && c_valid.numel() == M,
              "labels and validity masks must have one entry per row");
  const int64_t block = std::max<int64_t>(1, std::min(N, kBlockEntries / std::max<int64_t>(M, 1)));
  const bool whole = block == N;
  const at::Tensor norm_a = metric == kDot ? at::Tensor() : a.square().sum(1).contiguous();
  const at::Tensor norm_c = metric == kDot ? at::Tensor() : (symmetric ? norm_a : c.square().sum(1).contiguous());
  at::Tensor grad_a = need_grad ? at::zeros_like(a) : at::empty({0}, a.options());
  at::Tensor grad_c = need_grad && !symmetric ? at::zeros_like(c) : at::empty({0}, c.options());
  at::Tensor dist = metric == kDot ? at::Tensor() : a.new_empty({block, M});
  double total = 0;
  int64_t n_included = 0;
  std::vector<RowResult> results(block);
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t rows = std::min(block, N - r0);
    const at::Tensor a_blk = a.narrow(0, r0, rows);
    at::Tensor g = at::mm(a_blk, c.t());  // inner products; the rows turn into G in place
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "contrastive_dense_cpu", [&] {
      const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
      if (metric == kDot) {
        dense_block<scalar_t, kDot>(g, dist, norm_a, norm_c, a_lab, c_lab, a_valid, c_valid, r0, exclude_self,
                                    inv_temp, need_grad, results);
      } else if (metric == kSqEuclidean) {
        dense_block<scalar_t, kSqEuclidean>(g, dist, norm_a, norm_c, a_lab, c_lab, a_valid, c_valid, r0,
                                            exclude_self, inv_temp, need_grad, results);
      } else {
        dense_block<scalar_t, kEuclidean>(g, dist, norm_a, norm_c, a_lab, c_lab, a_valid, c_valid, r0,
                                          exclude_self, inv_temp, need_grad, results);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      if (results[r].included) {
        total += results[r].loss;
        ++n_included;
      }
    }
    if (!need_grad) continue;
    // dot: grad_a = G c, grad_c = G^T a; distances: grad_a = 2 (rowsum(G) a - G c),
    // grad_c = 2 (colsum(G) c - G^T a). In the symmetric case both land in grad_a.
    at::Tensor ga = grad_a.narrow(0, r0, rows);
    if (symmetric && whole) {
      const at::Tensor h = g + g.t();
      ga.copy_(at::mm(h, a));
      if (metric != kDot) ga.sub_(h.sum(1, true) * a).mul_(-2);
      continue;
    }
    at::Tensor& gc = symmetric ? grad_a : grad_c;
    if (metric == kDot) {
      ga.add_(at::mm(g, c));
      gc.add_(at::mm(g.t(), a_blk));
    } else {
      ga.add_((g.sum(1, true) * a_blk - at::mm(g, c)) * 2);
      gc.add_((g.sum(0).unsqueeze(1) * c - at::mm(g.t(), a_blk)) * 2);
    }
  }
  const double scale = n_included > 0 ? 1.0 / static_cast<double>(n_included) : 0.0;
  if (need_grad) {
    grad_a.mul_(scale);
    if (!symmetric) grad_c.mul_(scale);
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

// indexed_candidate_softmax: candidate_softmax with the negatives given as rows of a pool read by
// index, never gathered. anchor a (B, d), positive p (B, d), pool (P, d), index (B, K) int64 and
// valid (B, K): s_i0 = sim(a_i, p_i) / tau, s_ik = sim(a_i, pool[index_ik]) / tau for valid k,
// loss_i = logsumexp_{0, valid k} s_i - s_i0 (0 when no negative is valid), the op returns the mean.
// Pass 1 (parallel over anchors; forward) forms the loss, the gradients of a and p and each
// negative's coefficient w_ik (dL/dsim_ik times the metric's factor, so that the pool row's gradient
// is w_ik a_i for dot and -w_ik (a_i - row) for the distances). Pass 2 (indexed_pool_grad; backward,
// with the upstream scale) scatters the pool gradient into a zeroed (P, d) tensor, parallel over
// column chunks of d with every chunk visiting all (i, k) in order: race-free, and the same sums in
// the same order for any thread count. Entries with valid False are never read (any index).

// The similarity accumulator: <a, c> (dot) or |a - c|^2 (distance metrics), by explicit differences.
template <typename T, int64_t METRIC>
XLT_INLINE T row_acc(const T* __restrict a, const T* __restrict c, int64_t d) {
  T acc = 0;
  if (METRIC == kDot) {
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < d; ++t) acc += a[t] * c[t];
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < d; ++t) acc += (a[t] - c[t]) * (a[t] - c[t]);
  }
  return acc;
}

// The logit sim(a, c) / tau; for the distance metrics the distance goes to dist.
template <typename T, int64_t METRIC>
XLT_INLINE T indexed_logit(const T* __restrict a, const T* __restrict c, int64_t d, T inv_temp, T& dist) {
  const T acc = row_acc<T, METRIC>(a, c, d);
  if (METRIC == kDot) return acc * inv_temp;
  dist = METRIC == kEuclidean ? std::sqrt(acc) : acc;
  return -dist * inv_temp;
}

// A candidate's coefficient from its weight w = dL/dsim: the anchor's gradient gains coef * c (dot)
// or coef * (a - c) (distances), the candidate's the opposite share. sqeuclidean: sim = -D, dsim/da =
// -2 (a - c); euclidean: sim = -sqrt(D), dsim/da = -(a - c) / sqrt(D) (0 at D = 0, the convention of
// candidate_softmax_cpu).
template <typename T, int64_t METRIC>
XLT_INLINE T metric_coef(T w, T dist) {
  if (METRIC == kDot) return w;
  if (METRIC == kSqEuclidean) return -2 * w;
  return dist > 0 ? -w / dist : T(0);
}

// One anchor (pass 1). s / dist: scratch of K entries. Writes the row loss, and with need_grad the
// anchor's and the positive's gradient rows and the negatives' coefficients (0 where not valid).
template <typename T, int64_t METRIC>
XLT_CLONES
T indexed_anchor(const T* __restrict a, const T* __restrict p, const T* __restrict pool,
                 const int64_t* __restrict idx, const bool* __restrict v, int64_t K, int64_t d, T inv_temp,
                 T inv_b, bool need_grad, T* __restrict s, T* __restrict dist, T* __restrict ga,
                 T* __restrict gp, T* __restrict coef) {
  T dist0 = 0;
  const T s0 = indexed_logit<T, METRIC>(a, p, d, inv_temp, dist0);
  T mx = s0;
  for (int64_t k = 0; k < K; ++k) {
    if (!v[k]) continue;
    s[k] = indexed_logit<T, METRIC>(a, pool + idx[k] * d, d, inv_temp, dist[k]);
    mx = s[k] > mx ? s[k] : mx;
  }
  T sum = std::exp(s0 - mx);
  for (int64_t k = 0; k < K; ++k) sum += v[k] ? std::exp(s[k] - mx) : T(0);
  const T lse = mx + std::log(sum);
  if (!need_grad) return lse - s0;
  // dL/ds_k = p_k (negatives), dL/ds_0 = p_0 - 1 = -sum_k p_k (exact 0 without negatives); ds/dsim = 1/tau
  const T scale = inv_temp * inv_b;
  T neg_mass = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (!v[k]) {
      coef[k] = 0;
      continue;
    }
    const T pk = std::exp(s[k] - lse);
    neg_mass += pk;
    coef[k] = metric_coef<T, METRIC>(pk * scale, dist[k]);
  }
  const T c0 = metric_coef<T, METRIC>(-neg_mass * scale, dist0);
  if (METRIC == kDot) {
#pragma omp simd
    for (int64_t t = 0; t < d; ++t) {
      ga[t] = c0 * p[t];
      gp[t] = c0 * a[t];
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < d; ++t) {
      const T diff = c0 * (a[t] - p[t]);
      ga[t] = diff;
      gp[t] = -diff;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    if (!v[k]) continue;
    const T ck = coef[k];
    const T* c = pool + idx[k] * d;
    if (METRIC == kDot) {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) ga[t] += ck * c[t];
    } else {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) ga[t] += ck * (a[t] - c[t]);
    }
  }
  return lse - s0;
}

// Pass 2 over columns [t0, t1): grad_pool[index_ik] += scale w_ik a_i (dot) or -scale w_ik (a_i - row).
template <typename T, int64_t METRIC>
XLT_CLONES
void indexed_scatter(const T* __restrict anchor, const T* __restrict pool, const int64_t* __restrict idx,
                     const bool* __restrict valid, const T* __restrict coef, T scale, int64_t B, int64_t K,
                     int64_t d, int64_t t0, int64_t t1, T* __restrict gpool) {
  for (int64_t i = 0; i < B; ++i) {
    const T* a = anchor + i * d;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = i * K + k;
      if (!valid[e]) continue;
      const T ce = coef[e] * scale;
      const T* c = pool + idx[e] * d;
      T* g = gpool + idx[e] * d;
      if (METRIC == kDot) {
#pragma omp simd
        for (int64_t t = t0; t < t1; ++t) g[t] += ce * a[t];
      } else {
#pragma omp simd
        for (int64_t t = t0; t < t1; ++t) g[t] -= ce * (a[t] - c[t]);
      }
    }
  }
}

template <typename T, int64_t METRIC>
void indexed_pass1(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& pool,
                   const at::Tensor& index, const at::Tensor& valid, double temperature, bool need_grad,
                   at::Tensor& row_loss, at::Tensor& grad_anchor, at::Tensor& grad_positive, at::Tensor& coef) {
  const int64_t B = anchor.size(0), d = anchor.size(1), K = index.size(1);
  const T inv_temp = static_cast<T>(1.0 / temperature), inv_b = T(1) / static_cast<T>(B);
  const T* a = anchor.data_ptr<T>();
  const T* p = positive.data_ptr<T>();
  const T* c = pool.data_ptr<T>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const bool* v = valid.data_ptr<bool>();
  T* loss = row_loss.data_ptr<T>();
  // about 32k multiply-adds per task: small problems stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (K + 1) * d));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> s(K), dist(K);
    for (int64_t i = begin; i < end; ++i) {
      loss[i] = indexed_anchor<T, METRIC>(
          a + i * d, p + i * d, c, idx + i * K, v + i * K, K, d, inv_temp, inv_b, need_grad, s.data(), dist.data(),
          need_grad ? grad_anchor.data_ptr<T>() + i * d : nullptr,
          need_grad ? grad_positive.data_ptr<T>() + i * d : nullptr, need_grad ? coef.data_ptr<T>() + i * K : nullptr);
    }
  });
}

// Entry checks shared by the indexed ops; returns the number of pool rows. A valid entry's index must
// name a pool row (negative_contrastive checks this first, with its own message).
int64_t check_indexed(const at::Tensor& pool, const at::Tensor& index, const at::Tensor& valid, int64_t B) {
  check_cpu_float(pool, "pool");
  check_dim(pool, 2, "pool");
  check_dim(index, 2, "index");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK(index.size(0) == B && valid.sizes() == index.sizes(), "index and valid must be (B, K) with B = ", B);
  const int64_t P = pool.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  const bool* v = valid.data_ptr<bool>();
  for (int64_t e = 0; e < index.numel(); ++e) {
    TORCH_CHECK(!v[e] || (idx[e] >= 0 && idx[e] < P), "index of a valid entry must lie in [0, ", P, "), got ",
                idx[e]);
  }
  return P;
}

// Pass 1: (loss, grad_anchor, grad_positive, coef (B, K)); the gradients and coef empty without need_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> indexed_candidate_softmax_cpu(
    const at::Tensor& anchor_in, const at::Tensor& positive_in, const at::Tensor& pool_in, const at::Tensor& index_in,
    const at::Tensor& valid_in, double temperature, int64_t metric, bool need_grad) {
  check_cpu_float(anchor_in, "anchor");
  check_dim(anchor_in, 2, "anchor");
  check_dim(positive_in, 2, "positive");
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric code must be 0 (dot), 1 (sqeuclidean) or 2 (euclidean)");
  const at::Tensor anchor = anchor_in.contiguous();
  const at::Tensor positive = positive_in.to(anchor.scalar_type()).contiguous();
  const at::Tensor pool = pool_in.to(anchor.scalar_type()).contiguous();
  const at::Tensor index = index_in.contiguous(), valid = valid_in.contiguous();
  const int64_t B = anchor.size(0), K = index.size(1);
  TORCH_CHECK(positive.sizes() == anchor.sizes(), "positive must have the shape of anchor (B, d)");
  TORCH_CHECK(pool.dim() == 2 && pool.size(1) == anchor.size(1), "pool must be (P, d) with the d of anchor");
  check_indexed(pool, index, valid, B);
  at::Tensor row_loss = at::empty({B}, anchor.options());
  at::Tensor grad_anchor = need_grad ? at::empty_like(anchor) : at::empty({0}, anchor.options());
  at::Tensor grad_positive = need_grad ? at::empty_like(anchor) : at::empty({0}, anchor.options());
  at::Tensor coef = need_grad ? at::empty({B, K}, anchor.options()) : at::empty({0}, anchor.options());
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "indexed_candidate_softmax_cpu", [&] {
    if (metric == kDot) {
      indexed_pass1<scalar_t, kDot>(anchor, positive, pool, index, valid, temperature, need_grad, row_loss,
                                    grad_anchor, grad_positive, coef);
    } else if (metric == kSqEuclidean) {
      indexed_pass1<scalar_t, kSqEuclidean>(anchor, positive, pool, index, valid, temperature, need_grad, row_loss,
                                            grad_anchor, grad_positive, coef);
    } else {
      indexed_pass1<scalar_t, kEuclidean>(anchor, positive, pool, index, valid, temperature, need_grad, row_loss,
                                          grad_anchor, grad_positive, coef);
    }
  });
  return {row_loss.mean(), grad_anchor, grad_positive, coef};
}

// Pass 2: the pool gradient (P, d) for the upstream gradient `scale` (a 0-dim tensor) from pass 1's coef.
at::Tensor indexed_pool_grad_cpu(const at::Tensor& anchor_in, const at::Tensor& pool_in, const at::Tensor& index_in,
                                 const at::Tensor& valid_in, const at::Tensor& coef_in, const at::Tensor& scale,
                                 int64_t metric) {
  check_cpu_float(anchor_in, "anchor");
  check_dim(anchor_in, 2, "anchor");
  TORCH_CHECK(metric >= 0 && metric <= 2, "metric code must be 0 (dot), 1 (sqeuclidean) or 2 (euclidean)");
  const at::Tensor anchor = anchor_in.contiguous();
  const at::Tensor pool = pool_in.to(anchor.scalar_type()).contiguous();
  const at::Tensor index = index_in.contiguous(), valid = valid_in.contiguous();
  const at::Tensor coef = coef_in.to(anchor.scalar_type()).contiguous();
  const int64_t B = anchor.size(0), d = anchor.size(1), K = index.size(1);
  TORCH_CHECK(pool.dim() == 2 && pool.size(1) == d, "pool must be (P, d) with the d of anchor");
  const int64_t P = check_indexed(pool, index, valid, B);
  TORCH_CHECK(coef.sizes() == index.sizes(), "coef must be (B, K) like index");
  TORCH_CHECK(scale.numel() == 1, "scale must hold one value");
  at::Tensor grad_pool = at::zeros({P, d}, anchor.options());
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "indexed_pool_grad_cpu", [&] {
    const scalar_t sc = scale.item().to<scalar_t>();
    const scalar_t* a = anchor.data_ptr<scalar_t>();
    const scalar_t* c = pool.data_ptr<scalar_t>();
    const scalar_t* w = coef.data_ptr<scalar_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    const bool* v = valid.data_ptr<bool>();
    scalar_t* g = grad_pool.data_ptr<scalar_t>();
    // column chunks of at least 16 (a vector's worth) and about 32k multiply-adds each
    const int64_t col_grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, B * K));
    at::parallel_for(0, d, col_grain, [&](int64_t t0, int64_t t1) {
      if (metric == kDot) {
        indexed_scatter<scalar_t, kDot>(a, c, idx, v, w, sc, B, K, d, t0, t1, g);
      } else {  // both distances: -w (a - row)
        indexed_scatter<scalar_t, kSqEuclidean>(a, c, idx, v, w, sc, B, K, d, t0, t1, g);
      }
    });
  });
  return grad_pool;
}

// The finiteness probe of negative_contrastive's check: out (B, K) = sum_t (r_t - r_t) over the row r
// = pool[index_ik] of a valid entry (x - x is 0 for a finite x and NaN for inf or NaN, so the sum is
// 0 exactly when the row is finite), 0 for an entry not valid. Reads only the indexed rows.
template <typename T>
XLT_INLINE T row_probe(const T* __restrict r, int64_t d) {
  T z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t t = 0; t < d; ++t) z += r[t] - r[t];
  return z;
}

at::Tensor indexed_rows_probe_cpu(const at::Tensor& pool_in, const at::Tensor& index_in, const at::Tensor& valid_in) {
  const at::Tensor pool = pool_in.contiguous(), index = index_in.contiguous(), valid = valid_in.contiguous();
  check_indexed(pool, index, valid, index.size(0));
  const int64_t n = index.numel(), d = pool.size(1);
  at::Tensor out = at::empty(index.sizes(), pool.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  const bool* v = valid.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(pool.scalar_type(), "indexed_rows_probe_cpu", [&] {
    const scalar_t* c = pool.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d)), [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) o[e] = v[e] ? row_probe(c + idx[e] * d, d) : scalar_t(0);
    });
  });
  return out;
}

// negative_learning (seed 004 eq. 1): mean_i sum_k w_ik * -log(1 - p_ik), p = softmax(z_i).
// -log(1 - p_k) = lse(z) - lse_{j != k}(z). For k other than the row's argmax, sum_{j != k} e^{z_j - M}
// = S - e^{z_k - M} keeps the max term (>= 1), so the subtraction loses at most a few ulps; for the
// argmax the sum without it is formed relative to the second largest logit M2 (R2 >= 1), so its log
// (M2 - M) + log R2 stays finite for any logit gap. Gradient: d/dz_j = sum_k w_k (p_j - q^(k)_j),
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
        scalar_t m2 = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < C; ++j) m2 = j != am && zi[j] > m2 ? zi[j] : m2;
        scalar_t r2 = 0;  // sum_{j != argmax} e^{z_j - M2} >= 1
        for (int64_t j = 0; j < C; ++j) r2 += j == am ? scalar_t(0) : std::exp(zi[j] - m2);
        scalar_t loss = 0, wsum = 0;
        scalar_t* gi = need_grad ? grad.data_ptr<scalar_t>() + i * C : nullptr;
        for (int64_t k = 0; k < C; ++k) {
          if (wi[k] == 0) continue;
          wsum += wi[k];
          if (k == am) {
            loss += wi[k] * (std::log(sum) - (m2 - mx) - std::log(r2));
            if (need_grad) {
              for (int64_t j = 0; j < C; ++j) gi[j] -= j == k ? scalar_t(0) : wi[k] * std::exp(zi[j] - m2) / r2;
            }
            continue;
          }
          const scalar_t rest = sum - e[k];  // sum_{j != k} e^{z_j - M}, holds the max term
          loss += wi[k] * (std::log(sum) - std::log(rest));
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
  m.def("contrastive_dense(Tensor a, Tensor? c, Tensor a_labels, Tensor c_labels, Tensor a_valid, Tensor c_valid, "
        "float temperature, int metric, bool exclude_self, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("candidate_softmax(Tensor anchor, Tensor candidates, Tensor candidate_valid, float temperature, int metric, "
        "bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("indexed_candidate_softmax(Tensor anchor, Tensor positive, Tensor pool, Tensor index, Tensor valid, "
        "float temperature, int metric, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("indexed_pool_grad(Tensor anchor, Tensor pool, Tensor index, Tensor valid, Tensor coef, Tensor scale, "
        "int metric) -> Tensor");
  m.def("indexed_rows_probe(Tensor pool, Tensor index, Tensor valid) -> Tensor");
  m.def("negative_learning(Tensor logits, Tensor weights, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xlt_fast_C, CPU, m) {
  m.impl("contrastive_dense", &contrastive_dense_cpu);
  m.impl("candidate_softmax", &candidate_softmax_cpu);
  m.impl("indexed_candidate_softmax", &indexed_candidate_softmax_cpu);
  m.impl("indexed_pool_grad", &indexed_pool_grad_cpu);
  m.impl("indexed_rows_probe", &indexed_rows_probe_cpu);
  m.impl("negative_learning", &negative_learning_cpu);
}

}  // namespace xlt_fast
