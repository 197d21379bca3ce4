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

#include <algorithm>
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

// Counts of one work item of at most kMaxHistogramItem elements (the CPU glue's items are 32768),
// the general form: every lane's bin is incremented in memory. Lane l counts into copy l % kCopies
// of each histogram: consecutive elements often share a bin, and with one copy every increment
// would wait for the previous one's store to forward. Used for fp64 and the DEFAULT build; fp32
// compute on AVX2/AVX-512 uses WindowHistograms below (~0.6 ns/element/histogram here, measured
// on the AMD EPYCs of bench/results/, against ~0.7 ns/element for the whole statistics step).
template <class V>
struct ScatterHistograms {
  static constexpr int kLanes = V::size();
  static constexpr int kCopies = kLanes < 8 ? kLanes : 8;
  using Counts = uint16_t[kNumHistograms][kCopies][kHistBins];
  using Kept = Counts;
  Counts& counts;  // outside this object, as WindowHistograms::Memory (the same constructor)

  explicit ScatterHistograms(Kept& kept) : counts(kept) { std::memset(counts, 0, sizeof(counts)); }

  template <int... L>
  C10_ALWAYS_INLINE void add_all(uint16_t (*h)[kHistBins], const int32_t* bins, std::integer_sequence<int, L...>) {
    ((++h[L % kCopies][bins[L]]), ...);
  }

  // The first `valid` lanes of x (the rest are padding of a tensor's tail).
  template <int kind>
  C10_ALWAYS_INLINE void add(const V& x, int valid) {
    alignas(64) int32_t bins[kLanes];
    lane_bins(x, bins);
    uint16_t(*h)[kHistBins] = counts[kind];
    if (C10_LIKELY(valid == kLanes)) {
      add_all(h, bins, std::make_integer_sequence<int, kLanes>{});
    } else {
      for (int l = 0; l < valid; ++l) ++h[l % kCopies][bins[l]];
    }
  }
  C10_ALWAYS_INLINE void next_vector() {}

  // out: [kNumHistograms][kHistBins] int64, overwritten.
  void finish(int64_t* out) {
    for (int k = 0; k < kNumHistograms; ++k) {
      for (int b = 0; b < kHistBins; ++b) {
        int64_t total = 0;
        for (int c = 0; c < kCopies; ++c) total += counts[k][c][b];
        out[k * kHistBins + b] = total;
      }
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The integer-vector operations WindowHistograms needs, for the ISA this copy is compiled for.
struct WindowIsa {
#if defined(CPU_CAPABILITY_AVX512)
  using I = __m512i;
  static constexpr int kLanes = 16;
  static I bits(__m512 x) { return _mm512_castps_si512(x); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I srli21(I a) { return _mm512_srli_epi32(a, 21); }
  static I srli4(I a) { return _mm512_srli_epi32(a, 4); }
  static I sllv(I a, I count) { return _mm512_sllv_epi32(a, count); }  // count > 31 gives 0
  static I zero() { return _mm512_setzero_si512(); }
  static void store(void* p, I a) { _mm512_storeu_si512(p, a); }
  // Lanes whose shift count x is outside [0, 64), i.e. outside the window: one bit per lane.
  static uint32_t outside(I x) { return _mm512_test_epi32_mask(x, _mm512_set1_epi32(~63)); }
  static bool any_outside(I x) { return outside(x) != 0; }
#else
  using I = __m256i;
  static constexpr int kLanes = 8;
  static I bits(__m256 x) { return _mm256_castps_si256(x); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I srli21(I a) { return _mm256_srli_epi32(a, 21); }
  static I srli4(I a) { return _mm256_srli_epi32(a, 4); }
  static I sllv(I a, I count) { return _mm256_sllv_epi32(a, count); }  // count > 31 gives 0
  static I zero() { return _mm256_setzero_si256(); }
  static void store(void* p, I a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
  static uint32_t outside(I x) {
    const I inside = _mm256_cmpeq_epi32(_mm256_min_epu32(x, _mm256_set1_epi32(63)), x);
    return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(inside))) & 0xffu;
  }
  static bool any_outside(I x) { return !_mm256_testz_si256(x, _mm256_set1_epi32(~63)); }
#endif
};

// Counts of one work item, fp32 compute on AVX2/AVX-512, without a memory increment per element.
// The values of one tensor's histogram mostly fall within a few binades, so each histogram keeps
// a window of kWindow consecutive exponent bins [lo, lo + kWindow) in SIMD registers as packed
// 4-bit counters: a lane's value adds 1 << 4·(e − lo) to one of two accumulators (8 bins of 4 bits
// per 32-bit lane each), one variable shift and one add, no branch, no store. A shift count of 32
// or more gives 0, so a value outside the window adds nothing to either accumulator; those lanes
// (and zeros, subnormals, inf/NaN, whose exponent fields are 0 or 255 and never in the window) are
// counted one by one into `counts`, in a branch taken only when a vector has such a lane.
// The 4-bit counters are folded into byte counters every kNibbleVectors vectors and the bytes into
// `counts` every kByteFlushes folds, before the window moves and at the end. The window starts at
// the first vector that has normal values (around their median exponent) and is re-centred on the
// item's counts so far when too many values fall outside it, so a drifting or wide distribution
// costs the per-lane path, never a wrong count. (The order of additions cannot change an integer
// count: the result equals the scattered form's exactly; tests/test_histograms.py.)
template <class V>
struct WindowHistograms {
  using ISA = WindowIsa;
  using I = typename ISA::I;
  static constexpr int kLanes = ISA::kLanes;
  static_assert(V::size() == kLanes, "fp32 vectors of this ISA");
  static constexpr int kWindow = 16;
  static constexpr int kNibbleVectors = 15;  // a 4-bit counter takes at most one per vector
  static constexpr int kByteFlushes = 16;    // 16 · 15 ≤ 255 per byte counter
  // e − lo must be < 0 or ≥ 64/4 for every exponent field (0..255) before the window is placed.
  static constexpr int32_t kNoWindow = 4 * 1024;

  struct Window {
    I low = ISA::zero(), high = ISA::zero();  // bins lo..lo+7 and lo+8..lo+15, 8 nibbles per lane
    I base = ISA::set1(kNoWindow);            // 4·lo broadcast
  };
  // Everything not touched per vector. It lives outside this object, and every out-of-line helper
  // takes it (never `this`): a member call that is not inlined lets `this` escape, and GCC then
  // keeps the accumulators in memory, each vector's adds waiting for the previous vector's stores
  // to forward (measured: 0.52 ns/element for one histogram that way, see bench/results/).
  struct Memory {
    uint32_t counts[kHistBins];
    alignas(64) uint8_t bytes[4][kLanes * 4];  // byte counters: low even/odd nibbles, high even/odd
    int lo = -1;                               // the window's first exponent field (1..254−kWindow); −1: none yet
    int outside_nonzero = 0;                   // per-lane counts of nonzero values since the last check
    int folds = 0;                             // nibble folds since the last byte flush
    int checks_to_skip = 0, skip_after_miss = 1;
  };
  using Kept = Memory[kNumHistograms];

  Window window[kNumHistograms];
  Kept& memory;
  int pending = 0;  // vectors since the last nibble fold

  explicit WindowHistograms(Kept& kept) : memory(kept) {
    for (auto& m : memory) {
      m = Memory{};
      std::memset(m.counts, 0, sizeof(m.counts));
      std::memset(m.bytes, 0, sizeof(m.bytes));
    }
  }

  // The first `valid` lanes of x (the rest are padding of a tensor's tail).
  template <int kind>
  C10_ALWAYS_INLINE void add(const V& x, int valid) {
    Window& w = window[kind];
    if (C10_UNLIKELY(valid != kLanes)) {
      count_lanes_of<kind>(x, (1u << valid) - 1u);
      return;
    }
    // 4·(exponent field) − 4·lo: the sign bit and the mantissa are masked off, so |x| is not needed.
    const I shift = ISA::sub(ISA::and_(ISA::srli21(ISA::bits(x)), ISA::set1(0x3fc)), w.base);
    const I one = ISA::set1(1);
    w.low = ISA::add(w.low, ISA::sllv(one, shift));
    w.high = ISA::add(w.high, ISA::sllv(one, ISA::sub(shift, ISA::set1(32))));
    if (C10_UNLIKELY(ISA::any_outside(shift))) count_lanes_of<kind>(x, ISA::outside(shift));
  }

  C10_ALWAYS_INLINE void next_vector() {
    if (++pending == kNibbleVectors) {
      fold_all(std::make_integer_sequence<int, kNumHistograms>{});
      pending = 0;
    }
  }

  // out: [kNumHistograms][kHistBins] int64, overwritten.
  C10_ALWAYS_INLINE void finish(int64_t* out) {
    fold_all(std::make_integer_sequence<int, kNumHistograms>{});
    for (int k = 0; k < kNumHistograms; ++k) {
      flush_bytes(memory[k]);
      std::copy(memory[k].counts, memory[k].counts + kHistBins, out + k * kHistBins);
    }
  }

 private:
  template <int... K>
  C10_ALWAYS_INLINE void fold_all(std::integer_sequence<int, K...>) { (fold<K>(), ...); }

  template <int kind>
  C10_ALWAYS_INLINE void count_lanes_of(const V& x, uint32_t lanes) {
    alignas(64) float values[kLanes];
    x.store(values);
    const int lo = count_lanes(memory[kind], values, lanes);
    if (lo >= 0) window[kind].base = ISA::set1(4 * lo);
  }

  // 4-bit counters into byte counters (every kNibbleVectors vectors: none can have overflowed),
  // then the window check.
  template <int kind>
  C10_ALWAYS_INLINE void fold() {
    Window& w = window[kind];
    Memory& m = memory[kind];
    const I mask = ISA::set1(0x0f0f0f0f);
    const I parts[4] = {ISA::and_(w.low, mask), ISA::and_(ISA::srli4(w.low), mask), ISA::and_(w.high, mask),
                        ISA::and_(ISA::srli4(w.high), mask)};
    for (int k = 0; k < 4; ++k) {
      I bytes;
      std::memcpy(&bytes, m.bytes[k], sizeof(bytes));
      ISA::store(m.bytes[k], ISA::add(bytes, parts[k]));  // bytes never carry: each stays ≤ 255
    }
    w.low = w.high = ISA::zero();
    if (++m.folds == kByteFlushes) flush_bytes(m);
    if (C10_UNLIKELY(m.outside_nonzero * 8 > kNibbleVectors * kLanes)) {
      const int lo = recentre(m);
      if (lo >= 0) w.base = ISA::set1(4 * lo);
    }
    m.outside_nonzero = 0;
  }

  // The lanes in `lanes` one by one (outside the window, or a tail). Returns the window's new
  // first exponent when this places it (on the first vector with normal values, around their
  // median exponent), else −1.
  static C10_NOINLINE int count_lanes(Memory& m, const float* values, uint32_t lanes) {
    int exponents[kLanes];
    int normal = 0;
    for (uint32_t rest = lanes; rest != 0; rest &= rest - 1) {
      const int l = __builtin_ctz(rest);
      const int bin = histogram_bin(values[l]);
      ++m.counts[bin];
      if (bin != kHistZeroBin) ++m.outside_nonzero;
      if (bin >= kHistFirstExponentBin && bin < kHistOverflowBin) exponents[normal++] = bin - 1;
    }
    if (m.lo >= 0 || normal == 0) return -1;
    std::nth_element(exponents, exponents + normal / 2, exponents + normal);
    return m.lo = clamp_window(exponents[normal / 2] - kWindow / 2);
  }

  // Byte counters into `counts` (byte j of a lane in bytes[k] is nibble 2j + k % 2 of accumulator
  // k / 2, i.e. exponent field lo + 8·(k / 2) + 2j + k % 2, whose bin is that + 1).
  static C10_NOINLINE void flush_bytes(Memory& m) {
    m.folds = 0;
    if (m.lo < 0) return;  // no window yet: nothing was counted in one
    for (int k = 0; k < 4; ++k) {
      for (int j = 0; j < 4; ++j) {
        // Summed over the lanes in a register first: adding each lane into counts[] directly would
        // chain kLanes read-modify-writes of one address (3 cycles per vector in this loop alone).
        uint32_t total = 0;
        for (int l = 0; l < kLanes; ++l) total += m.bytes[k][4 * l + j];
        m.counts[m.lo + 8 * (k / 2) + 2 * j + k % 2 + 1] += total;
      }
    }
    std::memset(m.bytes, 0, sizeof(m.bytes));
  }

  // After a fold in which more than one value in eight fell outside the window (zeros aside: their
  // bin is never in a window): the window is moved to where the item's counts so far are densest.
  // A search that does not move it doubles the folds to wait before the next one, so a
  // distribution wider than any window costs the per-lane path, not repeated searches. Returns the
  // new first exponent, or −1 when the window stays.
  static C10_NOINLINE int recentre(Memory& m) {
    if (m.lo < 0) return -1;
    if (m.checks_to_skip > 0) {
      --m.checks_to_skip;
      return -1;
    }
    flush_bytes(m);  // the counts of the old window, before it moves
    int best_lo = m.lo;
    uint32_t best = 0, sum = 0;
    // Windows over the exponent fields 1..254 (bins 2..255); sum = counts of fields e-kWindow+1..e.
    for (int e = 1; e <= 254; ++e) {
      sum += m.counts[e + 1];
      if (e - kWindow >= 1) sum -= m.counts[e - kWindow + 1];
      const int lo = e - kWindow + 1;
      if (lo >= 1 && sum > best) {
        best = sum;
        best_lo = lo;
      }
    }
    if (best_lo == m.lo) {
      m.checks_to_skip = m.skip_after_miss;
      m.skip_after_miss = std::min(2 * m.skip_after_miss, 1 << 12);
      return -1;
    }
    return m.lo = best_lo;
  }

  static int clamp_window(int lo) { return std::clamp(lo, 1, 254 - kWindow + 1); }
};

template <class V>
using SimdHistograms =
    std::conditional_t<std::is_same_v<typename V::value_type, float>, WindowHistograms<V>, ScatterHistograms<V>>;
#else
template <class V>
using SimdHistograms = ScatterHistograms<V>;
#endif

}  // inline namespace CPU_CAPABILITY
}  // namespace instrumented_adam
#endif
