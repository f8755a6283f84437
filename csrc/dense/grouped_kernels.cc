// Kernel bodies of the grouped condensed matmul (grouped_kernels.h), built
// once per instruction set: CMake defines SRIGL_ISA and that set's -m flags.
#include "dense/grouped_kernels.h"

#include <algorithm>
#include <cstdint>

#include "common/simd.h"
#include "common/simd_weights.h"

namespace srigl {
namespace SRIGL_ISA {
namespace {

// Neurons [cb, ce) of unit u's group: part u % parts of its g neurons.
inline void PartRange(const GroupedDenseProblem& p, int64_t u, int64_t* j,
                      int64_t* cb, int64_t* ce) {
  *j = u / p.parts;
  const int64_t part = u % p.parts;
  *cb = p.g * part / p.parts;
  *ce = p.g * (part + 1) / p.parts;
}

// ---------------------------------------------------------------- rows
//
// One batch row: y[c0 + [0, n)] = sum_t x[idx[t]] * val[t * g + c0 + [0, n)]
// with NV vectors of neurons (the last one partial unless kFull). Every
// fan-in entry is one broadcast of a gathered input and NV multiply-adds
// with contiguous weights: no gather instruction. S interleaved chains of
// fan-in entries hide the multiply-add latency when NV is small.

constexpr int kRowVectors = kW == 1 ? 8 : 4;

template <int NV, bool kFull, typename I, typename W>
void GroupRow(const float* __restrict x, const I* __restrict idx,
              const W* __restrict val, int64_t k, int64_t g, int64_t n,
              const float* __restrict bias, float* __restrict y) {
  constexpr int S = NV >= 4 ? 1 : (NV >= 2 ? 2 : 4);
  const int64_t last = n - (NV - 1) * kW;  // lanes of the last vector
  V acc[S][NV];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[s][v] = Zero();
  }
  auto entry = [&](int s, int64_t t) {
    const V xv = Splat(x[idx[t]]);
    const W* __restrict vt = val + t * g;
#pragma GCC unroll 16
    for (int v = 0; v + 1 < NV; ++v) acc[s][v] = Fma(xv, LoadW(vt + v * kW), acc[s][v]);
    const V w = kFull ? LoadW(vt + (NV - 1) * kW) : LoadWFirst(vt + (NV - 1) * kW, last);
    acc[s][NV - 1] = Fma(xv, w, acc[s][NV - 1]);
  };
  int64_t t = 0;
  for (; t + S <= k; t += S) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) entry(s, t + s);
  }
  for (int s = 0; t < k; ++t, ++s) entry(s, t);
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    V sum = acc[0][v];
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) sum = Add(sum, acc[s][v]);
    if (kFull || v + 1 < NV) {
      Store(y + v * kW, Add(sum, Load(bias + v * kW)));
    } else {
      StoreFirst(y + v * kW, Add(sum, LoadWFirst(bias + v * kW, last)), last);
    }
  }
}

template <typename I, typename W>
using RowFn = void (*)(const float*, const I*, const W*, int64_t, int64_t,
                       int64_t, const float*, float*);

template <typename I, typename W, int NV = 1>
RowFn<I, W> RowFor(int64_t n) {
  if constexpr (NV > kRowVectors) {
    return nullptr;
  } else {
    if ((n + kW - 1) / kW != NV) return RowFor<I, W, NV + 1>(n);
    return n % kW == 0 ? &GroupRow<NV, true, I, W> : &GroupRow<NV, false, I, W>;
  }
}

template <typename I, typename W>
void RowsT(const GroupedDenseProblem& p, int64_t u0, int64_t u1) {
  const I* idx = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  constexpr int64_t kChunk = kRowVectors * kW;
  for (int64_t u = u0; u < u1; ++u) {
    int64_t j, cb, ce;
    PartRange(p, u, &j, &cb, &ce);
    const int64_t col = static_cast<int64_t>(p.ids[j]) * p.g;
    const I* ij = idx + j * p.k;
    const W* vj = val + j * p.k * p.g;
    for (int64_t c0 = cb; c0 < ce; c0 += kChunk) {
      const int64_t n = std::min(kChunk, ce - c0);
      const RowFn<I, W> fn = RowFor<I, W>(n);
      for (int64_t b = 0; b < p.batch; ++b) {
        fn(p.x + b * p.in, ij, vj + c0, p.k, p.g, n, p.bias + col + c0,
           p.y + b * p.out + col + c0);
      }
    }
  }
}

void Rows(const GroupedDenseProblem& p, int64_t u0, int64_t u1) {
  WithTypes(p.idx16, p.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    RowsT<I, W>(p, u0, u1);
  });
}

// ---------------------------------------------------------------- tiles
//
// A batch tile of T = R * kW columns, transposed: the row of input i is
// xt[i * T, (i + 1) * T). Each fan-in entry loads its row once (R vectors)
// and feeds GC neurons: GC broadcast weights, R * GC multiply-adds into
// R * GC accumulators that stay in registers for the whole fan-in.

// Accumulator registers of one register block.
constexpr int kAccs = kW == 8 ? 8 : 16;

int64_t TileFor(int64_t g) {
  int64_t gc = 1;
  while (gc * 2 <= std::min<int64_t>(g, kAccs)) gc *= 2;
  const int64_t r = std::clamp<int64_t>(kAccs / gc, 1, 4);
  return r * kW;
}

template <int R, int GC, typename I, typename W>
void TileBlock(const float* __restrict xt, const I* __restrict idx,
               const W* __restrict val, int64_t k, int64_t g,
               float* __restrict out) {
  constexpr int T = R * kW;
  V acc[GC][R];
#pragma GCC unroll 16
  for (int c = 0; c < GC; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[c][r] = Zero();
  }
  for (int64_t t = 0; t < k; ++t) {
    const float* __restrict row = xt + static_cast<int64_t>(idx[t]) * T;
    V xr[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xr[r] = Load(row + r * kW);
    const W* __restrict vt = val + t * g;
#pragma GCC unroll 16
    for (int c = 0; c < GC; ++c) {
      const V w = Splat(ToF32(vt[c]));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[c][r] = Fma(w, xr[r], acc[c][r]);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < GC; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) StoreAligned(out + c * T + r * kW, acc[c][r]);
  }
}

template <typename I, typename W>
using TileFn = void (*)(const float*, const I*, const W*, int64_t, int64_t, float*);

// The block of R rows and gc neurons (gc a power of two, gc * R <= kAccs).
template <int R, typename I, typename W, int GC = 1>
TileFn<I, W> TileBlockFor(int64_t gc) {
  if constexpr (GC * R > kAccs) {
    return nullptr;
  } else {
    return gc == GC ? &TileBlock<R, GC, I, W> : TileBlockFor<R, I, W, GC * 2>(gc);
  }
}

template <int R, typename I, typename W>
void TileRowsT(const GroupedDenseProblem& p, const float* xt, int64_t b0,
               int64_t u0, int64_t u1) {
  constexpr int T = R * kW;
  constexpr int64_t kMaxGc = kAccs / R;
  const I* idx = static_cast<const I*>(p.idx);
  const W* val = static_cast<const W*>(p.val);
  const int64_t nb = std::min<int64_t>(T, p.batch - b0);
  alignas(64) float out[kAccs * kW];
  for (int64_t u = u0; u < u1; ++u) {
    int64_t j, cb, ce;
    PartRange(p, u, &j, &cb, &ce);
    const int64_t col = static_cast<int64_t>(p.ids[j]) * p.g;
    const I* ij = idx + j * p.k;
    const W* vj = val + j * p.k * p.g;
    for (int64_t c0 = cb; c0 < ce;) {
      int64_t gc = 1;
      while (gc * 2 <= std::min(kMaxGc, ce - c0)) gc *= 2;
      TileBlockFor<R, I, W>(gc)(xt, ij, vj + c0, p.k, p.g, out);
      const float* __restrict bias = p.bias + col + c0;
      for (int64_t b = 0; b < nb; ++b) {
        float* __restrict yb = p.y + (b0 + b) * p.out + col + c0;
        for (int64_t c = 0; c < gc; ++c) yb[c] = out[c * T + b] + bias[c];
      }
      c0 += gc;
    }
  }
}

void TileRows(const GroupedDenseProblem& p, const float* xt, int64_t tile,
              int64_t b0, int64_t u0, int64_t u1) {
  WithTypes(p.idx16, p.val_bf16, [&](auto i, auto w) {
    using I = typename decltype(i)::type;
    using W = typename decltype(w)::type;
    switch (tile / kW) {
      case 1:
        TileRowsT<1, I, W>(p, xt, b0, u0, u1);
        break;
      case 2:
        TileRowsT<2, I, W>(p, xt, b0, u0, u1);
        break;
      default:
        TileRowsT<4, I, W>(p, xt, b0, u0, u1);
        break;
    }
  });
}

}  // namespace
}  // namespace SRIGL_ISA

template <>
const GroupedDenseKernels& KernelTable<GroupedDenseKernels, Isa::SRIGL_ISA>() {
  static const GroupedDenseKernels kernels = {
      &SRIGL_ISA::Rows, &SRIGL_ISA::TileRows, &SRIGL_ISA::TileFor};
  return kernels;
}

}  // namespace srigl
