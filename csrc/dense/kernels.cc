// Kernel bodies of the condensed matmul (kernels.h), built once per
// instruction set: CMake defines SRIGL_ISA and that set's -m flags.
#include "dense/kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/simd.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

#if defined(__AVX2__)
// Eight scalar loads assembled into one vector. On the CPUs measured (AMD
// Zen 4) this beats the hardware gather instructions by about 1.4x for the
// L1-resident x of the batch-1 case, and it works for both index widths.
template <typename I>
inline __m256 Gather8(const float* __restrict x, const I* __restrict i) {
  return _mm256_set_ps(x[i[7]], x[i[6]], x[i[5]], x[i[4]], x[i[3]], x[i[2]],
                       x[i[1]], x[i[0]]);
}

template <typename I, typename W>
inline float DotGather(const float* __restrict x, const I* __restrict idx,
                       const W* __restrict val, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    a0 = _mm256_fmadd_ps(Gather8(x, idx + kk), LoadVals8(val + kk), a0);
    a1 = _mm256_fmadd_ps(Gather8(x, idx + kk + 8), LoadVals8(val + kk + 8), a1);
  }
  a0 = _mm256_add_ps(a0, a1);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  float s = _mm_cvtss_f32(s4);
  for (; kk < k; ++kk) s += x[idx[kk]] * ToF32(val[kk]);
  return s;
}
#else
// Four partial sums hide the latency of the multiply-add chain.
template <typename I, typename W>
inline float DotGather(const float* __restrict x, const I* __restrict idx,
                       const W* __restrict val, int64_t k) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    a0 += x[idx[kk]] * ToF32(val[kk]);
    a1 += x[idx[kk + 1]] * ToF32(val[kk + 1]);
    a2 += x[idx[kk + 2]] * ToF32(val[kk + 2]);
    a3 += x[idx[kk + 3]] * ToF32(val[kk + 3]);
  }
  for (; kk < k; ++kk) a0 += x[idx[kk]] * ToF32(val[kk]);
  return (a0 + a1) + (a2 + a3);
}
#endif

template <typename I, typename W>
void GemvRowsT(const DenseProblem& p, int64_t j0, int64_t j1) {
  const I* idx = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t c = p.ids[j];
    p.y[c] = DotGather(p.x, idx + j * p.k, val + j * p.k, p.k) + p.bias[c];
  }
}

void GemvRows(const DenseProblem& p, int64_t j0, int64_t j1) {
  WithTypes(p.idx16, p.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    GemvRowsT<I, W>(p, j0, j1);
  });
}

void TransposeTile(const DenseProblem& p, int64_t b0, int64_t tile, float* xt) {
  const int64_t nb = std::min<int64_t>(tile, p.batch - b0);
  if (nb < tile) std::memset(xt, 0, sizeof(float) * p.in * tile);
  // Blocks of 64 inputs keep both the rows read and the block written in L1.
  constexpr int64_t kBlock = 64;
  for (int64_t i0 = 0; i0 < p.in; i0 += kBlock) {
    const int64_t i1 = std::min(p.in, i0 + kBlock);
    for (int64_t t = 0; t < nb; ++t) {
      const float* __restrict row = p.x + (b0 + t) * p.in;
      for (int64_t i = i0; i < i1; ++i) xt[i * tile + t] = row[i];
    }
  }
}

// Two neurons j, j + 1 at once (constant fan-in: the same trip count), so
// twice as many independent tile-row loads are in flight. Each entry's row
// comes from L2 (the tile is in x T floats), and more loads in flight hide
// more of that latency. Even/odd fan-in positions split each neuron's
// accumulators when the registers allow it.
template <int T, typename I, typename W>
void TilePairT(const DenseProblem& p, const float* __restrict xt, int64_t b0,
               int64_t j, float* __restrict out0, float* __restrict out1) {
  constexpr int kR = T / kW;
  constexpr int kS = 4 * kR <= kRegs / 2 ? 2 : 1;
  const I* idx = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  const I* __restrict ia = idx + j * p.k;
  const I* __restrict ib = ia + p.k;
  const W* __restrict va = val + j * p.k;
  const W* __restrict vb = va + p.k;
  V a[kS][kR], b[kS][kR];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
#pragma GCC unroll 2
    for (int q = 0; q < kS; ++q) a[q][r] = b[q][r] = Zero();
  }
  int64_t kk = 0;
  for (; kk + 1 < p.k; kk += 2) {
    const V va0 = Splat(ToF32(va[kk])), va1 = Splat(ToF32(va[kk + 1]));
    const V vb0 = Splat(ToF32(vb[kk])), vb1 = Splat(ToF32(vb[kk + 1]));
    const float* __restrict ra0 = xt + static_cast<int64_t>(ia[kk]) * T;
    const float* __restrict ra1 = xt + static_cast<int64_t>(ia[kk + 1]) * T;
    const float* __restrict rb0 = xt + static_cast<int64_t>(ib[kk]) * T;
    const float* __restrict rb1 = xt + static_cast<int64_t>(ib[kk + 1]) * T;
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      a[0][r] = Fma(va0, Load(ra0 + r * kW), a[0][r]);
      b[0][r] = Fma(vb0, Load(rb0 + r * kW), b[0][r]);
      a[kS - 1][r] = Fma(va1, Load(ra1 + r * kW), a[kS - 1][r]);
      b[kS - 1][r] = Fma(vb1, Load(rb1 + r * kW), b[kS - 1][r]);
    }
  }
  if (kk < p.k) {
    const V va0 = Splat(ToF32(va[kk])), vb0 = Splat(ToF32(vb[kk]));
    const float* __restrict ra0 = xt + static_cast<int64_t>(ia[kk]) * T;
    const float* __restrict rb0 = xt + static_cast<int64_t>(ib[kk]) * T;
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      a[0][r] = Fma(va0, Load(ra0 + r * kW), a[0][r]);
      b[0][r] = Fma(vb0, Load(rb0 + r * kW), b[0][r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    V sa = a[0][r], sb = b[0][r];
    if constexpr (kS == 2) {
      sa = Add(sa, a[1][r]);
      sb = Add(sb, b[1][r]);
    }
    StoreAligned(out0 + r * kW, sa);
    StoreAligned(out1 + r * kW, sb);
  }
}

// One neuron against a batch tile of T columns: every fan-in entry adds a
// broadcast weight times one contiguous row of the transposed tile. Even and
// odd fan-in positions go to separate accumulators so that 2 * T / kW FMA
// chains run in parallel.
template <int T, typename I, typename W>
void TileRowsT(const DenseProblem& p, const float* __restrict xt, int64_t b0,
               int64_t j0, int64_t j1) {
  constexpr int kR = T / kW;
  const I* idx = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  const int64_t nb = std::min<int64_t>(T, p.batch - b0);
  alignas(64) float out[T];
  int64_t j = j0;
  // Pairs where both neurons' accumulators fit in registers, at rows of 4+
  // vectors (AVX-512 at T = 64, AVX2 at T = 32) and long fan-ins. Measured
  // interleaved on Zen 4, single thread, batch 256: AVX-512 1.03-1.24x at
  // 90%, 1.1-1.8x at 80%; AVX2 (paired T = 32 against the unpaired T = 64 it
  // replaces) 1.37x at 90%, 1.25x at 80%. Rows of 1-2 vectors lost (0.9-0.98x)
  // and fan-in 51 (99%) showed no clear gain.
  if constexpr (2 * kR <= kRegs / 2 && kR >= 4) {
    alignas(64) float out1[T];
    for (; p.k >= 128 && j + 1 < j1; j += 2) {
      TilePairT<T, I, W>(p, xt, b0, j, out, out1);
      const int64_t c0 = p.ids[j], c1 = p.ids[j + 1];
      const float bias0 = p.bias[c0], bias1 = p.bias[c1];
      float* __restrict y = p.y + b0 * p.out;
      for (int64_t t = 0; t < nb; ++t) {
        y[t * p.out + c0] = out[t] + bias0;
        y[t * p.out + c1] = out1[t] + bias1;
      }
    }
  }
  for (; j < j1; ++j) {
    const I* __restrict ij = idx + j * p.k;
    const W* __restrict vj = val + j * p.k;
    V acc0[kR], acc1[kR];
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) acc0[r] = acc1[r] = Zero();
    int64_t kk = 0;
    for (; kk + 1 < p.k; kk += 2) {
      const V v0 = Splat(ToF32(vj[kk]));
      const V v1 = Splat(ToF32(vj[kk + 1]));
      const float* __restrict r0 = xt + static_cast<int64_t>(ij[kk]) * T;
      const float* __restrict r1 = xt + static_cast<int64_t>(ij[kk + 1]) * T;
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) {
        acc0[r] = Fma(v0, Load(r0 + r * kW), acc0[r]);
        acc1[r] = Fma(v1, Load(r1 + r * kW), acc1[r]);
      }
    }
    if (kk < p.k) {
      const V v0 = Splat(ToF32(vj[kk]));
      const float* __restrict r0 = xt + static_cast<int64_t>(ij[kk]) * T;
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) acc0[r] = Fma(v0, Load(r0 + r * kW), acc0[r]);
    }
    const int64_t c = p.ids[j];
    const float b = p.bias[c];
    float* __restrict yc = p.y + b0 * p.out + c;
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) StoreAligned(out + r * kW, Add(acc0[r], acc1[r]));
    for (int64_t t = 0; t < nb; ++t) yc[t * p.out] = out[t] + b;
  }
}

void TileRows(const DenseProblem& p, const float* xt, int64_t tile, int64_t b0,
              int64_t j0, int64_t j1) {
  WithTypes(p.idx16, p.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    switch (tile) {
      case 16:
        TileRowsT<16, I, W>(p, xt, b0, j0, j1);
        break;
      case 32:
        TileRowsT<32, I, W>(p, xt, b0, j0, j1);
        break;
      default:
        TileRowsT<64, I, W>(p, xt, b0, j0, j1);
        break;
    }
  });
}

// AVX2 stops at 32-wide tiles: with 16 registers a 64-wide tile leaves no
// room to take neurons in pairs, and the paired 32-wide tile measured
// 1.25-1.5x faster at batch 256-2048.
constexpr int64_t kMaxTile = kW == 8 ? 32 : 64;

}  // namespace
}  // namespace SRIGL_ISA

template <>
const DenseKernels& KernelTable<DenseKernels, Isa::SRIGL_ISA>() {
  static const DenseKernels kernels = {&SRIGL_ISA::GemvRows, &SRIGL_ISA::TransposeTile,
                                       &SRIGL_ISA::TileRows, SRIGL_ISA::kMaxTile,
                                       &SRIGL_ISA::IndicesBelow};
  return kernels;
}

}  // namespace srigl
