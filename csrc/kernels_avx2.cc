// The avx2 build of the condensed kernels; CMake sets its -m flags.
#define SRIGL_ISA avx2
#include "condensed_kernels.inc"

namespace srigl {

const Kernels& KernelsAvx2() {
  static const Kernels kernels = {"avx2", &avx2::GemvRows,
                                  &avx2::TransposeTile, &avx2::TileRows, 32};
  return kernels;
}

}  // namespace srigl
