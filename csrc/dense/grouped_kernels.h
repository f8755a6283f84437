// Inner kernels of the grouped condensed matmul (group-shared fan-in),
// compiled once per instruction set (see common/isa.h).
//
// y[b, ids[j] * g + n] = sum_t x[b, idx[j, t]] * val[j, t, n] + bias[...]
//
// Each gathered input feeds the g neurons of its group: at small batches a
// broadcast x[b, idx[j, t]] times the g contiguous weights val[j, t, :] (no
// gather instruction), at larger batches one row of a transposed batch tile
// times g broadcast weights.
#ifndef SRIGL_DENSE_GROUPED_KERNELS_H_
#define SRIGL_DENSE_GROUPED_KERNELS_H_

#include <cstdint>

#include "common/isa.h"
#include "common/weights.h"

namespace srigl {

// Here ids are sorted, distinct and below out / g, and every index is in
// [0, in) (common/grouped_operands.h checked them).
struct GroupedDenseProblem : GroupedWeights {
  const float* x;  // (batch, in), row major
  int64_t batch;
  int64_t in;
  int64_t out;
  float* y;  // (batch, out), row major
  // Every active group is cut into `parts` ranges of its g neurons; unit u is
  // part u % parts of group row u / parts (more units than groups lets a
  // layer of a few wide groups use every thread).
  int64_t parts;
};

// One instruction-set build of the kernels.
struct GroupedDenseKernels {
  // Units [u0, u1) for every batch row, each row on its own (x read in
  // place): for small batches.
  void (*rows)(const GroupedDenseProblem& p, int64_t u0, int64_t u1);
  // Units [u0, u1) for the batch tile of `tile` columns starting at b0; xt is
  // that tile transposed, (in, tile), zero past the batch.
  void (*tile_rows)(const GroupedDenseProblem& p, const float* xt, int64_t tile,
                    int64_t b0, int64_t u0, int64_t u1);
  // The batch tile the tile kernel uses for group size g.
  int64_t (*tile_for)(int64_t g);
};

SRIGL_DECLARE_KERNEL_TABLES(GroupedDenseKernels);

}  // namespace srigl

#endif  // SRIGL_DENSE_GROUPED_KERNELS_H_
