// Vectors of consecutive weights, and partial vector stores: the grouped
// kernels read g contiguous weights per fan-in entry.
//
// Included by a kernel source built for one instruction set after
// common/simd.h; like it, everything lives in that build's namespace.
#ifndef SRIGL_COMMON_SIMD_WEIGHTS_H_
#define SRIGL_COMMON_SIMD_WEIGHTS_H_

#include <cstdint>

#include "common/simd.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

// kW consecutive weights as float32.
inline V LoadW(const float* __restrict p) { return Load(p); }

#if defined(__AVX512F__)
inline __mmask16 Lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline V LoadW(const Bf16* __restrict p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// The first n < kW weights, zeros after them; reads nothing past them.
inline V LoadWFirst(const float* __restrict p, int64_t n) {
  return _mm512_maskz_loadu_ps(Lanes(n), p);
}
inline V LoadWFirst(const Bf16* __restrict p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(Lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// Stores lanes [0, n) of v.
inline void StoreFirst(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, Lanes(n), v); }
#elif defined(__AVX2__)
inline __m256i LaneMask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V LoadW(const Bf16* __restrict p) { return LoadVals8(p); }
inline V LoadWFirst(const float* __restrict p, int64_t n) {
  return _mm256_maskload_ps(p, LaneMask(n));
}
// AVX2 has no 16-bit masked load: widen through a small buffer.
inline V LoadWFirst(const Bf16* __restrict p, int64_t n) {
  alignas(32) float t[8] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = ToF32(p[i]);
  return _mm256_load_ps(t);
}
inline void StoreFirst(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, LaneMask(n), v); }
#else
inline V LoadW(const Bf16* __restrict p) { return ToF32(*p); }
// With one lane a partial vector is empty; the kernels never ask for one.
inline V LoadWFirst(const float* __restrict, int64_t) { return 0.f; }
inline V LoadWFirst(const Bf16* __restrict, int64_t) { return 0.f; }
inline void StoreFirst(float*, V, int64_t) {}
#endif

}  // namespace
}  // namespace SRIGL_ISA
}  // namespace srigl

#endif  // SRIGL_COMMON_SIMD_WEIGHTS_H_
