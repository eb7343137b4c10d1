#include <torch/library.h>

#include "../csrc/wkv7_ops.h"
#include "registration.h"

// The ops namespace is the kernel id of metadata.json (TORCH_EXTENSION_NAME, e.g. _rwkv7_wkv_cuda_1a2b3c4).
TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "forward(Tensor r, Tensor log_decay, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? initial_state, "
      "Tensor? reset, bool save_checkpoints) -> (Tensor y, Tensor final_state, Tensor checkpoints)");
  ops.def(
      "backward(Tensor r, Tensor log_decay, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? reset, "
      "Tensor checkpoints, Tensor dy, Tensor? dfinal_state) -> (Tensor dr, Tensor dlog_decay, Tensor dk, "
      "Tensor dv, Tensor da, Tensor db, Tensor dinitial_state)");
  ops.def(
      "decode_step(Tensor r, Tensor log_decay, Tensor k, Tensor v, Tensor a, Tensor b, Tensor(s!) state) "
      "-> Tensor y");
  // CPU decoding (no CUDA implementation: on a GPU the model's own step is used)
  ops.def("gemv(Tensor rows, Tensor weight, Tensor? scale) -> Tensor");
  ops.def("decode_vector_bits() -> int");
  ops.def("block_layout() -> (str[] vectors, str[] weights)");
  ops.def(
      "block_decode_step(Tensor hidden, Tensor? v_first, Tensor?[] vectors, Tensor?[] weights, Tensor?[] scales, "
      "Tensor(a!) attn_shift_state, Tensor(b!) recurrent_state, Tensor(c!) ffn_shift_state, float norm_eps, "
      "float group_norm_eps, float decay_scale) -> (Tensor hidden, Tensor value)");
#if defined(CPU_KERNEL)
  ops.impl("forward", c10::kCPU, &wkv7_forward_cpu);
  ops.impl("backward", c10::kCPU, &wkv7_backward_cpu);
  ops.impl("decode_step", c10::kCPU, &wkv7_decode_step_cpu);
  ops.impl("gemv", c10::kCPU, &rwkv7_gemv_cpu);
  ops.impl("decode_vector_bits", c10::DispatchKey::CompositeExplicitAutograd, &rwkv7_decode_vector_bits_cpu);
  ops.impl("block_layout", c10::DispatchKey::CompositeExplicitAutograd, &rwkv7_block_layout_cpu);
  ops.impl("block_decode_step", c10::kCPU, &rwkv7_block_decode_step_cpu);
#elif defined(CUDA_KERNEL)
  ops.impl("forward", c10::kCUDA, &wkv7_forward_cuda);
  ops.impl("backward", c10::kCUDA, &wkv7_backward_cuda);
  ops.impl("decode_step", c10::kCUDA, &wkv7_decode_step_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
