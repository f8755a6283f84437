// The avx2 build of the condensed-convolution kernels; CMake sets its -m flags.
#define SRIGL_ISA avx2
#include "conv_kernels.inc"

namespace srigl {

const ConvKernels& ConvKernelsAvx2() {
  static const ConvKernels kernels = {"avx2", avx2::kBlock, &avx2::BuildPlanes,
                                      &avx2::Compute};
  return kernels;
}

}  // namespace srigl
