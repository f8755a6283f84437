// The weights of a condensed layer, as both kernels read them.
#ifndef SRIGL_COMMON_WEIGHTS_H_
#define SRIGL_COMMON_WEIGHTS_H_

#include <cstdint>

namespace srigl {

// Each of the n_active active neurons (output channels) has k fan-in entries:
// an index into the input (Dense) or a flat (dy, dx, c) tap (conv), and a
// weight. Weights are read in their stored type and accumulated in float32.
struct CondensedWeights {
  const void* idx;  // (n_active, k), int16 or int32
  bool idx16;
  const void* val;  // (n_active, k), float32 or bfloat16
  bool val_bf16;
  int64_t n_active;
  int64_t k;
  const int32_t* ids;  // (n_active,) output column of each active neuron
  const float* bias;   // (out,)
};

}  // namespace srigl

#endif  // SRIGL_COMMON_WEIGHTS_H_
