// Vectorisable fp32 math shared by the C++ CPU kernels.
//
// std::exp is a library call: a loop that calls it cannot vectorise (without -ffast-math). exp_f32
// is branch-free and force-inlined so that `#pragma omp simd` loops and the auto-vectoriser turn
// it into AVX2 / AVX-512 code: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln 2), e^r by the
// Cephes expf polynomial, 2^n through the exponent bits; about 2 ulp. Below -87 it returns exactly 0
// (so -inf gives 0, and never a subnormal: those would slow every later GEMM on the results by
// orders of magnitude); above 88.72 it gives +inf, like expf. fp64 callers keep the C library
// (exactness path).
//
// Include this header first in a kernel file: its pragma must precede the code it applies to.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// The selects only vectorise when FP operations may be speculated, i.e. without trapping math;
// torch itself is built with -fno-trapping-math. Applies to the including file's functions.
#pragma GCC optimize("no-trapping-math")
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Row functions compiled for AVX-512, AVX2 and baseline x86-64, picked at load time.
#define XLT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define XLT_CLONES
#endif
// Helpers must inline into the vectorised loops (a call blocks vectorisation).
#define XLT_INLINE inline __attribute__((always_inline))

namespace xlt_fast {

XLT_INLINE float exp_f32(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  const float v = e * two_n;
  return x > 88.72f ? std::numeric_limits<float>::infinity() : (x < -87.0f ? 0.0f : v);
}

XLT_INLINE float exp_any(float x) { return exp_f32(x); }
XLT_INLINE double exp_any(double x) { return std::exp(x); }

}  // namespace xlt_fast
