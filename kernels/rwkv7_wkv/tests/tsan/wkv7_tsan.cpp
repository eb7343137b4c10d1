// Thread-sanitizer harness of the WKV-7 block programs (kernels/rwkv7_wkv/csrc/wkv7_core.h): every block runs on
// one std::thread per CUDA thread, with a real barrier for sync() and NaN-filled shared memory, and its results
// must be bitwise equal to the serial run (SerialBlock, as in the CPU build). Built by tests/test_rwkv7_wkv_tsan.py
// with -fsanitize=thread, which then reports any shared-memory access that no barrier orders.
//
//     wkv7_tsan N DTYPE BATCH SEQ_LEN HEADS FLAGS IN OUT
//
// N: head size (16, 32, 64); DTYPE: f32, f16 or bf16 (the element type of r, k, v, a, b, dy and their gradients);
// FLAGS: 1 initial_state, 2 reset, 4 dfinal_state. IN holds float32 r, log_decay, k, v, a, b, dy
// [batch, seq_len, heads, N], initial_state, dfinal_state [batch, heads, N, N] and reset [batch, seq_len] (0 or 1),
// in that order. Runs the forward (with checkpoints), the backward and token-by-token decoding (the state zeroed
// before a reset token) and writes float32 y, final_state, checkpoints, dr, dlog_decay, dk, dv, da, db,
// dinitial_state, decode y, decode state to OUT. Exit status 0 when every threaded result equals its serial one
// and decoding equals the forward bitwise, 1 otherwise (TSAN's own status, 66, when it reported a race).
//
// WKV7_SKIP_SYNC=PROGRAM:K (environment; PROGRAM forward, backward or decode): in every run of that block program,
// each thread leaves out its K-th sync() (counted from 0), to check that the barriers the programs rely on are needed.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "wkv7_core.h"

namespace {

// A reusable barrier for a fixed number of threads. Its only happens-before edges are the exact ones of a
// barrier (every arrival before every departure of the same round): a thread's accesses after one round stay
// unordered with another thread's accesses before that round, so TSAN sees the same races a GPU could have. (A
// mutex-based barrier would order a fast thread's next arrival before a slow thread's departure and hide races.)
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const int round = round_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      round_.store(round + 1, std::memory_order_release);
    } else {
      while (round_.load(std::memory_order_acquire) == round) std::this_thread::yield();
    }
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> round_{0};
};

// The block program's view of one thread, like CudaBlock in wkv7_cuda.cu.
template <class State>
struct ThreadBlock {
  int n;
  State& state;
  Barrier& barrier;
  long skip_sync;  // the sync() to leave out, or -1
  long syncs = 0;
  template <class F>
  void each_thread(F&& phase) {
    phase(n, state);
  }
  void sync() {
    if (syncs++ != skip_sync) barrier.wait();
  }
};

// The sync() that `program` leaves out according to WKV7_SKIP_SYNC, or -1.
long skip_sync_from_env(const std::string& program) {
  const char* value = std::getenv("WKV7_SKIP_SYNC");
  if (value == nullptr) return -1;
  const std::string spec(value);
  const size_t colon = spec.find(':');
  if (colon == std::string::npos) {
    std::fprintf(stderr, "error: WKV7_SKIP_SYNC is %s, expected PROGRAM:K (e.g. backward:3)\n", value);
    std::exit(2);
  }
  return spec.substr(0, colon) == program ? std::atol(spec.c_str() + colon + 1) : -1;
}

std::vector<float> nan_filled(size_t count) {
  return std::vector<float>(count, std::numeric_limits<float>::quiet_NaN());
}

// Runs `program(block, bh, smem)` for every block, serially (fresh zeroed shared memory, as the CPU build) or on
// N threads per block (fresh NaN-filled shared memory).
template <int N, class State, class Program>
void run_serial(int64_t blocks, int smem_floats, Program program) {
  std::vector<State> states(N);
  wkv7::SerialBlock<State> block{states.data(), N};
  for (int64_t bh = 0; bh < blocks; ++bh) {
    std::vector<float> smem(smem_floats, 0.f);
    program(block, bh, smem.data());
  }
}

template <int N, class State, class Program>
void run_threaded(const char* name, int64_t blocks, int smem_floats, Program program) {
  const long skip_sync = skip_sync_from_env(name);
  for (int64_t bh = 0; bh < blocks; ++bh) {
    std::vector<float> smem = nan_filled(smem_floats);
    Barrier barrier(N);
    std::vector<std::thread> threads;
    for (int n = 0; n < N; ++n) {
      threads.emplace_back([&, n] {
        State state;
        ThreadBlock<State> block{n, state, barrier, skip_sync};
        program(block, bh, smem.data());
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

template <class T>
std::vector<T> to_type(const float* x, size_t count) {
  std::vector<T> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = wkv7::Convert<T>::from_float(x[i]);
  return out;
}

template <class T>
void append_float(std::vector<float>& out, const std::vector<T>& x) {
  for (const T& value : x) out.push_back(wkv7::Convert<T>::to_float(value));
}

template <class T>
bool bitwise_equal(const std::vector<T>& x, const std::vector<T>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0;
}

bool failed = false;

template <class T>
void expect_equal(const char* what, const std::vector<T>& actual, const std::vector<T>& expected) {
  const bool equal = bitwise_equal(actual, expected);
  std::printf("%s %s\n", equal ? "equal:" : "DIFFERENT:", what);
  failed |= !equal;
}

// Everything one run produces (outputs in the element type T, states and log-decay gradients in float32).
template <class T>
struct Results {
  std::vector<T> y, dr, dk, dv, da, db, decode_y;
  std::vector<float> final_state, checkpoints, dlog_decay, dinitial_state, decode_state;
};

struct Problem {
  int64_t batch, seq_len, heads;
  bool has_state, has_reset, has_dfinal;
  std::vector<float> inputs[7];  // r, log_decay, k, v, a, b, dy
  std::vector<float> initial_state, dfinal_state;
  std::vector<bool> reset_bits;
};

template <int N, class T, bool Threaded>
Results<T> run(const Problem& p) {
  const int64_t tokens = p.batch * p.seq_len * p.heads * N, state_size = p.batch * p.heads * N * N;
  const int64_t blocks = p.batch * p.heads;
  const std::vector<T> r = to_type<T>(p.inputs[0].data(), tokens), k = to_type<T>(p.inputs[2].data(), tokens),
                       v = to_type<T>(p.inputs[3].data(), tokens), a = to_type<T>(p.inputs[4].data(), tokens),
                       b = to_type<T>(p.inputs[5].data(), tokens), dy = to_type<T>(p.inputs[6].data(), tokens);
  const float* log_decay = p.inputs[1].data();
  std::unique_ptr<bool[]> reset(new bool[p.batch * p.seq_len]);
  for (int64_t i = 0; i < p.batch * p.seq_len; ++i) reset[i] = p.reset_bits[i];

  Results<T> out;
  out.y.resize(tokens);
  out.final_state.resize(state_size);
  out.checkpoints = nan_filled(state_size * wkv7::num_chunks(p.seq_len));
  const wkv7::ForwardArgs<T> forward{r.data(), log_decay, k.data(), v.data(), a.data(), b.data(),
                                     p.has_state ? p.initial_state.data() : nullptr,
                                     p.has_reset ? reset.get() : nullptr, out.y.data(), out.final_state.data(),
                                     out.checkpoints.data(), p.seq_len, p.heads};
  auto forward_program = [&](auto& block, int64_t bh, float* smem) {
    wkv7::forward_block<N>(block, forward, bh, smem);
  };
  using ForwardState = wkv7::ForwardThread<N>;
  if (Threaded) run_threaded<N, ForwardState>("forward", blocks, wkv7::forward_smem_floats<N>(), forward_program);
  else run_serial<N, ForwardState>(blocks, wkv7::forward_smem_floats<N>(), forward_program);

  for (auto* grad : {&out.dr, &out.dk, &out.dv, &out.da, &out.db}) grad->resize(tokens);
  out.dlog_decay.resize(tokens);
  out.dinitial_state.resize(state_size);
  const wkv7::BackwardArgs<T> backward{
      r.data(), log_decay, k.data(), v.data(), a.data(), b.data(), p.has_reset ? reset.get() : nullptr,
      out.checkpoints.data(), dy.data(), p.has_dfinal ? p.dfinal_state.data() : nullptr, out.dr.data(),
      out.dlog_decay.data(), out.dk.data(), out.dv.data(), out.da.data(), out.db.data(), out.dinitial_state.data(),
      p.seq_len, p.heads};
  auto backward_program = [&](auto& block, int64_t bh, float* smem) {
    wkv7::backward_block<N>(block, backward, bh, smem);
  };
  using BackwardState = wkv7::BackwardThread<N>;
  if (Threaded) run_threaded<N, BackwardState>("backward", blocks, wkv7::BackwardSmem<N>::kFloats, backward_program);
  else run_serial<N, BackwardState>(blocks, wkv7::BackwardSmem<N>::kFloats, backward_program);

  // Decoding: one token at a time, the state updated in place (initial_state aliases final_state, as the op does).
  const int64_t step = p.heads * N;
  out.decode_state = p.has_state ? p.initial_state : std::vector<float>(state_size, 0.f);
  out.decode_y.resize(tokens);
  std::vector<T> token[5], y_token(p.batch * step);
  std::vector<float> log_decay_token(p.batch * step);
  for (int64_t t = 0; t < p.seq_len; ++t) {
    const std::vector<T>* sources[5] = {&r, &k, &v, &a, &b};
    for (int i = 0; i < 5; ++i) {
      token[i].resize(p.batch * step);
      for (int64_t batch = 0; batch < p.batch; ++batch)
        std::copy_n(sources[i]->data() + (batch * p.seq_len + t) * step, step, token[i].data() + batch * step);
    }
    for (int64_t batch = 0; batch < p.batch; ++batch) {
      std::copy_n(log_decay + (batch * p.seq_len + t) * step, step, log_decay_token.data() + batch * step);
      if (p.has_reset && reset[batch * p.seq_len + t])
        std::fill_n(out.decode_state.data() + batch * p.heads * N * N, p.heads * N * N, 0.f);
    }
    const wkv7::ForwardArgs<T> decode{token[0].data(), log_decay_token.data(), token[1].data(), token[2].data(),
                                      token[3].data(), token[4].data(), out.decode_state.data(), nullptr,
                                      y_token.data(), out.decode_state.data(), nullptr, 1, p.heads};
    auto decode_program = [&](auto& block, int64_t bh, float* smem) {
      wkv7::forward_block<N>(block, decode, bh, smem);
    };
    if (Threaded) run_threaded<N, ForwardState>("decode", blocks, wkv7::forward_smem_floats<N>(), decode_program);
    else run_serial<N, ForwardState>(blocks, wkv7::forward_smem_floats<N>(), decode_program);
    for (int64_t batch = 0; batch < p.batch; ++batch)
      std::copy_n(y_token.data() + batch * step, step, out.decode_y.data() + (batch * p.seq_len + t) * step);
  }
  return out;
}

template <int N, class T>
void check(const Problem& p, const char* out_path) {
  const Results<T> serial = run<N, T, false>(p);
  const Results<T> threaded = run<N, T, true>(p);
  expect_equal("y", threaded.y, serial.y);
  expect_equal("final_state", threaded.final_state, serial.final_state);
  expect_equal("checkpoints", threaded.checkpoints, serial.checkpoints);
  expect_equal("dr", threaded.dr, serial.dr);
  expect_equal("dlog_decay", threaded.dlog_decay, serial.dlog_decay);
  expect_equal("dk", threaded.dk, serial.dk);
  expect_equal("dv", threaded.dv, serial.dv);
  expect_equal("da", threaded.da, serial.da);
  expect_equal("db", threaded.db, serial.db);
  expect_equal("dinitial_state", threaded.dinitial_state, serial.dinitial_state);
  expect_equal("decode y", threaded.decode_y, serial.decode_y);
  expect_equal("decode state", threaded.decode_state, serial.decode_state);
  expect_equal("decode y = forward y", threaded.decode_y, serial.y);
  expect_equal("decode state = forward final_state", threaded.decode_state, serial.final_state);

  std::vector<float> out;
  append_float(out, threaded.y);
  append_float(out, threaded.final_state);
  append_float(out, threaded.checkpoints);
  append_float(out, threaded.dr);
  append_float(out, threaded.dlog_decay);
  append_float(out, threaded.dk);
  append_float(out, threaded.dv);
  append_float(out, threaded.da);
  append_float(out, threaded.db);
  append_float(out, threaded.dinitial_state);
  append_float(out, threaded.decode_y);
  append_float(out, threaded.decode_state);
  FILE* file = std::fopen(out_path, "wb");
  if (file == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), file) != out.size()) {
    std::fprintf(stderr, "error: cannot write %s\n", out_path);
    std::exit(2);
  }
  std::fclose(file);
}

template <int N>
void check_dtype(const std::string& dtype, const Problem& p, const char* out_path) {
  if (dtype == "f32") return check<N, float>(p, out_path);
  if (dtype == "f16") return check<N, __half>(p, out_path);
  if (dtype == "bf16") return check<N, __nv_bfloat16>(p, out_path);
  std::fprintf(stderr, "error: DTYPE is %s, expected f32, f16 or bf16\n", dtype.c_str());
  std::exit(2);
}

std::vector<float> read_floats(FILE* file, size_t count, const char* path) {
  std::vector<float> x(count);
  if (std::fread(x.data(), sizeof(float), count, file) != count) {
    std::fprintf(stderr, "error: %s is shorter than the sizes given\n", path);
    std::exit(2);
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s N DTYPE BATCH SEQ_LEN HEADS FLAGS IN OUT (got %d arguments)\n", argv[0], argc - 1);
    return 2;
  }
  const int head_size = std::atoi(argv[1]);
  const int flags = std::atoi(argv[6]);
  Problem p{std::atol(argv[3]), std::atol(argv[4]), std::atol(argv[5]), (flags & 1) != 0, (flags & 2) != 0,
            (flags & 4) != 0};
  FILE* file = std::fopen(argv[7], "rb");
  if (file == nullptr) {
    std::fprintf(stderr, "error: cannot open %s\n", argv[7]);
    return 2;
  }
  const size_t tokens = p.batch * p.seq_len * p.heads * head_size, states = p.batch * p.heads * head_size * head_size;
  for (auto& input : p.inputs) input = read_floats(file, tokens, argv[7]);
  p.initial_state = read_floats(file, states, argv[7]);
  p.dfinal_state = read_floats(file, states, argv[7]);
  for (float bit : read_floats(file, p.batch * p.seq_len, argv[7])) p.reset_bits.push_back(bit != 0.f);
  std::fclose(file);

  switch (head_size) {
    case 16: check_dtype<16>(argv[2], p, argv[8]); break;
    case 32: check_dtype<32>(argv[2], p, argv[8]); break;
    case 64: check_dtype<64>(argv[2], p, argv[8]); break;
    default: std::fprintf(stderr, "error: N is %d, expected 16, 32 or 64\n", head_size); return 2;
  }
  return failed ? 1 : 0;
}
