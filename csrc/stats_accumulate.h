// The statistics' per-element contributions: the one place where what a statistic of
// stats_table.h *is* becomes code, shared by the CPU and the CUDA kernels.
//
// A kernel's update rule hands over what it observed for one element (or one SIMD vector of
// elements) as an `Observed`; `contribute` adds each statistic's term to an accumulator. The
// accumulator is the backend's: it provides five primitives, and each backend implements them with
// its own tricks while the definitions stay here:
//
//   sum_of_products(stat, a, b)            Σ a·b
//   sum(stat, a)                           Σ a
//   count_nonfinite(stat, x, witness)      Σ [x is ±inf or NaN]; `witness` names a kSum statistic
//                                          whose partial is non-finite whenever some x is (or -1):
//                                          the CPU then counts only blocks whose witness turned
//                                          non-finite instead of testing every element
//   sum_of_quotients(stat, d)              Σ c/d, c the rule's per-tensor step-size numerator
//   max_of_quotients(stat, d, nan_witness) max c/d; `nan_witness` is a sum_of_quotients statistic
//                                          over the same d (NaN exactly when some d is NaN): the
//                                          CPU keeps min d (one instruction) and takes the NaN
//                                          from the witness
//
// Backends: `DirectAccumulator` below (scalar code and CUDA threads: each primitive as written) and
// the CPU's `SimdStats` (cpu/adam_kernel_isa.cpp: reciprocal estimates, min of denominators, lazy
// non-finite counts, exact redo of a block that needs it; within 1e-6 of the exact sums).
//
// Adding a statistic: one X() line in stats_table.h and its contribution in `contribute`. Its
// accumulation kind (kStatPlan, read off `contribute` at compile time) then drives the CPU fold,
// and its combine kind the CUDA reduction and the per-tensor combination; no other edit.
#pragma once

#include <array>

#include "adam_math.h"  // the scalar helpers ia_fmadd, ia_maximum, ia_nonfinite
#include "stats_table.h"

namespace instrumented_adam {

// What an update rule observed for one element (all in the compute type, as stored where the
// value is stored state).
template <class V>
struct Observed {
  V grad;           // g after AMP unscaling, before maximize / weight decay
  V first_moment;   // m_t (the momentum-like state; 0 for a rule without one)
  V second_moment;  // the moment in the denominator: v_t, max v_t, u_t
  V denom;          // the step's divisor: effective step size = c / denom (c the step numerator)
  V delta;          // Δθ = θ_t − θ_{t−1}, the change actually applied
  V param;          // θ_t
  V prev_step;      // s_{k−1}, the previous epoch's step (read only when kPrevDot)
};

template <bool kPrevDot, class Acc, class V>
#if defined(__CUDACC__)
IA_HOST_DEVICE constexpr void contribute(
#else
__attribute__((always_inline)) inline constexpr void contribute(
#endif
    Acc& acc, const Observed<V>& o) {
  acc.sum_of_products(k_grad_sumsq, o.grad, o.grad);
  acc.sum_of_products(k_exp_avg_sumsq, o.first_moment, o.first_moment);
  acc.sum(k_second_moment_sum, o.second_moment);
  acc.sum_of_products(k_update_sumsq, o.delta, o.delta);
  acc.sum_of_products(k_param_sumsq, o.param, o.param);
  acc.sum_of_products(k_update_dot_grad, o.delta, o.grad);
  acc.sum_of_products(k_exp_avg_dot_grad, o.first_moment, o.grad);
  if constexpr (kPrevDot) acc.sum_of_products(k_update_dot_prev_epoch, o.delta, o.prev_step);
  // A non-finite g makes its g² term, and so the (non-negative) Σ g² partial, non-finite.
  acc.count_nonfinite(k_nonfinite_grads, o.grad, k_grad_sumsq);
  acc.sum_of_quotients(k_eff_lr_sum, o.denom);
  acc.max_of_quotients(k_eff_lr_max, o.denom, k_eff_lr_sum);
#ifdef IA_TEST_EXTRA_STAT
  acc.sum(k_grad_sum, o.grad);
#endif
}

// ---- each statistic's accumulation kind, read off `contribute` at compile time ----
enum class Accumulation : int8_t { kNone, kSumOfProducts, kSum, kCountNonfinite, kSumOfQuotients, kMaxOfQuotients };

struct StatPlan {
  Accumulation how = Accumulation::kNone;
  int witness = -1;
};

namespace detail {
struct NoValue {};
struct PlanRecorder {
  std::array<StatPlan, kNumStats> plan{};
  constexpr void sum_of_products(int s, NoValue, NoValue) { plan[s] = {Accumulation::kSumOfProducts, -1}; }
  constexpr void sum(int s, NoValue) { plan[s] = {Accumulation::kSum, -1}; }
  constexpr void count_nonfinite(int s, NoValue, int witness) { plan[s] = {Accumulation::kCountNonfinite, witness}; }
  constexpr void sum_of_quotients(int s, NoValue) { plan[s] = {Accumulation::kSumOfQuotients, -1}; }
  constexpr void max_of_quotients(int s, NoValue, int witness) { plan[s] = {Accumulation::kMaxOfQuotients, witness}; }
};
constexpr std::array<StatPlan, kNumStats> record_plan() {
  PlanRecorder recorder;
  contribute<true>(recorder, Observed<NoValue>{});
  return recorder.plan;
}
}  // namespace detail

inline constexpr std::array<StatPlan, kNumStats> kStatPlan = detail::record_plan();

// The plan must agree with the table: every statistic has a contribution, sums and counts combine
// as kSum / kCount, maxima as kMax, and witnesses are what the CPU's shortcuts need.
constexpr bool plan_matches_table() {
  for (int s = 0; s < kNumStats; ++s) {
    const StatPlan& p = kStatPlan[s];
    const Combine c = kStatTable[s].combine;
    switch (p.how) {
      case Accumulation::kNone: return false;
      case Accumulation::kSumOfProducts:
      case Accumulation::kSum:
      case Accumulation::kSumOfQuotients:
        if (c != Combine::kSum) return false;
        break;
      case Accumulation::kCountNonfinite:
        if (c != Combine::kCount) return false;
        if (p.witness >= 0 && kStatPlan[p.witness].how != Accumulation::kSumOfProducts &&
            kStatPlan[p.witness].how != Accumulation::kSum)
          return false;
        break;
      case Accumulation::kMaxOfQuotients:
        if (c != Combine::kMax || p.witness < 0 || kStatPlan[p.witness].how != Accumulation::kSumOfQuotients)
          return false;
        break;
    }
  }
  return true;
}
static_assert(plan_matches_table(),
              "stats_table.h and contribute() in stats_accumulate.h disagree: every statistic needs one "
              "contribution whose kind matches its combine kind");

#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// The accumulator of scalar code and CUDA threads: every primitive exactly as defined. V is the
// compute type; `acc` holds kNumStats values, all starting at 0.
template <class V>
struct DirectAccumulator {
  V* acc;
  V numerator;  // the rule's step-size numerator c of the effective step size c / denom

  IA_HOST_DEVICE void sum_of_products(int s, const V& a, const V& b) { acc[s] = ia_fmadd(a, b, acc[s]); }
  IA_HOST_DEVICE void sum(int s, const V& a) { acc[s] += a; }
  IA_HOST_DEVICE void count_nonfinite(int s, const V& x, int /*witness*/) { acc[s] += ia_nonfinite(x); }
  IA_HOST_DEVICE void sum_of_quotients(int s, const V& d) { acc[s] += numerator / d; }
  IA_HOST_DEVICE void max_of_quotients(int s, const V& d, int /*nan_witness*/) {
    acc[s] = ia_maximum(acc[s], numerator / d);
  }
};

#ifdef CPU_CAPABILITY
}  // inline namespace CPU_CAPABILITY
#endif

}  // namespace instrumented_adam
