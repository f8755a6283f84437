// Inner kernels of the condensed convolution, compiled once per instruction
// set (see common/isa.h).
//
// The convolution works in a plane layout: the zero-padded NHWC input is
// split by stride phase into rows of `ld` floats,
//
//   planes[((ph * sw + pw) * cin + c) * ld + q]
//       = x_padded[b, i * sh + ph, j * sw + pw, c],  q = b * hq * wq + i * wq + j
//
// and output channel j's grid is y[j, q] = sum_t val[j, t] * planes[src(t) + q]
// with src(t) = table[idx[j, t]] for the flat (dy, dx, c) tap idx[j, t]: every
// tap is one contiguous run over q.
// The kernels build those planes themselves from the NHWC input (no im2col
// and no XLA transpose), one block of grid columns at a time, and write the
// NHWC output directly.
#ifndef SRIGL_CONV_KERNELS_H_
#define SRIGL_CONV_KERNELS_H_

#include <cstdint>

#include "common/isa.h"
#include "common/weights.h"

namespace srigl {

// Here the ids of the weights are sorted and distinct, and idx holds flat
// (dy, dx, c) taps.
struct ConvProblem : CondensedWeights {
  const float* x;  // (batch, h, w, cin) NHWC, unpadded
  int64_t batch, h, w, cin;
  int64_t kh, kw, sh, sw;
  int64_t pad_top, pad_left;
  int64_t oh, ow;  // output size
  int64_t hq, wq;  // size of one stride-phase sub-image (the output grid)
  int64_t grid;    // batch * hq * wq
  int64_t tail;    // furthest tap offset: ((kh - 1) / sh) * wq + (kw - 1) / sw
  int64_t cout;
  // Output channels are written in windows of kConvWindow neighbouring
  // channels (one cache line of a pixel): rows [window_start[a],
  // window_start[a + 1]) are the active channels of window a, the others in
  // it are ablated and get only their bias.
  const int32_t* window_start;  // (n_windows + 1,)
  int64_t n_windows;
  float* y;  // (batch, oh, ow, cout) NHWC
};

// One instruction-set build of the kernels.
struct ConvKernels {
  // Grid columns computed per register block (vector width x accumulators);
  // the FFI handler sizes work items in multiples of it.
  int64_t block;
  // Writes the planes of grid columns [q0, q1) into dst (rows x ld), column
  // q at dst[row * ld + q - base]; columns past the grid get zeros, so
  // vector tails and runs that start near the end read zeros.
  void (*build_planes)(const ConvProblem& p, int64_t q0, int64_t q1,
                       int64_t base, float* dst, int64_t ld);
  // Output channel windows [w0, w1) at grid columns [q0, q1), reading planes
  // whose column 0 is grid column `base`; table maps a flat tap to its run's
  // start.
  void (*compute)(const ConvProblem& p, const float* planes,
                  const int32_t* table, int64_t base, int64_t q0, int64_t q1,
                  int64_t w0, int64_t w1, float* scratch);
  // Whether all n entries of an index array (int16 if idx16, else int32)
  // lie in [0, limit): the handler checks the taps with it, since compute
  // reads the table through them unchecked.
  bool (*indices_below)(const void* idx, bool idx16, int64_t n, int64_t limit);
};

constexpr int64_t kConvWindow = 16;

// Floats of `scratch` that compute needs.
constexpr int64_t kConvComputeScratch = (kConvWindow + 1) * 256;

SRIGL_DECLARE_KERNEL_TABLES(ConvKernels);

}  // namespace srigl

#endif  // SRIGL_CONV_KERNELS_H_
