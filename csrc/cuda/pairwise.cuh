// Launchers of the CUDA pairwise kernels. No torch headers: raw pointers, sizes and a stream, so
// that `nvcc -c` compiles the kernels anywhere; the torch-facing binding is pairwise_binding.cpp.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace xlt_fast {
namespace cuda {

// out[b, i, j] = |x[b, i] - y[b, j]|^2 (or <x[b, i], y[b, j]> when dot) for contiguous row-major
// x (B, n, d), y (B, m, d), out (B, n, m); T is float or double, which is also the accumulation
// type. Entries with D <= refine_tol * (|x_i|^2 + |y_j|^2) are recomputed exactly. Launches on
// `stream` and returns without synchronising; the caller checks cudaGetLastError().
template <typename T>
void launch_pairwise_sqdist(const T* x, const T* y, T* out, int64_t B, int64_t n, int64_t m, int64_t d,
                            bool dot, double refine_tol, cudaStream_t stream);

}  // namespace cuda
}  // namespace xlt_fast
