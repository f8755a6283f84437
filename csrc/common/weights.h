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

// A grouped condensed layer (group-shared fan-in): each of the n_groups
// active groups has k fan-in entries shared by its g neurons (output
// channels), and g contiguous weights per entry. Group ids[j] feeds outputs
// ids[j] * g .. ids[j] * g + g - 1.
struct GroupedWeights {
  const void* idx;  // (n_groups, k), int16 or int32
  bool idx16;
  const void* val;  // (n_groups, k, g), float32 or bfloat16
  bool val_bf16;
  int64_t n_groups;
  int64_t k;
  int64_t g;
  const int32_t* ids;  // (n_groups,) sorted, distinct group ids
  const float* bias;   // (out,)
};

}  // namespace srigl

#endif  // SRIGL_COMMON_WEIGHTS_H_
