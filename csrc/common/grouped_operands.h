// The operands of the grouped Dense and conv FFI handlers, and their checks.
//
// Both take, after XLA's intra-op thread pool, the float32 input x, the
// group-shared fan-in indices (int16 or int32, (n_groups, k)), the weights
// (float32 or bfloat16, (n_groups, k, g)), the int32 group ids and the
// float32 bias, and return the float32 y; each adds its own attributes.
//
// Every array is untrusted: ReadGroupedWeights checks element types, ranks
// and shapes, that the group ids are sorted, distinct and name groups of the
// output, and that every index addresses the fan-in, before a kernel reads
// memory through them.
#ifndef SRIGL_COMMON_GROUPED_OPERANDS_H_
#define SRIGL_COMMON_GROUPED_OPERANDS_H_

#include <cstdint>
#include <string>

#include "common/weights.h"
#include "xla/ffi/api/ffi.h"

namespace srigl {

// The binding of those operands, in that order.
inline auto BindGroupedOperands() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::AnyBuffer>()          // indices (taps)
      .Arg<ffi::AnyBuffer>()          // values
      .Arg<ffi::Buffer<ffi::S32>>()   // group_ids
      .Arg<ffi::Buffer<ffi::F32>>()   // bias
      .Ret<ffi::Buffer<ffi::F32>>();  // y
}

namespace internal {

template <typename I>
int64_t FirstOutOfRange(const I* idx, int64_t n, int64_t fan_in) {
  // One pass without early exit vectorises; the position is found only on
  // failure.
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= idx[i] < 0 || static_cast<int64_t>(idx[i]) >= fan_in;
  }
  if (!bad) return -1;
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < 0 || static_cast<int64_t>(idx[i]) >= fan_in) return i;
  }
  return -1;
}

}  // namespace internal

// Fills w from the weight operands after checking them against a layer with
// `fan_in` inputs (taps) per group and `out` outputs (output channels).
// `op` names the call and `index_name` the indices operand in the messages.
inline xla::ffi::Error ReadGroupedWeights(
    const char* op, const char* index_name, xla::ffi::AnyBuffer indices,
    xla::ffi::AnyBuffer values, xla::ffi::Buffer<xla::ffi::S32> group_ids,
    xla::ffi::Buffer<xla::ffi::F32> bias, int64_t fan_in, int64_t out,
    GroupedWeights* w) {
  using xla::ffi::DataType;
  using xla::ffi::Error;
  const std::string name(op);
  const std::string idx_name(index_name);
  const DataType it = indices.element_type();
  if (it != DataType::S16 && it != DataType::S32) {
    return Error::InvalidArgument(name + ": " + idx_name +
                                  " must be int16 or int32");
  }
  const DataType vt = values.element_type();
  if (vt != DataType::F32 && vt != DataType::BF16) {
    return Error::InvalidArgument(name +
                                  ": values must be float32 or bfloat16");
  }
  const auto vd = values.dimensions();
  const auto id = indices.dimensions();
  if (vd.size() != 3) {
    return Error::InvalidArgument(name + ": values must be rank 3 (n_groups, k, g), got rank " +
                                  std::to_string(vd.size()));
  }
  if (id.size() != 2 || id[0] != vd[0] || id[1] != vd[1]) {
    return Error::InvalidArgument(name + ": " + idx_name +
                                  " must have shape (n_groups, k) of the values");
  }
  if (group_ids.dimensions().size() != 1 || group_ids.dimensions()[0] != vd[0]) {
    return Error::InvalidArgument(name + ": group_ids must have shape (n_groups,) of the values");
  }
  const int64_t g = vd[2];
  if (g < 1 || out % g != 0) {
    return Error::InvalidArgument(
        name + ": group size " + std::to_string(g) + " (values' last axis) must be >= 1 and divide the " +
        std::to_string(out) + " outputs");
  }
  if (bias.dimensions().size() != 1 || bias.dimensions()[0] != out) {
    return Error::InvalidArgument(name + ": bias must have shape (" + std::to_string(out) + ",)");
  }
  w->idx = indices.untyped_data();
  w->idx16 = it == DataType::S16;
  w->val = values.untyped_data();
  w->val_bf16 = vt == DataType::BF16;
  w->n_groups = vd[0];
  w->k = vd[1];
  w->g = g;
  w->ids = group_ids.typed_data();
  w->bias = bias.typed_data();
  const int64_t n_out_groups = out / g;
  for (int64_t j = 0; j < w->n_groups; ++j) {
    const int32_t id_j = w->ids[j];
    if (id_j < 0 || id_j >= n_out_groups || (j > 0 && w->ids[j - 1] >= id_j)) {
      return Error::InvalidArgument(
          name + ": group_ids must be sorted, distinct and below " +
          std::to_string(n_out_groups) + " (outputs / group size); entry " +
          std::to_string(j) + " is " + std::to_string(id_j));
    }
  }
  const int64_t n = w->n_groups * w->k;
  const int64_t bad =
      w->idx16 ? internal::FirstOutOfRange(static_cast<const int16_t*>(w->idx), n, fan_in)
               : internal::FirstOutOfRange(static_cast<const int32_t*>(w->idx), n, fan_in);
  if (bad >= 0) {
    const int64_t v = w->idx16 ? static_cast<const int16_t*>(w->idx)[bad]
                               : static_cast<const int32_t*>(w->idx)[bad];
    return Error::InvalidArgument(
        name + ": " + idx_name + "[" + std::to_string(bad / w->k) + ", " +
        std::to_string(bad % w->k) + "] = " + std::to_string(v) +
        " is outside the fan-in [0, " + std::to_string(fan_in) + ")");
  }
  return Error::Success();
}

}  // namespace srigl

#endif  // SRIGL_COMMON_GROUPED_OPERANDS_H_
