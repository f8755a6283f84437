// Inner kernels of the grouped condensed convolution (group-shared fan-in),
// compiled once per instruction set (see common/isa.h).
//
// In the plane layout of conv/kernels.h, output channel c = ids[j] * g + n of
// group row j has y[c, q] = sum_t val[j, t, n] * planes[src(idx[j, t]) + q]:
// the group's g channels share every tap's run, so one vector of a run is
// loaded once and feeds g channels' accumulators.
#ifndef SRIGL_CONV_GROUPED_KERNELS_H_
#define SRIGL_CONV_GROUPED_KERNELS_H_

#include <cstdint>

#include "common/isa.h"
#include "common/weights.h"
#include "conv/kernels.h"

namespace srigl {

// Here ids are sorted, distinct and below cout / g, and every tap is in
// [0, kh * kw * cin) (common/grouped_operands.h checked them).
struct GroupedConvProblem {
  const ConvProblem* conv;  // geometry, input and output (its weights unused)
  GroupedWeights w;
  // Group rows [window_first[a], window_last[a]) have channels in window a
  // (kConvWindow channels from a * kConvWindow); a group wider than a window,
  // or not aligned to one, meets several.
  const int32_t* window_first;
  const int32_t* window_last;
};

// One instruction-set build of the kernels.
struct GroupedConvKernels {
  // Output channel windows [w0, w1) at grid columns [q0, q1), reading planes
  // whose column 0 is grid column `base`; table maps a flat tap to its run's
  // start. scratch holds kConvComputeScratch floats.
  void (*compute)(const GroupedConvProblem& p, const float* planes,
                  const int32_t* table, int64_t base, int64_t q0, int64_t q1,
                  int64_t w0, int64_t w1, float* scratch);
};

SRIGL_DECLARE_KERNEL_TABLES(GroupedConvKernels);

}  // namespace srigl

#endif  // SRIGL_CONV_GROUPED_KERNELS_H_
