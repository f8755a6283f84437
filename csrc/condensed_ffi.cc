// XLA FFI entry point of the native condensed matmul (CPU).
//
// Work is cut into items (neuron chunks at batch 1; batch tile x neuron chunk
// otherwise) that the calling thread and helpers on XLA's own intra-op thread
// pool claim from a shared counter. The caller never waits for an item that
// nobody has claimed, so the call cannot deadlock when the pool is busy or
// has no free thread: a helper that starts late finds no work and returns.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "condensed_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

const Kernels& SelectKernels() {
#if defined(SRIGL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return KernelsAvx512();
  }
#endif
#if defined(SRIGL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return KernelsAvx2();
  }
#endif
  return KernelsGeneric();
}

const Kernels& ActiveKernels() {
  static const Kernels& kernels = SelectKernels();
  return kernels;
}

// isa: 0 = best for this machine, 1 = generic, 2 = AVX2, 3 = AVX-512. An
// explicit request for a variant that was not built or that the CPU lacks
// returns nullptr.
const Kernels* KernelsFor(int64_t isa) {
  switch (isa) {
    case 0:
      return &ActiveKernels();
    case 1:
      return &KernelsGeneric();
#if defined(SRIGL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case 2:
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return &KernelsAvx2();
      }
      return nullptr;
#endif
#if defined(SRIGL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case 3:
      if (__builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl")) {
        return &KernelsAvx512();
      }
      return nullptr;
#endif
    default:
      return nullptr;
  }
}

// Grow-only per-thread scratch for transposed batch tiles; reused across calls
// so that large batches do not page-fault a fresh buffer every time. Aligned
// to a cache line: every fan-in entry reads one tile row (64 floats = 4
// lines at tile 64) from L2, and malloc's 16-byte alignment for large blocks
// made each row straddle 5 lines, 25% more of the L2 -> L1 traffic that
// bounds this kernel (1.2-1.4x slower at batch 256, measured).
float* TileScratch(int64_t floats) {
  constexpr int64_t kAlign = 64 / sizeof(float);
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats + kAlign) {
    buffer.resize(floats + kAlign);
  }
  const auto addr = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// Below this many multiply-adds per item, waking a helper costs more than it
// saves.
constexpr int64_t kMinItemWork = 16 * 1024;

struct Job {
  Problem p;
  const Kernels* kernels;
  std::vector<int32_t> ablated;  // output columns that only carry their bias
  int64_t tile = 0;              // 0 means the batch-1 path
  int64_t tiles = 1;
  int64_t chunks = 1;  // neuron chunks per tile
  int64_t items = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Rows(int64_t chunk, int64_t* j0, int64_t* j1) const {
    *j0 = p.n_active * chunk / chunks;
    *j1 = p.n_active * (chunk + 1) / chunks;
  }

  void Work() {
    int64_t have_tile = -1;
    float* xt = nullptr;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      if (tile == 0) {
        int64_t j0, j1;
        Rows(i, &j0, &j1);
        kernels->gemv_rows(p, j0, j1);
      } else {
        const int64_t t = i / chunks;
        const int64_t chunk = i % chunks;
        const int64_t b0 = t * tile;
        if (t != have_tile) {
          if (xt == nullptr) xt = TileScratch(p.in * tile);
          kernels->transpose_tile(p, b0, tile, xt);
          have_tile = t;
        }
        int64_t j0, j1;
        Rows(chunk, &j0, &j1);
        kernels->tile_rows(p, xt, tile, b0, j0, j1);
        if (chunk == 0 && !ablated.empty()) {
          const int64_t b1 = std::min(p.batch, b0 + tile);
          for (int64_t b = b0; b < b1; ++b) {
            float* yb = p.y + b * p.out;
            for (int32_t c : ablated) yb[c] = p.bias[c];
          }
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void Plan(Job& job, int64_t threads) {
  const Problem& p = job.p;
  const int64_t work = std::max<int64_t>(1, p.n_active * p.k);
  if (p.batch == 1) {
    job.tile = 0;
    const int64_t by_work = std::max<int64_t>(1, work / kMinItemWork);
    // A few items per thread even out chunks that land on a busy core; a
    // multiple of the thread count keeps an idle core from waiting on a
    // straggler (3 chunks on 2 threads would leave one thread 2/3 of the work).
    int64_t chunks = std::min(by_work, threads * 4);
    if (chunks > 1) chunks = (chunks + threads - 1) / threads * threads;
    job.chunks = std::max<int64_t>(1, std::min(chunks, p.n_active));
    job.tiles = 1;
  } else {
    job.tile = std::min<int64_t>(job.kernels->max_tile,
                                 p.batch <= 16 ? 16 : (p.batch <= 32 ? 32 : 64));
    job.tiles = (p.batch + job.tile - 1) / job.tile;
    const int64_t by_work =
        std::max<int64_t>(1, work * job.tile / kMinItemWork);
    // Split neurons only when there are too few tiles to feed every thread,
    // because each thread transposes every tile it touches.
    const int64_t want = (2 * threads + job.tiles - 1) / job.tiles;
    job.chunks = std::max<int64_t>(
        1, std::min({want, by_work, std::max<int64_t>(1, p.n_active)}));
  }
  job.items = job.tiles * job.chunks;
}

ffi::Error CondensedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer indices,
                               ffi::AnyBuffer values,
                               ffi::Buffer<ffi::S32> neuron_ids,
                               ffi::Buffer<ffi::F32> bias,
                               ffi::ResultBuffer<ffi::F32> y,
                               int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto vd = values.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || vd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "srigl condensed matmul: x, values and y must be rank 2");
  }
  const ffi::DataType it = indices.element_type();
  if (it != ffi::DataType::S16 && it != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument(
        "srigl condensed matmul: indices must be int16 or int32");
  }
  const ffi::DataType vt = values.element_type();
  if (vt != ffi::DataType::F32 && vt != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(
        "srigl condensed matmul: values must be float32 or bfloat16");
  }
  auto job = std::make_shared<Job>();
  Problem& p = job->p;
  p.x = x.typed_data();
  p.batch = xd[0];
  p.in = xd[1];
  p.idx = indices.untyped_data();
  p.idx16 = it == ffi::DataType::S16;
  p.val = values.untyped_data();
  p.val_bf16 = vt == ffi::DataType::BF16;
  p.n_active = vd[0];
  p.k = vd[1];
  p.ids = neuron_ids.typed_data();
  p.bias = bias.typed_data();
  p.out = yd[1];
  p.y = y->typed_data();
  if (yd[0] != p.batch || static_cast<int64_t>(bias.element_count()) != p.out ||
      static_cast<int64_t>(neuron_ids.element_count()) != p.n_active ||
      static_cast<int64_t>(indices.element_count()) != p.n_active * p.k ||
      static_cast<int64_t>(values.element_count()) != p.n_active * p.k) {
    return ffi::Error::InvalidArgument(
        "srigl condensed matmul: inconsistent operand shapes");
  }
  if (p.batch == 0 || p.out == 0) return ffi::Error::Success();
  job->kernels = KernelsFor(isa);
  if (job->kernels == nullptr) {
    return ffi::Error::InvalidArgument(
        "srigl condensed matmul: the requested instruction set is not "
        "available in this build or on this CPU");
  }

  if (p.n_active < p.out) {
    std::vector<char> active(p.out, 0);
    for (int64_t j = 0; j < p.n_active; ++j) active[p.ids[j]] = 1;
    for (int64_t c = 0; c < p.out; ++c) {
      if (!active[c]) job->ablated.push_back(static_cast<int32_t>(c));
    }
  }
  if (p.batch == 1) {
    for (int32_t c : job->ablated) p.y[c] = p.bias[c];
  }

  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  Plan(*job, threads);
  const int64_t helpers = std::min(threads, job->items) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([job]() { job->Work(); });
  }
  job->Work();
  // Only items already claimed by running helpers can be outstanding here.
  for (int spins = 0;
       job->done.load(std::memory_order_acquire) < job->items; ++spins) {
    if (spins > 256) std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace srigl

// The library is built with hidden visibility; only these two symbols are
// the interface that Python looks up.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglCondensedMatmulF32,
                              srigl::CondensedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("isa"));

// Plain C symbol for ctypes: the name of the kernel variant `isa` selects,
// or "" when that variant is unavailable.
extern "C" const char* SriglCondensedKernelName(int64_t isa) {
  const srigl::Kernels* k = srigl::KernelsFor(isa);
  return k == nullptr ? "" : k->name;
}

#pragma GCC visibility pop
