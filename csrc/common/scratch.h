// Per-thread scratch buffers of the FFI handlers.
#ifndef SRIGL_COMMON_SCRATCH_H_
#define SRIGL_COMMON_SCRATCH_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace srigl {

// At least `floats` floats from a grow-only buffer of the calling thread,
// reused across calls so that a call does not page-fault fresh memory. Each
// Tag type names a separate buffer.
// The kernels write every float of it they read within the same call, so
// nothing of an earlier call reaches an output; builds with
// SRIGL_POISON_SCRATCH (scripts/sanitize.sh) fill it with NaN on every
// request, so that a read before a write would show in the tests' outputs.
template <typename Tag>
float* ThreadScratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
#ifdef SRIGL_POISON_SCRATCH
  std::fill(buffer.begin(), buffer.begin() + floats, std::numeric_limits<float>::quiet_NaN());
#endif
  return buffer.data();
}

// The same, starting on a 64-byte boundary, for buffers whose rows are read
// whole: rows that start on cache lines touch fewer lines.
template <typename Tag>
float* AlignedThreadScratch(int64_t floats) {
  const auto addr =
      reinterpret_cast<std::uintptr_t>(ThreadScratch<Tag>(floats + 64));
  return reinterpret_cast<float*>((addr + 63) & ~std::uintptr_t{63});
}

}  // namespace srigl

#endif  // SRIGL_COMMON_SCRATCH_H_
