// CPU decoding ops: `gemv` (a few rows times a float32, bfloat16, per-row-scaled int8 or per-group-scaled int4
// weight, streamed once) and
// `block_decode_step` (one token through a whole RWKV-7 block: norms, token shift, the six lerps, the LoRAs, the
// WKV step, group norm, bonus, gate and the channel mix, in float32, with the block's state updated in place).
// The arithmetic follows modeling_rwkv7/modeling_rwkv7.py, which tests/test_decode_native.py checks it against.
// The matrix-vector and WKV loops are compiled for AVX-512 (with and without AVX512-BF16), AVX2 and the baseline
// ISA and picked at load time.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "wkv7_ops.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Weights: [out, in] row-major; float32, bfloat16, or int8 with one (float32 or bfloat16) scale per output row; or
// int4 as uint8 [out, in / 2] with one scale per group of `group` (a multiple of 32) values of a row, [out, in /
// group]. Within each 32 values of a row, byte j holds value j in its low nibble and value j + 16 in its high nibble,
// each stored as value + 8 (llama.cpp's Q4_0 order, which unpacks into two runs of 16).

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
  Vector scale;  // int8: [out]; int4: [out, in / group]
  at::ScalarType dtype = at::kFloat;  // kByte: int4
  int64_t out = 0, in = 0;
  int64_t group = 0;  // int4 only
};

#define RWKV7_INLINE __attribute__((always_inline)) inline
// the tiles' loops over their rows and outputs, unrolled so that their accumulators stay in registers
#define RWKV7_UNROLL _Pragma("GCC unroll 16")
#define RWKV7_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

RWKV7_INLINE float load1(const float* p) { return *p; }
RWKV7_INLINE float load1(const uint16_t* p) { return bf16_to_float(*p); }
RWKV7_INLINE float load1(const int8_t* p) { return static_cast<float>(*p); }

// The 16 bits of the bfloat16 nearest to `value` (ties to even; a NaN stays a NaN).
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// bfloat16 weights multiply the rows rounded to bfloat16 (as a bfloat16 model's activations are), on every ISA:
// the products are then exact in float32, and AVX512-BF16 computes them in one instruction per 32 values.
std::vector<float> rows_rounded_to_bf16(const float* x, int64_t count) {
  std::vector<float> rounded(count);
  for (int64_t i = 0; i < count; ++i) rounded[i] = bf16_to_float(float_to_bf16(x[i]));
  return rounded;
}

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

// AVX-512 tiles: y[r, o] for `kRows` rows of x and `kOuts` weight rows, each weight vector converted once for the
// tile's rows. Every dot product is one 16-lane accumulator over `in` in order, then reduced the same way, so a
// row's result does not depend on the tile that computes it nor on the other rows of the batch (batch invariance:
// a request decodes the same alone or in a batch). The first tile of a weight block prefetches the next block
// (`kOuts` rows further), which the later tiles would otherwise wait for from memory.
template <typename T, int kRows, int kOuts, bool kPrefetch = false>
RWKV7_AVX512 RWKV7_INLINE void gemv_tile_avx512(const T* w, const Vector& scale, const float* x, int64_t in,
                                                 float* y, int64_t out, int64_t o) {
  __m512 acc[kRows][kOuts];
  RWKV7_UNROLL for (int row = 0; row < kRows; ++row)
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) acc[row][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    __m512 w_vec[kOuts];
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) w_vec[c] = load16(w + (o + c) * in + i);
    if (kPrefetch)
      RWKV7_UNROLL for (int c = 0; c < kOuts; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + (o + kOuts + c) * in + i), _MM_HINT_T0);
    RWKV7_UNROLL for (int row = 0; row < kRows; ++row) {
      const __m512 x_vec = _mm512_loadu_ps(x + row * in + i);
      RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) acc[row][c] = _mm512_fmadd_ps(w_vec[c], x_vec, acc[row][c]);
    }
  }
  RWKV7_UNROLL for (int row = 0; row < kRows; ++row)
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) {
      float sum = _mm512_reduce_add_ps(acc[row][c]);
      for (int64_t tail = i; tail < in; ++tail) sum += load1(w + (o + c) * in + tail) * x[row * in + tail];
      y[row * out + o + c] = scale.defined() ? sum * scale[o + c] : sum;
    }
}

// `kOuts` outputs from `o` for every row, four rows at a time.
template <typename T, int kOuts>
RWKV7_AVX512 RWKV7_INLINE void gemv_outs_avx512(const T* w, const Vector& scale, const float* x, int64_t rows,
                                                 int64_t in, float* y, int64_t out, int64_t o) {
  int64_t r = 0;
  if (rows >= 4 && o + 2 * kOuts <= out) {
    gemv_tile_avx512<T, 4, kOuts, true>(w, scale, x, in, y, out, o);
    r = 4;
  }
  for (; r + 4 <= rows; r += 4) gemv_tile_avx512<T, 4, kOuts>(w, scale, x + r * in, in, y + r * out, out, o);
  for (; r < rows; ++r) gemv_tile_avx512<T, 1, kOuts>(w, scale, x + r * in, in, y + r * out, out, o);
}

// AVX512-BF16: bfloat16 weights times the rows rounded to bfloat16, 32 products per instruction, each dot product
// one accumulator as above (the same result whatever tile computes it).
#define RWKV7_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

template <int kRows, int kOuts, bool kPrefetch = false>
RWKV7_AVX512_BF16 RWKV7_INLINE void gemv_bf16_tile(const uint16_t* w, const uint16_t* x, int64_t in, float* y,
                                                   int64_t out, int64_t o) {
  __m512 acc[kRows][kOuts];
  RWKV7_UNROLL for (int row = 0; row < kRows; ++row)
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) acc[row][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    __m512bh w_vec[kOuts];
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) w_vec[c] = (__m512bh)_mm512_loadu_si512(w + (o + c) * in + i);
    if (kPrefetch)
      RWKV7_UNROLL for (int c = 0; c < kOuts; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + (o + kOuts + c) * in + i), _MM_HINT_T0);
    RWKV7_UNROLL for (int row = 0; row < kRows; ++row) {
      const __m512bh x_vec = (__m512bh)_mm512_loadu_si512(x + row * in + i);
      RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) acc[row][c] = _mm512_dpbf16_ps(acc[row][c], w_vec[c], x_vec);
    }
  }
  RWKV7_UNROLL for (int row = 0; row < kRows; ++row)
    RWKV7_UNROLL for (int c = 0; c < kOuts; ++c) {
      float sum = _mm512_reduce_add_ps(acc[row][c]);
      for (int64_t tail = i; tail < in; ++tail)
        sum += bf16_to_float(w[(o + c) * in + tail]) * bf16_to_float(x[row * in + tail]);
      y[row * out + o + c] = sum;
    }
}

template <int kOuts>
RWKV7_AVX512_BF16 RWKV7_INLINE void gemv_bf16_outs(const uint16_t* w, const uint16_t* x, int64_t rows, int64_t in,
                                                   float* y, int64_t out, int64_t o) {
  int64_t r = 0;
  if (rows >= 4 && o + 2 * kOuts <= out) {
    gemv_bf16_tile<4, kOuts, true>(w, x, in, y, out, o);
    r = 4;
  }
  for (; r + 4 <= rows; r += 4) gemv_bf16_tile<4, kOuts>(w, x + r * in, in, y + r * out, out, o);
  for (; r < rows; ++r) gemv_bf16_tile<1, kOuts>(w, x + r * in, in, y + r * out, out, o);
}

// (bfloat16 weights take no scale: `as_weight` refuses one)
RWKV7_AVX512_BF16 void gemv_bf16_range_avx512_bf16(const uint16_t* w, const Vector&, const float* x, int64_t rows,
                                                   int64_t in, float* y, int64_t out, int64_t begin, int64_t end) {
  std::vector<uint16_t> x_bf16(rows * in);
  int64_t i = 0;
  for (; i + 32 <= rows * in; i += 32)
    _mm512_storeu_si512(x_bf16.data() + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16),
                                                                         _mm512_loadu_ps(x + i)));
  for (; i < rows * in; ++i) x_bf16[i] = float_to_bf16(x[i]);
  int64_t o = begin;
  if (rows >= 4)  // (a few rows: one weight row at a time, as gemv_range_avx512)
    for (; o + 4 <= end; o += 4) gemv_bf16_outs<4>(w, x_bf16.data(), rows, in, y, out, o);
  for (; o < end; ++o) gemv_bf16_outs<1>(w, x_bf16.data(), rows, in, y, out, o);
}

// Outputs [begin, end) for every row: tiles of 4 weight rows where there are 4 rows of x or more (batched decoding:
// each weight vector then serves 16 FMAs); with fewer, one weight row at a time (a single stream per thread reads
// memory fastest: measured 1.3-1.5x faster than four at a time for int8 and bfloat16 weights on a Zen 4).
template <typename T>
RWKV7_AVX512 void gemv_range_avx512(const T* w, const Vector& scale, const float* x, int64_t rows, int64_t in,
                                    float* y, int64_t out, int64_t begin, int64_t end) {
  int64_t o = begin;
  if (rows >= 4)
    for (; o + 4 <= end; o += 4) gemv_outs_avx512<T, 4>(w, scale, x, rows, in, y, out, o);
  for (; o < end; ++o) gemv_outs_avx512<T, 1>(w, scale, x, rows, in, y, out, o);
}

// int4 (portable form): y[r, o] = sum over groups g of scale[o, g] * sum_{i in g} (q[o, i] - 8) x[r, i].
RWKV7_INLINE void gemv_int4_range(const Weight& w, const float* x, int64_t rows, float* y, int64_t begin, int64_t end) {
  const int64_t groups = w.in / w.group;
  const uint8_t* packed = static_cast<const uint8_t*>(w.data);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* w_row = packed + o * (w.in / 2);
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * w.in;
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.f;
        for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 32) {
          const uint8_t* q = w_row + i / 2;
#pragma omp simd reduction(+ : acc)
          for (int j = 0; j < 16; ++j)
            acc += static_cast<float>((q[j] & 15) - 8) * x_row[i + j] + static_cast<float>((q[j] >> 4) - 8) * x_row[i + 16 + j];
        }
        sum += acc * w.scale[o * groups + g];
      }
      y[r * w.out + o] = sum;
    }
  }
}

// int4 (AVX-512): 32 values (16 bytes) unpacked into two float32 vectors, for `kRows` rows at a time.
template <int kRows>
RWKV7_AVX512 RWKV7_INLINE void gemv_int4_rows_avx512(const Weight& w, const uint8_t* w_row, int64_t o,
                                                     const float* x_rows, float* y_rows) {
  const int64_t groups = w.in / w.group;
  const __m512i mask = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  __m512 total[kRows];
  for (int row = 0; row < kRows; ++row) total[row] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kRows][2];
    for (int row = 0; row < kRows; ++row) acc[row][0] = acc[row][1] = _mm512_setzero_ps();
    for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 32) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w_row + i / 2)));
      const __m512 low = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, mask), eight));
      const __m512 high = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
      for (int row = 0; row < kRows; ++row) {
        acc[row][0] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x_rows + row * w.in + i), acc[row][0]);
        acc[row][1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x_rows + row * w.in + i + 16), acc[row][1]);
      }
    }
    const __m512 scale = _mm512_set1_ps(w.scale[o * groups + g]);
    for (int row = 0; row < kRows; ++row)
      total[row] = _mm512_fmadd_ps(_mm512_add_ps(acc[row][0], acc[row][1]), scale, total[row]);
  }
  for (int row = 0; row < kRows; ++row) y_rows[row * w.out + o] = _mm512_reduce_add_ps(total[row]);
}

RWKV7_AVX512 void gemv_int4_range_avx512(const Weight& w, const float* x, int64_t rows, float* y, int64_t begin,
                                         int64_t end) {
  const uint8_t* packed = static_cast<const uint8_t*>(w.data);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* w_row = packed + o * (w.in / 2);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) gemv_int4_rows_avx512<4>(w, w_row, o, x + r * w.in, y + r * w.out);
    for (; r < rows; ++r) gemv_int4_rows_avx512<1>(w, w_row, o, x + r * w.in, y + r * w.out);
  }
}

using GemvRange = void (*)(const Weight&, const float*, int64_t, float*, int64_t, int64_t);

#define RWKV7_GEMV_FOR_TARGET(name, attributes, range, bf16_range, int4_range)                                   \
  attributes void name(const Weight& w, const float* x, int64_t rows, float* y, int64_t begin, int64_t end) {   \
    switch (w.dtype) {                                                                                           \
      case at::kByte:                                                                                            \
        return int4_range(w, x, rows, y, begin, end);                                                            \
      case at::kFloat:                                                                                           \
        return range(static_cast<const float*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);          \
      case at::kBFloat16:                                                                                        \
        return bf16_range(static_cast<const uint16_t*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);  \
      default:                                                                                                   \
        return range(static_cast<const int8_t*>(w.data), w.scale, x, rows, w.in, y, w.out, begin, end);         \
    }                                                                                                            \
  }
// (inlined into each variant's dispatcher below, so that the portable loop is compiled for that variant's ISA)
#define RWKV7_BF16_ROUNDED(name, range)                                                                          \
  RWKV7_INLINE void name(const uint16_t* w, const Vector& scale, const float* x, int64_t rows, int64_t in,       \
                         float* y, int64_t out, int64_t begin, int64_t end) {                                    \
    const std::vector<float> rounded = rows_rounded_to_bf16(x, rows * in);                                       \
    range(w, scale, rounded.data(), rows, in, y, out, begin, end);                                               \
  }
RWKV7_BF16_ROUNDED(gemv_bf16_range_avx512, gemv_range_avx512<uint16_t>)
RWKV7_BF16_ROUNDED(gemv_bf16_range, gemv_range<uint16_t>)
#undef RWKV7_BF16_ROUNDED

RWKV7_GEMV_FOR_TARGET(gemv_avx512_bf16, RWKV7_AVX512, gemv_range_avx512, gemv_bf16_range_avx512_bf16,
                      gemv_int4_range_avx512)
RWKV7_GEMV_FOR_TARGET(gemv_avx512, RWKV7_AVX512, gemv_range_avx512, gemv_bf16_range_avx512, gemv_int4_range_avx512)
RWKV7_GEMV_FOR_TARGET(gemv_avx2, __attribute__((target("avx2,fma"))), gemv_range, gemv_bf16_range, gemv_int4_range)
RWKV7_GEMV_FOR_TARGET(gemv_baseline, , gemv_range, gemv_bf16_range, gemv_int4_range)
#undef RWKV7_GEMV_FOR_TARGET

// The best variant the CPU runs, capped like torch's own kernels by ATEN_CPU_CAPABILITY ("default", "avx2").
GemvRange pick_gemv() {
  __builtin_cpu_init();
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string limit = cap ? cap : "";
  if (limit != "default" && limit != "avx2" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return limit != "avx512" && __builtin_cpu_supports("avx512bf16") ? gemv_avx512_bf16 : gemv_avx512;
  if (limit != "default" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return gemv_avx2;
  return gemv_baseline;
}

const GemvRange gemv_range_for_cpu = pick_gemv();

// One WKV step of one head, state S [value i, key j] (N x N, in place): S = S diag(decay) - (S kk) replace^T +
// v k^T, then y = S r.
RWKV7_INLINE void wkv_head(float* S, int64_t N, const float* r, const float* decay, const float* k, const float* v,
                           const float* kk, const float* replace, float* y) {
  for (int64_t i = 0; i < N; ++i) {
    float* S_row = S + i * N;
    float s_kk = 0.f;
#pragma omp simd reduction(+ : s_kk)
    for (int64_t j = 0; j < N; ++j) s_kk += S_row[j] * kk[j];
    float yi = 0.f;
#pragma omp simd reduction(+ : yi)
    for (int64_t j = 0; j < N; ++j) {
      S_row[j] = S_row[j] * decay[j] - s_kk * replace[j] + v[i] * k[j];
      yi += S_row[j] * r[j];
    }
    y[i] = yi;
  }
}

using WkvHead = void (*)(float*, int64_t, const float*, const float*, const float*, const float*, const float*,
                         const float*, float*);
#define RWKV7_WKV_FOR_TARGET(name, attributes)                                                                     \
  attributes void name(float* S, int64_t N, const float* r, const float* decay, const float* k, const float* v, \
                       const float* kk, const float* replace, float* y) {                                         \
    wkv_head(S, N, r, decay, k, v, kk, replace, y);                                                               \
  }
RWKV7_WKV_FOR_TARGET(wkv_head_avx512, RWKV7_AVX512)
RWKV7_WKV_FOR_TARGET(wkv_head_avx2, __attribute__((target("avx2,fma"))))
RWKV7_WKV_FOR_TARGET(wkv_head_baseline, )
#undef RWKV7_WKV_FOR_TARGET

const bool avx512_for_cpu = gemv_range_for_cpu == gemv_avx512 || gemv_range_for_cpu == gemv_avx512_bf16;
const WkvHead wkv_head_for_cpu = avx512_for_cpu ? wkv_head_avx512
                                 : gemv_range_for_cpu == gemv_avx2  ? wkv_head_avx2
                                                                    : wkv_head_baseline;

int64_t row_bytes(const Weight& w) {
  return w.dtype == at::kByte ? w.in / 2 : w.in * (w.dtype == at::kFloat ? 4 : w.dtype == at::kBFloat16 ? 2 : 1);
}

// What the thread that computed an output applies to it while it is in its cache, with z = y (+ bias): kNone z,
// kTanh tanh z, kSigmoid sigmoid z, kReluSquare max(z, 0)^2, kDecay exp(-decay_scale * sigmoid z).
enum class Finish { kNone, kTanh, kSigmoid, kReluSquare, kDecay };

// One product y [rows, out] = finish(x [rows, in] @ w^T + bias) (float32) of a group.
struct Product {
  const Weight& w;
  const float* x;
  float* y;
  Finish finish = Finish::kNone;
  Vector bias = {};
  float decay_scale = 0.f;
};

void finish_rows(const Product& p, int64_t rows, int64_t begin, int64_t end) {
  if (p.finish == Finish::kNone && !p.bias.defined()) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = begin; o < end; ++o) {
      float& y = p.y[r * p.w.out + o];
      const float z = p.bias.defined() ? y + p.bias[o] : y;
      switch (p.finish) {
        case Finish::kNone: y = z; break;
        case Finish::kTanh: y = std::tanh(z); break;
        case Finish::kSigmoid: y = 1.f / (1.f + std::exp(-z)); break;
        case Finish::kReluSquare: y = z > 0.f ? z * z : 0.f; break;
        case Finish::kDecay: y = std::exp(-p.decay_scale / (1.f + std::exp(-z))); break;
      }
    }
}

// The products of a group (independent of each other) in one parallel region: the group's weight bytes are split
// evenly across the threads (at least 64 KiB each), whatever product each row belongs to.
void gemv(std::initializer_list<Product> group, int64_t rows) {
  int64_t total = 0;
  for (const Product& p : group) total += p.w.out * row_bytes(p.w);
  const int64_t tasks = std::clamp<int64_t>(total / (64 << 10), 1, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t end_task) {
    for (int64_t task = first_task; task < end_task; ++task) {
      // this task's bytes [low, high); a row is the task's if its first byte is in there
      const int64_t low = total * task / tasks, high = total * (task + 1) / tasks;
      int64_t offset = 0;
      for (const Product& p : group) {
        const int64_t bytes = row_bytes(p.w);
        auto first_row_from = [&](int64_t position) {
          return position <= offset ? 0 : std::min(p.w.out, (position - offset + bytes - 1) / bytes);
        };
        const int64_t begin = first_row_from(low), end = first_row_from(high);
        if (begin < end) {
          gemv_range_for_cpu(p.w, p.x, rows, p.y, begin, end);
          finish_rows(p, rows, begin, end);
        }
        offset += p.w.out * bytes;
      }
    }
  });
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
  } else if (w.dtype == at::kByte) {
    w.in = 2 * weight.size(1);
    TORCH_CHECK(scale.has_value() && scale->dim() == 2 && scale->size(0) == w.out && scale->size(1) > 0,
                "rwkv7 decode: int4 weight ", index, " (uint8 [", w.out, ", ", w.in / 2,
                "]) needs scales [", w.out, ", groups]");
    w.group = w.in / scale->size(1);
    TORCH_CHECK(w.group * scale->size(1) == w.in && w.group % 32 == 0, "rwkv7 decode: int4 weight ", index, " of ",
                w.in, " values per row has ", scale->size(1), " scale groups; a group must be a multiple of 32 values");
    w.scale = as_vector(*scale, w.out * scale->size(1), "scale of weight", index);
  } else {
    TORCH_CHECK(w.dtype == at::kFloat || w.dtype == at::kBFloat16, "rwkv7 decode: weight ", index,
                " must be float32, bfloat16, int8 or int4 as uint8 (with scales), got ", w.dtype);
    TORCH_CHECK(!scale.has_value(), "rwkv7 decode: weight ", index, " is ", w.dtype, " and takes no scale");
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise pieces, on [rows, channels] float32 buffers.

// Runs fn(row) for each of `rows` rows, across the threads when there are enough rows to share.
template <typename Fn>
void for_rows(int64_t rows, const Fn& fn) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) fn(row);
  });
}

void layer_norm_row(const float* x, const Vector& weight, const Vector& bias, float eps, int64_t channels, float* y) {
  float mean = 0.f, var = 0.f;
  for (int64_t c = 0; c < channels; ++c) mean += x[c];
  mean /= channels;
  for (int64_t c = 0; c < channels; ++c) var += (x[c] - mean) * (x[c] - mean);
  float inv_std = 1.f / std::sqrt(var / channels + eps);
  for (int64_t c = 0; c < channels; ++c) y[c] = (x[c] - mean) * inv_std * weight[c] + bias[c];
}

// Row `row` of a float32 or bfloat16 [rows, channels] state := values (rounded to the nearest bfloat16, as copy_).
void store_row(at::Tensor& state, int64_t row, const float* values) {
  const int64_t channels = state.size(1);
  if (state.scalar_type() == at::kFloat) {
    std::memcpy(state.data_ptr<float>() + row * channels, values, channels * sizeof(float));
  } else {
    uint16_t* bits = reinterpret_cast<uint16_t*>(state.data_ptr<at::BFloat16>()) + row * channels;
    for (int64_t c = 0; c < channels; ++c) bits[c] = float_to_bf16(values[c]);
  }
}

}  // namespace

int64_t rwkv7_decode_vector_bits_cpu() {
  return avx512_for_cpu ? 512 : gemv_range_for_cpu == gemv_avx2 ? 256 : 128;
}

at::Tensor rwkv7_gemv_cpu(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& scale) {
  Weight w = as_weight(weight, scale, 0);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == w.in, "rwkv7 gemv: rows must be [n, ", w.in, "], got shape ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16,
              "rwkv7 gemv: rows must be float32 or bfloat16, got ", rows.scalar_type());
  at::Tensor x = rows.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows.size(0), w.out}, rows.options().dtype(at::kFloat));
  gemv({{w, x.data_ptr<float>(), y.data_ptr<float>()}}, rows.size(0));
  return rows.scalar_type() == at::kFloat ? y : y.to(rows.scalar_type());
}

// The vectors and weights of block_decode_step in its argument order, (index, name): the one place the order is
// written. `block_layout()` hands the names to Python (torch-ext's BLOCK_VECTORS / BLOCK_WEIGHTS, which
// modeling_rwkv7/decode_rwkv7.py reads the model's tensors by).
#define RWKV7_BLOCK_VECTORS(X)                                                                                     \
  X(kAttnNormW, "attn_norm.weight") X(kAttnNormB, "attn_norm.bias") X(kXR, "x_r") X(kXW, "x_w") X(kXK, "x_k")   \
  X(kXV, "x_v") X(kXA, "x_a") X(kXG, "x_g") X(kKK, "k_k") X(kKA, "k_a") X(kRK, "r_k") X(kW0, "w0") X(kA0, "a0") \
  X(kV0, "v0") X(kGNormW, "g_norm.weight") X(kGNormB, "g_norm.bias") X(kFfnNormW, "ffn_norm.weight")            \
  X(kFfnNormB, "ffn_norm.bias") X(kFfnXK, "ffn.x_k")
#define RWKV7_BLOCK_WEIGHTS(X)                                                                                     \
  X(kR, "r") X(kK, "k") X(kV, "v") X(kO, "o") X(kW1, "w1") X(kW2, "w2") X(kA1, "a1") X(kA2, "a2") X(kV1, "v1")  \
  X(kV2, "v2") X(kG1, "g1") X(kG2, "g2") X(kFfnKey, "ffn.key") X(kFfnValue, "ffn.value")
#define RWKV7_INDEX(index, name) index,
#define RWKV7_NAME(index, name) name,
enum Vec { RWKV7_BLOCK_VECTORS(RWKV7_INDEX) kNumVectors };
enum Mat { RWKV7_BLOCK_WEIGHTS(RWKV7_INDEX) kNumWeights };

std::tuple<std::vector<std::string>, std::vector<std::string>> rwkv7_block_layout_cpu() {
  return {{RWKV7_BLOCK_VECTORS(RWKV7_NAME)}, {RWKV7_BLOCK_WEIGHTS(RWKV7_NAME)}};
}
#undef RWKV7_INDEX
#undef RWKV7_NAME

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

  if (!first_layer)
    TORCH_CHECK(v_first->scalar_type() == at::kFloat && v_first->is_contiguous() && v_first->numel() == B * C,
                "rwkv7 block_decode_step: v_first must be contiguous float32 [", B, ", ", C, "], got ",
                v_first->sizes(), " ", v_first->scalar_type());
  const Vector attn_shift = as_vector(attn_shift_state, B * C, "attn_shift_state", 0);
  const Vector ffn_shift = as_vector(ffn_shift_state, B * C, "ffn_shift_state", 0);
  const int64_t BC = B * C;

  at::Tensor out = hidden.clone();
  at::Tensor value = at::empty({B, C}, hidden.options());
  float* x = out.data_ptr<float>();
  float* v = value.data_ptr<float>();
  std::vector<float> mixed(6 * BC), r(BC), decay(BC), k(BC), a(BC), g(BC), kk(BC), replace(BC), y(BC), tmp(BC),
      low_w(B * mat[kW1].out), low_a(B * mat[kA1].out), low_g(B * mat[kG1].out),
      low_v(first_layer ? 0 : B * mat[kV1].out), hidden_ffn(B * F);

  // ---- time mix: x += o_proj(...)(attn_norm(x))
  // the token shift: each of the six inputs lerps the normed token towards the previous one (the state, which then
  // holds this token)
  const int mixes[6] = {kXR, kXW, kXK, kXV, kXA, kXG};
  for_rows(B, [&](int64_t b) {
    std::vector<float> xn(C);
    layer_norm_row(x + b * C, V[kAttnNormW], V[kAttnNormB], norm_eps, C, xn.data());
    for (int m = 0; m < 6; ++m)
      for (int64_t c = 0; c < C; ++c)
        mixed[m * BC + b * C + c] = xn[c] + (attn_shift[b * C + c] - xn[c]) * V[mixes[m]][c];
    store_row(attn_shift_state, b, xn.data());
  });
  const float *x_r = &mixed[0], *x_w = &mixed[BC], *x_k = &mixed[2 * BC], *x_v = &mixed[3 * BC],
              *x_a = &mixed[4 * BC], *x_g = &mixed[5 * BC];

  // receptance, key, value and the first halves of the LoRAs (decay, learning rate, gate, value residual)
  // (the w and g LoRAs' activations are applied by the threads that compute them)
  const Product lora_w1{mat[kW1], x_w, low_w.data(), Finish::kTanh}, lora_g1{mat[kG1], x_g, low_g.data(), Finish::kSigmoid};
  if (first_layer)
    gemv({{mat[kR], x_r, r.data()}, {mat[kK], x_k, k.data()}, {mat[kV], x_v, v}, lora_w1,
          {mat[kA1], x_a, low_a.data()}, lora_g1}, B);
  else
    gemv({{mat[kR], x_r, r.data()}, {mat[kK], x_k, k.data()}, {mat[kV], x_v, v}, lora_w1,
          {mat[kA1], x_a, low_a.data()}, lora_g1, {mat[kV1], x_v, low_v.data()}}, B);
  // the second halves: decay = exp(-decay_scale * sigmoid(w0 + ...)), learning rate a = sigmoid(a0 + ...), gate g,
  // value-residual mix sigmoid(v0 + ...)
  const Product lora_w2{mat[kW2], low_w.data(), decay.data(), Finish::kDecay, V[kW0], static_cast<float>(decay_scale)};
  const Product lora_a2{mat[kA2], low_a.data(), a.data(), Finish::kSigmoid, V[kA0]};
  if (first_layer)
    gemv({lora_w2, lora_a2, {mat[kG2], low_g.data(), g.data()}}, B);
  else
    gemv({lora_w2, lora_a2, {mat[kG2], low_g.data(), g.data()}, {mat[kV2], low_v.data(), tmp.data(), Finish::kSigmoid, V[kV0]}}, B);

  // per row: the value residual (every later layer mixes in the first layer's value), the removal key (per-head
  // L2-normalized k * k_k) and its replacement b = kk * learning rate, then k scaled by the learning rate
  const float* v_first_data = first_layer ? nullptr : v_first->data_ptr<float>();
  for_rows(B, [&](int64_t b) {
    const int64_t row = b * C;
    if (v_first_data)
      for (int64_t c = 0; c < C; ++c) v[row + c] += (v_first_data[row + c] - v[row + c]) * tmp[row + c];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o = row + h * N;
      float norm = 0.f;
      for (int64_t j = 0; j < N; ++j) {
        kk[o + j] = k[o + j] * V[kKK][h * N + j];
        norm += kk[o + j] * kk[o + j];
      }
      norm = std::max(std::sqrt(norm), 1e-12f);
      for (int64_t j = 0; j < N; ++j) kk[o + j] /= norm;
    }
    for (int64_t c = 0; c < C; ++c) {
      replace[row + c] = kk[row + c] * a[row + c];
      k[row + c] *= (1.f - V[kKA][c]) + a[row + c] * V[kKA][c];
    }
  });

  float* S_all = recurrent_state.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t o = bh * N;
      wkv_head_for_cpu(S_all + bh * N * N, N, r.data() + o, decay.data() + o, k.data() + o, v + o, kk.data() + o,
                       replace.data() + o, y.data() + o);
    }
  });
  // group norm per head, plus the bonus v * ((r * k) . r_k), times the gate
  for_rows(B, [&](int64_t b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o = b * C + h * N;
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
  });
  gemv({{mat[kO], tmp.data(), y.data()}}, B);

  // ---- channel mix: x += value(relu(key(lerp(ffn_norm(x), previous, x_k)))^2)
  for_rows(B, [&](int64_t b) {
    const int64_t row = b * C;
    std::vector<float> xn(C);
    for (int64_t c = 0; c < C; ++c) x[row + c] += y[row + c];
    layer_norm_row(x + row, V[kFfnNormW], V[kFfnNormB], norm_eps, C, xn.data());
    for (int64_t c = 0; c < C; ++c) tmp[row + c] = xn[c] + (ffn_shift[row + c] - xn[c]) * V[kFfnXK][c];
    store_row(ffn_shift_state, b, xn.data());
  });
  gemv({{mat[kFfnKey], tmp.data(), hidden_ffn.data(), Finish::kReluSquare}}, B);
  gemv({{mat[kFfnValue], hidden_ffn.data(), y.data()}}, B);
  for (int64_t i = 0; i < BC; ++i) x[i] += y[i];
  return {out, value};
}
