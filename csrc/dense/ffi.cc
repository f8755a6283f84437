// XLA FFI entry point of the native condensed matmul (CPU).
//
// Work is cut into items (neuron chunks at batch 1; batch tile x neuron chunk
// otherwise) that the threads of the call claim in turn (common/work.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/ffi_operands.h"
#include "common/isa_dispatch.h"
#include "common/scratch.h"
#include "common/work.h"
#include "dense/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

// Transposed batch tiles, cache-line aligned. Every fan-in entry reads one
// tile row (64 floats = 4 cache lines at tile 64) from L2; with malloc's
// 16-byte alignment for large blocks each row straddled 5 lines, 25% more of
// the L2 -> L1 traffic that bounds this kernel (1.2-1.4x slower at batch 256,
// measured).
struct TileScratchTag;

// Below this many multiply-adds per item, waking a helper costs more than it
// saves.
constexpr int64_t kMinItemWork = 16 * 1024;

struct Job {
  DenseProblem p;
  const DenseKernels* kernels;
  std::vector<int32_t> ablated;  // output columns that only carry their bias
  int64_t tile = 0;              // 0 means the batch-1 path
  int64_t tiles = 1;
  int64_t chunks = 1;  // neuron chunks per tile
  // Set by an item whose rows hold an index outside [0, in); such an item
  // reads nothing through them, and the call fails.
  std::atomic<bool> bad_index{false};
  WorkQueue queue;

  void Rows(int64_t chunk, int64_t* j0, int64_t* j1) const {
    *j0 = p.n_active * chunk / chunks;
    *j1 = p.n_active * (chunk + 1) / chunks;
  }

  // Whether the indices of rows [j0, j1) lie in [0, in). Checked per item,
  // right before the item reads through them: the check is spread over the
  // threads like the work, and leaves the rows in cache for the kernel. It
  // is one more pass over the index bytes: at batch 1, 4-6 us (3-4%) of a
  // call on 3072 -> 768 at 90% and 2-4 us (3-6%) on 196 neurons x 420
  // fan-in; not measurable at batch 256, where each tile reuses the rows.
  // One check of the whole array in the handler cost about the same, one per
  // neuron inside the gather loop more (7-10%) (scripts/check_cost.py,
  // interleaved runs on a 2-core AVX-512 Xeon).
  bool RowsInRange(int64_t j0, int64_t j1) const {
    const int64_t width = p.idx16 ? 2 : 4;
    const char* first = static_cast<const char*>(p.idx) + j0 * p.k * width;
    return kernels->indices_below(first, p.idx16, (j1 - j0) * p.k, p.in);
  }

  void Work() {
    int64_t have_tile = -1;
    float* xt = nullptr;
    queue.Drain([&](int64_t i) {
      if (tile == 0) {
        int64_t j0, j1;
        Rows(i, &j0, &j1);
        if (!RowsInRange(j0, j1)) {
          bad_index.store(true, std::memory_order_relaxed);
          return;
        }
        kernels->gemv_rows(p, j0, j1);
      } else {
        const int64_t t = i / chunks;
        const int64_t chunk = i % chunks;
        const int64_t b0 = t * tile;
        int64_t j0, j1;
        Rows(chunk, &j0, &j1);
        if (!RowsInRange(j0, j1)) {
          bad_index.store(true, std::memory_order_relaxed);
          return;
        }
        if (t != have_tile) {
          if (xt == nullptr) {
            xt = AlignedThreadScratch<TileScratchTag>(p.in * tile);
          }
          // Writes all in x tile floats that tile_rows reads (zeros past the
          // batch), so nothing of an earlier call's tile is read.
          kernels->transpose_tile(p, b0, tile, xt);
          have_tile = t;
        }
        kernels->tile_rows(p, xt, tile, b0, j0, j1);
        if (chunk == 0 && !ablated.empty()) {
          const int64_t b1 = std::min(p.batch, b0 + tile);
          for (int64_t b = b0; b < b1; ++b) {
            float* yb = p.y + b * p.out;
            for (int32_t c : ablated) yb[c] = p.bias[c];
          }
        }
      }
    });
  }
};

void Plan(Job& job, int64_t threads) {
  const DenseProblem& p = job.p;
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
  job.queue.items = job.tiles * job.chunks;
}

constexpr const char* kOp = "srigl condensed matmul";

ffi::Error CondensedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::AnyBuffer indices, ffi::AnyBuffer values,
                           ffi::Buffer<ffi::S32> neuron_ids, ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y, int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2) {
    return Invalid(kOp, "x must be rank 2 (batch, in), got shape " + ShapeString(xd));
  }
  if (yd.size() != 2 || yd[0] != xd[0]) {
    return Invalid(kOp, "y has shape " + ShapeString(yd) + " but x has shape " +
                            ShapeString(xd) + "; y must be (" + std::to_string(xd[0]) +
                            ", out)");
  }
  auto job = std::make_shared<Job>();
  DenseProblem& p = job->p;
  if (ffi::Error error =
          ReadWeights(kOp, "indices", indices, values, neuron_ids, bias, yd[1], &p);
      error.failure()) {
    return error;
  }
  p.x = x.typed_data();
  p.batch = xd[0];
  p.in = xd[1];
  p.out = yd[1];
  p.y = y->typed_data();
  // Nothing to compute; no kernel runs, so the index values are not read.
  if (p.batch == 0 || p.out == 0) return ffi::Error::Success();
  job->kernels = KernelsFor<DenseKernels>(isa);
  if (job->kernels == nullptr) {
    return Invalid(kOp,
                   "the requested instruction set is not available in this build or on "
                   "this CPU");
  }

  // The columns neuron_ids (strictly increasing, checked) leaves out.
  for (int64_t c = 0, j = 0; c < p.out; ++c) {
    if (j < p.n_active && p.ids[j] == c) {
      ++j;
    } else {
      job->ablated.push_back(static_cast<int32_t>(c));
    }
  }
  if (p.batch == 1) {
    for (int32_t c : job->ablated) p.y[c] = p.bias[c];
  }

  const int64_t threads = ThreadBudget(pool, max_threads);
  Plan(*job, threads);
  RunOnPool(pool, threads, job);
  if (job->bad_index.load()) {
    return Invalid(kOp, DescribeBadIndex("indices", p.idx, p.idx16, p.n_active, p.k, p.in));
  }
  return ffi::Error::Success();
}

ffi::Error CondensedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer indices, ffi::AnyBuffer values,
                               ffi::Buffer<ffi::S32> neuron_ids,
                               ffi::Buffer<ffi::F32> bias,
                               ffi::ResultBuffer<ffi::F32> y,
                               int64_t max_threads, int64_t isa) {
  try {
    return CondensedMatmul(pool, x, indices, values, neuron_ids, bias, y, max_threads, isa);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(kOp) + ": out of memory for its work buffers");
  }
}

}  // namespace
}  // namespace srigl

// The library is built with hidden visibility; the handler and kernel-name
// symbols of the Dense and conv entry points are the interface that Python
// looks up.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglCondensedMatmulF32,
                              srigl::CondensedMatmulImpl,
                              srigl::BindCondensedOperands()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("isa"));

// Plain C symbol for ctypes: the name of the kernel build `isa` selects, or
// "" when that build is unavailable.
extern "C" const char* SriglCondensedKernelName(int64_t isa) {
  return srigl::KernelName(isa);
}

#pragma GCC visibility pop
