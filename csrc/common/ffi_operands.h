// The operands the Dense and conv FFI handlers share.
//
// Both take, after XLA's intra-op thread pool, the float32 input x, the
// fan-in indices (int16 or int32), the weights (float32 or bfloat16), the
// int32 neuron_ids and the float32 bias, and return the float32 y; each adds
// its own attributes.
#ifndef SRIGL_COMMON_FFI_OPERANDS_H_
#define SRIGL_COMMON_FFI_OPERANDS_H_

#include <string>

#include "common/checks.h"
#include "common/weights.h"
#include "xla/ffi/api/ffi.h"

namespace srigl {

// The binding of those operands, in that order.
inline auto BindCondensedOperands() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::AnyBuffer>()          // indices
      .Arg<ffi::AnyBuffer>()          // values
      .Arg<ffi::Buffer<ffi::S32>>()   // neuron_ids
      .Arg<ffi::Buffer<ffi::F32>>()   // bias
      .Ret<ffi::Buffer<ffi::F32>>();  // y
}

// Fills w from the weight operands after checking them: element types,
// values (n_active, k) with indices of the same shape, neuron_ids
// (n_active,) strictly increasing within [0, out), bias (out,). The index
// values are the caller's to check (their valid range depends on the kernel).
// `op` names the call and `index_name` the indices operand in the messages.
inline xla::ffi::Error ReadWeights(const char* op, const char* index_name,
                                   xla::ffi::AnyBuffer indices,
                                   xla::ffi::AnyBuffer values,
                                   xla::ffi::Buffer<xla::ffi::S32> neuron_ids,
                                   xla::ffi::Buffer<xla::ffi::F32> bias, int64_t out,
                                   CondensedWeights* w) {
  using xla::ffi::DataType;
  const std::string idx = index_name;
  const DataType it = indices.element_type();
  if (it != DataType::S16 && it != DataType::S32) {
    return Invalid(op, idx + " must be int16 or int32");
  }
  const DataType vt = values.element_type();
  if (vt != DataType::F32 && vt != DataType::BF16) {
    return Invalid(op, "values must be float32 or bfloat16");
  }
  const auto vd = values.dimensions();
  const auto id = indices.dimensions();
  if (vd.size() != 2) {
    return Invalid(op, "values must be rank 2 (n_active, k), got shape " + ShapeString(vd));
  }
  if (id.size() != 2 || id[0] != vd[0] || id[1] != vd[1]) {
    return Invalid(op, idx + " has shape " + ShapeString(id) + " but values has shape " +
                           ShapeString(vd) + "; they must be equal");
  }
  const auto nd = neuron_ids.dimensions();
  if (nd.size() != 1 || nd[0] != vd[0]) {
    return Invalid(op, "neuron_ids has shape " + ShapeString(nd) + " but values has " +
                           std::to_string(vd[0]) + " rows; it needs one id per row");
  }
  const auto bd = bias.dimensions();
  if (bd.size() != 1 || bd[0] != out) {
    return Invalid(op, "bias has shape " + ShapeString(bd) + " but y's last dim is " +
                           std::to_string(out) + "; it needs one entry per output");
  }
  if (std::string why = NeuronIdsProblem(neuron_ids.typed_data(), vd[0], out);
      !why.empty()) {
    return Invalid(op, why);
  }
  w->idx = indices.untyped_data();
  w->idx16 = it == DataType::S16;
  w->val = values.untyped_data();
  w->val_bf16 = vt == DataType::BF16;
  w->n_active = vd[0];
  w->k = vd[1];
  w->ids = neuron_ids.typed_data();
  w->bias = bias.typed_data();
  return xla::ffi::Error::Success();
}

}  // namespace srigl

#endif  // SRIGL_COMMON_FFI_OPERANDS_H_
