// Kernel bodies of the grouped condensed convolution (grouped_kernels.h),
// built once per instruction set: CMake defines SRIGL_ISA and that set's -m
// flags.
#include "conv/grouped_kernels.h"

#include <algorithm>
#include <cstdint>

#include "common/simd.h"
#include "conv/window.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

// Pixel vectors per block of grid columns, as in the plain kernel: the
// window store (conv/window.h) and the scratch rows are laid out for it.
#if defined(__AVX512F__)
constexpr int kR = 16;
#elif defined(__AVX2__)
constexpr int kR = 12;
#else
constexpr int kR = 16;
#endif
constexpr int64_t kBlock = kW * kR;
static_assert((kConvWindow + 1) * kBlock <= kConvComputeScratch,
              "compute scratch too small");

// Accumulator registers of one register block: R pixel vectors x GC channels.
constexpr int kAccs = kW == 8 ? 8 : 16;

// out[c * kBlock + [0, R * kW)] = sum_t val[t * g + c] * run_t[0, R * kW) for
// c < GC, run_t = planes + table[taps[t]]: every tap loads R vectors of its
// run once and multiplies each with GC broadcast weights, R * GC chains in
// registers across all taps.
template <int R, int GC, typename I, typename W>
void ChannelBlock(const float* __restrict planes, const int32_t* __restrict table,
                  const I* __restrict taps, const W* __restrict val, int64_t k,
                  int64_t g, float* __restrict out) {
  V acc[GC][R];
#pragma GCC unroll 16
  for (int c = 0; c < GC; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[c][r] = Zero();
  }
  for (int64_t t = 0; t < k; ++t) {
    const float* __restrict run = planes + table[taps[t]];
    V xr[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xr[r] = Load(run + r * kW);
    const W* __restrict vt = val + t * g;
#pragma GCC unroll 16
    for (int c = 0; c < GC; ++c) {
      const V w = Splat(ToF32(vt[c]));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[c][r] = Fma(w, xr[r], acc[c][r]);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < GC; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) Store(out + c * kBlock + r * kW, acc[c][r]);
  }
}

template <typename I, typename W>
using BlockFn = void (*)(const float*, const int32_t*, const I*, const W*, int64_t,
                         int64_t, float*);

// The block of gc channels (a power of two <= kAccs) and R = kAccs / gc
// pixel vectors, or of one pixel vector (`one`).
template <typename I, typename W, int GC = 1>
BlockFn<I, W> BlockFor(int64_t gc, bool one) {
  if constexpr (GC > kAccs) {
    return nullptr;
  } else {
    constexpr int R = std::min(kR, kAccs / GC);
    if (gc != GC) return BlockFor<I, W, GC * 2>(gc, one);
    return one ? &ChannelBlock<1, GC, I, W> : &ChannelBlock<R, GC, I, W>;
  }
}

// Channels [c0, c0 + n) of one group over nvec pixel vectors: rows
// out + c * kBlock.
template <typename I, typename W>
void GroupChannels(const float* planes, const int32_t* table, const I* taps,
                   const W* val, int64_t k, int64_t g, int64_t n, int64_t nvec,
                   float* out) {
  for (int64_t c = 0; c < n;) {
    int64_t gc = 1;
    while (gc * 2 <= std::min<int64_t>(kAccs, n - c)) gc *= 2;
    const int64_t r = std::min<int64_t>(kR, kAccs / gc);
    const BlockFn<I, W> full = BlockFor<I, W>(gc, false);
    const BlockFn<I, W> one = BlockFor<I, W>(gc, true);
    int64_t v = 0;
    for (; v + r <= nvec; v += r) {
      full(planes + v * kW, table, taps, val + c, k, g, out + c * kBlock + v * kW);
    }
    for (; v < nvec; ++v) {
      one(planes + v * kW, table, taps, val + c, k, g, out + c * kBlock + v * kW);
    }
    c += gc;
  }
}

template <typename I, typename W>
void ComputeT(const GroupedConvProblem& gp, const float* planes,
              const int32_t* table, int64_t base, int64_t q0, int64_t q1,
              int64_t w0, int64_t w1, float* scratch) {
  const ConvProblem& p = *gp.conv;
  const GroupedWeights& w = gp.w;
  const I* taps = static_cast<const I*>(w.idx);
  const W* val = static_cast<const W*>(w.val);
  // Rows of one window's results; the last row stays zero for the lanes of
  // ablated channels.
  float* zero = scratch + kConvWindow * kBlock;
  std::fill(zero, zero + kBlock, 0.f);
  int64_t pix[kBlock];
  for (int64_t s0 = q0; s0 < q1; s0 += kBlock) {
    const int64_t ns = std::min<int64_t>(kBlock, q1 - s0);
    if (!GridPixels(p, s0, ns, pix)) continue;  // only padding columns of the grid
    const int64_t nvec = (ns + kW - 1) / kW;
    const float* pl = planes + (s0 - base);
    for (int64_t a = w0; a < w1; ++a) {
      const int64_t c0 = a * kConvWindow;
      const int64_t nl = std::min<int64_t>(kConvWindow, p.cout - c0);
      const float* rows[kConvWindow];
      for (int64_t l = 0; l < kConvWindow; ++l) rows[l] = zero;
      for (int64_t j = gp.window_first[a]; j < gp.window_last[a]; ++j) {
        const int64_t first = static_cast<int64_t>(w.ids[j]) * w.g;
        const int64_t lo = std::max(first, c0);
        const int64_t hi = std::min(first + w.g, c0 + nl);
        float* out = scratch + (lo - c0) * kBlock;
        GroupChannels(pl, table, taps + j * w.k, val + j * w.k * w.g + (lo - first), w.k,
                      w.g, hi - lo, nvec, out);
        for (int64_t c = lo; c < hi; ++c) rows[c - c0] = out + (c - lo) * kBlock;
      }
      StoreWindow(rows, pix, ns, nl, p.bias + c0, p.y + c0);
    }
  }
}

void Compute(const GroupedConvProblem& gp, const float* planes,
             const int32_t* table, int64_t base, int64_t q0, int64_t q1,
             int64_t w0, int64_t w1, float* scratch) {
  WithTypes(gp.w.idx16, gp.w.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    ComputeT<I, W>(gp, planes, table, base, q0, q1, w0, w1, scratch);
  });
}

}  // namespace
}  // namespace SRIGL_ISA

template <>
const GroupedConvKernels& KernelTable<GroupedConvKernels, Isa::SRIGL_ISA>() {
  static const GroupedConvKernels kernels = {&SRIGL_ISA::Compute};
  return kernels;
}

}  // namespace srigl
