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
#include <vector>

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
  BuildTapTable(*job);
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
