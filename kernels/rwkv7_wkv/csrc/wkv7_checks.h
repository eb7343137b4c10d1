// Argument checks shared by the CPU and CUDA ops: every failure names the offending value and the expected one.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "wkv7_core.h"

namespace wkv7 {

inline void check_head_size(const char* op, int64_t head_dim) {
  std::string supported;
  for (int size : kHeadSizes) {
    if (head_dim == size) return;
    supported += (supported.empty() ? "" : ", ") + std::to_string(size);
  }
  TORCH_CHECK(false, op, ": head_dim ", head_dim, " is not supported; supported head sizes: ", supported);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& x, const at::Tensor& r) {
  TORCH_CHECK(x.device() == r.device(), op, ": ", name, " is on ", x.device(), ", expected ", r.device(),
              " (the device of r)");
}

// r, log_decay, k, v, a, b: [batch, seq_len, heads, head_dim] (or [batch, heads, head_dim] for one decode step);
// r, k, v, a, b share one float dtype, log_decay is float32.
inline void check_token_inputs(const char* op, const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, int64_t dims) {
  TORCH_CHECK(r.dim() == dims, op, ": r has shape ", r.sizes(), ", expected ", dims, " dimensions");
  const auto dtype = r.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": r has dtype ", dtype,
              ", expected Float, Half or BFloat16");
  const char* names[] = {"k", "v", "a", "b"};
  const at::Tensor* tensors[] = {&k, &v, &a, &b};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(tensors[i]->sizes() == r.sizes(), op, ": ", names[i], " has shape ", tensors[i]->sizes(),
                ", expected ", r.sizes(), " (the shape of r)");
    TORCH_CHECK(tensors[i]->scalar_type() == dtype, op, ": ", names[i], " has dtype ", tensors[i]->scalar_type(),
                ", expected ", dtype, " (the dtype of r)");
    check_same_device(op, names[i], *tensors[i], r);
  }
  TORCH_CHECK(log_decay.sizes() == r.sizes(), op, ": log_decay has shape ", log_decay.sizes(), ", expected ",
              r.sizes(), " (the shape of r)");
  TORCH_CHECK(log_decay.scalar_type() == at::kFloat, op, ": log_decay has dtype ", log_decay.scalar_type(),
              ", expected Float");
  check_same_device(op, "log_decay", log_decay, r);
  check_head_size(op, r.size(-1));
}

// A float32 [batch, heads, head_dim, head_dim] state-shaped tensor.
inline void check_state(const char* op, const char* name, const at::Tensor& state, const at::Tensor& r) {
  const int64_t head_dim = r.size(-1);
  const std::vector<int64_t> expected = {r.size(0), r.size(-2), head_dim, head_dim};
  TORCH_CHECK(state.sizes() == at::IntArrayRef(expected), op, ": ", name, " has shape ", state.sizes(),
              ", expected ", at::IntArrayRef(expected), " ([batch, heads, head_dim, head_dim])");
  TORCH_CHECK(state.scalar_type() == at::kFloat, op, ": ", name, " has dtype ", state.scalar_type(),
              ", expected Float");
  check_same_device(op, name, state, r);
}

inline void check_reset(const char* op, const at::Tensor& reset, const at::Tensor& r) {
  const std::vector<int64_t> expected = {r.size(0), r.size(1)};
  TORCH_CHECK(reset.sizes() == at::IntArrayRef(expected), op, ": reset has shape ", reset.sizes(), ", expected ",
              at::IntArrayRef(expected), " ([batch, seq_len])");
  TORCH_CHECK(reset.scalar_type() == at::kBool, op, ": reset has dtype ", reset.scalar_type(), ", expected Bool");
  check_same_device(op, "reset", reset, r);
}

inline std::vector<int64_t> checkpoints_shape(const at::Tensor& r, int64_t chunk) {
  const int64_t head_dim = r.size(3);
  return {r.size(0), r.size(2), (r.size(1) + chunk - 1) / chunk, head_dim, head_dim};
}

// Every argument of the forward op, on either device.
inline void check_forward_inputs(const char* op, const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                 const std::optional<at::Tensor>& initial_state,
                                 const std::optional<at::Tensor>& reset) {
  check_token_inputs(op, r, log_decay, k, v, a, b, 4);
  if (initial_state) check_state(op, "initial_state", *initial_state, r);
  if (reset) check_reset(op, *reset, r);
}

// Every argument of the backward op, on either device.
inline void check_backward_inputs(const char* op, const at::Tensor& r, const at::Tensor& log_decay,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                  const std::optional<at::Tensor>& reset, const at::Tensor& checkpoints,
                                  const at::Tensor& dy, const std::optional<at::Tensor>& dfinal_state, int64_t chunk) {
  check_token_inputs(op, r, log_decay, k, v, a, b, 4);
  if (reset) check_reset(op, *reset, r);
  const auto expected = checkpoints_shape(r, chunk);
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef(expected), op, ": checkpoints has shape ", checkpoints.sizes(),
              ", expected ", at::IntArrayRef(expected), " (from forward with save_checkpoints=True)");
  TORCH_CHECK(checkpoints.scalar_type() == at::kFloat, op, ": checkpoints has dtype ", checkpoints.scalar_type(),
              ", expected Float");
  check_same_device(op, "checkpoints", checkpoints, r);
  TORCH_CHECK(dy.sizes() == r.sizes(), op, ": dy has shape ", dy.sizes(), ", expected ", r.sizes(),
              " (the shape of r)");
  TORCH_CHECK(dy.scalar_type() == r.scalar_type(), op, ": dy has dtype ", dy.scalar_type(), ", expected ",
              r.scalar_type(), " (the dtype of r)");
  check_same_device(op, "dy", dy, r);
  if (dfinal_state) check_state(op, "dfinal_state", *dfinal_state, r);
}

}  // namespace wkv7
