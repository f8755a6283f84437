// Inner kernels of the condensed matmul, compiled once per instruction set.
//
// y[b, ids[j]] = sum_k x[b, idx[j, k]] * val[j, k] + bias[ids[j]]
//
// The same source (condensed_kernels.inc) is built several times with
// different -m flags and a different SRIGL_ISA namespace, and the FFI handler
// picks one at run time, so one binary is portable and still uses AVX-512
// where the machine has it.
#ifndef SRIGL_CONDENSED_KERNELS_H_
#define SRIGL_CONDENSED_KERNELS_H_

#include <cstdint>

namespace srigl {

// A bfloat16 value: the upper half of a float32.
struct Bf16 {
  uint16_t bits;
};

struct Problem {
  const float* x;  // (batch, in), row major
  int64_t batch;
  int64_t in;
  const void* idx;  // (n_active, k), int16 or int32
  bool idx16;
  const void* val;  // (n_active, k), float32 or bfloat16
  bool val_bf16;    // bf16 values are widened to fp32 before the FMA
  int64_t n_active;
  int64_t k;
  const int32_t* ids;  // (n_active,) output column of each active neuron
  const float* bias;   // (out,)
  int64_t out;
  float* y;  // (batch, out), row major
};

// One instruction-set variant of the kernels.
struct Kernels {
  const char* name;
  // Batch-1 rows [j0, j1): one gathered dot product per neuron.
  void (*gemv_rows)(const Problem& p, int64_t j0, int64_t j1);
  // Copies x[b0 : b0 + tile, :] transposed into xt (in, tile), zero padding
  // the rows past the batch so the tile kernel needs no tail handling.
  void (*transpose_tile)(const Problem& p, int64_t b0, int64_t tile, float* xt);
  // Rows [j0, j1) for the batch tile starting at b0; tile is 16, 32 or 64.
  void (*tile_rows)(const Problem& p, const float* xt, int64_t tile, int64_t b0,
                    int64_t j0, int64_t j1);
  // Widest batch tile to use (16, 32 or 64). AVX2 stops at 32: with 16
  // registers a 64-wide tile leaves no room to take neurons in pairs, and
  // the paired 32-wide tile measured 1.25-1.5x faster at batch 256-2048.
  int64_t max_tile;
};

const Kernels& KernelsGeneric();
#if defined(SRIGL_HAVE_AVX2)
const Kernels& KernelsAvx2();
#endif
#if defined(SRIGL_HAVE_AVX512)
const Kernels& KernelsAvx512();
#endif

}  // namespace srigl

#endif  // SRIGL_CONDENSED_KERNELS_H_
