// Vector helpers for the kernel sources, and the element types they read.
//
// Included by a kernel source built for one instruction set (SRIGL_ISA, see
// isa.h). The helpers pick AVX-512, AVX2 or plain scalar code from the
// compiler's predefined macros, so each kernel has a single copy of its loop
// logic. They live in that build's namespace: the same inline function built
// with different -m flags must not be merged by the linker.
#ifndef SRIGL_COMMON_SIMD_H_
#define SRIGL_COMMON_SIMD_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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

// Whether every idx[i], i < n, lies in [0, limit). Negative values read as
// unsigned are at least 2^15 (int16) or 2^31 (int32), above every limit an
// index of that width can address, so one unsigned maximum checks both
// ends. The vector builds keep a running maximum in one register and
// compare it once at the end (no horizontal reduction, masked or scalar
// tails), so a check of one neuron's few hundred indices costs about k / 32
// (AVX-512) or k / 16 (AVX2) instructions.
template <typename I>
inline bool AllBelow(const I* __restrict idx, int64_t n, int64_t limit) {
  static_assert(sizeof(I) == 2 || sizeof(I) == 4, "int16 or int32 indices");
  using U = std::make_unsigned_t<I>;
  constexpr int64_t kWidthLimit = int64_t{std::numeric_limits<I>::max()} + 1;
  if (n == 0) return true;
  if (limit <= 0) return false;
  const U top = static_cast<U>(std::min(limit, kWidthLimit) - 1);  // largest valid value
  int64_t i = 0;
#if defined(__AVX512BW__)
  constexpr int64_t kLanes = 64 / sizeof(I);
  __m512i m = _mm512_setzero_si512();
  const auto max = [](__m512i a, __m512i b) {
    if constexpr (sizeof(I) == 2) return _mm512_max_epu16(a, b);
    else return _mm512_max_epu32(a, b);
  };
  for (; i + kLanes <= n; i += kLanes) m = max(m, _mm512_loadu_si512(idx + i));
  if (i < n) {
    const uint64_t lanes = (uint64_t{1} << (n - i)) - 1;
    if constexpr (sizeof(I) == 2) {
      m = max(m, _mm512_maskz_loadu_epi16(static_cast<__mmask32>(lanes), idx + i));
    } else {
      m = max(m, _mm512_maskz_loadu_epi32(static_cast<__mmask16>(lanes), idx + i));
    }
  }
  if constexpr (sizeof(I) == 2) {
    return _mm512_cmpgt_epu16_mask(m, _mm512_set1_epi16(static_cast<int16_t>(top))) == 0;
  } else {
    return _mm512_cmpgt_epu32_mask(m, _mm512_set1_epi32(static_cast<int32_t>(top))) == 0;
  }
#elif defined(__AVX2__)
  constexpr int64_t kLanes = 32 / sizeof(I);
  __m256i m = _mm256_setzero_si256();
  __m256i vtop;
  if constexpr (sizeof(I) == 2) {
    vtop = _mm256_set1_epi16(static_cast<int16_t>(top));
  } else {
    vtop = _mm256_set1_epi32(static_cast<int32_t>(top));
  }
  for (; i + kLanes <= n; i += kLanes) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i));
    if constexpr (sizeof(I) == 2) {
      m = _mm256_max_epu16(m, v);
    } else {
      m = _mm256_max_epu32(m, v);
    }
  }
  // All lanes <= top iff max(m, top) == top.
  const __m256i capped = sizeof(I) == 2 ? _mm256_max_epu16(m, vtop) : _mm256_max_epu32(m, vtop);
  bool ok = _mm256_movemask_epi8(_mm256_cmpeq_epi8(capped, vtop)) == -1;
  for (; i < n; ++i) ok &= static_cast<U>(idx[i]) <= top;
  return ok;
#else
  // An OR of per-entry flags vectorises with SSE2, which has no unsigned
  // 16-bit maximum (2-3x faster than the maximum here).
  U bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= static_cast<U>(static_cast<U>(idx[j]) > top);
  return bad == 0;
#endif
}

// AllBelow for an index array of either width.
inline bool IndicesBelow(const void* idx, bool idx16, int64_t n, int64_t limit) {
  return idx16 ? AllBelow(static_cast<const int16_t*>(idx), n, limit)
               : AllBelow(static_cast<const int32_t*>(idx), n, limit);
}

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
