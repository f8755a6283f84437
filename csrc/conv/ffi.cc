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
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
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
// A batch-1 call below this many multiply-adds runs on the calling thread.
// Waking a pool thread costs 10-30 us, and a helper pays only when a core is
// free. Measured interleaved at batch 1 on a 2-core AVX-512 Xeon shared with
// other jobs (3x3 convs, one thread's time against the pool's, medians):
// 217k multiply-adds 1.04, 868k 0.84, 4.5M 0.95, 18M 0.94.
constexpr int64_t kMinBatch1SplitWork = 4 * 1024 * 1024;

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

// Returns the threads the call uses.
int64_t Plan(ConvJob& job, int64_t threads) {
  const ConvProblem& p = job.p;
  const int64_t block = job.kernels->block;
  // Multiply-adds of the call, saturating (only the split depends on it).
  const int64_t row_work = std::max<int64_t>(1, std::max<int64_t>(1, p.n_active) * p.k);
  const int64_t columns = std::max<int64_t>(1, p.grid);
  const int64_t work = row_work > std::numeric_limits<int64_t>::max() / columns
                           ? std::numeric_limits<int64_t>::max()
                           : row_work * columns;
  if (p.batch == 1 && work < kMinBatch1SplitWork) threads = 1;
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
  return threads;
}

constexpr const char* kOp = "srigl condensed conv";

// The geometry attributes: "name = v is outside [lo, hi)" when v is not in
// [lo, 2^31 - 1]. Within that range no product below overflows int64 before
// it is checked.
std::string AttrProblem(const char* name, int64_t v, int64_t lo) {
  if (v >= lo && v <= kInt32Max) return "";
  return OutsideRange(name, v, lo, kInt32Max + 1);
}

ffi::Error CondensedConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer taps,
                         ffi::AnyBuffer values, ffi::Buffer<ffi::S32> neuron_ids,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                         int64_t kw, int64_t sh, int64_t sw, int64_t pad_top,
                         int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                         int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4) {
    return Invalid(kOp, "x must be rank 4 (batch, h, w, cin), got shape " + ShapeString(xd));
  }
  if (yd.size() != 4) {
    return Invalid(kOp, "y must be rank 4 (batch, oh, ow, cout), got shape " + ShapeString(yd));
  }
  const std::pair<const char*, int64_t> sizes[] = {{"kh", kh}, {"kw", kw}, {"sh", sh},
                                                   {"sw", sw}};
  for (const auto& [name, v] : sizes) {
    if (std::string why = AttrProblem(name, v, 1); !why.empty()) return Invalid(kOp, why);
  }
  const std::pair<const char*, int64_t> pads[] = {{"pad_top", pad_top},
                                                  {"pad_bottom", pad_bottom},
                                                  {"pad_left", pad_left},
                                                  {"pad_right", pad_right}};
  for (const auto& [name, v] : pads) {
    if (std::string why = AttrProblem(name, v, 0); !why.empty()) return Invalid(kOp, why);
  }
  auto job = std::make_shared<ConvJob>();
  ConvProblem& p = job->p;
  p.x = x.typed_data();
  p.batch = xd[0];
  p.h = xd[1];
  p.w = xd[2];
  p.cin = xd[3];
  if (p.cin < 1) {
    return Invalid(kOp, "x has shape " + ShapeString(xd) + ": no input channels");
  }
  p.kh = kh;
  p.kw = kw;
  p.sh = sh;
  p.sw = sw;
  p.pad_top = pad_top;
  p.pad_left = pad_left;
  const int64_t hp = p.h + pad_top + pad_bottom;
  const int64_t wp = p.w + pad_left + pad_right;
  // Formatted only for an error message.
  const auto geometry = [&] {
    return "a " + std::to_string(kh) + "x" + std::to_string(kw) + " kernel with strides (" +
      std::to_string(sh) + ", " + std::to_string(sw) + ") and padding ((" +
      std::to_string(pad_top) + ", " + std::to_string(pad_bottom) + "), (" +
      std::to_string(pad_left) + ", " + std::to_string(pad_right) + "))";
  };
  if (hp < kh || wp < kw) {
    return Invalid(kOp, geometry() + " does not fit x of shape " + ShapeString(xd) +
                            " (padded " + std::to_string(hp) + "x" + std::to_string(wp) + ")");
  }
  p.oh = (hp - kh) / sh + 1;
  p.ow = (wp - kw) / sw + 1;
  p.hq = (hp + sh - 1) / sh;
  p.wq = (wp + sw - 1) / sw;
  if (yd[0] != p.batch || yd[1] != p.oh || yd[2] != p.ow) {
    return Invalid(kOp, "y has shape " + ShapeString(yd) + " but " + geometry() +
                            " on x of shape " + ShapeString(xd) + " gives (" +
                            std::to_string(p.batch) + ", " + std::to_string(p.oh) + ", " +
                            std::to_string(p.ow) + ", cout)");
  }
  p.cout = yd[3];
  p.y = y->typed_data();
  if (ffi::Error error = ReadWeights(kOp, "taps", taps, values, neuron_ids, bias, p.cout, &p);
      error.failure()) {
    return error;
  }
  // Flat (dy, dx, c) taps index a table of kh * kw * cin run starts, and
  // every run start, and so every plane offset, must fit an int32.
  int64_t fan = 0, rows = 0, image = 0, grid = 0, tail = 0;
  const bool fits = MulFits(kh * kw, p.cin, &fan) && fan <= kInt32Max &&
                    MulFits(sh * sw, p.cin, &rows) && rows <= kInt32Max &&
                    MulFits(p.hq, p.wq, &image) && MulFits(p.batch, image, &grid) &&
                    grid <= kInt32Max && MulFits((kh - 1) / sh, p.wq, &tail) &&
                    tail <= kInt32Max;
  if (!fits) {
    return Invalid(kOp, geometry() + " on x of shape " + ShapeString(xd) +
                            " needs plane offsets beyond 32 bits; split the batch or the image");
  }
  job->kernels = KernelsFor<ConvKernels>(isa);
  if (job->kernels == nullptr) {
    return Invalid(kOp,
                   "the requested instruction set is not available in this build or on "
                   "this CPU");
  }
  // All taps at once (a vectorised pass over n_active * k entries, small
  // next to the n_active * k * grid multiply-adds of the call).
  if (!job->kernels->indices_below(p.idx, p.idx16, p.n_active * p.k, fan)) {
    return Invalid(kOp, DescribeBadIndex("taps", p.idx, p.idx16, p.n_active, p.k, fan) +
                            " (kh * kw * cin = " + std::to_string(kh) + " * " +
                            std::to_string(kw) + " * " + std::to_string(p.cin) + ")");
  }
  p.grid = grid;
  p.tail = tail + (kw - 1) / sw;
  // Nothing to compute.
  if (p.batch == 0 || p.cout == 0) return ffi::Error::Success();
  // Active rows per window of output channels (neuron_ids is strictly
  // increasing within [0, cout), checked).
  p.n_windows = (p.cout + kConvWindow - 1) / kConvWindow;
  job->window_start.assign(p.n_windows + 1, static_cast<int32_t>(p.n_active));
  for (int64_t j = p.n_active - 1; j >= 0; --j) {
    job->window_start[p.ids[j] / kConvWindow] = static_cast<int32_t>(j);
  }
  // Windows without an active channel start where the next window does.
  for (int64_t a = p.n_windows - 1; a >= 0; --a) {
    job->window_start[a] =
        std::min(job->window_start[a], job->window_start[a + 1]);
  }
  p.window_start = job->window_start.data();
  job->rows = rows;

  const int64_t threads = ThreadBudget(pool, max_threads);
  const int64_t used = Plan(*job, threads);
  int64_t plane_floats = 0;
  if (!MulFits(job->rows, job->ld, &plane_floats) || plane_floats > kInt32Max) {
    return Invalid(kOp, geometry() + " on x of shape " + ShapeString(xd) +
                            " needs plane offsets beyond 32 bits; split the batch or the image");
  }
  // Start of every tap's run, by flat (dy, dx, c) index; no divisions in the
  // inner loops.
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
  RunOnPool(pool, used, job);
  return ffi::Error::Success();
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
  try {
    return CondensedConv(pool, x, taps, values, neuron_ids, bias, y, kh, kw, sh, sw, pad_top,
                         pad_bottom, pad_left, pad_right, max_threads, isa);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(kOp) + ": out of memory for its work buffers");
  }
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
