// Kernel bodies of the condensed convolution (kernels.h), built once per
// instruction set: CMake defines SRIGL_ISA and that set's -m flags.
#include "conv/kernels.h"

#include <algorithm>
#include <cstdint>

#include "common/simd.h"
#include "conv/window.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

// Accumulator registers per output channel block.
#if defined(__AVX512F__)
// 16 of the 32 zmm registers: 256 grid columns per block.
constexpr int kR = 16;
#elif defined(__AVX2__)
// 12 of the 16 ymm registers: room for the broadcast weight and a load.
constexpr int kR = 12;
#else
constexpr int kR = 16;
#endif

constexpr int64_t kBlock = kW * kR;
static_assert((kConvWindow + 1) * kBlock <= kConvComputeScratch,
              "compute scratch too small");

// out[0, R * kW) = sum_t val[t] * planes[table[taps[t]] + [0, R * kW)): the
// accumulators stay in registers across all taps, and each tap is R
// independent multiply-add chains on one contiguous run. Each loaded vector
// feeds one multiply-add, so this is bound by loads (most straddle two cache
// lines); aligned loads plus a two-source permute measured 25% slower on
// Zen 4, the permutes competing with the FMAs.
template <int R, typename I, typename W>
inline void Channel(const float* __restrict planes,
                    const int32_t* __restrict table, const I* __restrict taps,
                    const W* __restrict val, int64_t k,
                    float* __restrict out) {
  V acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = Zero();
  for (int64_t t = 0; t < k; ++t) {
    const float* __restrict run = planes + table[taps[t]];
    const V v = Splat(ToF32(val[t]));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = Fma(v, Load(run + r * kW), acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) Store(out + r * kW, acc[r]);
}

template <typename I, typename W>
using ChannelFn = void (*)(const float*, const int32_t*, const I*, const W*,
                           int64_t, float*);

template <typename I, typename W, int R>
constexpr ChannelFn<I, W> ChannelFor(int r) {
  if constexpr (R > kR) {
    return nullptr;
  } else {
    return r == R ? &Channel<R, I, W> : ChannelFor<I, W, R + 1>(r);
  }
}

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < n, c < m: kW x kW tiles
// transposed in registers, scalar edges.
inline void CopyTransposed(const float* __restrict src, int64_t src_ld,
                           float* __restrict dst, int64_t dst_ld, int64_t n,
                           int64_t m) {
  int64_t r0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const int64_t mt = m / kW * kW;
  for (; r0 + kW <= n; r0 += kW) {
    for (int64_t c0 = 0; c0 < mt; c0 += kW) {
      V t[kW], out[kW];
      for (int l = 0; l < kW; ++l) t[l] = Load(src + (r0 + l) * src_ld + c0);
      Transpose(t, out);
      for (int l = 0; l < kW; ++l) Store(dst + (c0 + l) * dst_ld + r0, out[l]);
    }
    for (int64_t c = mt; c < m; ++c) {
      for (int64_t r = r0; r < r0 + kW; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
    }
  }
  // The last n - r0 < kW rows (a row of the image is rarely a multiple of
  // kW pixels): zero-padded tiles and masked stores, not scalar copies.
  if (r0 < n) {
    const int64_t nr = n - r0;
    for (int64_t c0 = 0; c0 < mt; c0 += kW) {
      V t[kW], out[kW];
      for (int l = 0; l < kW; ++l) {
        t[l] = l < nr ? Load(src + (r0 + l) * src_ld + c0) : Zero();
      }
      Transpose(t, out);
      for (int l = 0; l < kW; ++l) StoreFirst(dst + (c0 + l) * dst_ld + r0, out[l], nr);
    }
    for (int64_t c = mt; c < m; ++c) {
      for (int64_t r = r0; r < n; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
    }
    r0 = n;
  }
#endif
  for (int64_t r = r0; r < n; ++r) {
    for (int64_t c = 0; c < m; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
}

template <typename I, typename W>
void ComputeT(const ConvProblem& p, const float* planes, const int32_t* table,
              int64_t base, int64_t q0, int64_t q1, int64_t w0, int64_t w1,
              float* scratch) {
  const I* taps = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  // Rows of one window's results; the last row stays zero for the lanes of
  // ablated channels.
  float* zero = scratch + kConvWindow * kBlock;
  std::fill(zero, zero + kBlock, 0.f);
  // NHWC offset of each block column's pixel, or -1 for grid padding.
  int64_t pix[kBlock];
  for (int64_t s0 = q0; s0 < q1; s0 += kBlock) {
    const int64_t ns = std::min<int64_t>(kBlock, q1 - s0);
    if (!GridPixels(p, s0, ns, pix)) continue;  // only padding columns of the grid
    const int r = static_cast<int>((ns + kW - 1) / kW);
    const ChannelFn<I, W> fn = ChannelFor<I, W, 1>(r);
    const float* pl = planes + (s0 - base);
    for (int64_t a = w0; a < w1; ++a) {
      const int64_t c0 = a * kConvWindow;
      const int64_t nl = std::min<int64_t>(kConvWindow, p.cout - c0);
      const float* rows[kConvWindow];
      for (int64_t l = 0; l < kConvWindow; ++l) rows[l] = zero;
      for (int64_t j = p.window_start[a]; j < p.window_start[a + 1]; ++j) {
        float* out = scratch + (j - p.window_start[a]) * kBlock;
        fn(pl, table, taps + j * p.k, val + j * p.k, p.k, out);
        rows[p.ids[j] - c0] = out;
      }
      StoreWindow(rows, pix, ns, nl, p.bias + c0, p.y + c0);
    }
  }
}

void Compute(const ConvProblem& p, const float* planes, const int32_t* table,
             int64_t base, int64_t q0, int64_t q1, int64_t w0, int64_t w1,
             float* scratch) {
  WithTypes(p.idx16, p.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    ComputeT<I, W>(p, planes, table, base, q0, q1, w0, w1, scratch);
  });
}

void BuildPlanes(const ConvProblem& p, int64_t q0, int64_t q1, int64_t base,
                 float* dst, int64_t ld) {
  const int64_t plane_size = p.hq * p.wq;
  const int64_t cin = p.cin;
  int64_t q = q0;
  while (q < q1) {
    const int64_t b = q / plane_size;
    const int64_t i = (q % plane_size) / p.wq;
    const int64_t jq = q % p.wq;
    const int64_t len = std::min(p.wq - jq, q1 - q);
    for (int64_t ph = 0; ph < p.sh; ++ph) {
      const int64_t yy = i * p.sh + ph - p.pad_top;
      const bool row_in = b < p.batch && yy >= 0 && yy < p.h;
      for (int64_t pw = 0; pw < p.sw; ++pw) {
        float* d = dst + (ph * p.sw + pw) * cin * ld + (q - base);
        // Columns jj of this segment whose input column lies inside x.
        int64_t lo = 0, hi = 0;
        if (row_in) {
          // xc = (jq + jj) * sw + pw - pad_left in [0, w).
          const int64_t first = p.pad_left - pw - jq * p.sw;  // jj * sw >= first
          lo = first <= 0 ? 0 : (first + p.sw - 1) / p.sw;
          const int64_t last = p.w - 1 + p.pad_left - pw - jq * p.sw;
          hi = last < 0 ? 0 : std::min(len, last / p.sw + 1);
          if (hi < lo) hi = lo;
        }
        for (int64_t c = 0; c < cin; ++c) {
          float* __restrict dc = d + c * ld;
          for (int64_t jj = 0; jj < lo; ++jj) dc[jj] = 0.f;
          for (int64_t jj = hi; jj < len; ++jj) dc[jj] = 0.f;
        }
        if (hi > lo) {
          const float* __restrict xr =
              p.x + ((b * p.h + yy) * p.w + (jq + lo) * p.sw + pw - p.pad_left) * cin;
          const int64_t step = p.sw * cin;
          if (cin >= kW && kW > 1) {
            // Whole pixels (contiguous channels) to channel rows.
            CopyTransposed(xr, step, d + lo, ld, hi - lo, cin);
          } else {
            for (int64_t c = 0; c < cin; ++c) {
              float* __restrict dc = d + c * ld;
              const float* __restrict xc = xr + c;
              for (int64_t jj = lo; jj < hi; ++jj) dc[jj] = xc[(jj - lo) * step];
            }
          }
        }
      }
    }
    q += len;
  }
}

}  // namespace
}  // namespace SRIGL_ISA

template <>
const ConvKernels& KernelTable<ConvKernels, Isa::SRIGL_ISA>() {
  static const ConvKernels kernels = {SRIGL_ISA::kBlock, &SRIGL_ISA::BuildPlanes,
                                      &SRIGL_ISA::Compute, &SRIGL_ISA::IndicesBelow};
  return kernels;
}

}  // namespace srigl
