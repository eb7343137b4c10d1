// CPU decoding ops: `gemv` (a few rows times a float32, bfloat16 or per-row-scaled int8 weight, streamed once) and
// `block_decode_step` (one token through a whole RWKV-7 block: norms, token shift, the six lerps, the LoRAs, the
// WKV step, group norm, bonus, gate and the channel mix, in float32, with the block's state updated in place).
// The arithmetic follows modeling_rwkv7/modeling_rwkv7.py, which tests/test_decode_native.py checks it against.
// The matrix-vector loops are compiled for AVX-512, AVX2 and the baseline ISA and picked at run time.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "wkv7_ops.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Weights: [out, in] row-major; float32, bfloat16, or int8 with one (float32 or bfloat16) scale per output row.

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// A float32 or bfloat16 vector (a parameter, a scale, a shift state), read in place as float32.
struct Vector {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  bool defined() const { return f32 || bf16; }
  float operator[](int64_t i) const { return f32 ? f32[i] : bf16_to_float(bf16[i]); }
};

Vector as_vector(const at::Tensor& t, int64_t numel, const char* what, int64_t index) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == numel &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "rwkv7 decode: ", what, " ", index, " must be a contiguous float32 or bfloat16 CPU tensor of ", numel,
              " elements, got shape ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  Vector v;
  if (t.scalar_type() == at::kFloat)
    v.f32 = t.data_ptr<float>();
  else
    v.bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  return v;
}

struct Weight {
  const void* data = nullptr;
  Vector scale;  // int8 only: [out]
  at::ScalarType dtype = at::kFloat;
  int64_t out = 0, in = 0;
};

#define RWKV7_INLINE __attribute__((always_inline)) inline
#define RWKV7_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

RWKV7_INLINE float load1(const float* p) { return *p; }
RWKV7_INLINE float load1(const uint16_t* p) { return bf16_to_float(*p); }
RWKV7_INLINE float load1(const int8_t* p) { return static_cast<float>(*p); }

// Portable form (AVX2 and baseline builds: the compiler vectorizes the reduction): y[r, o] = scale[o] *
// sum_i w[o, i] x[r, i] for o in [begin, end), each weight row read from memory once.
template <typename T>
RWKV7_INLINE void gemv_range(const T* w, const Vector& scale, const float* x, int64_t rows, int64_t in, float* y,
                             int64_t out, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const T* w_row = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < in; ++i) acc += load1(w_row + i) * x_row[i];
      y[r * out + o] = scale.defined() ? acc * scale[o] : acc;
    }
  }
}

// AVX-512: 16 weights at a time converted to float32 in registers.
RWKV7_AVX512 RWKV7_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
RWKV7_AVX512 RWKV7_INLINE __m512 load16(const uint16_t* p) {  // bfloat16: the upper half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
RWKV7_AVX512 RWKV7_INLINE __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// y[r, o] as in `gemv_range`, with two accumulators per dot product.
template <typename T>
RWKV7_AVX512 void gemv_range_avx512(const T* w, const Vector& scale, const float* x, int64_t rows, int64_t in,
                                    float* y, int64_t out, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const T* w_row = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * in;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 32 <= in; i += 32) {
        acc0 = _mm512_fmadd_ps(load16(w_row + i), _mm512_loadu_ps(x_row + i), acc0);
        acc1 = _mm512_fmadd_ps(load16(w_row + i + 16), _mm512_loadu_ps(x_row + i + 16), acc1);
      }
      for (; i + 16 <= in; i += 16) acc0 = _mm512_fmadd_ps(load16(w_row + i), _mm512_loadu_ps(x_row + i), acc0);
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      for (; i < in; ++i) sum += load1(w_row + i) * x_row[i];
      y[r * out + o] = scale.defined() ? sum * scale[o] : sum;
    }
  }
}

using GemvRange = void (*)(const Weight&, const float*, int64_t, float*, int64_t, int64_t);

#define RWKV7_GEMV_FOR_TARGET(name, attributes, range)                                                           \
  attributes void name(const Weight& w, const float* x, int64_t rows, float* y, int64_t begin, int64_t end) {   \
    switch (w.dtype) {                                                                                           \
      case at::kFloat:                                                                                           \
        return range(static_cast<const float*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);          \
      case at::kBFloat16:                                                                                        \
        return range(static_cast<const uint16_t*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);       \
      default:                                                                                                   \
        return range(static_cast<const int8_t*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);         \
    }                                                                                                            \
  }

RWKV7_GEMV_FOR_TARGET(gemv_avx512, RWKV7_AVX512, gemv_range_avx512)
RWKV7_GEMV_FOR_TARGET(gemv_avx2, __attribute__((target("avx2,fma"))), gemv_range)
RWKV7_GEMV_FOR_TARGET(gemv_baseline, , gemv_range)
#undef RWKV7_GEMV_FOR_TARGET

GemvRange pick_gemv() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return gemv_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return gemv_avx2;
  return gemv_baseline;
}

const GemvRange gemv_range_for_cpu = pick_gemv();

// Output rows per task: about 64 KiB of weight, so that small weights are not split across threads.
int64_t grain(const Weight& w) {
  int64_t row_bytes = w.in * (w.dtype == at::kFloat ? 4 : w.dtype == at::kBFloat16 ? 2 : 1);
  return std::max<int64_t>(1, (64 << 10) / row_bytes);
}

// y [rows, out] = x [rows, in] @ w^T, float32, in parallel over output rows.
void gemv(const Weight& w, const float* x, int64_t rows, float* y) {
  at::parallel_for(0, w.out, grain(w), [&](int64_t begin, int64_t end) { gemv_range_for_cpu(w, x, rows, y, begin, end); });
}

Weight as_weight(const at::Tensor& weight, const std::optional<at::Tensor>& scale, int64_t index) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous(), "rwkv7 decode: weight ", index,
              " must be a contiguous 2-D CPU tensor, got shape ", weight.sizes(), " on ", weight.device());
  Weight w;
  w.dtype = weight.scalar_type();
  w.out = weight.size(0);
  w.in = weight.size(1);
  w.data = weight.data_ptr();
  if (w.dtype == at::kChar) {
    TORCH_CHECK(scale.has_value(), "rwkv7 decode: int8 weight ", index, " needs one scale per output row (", w.out,
                "), got none");
    w.scale = as_vector(*scale, w.out, "scale of weight", index);
  } else {
    TORCH_CHECK(w.dtype == at::kFloat || w.dtype == at::kBFloat16, "rwkv7 decode: weight ", index,
                " must be float32, bfloat16 or int8 (with scales), got ", w.dtype);
    TORCH_CHECK(!scale.has_value(), "rwkv7 decode: weight ", index, " is ", w.dtype, " and takes no scale");
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise pieces, on [rows, channels] float32 buffers.

void layer_norm(const float* x, const Vector& weight, const Vector& bias, float eps, int64_t rows, int64_t channels,
                float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * channels;
    float mean = 0.f, var = 0.f;
    for (int64_t c = 0; c < channels; ++c) mean += xr[c];
    mean /= channels;
    for (int64_t c = 0; c < channels; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    float inv_std = 1.f / std::sqrt(var / channels + eps);
    for (int64_t c = 0; c < channels; ++c) y[r * channels + c] = (xr[c] - mean) * inv_std * weight[c] + bias[c];
  }
}

// A float32 buffer as a tensor, for ATen's vectorized transcendental functions (in place).
at::Tensor floats(float* data, int64_t numel) { return at::from_blob(data, {numel}, at::TensorOptions(at::kFloat)); }

}  // namespace

at::Tensor rwkv7_gemv_cpu(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& scale) {
  Weight w = as_weight(weight, scale, 0);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == w.in, "rwkv7 gemv: rows must be [n, ", w.in, "], got shape ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16,
              "rwkv7 gemv: rows must be float32 or bfloat16, got ", rows.scalar_type());
  at::Tensor x = rows.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows.size(0), w.out}, rows.options().dtype(at::kFloat));
  gemv(w, x.data_ptr<float>(), rows.size(0), y.data_ptr<float>());
  return rows.scalar_type() == at::kFloat ? y : y.to(rows.scalar_type());
}

// Argument order of block_decode_step (see torch_binding.cpp for the schema and torch-ext's `block_decode_step`
// for the Python names).
enum Vec { kAttnNormW, kAttnNormB, kXR, kXW, kXK, kXV, kXA, kXG, kKK, kKA, kRK, kW0, kA0, kV0, kGNormW, kGNormB,
           kFfnNormW, kFfnNormB, kFfnXK, kNumVectors };
enum Mat { kR, kK, kV, kO, kW1, kW2, kA1, kA2, kV1, kV2, kG1, kG2, kFfnKey, kFfnValue, kNumWeights };

std::tuple<at::Tensor, at::Tensor> rwkv7_block_decode_step_cpu(
    const at::Tensor& hidden, const std::optional<at::Tensor>& v_first, const c10::List<std::optional<at::Tensor>>& vectors,
    const c10::List<std::optional<at::Tensor>>& weights, const c10::List<std::optional<at::Tensor>>& scales,
    at::Tensor& attn_shift_state, at::Tensor& recurrent_state, at::Tensor& ffn_shift_state, double norm_eps,
    double group_norm_eps, double decay_scale) {
  TORCH_CHECK(vectors.size() == kNumVectors && weights.size() == kNumWeights && scales.size() == kNumWeights,
              "rwkv7 block_decode_step: expected ", kNumVectors, " vectors and ", kNumWeights,
              " weights and scales, got ", vectors.size(), ", ", weights.size(), ", ", scales.size());
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "rwkv7 block_decode_step: hidden must be contiguous float32 [batch, hidden], got ", hidden.sizes(), " ",
              hidden.scalar_type());
  const int64_t B = hidden.size(0), C = hidden.size(1);
  TORCH_CHECK(recurrent_state.dim() == 4 && recurrent_state.size(0) == B &&
                  recurrent_state.size(1) * recurrent_state.size(2) == C &&
                  recurrent_state.size(2) == recurrent_state.size(3) &&
                  recurrent_state.scalar_type() == at::kFloat && recurrent_state.is_contiguous(),
              "rwkv7 block_decode_step: recurrent_state must be contiguous float32 [", B, ", heads, head_dim, "
              "head_dim] with heads * head_dim = ", C, ", got ", recurrent_state.sizes(), " ",
              recurrent_state.scalar_type());
  const int64_t H = recurrent_state.size(1), N = recurrent_state.size(2);
  for (const at::Tensor* shift : {&attn_shift_state, &ffn_shift_state})
    TORCH_CHECK(shift->dim() == 2 && shift->size(0) == B && shift->size(1) == C,
                "rwkv7 block_decode_step: shift states must be [", B, ", ", C, "], got ", shift->sizes());
  const bool first_layer = !v_first.has_value();

  Vector V[kNumVectors];
  for (int i = 0; i < kNumVectors; ++i) {
    bool needed = !(first_layer && i == kV0);
    std::optional<at::Tensor> t = vectors.get(i);
    TORCH_CHECK(t.has_value() == needed, "rwkv7 block_decode_step: vector ", i,
                needed ? " is missing" : " must be None in the first layer");
    if (needed) V[i] = as_vector(*t, C, "vector", i);
  }
  std::vector<Weight> mat(kNumWeights);
  for (int i = 0; i < kNumWeights; ++i) {
    bool needed = !(first_layer && (i == kV1 || i == kV2));
    std::optional<at::Tensor> t = weights.get(i);
    TORCH_CHECK(t.has_value() == needed, "rwkv7 block_decode_step: weight ", i,
                needed ? " is missing" : " must be None in the first layer");
    if (needed) mat[i] = as_weight(*t, scales.get(i), i);
  }
  auto check_shape = [&](int i, int64_t out, int64_t in) {
    if (!(first_layer && (i == kV1 || i == kV2)))
      TORCH_CHECK(mat[i].out == out && mat[i].in == in, "rwkv7 block_decode_step: weight ", i, " is [", mat[i].out,
                  ", ", mat[i].in, "], expected [", out, ", ", in, "]");
  };
  for (int i : {kR, kK, kV, kO}) check_shape(i, C, C);
  for (int i : {kW1, kA1, kV1, kG1}) check_shape(i, mat[i].out, C);
  for (int i : {kW2, kA2, kV2, kG2}) check_shape(i, C, mat[i - 1].out);
  const int64_t F = mat[kFfnKey].out;
  check_shape(kFfnKey, F, C);
  check_shape(kFfnValue, C, F);

  const int64_t BC = B * C;
  int64_t max_rank = 0;
  for (int i : {kW1, kA1, kV1, kG1}) max_rank = std::max(max_rank, mat[i].out);

  at::Tensor out = hidden.clone();
  at::Tensor value = at::empty({B, C}, hidden.options());
  float* x = out.data_ptr<float>();
  float* v = value.data_ptr<float>();
  std::vector<float> xn(BC), prev(BC), mixed(6 * BC), r(BC), decay(BC), k(BC), a(BC), g(BC), kk(BC), y(BC),
      low(B * std::max(max_rank, F)), tmp(BC);

  // ---- time mix: x += o_proj(...)(attn_norm(x))
  layer_norm(x, V[kAttnNormW], V[kAttnNormB], norm_eps, B, C, xn.data());
  {
    Vector shift = as_vector(attn_shift_state, BC, "attn_shift_state", 0);
    for (int64_t i = 0; i < BC; ++i) prev[i] = shift[i];
  }
  attn_shift_state.copy_(at::from_blob(xn.data(), {B, C}, hidden.options()));
  const int mixes[6] = {kXR, kXW, kXK, kXV, kXA, kXG};
  for (int m = 0; m < 6; ++m)
    for (int64_t i = 0; i < BC; ++i) mixed[m * BC + i] = xn[i] + (prev[i] - xn[i]) * V[mixes[m]][i % C];
  const float *x_r = &mixed[0], *x_w = &mixed[BC], *x_k = &mixed[2 * BC], *x_v = &mixed[3 * BC],
              *x_a = &mixed[4 * BC], *x_g = &mixed[5 * BC];

  gemv(mat[kR], x_r, B, r.data());
  gemv(mat[kK], x_k, B, k.data());
  gemv(mat[kV], x_v, B, v);
  // decay: log_decay = -decay_scale * sigmoid(w0 + w2(tanh(w1 x_w)))
  gemv(mat[kW1], x_w, B, low.data());
  floats(low.data(), B * mat[kW1].out).tanh_();
  gemv(mat[kW2], low.data(), B, decay.data());
  for (int64_t i = 0; i < BC; ++i) decay[i] += V[kW0][i % C];
  floats(decay.data(), BC).sigmoid_().mul_(-decay_scale).exp_();
  // in-context learning rate
  gemv(mat[kA1], x_a, B, low.data());
  gemv(mat[kA2], low.data(), B, a.data());
  for (int64_t i = 0; i < BC; ++i) a[i] += V[kA0][i % C];
  floats(a.data(), BC).sigmoid_();
  // output gate
  gemv(mat[kG1], x_g, B, low.data());
  floats(low.data(), B * mat[kG1].out).sigmoid_();
  gemv(mat[kG2], low.data(), B, g.data());
  // value residual: every later layer mixes in the first layer's value
  if (!first_layer) {
    TORCH_CHECK(v_first->scalar_type() == at::kFloat && v_first->is_contiguous() && v_first->numel() == BC,
                "rwkv7 block_decode_step: v_first must be contiguous float32 [", B, ", ", C, "], got ",
                v_first->sizes(), " ", v_first->scalar_type());
    const float* v_first_data = v_first->data_ptr<float>();
    gemv(mat[kV1], x_v, B, low.data());
    gemv(mat[kV2], low.data(), B, tmp.data());
    for (int64_t i = 0; i < BC; ++i) tmp[i] += V[kV0][i % C];
    floats(tmp.data(), BC).sigmoid_();
    for (int64_t i = 0; i < BC; ++i) v[i] += (v_first_data[i] - v[i]) * tmp[i];
  }
  // removal key (per-head L2-normalized k * k_k), then k scaled by the learning rate
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t o = bh * N;
    float norm = 0.f;
    for (int64_t j = 0; j < N; ++j) {
      kk[o + j] = k[o + j] * V[kKK][(o + j) % C];
      norm += kk[o + j] * kk[o + j];
    }
    norm = std::max(std::sqrt(norm), 1e-12f);
    for (int64_t j = 0; j < N; ++j) kk[o + j] /= norm;
  }
  for (int64_t i = 0; i < BC; ++i) k[i] *= (1.f - V[kKA][i % C]) + a[i] * V[kKA][i % C];

  // WKV step per (batch, head), state [value i, key j]: S = S diag(w) + (S a) b^T + v k^T with a = -kk, b = kk *
  // learning rate; y = S r
  float* S_all = recurrent_state.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t o = bh * N;
      float* S = S_all + bh * N * N;
      for (int64_t i = 0; i < N; ++i) {
        float* S_row = S + i * N;
        float sa = 0.f;
#pragma omp simd reduction(+ : sa)
        for (int64_t j = 0; j < N; ++j) sa -= S_row[j] * kk[o + j];
        float yi = 0.f;
#pragma omp simd reduction(+ : yi)
        for (int64_t j = 0; j < N; ++j) {
          S_row[j] = S_row[j] * decay[o + j] + sa * kk[o + j] * a[o + j] + v[o + i] * k[o + j];
          yi += S_row[j] * r[o + j];
        }
        y[o + i] = yi;
      }
    }
  });
  // group norm per head, plus the bonus v * ((r * k) . r_k), times the gate
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t o = bh * N, h = bh % H;
    float mean = 0.f, var = 0.f, bonus = 0.f;
    for (int64_t j = 0; j < N; ++j) mean += y[o + j];
    mean /= N;
    for (int64_t j = 0; j < N; ++j) var += (y[o + j] - mean) * (y[o + j] - mean);
    float inv_std = 1.f / std::sqrt(var / N + group_norm_eps);
    for (int64_t j = 0; j < N; ++j) bonus += r[o + j] * k[o + j] * V[kRK][h * N + j];
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = h * N + j;
      float normed = (y[o + j] - mean) * inv_std * V[kGNormW][c] + V[kGNormB][c];
      tmp[o + j] = (normed + v[o + j] * bonus) * g[o + j];
    }
  }
  gemv(mat[kO], tmp.data(), B, y.data());
  for (int64_t i = 0; i < BC; ++i) x[i] += y[i];

  // ---- channel mix: x += value(relu(key(lerp(ffn_norm(x), previous, x_k)))^2)
  layer_norm(x, V[kFfnNormW], V[kFfnNormB], norm_eps, B, C, xn.data());
  {
    Vector shift = as_vector(ffn_shift_state, BC, "ffn_shift_state", 0);
    for (int64_t i = 0; i < BC; ++i) prev[i] = shift[i];
  }
  ffn_shift_state.copy_(at::from_blob(xn.data(), {B, C}, hidden.options()));
  for (int64_t i = 0; i < BC; ++i) tmp[i] = xn[i] + (prev[i] - xn[i]) * V[kFfnXK][i % C];
  gemv(mat[kFfnKey], tmp.data(), B, low.data());
  for (int64_t i = 0; i < B * F; ++i) low[i] = low[i] > 0.f ? low[i] * low[i] : 0.f;
  gemv(mat[kFfnValue], low.data(), B, y.data());
  for (int64_t i = 0; i < BC; ++i) x[i] += y[i];
  return {out, value};
}
