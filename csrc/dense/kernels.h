// Inner kernels of the condensed matmul, compiled once per instruction set
// (see common/isa.h).
//
// y[b, ids[j]] = sum_k x[b, idx[j, k]] * val[j, k] + bias[ids[j]]
#ifndef SRIGL_DENSE_KERNELS_H_
#define SRIGL_DENSE_KERNELS_H_

#include <cstdint>

#include "common/isa.h"
#include "common/weights.h"

namespace srigl {

struct DenseProblem : CondensedWeights {
  const float* x;  // (batch, in), row major
  int64_t batch;
  int64_t in;
  int64_t out;
  float* y;  // (batch, out), row major
};

// One instruction-set build of the kernels.
struct DenseKernels {
  // Batch-1 rows [j0, j1): one gathered dot product per neuron.
  void (*gemv_rows)(const DenseProblem& p, int64_t j0, int64_t j1);
  // Copies x[b0 : b0 + tile, :] transposed into xt (in, tile), zero padding
  // the rows past the batch so the tile kernel needs no tail handling.
  void (*transpose_tile)(const DenseProblem& p, int64_t b0, int64_t tile,
                         float* xt);
  // Rows [j0, j1) for the batch tile starting at b0; tile is 16, 32 or 64.
  void (*tile_rows)(const DenseProblem& p, const float* xt, int64_t tile,
                    int64_t b0, int64_t j0, int64_t j1);
  // Widest batch tile to use (16, 32 or 64).
  int64_t max_tile;
  // Whether all n entries of an index array (int16 if idx16, else int32)
  // lie in [0, limit). The kernels above trust their indices; the handler
  // runs this on the rows of a work item before the item reads through them.
  bool (*indices_below)(const void* idx, bool idx16, int64_t n, int64_t limit);
};

SRIGL_DECLARE_KERNEL_TABLES(DenseKernels);

}  // namespace srigl

#endif  // SRIGL_DENSE_KERNELS_H_
