// Fused stages of the Wasserstein critic + zero-centred gradient penalty on the GPU (the GEMMs
// around them run in cuBLAS; see xlt_fast/ops/critic.py for the math and csrc/critic_cpu.cpp for
// the CPU twin). Every reduction is a fixed-order tree (no atomics): results are deterministic.
#include "critic.cuh"

namespace xlt_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowChunk = 128;  // rows per partial column sum in the estimate's backward
constexpr int64_t kMaxGrid = 2147483647;

// Sum of v over the block (every thread gets it). Needs blockDim.x a multiple of 32, <= 1024.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = threadIdx.x < warps ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[0] = v;
  }
  __syncthreads();
  return warp_sums[0];
}

// h_j = b1_j + sum_c p_c y[j*k + c] (p == nullptr: k == 1).
template <typename T>
__device__ __forceinline__ T preact(const T* __restrict__ y, const T* p, int64_t j, int64_t k, T b1j) {
  if (p == nullptr) return b1j + y[j];
  double s = 0;
  for (int64_t c = 0; c < k; ++c) s += static_cast<double>(p[c]) * y[j * k + c];
  return b1j + static_cast<T>(s);
}

// Block r < N: row r's pre-activations and critic value. Block N + i: interpolated row i,
// x~ = a x_s + (1 - a) x_t on the segment between the critic inputs (x = p (x) z with CDAN), whose
// pre-activation W1 x~ + b1 = a h_s + (1 - a) h_t (W1 is linear), formed from y and p.
template <typename T>
__global__ void rows_fwd_kernel(const T* __restrict__ y, const T* __restrict__ p, const T* __restrict__ b1,
                                const T* __restrict__ w2, const T* __restrict__ b2, const T* __restrict__ alpha,
                                int64_t N, int64_t n_src, int64_t H, int64_t k, T* __restrict__ f,
                                T* __restrict__ h, T* __restrict__ mask_mix, T* __restrict__ u_mix) {
  const int64_t r = blockIdx.x, Hk = H * k;
  if (r < N) {
    const T* yr = y + r * Hk;
    const T* pr = p ? p + r * k : nullptr;
    double acc = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T v = preact(yr, pr, j, k, b1[j]);
      h[r * H + j] = v;
      if (v > T(0)) acc += static_cast<double>(w2[j]) * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) f[r] = static_cast<T>(acc) + *b2;
    return;
  }
  const int64_t i = r - N;
  const T a = alpha[i], b = T(1) - alpha[i];
  const T* ys = y + i * Hk;
  const T* yt = y + (n_src + i) * Hk;
  const T* ps = p ? p + i * k : nullptr;
  const T* pt = p ? p + (n_src + i) * k : nullptr;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const bool on = a * preact(ys, ps, j, k, b1[j]) + b * preact(yt, pt, j, k, b1[j]) > T(0);
    mask_mix[i * H + j] = on ? T(1) : T(0);
    u_mix[i * H + j] = on ? w2[j] : T(0);
  }
}

// out = scale * sum_r a_r b_r (b == nullptr: sum_r a_r), one block.
template <typename T>
__global__ void dot_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, double scale, T* out) {
  double acc = 0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) acc += b ? static_cast<double>(a[r]) * b[r] : a[r];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<T>(scale * acc);
}

// work_i = |g_i|^2, one block per row.
template <typename T>
__global__ void row_sqnorm_kernel(const T* __restrict__ g, int64_t D, T* __restrict__ work) {
  const T* gi = g + static_cast<int64_t>(blockIdx.x) * D;
  double acc = 0;
  for (int64_t x = threadIdx.x; x < D; x += blockDim.x) acc += static_cast<double>(gi[x]) * gi[x];
  acc = block_sum(acc);
  if (threadIdx.x == 0) work[blockIdx.x] = static_cast<T>(acc);
}

// e[r, j*k + c] = coef_r 1[h_rj > 0] w2_j p_rc, one block per row, consecutive threads on consecutive
// entries (coalesced stores).
template <typename T>
__global__ void rows_bwd_e_kernel(const T* __restrict__ h, const T* __restrict__ p, const T* __restrict__ w2,
                                  const T* __restrict__ coef, int64_t H, int64_t k, T* __restrict__ e) {
  const int64_t r = blockIdx.x, Hk = H * k;
  const T cr = coef[r];
  for (int64_t x = threadIdx.x; x < Hk; x += blockDim.x) {
    const int64_t j = x / k;
    const T d = h[r * H + j] > T(0) ? cr * w2[j] : T(0);
    e[r * Hk + x] = p ? d * p[r * k + x % k] : d;
  }
}

// Partial column sums over a chunk of kRowChunk rows: work[0][chunk][j] = sum_r coef_r 1[h_rj > 0],
// work[1][chunk][j] = sum_r coef_r relu(h_rj). Threads run over columns (coalesced reads).
template <typename T>
__global__ void rows_bwd_partial_kernel(const T* __restrict__ h, const T* __restrict__ coef, int64_t N, int64_t H,
                                        int64_t chunks, T* __restrict__ work) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  const int64_t chunk = blockIdx.y, r0 = chunk * kRowChunk;
  const int64_t r1 = r0 + kRowChunk < N ? r0 + kRowChunk : N;
  double sb = 0, sw = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T v = h[r * H + j];
    if (v > T(0)) {
      sb += coef[r];
      sw += static_cast<double>(coef[r]) * v;
    }
  }
  work[chunk * H + j] = static_cast<T>(sb);
  work[(chunks + chunk) * H + j] = static_cast<T>(sw);
}

template <typename T>
__global__ void rows_bwd_finish_kernel(const T* __restrict__ work, const T* __restrict__ w2, int64_t H, int64_t chunks,
                                       T* __restrict__ grad_b1, T* __restrict__ grad_w2) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  double sb = 0, sw = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    sb += work[c * H + j];
    sw += work[(chunks + c) * H + j];
  }
  grad_b1[j] = static_cast<T>(sb * w2[j]);
  grad_w2[j] = static_cast<T>(sw);
}

// One block per row j of W1: grad_w1_j += scale w2_j t_j and grad_w2_pen_j = scale (w1_j . t_j).
template <typename T>
__global__ void gp_epilogue_kernel(T* __restrict__ grad_w1, const T* __restrict__ t, const T* __restrict__ w1,
                                   const T* __restrict__ w2, const T* __restrict__ scale, int64_t D,
                                   T* __restrict__ grad_w2_pen) {
  const int64_t j = blockIdx.x;
  const T s = *scale, sw = s * w2[j];
  double dot = 0;
  for (int64_t x = threadIdx.x; x < D; x += blockDim.x) {
    const T tv = t[j * D + x];
    grad_w1[j * D + x] += sw * tv;
    dot += static_cast<double>(w1[j * D + x]) * tv;
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) grad_w2_pen[j] = static_cast<T>(static_cast<double>(s) * dot);
}

}  // namespace

template <typename T>
void launch_critic_rows_fwd(const T* y, const T* p, const T* b1, const T* w2, const T* b2, const T* coef,
                            const T* alpha, int64_t N, int64_t n_src, int64_t K, int64_t H, int64_t k, T* f, T* h,
                            T* mask_mix, T* u_mix, T* estimate, cudaStream_t stream) {
  if (N + K > kMaxGrid) return;  // the binding rejects such sizes first
  rows_fwd_kernel<T><<<static_cast<unsigned>(N + K), kThreads, 0, stream>>>(y, p, b1, w2, b2, alpha, N, n_src, H, k,
                                                                          f, h, mask_mix, u_mix);
  dot_kernel<T><<<1, kThreads, 0, stream>>>(coef, f, N, 1.0, estimate);
}

template <typename T>
void launch_critic_penalty(const T* g, int64_t K, int64_t D, T* work, T* out, cudaStream_t stream) {
  row_sqnorm_kernel<T><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(g, D, work);
  dot_kernel<T><<<1, kThreads, 0, stream>>>(work, nullptr, K, 1.0 / static_cast<double>(K), out);
}

int64_t critic_rows_bwd_work(int64_t N, int64_t H) { return 2 * ((N + kRowChunk - 1) / kRowChunk) * H; }

template <typename T>
void launch_critic_rows_bwd(const T* h, const T* p, const T* w2, const T* coef, int64_t N, int64_t H, int64_t k,
                            T* e, T* grad_b1, T* grad_w2, T* work, cudaStream_t stream) {
  rows_bwd_e_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(h, p, w2, coef, H, k, e);
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
  const dim3 grid(static_cast<unsigned>((H + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
  rows_bwd_partial_kernel<T><<<grid, kThreads, 0, stream>>>(h, coef, N, H, chunks, work);
  rows_bwd_finish_kernel<T><<<static_cast<unsigned>((H + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      work, w2, H, chunks, grad_b1, grad_w2);
}

template <typename T>
void launch_critic_gp_epilogue(T* grad_w1, const T* t, const T* w1, const T* w2, const T* scale, int64_t H,
                               int64_t D, T* grad_w2_pen, cudaStream_t stream) {
  gp_epilogue_kernel<T><<<static_cast<unsigned>(H), kThreads, 0, stream>>>(grad_w1, t, w1, w2, scale, D, grad_w2_pen);
}

#define XLT_CRITIC_INSTANTIATE(T)                                                                                  \
  template void launch_critic_rows_fwd<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,    \
                                          int64_t, int64_t, int64_t, int64_t, int64_t, T*, T*, T*, T*, T*,         \
                                          cudaStream_t);                                                           \
  template void launch_critic_penalty<T>(const T*, int64_t, int64_t, T*, T*, cudaStream_t);                        \
  template void launch_critic_rows_bwd<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, T*,   \
                                          T*, T*, T*, cudaStream_t);                                               \
  template void launch_critic_gp_epilogue<T>(T*, const T*, const T*, const T*, const T*, int64_t, int64_t, T*,     \
                                             cudaStream_t);
XLT_CRITIC_INSTANTIATE(float)
XLT_CRITIC_INSTANTIATE(double)
#undef XLT_CRITIC_INSTANTIATE

}  // namespace cuda
}  // namespace xlt_fast
