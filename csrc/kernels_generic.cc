// The generic build of the condensed kernels; CMake sets its -m flags.
#define SRIGL_ISA generic
#include "condensed_kernels.inc"

namespace srigl {

const Kernels& KernelsGeneric() {
  static const Kernels kernels = {"generic", &generic::GemvRows,
                                  &generic::TransposeTile, &generic::TileRows, 64};
  return kernels;
}

}  // namespace srigl
