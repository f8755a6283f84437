// The avx512 build of the condensed kernels; CMake sets its -m flags.
#define SRIGL_ISA avx512
#include "condensed_kernels.inc"

namespace srigl {

const Kernels& KernelsAvx512() {
  static const Kernels kernels = {"avx512", &avx512::GemvRows,
                                  &avx512::TransposeTile, &avx512::TileRows, 64};
  return kernels;
}

}  // namespace srigl
