// WKV-7 CUDA kernels: one block per (batch, head), one thread per state row (see wkv7_core.h).
#include "cuda/wkv7_cuda.h"

namespace wkv7 {

// The block program's view of one CUDA thread.
template <class State>
struct CudaBlock {
  State& state;
  template <class F>
  __device__ __forceinline__ void each_thread(F&& phase) {
    phase(static_cast<int>(threadIdx.x), state);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

template <int N, class T>
__global__ void __launch_bounds__(N) forward_kernel(ForwardArgs<T> args) {
  extern __shared__ float4 smem_float4[];  // declared as float4 for 16-byte alignment
  ForwardThread<N> thread;
  CudaBlock<ForwardThread<N>> block{thread};
  forward_block<N>(block, args, blockIdx.x, reinterpret_cast<float*>(smem_float4));
}

template <int N, class T>
__global__ void __launch_bounds__(N) backward_kernel(BackwardArgs<T> args) {
  extern __shared__ float4 smem_float4[];
  BackwardThread<N> thread;
  CudaBlock<BackwardThread<N>> block{thread};
  backward_block<N>(block, args, blockIdx.x, reinterpret_cast<float*>(smem_float4));
}

// Allows `kernel` the dynamic shared memory it needs beyond the default 48 KiB.
template <class Kernel>
cudaError_t reserve_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0, limit = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  if (bytes > limit) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int N, class T>
cudaError_t forward_typed(const ForwardArgs<void>& args, int64_t batch, cudaStream_t stream) {
  const int64_t blocks = batch * args.num_heads;
  if (blocks == 0) return cudaSuccess;
  const int floats = num_chunks(args.seq_len) > 1 ? forward_smem_floats<N>() : forward_buffer_floats<N>();
  const int bytes = floats * sizeof(float);
  cudaError_t status = reserve_shared_memory(forward_kernel<N, T>, bytes);
  if (status != cudaSuccess) return status;
  forward_kernel<N, T><<<static_cast<unsigned int>(blocks), N, bytes, stream>>>(typed_args<T>(args));
  return cudaGetLastError();
}

template <int N, class T>
cudaError_t backward_typed(const BackwardArgs<void>& args, int64_t batch, cudaStream_t stream) {
  const int64_t blocks = batch * args.num_heads;
  if (blocks == 0) return cudaSuccess;
  const int bytes = BackwardSmem<N>::kFloats * sizeof(float);
  cudaError_t status = reserve_shared_memory(backward_kernel<N, T>, bytes);
  if (status != cudaSuccess) return status;
  backward_kernel<N, T><<<static_cast<unsigned int>(blocks), N, bytes, stream>>>(typed_args<T>(args));
  return cudaGetLastError();
}

// Instantiates `launcher<N, T>` for the (head size, dtype) of a call.
#define WKV7_DISPATCH(launcher, head_dim, dtype, ...)                                        \
  switch (head_dim * 4 + static_cast<int>(dtype)) {                                          \
    case 16 * 4 + 0: return launcher<16, float>(__VA_ARGS__);                                \
    case 16 * 4 + 1: return launcher<16, __half>(__VA_ARGS__);                               \
    case 16 * 4 + 2: return launcher<16, __nv_bfloat16>(__VA_ARGS__);                        \
    case 32 * 4 + 0: return launcher<32, float>(__VA_ARGS__);                                \
    case 32 * 4 + 1: return launcher<32, __half>(__VA_ARGS__);                               \
    case 32 * 4 + 2: return launcher<32, __nv_bfloat16>(__VA_ARGS__);                        \
    case 64 * 4 + 0: return launcher<64, float>(__VA_ARGS__);                                \
    case 64 * 4 + 1: return launcher<64, __half>(__VA_ARGS__);                               \
    case 64 * 4 + 2: return launcher<64, __nv_bfloat16>(__VA_ARGS__);                        \
    default: return cudaErrorInvalidValue;                                                   \
  }

cudaError_t launch_forward(const ForwardArgs<void>& args, DType dtype, int head_dim, int64_t batch,
                           cudaStream_t stream) {
  WKV7_DISPATCH(forward_typed, head_dim, dtype, args, batch, stream)
}

cudaError_t launch_backward(const BackwardArgs<void>& args, DType dtype, int head_dim, int64_t batch,
                            cudaStream_t stream) {
  WKV7_DISPATCH(backward_typed, head_dim, dtype, args, batch, stream)
}

}  // namespace wkv7
