// Fused affine coupling epilogue on the GPU (Real-NVP, Dinh et al. 2017, eqs. 7-8); no torch headers.
//
// One block per row. Each thread takes features j = threadIdx.x, + blockDim.x, ...; pos[j] is the
// index of feature j among the transformed features (mask True) or -1 for a copied feature, so
// x/y accesses are coalesced and s_raw/t are read in feature order.
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
               int64_t st, const int32_t* __restrict__ pos, T* __restrict__ y, int64_t sy, T* __restrict__ logdet,
               int64_t d, T c) {
  const int64_t row = blockIdx.x;
  x += row * sx;
  y += row * sy;
  sr += row * ss;
  t += row * st;
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const int32_t p = pos[j];
    const T xv = x[j];
    if (p < 0) {
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
                const int32_t* __restrict__ pos, T* __restrict__ gx, int64_t sgx, T* __restrict__ gs, int64_t sgs,
                T* __restrict__ gt, int64_t sgt, int64_t d, T c) {
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
    const int32_t p = pos[j];
    const T gv = g[j];
    if (p < 0) {
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

template <typename T, int S, bool INV>
void launch_forward(const CouplingArgs& a, cudaStream_t stream) {
  forward_kernel<T, S, INV><<<static_cast<unsigned>(a.n), threads_for(a.d), 0, stream>>>(
      static_cast<const T*>(a.x), a.sx, static_cast<const T*>(a.s_raw), a.ss, static_cast<const T*>(a.t), a.st,
      a.pos, static_cast<T*>(a.y), a.sy, static_cast<T*>(a.logdet), a.d, static_cast<T>(a.clamp));
}

template <typename T, int S, bool INV>
void launch_backward(const CouplingArgs& a, cudaStream_t stream) {
  backward_kernel<T, S, INV><<<static_cast<unsigned>(a.n), threads_for(a.d), 0, stream>>>(
      static_cast<const T*>(a.grad_y), a.sgy, static_cast<const T*>(a.grad_logdet), static_cast<const T*>(a.x), a.sx,
      static_cast<const T*>(a.s_raw), a.ss, static_cast<const T*>(a.t), a.st, a.pos, static_cast<T*>(a.grad_x),
      a.sgx, static_cast<T*>(a.grad_s), a.sgs, static_cast<T*>(a.grad_t), a.sgt, a.d, static_cast<T>(a.clamp));
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

}  // namespace

cudaError_t coupling_forward(const CouplingArgs& a, cudaStream_t stream) {
  if (a.scale < 0 || a.scale > 2 || a.n > 0x7fffffff) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  if (a.double_precision) dispatch<double, false>(a, stream);
  else dispatch<float, false>(a, stream);
  return cudaGetLastError();
}

cudaError_t coupling_backward(const CouplingArgs& a, cudaStream_t stream) {
  if (a.scale < 0 || a.scale > 2 || a.n > 0x7fffffff) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  if (a.double_precision) dispatch<double, true>(a, stream);
  else dispatch<float, true>(a, stream);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace xlt_fast
