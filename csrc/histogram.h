// Per-tensor log2 histograms of |g|, |Δθ| and the effective step size, binned from the floats'
// exponent bits in the same pass as the update (docs/design.md, "Histograms").
//
// Bins (the same for every dtype; the value binned is the one in the compute type, fp32 for
// fp32/bf16/fp16 parameters, fp64 for fp64):
//   bin 0                  x == 0 (either sign)
//   bin 1                  0 < |x| < 2^-126 (fp32 subnormals; tiny fp64 values)
//   bin b, 2 <= b <= 255   2^(b-128) <= |x| < 2^(b-127), i.e. floor(log2 |x|) = b - 128 ∈ [-126, 127]
//   bin 256                2^128 <= |x| < inf (finite fp64 values beyond fp32's range)
//   bin 257                NaN or ±inf
// For fp32 the bin of a normal x is its biased exponent + 1, so binning is a shift and a mask.
//
// The kernels call `histogram_bin` (scalar code, CUDA threads) or `SimdHistograms::add` (the CPU
// vector loop) only when the step asks for histograms: a template flag of the harness, so a step
// without histograms compiles to exactly the loop it had before.
#pragma once

#include <cstdint>
#include <cstring>

#include "stats_table.h"  // IA_HOST_DEVICE

namespace instrumented_adam {

// X(name, definition): the histograms of one step, in the order of the op's `histograms` tensor.
#define IA_FOR_EACH_HISTOGRAM(X)                                                                    \
  X(grad_abs, "|g|, the gradient after AMP unscaling, before maximize and weight decay")          \
  X(update_abs, "|Δθ|, the change actually applied (after rounding to the parameter's dtype)")    \
  X(eff_lr, "the per-element effective step size lr/(bc1·(√(v/bc2)+ε)) (Adamax: lr/(bc1·u))")

enum HistogramKind : int {
#define IA_HISTOGRAM_ENUM(name, definition) k_hist_##name,
  IA_FOR_EACH_HISTOGRAM(IA_HISTOGRAM_ENUM)
#undef IA_HISTOGRAM_ENUM
  kNumHistograms
};

struct HistogramInfo {
  const char* name;
  const char* definition;
};

inline constexpr HistogramInfo kHistogramTable[] = {
#define IA_HISTOGRAM_INFO(name, definition) {#name, definition},
    IA_FOR_EACH_HISTOGRAM(IA_HISTOGRAM_INFO)
#undef IA_HISTOGRAM_INFO
};

inline constexpr int kHistMinExponent = -126;  // floor(log2|x|) of bin kHistFirstExponentBin
inline constexpr int kHistMaxExponent = 127;
inline constexpr int kHistZeroBin = 0;
inline constexpr int kHistUnderflowBin = 1;
inline constexpr int kHistFirstExponentBin = 2;
inline constexpr int kHistOverflowBin = kHistFirstExponentBin + (kHistMaxExponent - kHistMinExponent + 1);  // 256
inline constexpr int kHistNonfiniteBin = kHistOverflowBin + 1;                                              // 257
inline constexpr int kHistBins = kHistNonfiniteBin + 1;                                                     // 258
// The most elements one CPU work item may bin: its counts are 16-bit (SimdHistograms).
inline constexpr int64_t kMaxHistogramItem = 65535;

IA_HOST_DEVICE int histogram_bin(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x) & 0x7fffffffu;
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7fffffffu;
#endif
  const uint32_t e = bits >> 23;
  if (e == 0xffu) return kHistNonfiniteBin;
  if (e == 0) return bits != 0 ? kHistUnderflowBin : kHistZeroBin;
  return static_cast<int>(e) + 1;  // e = 1 is floor(log2) = -126, bin 2
}

IA_HOST_DEVICE int histogram_bin(double x) {
#if defined(__CUDA_ARCH__)
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x)) & 0x7fffffffffffffffull;
#else
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7fffffffffffffffull;
#endif
  const int e = static_cast<int>(bits >> 52);
  if (e == 0x7ff) return kHistNonfiniteBin;
  if (bits == 0) return kHistZeroBin;
  const int exponent = e - 1023;  // fp64 subnormals (e = 0) are far below the range: underflow
  if (e == 0 || exponent < kHistMinExponent) return kHistUnderflowBin;
  if (exponent > kHistMaxExponent) return kHistOverflowBin;
  return exponent - kHistMinExponent + kHistFirstExponentBin;
}

}  // namespace instrumented_adam

// ---- the CPU vector loop's accumulator (compiled once per ISA, like the kernel file) ------------
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#include <immintrin.h>

#include <type_traits>
#include <utility>

namespace instrumented_adam {
inline namespace CPU_CAPABILITY {

// The bins of a vector's lanes into `out` (V::size() ints). fp32 on AVX2/AVX-512 computes them in
// SIMD registers (the bin is the biased exponent + 1, with the zero/subnormal and inf/NaN exponents
// remapped); everything else bins lane by lane with histogram_bin.
template <class V>
inline void lane_bins(const V& x, int32_t* out) {
  using T = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    const __m512i e = _mm512_srli_epi32(bits, 23);
    const __m512i one = _mm512_set1_epi32(1);
    __m512i b = _mm512_add_epi32(e, one);
    b = _mm512_mask_mov_epi32(b, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_min_epu32(bits, one));
    b = _mm512_mask_add_epi32(b, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0xff)), b, one);  // 256 -> 257
    _mm512_storeu_si512(out, b);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
    const __m256i e = _mm256_srli_epi32(bits, 23);
    const __m256i one = _mm256_set1_epi32(1);
    __m256i b = _mm256_add_epi32(e, one);
    b = _mm256_blendv_epi8(b, _mm256_min_epu32(bits, one), _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
    b = _mm256_sub_epi32(b, _mm256_cmpeq_epi32(e, _mm256_set1_epi32(0xff)));  // 256 -> 257
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), b);
    return;
  }
#endif
  alignas(64) T lanes[V::size()];
  x.store(lanes);
  for (int l = 0; l < V::size(); ++l) out[l] = histogram_bin(lanes[l]);
}

// Counts of one work item of at most kMaxHistogramItem elements (the CPU glue's items are 32768).
// Lane l counts into copy l % kCopies of each histogram: consecutive elements often share a bin,
// and with one copy every increment would wait for the previous one's store to forward (measured
// on the AMD EPYC of bench/results: 4 copies of uint32 counts cost 1.8 ns/element more than the
// statistics step in cache, 8 copies of uint16 counts less; see bench/results/).
template <class V>
struct SimdHistograms {
  static constexpr int kLanes = V::size();
  static constexpr int kCopies = kLanes < 8 ? kLanes : 8;
  uint16_t counts[kNumHistograms][kCopies][kHistBins];

  SimdHistograms() { std::memset(counts, 0, sizeof(counts)); }

  template <int... L>
  C10_ALWAYS_INLINE void add_all(uint16_t (*h)[kHistBins], const int32_t* bins, std::integer_sequence<int, L...>) {
    ((++h[L % kCopies][bins[L]]), ...);
  }

  // The first `valid` lanes of x (the rest are padding of a tensor's tail).
  C10_ALWAYS_INLINE void add(int kind, const V& x, int valid) {
    alignas(64) int32_t bins[kLanes];
    lane_bins(x, bins);
    uint16_t(*h)[kHistBins] = counts[kind];
    if (C10_LIKELY(valid == kLanes)) {
      add_all(h, bins, std::make_integer_sequence<int, kLanes>{});
    } else {
      for (int l = 0; l < valid; ++l) ++h[l % kCopies][bins[l]];
    }
  }

  // out: [kNumHistograms][kHistBins] int64, overwritten.
  void finish(int64_t* out) const {
    for (int k = 0; k < kNumHistograms; ++k) {
      for (int b = 0; b < kHistBins; ++b) {
        int64_t total = 0;
        for (int c = 0; c < kCopies; ++c) total += counts[k][c][b];
        out[k * kHistBins + b] = total;
      }
    }
  }
};

}  // inline namespace CPU_CAPABILITY
}  // namespace instrumented_adam
#endif
