// CPU ops: the block programs of wkv7_core.h run thread by thread (SerialBlock), in float32, one (batch, head)
// per task of at::parallel_for. Half-precision inputs are converted to float32 and results converted back.
#include <ATen/Parallel.h>

#include <vector>

#include "wkv7_checks.h"
#include "wkv7_core.h"
#include "wkv7_ops.h"

namespace {

at::Tensor as_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

const float* optional_data(const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; }

template <int N>
void run_forward(const wkv7::ForwardArgs<float>& args, int64_t blocks) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<wkv7::ForwardThread<N>> threads(N);
    std::vector<float> smem(wkv7::forward_smem_floats<N>());
    wkv7::SerialBlock<wkv7::ForwardThread<N>> block{threads.data(), N};
    for (int64_t bh = begin; bh < end; ++bh) wkv7::forward_block<N>(block, args, bh, smem.data());
  });
}

template <int N>
void run_backward(const wkv7::BackwardArgs<float>& args, int64_t blocks) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<wkv7::BackwardThread<N>> threads(N);
    std::vector<float> smem(wkv7::BackwardSmem<N>::kFloats);
    wkv7::SerialBlock<wkv7::BackwardThread<N>> block{threads.data(), N};
    for (int64_t bh = begin; bh < end; ++bh) wkv7::backward_block<N>(block, args, bh, smem.data());
  });
}

void forward(const wkv7::ForwardArgs<float>& args, int64_t head_dim, int64_t blocks) {
  switch (head_dim) {
    case 16: return run_forward<16>(args, blocks);
    case 32: return run_forward<32>(args, blocks);
    case 64: return run_forward<64>(args, blocks);
  }
  wkv7::check_head_size("rwkv7_wkv", head_dim);
}

void backward(const wkv7::BackwardArgs<float>& args, int64_t head_dim, int64_t blocks) {
  switch (head_dim) {
    case 16: return run_backward<16>(args, blocks);
    case 32: return run_backward<32>(args, blocks);
    case 64: return run_backward<64>(args, blocks);
  }
  wkv7::check_head_size("rwkv7_wkv", head_dim);
}

}  // namespace

Wkv7ForwardOutputs wkv7_forward_cpu(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                    const std::optional<at::Tensor>& initial_state,
                                    const std::optional<at::Tensor>& reset, bool save_checkpoints) {
  const char* op = "rwkv7_wkv.forward";
  wkv7::check_forward_inputs(op, r, log_decay, k, v, a, b, initial_state, reset);
  const int64_t batch = r.size(0), seq_len = r.size(1), heads = r.size(2), head_dim = r.size(3);

  const at::Tensor rf = as_float(r), ld = log_decay.contiguous(), kf = as_float(k), vf = as_float(v),
                   af = as_float(a), bf = as_float(b);
  const at::Tensor init = initial_state ? initial_state->contiguous() : at::Tensor();
  const at::Tensor reset_c = reset ? reset->contiguous() : at::Tensor();
  at::Tensor y = at::empty(r.sizes(), rf.options());
  at::Tensor final_state = at::empty({batch, heads, head_dim, head_dim}, rf.options());
  at::Tensor checkpoints = save_checkpoints ? at::empty(wkv7::checkpoints_shape(r, wkv7::kChunk), rf.options())
                                            : at::empty({0}, rf.options());

  const wkv7::ForwardArgs<float> args{
      rf.data_ptr<float>(), ld.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), af.data_ptr<float>(),
      bf.data_ptr<float>(), optional_data(init), reset ? reset_c.data_ptr<bool>() : nullptr, y.data_ptr<float>(),
      final_state.data_ptr<float>(), save_checkpoints ? checkpoints.data_ptr<float>() : nullptr, seq_len, heads};
  forward(args, head_dim, batch * heads);
  return {y.to(r.scalar_type()), final_state, checkpoints};
}

Wkv7BackwardOutputs wkv7_backward_cpu(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                      const std::optional<at::Tensor>& reset, const at::Tensor& checkpoints,
                                      const at::Tensor& dy, const std::optional<at::Tensor>& dfinal_state) {
  const char* op = "rwkv7_wkv.backward";
  wkv7::check_backward_inputs(op, r, log_decay, k, v, a, b, reset, checkpoints, dy, dfinal_state, wkv7::kChunk);
  const int64_t batch = r.size(0), seq_len = r.size(1), heads = r.size(2), head_dim = r.size(3);

  const at::Tensor rf = as_float(r), ld = log_decay.contiguous(), kf = as_float(k), vf = as_float(v),
                   af = as_float(a), bf = as_float(b), dyf = as_float(dy), ck = checkpoints.contiguous();
  const at::Tensor reset_c = reset ? reset->contiguous() : at::Tensor();
  const at::Tensor dfinal = dfinal_state ? dfinal_state->contiguous() : at::Tensor();
  const auto options = rf.options();
  at::Tensor dr = at::empty(r.sizes(), options), dld = at::empty(r.sizes(), options),
             dk = at::empty(r.sizes(), options), dv = at::empty(r.sizes(), options),
             da = at::empty(r.sizes(), options), db = at::empty(r.sizes(), options);
  at::Tensor dinit = at::empty({batch, heads, head_dim, head_dim}, options);

  const wkv7::BackwardArgs<float> args{
      rf.data_ptr<float>(), ld.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), af.data_ptr<float>(),
      bf.data_ptr<float>(), reset ? reset_c.data_ptr<bool>() : nullptr, ck.data_ptr<float>(), dyf.data_ptr<float>(),
      optional_data(dfinal), dr.data_ptr<float>(), dld.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
      da.data_ptr<float>(), db.data_ptr<float>(), dinit.data_ptr<float>(), seq_len, heads};
  backward(args, head_dim, batch * heads);
  const auto dtype = r.scalar_type();
  return {dr.to(dtype), dld, dk.to(dtype), dv.to(dtype), da.to(dtype), db.to(dtype), dinit};
}

at::Tensor wkv7_decode_step_cpu(const at::Tensor& r, const at::Tensor& log_decay, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, at::Tensor& state) {
  const char* op = "rwkv7_wkv.decode_step";
  wkv7::check_token_inputs(op, r, log_decay, k, v, a, b, 3);
  wkv7::check_state(op, "state", state, r);
  const int64_t batch = r.size(0), heads = r.size(1), head_dim = r.size(2);

  const at::Tensor rf = as_float(r), ld = log_decay.contiguous(), kf = as_float(k), vf = as_float(v),
                   af = as_float(a), bf = as_float(b);
  at::Tensor work = state.contiguous();  // updated in place (a copy only if `state` is not contiguous)
  at::Tensor y = at::empty(r.sizes(), rf.options());
  const wkv7::ForwardArgs<float> args{
      rf.data_ptr<float>(), ld.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), af.data_ptr<float>(),
      bf.data_ptr<float>(), work.data_ptr<float>(), nullptr, y.data_ptr<float>(), work.data_ptr<float>(), nullptr,
      1, heads};
  forward(args, head_dim, batch * heads);
  if (!work.is_same(state)) state.copy_(work);
  return y.to(r.scalar_type());
}
