// XLA FFI entry point of the native condensed convolution (CPU).
//
// A direct convolution in the plane layout (conv_kernels.h): no im2col
// buffer, and the NHWC <-> plane transpositions happen inside the kernel, on
// cache-sized blocks, instead of as separate XLA ops over the whole tensor.
//
// Two ways to split the work over XLA's intra-op thread pool:
//  * local planes (large grids): each item is a block of grid columns; the
//    thread that claims it builds that block's planes (plus the tail of
//    `tail` columns its taps reach into) in its own L2-sized scratch, then
//    computes every output channel there.
//  * shared planes (small grids, e.g. 7x7 feature maps at batch 1, where
//    there are too few column blocks to feed the threads): first items build
//    one plane buffer together, then items of output-channel ranges read it.
//    An item of the second phase waits for the first phase to finish; since
//    items are claimed in order from one counter, every build item is then
//    already claimed by a running thread, so the wait cannot deadlock.
// As in condensed_ffi.cc, the caller never waits for an item nobody claimed.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "conv_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

const ConvKernels& SelectConvKernels() {
#if defined(SRIGL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return ConvKernelsAvx512();
  }
#endif
#if defined(SRIGL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return ConvKernelsAvx2();
  }
#endif
  return ConvKernelsGeneric();
}

// isa: 0 = best for this machine, 1 = generic, 2 = AVX2, 3 = AVX-512 (the
// codes of condensed_ffi.cc); nullptr for a variant not built or not usable.
const ConvKernels* ConvKernelsFor(int64_t isa) {
  static const ConvKernels& best = SelectConvKernels();
  switch (isa) {
    case 0:
      return &best;
    case 1:
      return &ConvKernelsGeneric();
#if defined(SRIGL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case 2:
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return &ConvKernelsAvx2();
      }
      return nullptr;
#endif
#if defined(SRIGL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case 3:
      if (__builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl")) {
        return &ConvKernelsAvx512();
      }
      return nullptr;
#endif
    default:
      return nullptr;
  }
}

// Grow-only per-thread buffers, reused across calls so that a call does not
// page-fault fresh memory. Plane rows start on cache lines (64-byte aligned
// buffers, rows of a multiple of 16 floats), with slack at the end.
float* AlignedPlanes(std::vector<float>& buffer, int64_t floats) {
  const int64_t need = floats + 64;
  if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
}

float* LocalPlanes(int64_t floats) {
  thread_local std::vector<float> buffer;
  return AlignedPlanes(buffer, floats);
}

float* ComputeScratch() {
  thread_local std::vector<float> buffer(kConvComputeScratch);
  return buffer.data();
}

// Only the calling thread uses this one, and it outlives the call's items
// because the caller waits for all of them.
float* SharedPlanes(int64_t floats) {
  thread_local std::vector<float> buffer;
  return AlignedPlanes(buffer, floats);
}

// Plane bytes one local item may use: a quarter of a 1 MiB L2, leaving room
// for the output lines being written.
constexpr int64_t kLocalPlaneBytes = 384 * 1024;
// Shared planes larger than this would not stay in the caches anyway.
constexpr int64_t kMaxSharedPlaneBytes = 8 * 1024 * 1024;
// Below this many multiply-adds per item, waking a helper costs more than it
// saves.
constexpr int64_t kMinItemWork = 64 * 1024;

int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Row length of a plane buffer: 64-byte rows, but not a multiple of 4 KiB,
// which would map the same column of every row to one cache set.
int64_t RowLength(int64_t columns) {
  int64_t ld = RoundUp(columns, 16);
  if (ld % 1024 == 0) ld += 16;
  return ld;
}

struct ConvJob {
  ConvProblem p;
  const ConvKernels* kernels;
  std::vector<int32_t> window_start;
  std::vector<int32_t> table;  // flat tap -> start of its run in the planes
  int64_t rows = 0;
  int64_t ld = 0;
  bool shared = false;
  float* planes = nullptr;  // shared mode
  int64_t build_items = 0;  // shared mode: first items build the planes
  int64_t q_chunk = 0;      // grid columns per item
  int64_t q_chunks = 1;
  int64_t w_chunks = 1;  // output-channel window ranges per column block
  int64_t items = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> built{0};
  std::atomic<int64_t> done{0};

  void Work() {
    int64_t have_q = -1;
    float* local = nullptr;
    float* scratch = nullptr;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      if (i < build_items) {
        const int64_t c0 = ld * i / build_items, c1 = ld * (i + 1) / build_items;
        kernels->build_planes(p, c0, c1, 0, planes, ld);
        built.fetch_add(1, std::memory_order_release);
        done.fetch_add(1, std::memory_order_release);
        continue;
      }
      const int64_t item = i - build_items;
      const int64_t qi = item / w_chunks, wi = item % w_chunks;
      const int64_t q0 = qi * q_chunk;
      const int64_t q1 = std::min(p.grid, q0 + q_chunk);
      const int64_t w0 = p.n_windows * wi / w_chunks;
      const int64_t w1 = p.n_windows * (wi + 1) / w_chunks;
      if (scratch == nullptr) scratch = ComputeScratch();
      const float* src;
      int64_t base;
      if (shared) {
        for (int spins = 0;
             built.load(std::memory_order_acquire) < build_items; ++spins) {
          if (spins > 256) std::this_thread::yield();
        }
        src = planes;
        base = 0;
      } else {
        if (local == nullptr) local = LocalPlanes(rows * ld);
        if (qi != have_q) {
          kernels->build_planes(p, q0, q0 + ld, q0, local, ld);
          have_q = qi;
        }
        src = local;
        base = q0;
      }
      kernels->compute(p, src, table.data(), base, q0, q1, w0, w1, scratch);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Items per thread when there is enough work: a few even out items that land
// on a busy core.
constexpr int64_t kItemsPerThread = 4;

void Plan(ConvJob& job, int64_t threads) {
  const ConvProblem& p = job.p;
  const int64_t block = job.kernels->block;
  const int64_t work =
      std::max<int64_t>(1, std::max<int64_t>(1, p.n_active) * p.k * p.grid);
  const int64_t want = std::max<int64_t>(
      1, std::min(threads * kItemsPerThread, work / kMinItemWork));
  const int64_t grid_blocks = (p.grid + block - 1) / block;
  // Largest column block whose planes fit the local budget.
  const int64_t fit = kLocalPlaneBytes / (4 * job.rows) - p.tail - 16;
  int64_t chunk_blocks = std::max<int64_t>(1, fit / block);
  chunk_blocks = std::min(chunk_blocks, grid_blocks);
  // Smaller blocks for more items, as long as the rebuilt tail stays under
  // half of a block's planes.
  const int64_t min_blocks =
      std::max<int64_t>(1, (2 * p.tail + block - 1) / block);
  const int64_t for_want = std::max<int64_t>(1, grid_blocks / want);
  chunk_blocks = std::max(std::min(chunk_blocks, for_want),
                          std::min(chunk_blocks, min_blocks));
  int64_t q_chunks = (grid_blocks + chunk_blocks - 1) / chunk_blocks;
  const int64_t shared_ld = RowLength(RoundUp(p.grid, 16) + p.tail);
  const bool few_columns = q_chunks < std::min<int64_t>(want, 2 * threads);
  if (few_columns && want > q_chunks &&
      job.rows * shared_ld * 4 <= kMaxSharedPlaneBytes && p.n_windows > 1) {
    // Shared planes: channel ranges x column blocks.
    job.shared = true;
    job.ld = shared_ld;
    job.build_items = std::min<int64_t>(threads, std::max<int64_t>(1, job.rows * shared_ld / (64 * 1024)));
    job.q_chunk = std::min(p.grid, chunk_blocks * block);
    job.q_chunks = q_chunks;
    job.w_chunks = std::max<int64_t>(
        1, std::min(p.n_windows, (want + q_chunks - 1) / q_chunks));
  } else {
    job.shared = false;
    job.q_chunk = chunk_blocks * block;
    job.ld = RowLength(std::min(job.q_chunk, RoundUp(p.grid, 16)) + p.tail);
    job.q_chunks = q_chunks;
    job.w_chunks = 1;
  }
  job.items = job.build_items + job.q_chunks * job.w_chunks;
}

ffi::Error CondensedConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::AnyBuffer taps, ffi::Buffer<ffi::F32> values,
                             ffi::Buffer<ffi::S32> neuron_ids,
                             ffi::Buffer<ffi::F32> bias,
                             ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                             int64_t kw, int64_t sh, int64_t sw,
                             int64_t pad_top, int64_t pad_bottom,
                             int64_t pad_left, int64_t pad_right,
                             int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto vd = values.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || vd.size() != 2 || yd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: x and y must be rank 4, values rank 2");
  }
  const ffi::DataType tt = taps.element_type();
  if (tt != ffi::DataType::S16 && tt != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: taps must be int16 or int32");
  }
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || pad_top < 0 || pad_bottom < 0 ||
      pad_left < 0 || pad_right < 0) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: bad kernel size, stride or padding");
  }
  auto job = std::make_shared<ConvJob>();
  ConvProblem& p = job->p;
  p.x = x.typed_data();
  p.batch = xd[0];
  p.h = xd[1];
  p.w = xd[2];
  p.cin = xd[3];
  p.kh = kh;
  p.kw = kw;
  p.sh = sh;
  p.sw = sw;
  p.pad_top = pad_top;
  p.pad_left = pad_left;
  const int64_t hp = p.h + pad_top + pad_bottom;
  const int64_t wp = p.w + pad_left + pad_right;
  p.oh = (hp - kh) / sh + 1;
  p.ow = (wp - kw) / sw + 1;
  p.hq = (hp + sh - 1) / sh;
  p.wq = (wp + sw - 1) / sw;
  p.grid = p.batch * p.hq * p.wq;
  p.tail = ((kh - 1) / sh) * p.wq + (kw - 1) / sw;
  p.taps = taps.untyped_data();
  p.taps16 = tt == ffi::DataType::S16;
  p.val = values.typed_data();
  p.n_active = vd[0];
  p.k = vd[1];
  p.ids = neuron_ids.typed_data();
  p.bias = bias.typed_data();
  p.cout = yd[3];
  p.y = y->typed_data();
  if (hp < kh || wp < kw || yd[0] != p.batch || yd[1] != p.oh ||
      yd[2] != p.ow ||
      static_cast<int64_t>(bias.element_count()) != p.cout ||
      static_cast<int64_t>(neuron_ids.element_count()) != p.n_active ||
      static_cast<int64_t>(taps.element_count()) != p.n_active * p.k) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: inconsistent operand shapes or geometry");
  }
  if (p.batch == 0 || p.cout == 0 || p.oh <= 0 || p.ow <= 0) {
    return ffi::Error::Success();
  }
  job->kernels = ConvKernelsFor(isa);
  if (job->kernels == nullptr) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: the requested instruction set is not "
        "available in this build or on this CPU");
  }
  // Active rows per window of output channels; needs sorted, distinct ids.
  p.n_windows = (p.cout + kConvWindow - 1) / kConvWindow;
  job->window_start.assign(p.n_windows + 1, static_cast<int32_t>(p.n_active));
  for (int64_t j = p.n_active - 1; j >= 0; --j) {
    const int32_t c = p.ids[j];
    if (c < 0 || c >= p.cout || (j > 0 && p.ids[j - 1] >= c)) {
      return ffi::Error::InvalidArgument(
          "srigl condensed conv: neuron_ids must be sorted, distinct and "
          "below the number of output channels");
    }
    job->window_start[c / kConvWindow] = static_cast<int32_t>(j);
  }
  // Windows without an active channel start where the next window does.
  for (int64_t a = p.n_windows - 1; a >= 0; --a) {
    job->window_start[a] =
        std::min(job->window_start[a], job->window_start[a + 1]);
  }
  p.window_start = job->window_start.data();
  job->rows = sh * sw * p.cin;

  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  Plan(*job, threads);
  if (job->rows * job->ld > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: input too large for 32-bit plane offsets");
  }
  // Start of every tap's run, by flat (dy, dx, c) index; no divisions in the
  // inner loops.
  const int64_t fan = kh * kw * p.cin;
  job->table.resize(fan);
  for (int64_t dy = 0; dy < kh; ++dy) {
    for (int64_t dx = 0; dx < kw; ++dx) {
      const int64_t row0 = ((dy % sh) * sw + dx % sw) * p.cin;
      const int64_t off = (dy / sh) * p.wq + dx / sw;
      int32_t* t = job->table.data() + (dy * kw + dx) * p.cin;
      for (int64_t c = 0; c < p.cin; ++c) {
        t[c] = static_cast<int32_t>((row0 + c) * job->ld + off);
      }
    }
  }
  if (job->shared) job->planes = SharedPlanes(job->rows * job->ld);

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

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglCondensedConvF32, srigl::CondensedConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("isa"));

// Plain C symbol for ctypes: the conv kernel variant `isa` selects, or "".
extern "C" const char* SriglCondensedConvKernelName(int64_t isa) {
  const srigl::ConvKernels* k = srigl::ConvKernelsFor(isa);
  return k == nullptr ? "" : k->name;
}

#pragma GCC visibility pop
