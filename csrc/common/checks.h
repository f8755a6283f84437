// What the FFI handlers check before any kernel touches memory.
//
// Every operand and attribute of an FFI call is untrusted: the handlers read
// only what these checks have shown to be in range, and refuse everything
// else with an invalid-argument error that names the operand, the position,
// the value and the valid range. Only the error path is slow here; the range
// check of a whole index array is vectorised (AllBelow in simd.h) and runs
// in the kernel builds.
#ifndef SRIGL_COMMON_CHECKS_H_
#define SRIGL_COMMON_CHECKS_H_

#include <cstdint>
#include <limits>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace srigl {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// "(3, 7)" for the dimensions of a buffer.
template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

// The invalid-argument error of call `op`.
inline xla::ffi::Error Invalid(const char* op, const std::string& what) {
  return xla::ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// "name = value is outside [lo, hi)".
inline std::string OutsideRange(const std::string& name, int64_t value, int64_t lo,
                                int64_t hi) {
  return name + " = " + std::to_string(value) + " is outside [" + std::to_string(lo) + ", " +
         std::to_string(hi) + ")";
}

// The first entry (row-major) of a (rows, k) index array outside
// [0, limit), described as "name[r, c] = v is outside [0, limit)"; "" when
// there is none. A scan of one value at a time: for the message of a call
// that a vectorised check has already refused.
inline std::string DescribeBadIndex(const char* name, const void* idx, bool idx16, int64_t rows,
                                    int64_t k, int64_t limit) {
  for (int64_t i = 0; i < rows * k; ++i) {
    const int64_t v = idx16 ? static_cast<const int16_t*>(idx)[i]
                            : static_cast<const int32_t*>(idx)[i];
    if (v < 0 || v >= limit) {
      return OutsideRange(std::string(name) + "[" + std::to_string(i / k) + ", " +
                              std::to_string(i % k) + "]",
                          v, 0, limit);
    }
  }
  return "";
}

// Why neuron_ids is not strictly increasing (sorted and distinct) within
// [0, out); "" when it is. The kernels index the output and the bias with
// these ids, and the conv kernel groups rows by window on the order.
inline std::string NeuronIdsProblem(const int32_t* ids, int64_t n, int64_t out) {
  for (int64_t j = 0; j < n; ++j) {
    if (ids[j] < 0 || ids[j] >= out) {
      return OutsideRange("neuron_ids[" + std::to_string(j) + "]", ids[j], 0, out);
    }
    if (j > 0 && ids[j] <= ids[j - 1]) {
      return "neuron_ids must be strictly increasing (sorted, distinct): neuron_ids[" +
             std::to_string(j) + "] = " + std::to_string(ids[j]) + " follows neuron_ids[" +
             std::to_string(j - 1) + "] = " + std::to_string(ids[j - 1]);
    }
  }
  return "";
}

// a * b into *out; false when it overflows int64.
inline bool MulFits(int64_t a, int64_t b, int64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

}  // namespace srigl

#endif  // SRIGL_COMMON_CHECKS_H_
