// The LSTM and GRU layers as one oneDNN RNN primitive each (forward training/inference and
// backward), called from JAX through the XLA FFI. This is the route PyTorch's CPU nn.LSTM and
// nn.GRU take: oneDNN runs the input projection as one large product, the recurrence with
// JIT-generated kernels (AMX for bf16 where the CPU has it), and the backward pass with the
// weight gradients batched over time.
//
// Conventions (lstm_jax.onednn is the Python side and documents them):
//   LSTM: x (T, N, C), w_x (C, 4H), w_h (H, 4H) in the compute dtype (f32 or bf16), gates
//   i, f, g, o (oneDNN's own order, and ours); b (4H) f32; h0 (N, H) in the compute dtype; c0
//   (N, H) f32. Forward returns ys (T, N, H) and h_T (N, H) in the compute dtype, c_T f32, and
//   the workspace (bytes) the backward pass needs. The backward pass returns f32 gradients.
//   GRU (oneDNN's lbr_gru, the reset gate applied after the recurrent product): the same without
//   c, with w_x (C, 3H) and w_h (H, 3H) in oneDNN's gate order u, r, o and b (4H): b_u, b_r, the
//   input bias of o and the recurrent bias of o (the Python side permutes GRUCell's r, z, n).
// Primitives are created once per (shape, dtype, threads) and cached; executing them is
// thread-safe (one scratchpad per calling thread), so several CPU devices may call at once.

#include <omp.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

namespace {

dnnl::engine &Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Shape {
  int64_t T, N, C, H;
  bool bf16;
  int64_t threads;
  auto tie() const { return std::tie(T, N, C, H, bf16, threads); }
  bool operator<(const Shape &o) const { return tie() < o.tie(); }
};

template <class Fwd, class Bwd, int kGates, bool kCell>
struct LayerOf {
  static constexpr int gates = kGates;  // in the weights (the GRU's bias has one more)
  static constexpr bool cell = kCell;   // whether there is a cell state c
  typename Fwd::primitive_desc train_pd, infer_pd;
  typename Bwd::primitive_desc bwd_pd;
  Fwd train, infer;
  Bwd bwd;
};
using Lstm = LayerOf<dnnl::lstm_forward, dnnl::lstm_backward, 4, true>;
using Gru = LayerOf<dnnl::lbr_gru_forward, dnnl::lbr_gru_backward, 3, false>;

memory::desc Desc(const memory::dims &dims, Dt dt, Tag tag) { return memory::desc(dims, dt, tag); }

// The primitives of one layer shape: training and inference forward, and backward.
template <class L>
std::unique_ptr<L> MakeLayer(const Shape &s) {
  constexpr int G = L::gates, B = 4;  // bias gates: the LSTM's 4, and lbr_gru's 3 plus the recurrent bias of o
  const Dt dt = s.bf16 ? Dt::bf16 : Dt::f32;
  const auto src = Desc({s.T, s.N, s.C}, dt, Tag::tnc), dst = Desc({s.T, s.N, s.H}, dt, Tag::tnc);
  const auto iter = Desc({1, 1, s.N, s.H}, dt, Tag::ldnc), iter_c = Desc({1, 1, s.N, s.H}, Dt::f32, Tag::ldnc);
  const auto w_layer = Desc({1, 1, s.C, G, s.H}, dt, Tag::any), w_iter = Desc({1, 1, s.H, G, s.H}, dt, Tag::any);
  const auto bias = Desc({1, 1, B, s.H}, Dt::f32, Tag::ldgo);
  // Gradients in f32 (the pure-JAX path's cotangents are f32 too).
  const auto d_src = Desc({s.T, s.N, s.C}, Dt::f32, Tag::tnc), d_dst = Desc({s.T, s.N, s.H}, Dt::f32, Tag::tnc);
  const auto d_iter = Desc({1, 1, s.N, s.H}, Dt::f32, Tag::ldnc);
  const auto d_w_layer = Desc({1, 1, s.C, G, s.H}, Dt::f32, Tag::any);
  const auto d_w_iter = Desc({1, 1, s.H, G, s.H}, Dt::f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto dir = dnnl::rnn_direction::unidirectional_left2right;
  const auto train = dnnl::prop_kind::forward_training, infer = dnnl::prop_kind::forward_inference;
  using FwdPd = decltype(L::train_pd);
  using BwdPd = decltype(L::bwd_pd);
  auto layer = std::make_unique<L>();
  if constexpr (L::cell) {
    layer->train_pd = FwdPd(Engine(), train, dir, src, iter, iter_c, w_layer, w_iter, bias, dst, iter, iter_c, attr);
    layer->infer_pd = FwdPd(Engine(), infer, dir, src, iter, iter_c, w_layer, w_iter, bias, dst, iter, iter_c, attr);
    layer->bwd_pd = BwdPd(Engine(), dnnl::prop_kind::backward, dir, src, iter, iter_c, w_layer, w_iter, bias, dst,
                          iter, iter_c, d_src, d_iter, d_iter, d_w_layer, d_w_iter, bias, d_dst, d_iter, d_iter,
                          layer->train_pd, attr);
  } else {
    layer->train_pd = FwdPd(Engine(), train, dir, src, iter, w_layer, w_iter, bias, dst, iter, attr);
    layer->infer_pd = FwdPd(Engine(), infer, dir, src, iter, w_layer, w_iter, bias, dst, iter, attr);
    layer->bwd_pd = BwdPd(Engine(), dnnl::prop_kind::backward, dir, src, iter, w_layer, w_iter, bias, dst, iter,
                          d_src, d_iter, d_w_layer, d_w_iter, bias, d_dst, d_iter, layer->train_pd, attr);
  }
  layer->train = decltype(layer->train)(layer->train_pd);
  layer->infer = decltype(layer->infer)(layer->infer_pd);
  layer->bwd = decltype(layer->bwd)(layer->bwd_pd);
  return layer;
}

template <class L>
L &GetLayer(const Shape &s);

// Sets this thread's OpenMP thread count for one call and puts it back afterwards: the OpenMP
// runtime is shared by the whole process (PyTorch's libgomp and oneDNN's have the same soname),
// so a count left behind would change other libraries' parallel regions on this thread.
class OmpThreads {
 public:
  explicit OmpThreads(int64_t threads) : before_(omp_get_max_threads()) { omp_set_num_threads(static_cast<int>(threads)); }
  ~OmpThreads() { omp_set_num_threads(before_); }

 private:
  int before_;
};

// The cached primitives of one shape. They are created with the OpenMP thread count they will
// run with: oneDNN's bf16 (brgemm) RNN fixes its thread count when the primitive is created, so a
// one-thread primitive created on a thread with two (JAX's, at trace time) ran on two, from a
// second OpenMP team, at every call; that slowed every later multi-thread call in the process
// (a float32 seed Trainer step on 2 threads, 31 -> 48 ms after one bf16 Trainer had run).
template <class L>
L &GetLayer(const Shape &s) {
  static std::mutex mutex;
  static std::map<Shape, std::unique_ptr<L>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto &slot = cache[s];
  if (!slot) {
    OmpThreads omp_threads(s.threads);
    slot = MakeLayer<L>(s);
  }
  return *slot;
}

// Calls with more than one thread all run on one dedicated thread, so the process holds a single
// OpenMP team for them. libgomp counts every OpenMP thread of the process, and once there are
// more than cores it stops spin-waiting between parallel regions and sleeps instead; the RNN
// primitive opens regions at every time step, so a second team (XLA calls custom calls from
// whichever of its threads is free) made the same call run at half speed, on and off. Calls
// with one thread open no region and run on the calling thread, concurrently across devices.
class Executor {
 public:
  static Executor &Get() {
    static Executor *executor = new Executor();  // never destroyed: no join at process exit
    return *executor;
  }
  ffi::Error Run(std::function<ffi::Error()> body) {
    std::packaged_task<ffi::Error()> job(std::move(body));
    std::future<ffi::Error> done = job.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
    return done.get();
  }

 private:
  Executor() : thread_([this] { Loop(); }) { thread_.detach(); }
  void Loop() {
    for (;;) {
      std::packaged_task<ffi::Error()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<ffi::Error()>> jobs_;
  std::thread thread_;
};

ffi::Error OnThreads(int64_t threads, std::function<ffi::Error()> body) {
  return threads <= 1 ? body() : Executor::Get().Run(std::move(body));
}

// Per-thread bump allocator for the scratchpad and the weights in the primitive's layout, every
// piece on a 64-byte (cache-line) boundary: `base` is the first one in the vector (64 bytes
// longer than asked), as a std::vector is aligned to 16 bytes only. Unaligned, the AMX kernels
// read their reordered weights across cache lines whenever malloc's address fell off a line: on
// the Intel Xeon (AMX) the bf16 training forward of a T=100, N=64, H=512 layer took 66-97 ms on 1
// thread against 52-59 ms aligned, and the `large` bf16 Trainer step 252-274 ms against 232-235
// ms (old and new builds taking turns).
struct Arena {
  std::vector<uint8_t> bytes;
  uint8_t *base = nullptr;
  size_t used = 0;
  void Reserve(size_t n) {
    used = 0;
    if (bytes.size() < n + 64) bytes.resize(n + 64);
    base = bytes.data() + (64 - reinterpret_cast<uintptr_t>(bytes.data()) % 64) % 64;
  }
  void *Take(size_t n) {
    void *p = base + used;
    used += (n + 63) / 64 * 64;
    return p;
  }
};

size_t Rounded(const memory::desc &d) { return (d.get_size() + 63) / 64 * 64; }

// `user` (a plain-layout buffer) as the primitive wants `want`: itself, or a reordered copy.
memory AsLayout(const memory &user, const memory::desc &want, Arena &arena, dnnl::stream &stream) {
  if (user.get_desc() == want) return user;
  memory copy(want, Engine(), arena.Take(want.get_size()));
  dnnl::reorder(user, copy).execute(stream, const_cast<memory &>(user), copy);
  return copy;
}

// Our kernels (C, G*H) and (H, G*H) as the primitive wants its weights (ldigo: gate-major
// columns, as ours; the GRU's come already in oneDNN's gate order).
template <class L, class Pd>
std::pair<memory, memory> Weights(const Pd &pd, const Shape &s, void *w_x, void *w_h, Arena &arena,
                                  dnnl::stream &stream) {
  const Dt dt = s.bf16 ? Dt::bf16 : Dt::f32;
  memory u_wl(Desc({1, 1, s.C, L::gates, s.H}, dt, Tag::ldigo), Engine(), w_x);
  memory u_wi(Desc({1, 1, s.H, L::gates, s.H}, dt, Tag::ldigo), Engine(), w_h);
  return {AsLayout(u_wl, pd.weights_layer_desc(), arena, stream), AsLayout(u_wi, pd.weights_iter_desc(), arena, stream)};
}

// The buffers of one call; c0 and c_t are null for the GRU.
struct Io {
  void *x, *w_x, *w_h, *b, *h0, *c0, *ys, *h_t, *c_t;
};

// The arguments both passes give the primitive: inputs, weights, outputs and the scratchpad.
template <class Pd>
std::unordered_map<int, memory> LayerArgs(const Pd &pd, const Io &io, const memory &wl, const memory &wi,
                                          const memory &scratch) {
  auto at = [](const memory::desc &d, void *data) { return memory(d, Engine(), data); };
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC_LAYER, at(pd.src_layer_desc(), io.x)}, {DNNL_ARG_SRC_ITER, at(pd.src_iter_desc(), io.h0)},
      {DNNL_ARG_WEIGHTS_LAYER, wl},                         {DNNL_ARG_WEIGHTS_ITER, wi},
      {DNNL_ARG_BIAS, at(pd.bias_desc(), io.b)},            {DNNL_ARG_DST_LAYER, at(pd.dst_layer_desc(), io.ys)},
      {DNNL_ARG_DST_ITER, at(pd.dst_iter_desc(), io.h_t)},  {DNNL_ARG_SCRATCHPAD, scratch}};
  if (io.c0 != nullptr) {
    args.insert({{DNNL_ARG_SRC_ITER_C, at(pd.src_iter_c_desc(), io.c0)},
                 {DNNL_ARG_DST_ITER_C, at(pd.dst_iter_c_desc(), io.c_t)}});
  }
  return args;
}

Shape ShapeOf(const ffi::AnyBuffer &x, const ffi::AnyBuffer &w_h, int64_t threads) {
  auto xd = x.dimensions();
  return Shape{xd[0], xd[1], xd[2], w_h.dimensions()[0], x.element_type() == ffi::DataType::BF16, threads};
}

ffi::Error CheckTypes(const ffi::AnyBuffer &x, const ffi::AnyBuffer &w_x, const ffi::AnyBuffer &w_h,
                      const ffi::AnyBuffer &h0) {
  auto t = x.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("onednn: x must be float32 or bfloat16");
  if (w_x.element_type() != t || w_h.element_type() != t || h0.element_type() != t)
    return ffi::Error::InvalidArgument("onednn: x, w_x, w_h and h0 must share one dtype");
  if (x.dimensions().size() != 3 || w_h.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("onednn: x must be (T, N, C) and w_h (H, G*H)");
  return ffi::Error::Success();
}

template <class L>
ffi::Error Forward(const Shape &s, const Io &io, void *workspace, size_t workspace_bytes, bool training) {
  return OnThreads(s.threads, [&]() -> ffi::Error {
    try {
      L &layer = GetLayer<L>(s);
      const auto &pd = training ? layer.train_pd : layer.infer_pd;
      if (training && workspace_bytes != pd.workspace_desc().get_size())
        return ffi::Error::InvalidArgument("onednn: workspace size does not match the primitive");
      OmpThreads omp_threads(s.threads);
      dnnl::stream stream(Engine());
      thread_local Arena arena;
      arena.Reserve(Rounded(pd.weights_layer_desc()) + Rounded(pd.weights_iter_desc()) + Rounded(pd.scratchpad_desc()));
      const auto [wl, wi] = Weights<L>(pd, s, io.w_x, io.w_h, arena, stream);
      memory scratch(pd.scratchpad_desc(), Engine(), arena.Take(pd.scratchpad_desc().get_size()));
      auto args = LayerArgs(pd, io, wl, wi, scratch);
      if (training) args[DNNL_ARG_WORKSPACE] = memory(pd.workspace_desc(), Engine(), workspace);
      (training ? layer.train : layer.infer).execute(stream, args);
      stream.wait();
    } catch (const dnnl::error &e) {
      return ffi::Error::Internal(std::string("onednn forward: ") + e.what());
    } catch (const std::bad_alloc &) {  // the arena or a primitive: an XLA error, not an exception
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "onednn forward: out of memory for the layer's weights and scratchpad");
    }
    return ffi::Error::Success();
  });
}

// Gradient buffers of one backward call (f32); d_c_t and d_c0 are null for the GRU.
struct Grads {
  void *d_ys, *d_h_t, *d_c_t, *d_x, *d_w_x, *d_w_h, *d_b, *d_h0, *d_c0;
  size_t d_b_bytes;
};

template <class L>
ffi::Error Backward(const Shape &s, const Io &io, void *workspace, size_t workspace_bytes, const Grads &g) {
  return OnThreads(s.threads, [&]() -> ffi::Error {
    try {
      L &layer = GetLayer<L>(s);
      const auto &pd = layer.bwd_pd;
      if (workspace_bytes != pd.workspace_desc().get_size())
        return ffi::Error::InvalidArgument("onednn: workspace size does not match the primitive");
      OmpThreads omp_threads(s.threads);
      dnnl::stream stream(Engine());
      thread_local Arena arena;
      const auto &dwl_desc = pd.diff_weights_layer_desc(), &dwi_desc = pd.diff_weights_iter_desc();
      arena.Reserve(Rounded(pd.weights_layer_desc()) + Rounded(pd.weights_iter_desc()) + Rounded(dwl_desc) +
                    Rounded(dwi_desc) + Rounded(pd.scratchpad_desc()));
      const auto [wl, wi] = Weights<L>(pd, s, io.w_x, io.w_h, arena, stream);
      // oneDNN accumulates into the weight and bias gradients: start them at zero.
      memory u_dwl(Desc({1, 1, s.C, L::gates, s.H}, Dt::f32, Tag::ldigo), Engine(), g.d_w_x);
      memory u_dwi(Desc({1, 1, s.H, L::gates, s.H}, Dt::f32, Tag::ldigo), Engine(), g.d_w_h);
      memory dwl = u_dwl.get_desc() == dwl_desc ? u_dwl : memory(dwl_desc, Engine(), arena.Take(dwl_desc.get_size()));
      memory dwi = u_dwi.get_desc() == dwi_desc ? u_dwi : memory(dwi_desc, Engine(), arena.Take(dwi_desc.get_size()));
      std::memset(dwl.get_data_handle(), 0, dwl_desc.get_size());
      std::memset(dwi.get_data_handle(), 0, dwi_desc.get_size());
      std::memset(g.d_b, 0, g.d_b_bytes);
      memory scratch(pd.scratchpad_desc(), Engine(), arena.Take(pd.scratchpad_desc().get_size()));
      auto args = LayerArgs(pd, io, wl, wi, scratch);
      auto at = [](const memory::desc &d, void *data) { return memory(d, Engine(), data); };
      args.insert({
          {DNNL_ARG_WORKSPACE, at(pd.workspace_desc(), workspace)},
          {DNNL_ARG_DIFF_DST_LAYER, at(pd.diff_dst_layer_desc(), g.d_ys)},
          {DNNL_ARG_DIFF_DST_ITER, at(pd.diff_dst_iter_desc(), g.d_h_t)},
          {DNNL_ARG_DIFF_SRC_LAYER, at(pd.diff_src_layer_desc(), g.d_x)},
          {DNNL_ARG_DIFF_SRC_ITER, at(pd.diff_src_iter_desc(), g.d_h0)},
          {DNNL_ARG_DIFF_WEIGHTS_LAYER, dwl},
          {DNNL_ARG_DIFF_WEIGHTS_ITER, dwi},
          {DNNL_ARG_DIFF_BIAS, at(pd.diff_bias_desc(), g.d_b)},
      });
      if (g.d_c0 != nullptr) {
        args.insert({{DNNL_ARG_DIFF_DST_ITER_C, at(pd.diff_dst_iter_c_desc(), g.d_c_t)},
                     {DNNL_ARG_DIFF_SRC_ITER_C, at(pd.diff_src_iter_c_desc(), g.d_c0)}});
      }
      layer.bwd.execute(stream, args);
      if (dwl != u_dwl) dnnl::reorder(dwl, u_dwl).execute(stream, dwl, u_dwl);
      if (dwi != u_dwi) dnnl::reorder(dwi, u_dwi).execute(stream, dwi, u_dwi);
      stream.wait();
    } catch (const dnnl::error &e) {
      return ffi::Error::Internal(std::string("onednn backward: ") + e.what());
    } catch (const std::bad_alloc &) {  // the arena or a primitive: an XLA error, not an exception
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "onednn backward: out of memory for the layer's weights and scratchpad");
    }
    return ffi::Error::Success();
  });
}

ffi::Error LstmForward(ffi::AnyBuffer x, ffi::AnyBuffer w_x, ffi::AnyBuffer w_h, ffi::Buffer<ffi::F32> b,
                       ffi::AnyBuffer h0, ffi::Buffer<ffi::F32> c0, ffi::Result<ffi::AnyBuffer> ys,
                       ffi::Result<ffi::AnyBuffer> h_t, ffi::Result<ffi::Buffer<ffi::F32>> c_t,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t threads, bool training) {
  if (auto e = CheckTypes(x, w_x, w_h, h0); e.failure()) return e;
  const Io io{x.untyped_data(),  w_x.untyped_data(), w_h.untyped_data(), b.untyped_data(),  h0.untyped_data(),
              c0.untyped_data(), ys->untyped_data(), h_t->untyped_data(), c_t->untyped_data()};
  return Forward<Lstm>(ShapeOf(x, w_h, threads), io, workspace->untyped_data(), workspace->size_bytes(), training);
}

ffi::Error GruForward(ffi::AnyBuffer x, ffi::AnyBuffer w_x, ffi::AnyBuffer w_h, ffi::Buffer<ffi::F32> b,
                      ffi::AnyBuffer h0, ffi::Result<ffi::AnyBuffer> ys, ffi::Result<ffi::AnyBuffer> h_t,
                      ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t threads, bool training) {
  if (auto e = CheckTypes(x, w_x, w_h, h0); e.failure()) return e;
  const Io io{x.untyped_data(), w_x.untyped_data(), w_h.untyped_data(), b.untyped_data(),  h0.untyped_data(),
              nullptr,          ys->untyped_data(), h_t->untyped_data(), nullptr};
  return Forward<Gru>(ShapeOf(x, w_h, threads), io, workspace->untyped_data(), workspace->size_bytes(), training);
}

ffi::Error LstmBackward(ffi::AnyBuffer x, ffi::AnyBuffer w_x, ffi::AnyBuffer w_h, ffi::Buffer<ffi::F32> b,
                        ffi::AnyBuffer h0, ffi::Buffer<ffi::F32> c0, ffi::AnyBuffer ys, ffi::AnyBuffer h_t,
                        ffi::Buffer<ffi::F32> c_t, ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> d_ys,
                        ffi::Buffer<ffi::F32> d_h_t, ffi::Buffer<ffi::F32> d_c_t,
                        ffi::Result<ffi::Buffer<ffi::F32>> d_x, ffi::Result<ffi::Buffer<ffi::F32>> d_w_x,
                        ffi::Result<ffi::Buffer<ffi::F32>> d_w_h, ffi::Result<ffi::Buffer<ffi::F32>> d_b,
                        ffi::Result<ffi::Buffer<ffi::F32>> d_h0, ffi::Result<ffi::Buffer<ffi::F32>> d_c0,
                        int64_t threads) {
  if (auto e = CheckTypes(x, w_x, w_h, h0); e.failure()) return e;
  const Io io{x.untyped_data(), w_x.untyped_data(), w_h.untyped_data(), b.untyped_data(),  h0.untyped_data(),
              c0.untyped_data(), ys.untyped_data(), h_t.untyped_data(), c_t.untyped_data()};
  const Grads g{d_ys.untyped_data(),   d_h_t.untyped_data(), d_c_t.untyped_data(), d_x->untyped_data(),
                d_w_x->untyped_data(), d_w_h->untyped_data(), d_b->untyped_data(), d_h0->untyped_data(),
                d_c0->untyped_data(),  d_b->size_bytes()};
  return Backward<Lstm>(ShapeOf(x, w_h, threads), io, workspace.untyped_data(), workspace.size_bytes(), g);
}

ffi::Error GruBackward(ffi::AnyBuffer x, ffi::AnyBuffer w_x, ffi::AnyBuffer w_h, ffi::Buffer<ffi::F32> b,
                       ffi::AnyBuffer h0, ffi::AnyBuffer ys, ffi::AnyBuffer h_t, ffi::Buffer<ffi::U8> workspace,
                       ffi::Buffer<ffi::F32> d_ys, ffi::Buffer<ffi::F32> d_h_t,
                       ffi::Result<ffi::Buffer<ffi::F32>> d_x, ffi::Result<ffi::Buffer<ffi::F32>> d_w_x,
                       ffi::Result<ffi::Buffer<ffi::F32>> d_w_h, ffi::Result<ffi::Buffer<ffi::F32>> d_b,
                       ffi::Result<ffi::Buffer<ffi::F32>> d_h0, int64_t threads) {
  if (auto e = CheckTypes(x, w_x, w_h, h0); e.failure()) return e;
  const Io io{x.untyped_data(), w_x.untyped_data(), w_h.untyped_data(), b.untyped_data(), h0.untyped_data(),
              nullptr,          ys.untyped_data(),  h_t.untyped_data(), nullptr};
  const Grads g{d_ys.untyped_data(),   d_h_t.untyped_data(), nullptr, d_x->untyped_data(), d_w_x->untyped_data(),
                d_w_h->untyped_data(), d_b->untyped_data(),  d_h0->untyped_data(), nullptr, d_b->size_bytes()};
  return Backward<Gru>(ShapeOf(x, w_h, threads), io, workspace.untyped_data(), workspace.size_bytes(), g);
}

}  // namespace

// Bytes of the workspace the training forward pass hands to the backward pass (0 where oneDNN
// does not implement the layer here).
extern "C" int64_t lstm_jax_onednn_lstm_workspace_bytes(int64_t T, int64_t N, int64_t C, int64_t H, int bf16,
                                                        int64_t threads) {
  try {
    return static_cast<int64_t>(GetLayer<Lstm>(Shape{T, N, C, H, bf16 != 0, threads}).train_pd.workspace_desc().get_size());
  } catch (const dnnl::error &) {
    return 0;
  }
}

extern "C" int64_t lstm_jax_onednn_gru_workspace_bytes(int64_t T, int64_t N, int64_t C, int64_t H, int bf16,
                                                       int64_t threads) {
  try {
    return static_cast<int64_t>(GetLayer<Gru>(Shape{T, N, C, H, bf16 != 0, threads}).train_pd.workspace_desc().get_size());
  } catch (const dnnl::error &) {
    return 0;
  }
}

// x, w_x, w_h, b, h0: the inputs every handler starts with.
auto LayerInputs() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxOnednnLstmForward, LstmForward,
                              LayerInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()     // c0
                                  .Ret<ffi::AnyBuffer>()            // ys
                                  .Ret<ffi::AnyBuffer>()            // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()     // c_T
                                  .Ret<ffi::Buffer<ffi::U8>>()      // workspace
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("training"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxOnednnLstmBackward, LstmBackward,
                              LayerInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()     // c0
                                  .Arg<ffi::AnyBuffer>()            // ys
                                  .Arg<ffi::AnyBuffer>()            // h_T
                                  .Arg<ffi::Buffer<ffi::F32>>()     // c_T
                                  .Arg<ffi::Buffer<ffi::U8>>()      // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d_ys
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d_h_T
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d_c_T
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_x
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_w_x
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_w_h
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_b
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_h0
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_c0
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxOnednnGruForward, GruForward,
                              LayerInputs()
                                  .Ret<ffi::AnyBuffer>()            // ys
                                  .Ret<ffi::AnyBuffer>()            // h_T
                                  .Ret<ffi::Buffer<ffi::U8>>()      // workspace
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("training"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxOnednnGruBackward, GruBackward,
                              LayerInputs()
                                  .Arg<ffi::AnyBuffer>()            // ys
                                  .Arg<ffi::AnyBuffer>()            // h_T
                                  .Arg<ffi::Buffer<ffi::U8>>()      // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d_ys
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d_h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_x
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_w_x
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_w_h
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_b
                                  .Ret<ffi::Buffer<ffi::F32>>()     // d_h0
                                  .Attr<int64_t>("threads"));
