// The generic build of the condensed-convolution kernels; CMake sets its -m flags.
#define SRIGL_ISA generic
#include "conv_kernels.inc"

namespace srigl {

const ConvKernels& ConvKernelsGeneric() {
  static const ConvKernels kernels = {"generic", generic::kBlock, &generic::BuildPlanes,
                                      &generic::Compute};
  return kernels;
}

}  // namespace srigl
