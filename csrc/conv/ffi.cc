// XLA FFI entry point of the native condensed convolution (CPU).
//
// A direct convolution in the plane layout (kernels.h): no im2col
// buffer, and the NHWC <-> plane transpositions happen inside the kernel, on
// cache-sized blocks, instead of as separate XLA ops over the whole tensor.
//
// The work is split over XLA's intra-op thread pool by conv/plane_job.h.
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
#include "conv/plane_job.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace srigl {
namespace {

// The plain kernel's job: windows of active rows (ConvProblem::window_start).
struct ConvJob : PlaneJob {
  std::vector<int32_t> window_start;

  void Compute(const float* planes, int64_t base, int64_t q0, int64_t q1,
               int64_t w0, int64_t w1, float* scratch) override {
    kernels->compute(p, planes, table.data(), base, q0, q1, w0, w1, scratch);
  }
};

constexpr const char* kOp = "srigl condensed conv";

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
  auto job = std::make_shared<ConvJob>();
  ConvProblem& p = job->p;
  const int64_t xdims[4] = {xd[0], xd[1], xd[2], xd[3]};
  const int64_t ydims[4] = {yd[0], yd[1], yd[2], yd[3]};
  if (std::string why = SetConvGeometry(p, x.typed_data(), xdims, ydims, y->typed_data(), kh,
                                        kw, sh, sw, pad_top, pad_bottom, pad_left, pad_right);
      !why.empty()) {
    return Invalid(kOp, why);
  }
  if (ffi::Error error = ReadWeights(kOp, "taps", taps, values, neuron_ids, bias, p.cout, &p);
      error.failure()) {
    return error;
  }
  job->kernels = KernelsFor<ConvKernels>(isa);
  if (job->kernels == nullptr) {
    return Invalid(kOp,
                   "the requested instruction set is not available in this build or on "
                   "this CPU");
  }
  // All taps at once (a vectorised pass over n_active * k entries, small
  // next to the n_active * k * grid multiply-adds of the call).
  const int64_t fan = kh * kw * p.cin;
  if (!job->kernels->indices_below(p.idx, p.idx16, p.n_active * p.k, fan)) {
    return Invalid(kOp, DescribeBadIndex("taps", p.idx, p.idx16, p.n_active, p.k, fan) +
                            " (kh * kw * cin = " + std::to_string(kh) + " * " +
                            std::to_string(kw) + " * " + std::to_string(p.cin) + ")");
  }
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
    job->window_start[a] = std::min(job->window_start[a], job->window_start[a + 1]);
  }
  p.window_start = job->window_start.data();
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
