// The run-time choice between the instruction-set builds of the kernels
// (isa.h), for the FFI handlers. The SRIGL_HAVE_* macros say which builds
// this library has.
#ifndef SRIGL_COMMON_ISA_DISPATCH_H_
#define SRIGL_COMMON_ISA_DISPATCH_H_

#include <cstdint>
#include <optional>

#include "common/isa.h"

namespace srigl {

constexpr const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    default:
      return "generic";
  }
}

// Whether this library has a build for `isa` and this CPU can run it.
inline bool IsaUsable(Isa isa) {
  switch (isa) {
    case Isa::generic:
      return true;
#if defined(SRIGL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#if defined(SRIGL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
#endif
    default:
      return false;
  }
}

// The set an `isa` attribute selects: 0 resolves to the best usable one; an
// explicit request for a set that was not built or that the CPU lacks gives
// nullopt.
inline std::optional<Isa> ResolveIsa(int64_t code) {
  static const Isa best = IsaUsable(Isa::avx512) ? Isa::avx512
                          : IsaUsable(Isa::avx2) ? Isa::avx2
                                                 : Isa::generic;
  const Isa isa = code == 0 ? best : static_cast<Isa>(code);
  if (!IsaUsable(isa)) return std::nullopt;
  return isa;
}

// The kernel table an `isa` attribute selects, or nullptr (see ResolveIsa).
template <typename K>
const K* KernelsFor(int64_t code) {
  switch (ResolveIsa(code).value_or(Isa::best)) {
    case Isa::generic:
      return &KernelTable<K, Isa::generic>();
#if defined(SRIGL_HAVE_AVX2)
    case Isa::avx2:
      return &KernelTable<K, Isa::avx2>();
#endif
#if defined(SRIGL_HAVE_AVX512)
    case Isa::avx512:
      return &KernelTable<K, Isa::avx512>();
#endif
    default:
      return nullptr;
  }
}

// The name of the build an `isa` attribute selects, or "" when unavailable.
inline const char* KernelName(int64_t code) {
  const std::optional<Isa> isa = ResolveIsa(code);
  return isa ? IsaName(*isa) : "";
}

}  // namespace srigl

#endif  // SRIGL_COMMON_ISA_DISPATCH_H_
