// CUDA ops: argument checks, output allocation and the launch on the current stream; the kernels are in
// wkv7_cuda.cu. Inputs stay in their dtype (float32, float16 or bfloat16); states and log_decay are float32.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "wkv7_checks.h"
#include "cuda/wkv7_cuda.h"
#include "wkv7_ops.h"

namespace {

wkv7::DType kernel_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return wkv7::DType::kFloat16;
    case at::kBFloat16: return wkv7::DType::kBFloat16;
    default: return wkv7::DType::kFloat32;  // the checks admit only these three
  }
}

const float* optional_data(const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; }

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace

Wkv7ForwardOutputs wkv7_forward_cuda(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                     const std::optional<at::Tensor>& initial_state,
                                     const std::optional<at::Tensor>& reset, bool save_checkpoints) {
  const char* op = "rwkv7_wkv.forward";
  wkv7::check_forward_inputs(op, r, log_decay, k, v, a, b, initial_state, reset);
  const c10::cuda::CUDAGuard device_guard(r.device());
  const int64_t batch = r.size(0), seq_len = r.size(1), heads = r.size(2), head_dim = r.size(3);

  const at::Tensor rc = r.contiguous(), ld = log_decay.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor init = initial_state ? initial_state->contiguous() : at::Tensor();
  const at::Tensor reset_c = reset ? reset->contiguous() : at::Tensor();
  const auto float_options = r.options().dtype(at::kFloat);
  at::Tensor y = at::empty(r.sizes(), r.options());
  at::Tensor final_state = at::empty({batch, heads, head_dim, head_dim}, float_options);
  at::Tensor checkpoints = save_checkpoints ? at::empty(wkv7::checkpoints_shape(r, wkv7::kChunk), float_options)
                                            : at::empty({0}, float_options);

  const wkv7::ForwardArgs<void> args{
      rc.data_ptr(), ld.data_ptr<float>(), kc.data_ptr(), vc.data_ptr(), ac.data_ptr(), bc.data_ptr(),
      optional_data(init), reset ? reset_c.data_ptr<bool>() : nullptr, y.data_ptr(), final_state.data_ptr<float>(),
      save_checkpoints ? checkpoints.data_ptr<float>() : nullptr, seq_len, heads};
  check_launch(op, wkv7::launch_forward(args, kernel_dtype(r), head_dim, batch,
                                        c10::cuda::getCurrentCUDAStream()));
  return {y, final_state, checkpoints};
}

Wkv7BackwardOutputs wkv7_backward_cuda(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                       const std::optional<at::Tensor>& reset, const at::Tensor& checkpoints,
                                       const at::Tensor& dy, const std::optional<at::Tensor>& dfinal_state) {
  const char* op = "rwkv7_wkv.backward";
  wkv7::check_backward_inputs(op, r, log_decay, k, v, a, b, reset, checkpoints, dy, dfinal_state, wkv7::kChunk);
  const c10::cuda::CUDAGuard device_guard(r.device());
  const int64_t batch = r.size(0), seq_len = r.size(1), heads = r.size(2), head_dim = r.size(3);

  const at::Tensor rc = r.contiguous(), ld = log_decay.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   ac = a.contiguous(), bc = b.contiguous(), dyc = dy.contiguous(), ck = checkpoints.contiguous();
  const at::Tensor reset_c = reset ? reset->contiguous() : at::Tensor();
  const at::Tensor dfinal = dfinal_state ? dfinal_state->contiguous() : at::Tensor();
  at::Tensor dr = at::empty(r.sizes(), r.options()), dk = at::empty(r.sizes(), r.options()),
             dv = at::empty(r.sizes(), r.options()), da = at::empty(r.sizes(), r.options()),
             db = at::empty(r.sizes(), r.options());
  at::Tensor dld = at::empty(r.sizes(), log_decay.options());
  at::Tensor dinit = at::empty({batch, heads, head_dim, head_dim}, log_decay.options());

  const wkv7::BackwardArgs<void> args{
      rc.data_ptr(), ld.data_ptr<float>(), kc.data_ptr(), vc.data_ptr(), ac.data_ptr(), bc.data_ptr(),
      reset ? reset_c.data_ptr<bool>() : nullptr, ck.data_ptr<float>(), dyc.data_ptr(), optional_data(dfinal),
      dr.data_ptr(), dld.data_ptr<float>(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(),
      dinit.data_ptr<float>(), seq_len, heads};
  check_launch(op, wkv7::launch_backward(args, kernel_dtype(r), head_dim, batch,
                                         c10::cuda::getCurrentCUDAStream()));
  return {dr, dld, dk, dv, da, db, dinit};
}

at::Tensor wkv7_decode_step_cuda(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, at::Tensor& state) {
  const char* op = "rwkv7_wkv.decode_step";
  wkv7::check_token_inputs(op, r, log_decay, k, v, a, b, 3);
  wkv7::check_state(op, "state", state, r);
  const c10::cuda::CUDAGuard device_guard(r.device());
  const int64_t batch = r.size(0), heads = r.size(1), head_dim = r.size(2);

  const at::Tensor rc = r.contiguous(), ld = log_decay.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   ac = a.contiguous(), bc = b.contiguous();
  at::Tensor work = state.contiguous();  // updated in place (a copy only if `state` is not contiguous)
  at::Tensor y = at::empty(r.sizes(), r.options());
  const wkv7::ForwardArgs<void> args{
      rc.data_ptr(), ld.data_ptr<float>(), kc.data_ptr(), vc.data_ptr(), ac.data_ptr(), bc.data_ptr(),
      work.data_ptr<float>(), nullptr, y.data_ptr(), work.data_ptr<float>(), nullptr, 1, heads};
  check_launch(op, wkv7::launch_forward(args, kernel_dtype(r), head_dim, batch,
                                        c10::cuda::getCurrentCUDAStream()));
  if (!work.is_same(state)) state.copy_(work);
  return y;
}
