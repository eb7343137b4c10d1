#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

// The op implementations of both backends, registered by torch-ext/torch_binding.cpp (schemas there). Inputs
// [batch, seq_len, heads, head_dim]; decode_step takes one token, [batch, heads, head_dim], and updates `state`
// in place.

using Wkv7ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // y, final_state, checkpoints
using Wkv7BackwardOutputs =  // dr, dlog_decay, dk, dv, da, db, dinitial_state
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define WKV7_DECLARE_OPS(backend)                                                                                \
  Wkv7ForwardOutputs wkv7_forward_##backend(                                                                     \
      const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k, const at::Tensor& v,                 \
      const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,                   \
      const std::optional<at::Tensor>& reset, bool save_checkpoints);                                             \
  Wkv7BackwardOutputs wkv7_backward_##backend(                                                                   \
      const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k, const at::Tensor& v,                 \
      const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& reset,                           \
      const at::Tensor& checkpoints, const at::Tensor& dy, const std::optional<at::Tensor>& dfinal_state);        \
  at::Tensor wkv7_decode_step_##backend(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,    \
                                        const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,            \
                                        at::Tensor& state);

WKV7_DECLARE_OPS(cpu)
WKV7_DECLARE_OPS(cuda)

#undef WKV7_DECLARE_OPS

// CPU decoding ops (csrc/rwkv7_decode_cpu.cpp): a few rows times a float32 / bfloat16 / per-row-scaled int8 weight,
// and one token through a whole block (the block's state tensors updated in place).
at::Tensor rwkv7_gemv_cpu(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& scale);
int64_t rwkv7_decode_vector_bits_cpu();  // 512, 256 or 128: the variant of the loops in use (AVX-512, AVX2, baseline)
// the names of block_decode_step's vectors and weights, in its argument order
std::tuple<std::vector<std::string>, std::vector<std::string>> rwkv7_block_layout_cpu();
std::tuple<at::Tensor, at::Tensor> rwkv7_block_decode_step_cpu(
    const at::Tensor& hidden, const std::optional<at::Tensor>& v_first,
    const c10::List<std::optional<at::Tensor>>& vectors, const c10::List<std::optional<at::Tensor>>& weights,
    const c10::List<std::optional<at::Tensor>>& scales, at::Tensor& attn_shift_state, at::Tensor& recurrent_state,
    at::Tensor& ffn_shift_state, double norm_eps, double group_norm_eps, double decay_scale);
