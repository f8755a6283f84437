// XLA FFI entry point of the native grouped condensed convolution (CPU).
//
// The plain conv's direct convolution in the plane layout (conv/ffi.cc), with
// the grouped compute: the work is split over XLA's intra-op thread pool by
// conv/plane_job.h, planes are built by the plain kernels' build_planes, and
// each tap's run feeds the g output channels of its group.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/grouped_operands.h"
#include "common/isa_dispatch.h"
#include "common/work.h"
#include "conv/grouped_kernels.h"
#include "conv/kernels.h"
#include "conv/plane_job.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

constexpr const char* kOp = "srigl grouped condensed conv";

struct GroupedConvJob : PlaneJob {
  GroupedConvProblem gp;
  const GroupedConvKernels* grouped;
  std::vector<int32_t> window_first, window_last;

  void Compute(const float* planes, int64_t base, int64_t q0, int64_t q1,
               int64_t w0, int64_t w1, float* scratch) override {
    grouped->compute(gp, planes, table.data(), base, q0, q1, w0, w1, scratch);
  }
};

ffi::Error GroupedConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::AnyBuffer taps, ffi::AnyBuffer values,
                           ffi::Buffer<ffi::S32> group_ids,
                           ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t pad_top,
                           int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right, int64_t max_threads, int64_t isa) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4) {
    return Invalid(kOp, "x must be rank 4 (batch, h, w, cin), got shape " + ShapeString(xd));
  }
  if (yd.size() != 4) {
    return Invalid(kOp, "y must be rank 4 (batch, oh, ow, cout), got shape " + ShapeString(yd));
  }
  auto job = std::make_shared<GroupedConvJob>();
  ConvProblem& p = job->p;
  const int64_t xdims[4] = {xd[0], xd[1], xd[2], xd[3]};
  const int64_t ydims[4] = {yd[0], yd[1], yd[2], yd[3]};
  if (std::string why = SetConvGeometry(p, x.typed_data(), xdims, ydims, y->typed_data(), kh,
                                        kw, sh, sw, pad_top, pad_bottom, pad_left, pad_right);
      !why.empty()) {
    return Invalid(kOp, why);
  }
  GroupedWeights& w = job->gp.w;
  if (ffi::Error error = ReadGroupedWeights(kOp, "taps", taps, values, group_ids, bias,
                                            kh * kw * p.cin, p.cout, &w);
      error.failure()) {
    return error;
  }
  if (p.batch == 0 || p.cout == 0) return ffi::Error::Success();
  job->kernels = KernelsFor<ConvKernels>(isa);
  job->grouped = KernelsFor<GroupedConvKernels>(isa);
  if (job->kernels == nullptr || job->grouped == nullptr) {
    return Invalid(kOp,
                   "the requested instruction set is not available in this build or on "
                   "this CPU");
  }
  // The plain fields the plan and the window store read: the work (active
  // channels x taps), the bias; the plain weights stay unset.
  p.idx = nullptr;
  p.val = nullptr;
  p.ids = nullptr;
  p.n_active = w.n_groups * w.g;
  p.k = w.k;
  p.bias = w.bias;
  // Group rows meeting each window of output channels (ids are sorted).
  p.n_windows = (p.cout + kConvWindow - 1) / kConvWindow;
  job->window_first.assign(p.n_windows, 0);
  job->window_last.assign(p.n_windows, 0);
  int64_t first = 0, last = 0;
  for (int64_t a = 0; a < p.n_windows; ++a) {
    const int64_t c0 = a * kConvWindow, c1 = c0 + kConvWindow;
    while (first < w.n_groups && (static_cast<int64_t>(w.ids[first]) + 1) * w.g <= c0) ++first;
    last = std::max(last, first);
    while (last < w.n_groups && static_cast<int64_t>(w.ids[last]) * w.g < c1) ++last;
    job->window_first[a] = static_cast<int32_t>(first);
    job->window_last[a] = static_cast<int32_t>(last);
  }
  job->gp.conv = &job->p;
  job->gp.window_first = job->window_first.data();
  job->gp.window_last = job->window_last.data();
  job->rows = sh * sw * p.cin;

  const int64_t threads = ThreadBudget(pool, max_threads);
  const int64_t used = Plan(*job, threads);
  if (!PlaneOffsetsFit(*job)) {
    return Invalid(kOp, GeometryString(kh, kw, sh, sw, pad_top, pad_bottom, pad_left,
                                       pad_right) +
                            " on x of shape " + ShapeString(xd) +
                            " needs plane offsets beyond 32 bits; split the batch or the image");
  }
  BuildTapTable(*job);
  if (job->shared) {
    job->planes = AlignedThreadScratch<SharedPlanesTag>(job->rows * job->ld);
  }
  RunOnPool(pool, used, job);
  return ffi::Error::Success();
}

ffi::Error GroupedConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::AnyBuffer taps, ffi::AnyBuffer values,
                           ffi::Buffer<ffi::S32> group_ids,
                           ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw,
                           int64_t sh, int64_t sw, int64_t pad_top,
                           int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right, int64_t max_threads, int64_t isa) {
  try {
    return GroupedConv(pool, x, taps, values, group_ids, bias, y, kh, kw, sh, sw, pad_top,
                       pad_bottom, pad_left, pad_right, max_threads, isa);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(kOp) + ": out of memory for its work buffers");
  }
}

}  // namespace
}  // namespace srigl

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglGroupedConvF32, srigl::GroupedConvImpl,
                              srigl::BindGroupedOperands()
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

// Plain C symbol for ctypes: the grouped conv build `isa` selects, or "".
extern "C" const char* SriglGroupedConvKernelName(int64_t isa) {
  return srigl::KernelName(isa);
}

#pragma GCC visibility pop
