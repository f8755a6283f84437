// XLA FFI entry point of the native condensed convolution (CPU).
//
// A direct convolution in the plane layout (kernels.h): no im2col
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
// As everywhere (common/work.h), the caller never waits for an item nobody
// claimed.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common/ffi_operands.h"
#include "common/isa_dispatch.h"
#include "common/scratch.h"
#include "common/work.h"
#include "conv/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

// Per-thread buffers (common/scratch.h). Plane rows start on cache lines:
// the plane buffers are 64-byte aligned and rows are a multiple of 16 floats.
struct LocalPlanesTag;
// Only the calling thread uses this one, and it outlives the call's items
// because the caller waits for all of them.
struct SharedPlanesTag;
// The rows `compute` writes and reads back. Aligning this one measured 3%
// slower with the AVX2 kernels (3x3 conv on 28x28x64, batch 1).
struct ComputeScratchTag;

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
  std::atomic<int64_t> built{0};
  WorkQueue queue;

  void Work() {
    int64_t have_q = -1;
    float* local = nullptr;
    float* scratch = nullptr;
    queue.Drain([&](int64_t i) {
      if (i < build_items) {
        const int64_t c0 = ld * i / build_items, c1 = ld * (i + 1) / build_items;
        kernels->build_planes(p, c0, c1, 0, planes, ld);
        built.fetch_add(1, std::memory_order_release);
        return;
      }
      const int64_t item = i - build_items;
      const int64_t qi = item / w_chunks, wi = item % w_chunks;
      const int64_t q0 = qi * q_chunk;
      const int64_t q1 = std::min(p.grid, q0 + q_chunk);
      const int64_t w0 = p.n_windows * wi / w_chunks;
      const int64_t w1 = p.n_windows * (wi + 1) / w_chunks;
      if (scratch == nullptr) {
        scratch = ThreadScratch<ComputeScratchTag>(kConvComputeScratch);
      }
      const float* src;
      int64_t base;
      if (shared) {
        SpinUntil(built, build_items);
        src = planes;
        base = 0;
      } else {
        if (local == nullptr) {
          local = AlignedThreadScratch<LocalPlanesTag>(rows * ld);
        }
        if (qi != have_q) {
          kernels->build_planes(p, q0, q0 + ld, q0, local, ld);
          have_q = qi;
        }
        src = local;
        base = q0;
      }
      kernels->compute(p, src, table.data(), base, q0, q1, w0, w1, scratch);
    });
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
  job.queue.items = job.build_items + job.q_chunks * job.w_chunks;
}

ffi::Error CondensedConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::AnyBuffer taps, ffi::AnyBuffer values,
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
  auto job = std::make_shared<ConvJob>();
  ConvProblem& p = job->p;
  if (ffi::Error error = ReadWeights("srigl condensed conv", "taps", taps,
                                    values, neuron_ids, bias, &p);
      error.failure()) {
    return error;
  }
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || pad_top < 0 || pad_bottom < 0 ||
      pad_left < 0 || pad_right < 0) {
    return ffi::Error::InvalidArgument(
        "srigl condensed conv: bad kernel size, stride or padding");
  }
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
  job->kernels = KernelsFor<ConvKernels>(isa);
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

  const int64_t threads = ThreadBudget(pool, max_threads);
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
  if (job->shared) {
    job->planes = AlignedThreadScratch<SharedPlanesTag>(job->rows * job->ld);
  }
  RunOnPool(pool, threads, job);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace srigl

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglCondensedConvF32, srigl::CondensedConvImpl,
                              srigl::BindCondensedOperands()
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

// Plain C symbol for ctypes: the conv kernel build `isa` selects, or "".
extern "C" const char* SriglCondensedConvKernelName(int64_t isa) {
  return srigl::KernelName(isa);
}

#pragma GCC visibility pop
