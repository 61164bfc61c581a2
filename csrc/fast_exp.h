// Vectorisable exp for the softmax loops of the CPU kernels.
//
// std::exp is a library call that the compiler cannot vectorise without -ffast-math. For float,
// exp(x) = 2^k * e^r with k = round(x / ln 2) and r = x - k ln 2 (Cody-Waite split of ln 2 into
// a part exact in float and a correction), e^r by a degree-6 polynomial on |r| <= ln 2 / 2
// (the classic Cephes expf coefficients); relative error about 1 ulp, all branch-free selects
// so `#pragma omp simd` loops vectorise. Arguments below -87 (including -inf) give 0.
// Double keeps std::exp: fp64 is the exactness path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace xlt_fast {

inline float exp_approx(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round to nearest by a truncating conversion (vectorises on every x86-64, unlike floor)
  const float t = xc * 1.44269504088896341f;
  const int32_t ki = static_cast<int32_t>(t + (t < 0 ? -0.5f : 0.5f));
  const float k = static_cast<float>(ki);
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_approx(double x) { return std::exp(x); }

}  // namespace xlt_fast
