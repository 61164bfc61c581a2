// Tiled pairwise squared distances (or dot products) on the GPU, plain FMA (no tensor cores).
//
// A block computes a kTile x kTile tile of one problem. Over chunks of BK features it stages
// x[rows, k0:k0+BK] and y[cols, k0:k0+BK] transposed in shared memory and accumulates
// G_ij = sum_k x_ik y_jk, while 2 kTile threads (one per row of x and of y) accumulate the
// tile's norms |x_i|^2 and |y_j|^2.
// Then D_ij = |x_i|^2 + |y_j|^2 - 2 G_ij. That expansion cancels when D_ij is small next to the
// norms, so if any entry of the tile has D_ij <= tol * (|x_i|^2 + |y_j|^2) the block streams the
// chunks again and recomputes sum_k (x_ik - y_jk)^2 for those entries: exact zero for identical
// rows, full relative accuracy for close pairs. Results are clamped at 0.
#include "pairwise.cuh"

namespace xlt_fast {
namespace cuda {
namespace {

constexpr int kTile = 64;                 // output tile edge
constexpr int kGrid = 16;                 // threads per tile edge: kGrid x kGrid threads per block
constexpr int kSub = kTile / kGrid;       // each thread owns kSub x kSub entries, kGrid apart
constexpr int kThreads = kGrid * kGrid;
constexpr int kStride = kTile + 1;        // padded row of a shared tile: conflict-free transposed stores
constexpr int64_t kMaxGridY = 65535;      // batch goes on gridDim.y

// Features per chunk: 32 floats (a warp reads 128 contiguous bytes of one row) or 16 doubles.
template <typename T> struct Chunk;
template <> struct Chunk<float> { static constexpr int value = 32; };
template <> struct Chunk<double> { static constexpr int value = 16; };

// s[k][r] = src[row0 + r, k0 + k] (0 outside the matrix). Consecutive threads take consecutive k
// of one row, so global reads are coalesced.
template <typename T, int BK>
__device__ __forceinline__ void load_chunk(T (*s)[kStride], const T* __restrict__ src, int64_t rows, int64_t d,
                                           int64_t row0, int64_t k0) {
  const int k = threadIdx.x % BK;
  const int64_t gk = k0 + k;
#pragma unroll
  for (int r = threadIdx.x / BK; r < kTile; r += kThreads / BK) {
    const int64_t gr = row0 + r;
    s[k][r] = (gr < rows && gk < d) ? src[gr * d + gk] : T(0);
  }
}

// out[row0 + ty + kGrid i, col0 + tx + kGrid j] = v[i][j] for the entries whose bit i * kSub + j is
// set in mask and that lie inside (n, m). A row of kGrid threads writes kGrid consecutive entries:
// coalesced stores.
template <typename T>
__device__ __forceinline__ void store_entries(T* __restrict__ out, const T (&v)[kSub][kSub], unsigned mask, int64_t n,
                                              int64_t m, int64_t row0, int64_t col0, int tx, int ty) {
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
    const int64_t r = row0 + ty + kGrid * i;
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t c = col0 + tx + kGrid * j;
      if (r < n && c < m && (mask >> (i * kSub + j)) & 1u) out[r * m + c] = v[i][j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sqdist_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int64_t n, int64_t m,
              int64_t d, int64_t tiles_m, bool dot, T tol) {
  constexpr int BK = Chunk<T>::value;
  __shared__ T xs[BK][kStride];
  __shared__ T ys[BK][kStride];
  __shared__ T norm_x[kTile];
  __shared__ T norm_y[kTile];

  const int64_t b = blockIdx.y;
  x += b * n * d;
  y += b * m * d;
  out += b * n * m;
  const int64_t row0 = (blockIdx.x / tiles_m) * kTile;
  const int64_t col0 = (blockIdx.x % tiles_m) * kTile;
  const int tx = threadIdx.x % kGrid;  // this thread's entries: rows ty + kGrid * i, cols tx + kGrid * j
  const int ty = threadIdx.x / kGrid;

  T acc[kSub][kSub];
#pragma unroll
  for (int i = 0; i < kSub; ++i)
#pragma unroll
    for (int j = 0; j < kSub; ++j) acc[i][j] = T(0);
  // threads [0, kTile) own |x_row|^2 of tile row t, threads [kTile, 2 kTile) |y_col|^2
  const bool norm_thread = !dot && threadIdx.x < 2 * kTile;
  const T* norm_src = threadIdx.x < kTile ? &xs[0][threadIdx.x] : &ys[0][threadIdx.x % kTile];
  T norm = T(0);

  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    load_chunk<T, BK>(xs, x, n, d, row0, k0);
    load_chunk<T, BK>(ys, y, m, d, col0, k0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[kSub], c[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        a[i] = xs[k][ty + kGrid * i];
        c[i] = ys[k][tx + kGrid * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i)
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] = fma(a[i], c[j], acc[i][j]);
    }
    if (norm_thread) {
#pragma unroll
      for (int k = 0; k < BK; ++k) norm = fma(norm_src[k * kStride], norm_src[k * kStride], norm);
    }
    __syncthreads();
  }

  if (dot) {
    store_entries(out, acc, ~0u, n, m, row0, col0, tx, ty);
    return;
  }
  if (threadIdx.x < kTile) norm_x[threadIdx.x] = norm;
  else if (threadIdx.x < 2 * kTile) norm_y[threadIdx.x - kTile] = norm;
  __syncthreads();
  unsigned refine = 0;  // bit i * kSub + j: entry (i, j) needs the exact recomputation
#pragma unroll
  for (int i = 0; i < kSub; ++i)
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const T scale = norm_x[ty + kGrid * i] + norm_y[tx + kGrid * j];
      const T dist = scale - T(2) * acc[i][j];
      if (scale > 0 && dist <= tol * scale) refine |= 1u << (i * kSub + j);  // zero rows: exact 0 already
      acc[i][j] = dist > T(0) ? dist : T(0);
    }
  store_entries(out, acc, ~0u, n, m, row0, col0, tx, ty);
  // Block-uniform condition: every thread reaches the barriers inside. The refined entries are
  // accumulated in acc again and overwrite what was just stored.
  if (__syncthreads_or(refine != 0)) {
#pragma unroll
    for (int i = 0; i < kSub; ++i)
#pragma unroll
      for (int j = 0; j < kSub; ++j) acc[i][j] = T(0);
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      load_chunk<T, BK>(xs, x, n, d, row0, k0);
      load_chunk<T, BK>(ys, y, m, d, col0, k0);
      __syncthreads();
      if (refine) {
#pragma unroll 4
        for (int k = 0; k < BK; ++k)
#pragma unroll
          for (int i = 0; i < kSub; ++i)
#pragma unroll
            for (int j = 0; j < kSub; ++j) {
              const T diff = xs[k][ty + kGrid * i] - ys[k][tx + kGrid * j];
              acc[i][j] = fma(diff, diff, acc[i][j]);
            }
      }
      __syncthreads();
    }
    store_entries(out, acc, refine, n, m, row0, col0, tx, ty);
  }
}

}  // namespace

template <typename T>
void launch_pairwise_sqdist(const T* x, const T* y, T* out, int64_t B, int64_t n, int64_t m, int64_t d,
                            bool dot, double refine_tol, cudaStream_t stream) {
  if (B == 0 || n == 0 || m == 0) return;
  const int64_t tiles_n = (n + kTile - 1) / kTile;
  const int64_t tiles_m = (m + kTile - 1) / kTile;
  // gridDim.y holds at most kMaxGridY problems: larger batches go in several launches.
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {
    const int64_t nb = B - b0 < kMaxGridY ? B - b0 : kMaxGridY;
    const dim3 grid(static_cast<unsigned>(tiles_n * tiles_m), static_cast<unsigned>(nb));
    sqdist_kernel<T><<<grid, kThreads, 0, stream>>>(x + b0 * n * d, y + b0 * m * d, out + b0 * n * m, n, m, d,
                                                    tiles_m, dot, static_cast<T>(refine_tol));
  }
}

template void launch_pairwise_sqdist<float>(const float*, const float*, float*, int64_t, int64_t, int64_t,
                                            int64_t, bool, double, cudaStream_t);
template void launch_pairwise_sqdist<double>(const double*, const double*, double*, int64_t, int64_t, int64_t,
                                             int64_t, bool, double, cudaStream_t);

}  // namespace cuda
}  // namespace xlt_fast
