// The operands the Dense and conv FFI handlers share.
//
// Both take, after XLA's intra-op thread pool, the float32 input x, the
// fan-in indices (int16 or int32), the weights (float32 or bfloat16), the
// int32 neuron_ids and the float32 bias, and return the float32 y; each adds
// its own attributes.
#ifndef SRIGL_COMMON_FFI_OPERANDS_H_
#define SRIGL_COMMON_FFI_OPERANDS_H_

#include <string>

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

// Fills w from the weight operands after checking their element types;
// values must be rank 2 (n_active, k). `op` names the call and `index_name`
// the indices operand in the error messages.
inline xla::ffi::Error ReadWeights(const char* op, const char* index_name,
                                   xla::ffi::AnyBuffer indices,
                                   xla::ffi::AnyBuffer values,
                                   xla::ffi::Buffer<xla::ffi::S32> neuron_ids,
                                   xla::ffi::Buffer<xla::ffi::F32> bias,
                                   CondensedWeights* w) {
  using xla::ffi::DataType;
  const DataType it = indices.element_type();
  if (it != DataType::S16 && it != DataType::S32) {
    return xla::ffi::Error::InvalidArgument(std::string(op) + ": " + index_name +
                                            " must be int16 or int32");
  }
  const DataType vt = values.element_type();
  if (vt != DataType::F32 && vt != DataType::BF16) {
    return xla::ffi::Error::InvalidArgument(
        std::string(op) + ": values must be float32 or bfloat16");
  }
  w->idx = indices.untyped_data();
  w->idx16 = it == DataType::S16;
  w->val = values.untyped_data();
  w->val_bf16 = vt == DataType::BF16;
  w->n_active = values.dimensions()[0];
  w->k = values.dimensions()[1];
  w->ids = neuron_ids.typed_data();
  w->bias = bias.typed_data();
  return xla::ffi::Error::Success();
}

}  // namespace srigl

#endif  // SRIGL_COMMON_FFI_OPERANDS_H_
