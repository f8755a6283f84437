// The instruction sets the kernels are built for.
//
// Every kernel source is compiled once per instruction set, with that set's
// -m flags and SRIGL_ISA naming it (see CMakeLists.txt), so one binary is
// portable and still uses AVX-512 where the machine has it. Each build defines
// its kernel table as a specialisation of KernelTable; the FFI handlers pick
// one at run time (isa_dispatch.h).
#ifndef SRIGL_COMMON_ISA_H_
#define SRIGL_COMMON_ISA_H_

#include <cstdint>

namespace srigl {

// The values are the `isa` attribute of the FFI calls (0 asks for the best
// set this machine runs). The enumerators are spelled like the namespaces of
// the builds so that a build can name its own set as Isa::SRIGL_ISA.
enum class Isa : int64_t { best = 0, generic = 1, avx2 = 2, avx512 = 3 };

// The kernel table K of the build for kIsa. The kernel source defines the
// specialisation of the set it is compiled for; its header declares all of
// them with SRIGL_DECLARE_KERNEL_TABLES(K).
template <typename K, Isa kIsa>
const K& KernelTable();

#define SRIGL_DECLARE_KERNEL_TABLES(K)          \
  template <>                                   \
  const K& KernelTable<K, Isa::generic>();      \
  template <>                                   \
  const K& KernelTable<K, Isa::avx2>();         \
  template <>                                   \
  const K& KernelTable<K, Isa::avx512>()

}  // namespace srigl

#endif  // SRIGL_COMMON_ISA_H_
