// Fused affine coupling epilogue on the GPU (Real-NVP, Dinh et al. 2017, eqs. 4-8); no torch headers.
//
// One block per row. Each thread takes features j = threadIdx.x, + blockDim.x, ... (coalesced x/y
// accesses). The block first packs the bool mask into 32-bit words in shared memory (warp ballots)
// with the exclusive prefix count of each word, so the index of feature j among the transformed
// features is pre[j / 32] + popc(word & lower bits): no extra launch to build an index map.
//   forward  y_j = x_j exp(s) + t,      logdet = +sum s       (s = g(s_raw[pos_j]))
//   inverse  y_j = (x_j - t) exp(-s),   logdet = -sum s
// g: 0 "exp" g(u) = u; 1 "tanh" c tanh(u/c); 2 "atan" c (2/pi) atan(u/c).
// The log-det row sum accumulates in the input type (fp32 / fp64) with a warp-shuffle + shared
// memory block reduction. The backward kernel writes dL/dx, dL/ds_raw, dL/dt in one pass.
#include "coupling.cuh"

namespace xlt_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kTwoOverPi = 0.63661977236758134308;

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float dev_atan(float x) { return atanf(x); }
__device__ __forceinline__ double dev_atan(double x) { return atan(x); }

template <typename T> struct LogScale { T s, ds; };

template <typename T, int S>
__device__ __forceinline__ LogScale<T> scale_map(T u, T c) {
  if (S == 1) {
    const T th = dev_tanh(u / c);
    return {c * th, T(1) - th * th};
  } else if (S == 2) {
    const T z = u / c;
    return {c * T(kTwoOverPi) * dev_atan(z), T(kTwoOverPi) / (T(1) + z * z)};
  }
  return {u, T(1)};
}

// Packs mask (d bools) into bits[nwords] and the exclusive prefix popcounts into pre[nwords]
// (shared memory, nwords = ceil(d / 32)); ends with a barrier.
__device__ __forceinline__ void pack_mask(const bool* __restrict__ mask, int64_t d, uint32_t* bits, uint32_t* pre) {
  const int nwords = static_cast<int>((d + 31) / 32);
  const int lane = threadIdx.x % 32;
  for (int w = threadIdx.x / 32; w < nwords; w += blockDim.x / 32) {
    const int64_t j = static_cast<int64_t>(w) * 32 + lane;
    const uint32_t b = __ballot_sync(0xffffffffu, j < d && mask[j]);
    if (lane == 0) bits[w] = b;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t carry = 0;
    for (int base = 0; base < nwords; base += 32) {
      const int w = base + lane;
      const uint32_t c = w < nwords ? __popc(bits[w]) : 0u;
      uint32_t v = c;  // inclusive warp scan of the counts
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t up = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += up;
      }
      if (w < nwords) pre[w] = carry + v - c;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
}

// Index of feature j among the transformed features, or -1 where mask[j] is False.
__device__ __forceinline__ int64_t position(const uint32_t* bits, const uint32_t* pre, int64_t j) {
  const uint32_t b = bits[j >> 5];
  const uint32_t bit = static_cast<uint32_t>(j & 31);
  if (!((b >> bit) & 1u)) return -1;
  return static_cast<int64_t>(pre[j >> 5]) + __popc(b & ((1u << bit) - 1u));
}

// Sum of v over the block; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = T(0);
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? partial[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T, int S, bool INV>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ sr, int64_t ss, const T* __restrict__ t,
               int64_t st, const bool* __restrict__ mask, T* __restrict__ y, int64_t sy, T* __restrict__ logdet,
               int64_t d, int64_t dm, T c) {
  extern __shared__ uint32_t smem[];
  uint32_t* bits = smem;
  uint32_t* pre = smem + (d + 31) / 32;
  pack_mask(mask, d, bits, pre);
  const int64_t row = blockIdx.x;
  x += row * sx;
  y += row * sy;
  sr += row * ss;
  t += row * st;
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const int64_t p = position(bits, pre, j);
    const T xv = x[j];
    if (p < 0 || p >= dm) {  // p >= dm only for a mask that does not match s_raw (checked in Python)
      y[j] = xv;
    } else {
      const T s = scale_map<T, S>(sr[p], c).s;
      y[j] = INV ? (xv - t[p]) * dev_exp(-s) : xv * dev_exp(s) + t[p];
      acc += s;
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) logdet[row] = INV ? -acc : acc;
}

template <typename T, int S, bool INV>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ g, int64_t sg, const T* __restrict__ gl, const T* __restrict__ x, int64_t sx,
                const T* __restrict__ sr, int64_t ss, const T* __restrict__ t, int64_t st,
                const bool* __restrict__ mask, T* __restrict__ gx, int64_t sgx, T* __restrict__ gs, int64_t sgs,
                T* __restrict__ gt, int64_t sgt, int64_t d, int64_t dm, T c) {
  extern __shared__ uint32_t smem[];
  uint32_t* bits = smem;
  uint32_t* pre = smem + (d + 31) / 32;
  pack_mask(mask, d, bits, pre);
  const int64_t row = blockIdx.x;
  g += row * sg;
  x += row * sx;
  sr += row * ss;
  t += row * st;
  gx += row * sgx;
  gs += row * sgs;
  gt += row * sgt;
  const T gld = gl[row];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const int64_t p = position(bits, pre, j);
    const T gv = g[j];
    if (p < 0 || p >= dm) {
      gx[j] = gv;
      continue;
    }
    const LogScale<T> m = scale_map<T, S>(sr[p], c);
    if (INV) {
      const T ge = gv * dev_exp(-m.s);
      gx[j] = ge;
      gt[p] = -ge;
      gs[p] = -(ge * (x[j] - t[p]) + gld) * m.ds;
    } else {
      const T e = dev_exp(m.s);
      gx[j] = gv * e;
      gt[p] = gv;
      gs[p] = (gv * x[j] * e + gld) * m.ds;
    }
  }
}

int threads_for(int64_t d) {
  const int64_t warps = (d + 31) / 32;
  return static_cast<int>(warps >= kThreads / 32 ? kThreads : warps * 32);
}

// Dynamic shared memory: the packed mask and its prefix counts.
size_t smem_for(int64_t d) { return static_cast<size_t>((d + 31) / 32) * 2 * sizeof(uint32_t); }
constexpr size_t kMaxSmem = 48 * 1024;  // default limit without opt-in: d <= 196608

template <typename T, int S, bool INV>
void launch_forward(const CouplingArgs& a, cudaStream_t stream) {
  forward_kernel<T, S, INV><<<static_cast<unsigned>(a.n), threads_for(a.d), smem_for(a.d), stream>>>(
      static_cast<const T*>(a.x), a.sx, static_cast<const T*>(a.s_raw), a.ss, static_cast<const T*>(a.t), a.st,
      a.mask, static_cast<T*>(a.y), a.sy, static_cast<T*>(a.logdet), a.d, a.dm, static_cast<T>(a.clamp));
}

template <typename T, int S, bool INV>
void launch_backward(const CouplingArgs& a, cudaStream_t stream) {
  backward_kernel<T, S, INV><<<static_cast<unsigned>(a.n), threads_for(a.d), smem_for(a.d), stream>>>(
      static_cast<const T*>(a.grad_y), a.sgy, static_cast<const T*>(a.grad_logdet), static_cast<const T*>(a.x), a.sx,
      static_cast<const T*>(a.s_raw), a.ss, static_cast<const T*>(a.t), a.st, a.mask, static_cast<T*>(a.grad_x),
      a.sgx, static_cast<T*>(a.grad_s), a.sgs, static_cast<T*>(a.grad_t), a.sgt, a.d, a.dm,
      static_cast<T>(a.clamp));
}

template <typename T, bool BWD>
void dispatch(const CouplingArgs& a, cudaStream_t stream) {
  using Fn = void (*)(const CouplingArgs&, cudaStream_t);
  static const Fn table[2][3][2] = {
      {{launch_forward<T, 0, false>, launch_forward<T, 0, true>},
       {launch_forward<T, 1, false>, launch_forward<T, 1, true>},
       {launch_forward<T, 2, false>, launch_forward<T, 2, true>}},
      {{launch_backward<T, 0, false>, launch_backward<T, 0, true>},
       {launch_backward<T, 1, false>, launch_backward<T, 1, true>},
       {launch_backward<T, 2, false>, launch_backward<T, 2, true>}}};
  table[BWD][a.scale][a.inverse ? 1 : 0](a, stream);
}

bool valid(const CouplingArgs& a) {
  return a.scale >= 0 && a.scale <= 2 && a.n <= 0x7fffffff && a.d >= 1 && smem_for(a.d) <= kMaxSmem;
}

}  // namespace

cudaError_t coupling_forward(const CouplingArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  if (a.double_precision) dispatch<double, false>(a, stream);
  else dispatch<float, false>(a, stream);
  return cudaGetLastError();
}

cudaError_t coupling_backward(const CouplingArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  if (a.double_precision) dispatch<double, true>(a, stream);
  else dispatch<float, true>(a, stream);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace xlt_fast
