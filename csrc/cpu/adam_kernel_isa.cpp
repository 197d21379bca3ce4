// The vectorised CPU kernel. This file is compiled once per instruction set (DEFAULT, AVX2,
// AVX512) with the matching -m flags and CPU_CAPABILITY macros (see setup.py / CMakeLists.txt):
// without the macros at::vec falls back to its slow generic arrays (docs/design.md, "Building").
// Raw pointers only; the torch glue is in adam_cpu.cpp.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

namespace instrumented_adam {
inline namespace CPU_CAPABILITY {
// SIMD versions of the helpers adam_math.h calls; declared before it so the templates see them.
template <class T>
inline at::vec::Vectorized<T> ia_sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <class T>
inline at::vec::Vectorized<T> ia_maximum(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <class T>
inline at::vec::Vectorized<T> ia_fmadd(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                       const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}
template <class T>
inline at::vec::Vectorized<T> ia_abs(const at::vec::Vectorized<T>& x) { return x.abs(); }
template <class T>
inline at::vec::Vectorized<T> ia_nonfinite(const at::vec::Vectorized<T>& x) {
  // (x - x) is NaN exactly for NaN and ±inf; isnan() gives an all-ones mask there.
  return (x - x).isnan() & at::vec::Vectorized<T>(T(1));
}
}  // namespace CPU_CAPABILITY
}  // namespace instrumented_adam

#include "kernel_args.h"
#include "../histogram.h"
#include "../stats_accumulate.h"

namespace instrumented_adam::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads/stores one SIMD step of a tensor as kVecs vectors of the compute type.
template <class scalar_t>
struct Io {
  using V = Vectorized<scalar_t>;  // fp32 and fp64 compute in their own type
  static constexpr int kVecs = 1;
  static constexpr int64_t kStep = V::size();
  static void load(const scalar_t* p, int64_t n, V* out) { out[0] = n == kStep ? V::loadu(p) : V::loadu(p, n); }
  static void store(scalar_t* p, int64_t n, const V* in) {
    if (n == kStep) in[0].store(p); else in[0].store(p, n);
  }
  static void round_trip(V*) {}
};

// bf16 / fp16 compute in fp32 registers, as torch's fused kernel does.
template <class R>
struct ReducedIo {
  using V = Vectorized<float>;
  using L = Vectorized<R>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kStep = L::size();
  static void load(const R* p, int64_t n, V* out) {
    const L low = n == kStep ? L::loadu(p) : L::loadu(p, n);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<R>(low);
  }
  static void store(R* p, int64_t n, const V* in) {
    const L low = at::vec::convert_from_float<R>(in[0], in[1]);
    if (n == kStep) low.store(p); else low.store(p, static_cast<int>(n));
  }
  // The values as stored, so that the statistics see the change actually applied.
  static void round_trip(V* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<R>(at::vec::convert_from_float<R>(v[0], v[1]));
  }
};
template <>
struct Io<c10::BFloat16> : ReducedIo<c10::BFloat16> {};
template <>
struct Io<c10::Half> : ReducedIo<c10::Half> {};

// Loads the previous epoch's step, stored as prev_t, as one SIMD step of scalar_t's compute
// vectors: the parameter's own type (Io), or bfloat16 for any parameter type (compact epoch
// buffers, 2 B/element). bf16 → fp32 is exact (the bf16 bits are the high half of the fp32 ones):
// on AVX2/AVX-512 a widening load and a shift, as cheap as an fp32 load; elsewhere lane by lane.
template <class scalar_t, class prev_t>
struct PrevIo {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using O = typename V::value_type;
  static void load(const prev_t* p, int64_t n, V* out) {
    if constexpr (std::is_same_v<prev_t, scalar_t>) {
      IO::load(p, n, out);
    } else {
      static_assert(std::is_same_v<prev_t, c10::BFloat16>, "a previous step is the parameter's type or bfloat16");
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (n == IO::kStep) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          return;
        }
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (n == IO::kStep) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
          out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
          return;
        }
      }
#endif
      alignas(64) O lanes[IO::kVecs * V::size()] = {};
      for (int64_t l = 0; l < n; ++l) lanes[l] = static_cast<O>(static_cast<float>(p[l]));
      for (int j = 0; j < IO::kVecs; ++j) out[j] = V::loadu(lanes + j * V::size());
    }
  }
};

template <class V>
typename V::value_type horizontal_min(const V& v) {
  using T = typename V::value_type;
  alignas(64) T lanes[V::size()];
  v.store(lanes);
  T result = lanes[0];
  for (int i = 1; i < V::size(); ++i) result = (result != result || lanes[i] != lanes[i]) ? result + lanes[i]
                                                : std::min(result, lanes[i]);
  return result;
}

// An fp64 running sum of one statistic's SIMD partials. The fp32 lane partials are widened to
// fp64 lane-wise (two conversions and two adds on AVX2/AVX-512) rather than summed horizontally at
// every flush: a shuffle tree per statistic per flush cost more than the statistics themselves.
// Only the final value of a work item is reduced across lanes.
template <class V>
struct WideSum {
  using T = typename V::value_type;
  using D = Vectorized<double>;
  D total = D(0.0);

  void add(const V& partial) {
    if constexpr (std::is_same_v<T, double>) {
      total = total + partial;
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 x = partial;
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
      total = total + D(_mm512_cvtps_pd(_mm512_castps512_ps256(x))) + D(_mm512_cvtps_pd(high));
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256 x = partial;
      total = total + D(_mm256_cvtps_pd(_mm256_castps256_ps128(x))) + D(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
      alignas(64) T lanes[V::size()];
      partial.store(lanes);
      alignas(64) double wide[D::size()];
      total.store(wide);
      for (int i = 0; i < V::size(); ++i) wide[i % D::size()] += lanes[i];
      total = D::loadu(wide);
#endif
    }
  }

  double sum() const {
    alignas(64) double lanes[D::size()];
    total.store(lanes);
    double result = 0;
    for (int i = 0; i < D::size(); ++i) result += lanes[i];
    return result;
  }
};

// 1/d for the sum of effective step sizes. A division costs as much as the whole rest of the
// statistics (the divide/sqrt unit already limits the update: sqrt(v) and m/denom), so AVX2 and
// AVX-512 use the hardware reciprocal estimate plus one Newton-Raphson step: relative error
// ≤ 2^-22 (AVX2, 12-bit estimate) or about 1 ulp (AVX-512, 14-bit), far inside the statistics'
// 1e-6 budget. For d = 0, ±inf, NaN and (AVX2) denormals the result is NaN rather than 1/d; no
// check here: the block's partial sum turns NaN and the flush recomputes the block exactly. (AVX2
// also flushes reciprocals below FLT_MIN, i.e. d > 2^126, to 0: an absolute error < 1.2e-38 per
// element, for denominators Adam cannot produce, √v being ≤ 1.9e19.)
template <class V>
inline V fast_reciprocal(const V& d) {
  using T = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);  // r + r·(1 − d·r)
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 r = _mm256_rcp_ps(d);
    return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.0f)), r);
  }
#endif
  return V(T(1)) / d;
}

// min(a, b) without NaN propagation (one instruction); the kernel detects NaN denominators through
// the sum of quotients over the same denominators instead (see SimdStats).
template <class V>
inline V fast_minimum(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename V::value_type, float>) return _mm512_min_ps(a, b);
  if constexpr (std::is_same_v<typename V::value_type, double>) return _mm512_min_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<typename V::value_type, float>) return _mm256_min_ps(a, b);
  if constexpr (std::is_same_v<typename V::value_type, double>) return _mm256_min_pd(a, b);
#endif
  return at::vec::minimum(a, b);
}

// fp32 partial sums are folded into fp64 after this many additions per lane: the fp32 rounding
// error of a partial (the products' roundings included) stays below ~(8 + 1)·2^-24 ≈ 5.4e-7
// relative to the sum of |terms|; the fold itself and the reduction across lanes are in fp64.
// It is also the length of the block whose g and denominators are kept for the rare exact redo.
constexpr int kFlushEvery = 8;

// The CPU accumulator of the shared statistics (stats_accumulate.h: the definitions and the
// primitives). Same values as the DirectAccumulator the CUDA kernel uses, rearranged so that the
// hot loop does only multiply-adds, because on AVX-512 every vector instruction competes for two
// ports with the update itself:
//   - sum_of_quotients Σ c/d would cost a division per element: the lanes collect Σ 1/d instead
//     (fast_reciprocal), multiplied by c once per work item, in double; the block's d are kept, and
//     a block whose estimate sum turned non-finite (d = 0, ±inf, NaN, AVX2 denormals) is redone
//     exactly at the flush.
//   - max_of_quotients max c/d is exactly c / min d (a correctly rounded division by a positive
//     number is monotonic): the lanes keep min d (fast_minimum, no NaN propagation); a NaN d makes
//     the witness Σ c/d NaN, and then the maximum is NaN too.
//   - count_nonfinite with a witness is not accumulated per element: a non-finite x makes the
//     witness's partial non-finite, and only then does the flush count the block's kept x.
// fp32 lane partials are folded into fp64 every kFlushEvery vectors (WideSum). Which of these each
// statistic needs is kStatPlan (read off `contribute`), so a new statistic needs no edit here.
template <class V>
struct SimdStats {
  using O = typename V::value_type;
  V acc[kNumStats];
  WideSum<V> total[kNumStats];
  // Per vector of the block: x of lazy counts, d of quotient sums. Kept outside this object: it is
  // indexed at run time (by the vector's place in the block), and GCC keeps an aggregate indexed at
  // run time in memory as a whole, `acc` included, at a load and a store per statistic and vector in
  // the hot loop. With this, the compile-time statistic indices of for_each_stat and the inlined
  // flush/finish (an out-of-line member call lets `this` escape, with the same effect), `acc` stays
  // in registers. Measured with bench/bench_kernel.py (1e5 fp32 elements in cache, 1 thread, AMD
  // EPYC AVX-512): 0.095 ms without these, 0.068 ms with them, 0.065 ms before the statistics code
  // was shared with CUDA; the block change alone gave 0.103 ms.
  // Storage the constructor leaves uninitialised (a union member is not constructed), written
  // before it is read: Vectorized's default constructor zeroes, and zeroing these 11 × 8 vectors
  // (5.6 KB on AVX-512) cost every work item more than a 64-element tensor's whole update
  // (bench/bench_many_tensors.py). Typed as V, not as raw bytes: a store through a char type may
  // alias anything, `acc` included, which would keep the accumulators in memory.
  struct Block {
    union {
      V v[kNumStats][kFlushEvery];
    };
    Block() {}
    C10_ALWAYS_INLINE void put(int s, int b, const V& x) { v[s][b] = x; }
    C10_ALWAYS_INLINE V get(int s, int b) const { return v[s][b]; }
  };
  Block& block;
  int64_t counted[kNumStats] = {};
  int pending = 0;  // vectors in the current block

  explicit SimdStats(Block& kept) : block(kept) {
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      acc[s] = kStatPlan[s].how == Accumulation::kMaxOfQuotients ? V(std::numeric_limits<O>::infinity()) : V(O(0));
    });
  }

  C10_ALWAYS_INLINE void sum_of_products(int s, const V& a, const V& b) { acc[s] = ia_fmadd(a, b, acc[s]); }
  C10_ALWAYS_INLINE void sum(int s, const V& a) { acc[s] += a; }
  C10_ALWAYS_INLINE void count_nonfinite(int s, const V& x, int witness) {
    if (witness < 0) acc[s] += ia_nonfinite(x); else block.put(s, pending, x);
  }
  C10_ALWAYS_INLINE void sum_of_quotients(int s, const V& d) {
    acc[s] += fast_reciprocal(d);
    block.put(s, pending, d);
  }
  C10_ALWAYS_INLINE void max_of_quotients(int s, const V& d, int /*nan_witness*/) { acc[s] = fast_minimum(d, acc[s]); }

  // After each vector's contributions.
  C10_ALWAYS_INLINE void next_vector() {
    if (++pending == kFlushEvery) flush();
  }

  // Every statistic index below is a compile-time constant (see `block` above for why).
  template <class F, int... S>
  static C10_ALWAYS_INLINE void for_each_stat_impl(F&& f, std::integer_sequence<int, S...>) {
    (f(std::integral_constant<int, S>{}), ...);
  }
  template <class F>
  static C10_ALWAYS_INLINE void for_each_stat(F&& f) {
    for_each_stat_impl(f, std::make_integer_sequence<int, kNumStats>{});
  }

  C10_ALWAYS_INLINE void flush() {
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      constexpr StatPlan plan = kStatPlan[s];
      if constexpr (plan.how == Accumulation::kCountNonfinite && plan.witness >= 0) {
        if (C10_UNLIKELY(acc[plan.witness].has_inf_nan())) {
          for (int b = 0; b < pending; ++b) {
            alignas(64) O lanes[V::size()];
            block.get(s, b).store(lanes);
            for (int l = 0; l < V::size(); ++l) counted[s] += ia_nonfinite(lanes[l]) != O(0);
          }
        }
      }
    });
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      if constexpr (kStatPlan[s].how == Accumulation::kSumOfQuotients) {
        if (C10_UNLIKELY(acc[s].has_inf_nan())) {
          V exact(O(0));
          for (int b = 0; b < pending; ++b) exact += V(O(1)) / block.get(s, b);
          acc[s] = exact;
        }
      }
    });
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      if constexpr (!kept_in_lanes(s)) {
        total[s].add(acc[s]);
        acc[s] = V(O(0));
      }
    });
    pending = 0;
  }

  // Writes the work item's values; `numerator` is the rule's step-size numerator c.
  C10_ALWAYS_INLINE void finish(O numerator, double* out) {
    if (pending > 0) flush();
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      if constexpr (kStatPlan[s].how != Accumulation::kMaxOfQuotients) {
        out[s] = kept_in_lanes(s) ? static_cast<double>(counted[s]) : total[s].sum();
        if constexpr (kStatPlan[s].how == Accumulation::kSumOfQuotients) out[s] *= static_cast<double>(numerator);
      }
    });
    for_each_stat([&](auto stat) {
      constexpr int s = decltype(stat)::value;
      constexpr StatPlan plan = kStatPlan[s];
      if constexpr (plan.how == Accumulation::kMaxOfQuotients) {
        // Divided in the compute type, as the per-element quotient would be: bitwise the largest one.
        out[s] = std::isnan(out[plan.witness]) ? out[plan.witness]
                                                : static_cast<double>(numerator / horizontal_min(acc[s]));
      }
    });
  }

 private:
  // Statistics whose lane values are not partial sums (minima, lazily counted values).
  static constexpr bool kept_in_lanes(int s) {
    return kStatPlan[s].how == Accumulation::kMaxOfQuotients ||
           (kStatPlan[s].how == Accumulation::kCountNonfinite && kStatPlan[s].witness >= 0);
  }
};

// Software prefetch distance, in bytes ahead in every stream. With real arithmetic per element
// the hardware prefetchers alone leave a core well short of the memory bandwidth. Measured on the
// 2-vCPU Intel VM of bench/results/ (32M fp32 elements): 1 thread, statistics off 36.6 → 31.1 ms,
// all statistics 41.8 → 32.8 ms (torch fused 37.3 ms); 2 threads, off 18.8 → 15.3 ms, all
// statistics 21.3 → 16.2 ms (torch 19 ms). 2 KiB was best among 1–8 KiB; prefetchw (p, m, v are
// written) and prefetcht1/t2 were 2–5% slower.
constexpr int64_t kPrefetchBytes = 2048;

// kHist (only with kStats): also the step's histograms (histogram.h) into hist_out; a template flag,
// so the loop of a step without histograms is compiled exactly as before. prev_t: how the previous
// epoch's step is stored (the parameter's type, or bfloat16 with compact epoch buffers).
template <class scalar_t, class Rule, bool kStats, bool kPrevDot, bool kHist = false, class prev_t = scalar_t>
void process_range(const KernelArgs& args, const TensorArgs& t, int64_t begin, int64_t end, double* out,
                   int64_t* hist_out = nullptr) {
  static_assert(kStats || !kHist, "histograms are taken on statistics steps");
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using O = typename V::value_type;
  constexpr int K = IO::kVecs;
  const auto& c = coefficients_of<Rule, O>(t);
  // The rule's state tensors (adam_math.h, "update rules"): slots 0 .. kNumStates-1; an optional
  // one (past kNumRequiredStates) with a null pointer is absent and neither loaded nor stored.
  constexpr int kStates = Rule::kNumStates;
  constexpr int kRequired = Rule::kNumRequiredStates;
  constexpr int kFirstMoment = Rule::kFirstMomentState;
  static_assert(kStates >= 0 && kStates <= kMaxStates, "a rule declares at most kMaxStates state tensors");
  static_assert(kRequired >= 0 && kRequired <= kStates, "the required states are the rule's first ones");
  static_assert(kFirstMoment >= -1 && kFirstMoment < kStates, "kFirstMomentState names one of the rule's states");
  auto* param = static_cast<scalar_t*>(t.param);
  auto* grad = static_cast<scalar_t*>(t.grad);
  scalar_t* state[kMaxStates];
  for (int s = 0; s < kMaxStates; ++s) state[s] = s < kStates ? static_cast<scalar_t*>(t.state[s]) : nullptr;
  auto* prev_step = static_cast<const prev_t*>(t.prev_step);
  const float* grad_scale = args.grad_scale;

  typename SimdStats<V>::Block kept_block;
  SimdStats<V> stats(kept_block);
  struct NoHistograms {
    using Kept = char;
    explicit NoHistograms(Kept&) {}
  };
  using Histograms = std::conditional_t<kHist, SimdHistograms<V>, NoHistograms>;
  typename Histograms::Kept kept_histograms;
  Histograms histograms(kept_histograms);
  const V infinity(std::numeric_limits<O>::infinity());

  // One SIMD step of n elements at i; kTail: n < IO::kStep (only the last step of a range), so
  // the full steps carry no length checks or masks.
  auto one_step = [&](auto tail_tag, int64_t i, int64_t n) {
    constexpr bool kTail = decltype(tail_tag)::value;
    const int64_t len = kTail ? n : IO::kStep;
    V p[K], g[K], prev[K], p_old[K], moment[K], denom[K];
    V st[K][kMaxStates];  // per vector j, the rule's state values (absent slots are never read)
    IO::load(param + i, len, p);
    IO::load(grad + i, len, g);
    for (int s = 0; s < kStates; ++s) {
      if (s >= kRequired && state[s] == nullptr) continue;
      V loaded[K];
      IO::load(state[s] + i, len, loaded);
      for (int j = 0; j < K; ++j) st[j][s] = loaded[j];
    }
    if constexpr (kPrevDot) PrevIo<scalar_t, prev_t>::load(prev_step + i, len, prev);
    if (grad_scale) {
      for (int j = 0; j < K; ++j) g[j] = g[j] / V(O(*grad_scale));
      IO::store(grad + i, len, g);
    }
    if constexpr (kStats) {
      for (int j = 0; j < K; ++j) p_old[j] = p[j];
    }
    if constexpr (!kTail) {
      for (int j = 0; j < K; ++j) Rule::template update<false>(c, p[j], g[j], st[j], moment[j], denom[j]);
    } else {
      // torch's remainder loop (the last numel % IO::kStep elements) is auto-vectorised by its
      // compiler for the first n - n % kTorchTailWidth lanes and scalar for the rest; the two parts
      // round v differently (see adam_math.h) and take amsgrad's maximum differently (the vector
      // part propagates a NaN v, the scalar part keeps the old maximum). kTorchTailWidth
      // (measured against torch 2.13 fused on AVX-512, tests/test_parity.py and
      // test_statistics.py): 8 fp32 lanes, 4 fp64 lanes, 16 bf16/fp16 elements. Amsgrad, 20 steps,
      // tails of every length: with these widths θ, v and max v matched torch bitwise (0 of 51,600
      // fp64 and of 336,000 bf16/fp16 elements); fp64 width 2 left 1,604 fp64 elements off, and the
      // scalar form for the whole bf16/fp16 tail 9 fp16 elements (plus max v kept where torch's is
      // NaN). On AVX2 the tail is shorter than the width for every type (n < 8, 4, 16), so it is all
      // scalar, as torch's is there (bitwise, the tests' AVX2 subprocess).
      constexpr int64_t kTorchTailWidth =
          std::is_same_v<scalar_t, float> ? 8 : std::is_same_v<scalar_t, double> ? 4 : 16;
      const int64_t vector_end = TorchVectorisedTail<Rule>::value ? n - n % kTorchTailWidth : 0;
      for (int j = 0; j < K; ++j) {
        const int64_t vector_lanes = std::clamp<int64_t>(vector_end - j * V::size(), 0, V::size());
        if (vector_lanes == V::size()) {
          Rule::template update<false>(c, p[j], g[j], st[j], moment[j], denom[j]);
          continue;
        }
        V p_vec = p[j], moment_vec, denom_vec;
        V st_vec[kMaxStates];
        for (int s = 0; s < kStates; ++s) st_vec[s] = st[j][s];
        if (vector_lanes > 0) Rule::template update<false>(c, p_vec, g[j], st_vec, moment_vec, denom_vec);
        Rule::template update<true>(c, p[j], g[j], st[j], moment[j], denom[j]);
        if (vector_lanes > 0) {
          const V vector_lane = V::set(V(O(0)), V(O(1)), vector_lanes) != V(O(0));
          p[j] = V::blendv(p[j], p_vec, vector_lane);
          for (int s = 0; s < kStates; ++s) st[j][s] = V::blendv(st[j][s], st_vec[s], vector_lane);
          moment[j] = V::blendv(moment[j], moment_vec, vector_lane);
          denom[j] = V::blendv(denom[j], denom_vec, vector_lane);
        }
      }
    }
    IO::store(param + i, len, p);
    for (int s = 0; s < kStates; ++s) {
      if (s >= kRequired && state[s] == nullptr) continue;
      V updated[K];
      for (int j = 0; j < K; ++j) updated[j] = st[j][s];
      IO::store(state[s] + i, len, updated);
    }

    if constexpr (kStats) {
      // The first moment the statistics see: the rule's declared state (0 for a rule without one).
      V m[K];
      for (int j = 0; j < K; ++j) {
        if constexpr (kFirstMoment >= 0) m[j] = st[j][kFirstMoment]; else m[j] = V(O(0));
      }
      IO::round_trip(p);
      if constexpr (!std::is_same_v<scalar_t, O>) {
        // bf16/fp16: the statistics describe the stored state (docs/design.md, "Numeric rules"), so m, the second moment
        // and the gradient grad_scale wrote back are rounded to the storage type as stored, and
        // the denominator (eff_lr) is recomputed from the stored moment. Without this they saw the
        // fp32 register values, up to 2^-8 relative off per element (exp_avg_sumsq off by 1.9e-3
        // in bf16; tests/test_statistics.py, test_reduced_precision_statistics_describe_stored_state).
        // fp32/fp64 store the register values exactly and skip this, so their kernels are
        // unchanged (bench_kernel.py, fp32 with statistics, 1e5 elements 1 thread: x1.226/1.236
        // of torch before, x1.227/1.230 after; 10M elements 2 threads: medians 15.8-16.0 ms both).
        if constexpr (kFirstMoment >= 0) IO::round_trip(m);
        IO::round_trip(moment);
        if (grad_scale) IO::round_trip(g);
        for (int j = 0; j < K; ++j) denom[j] = Rule::denominator(c, moment[j]);
      }
      for (int j = 0; j < K; ++j) {
        V delta = p[j] - p_old[j];
        if constexpr (kTail) {
          // Lanes past the end hold zeros, except that the update of a zero can be NaN
          // (eps = 0) and the effective step size is not zero; mask every input.
          const int64_t valid = std::clamp<int64_t>(n - j * V::size(), 0, V::size());
          const V lane_valid = V::set(V(O(0)), V(O(1)), valid) != V(O(0));
          const V zero(O(0));
          g[j] = V::blendv(zero, g[j], lane_valid);
          m[j] = V::blendv(zero, m[j], lane_valid);
          moment[j] = V::blendv(zero, moment[j], lane_valid);
          denom[j] = V::blendv(infinity, denom[j], lane_valid);
          delta = V::blendv(zero, delta, lane_valid);
          p[j] = V::blendv(zero, p[j], lane_valid);
          if constexpr (kPrevDot) prev[j] = V::blendv(zero, prev[j], lane_valid);
        }
        contribute<kPrevDot>(stats, Observed<V>{g[j], m[j], moment[j], denom[j], delta, p[j], prev[j]});
        stats.next_vector();
        if constexpr (kHist) {
          const int valid = kTail ? static_cast<int>(std::clamp<int64_t>(n - j * V::size(), 0, V::size())) : V::size();
          histograms.template add<k_hist_grad_abs>(g[j], valid);
          histograms.template add<k_hist_update_abs>(delta, valid);
          histograms.template add<k_hist_eff_lr>(V(Rule::step_numerator(c)) / denom[j], valid);
          histograms.next_vector();
        }
      }
    }
  };

  const int64_t full_end = begin + (end - begin) / IO::kStep * IO::kStep;
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(scalar_t);
  for (int64_t i = begin; i < full_end; i += IO::kStep) {
    // One cache line per stream per step (IO::kStep elements are 64 bytes on AVX-512; on AVX2
    // a line is asked for twice, which costs nothing measurable). Past the end of a tensor the
    // prefetches touch whatever memory follows: harmless, they never fault.
    __builtin_prefetch(param + i + kAhead, 0, 3);
    __builtin_prefetch(grad + i + kAhead, 0, 3);
    for (int s = 0; s < kStates; ++s) {
      if (s < kRequired || state[s] != nullptr) __builtin_prefetch(state[s] + i + kAhead, 0, 3);
    }
    if constexpr (kPrevDot) __builtin_prefetch(prev_step + i + kAhead, 0, 3);
    one_step(std::false_type{}, i, IO::kStep);
  }
  if (full_end < end) one_step(std::true_type{}, full_end, end - full_end);

  if constexpr (kStats) stats.finish(Rule::step_numerator(c), out);
  if constexpr (kHist) histograms.finish(hist_out);
}

// Which variants a rule's glue can ask for. Every rule takes compact epoch buffers (a bf16
// previous-epoch step); only the Adam family takes histograms: SGD, RMSprop and Adagrad refuse them
// in Python (core/classic.py), so their histogram loops are never compiled (each variant is a full
// copy of the loop: the instantiations are what the kernel's compile time is made of).
template <class Rule>
inline constexpr bool kRuleTakesHistograms = false;
template <Algorithm algo>
inline constexpr bool kRuleTakesHistograms<AdamRule<algo>> = true;

template <class scalar_t, class Rule, bool kHist>
void dispatch_prev(const KernelArgs& args, const TensorArgs& t, const WorkItem& item, double* out,
                   int64_t* hist_out) {
  if (args.prev_dot && t.prev_step != nullptr) {
    if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
      if (t.prev_dtype == DType::kBFloat16) {  // compact epoch buffers
        return process_range<scalar_t, Rule, true, true, kHist, c10::BFloat16>(args, t, item.begin, item.end, out,
                                                                              hist_out);
      }
    }
    process_range<scalar_t, Rule, true, true, kHist>(args, t, item.begin, item.end, out, hist_out);
  } else {
    process_range<scalar_t, Rule, true, false, kHist>(args, t, item.begin, item.end, out, hist_out);
  }
}

template <class scalar_t, class Rule>
void dispatch_flags(const KernelArgs& args, const TensorArgs& t, const WorkItem& item, double* out,
                    int64_t* hist_out) {
  if (!args.stats) {
    process_range<scalar_t, Rule, false, false>(args, t, item.begin, item.end, out);
  } else if (hist_out != nullptr) {
    // (The classic glue never passes histograms; were it to, the step is still taken, uncounted.)
    if constexpr (kRuleTakesHistograms<Rule>) dispatch_prev<scalar_t, Rule, true>(args, t, item, out, hist_out);
    else dispatch_prev<scalar_t, Rule, false>(args, t, item, out, nullptr);
  } else {
    dispatch_prev<scalar_t, Rule, false>(args, t, item, out, nullptr);
  }
}

template <class Rule>
void dispatch_dtype(const KernelArgs& args, const WorkItem& item, double* out, int64_t* hist_out) {
  const TensorArgs& t = args.tensors[item.tensor];
  switch (t.dtype) {
    case DType::kFloat: return dispatch_flags<float, Rule>(args, t, item, out, hist_out);
    case DType::kDouble: return dispatch_flags<double, Rule>(args, t, item, out, hist_out);
    case DType::kBFloat16: return dispatch_flags<c10::BFloat16, Rule>(args, t, item, out, hist_out);
    case DType::kHalf: return dispatch_flags<c10::Half, Rule>(args, t, item, out, hist_out);
  }
}

}  // namespace

void process_items(const KernelArgs& args, int64_t first, int64_t last) {
  for (int64_t k = first; k < last; ++k) {
    double* out = args.stats ? args.item_stats + k * kNumStats : nullptr;
    int64_t* hist_out = args.item_hist ? args.item_hist + k * kNumHistograms * kHistBins : nullptr;
    switch (args.algorithm) {
      // AdamW is Adam with ElementCoefficients::decoupled_weight_decay set: one copy of the loop.
      case Algorithm::kAdam:
      case Algorithm::kAdamW: dispatch_dtype<AdamRule<Algorithm::kAdam>>(args, args.items[k], out, hist_out); break;
      case Algorithm::kAdamax: dispatch_dtype<AdamRule<Algorithm::kAdamax>>(args, args.items[k], out, hist_out); break;
      case Algorithm::kSgd: dispatch_dtype<SgdRule>(args, args.items[k], out, hist_out); break;
      case Algorithm::kRmsprop: dispatch_dtype<RmspropRule>(args, args.items[k], out, hist_out); break;
      case Algorithm::kAdagrad: dispatch_dtype<AdagradRule>(args, args.items[k], out, hist_out); break;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace instrumented_adam::cpu
