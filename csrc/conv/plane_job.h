// Splitting a convolution in the plane layout (conv/kernels.h) over XLA's
// intra-op thread pool, for the plain and the grouped conv handlers.
//
// Two ways to split the work:
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
#ifndef SRIGL_CONV_PLANE_JOB_H_
#define SRIGL_CONV_PLANE_JOB_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/scratch.h"
#include "common/work.h"
#include "conv/kernels.h"

namespace srigl {

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

inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Row length of a plane buffer: 64-byte rows, but not a multiple of 4 KiB,
// which would map the same column of every row to one cache set.
inline int64_t RowLength(int64_t columns) {
  int64_t ld = RoundUp(columns, 16);
  if (ld % 1024 == 0) ld += 16;
  return ld;
}

// One convolution call in the plane layout: the split of its work over the
// pool's threads, the plane buffers, and the work loop. A kernel derives
// from it and computes output-channel windows in Compute.
struct PlaneJob {
  ConvProblem p;  // the geometry; n_active, k and n_windows size the work
  const ConvKernels* kernels;  // builds the planes
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

  virtual ~PlaneJob() = default;

  // Output channel windows [w0, w1) at grid columns [q0, q1), from planes
  // whose column 0 is grid column `base`.
  virtual void Compute(const float* planes, int64_t base, int64_t q0,
                       int64_t q1, int64_t w0, int64_t w1, float* scratch) = 0;

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
      Compute(src, base, q0, q1, w0, w1, scratch);
    });
  }
};

// Items per thread when there is enough work: a few even out items that land
// on a busy core.
constexpr int64_t kItemsPerThread = 4;

// Returns the threads the call uses.
inline int64_t Plan(PlaneJob& job, int64_t threads) {
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

// "a 3x3 kernel with strides (1, 1) and padding ((1, 1), (1, 1))", for
// error messages.
inline std::string GeometryString(int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                  int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                                  int64_t pad_right) {
  return "a " + std::to_string(kh) + "x" + std::to_string(kw) + " kernel with strides (" +
         std::to_string(sh) + ", " + std::to_string(sw) + ") and padding ((" +
         std::to_string(pad_top) + ", " + std::to_string(pad_bottom) + "), (" +
         std::to_string(pad_left) + ", " + std::to_string(pad_right) + "))";
}

// The geometry attributes: "name = v is outside [lo, hi)" when v is not in
// [lo, 2^31 - 1]. Within that range no product below overflows int64 before
// it is checked.
inline std::string AttrProblem(const char* name, int64_t v, int64_t lo) {
  if (v >= lo && v <= kInt32Max) return "";
  return OutsideRange(name, v, lo, kInt32Max + 1);
}

// Sets the geometry of a call on NHWC x of dims xd onto y of dims yd (both
// rank 4, checked by the caller) with kernel (kh, kw), strides (sh, sw) and
// the pads, and returns "" when they describe a valid convolution whose
// tap table (kh * kw * cin entries), plane rows and grid fit int32; else
// why not. Sets every field of p but the weights and the windows.
inline std::string SetConvGeometry(ConvProblem& p, const float* x, const int64_t* xd,
                                   const int64_t* yd, float* y, int64_t kh, int64_t kw,
                                   int64_t sh, int64_t sw, int64_t pad_top,
                                   int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const std::pair<const char*, int64_t> sizes[] = {{"kh", kh}, {"kw", kw}, {"sh", sh},
                                                   {"sw", sw}};
  for (const auto& [name, v] : sizes) {
    if (std::string why = AttrProblem(name, v, 1); !why.empty()) return why;
  }
  const std::pair<const char*, int64_t> pads[] = {{"pad_top", pad_top},
                                                  {"pad_bottom", pad_bottom},
                                                  {"pad_left", pad_left},
                                                  {"pad_right", pad_right}};
  for (const auto& [name, v] : pads) {
    if (std::string why = AttrProblem(name, v, 0); !why.empty()) return why;
  }
  const std::vector<int64_t> xs(xd, xd + 4), ys(yd, yd + 4);
  p.x = x;
  p.batch = xd[0];
  p.h = xd[1];
  p.w = xd[2];
  p.cin = xd[3];
  if (p.cin < 1) return "x has shape " + ShapeString(xs) + ": no input channels";
  p.kh = kh;
  p.kw = kw;
  p.sh = sh;
  p.sw = sw;
  p.pad_top = pad_top;
  p.pad_left = pad_left;
  const std::string geometry =
      GeometryString(kh, kw, sh, sw, pad_top, pad_bottom, pad_left, pad_right);
  const int64_t hp = p.h + pad_top + pad_bottom;
  const int64_t wp = p.w + pad_left + pad_right;
  if (hp < kh || wp < kw) {
    return geometry + " does not fit x of shape " + ShapeString(xs) + " (padded " +
           std::to_string(hp) + "x" + std::to_string(wp) + ")";
  }
  p.oh = (hp - kh) / sh + 1;
  p.ow = (wp - kw) / sw + 1;
  p.hq = (hp + sh - 1) / sh;
  p.wq = (wp + sw - 1) / sw;
  if (yd[0] != p.batch || yd[1] != p.oh || yd[2] != p.ow) {
    return "y has shape " + ShapeString(ys) + " but " + geometry + " on x of shape " +
           ShapeString(xs) + " gives (" + std::to_string(p.batch) + ", " +
           std::to_string(p.oh) + ", " + std::to_string(p.ow) + ", cout)";
  }
  p.cout = yd[3];
  p.y = y;
  // Flat (dy, dx, c) taps index a table of kh * kw * cin run starts, and
  // every run start, and so every plane offset, must fit an int32.
  int64_t fan = 0, rows = 0, image = 0, grid = 0, tail = 0;
  const bool fits = MulFits(kh * kw, p.cin, &fan) && fan <= kInt32Max &&
                    MulFits(sh * sw, p.cin, &rows) && rows <= kInt32Max &&
                    MulFits(p.hq, p.wq, &image) && MulFits(p.batch, image, &grid) &&
                    grid <= kInt32Max && MulFits((kh - 1) / sh, p.wq, &tail) &&
                    tail <= kInt32Max;
  if (!fits) {
    return geometry + " on x of shape " + ShapeString(xs) +
           " needs plane offsets beyond 32 bits; split the batch or the image";
  }
  p.grid = grid;
  p.tail = tail + (kw - 1) / sw;
  return "";
}

// Whether the planes of job's plan (rows x ld floats) have int32 offsets.
inline bool PlaneOffsetsFit(const PlaneJob& job) {
  int64_t plane_floats = 0;
  return MulFits(job.rows, job.ld, &plane_floats) && plane_floats <= kInt32Max;
}

// Fills job.table: the start of every flat (dy, dx, c) tap's run in planes
// of row length job.ld; no divisions in the inner loops.
inline void BuildTapTable(PlaneJob& job) {
  const ConvProblem& p = job.p;
  job.table.resize(p.kh * p.kw * p.cin);
  for (int64_t dy = 0; dy < p.kh; ++dy) {
    for (int64_t dx = 0; dx < p.kw; ++dx) {
      const int64_t row0 = ((dy % p.sh) * p.sw + dx % p.sw) * p.cin;
      const int64_t off = (dy / p.sh) * p.wq + dx / p.sw;
      int32_t* t = job.table.data() + (dy * p.kw + dx) * p.cin;
      for (int64_t c = 0; c < p.cin; ++c) {
        t[c] = static_cast<int32_t>((row0 + c) * job.ld + off);
      }
    }
  }
}

}  // namespace srigl

#endif  // SRIGL_CONV_PLANE_JOB_H_
