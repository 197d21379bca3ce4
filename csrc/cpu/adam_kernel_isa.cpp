// The vectorised CPU kernel. This file is compiled once per instruction set (DEFAULT, AVX2,
// AVX512) with the matching -m flags and CPU_CAPABILITY macros (see setup.py / CMakeLists.txt):
// without the macros at::vec falls back to its slow generic arrays (BUILD_NOTES.md).
// Raw pointers only; the torch glue is in adam_cpu.cpp.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

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

template <class V>
double horizontal_sum(const V& v) {
  using T = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return v.reduce_add();  // a shuffle tree; the generic (DEFAULT) version does not compile
  } else
#endif
  {
    alignas(64) T lanes[V::size()];
    v.store(lanes);
    double sum = 0;
    for (int i = 0; i < V::size(); ++i) sum += lanes[i];
    return sum;
  }
}

template <class V>
double horizontal_max(const V& v) {
  using T = typename V::value_type;
  alignas(64) T lanes[V::size()];
  v.store(lanes);
  double result = lanes[0];
  for (int i = 1; i < V::size(); ++i) result = ia_maximum(result, double(lanes[i]));
  return result;
}

// fp32 partial sums are folded into fp64 after this many additions per lane: the fp32 rounding
// error of a partial stays below ~(8 + log2 lanes)·2^-24 ≈ 7e-7 relative to the sum of |terms|.
constexpr int kFlushEvery = 8;

template <class scalar_t, Algorithm algo, bool kStats, bool kPrevDot>
void process_range(const KernelArgs& args, const TensorArgs& t, int64_t begin, int64_t end, double* out) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using O = typename V::value_type;
  constexpr int K = IO::kVecs;
  const ElementCoefficients<O>& c = [&]() -> const ElementCoefficients<O>& {
    if constexpr (std::is_same_v<O, double>) return t.coeff_double; else return t.coeff_float;
  }();
  auto* param = static_cast<scalar_t*>(t.param);
  auto* grad = static_cast<scalar_t*>(t.grad);
  auto* exp_avg = static_cast<scalar_t*>(t.exp_avg);
  auto* second = static_cast<scalar_t*>(t.second);
  auto* max_second = static_cast<scalar_t*>(t.max_second);
  auto* prev_step = static_cast<const scalar_t*>(t.prev_step);
  const bool amsgrad = algo != Algorithm::kAdamax && args.amsgrad;
  const float* grad_scale = args.grad_scale;

  V acc[kNumStats];
  double total[kNumStats] = {};
  if constexpr (kStats) {
    for (auto& a : acc) a = V(O(0));
  }
  int pending = 0;
  const V infinity(std::numeric_limits<O>::infinity());

  for (int64_t i = begin; i < end; i += IO::kStep) {
    const int64_t n = std::min<int64_t>(IO::kStep, end - i);
    V p[K], g[K], m[K], v[K], vmax[K], prev[K], p_old[K], moment[K], denom[K];
    IO::load(param + i, n, p);
    IO::load(grad + i, n, g);
    IO::load(exp_avg + i, n, m);
    IO::load(second + i, n, v);
    if (amsgrad) IO::load(max_second + i, n, vmax);
    if constexpr (kPrevDot) IO::load(prev_step + i, n, prev);
    if (grad_scale) {
      for (int j = 0; j < K; ++j) g[j] = g[j] / V(O(*grad_scale));
      IO::store(grad + i, n, g);
    }
    if constexpr (kStats) {
      for (int j = 0; j < K; ++j) p_old[j] = p[j];
    }
    if (n == IO::kStep) {
      for (int j = 0; j < K; ++j) update_element<algo>(p[j], g[j], m[j], v[j], vmax[j], c, moment[j], denom[j]);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      // torch's remainder loop is compiled to 8-wide vector code for the first n - n % 8 lanes
      // and scalar code for the rest; the two round v differently (see adam_math.h).
      V p_vec = p[0], m_vec = m[0], v_vec = v[0], vmax_vec = vmax[0], moment_vec, denom_vec;
      update_element<algo>(p_vec, g[0], m_vec, v_vec, vmax_vec, c, moment_vec, denom_vec);
      update_element<algo, true>(p[0], g[0], m[0], v[0], vmax[0], c, moment[0], denom[0]);
      const V vector_lane = V::set(V(O(0)), V(O(1)), n - n % 8) != V(O(0));
      p[0] = V::blendv(p[0], p_vec, vector_lane);
      m[0] = V::blendv(m[0], m_vec, vector_lane);
      v[0] = V::blendv(v[0], v_vec, vector_lane);
      vmax[0] = V::blendv(vmax[0], vmax_vec, vector_lane);
      moment[0] = V::blendv(moment[0], moment_vec, vector_lane);
      denom[0] = V::blendv(denom[0], denom_vec, vector_lane);
    } else {
      for (int j = 0; j < K; ++j) {
        update_element<algo, true>(p[j], g[j], m[j], v[j], vmax[j], c, moment[j], denom[j]);
      }
    }
    IO::store(param + i, n, p);
    IO::store(exp_avg + i, n, m);
    IO::store(second + i, n, v);
    if (amsgrad) IO::store(max_second + i, n, vmax);

    if constexpr (kStats) {
      IO::round_trip(p);
      for (int j = 0; j < K; ++j) {
        V delta = p[j] - p_old[j];
        if (n != IO::kStep) {
          // Tail: lanes past the end hold zeros, except that the update of a zero can be NaN
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
        accumulate_stats<kPrevDot>(acc, g[j], m[j], moment[j], denom[j], delta, p[j], prev[j], c);
      }
      if (++pending * K >= kFlushEvery) {
        for (int s = 0; s < kNumStats; ++s) {
          if (s == k_eff_lr_max) continue;
          total[s] += horizontal_sum(acc[s]);
          acc[s] = V(O(0));
        }
        pending = 0;
      }
    }
  }
  if constexpr (kStats) {
    for (int s = 0; s < kNumStats; ++s) {
      out[s] = s == k_eff_lr_max ? horizontal_max(acc[s]) : total[s] + horizontal_sum(acc[s]);
    }
  }
}

template <class scalar_t, Algorithm algo>
void dispatch_flags(const KernelArgs& args, const TensorArgs& t, const WorkItem& item, double* out) {
  if (!args.stats) {
    process_range<scalar_t, algo, false, false>(args, t, item.begin, item.end, out);
  } else if (args.prev_dot && t.prev_step != nullptr) {
    process_range<scalar_t, algo, true, true>(args, t, item.begin, item.end, out);
  } else {
    process_range<scalar_t, algo, true, false>(args, t, item.begin, item.end, out);
  }
}

template <Algorithm algo>
void dispatch_dtype(const KernelArgs& args, const WorkItem& item, double* out) {
  const TensorArgs& t = args.tensors[item.tensor];
  switch (t.dtype) {
    case DType::kFloat: return dispatch_flags<float, algo>(args, t, item, out);
    case DType::kDouble: return dispatch_flags<double, algo>(args, t, item, out);
    case DType::kBFloat16: return dispatch_flags<c10::BFloat16, algo>(args, t, item, out);
    case DType::kHalf: return dispatch_flags<c10::Half, algo>(args, t, item, out);
  }
}

}  // namespace

void process_items(const KernelArgs& args, int64_t first, int64_t last) {
  for (int64_t k = first; k < last; ++k) {
    double* out = args.stats ? args.item_stats + k * kNumStats : nullptr;
    switch (args.algorithm) {
      case Algorithm::kAdam: dispatch_dtype<Algorithm::kAdam>(args, args.items[k], out); break;
      case Algorithm::kAdamW: dispatch_dtype<Algorithm::kAdamW>(args, args.items[k], out); break;
      case Algorithm::kAdamax: dispatch_dtype<Algorithm::kAdamax>(args, args.items[k], out); break;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace instrumented_adam::cpu
