// Launchers of the CUDA affine coupling epilogue (coupling.cu), shared with its torch binding.
// Plain pointers and strides: no torch headers, so that nvcc compiles coupling.cu anywhere.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace xlt_fast {
namespace cuda {

// Rows are n, features d (d <= 196608), dm = number of True entries of mask (the width of s_raw
// and t); every s* is a row stride in elements (feature stride 1). scale: 0 exp, 1 tanh, 2 atan.
struct CouplingArgs {
  bool double_precision = false;  // float64 tensors, else float32
  int64_t n = 0, d = 0, dm = 0;
  int scale = 0;
  double clamp = 2.0;
  bool inverse = false;
  const bool* mask = nullptr;       // d bools, True = transformed feature
  const void* x = nullptr;          // forward input (forward and backward)
  const void* s_raw = nullptr;
  const void* t = nullptr;
  int64_t sx = 0, ss = 0, st = 0;
  void* y = nullptr;                // forward outputs
  void* logdet = nullptr;
  int64_t sy = 0;
  const void* grad_y = nullptr;     // backward inputs
  const void* grad_logdet = nullptr;
  int64_t sgy = 0;
  void* grad_x = nullptr;           // backward outputs
  void* grad_s = nullptr;
  void* grad_t = nullptr;
  int64_t sgx = 0, sgs = 0, sgt = 0;
};

// Launch on `stream`; returns the launch error (cudaSuccess, or cudaErrorInvalidValue for bad args).
cudaError_t coupling_forward(const CouplingArgs& args, cudaStream_t stream);
cudaError_t coupling_backward(const CouplingArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace xlt_fast
