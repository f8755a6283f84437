// The avx512 build of the condensed-convolution kernels; CMake sets its -m flags.
#define SRIGL_ISA avx512
#include "conv_kernels.inc"

namespace srigl {

const ConvKernels& ConvKernelsAvx512() {
  static const ConvKernels kernels = {"avx512", avx512::kBlock, &avx512::BuildPlanes,
                                      &avx512::Compute};
  return kernels;
}

}  // namespace srigl
