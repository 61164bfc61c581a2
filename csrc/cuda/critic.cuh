// Launchers of the fused critic + gradient-penalty stages on the GPU (critic.cu). No torch headers:
// raw pointers, sizes and a stream; the torch-facing binding is critic_binding.cpp. All arrays are
// contiguous row-major; T is float or double; sums accumulate in double. Each launcher enqueues on
// `stream` and returns without synchronising; the caller checks cudaGetLastError().
// Notation as in csrc/critic_cpu.cpp: N = n + m rows, K interpolated rows, H hidden, k classes.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace xlt_fast {
namespace cuda {

// h (N, H) pre-activations, f (N,) critic values, mask_mix / u_mix (K, H) of the interpolated rows,
// estimate = sum_r coef_r f_r. y is (N, H*k); p (N, k) or nullptr (k == 1); b2 and estimate are
// single device values.
template <typename T>
void launch_critic_rows_fwd(const T* y, const T* p, const T* b1, const T* w2, const T* b2, const T* coef,
                            const T* alpha, int64_t N, int64_t n_src, int64_t K, int64_t H, int64_t k, T* f, T* h,
                            T* mask_mix, T* u_mix, T* estimate, cudaStream_t stream);

// out = mean_i |g_i|^2 for g (K, D); `work` holds K values of scratch.
template <typename T>
void launch_critic_penalty(const T* g, int64_t K, int64_t D, T* work, T* out, cudaStream_t stream);

// e (N, H*k) = coef_r 1[h_rj > 0] w2_j p_rc, grad_b1, grad_w2 (H,); `work` holds
// 2 * ceil(N / kRowChunk) * H values of scratch (critic_rows_bwd_work gives the count).
template <typename T>
void launch_critic_rows_bwd(const T* h, const T* p, const T* w2, const T* coef, int64_t N, int64_t H, int64_t k,
                            T* e, T* grad_b1, T* grad_w2, T* work, cudaStream_t stream);
int64_t critic_rows_bwd_work(int64_t N, int64_t H);

// grad_w1 (H, D) += scale w2_j t_j in place; grad_w2_pen_j = scale (w1_j . t_j). scale is a device value.
template <typename T>
void launch_critic_gp_epilogue(T* grad_w1, const T* t, const T* w1, const T* w2, const T* scale, int64_t H,
                               int64_t D, T* grad_w2_pen, cudaStream_t stream);

}  // namespace cuda
}  // namespace xlt_fast
