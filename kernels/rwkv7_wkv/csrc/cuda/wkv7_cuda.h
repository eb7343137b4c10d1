// Launchers of the WKV-7 CUDA kernels: raw pointers and a stream, no torch types (the .cu stays free of torch
// headers and compiles with a bare nvcc).
#pragma once

#include <cuda_runtime.h>

#include "wkv7_core.h"

namespace wkv7 {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// One block of `head_dim` threads per (batch, head). Return the launch status (cudaErrorInvalidValue for a head
// size outside kHeadSizes, cudaErrorInvalidConfiguration when the device lacks the shared memory).
cudaError_t launch_forward(const ForwardArgs<void>& args, DType dtype, int head_dim, int64_t batch,
                           cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs<void>& args, DType dtype, int head_dim, int64_t batch,
                            cudaStream_t stream);

}  // namespace wkv7
