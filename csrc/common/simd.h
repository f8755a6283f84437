// Vector helpers for the kernel sources, and the element types they read.
//
// Included by a kernel source built for one instruction set (SRIGL_ISA, see
// isa.h). The helpers pick AVX-512, AVX2 or plain scalar code from the
// compiler's predefined macros, so each kernel has a single copy of its loop
// logic. They live in that build's namespace: the same inline function built
// with different -m flags must not be merged by the linker.
#ifndef SRIGL_COMMON_SIMD_H_
#define SRIGL_COMMON_SIMD_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef SRIGL_ISA
#error "SRIGL_ISA must name the instruction set of this build"
#endif

namespace srigl {

// A bfloat16 value: the upper half of a float32.
struct Bf16 {
  uint16_t bits;
};

namespace SRIGL_ISA {
namespace {

#if defined(__AVX512F__)
using V = __m512;
constexpr int kW = 16;
constexpr int kRegs = 32;
inline V Zero() { return _mm512_setzero_ps(); }
inline V Load(const float* p) { return _mm512_loadu_ps(p); }
inline V Splat(float v) { return _mm512_set1_ps(v); }
inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void StoreAligned(float* p, V v) { _mm512_store_ps(p, v); }
#elif defined(__AVX2__)
using V = __m256;
constexpr int kW = 8;
constexpr int kRegs = 16;
inline V Zero() { return _mm256_setzero_ps(); }
inline V Load(const float* p) { return _mm256_loadu_ps(p); }
inline V Splat(float v) { return _mm256_set1_ps(v); }
inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void StoreAligned(float* p, V v) { _mm256_store_ps(p, v); }
#else
using V = float;
constexpr int kW = 1;
// The register budget the kernels plan their accumulators for.
constexpr int kRegs = 16;
inline V Zero() { return 0.f; }
inline V Load(const float* p) { return *p; }
inline V Splat(float v) { return v; }
inline V Fma(V a, V b, V c) { return a * b + c; }
inline V Add(V a, V b) { return a + b; }
inline void Store(float* p, V v) { *p = v; }
inline void StoreAligned(float* p, V v) { *p = v; }
#endif

// Weights are float32 or bfloat16; either is widened to float32 on load and
// accumulated in float32.
inline float ToF32(float v) { return v; }
inline float ToF32(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__)
// Eight consecutive weights as float32.
inline __m256 LoadVals8(const float* __restrict v) { return _mm256_loadu_ps(v); }
inline __m256 LoadVals8(const Bf16* __restrict v) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<I>{}, TypeTag<W>{}) with the index type I (int16 or int32)
// and weight type W (float or Bf16) of a problem, so that the kernels are
// instantiated for each pair and branch once per call, not per element.
template <typename Fn>
inline void WithTypes(bool idx16, bool val_bf16, Fn&& fn) {
  if (val_bf16) {
    if (idx16) {
      fn(TypeTag<int16_t>{}, TypeTag<Bf16>{});
    } else {
      fn(TypeTag<int32_t>{}, TypeTag<Bf16>{});
    }
  } else if (idx16) {
    fn(TypeTag<int16_t>{}, TypeTag<float>{});
  } else {
    fn(TypeTag<int32_t>{}, TypeTag<float>{});
  }
}

}  // namespace
}  // namespace SRIGL_ISA
}  // namespace srigl

#endif  // SRIGL_COMMON_SIMD_H_
