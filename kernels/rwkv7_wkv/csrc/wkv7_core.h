// WKV-7 (the RWKV-7 generalized delta rule) as block programs shared by the CUDA kernels and the CPU build.
//
// Per (batch, head), with the state S laid out [value i, key j] and float32 throughout:
//
//     P_t = reset_t ? 0 : S_{t-1}                                   (S_{-1} = initial state)
//     S_t = P_t diag(w_t) + (P_t a_t) b_t^T + v_t k_t^T,           w_t = exp(log_decay_t)
//     y_t = S_t r_t
//
// A block program runs one (batch, head) on a "block" of N threads (N = head size). It is written as a sequence
// of `block.each_thread(...)` phases separated by `block.sync()`: on CUDA each phase is the code of one thread and
// `sync` is __syncthreads(); on the CPU (`SerialBlock`) each phase loops over the N threads and `sync` is a no-op.
// The CPU build therefore runs the very same per-thread code, indexing and shared-memory layout as the GPU.
//
// Forward: thread n owns row n of the state (value n) in registers; the inputs of a chunk of kChunk tokens are
// staged in shared memory, the next chunk loaded while the current one runs.
// Backward: the gradient G = dL/dS is kept in both orientations (thread n owns row n and column n). The states P_t
// are recomputed exactly from the forward's checkpoints (one every kChunk steps). The chunk is walked backwards in
// spans of kSpan steps: a row pass from the checkpoint to the end of the span keeps one state of the span every
// kSubChunk steps in shared memory together with sa_t = P_t a_t, and each step rebuilds column n of its P_t element
// by element from the nearest kept state (at most kSubChunk - 1 elementwise steps). Keeping the states of a span
// instead of the whole chunk holds the shared memory under 64 KiB at N = 64, for kChunk / kSpan - 1 extra row passes.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define WKV7_HD __host__ __device__ __forceinline__
#define WKV7_UNROLL _Pragma("unroll")
#else
#define WKV7_HD inline
#define WKV7_UNROLL _Pragma("GCC unroll 16")
#endif

namespace wkv7 {

constexpr int kChunk = 16;    // steps between two state checkpoints of the forward; the unit of staged inputs
constexpr int kSpan = 8;      // backward: steps whose states are kept in shared memory at a time
constexpr int kSubChunk = 4;  // backward: steps between two in-block copies of the state
constexpr int kHeadSizes[] = {16, 32, 64};  // the head sizes (N) the kernels are built for
static_assert(kChunk % kSpan == 0 && kSpan % kSubChunk == 0, "a chunk holds whole spans, a span whole sub-chunks");
static_assert(kSubChunk == 4, "backward_block dispatches column_step for 0 to 3 replayed steps");

// Float conversion of an input element type: float itself, and CUDA's __half and __nv_bfloat16 (round to nearest
// even) in the CUDA build, or on the host where WKV7_HOST_HALF_TYPES is defined (the thread-sanitizer harness).
template <class T>
struct Convert {
  WKV7_HD static float to_float(T x) { return static_cast<float>(x); }
  WKV7_HD static T from_float(float x) { return static_cast<T>(x); }
};

}  // namespace wkv7

#if defined(__CUDACC__) || defined(WKV7_HOST_HALF_TYPES)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace wkv7 {

template <>
struct Convert<__half> {
  WKV7_HD static float to_float(__half x) { return __half2float(x); }
  WKV7_HD static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  WKV7_HD static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  WKV7_HD static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace wkv7
#endif

namespace wkv7 {

// Pointers of one forward call. Inputs and y are [batch, seq_len, heads, N] contiguous, log_decay float32.
// T = void gives the type-erased form used across the C++/CUDA boundary.
template <class T>
struct ForwardArgs {
  const T* r;
  const float* log_decay;
  const T* k;
  const T* v;
  const T* a;
  const T* b;
  const float* initial_state;  // [batch, heads, N (value), N (key)], or nullptr for zeros
  const bool* reset;           // [batch, seq_len], or nullptr
  T* y;
  float* final_state;          // [batch, heads, N, N]; may alias initial_state (decode updates in place)
  float* checkpoints;          // [batch, heads, ceil(seq_len / kChunk), N (key), N (value)], or nullptr
  int64_t seq_len;
  int64_t num_heads;
};

// Pointers of one backward call; gradients have the layout and element type of their inputs.
template <class T>
struct BackwardArgs {
  const T* r;
  const float* log_decay;
  const T* k;
  const T* v;
  const T* a;
  const T* b;
  const bool* reset;
  const float* checkpoints;   // from the forward: the state entering each chunk, before that step's reset
  const T* dy;
  const float* dfinal_state;  // [batch, heads, N, N], or nullptr for zeros
  T* dr;
  float* dlog_decay;
  T* dk;
  T* dv;
  T* da;
  T* db;
  float* dinitial_state;      // [batch, heads, N, N]
  int64_t seq_len;
  int64_t num_heads;
};

template <class T, class U>
ForwardArgs<T> typed_args(const ForwardArgs<U>& x) {
  return {static_cast<const T*>(x.r), x.log_decay, static_cast<const T*>(x.k), static_cast<const T*>(x.v),
          static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.initial_state, x.reset, static_cast<T*>(x.y),
          x.final_state, x.checkpoints, x.seq_len, x.num_heads};
}

template <class T, class U>
BackwardArgs<T> typed_args(const BackwardArgs<U>& x) {
  return {static_cast<const T*>(x.r), x.log_decay, static_cast<const T*>(x.k), static_cast<const T*>(x.v),
          static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.reset, x.checkpoints,
          static_cast<const T*>(x.dy), x.dfinal_state, static_cast<T*>(x.dr), x.dlog_decay, static_cast<T*>(x.dk),
          static_cast<T*>(x.dv), static_cast<T*>(x.da), static_cast<T*>(x.db), x.dinitial_state, x.seq_len,
          x.num_heads};
}

WKV7_HD int64_t num_chunks(int64_t seq_len) { return (seq_len + kChunk - 1) / kChunk; }

// The number of tokens of chunk c (kChunk, or fewer for the last one).
WKV7_HD int chunk_length(int64_t seq_len, int64_t c) {
  return static_cast<int>(seq_len - c * kChunk < kChunk ? seq_len - c * kChunk : kChunk);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory layouts (in floats). Staged inputs are [vector][step in chunk][N].

enum TokenVector { kR, kW, kK, kV, kA, kB, kTokenVectors };  // r, decay, k, v, a, b: staged by both passes
enum BackwardVector { kDy = kTokenVectors, kBwdVectors };    // the backward also stages dL/dy

// The forward stages each chunk into one of two buffers (the next chunk is loaded while the current one runs);
// a call with a single chunk uses only the first.
template <int N>
constexpr int forward_buffer_floats() {
  return kTokenVectors * kChunk * N + kChunk;  // staged inputs, reset flags
}

template <int N>
constexpr int forward_smem_floats() {
  return 2 * forward_buffer_floats<N>();
}

template <int N>
struct BackwardSmem {
  static constexpr int kRowStride = N + 1;  // padded: row-wise writes and column-wise reads avoid bank conflicts
  static constexpr int kStaged = 0;
  static constexpr int kSa = kStaged + kBwdVectors * kChunk * N;  // sa_t = P_t a_t of a span [kSpan][N]
  static constexpr int kDsb = kSa + kSpan * N;                    // G_t b_t of 2 steps       [2][N]
  static constexpr int kStates = kDsb + 2 * N;                    // P_t every kSubChunk      [kSpan/kSubChunk][N][N+1]
  static constexpr int kReset = kStates + (kSpan / kSubChunk) * N * kRowStride;
  static constexpr int kFloats = kReset + kChunk;
};

// ---------------------------------------------------------------------------------------------------------------
// Per-thread registers.

template <int N>
struct ForwardThread {
  float state[N];  // row n of the state
};

template <int N>
struct BackwardThread {
  float grad_row[N];  // row n of G = dL/dS
  float grad_col[N];  // column n of G
};

// Runs the phases of a block program one thread after the other (the CPU build).
template <class State>
struct SerialBlock {
  State* states;
  int num_threads;
  template <class F>
  void each_thread(F&& phase) {
    for (int n = 0; n < num_threads; ++n) phase(n, states[n]);
  }
  void sync() {}
};

// ---------------------------------------------------------------------------------------------------------------
// Small vector helpers (x in registers, y in shared memory at stride `stride`).

template <int N>
WKV7_HD float dot(const float* x, const float* y, int stride = 1) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  WKV7_UNROLL
  for (int j = 0; j < N; ++j) acc[j % 4] += x[j] * y[j * stride];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <int N>
WKV7_HD void fill_zero(float* x) {
  WKV7_UNROLL
  for (int j = 0; j < N; ++j) x[j] = 0.f;
}

// Thread n loads element n of `len` (<= kChunk) consecutive tokens of one (batch, head) into x[s]: one unrolled
// pass that issues every load before any use, so that the loads are in flight together.
template <int N, class T>
WKV7_HD void load_vector(float* x, const T* src, int64_t first, int64_t step_stride, int len, int n) {
  WKV7_UNROLL
  for (int s = 0; s < kChunk; ++s) {
    if (s < len) x[s] = Convert<T>::to_float(src[first + s * step_stride + n]);
  }
}

// ... and stores them to staged[s * N + n] (`Decay`: their exp).
template <int N, bool Decay = false>
WKV7_HD void store_vector(float* staged, const float* x, int len, int n) {
  WKV7_UNROLL
  for (int s = 0; s < kChunk; ++s) {
    if (s < len) staged[s * N + n] = Decay ? expf(x[s]) : x[s];
  }
}

// Thread n's share of one chunk of `len` tokens in registers: element n of r, log-decay, k, v, a, b and the reset
// flag of step n (`token` is the chunk's first token in the [batch, seq_len] mask).
struct ChunkInputs {
  float vectors[kTokenVectors][kChunk];
  float reset;
};

template <int N, class Args>
WKV7_HD void load_chunk(ChunkInputs& in, const Args& args, int64_t token, int64_t first, int64_t step_stride,
                        int len, int n) {
  load_vector<N>(in.vectors[kR], args.r, first, step_stride, len, n);
  load_vector<N>(in.vectors[kW], args.log_decay, first, step_stride, len, n);
  load_vector<N>(in.vectors[kK], args.k, first, step_stride, len, n);
  load_vector<N>(in.vectors[kV], args.v, first, step_stride, len, n);
  load_vector<N>(in.vectors[kA], args.a, first, step_stride, len, n);
  load_vector<N>(in.vectors[kB], args.b, first, step_stride, len, n);
  in.reset = (n < len && args.reset != nullptr && args.reset[token + n]) ? 1.f : 0.f;
}

// Stores a loaded chunk into its TokenVector slots (decay = exp(log-decay)) and reset_flags[n].
template <int N>
WKV7_HD void store_chunk(float* staged, float* reset_flags, const ChunkInputs& in, int len, int n) {
  store_vector<N>(staged + kR * kChunk * N, in.vectors[kR], len, n);
  store_vector<N, true>(staged + kW * kChunk * N, in.vectors[kW], len, n);
  store_vector<N>(staged + kK * kChunk * N, in.vectors[kK], len, n);
  store_vector<N>(staged + kV * kChunk * N, in.vectors[kV], len, n);
  store_vector<N>(staged + kA * kChunk * N, in.vectors[kA], len, n);
  store_vector<N>(staged + kB * kChunk * N, in.vectors[kB], len, n);
  if (n < len) reset_flags[n] = in.reset;
}

// The backward's staging: the same slots (and dL/dy in kDy), one vector at a time, since its threads already hold
// two N-vectors of gradients in registers.
template <int N, class Args>
WKV7_HD void stage_backward_chunk(float* staged, float* reset_flags, const Args& args, int64_t token, int64_t first,
                                  int64_t step_stride, int len, int n) {
  float x[kChunk];
  load_vector<N>(x, args.r, first, step_stride, len, n);
  store_vector<N>(staged + kR * kChunk * N, x, len, n);
  load_vector<N>(x, args.log_decay, first, step_stride, len, n);
  store_vector<N, true>(staged + kW * kChunk * N, x, len, n);
  load_vector<N>(x, args.k, first, step_stride, len, n);
  store_vector<N>(staged + kK * kChunk * N, x, len, n);
  load_vector<N>(x, args.v, first, step_stride, len, n);
  store_vector<N>(staged + kV * kChunk * N, x, len, n);
  load_vector<N>(x, args.a, first, step_stride, len, n);
  store_vector<N>(staged + kA * kChunk * N, x, len, n);
  load_vector<N>(x, args.b, first, step_stride, len, n);
  store_vector<N>(staged + kB * kChunk * N, x, len, n);
  load_vector<N>(x, args.dy, first, step_stride, len, n);
  store_vector<N>(staged + kDy * kChunk * N, x, len, n);
  if (n < len) reset_flags[n] = (args.reset != nullptr && args.reset[token + n]) ? 1.f : 0.f;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: y, final state and (optionally) the chunk checkpoints of one (batch, head).

template <int N, class T, class Block>
WKV7_HD void forward_block(Block& block, const ForwardArgs<T>& args, int64_t bh, float* smem) {
  static_assert(N >= kChunk, "thread n < kChunk stages the reset flag of step n");
  const int64_t seq_len = args.seq_len;
  const int64_t batch = bh / args.num_heads;
  const int64_t step_stride = args.num_heads * N;
  const int64_t token0 = (batch * seq_len * args.num_heads + bh % args.num_heads) * N;
  const int64_t chunks = num_chunks(seq_len);
  auto buffer = [&](int64_t c) { return smem + (c % 2) * forward_buffer_floats<N>(); };  // chunk c's staged inputs
  constexpr int kResetFlags = kTokenVectors * kChunk * N;  // offset of the reset flags in a buffer

  // The states move between global memory and the threads' rows through shared memory (padded [N][N + 1]), so
  // that consecutive threads access consecutive addresses (decoding is bound by these accesses).
  constexpr int kStride = N + 1;
  static_assert(N * kStride <= forward_buffer_floats<N>(), "the first buffer holds one state");
  if (args.initial_state == nullptr) {
    block.each_thread([&](int n, ForwardThread<N>& thread) { fill_zero<N>(thread.state); });
  } else {
    const float* state = args.initial_state + bh * N * N;
    block.each_thread([&](int n, ForwardThread<N>&) {
      WKV7_UNROLL
      for (int i = 0; i < N; ++i) smem[i * kStride + n] = state[i * N + n];
    });
    block.sync();
    block.each_thread([&](int n, ForwardThread<N>& thread) {
      WKV7_UNROLL
      for (int j = 0; j < N; ++j) thread.state[j] = smem[n * kStride + j];
    });
    block.sync();  // the initial state is out of shared memory
  }

  if (chunks > 0) {
    block.each_thread([&](int n, ForwardThread<N>&) {
      ChunkInputs in;
      load_chunk<N>(in, args, batch * seq_len, token0, step_stride, chunk_length(seq_len, 0), n);
      store_chunk<N>(buffer(0), buffer(0) + kResetFlags, in, chunk_length(seq_len, 0), n);
    });
    block.sync();
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const int len = chunk_length(seq_len, c);
    const int64_t first = token0 + c * kChunk * step_stride;
    const float* staged = buffer(c);
    const float* reset_flags = staged + kResetFlags;
    // Each thread loads its share of chunk c + 1 into registers first, runs chunk c meanwhile, then stores chunk
    // c + 1 into the other buffer.
    block.each_thread([&](int n, ForwardThread<N>& thread) {
      const bool has_next = c + 1 < chunks;
      ChunkInputs next;
      if (has_next) {
        load_chunk<N>(next, args, batch * seq_len + (c + 1) * kChunk, first + kChunk * step_stride, step_stride,
                      chunk_length(seq_len, c + 1), n);
      }
      if (args.checkpoints != nullptr) {  // key-major, so that the threads' stores are contiguous
        float* checkpoint = args.checkpoints + (bh * chunks + c) * N * N;
        WKV7_UNROLL
        for (int j = 0; j < N; ++j) checkpoint[j * N + n] = thread.state[j];
      }
      for (int s = 0; s < len; ++s) {
        const float* r = staged + (kR * kChunk + s) * N;
        const float* w = staged + (kW * kChunk + s) * N;
        const float* k = staged + (kK * kChunk + s) * N;
        const float* a = staged + (kA * kChunk + s) * N;
        const float* b = staged + (kB * kChunk + s) * N;
        const float v = staged[(kV * kChunk + s) * N + n];
        if (reset_flags[s] != 0.f) fill_zero<N>(thread.state);
        const float sa = dot<N>(thread.state, a);
        float y[4] = {0.f, 0.f, 0.f, 0.f};
        WKV7_UNROLL
        for (int j = 0; j < N; ++j) {
          const float updated = thread.state[j] * w[j] + (sa * b[j] + v * k[j]);
          thread.state[j] = updated;
          y[j % 4] += updated * r[j];
        }
        args.y[first + s * step_stride + n] = Convert<T>::from_float((y[0] + y[1]) + (y[2] + y[3]));
      }
      if (has_next) store_chunk<N>(buffer(c + 1), buffer(c + 1) + kResetFlags, next, chunk_length(seq_len, c + 1), n);
    });
    block.sync();  // chunk c + 1 is staged; chunk c's buffer is free
  }

  float* final_state = args.final_state + bh * N * N;  // may alias initial_state: every thread has read it
  block.each_thread([&](int n, ForwardThread<N>& thread) {
    WKV7_UNROLL
    for (int j = 0; j < N; ++j) smem[n * kStride + j] = thread.state[j];
  });
  block.sync();
  block.each_thread([&](int n, ForwardThread<N>&) {
    WKV7_UNROLL
    for (int i = 0; i < N; ++i) final_state[i * N + n] = smem[i * kStride + n];
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: all input gradients of one (batch, head), from dy and d(final state), walking the chunks backwards.
//
// With G_s = dL/dS_s (including dy_s r_s^T) and P_s the state entering step s:
//   dr_s = S_s^T dy_s     dk_s = G_s^T v_s     db_s = G_s^T sa_s     dw_s = diag(G_s^T P_s)     da_s = P_s^T (G_s b_s)
//   dv_s = G_s k_s        G_{s-1} = reset_s ? 0 : G_s diag(w_s) + (G_s b_s) a_s^T + dy_{s-1} r_{s-1}^T
// Row terms (dv, G b) use row n of G, column terms column n; G b goes through shared memory (dsb_buf, double-buffered
// by step parity).

// Adds dy_s r_s^T to G (both orientations), then writes dv_s and (G_s b_s)[n].
template <int N, class T>
WKV7_HD void add_output_gradient(BackwardThread<N>& thread, const float* staged, float* dsb_buf, T* dv, int s, int n) {
  const float* r = staged + (kR * kChunk + s) * N;
  const float* k = staged + (kK * kChunk + s) * N;
  const float* b = staged + (kB * kChunk + s) * N;
  const float* dy = staged + (kDy * kChunk + s) * N;
  const float dy_n = dy[n], r_n = r[n];
  WKV7_UNROLL
  for (int j = 0; j < N; ++j) {
    thread.grad_row[j] += dy_n * r[j];
    thread.grad_col[j] += dy[j] * r_n;
  }
  dsb_buf[(s % 2) * N + n] = dot<N>(thread.grad_row, b);
  *dv = Convert<T>::from_float(dot<N>(thread.grad_row, k));
}

struct ColumnGrads {
  float dr, dk, db, dw, da;  // dw: d/dw, before the factor w of d/dlog_decay
};

// The column terms of step s for thread n, and column n of G moved to step s - 1 (without dy_{s-1} r_{s-1}^T).
// Column n of P_s is rebuilt element by element from the state kept `Replay` steps earlier (kept_column), with
// sa_kept the sa of steps s - Replay to s ([Replay + 1][N] rows of sa_buf).
template <int N, int Replay>
WKV7_HD ColumnGrads column_step(BackwardThread<N>& thread, const float* staged, const float* sa_kept,
                                const float* dsb, const float* reset_flags, const float* kept_column, int s, int n) {
  static_assert(Replay < kSubChunk, "a state is kept every kSubChunk steps");
  constexpr int kStride = BackwardSmem<N>::kRowStride;
  const int kept = s - Replay;
  float replay_w[Replay + 1], replay_b[Replay + 1], replay_k[Replay + 1];
  bool replay_zero[Replay + 1];  // a reset before the next step
  WKV7_UNROLL
  for (int q = 0; q < Replay; ++q) {
    replay_w[q] = staged[(kW * kChunk + kept + q) * N + n];
    replay_b[q] = staged[(kB * kChunk + kept + q) * N + n];
    replay_k[q] = staged[(kK * kChunk + kept + q) * N + n];
    replay_zero[q] = reset_flags[kept + q + 1] != 0.f;
  }
  const float* v = staged + (kV * kChunk + s) * N;
  const float* dy = staged + (kDy * kChunk + s) * N;
  const float* sa = sa_kept + Replay * N;
  const float w_n = staged[(kW * kChunk + s) * N + n], k_n = staged[(kK * kChunk + s) * N + n];
  const float a_n = staged[(kA * kChunk + s) * N + n], b_n = staged[(kB * kChunk + s) * N + n];
  const bool reset_here = reset_flags[s] != 0.f;

  float dr[2] = {0.f, 0.f}, dk[2] = {0.f, 0.f}, db[2] = {0.f, 0.f}, dw[2] = {0.f, 0.f}, da[2] = {0.f, 0.f};
  WKV7_UNROLL
  for (int i = 0; i < N; ++i) {
    float prev = kept_column[i * kStride];
    WKV7_UNROLL
    for (int q = 0; q < Replay; ++q) {
      prev = replay_zero[q] ? 0.f
                            : prev * replay_w[q] + (sa_kept[q * N + i] * replay_b[q] +
                                                    staged[(kV * kChunk + kept + q) * N + i] * replay_k[q]);
    }
    const float grad = thread.grad_col[i];
    dr[i % 2] += (prev * w_n + (sa[i] * b_n + v[i] * k_n)) * dy[i];  // S_s = P_s diag(w) + sa b^T + v k^T
    dk[i % 2] += grad * v[i];
    db[i % 2] += grad * sa[i];
    dw[i % 2] += grad * prev;
    da[i % 2] += prev * dsb[i];
    thread.grad_col[i] = reset_here ? 0.f : grad * w_n + dsb[i] * a_n;
  }
  return {dr[0] + dr[1], dk[0] + dk[1], db[0] + db[1], dw[0] + dw[1], da[0] + da[1]};
}

template <int N, class T, class Block>
WKV7_HD void backward_block(Block& block, const BackwardArgs<T>& args, int64_t bh, float* smem) {
  static_assert(N >= kChunk, "thread n < kChunk stages the reset flag of step n");
  using Smem = BackwardSmem<N>;
  constexpr int kStride = Smem::kRowStride;
  const int64_t seq_len = args.seq_len;
  const int64_t batch = bh / args.num_heads;
  const int64_t step_stride = args.num_heads * N;
  const int64_t token0 = (batch * seq_len * args.num_heads + bh % args.num_heads) * N;
  const int64_t chunks = num_chunks(seq_len);
  float* staged = smem + Smem::kStaged;
  float* sa_buf = smem + Smem::kSa;
  float* dsb_buf = smem + Smem::kDsb;
  float* states = smem + Smem::kStates;
  float* reset_flags = smem + Smem::kReset;

  block.each_thread([&](int n, BackwardThread<N>& thread) {
    if (args.dfinal_state == nullptr) {
      fill_zero<N>(thread.grad_row);
      fill_zero<N>(thread.grad_col);
    } else {
      const float* grad = args.dfinal_state + bh * N * N;
      WKV7_UNROLL
      for (int j = 0; j < N; ++j) {
        thread.grad_row[j] = grad[n * N + j];
        thread.grad_col[j] = grad[j * N + n];
      }
    }
  });

  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int len = chunk_length(seq_len, c);
    const int64_t first = token0 + t0 * step_stride;

    // (the previous chunk is done with shared memory: its last step ended with a sync)
    block.each_thread([&](int n, BackwardThread<N>&) {
      stage_backward_chunk<N>(staged, reset_flags, args, batch * seq_len + t0, first, step_stride, len, n);
    });
    block.sync();

    for (int span_start = (len - 1) / kSpan * kSpan; span_start >= 0; span_start -= kSpan) {
      const int span_end = span_start + kSpan < len ? span_start + kSpan : len;

      // Row pass: recompute the states from the chunk's checkpoint (thread n: row n) up to the end of the span;
      // keep the span's P_s every kSubChunk steps and its sa_s = P_s a_s. The chunk's last span then adds the
      // output gradient of the chunk's last step (no sync between: it reads only the staged inputs and writes only
      // dsb_buf); the other spans' last step got it from the step after it.
      block.each_thread([&](int n, BackwardThread<N>& thread) {
        float row[N];
        const float* checkpoint = args.checkpoints + (bh * chunks + c) * N * N;
        WKV7_UNROLL
        for (int j = 0; j < N; ++j) row[j] = checkpoint[j * N + n];
        for (int s = 0; s < span_end; ++s) {
          const float* w = staged + (kW * kChunk + s) * N;
          const float* k = staged + (kK * kChunk + s) * N;
          const float* a = staged + (kA * kChunk + s) * N;
          const float* b = staged + (kB * kChunk + s) * N;
          const float v = staged[(kV * kChunk + s) * N + n];
          if (reset_flags[s] != 0.f) fill_zero<N>(row);
          const bool in_span = s >= span_start;
          if (in_span && s % kSubChunk == 0) {
            float* kept = states + (((s - span_start) / kSubChunk) * N + n) * kStride;
            WKV7_UNROLL
            for (int j = 0; j < N; ++j) kept[j] = row[j];
          }
          const float sa = dot<N>(row, a);
          if (in_span) sa_buf[(s - span_start) * N + n] = sa;
          WKV7_UNROLL
          for (int j = 0; j < N; ++j) row[j] = row[j] * w[j] + (sa * b[j] + v * k[j]);
        }
        if (span_end == len) {
          add_output_gradient<N>(thread, staged, dsb_buf, args.dv + first + (len - 1) * step_stride + n, len - 1, n);
        }
      });
      block.sync();

      for (int s = span_end - 1; s >= span_start; --s) {
        block.each_thread([&](int n, BackwardThread<N>& thread) {
          const float* w = staged + (kW * kChunk + s) * N;
          const float* a = staged + (kA * kChunk + s) * N;
          const float* dsb = dsb_buf + (s % 2) * N;  // written for step s, while step s - 1 writes the other half
          const bool reset_here = reset_flags[s] != 0.f;
          const int kept = (s - span_start) / kSubChunk * kSubChunk;  // span-relative step of the kept state
          const float* kept_column = states + (kept / kSubChunk) * N * kStride + n;
          const float* sa_kept = sa_buf + kept * N;
          ColumnGrads grads;
          switch (s % kSubChunk) {  // the number of steps between the kept state and P_s
            case 0: grads = column_step<N, 0>(thread, staged, sa_kept, dsb, reset_flags, kept_column, s, n); break;
            case 1: grads = column_step<N, 1>(thread, staged, sa_kept, dsb, reset_flags, kept_column, s, n); break;
            case 2: grads = column_step<N, 2>(thread, staged, sa_kept, dsb, reset_flags, kept_column, s, n); break;
            default: grads = column_step<N, 3>(thread, staged, sa_kept, dsb, reset_flags, kept_column, s, n); break;
          }
          const float dsb_n = dsb[n];
          WKV7_UNROLL
          for (int j = 0; j < N; ++j) {
            thread.grad_row[j] = reset_here ? 0.f : thread.grad_row[j] * w[j] + dsb_n * a[j];
          }

          const int64_t offset = first + s * step_stride + n;
          args.dr[offset] = Convert<T>::from_float(grads.dr);
          args.dk[offset] = Convert<T>::from_float(grads.dk);
          args.db[offset] = Convert<T>::from_float(grads.db);
          args.da[offset] = Convert<T>::from_float(grads.da);
          args.dlog_decay[offset] = grads.dw * w[n];
          if (s > 0) add_output_gradient<N>(thread, staged, dsb_buf, args.dv + offset - step_stride, s - 1, n);
        });
        // (G_{s-1} b_{s-1}) of every thread is in dsb_buf; after the span's first step, the next row pass may
        // overwrite the kept states, and after the chunk's first step the next chunk may be staged
        block.sync();
      }
    }
  }

  block.each_thread([&](int n, BackwardThread<N>& thread) {
    float* row = args.dinitial_state + (bh * N + n) * N;
    WKV7_UNROLL
    for (int j = 0; j < N; ++j) row[j] = thread.grad_row[j];
  });
}

}  // namespace wkv7
