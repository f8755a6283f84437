// XLA FFI entry point of the native grouped condensed matmul (CPU).
//
// Work is cut into items (ranges of units, a unit being a group or a part of
// one, at small batches; batch tile x unit range otherwise) that the threads
// of the call claim in turn (common/work.h). Ablated groups' outputs get
// their bias.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/grouped_operands.h"
#include "common/isa_dispatch.h"
#include "common/scratch.h"
#include "common/work.h"
#include "dense/grouped_kernels.h"
#include "dense/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

// Transposed batch tiles, cache-line aligned (see dense/ffi.cc).
struct GroupedTileScratchTag;

// Below this many multiply-adds per item, handing the item to another thread
// costs more than it saves (measured, see Plan).
constexpr int64_t kMinItemWork = 256 * 1024;
// Batches up to this size run row by row on x in place; larger ones through
// transposed tiles (measured, see Plan).
constexpr int64_t kMaxRowBatch = 4;

constexpr const char* kOp = "srigl grouped condensed matmul";

struct GroupedJob {
  GroupedDenseProblem p;
  const GroupedDenseKernels* kernels;
  const DenseKernels* dense;  // its tile transposition
  std::vector<int32_t> ablated;  // ids of the groups that only carry their bias
  int64_t tile = 0;              // 0: row by row
  int64_t tiles = 1;
  int64_t chunks = 1;  // unit ranges per tile
  WorkQueue queue;

  int64_t units() const { return p.n_groups * p.parts; }

  void Units(int64_t chunk, int64_t* u0, int64_t* u1) const {
    *u0 = units() * chunk / chunks;
    *u1 = units() * (chunk + 1) / chunks;
  }

  void Bias(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) {
      float* yb = p.y + b * p.out;
      for (int32_t grp : ablated) {
        for (int64_t c = grp * p.g; c < (grp + 1) * p.g; ++c) yb[c] = p.bias[c];
      }
    }
  }

  void Work() {
    int64_t have_tile = -1;
    float* xt = nullptr;
    DenseProblem dp;
    dp.x = p.x;
    dp.batch = p.batch;
    dp.in = p.in;
    queue.Drain([&](int64_t i) {
      if (tile == 0) {
        int64_t u0, u1;
        Units(i, &u0, &u1);
        kernels->rows(p, u0, u1);
        return;
      }
      const int64_t t = i / chunks;
      const int64_t chunk = i % chunks;
      const int64_t b0 = t * tile;
      if (t != have_tile) {
        if (xt == nullptr) xt = AlignedThreadScratch<GroupedTileScratchTag>(p.in * tile);
        dense->transpose_tile(dp, b0, tile, xt);
        have_tile = t;
      }
      int64_t u0, u1;
      Units(chunk, &u0, &u1);
      kernels->tile_rows(p, xt, tile, b0, u0, u1);
      if (chunk == 0) Bias(b0, std::min(p.batch, b0 + tile));
    });
  }
};

// Item sizes. kMinItemWork: a 3072 -> 768 layer at 99% (fan-in 31 per group,
// G = 16) split over two threads at batch 1 measured no faster than one
// thread below about 32k multiply-adds per item on a loaded 2-core Xeon
// (interleaved rounds); kMaxRowBatch: row by row beat the 16-wide tile up to
// batch 4 at G = 8 and 16 (AVX-512), the tile won from batch 5 on.
void Plan(GroupedJob& job, int64_t threads) {
  GroupedDenseProblem& p = job.p;
  const int64_t work = std::max<int64_t>(1, p.n_groups * p.k * p.g);
  // Few wide groups: cut each into parts so that every thread gets some.
  p.parts = 1;
  if (p.n_groups > 0 && p.n_groups < 2 * threads) {
    const int64_t want = (2 * threads + p.n_groups - 1) / p.n_groups;
    p.parts = std::max<int64_t>(1, std::min<int64_t>(want, p.g / 16));
  }
  const int64_t units = std::max<int64_t>(1, job.units());
  if (p.batch <= kMaxRowBatch) {
    job.tile = 0;
    job.tiles = 1;
    const int64_t by_work = std::max<int64_t>(1, work * p.batch / kMinItemWork);
    // A few items per thread even out chunks that land on a busy core; a
    // multiple of the thread count keeps an idle core from waiting on a
    // straggler.
    int64_t chunks = std::min(by_work, threads * 4);
    if (chunks > 1) chunks = (chunks + threads - 1) / threads * threads;
    job.chunks = std::max<int64_t>(1, std::min(chunks, units));
  } else {
    job.tile = job.kernels->tile_for(p.g);
    job.tiles = (p.batch + job.tile - 1) / job.tile;
    const int64_t by_work = std::max<int64_t>(1, work * job.tile / kMinItemWork);
    // Split units only when there are too few tiles to feed every thread,
    // because each thread transposes every tile it touches.
    const int64_t want = (2 * threads + job.tiles - 1) / job.tiles;
    job.chunks = std::max<int64_t>(1, std::min({want, by_work, units}));
  }
  job.queue.items = job.tiles * job.chunks;
}

ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::AnyBuffer indices, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::S32> group_ids, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y, int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument(std::string(kOp) +
                                       ": x and y must be rank 2 with one row per batch entry");
  }
  auto job = std::make_shared<GroupedJob>();
  GroupedDenseProblem& p = job->p;
  if (ffi::Error error = ReadGroupedWeights(kOp, "indices", indices, values, group_ids,
                                            bias, xd[1], yd[1], &p);
      error.failure()) {
    return error;
  }
  p.x = x.typed_data();
  p.batch = xd[0];
  p.in = xd[1];
  p.out = yd[1];
  p.y = y->typed_data();
  if (p.batch == 0 || p.out == 0) return ffi::Error::Success();
  job->kernels = KernelsFor<GroupedDenseKernels>(isa);
  job->dense = KernelsFor<DenseKernels>(isa);
  if (job->kernels == nullptr || job->dense == nullptr) {
    return ffi::Error::InvalidArgument(std::string(kOp) +
                                       ": the requested instruction set is not available in "
                                       "this build or on this CPU");
  }
  const int64_t n_out_groups = p.out / p.g;
  if (p.n_groups < n_out_groups) {
    std::vector<char> active(n_out_groups, 0);
    for (int64_t j = 0; j < p.n_groups; ++j) active[p.ids[j]] = 1;
    for (int64_t grp = 0; grp < n_out_groups; ++grp) {
      if (!active[grp]) job->ablated.push_back(static_cast<int32_t>(grp));
    }
  }
  const int64_t threads = ThreadBudget(pool, max_threads);
  Plan(*job, threads);
  if (job->tile == 0) job->Bias(0, p.batch);
  RunOnPool(pool, threads, job);
  return ffi::Error::Success();
}

ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::AnyBuffer indices, ffi::AnyBuffer values,
                             ffi::Buffer<ffi::S32> group_ids,
                             ffi::Buffer<ffi::F32> bias,
                             ffi::ResultBuffer<ffi::F32> y, int64_t max_threads,
                             int64_t isa) {
  try {
    return GroupedMatmul(pool, x, indices, values, group_ids, bias, y, max_threads, isa);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(kOp) + ": out of memory for its work buffers");
  }
}

}  // namespace
}  // namespace srigl

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglGroupedMatmulF32, srigl::GroupedMatmulImpl,
                              srigl::BindGroupedOperands()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("isa"));

// Plain C symbol for ctypes: the kernel build `isa` selects, or "".
extern "C" const char* SriglGroupedKernelName(int64_t isa) {
  return srigl::KernelName(isa);
}

#pragma GCC visibility pop
