// Writing condensed conv results to the NHWC output, shared by the conv
// kernel sources (plain and grouped): register transposes of kW x kW tiles
// and the store of one window of kConvWindow output channels.
//
// Included by a kernel source built for one instruction set after
// common/simd.h; like it, everything lives in that build's namespace.
#ifndef SRIGL_CONV_WINDOW_H_
#define SRIGL_CONV_WINDOW_H_

#include <algorithm>
#include <cstdint>

#include "common/simd.h"
#include "common/simd_weights.h"
#include "conv/kernels.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

#if defined(__AVX512F__)
// out[c][l] = t[l][c] for a 16x16 tile.
inline void Transpose(const __m512* t, __m512* out) {
  __m512 u[16];
  // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane L of
  // u[4 * g + m] holds column 4 * L + m of rows 4 * g .. 4 * g + 3.
  for (int g = 0; g < 4; ++g) {
    const __m512 a = _mm512_unpacklo_ps(t[4 * g], t[4 * g + 1]);
    const __m512 b = _mm512_unpackhi_ps(t[4 * g], t[4 * g + 1]);
    const __m512 c = _mm512_unpacklo_ps(t[4 * g + 2], t[4 * g + 3]);
    const __m512 d = _mm512_unpackhi_ps(t[4 * g + 2], t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
  }
  // Gather lane L of the four row groups into column 4 * L + m.
  for (int m = 0; m < 4; ++m) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
    const __m512 x1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    out[m] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    out[4 + m] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    out[8 + m] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    out[12 + m] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}
#elif defined(__AVX2__)
// out[c][l] = t[l][c] for an 8x8 tile.
inline void Transpose(const __m256* t, __m256* out) {
  __m256 u[8];
  for (int g = 0; g < 2; ++g) {
    const __m256 a = _mm256_unpacklo_ps(t[4 * g], t[4 * g + 1]);
    const __m256 b = _mm256_unpackhi_ps(t[4 * g], t[4 * g + 1]);
    const __m256 c = _mm256_unpacklo_ps(t[4 * g + 2], t[4 * g + 3]);
    const __m256 d = _mm256_unpackhi_ps(t[4 * g + 2], t[4 * g + 3]);
    u[4 * g + 0] = _mm256_shuffle_ps(a, c, 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(a, c, 0xEE);
    u[4 * g + 2] = _mm256_shuffle_ps(b, d, 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(b, d, 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    out[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
    out[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
  }
}
#endif

// pix[c] = NHWC offset of the pixel of grid column s0 + c for c < ns, or -1
// for a column of grid padding; whether any column is a pixel.
inline bool GridPixels(const ConvProblem& p, int64_t s0, int64_t ns, int64_t* pix) {
  const int64_t plane_size = p.hq * p.wq;
  int64_t b = s0 / plane_size;
  int64_t i = (s0 % plane_size) / p.wq;
  int64_t jq = s0 % p.wq;
  bool any = false;
  for (int64_t c = 0; c < ns; ++c) {
    const bool valid = i < p.oh && jq < p.ow && b < p.batch;
    pix[c] = valid ? ((b * p.oh + i) * p.ow + jq) * p.cout : -1;
    any |= valid;
    if (++jq == p.wq) {
      jq = 0;
      if (++i == p.hq) {
        i = 0;
        ++b;
      }
    }
  }
  return any;
}

// Writes a window of nl <= 16 channel rows (rows[l][c] for block column c)
// to the NHWC output: all channels of a pixel together, so each pixel's
// cache line is written whole and once. The vector builds transpose 16x16
// (8x8) tiles in registers.
inline void StoreWindowScalar(const float* const* rows, const int64_t* pix,
                              int64_t c0, int64_t c1, int64_t nl,
                              const float* __restrict bias, float* y) {
  for (int64_t c = c0; c < c1; ++c) {
    if (pix[c] < 0) continue;
    float* __restrict yc = y + pix[c];
    for (int64_t l = 0; l < nl; ++l) yc[l] = rows[l][c] + bias[l];
  }
}

#if defined(__AVX512F__)
inline void StoreWindow(const float* const* rows, const int64_t* pix, int64_t ns,
                 int64_t nl, const float* bias, float* y) {
  static_assert(kConvWindow == 16, "one zmm per pixel");
  const __mmask16 mask = static_cast<__mmask16>((1u << nl) - 1);
  const __m512 vb = _mm512_maskz_loadu_ps(mask, bias);
  for (int64_t cb = 0; cb < ns; cb += 16) {
    __m512 t[16], out[16];
    for (int l = 0; l < 16; ++l) t[l] = _mm512_loadu_ps(rows[l] + cb);
    Transpose(t, out);
    const int64_t nc = std::min<int64_t>(16, ns - cb);
    for (int64_t c = 0; c < nc; ++c) {
      if (pix[cb + c] < 0) continue;
      _mm512_mask_storeu_ps(y + pix[cb + c], mask, _mm512_add_ps(out[c], vb));
    }
  }
}
#elif defined(__AVX2__)
inline void StoreWindow(const float* const* rows, const int64_t* pix, int64_t ns,
                 int64_t nl, const float* bias, float* y) {
  static_assert(kConvWindow == 16, "two ymm per pixel");
  if (nl < 16) {
    StoreWindowScalar(rows, pix, 0, ns, nl, bias, y);
    return;
  }
  const __m256 vb[2] = {_mm256_loadu_ps(bias), _mm256_loadu_ps(bias + 8)};
  for (int64_t cb = 0; cb < ns; cb += 8) {
    const int64_t nc = std::min<int64_t>(8, ns - cb);
    for (int h = 0; h < 2; ++h) {
      __m256 t[8], out[8];
      for (int l = 0; l < 8; ++l) t[l] = _mm256_loadu_ps(rows[8 * h + l] + cb);
      Transpose(t, out);
      for (int64_t c = 0; c < nc; ++c) {
        if (pix[cb + c] < 0) continue;
        _mm256_storeu_ps(y + pix[cb + c] + 8 * h, _mm256_add_ps(out[c], vb[h]));
      }
    }
  }
}
#else
inline void StoreWindow(const float* const* rows, const int64_t* pix, int64_t ns,
                 int64_t nl, const float* bias, float* y) {
  StoreWindowScalar(rows, pix, 0, ns, nl, bias, y);
}
#endif

}  // namespace
}  // namespace SRIGL_ISA
}  // namespace srigl

#endif  // SRIGL_CONV_WINDOW_H_
