// The one table of per-tensor step statistics. Everything else reads it: the CPU and CUDA kernels
// (which figure to accumulate, how partials combine), the module that exports it to Python
// (instrumented_adam/core/table.py), and from there the reference, per-group and overall
// aggregation, the recorder's columns, the store, the analysis and the report.
//
// Each entry is X(name, combine, families, definition):
//   name        the column name, everywhere;
//   combine     how two partial values of the same tensor (two chunks), two tensors, or two
//               ranks' shards combine: kSum, kMax, or kCount (a sum of integers, exact in float64
//               up to 2^53);
//   families    the optimizer families that define it (a bit set of Family);
//   definition  what the value is, in words (exported, shown in the docs and the data dictionary).
// The kernel writes, per tensor and step, one float64 value per entry, in this order; an entry a
// family does not define is written as 0 by that family's kernel.
// Symbols: g is the gradient as stored in p.grad after AMP unscaling and before `maximize` / weight
// decay; m_t, v_t the moments after the step; Δθ the change actually applied; s_{k-1} the previous
// epoch's step.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IA_HOST_DEVICE inline
#endif

namespace instrumented_adam {

enum class Combine : int8_t { kSum = 0, kMax = 1, kCount = 2 };

// Optimizer families: one kernel rule (and one op) per family.
enum Family : uint32_t {
  kFamilyAdam = 1u << 0,    // Adam, AdamW (an exp_avg and an exp_avg_sq)
  kFamilyAdamax = 1u << 1,  // Adamax (an exp_avg and an infinity-norm exp_inf)
  kFamilySgd = 1u << 2,      // SGD (a momentum_buffer with momentum; classic_rules.h)
  kFamilyRmsprop = 1u << 3,  // RMSprop (a square_avg; momentum_buffer, grad_avg by option)
  kFamilyAdagrad = 1u << 4,  // Adagrad (the accumulated sum of squared gradients)
};
inline constexpr uint32_t kAllFamilies = kFamilyAdam | kFamilyAdamax | kFamilySgd | kFamilyRmsprop | kFamilyAdagrad;
// Families with a momentum-like first moment (Adam's m, the momentum buffer of SGD and RMSprop).
inline constexpr uint32_t kFirstMomentFamilies = kFamilyAdam | kFamilyAdamax | kFamilySgd | kFamilyRmsprop;
// Families whose step divides by a second moment (v, u, RMSprop's square average, Adagrad's sum).
inline constexpr uint32_t kSecondMomentFamilies = kFamilyAdam | kFamilyAdamax | kFamilyRmsprop | kFamilyAdagrad;
inline constexpr const char* kFamilyNames[] = {"adam", "adamax", "sgd", "rmsprop", "adagrad"};
inline constexpr int kNumFamilies = 5;

#define IA_FOR_EACH_STAT(X)                                                                         \
  X(grad_sumsq, kSum, kAllFamilies, "Σ g²")                                                         \
  X(exp_avg_sumsq, kSum, kFirstMomentFamilies, "Σ m_t² (SGD, RMSprop: the momentum buffer b_t; 0 "  \
    "without momentum)")                                                                            \
  X(second_moment_sum, kSum, kSecondMomentFamilies, "Σ of the moment in the denominator: v_t (max v_t " \
    "with amsgrad), u_t for Adamax, v_t for RMSprop (v_t − ḡ_t² when centered), the sum s_t for "     \
    "Adagrad")                                                                                      \
  X(update_sumsq, kSum, kAllFamilies, "Σ Δθ²")                                                      \
  X(param_sumsq, kSum, kAllFamilies, "Σ θ_t²")                                                      \
  X(update_dot_grad, kSum, kAllFamilies, "Σ Δθ·g, the first-order predicted loss change")          \
  X(exp_avg_dot_grad, kSum, kFirstMomentFamilies, "Σ m_t·g (SGD, RMSprop: Σ b_t·g)")                \
  X(update_dot_prev_epoch, kSum, kAllFamilies, "Σ Δθ·s_{k-1} (0 while no epoch has ended)")        \
  X(nonfinite_grads, kCount, kAllFamilies, "count of non-finite gradient elements")               \
  X(eff_lr_sum, kSum, kAllFamilies, "Σ of the per-element effective step size "                    \
    "lr/(bc1·(√(v/bc2)+ε)) (Adamax: lr/(bc1·u); SGD: lr; RMSprop: lr/(√v+ε); Adagrad: "            \
    "clr/(√s+ε))")                                                                                  \
  X(eff_lr_max, kMax, kAllFamilies, "max of the per-element effective step size")                 \
  IA_TEST_EXTRA_STATS(X)

// Test builds only (tests/test_table_extension.py builds with -DIA_TEST_EXTRA_STAT): an entry
// added to the table plus its per-element contribution in stats_accumulate.h, nothing else, must
// reach the recorder, the store, the DataFrames and the export.
#ifdef IA_TEST_EXTRA_STAT
#define IA_TEST_EXTRA_STATS(X) X(grad_sum, kSum, kAllFamilies, "Σ g (test builds only)")
#else
#define IA_TEST_EXTRA_STATS(X)
#endif

enum Stat : int {
#define IA_STAT_ENUM(name, combine, families, definition) k_##name,
  IA_FOR_EACH_STAT(IA_STAT_ENUM)
#undef IA_STAT_ENUM
  kNumStats
};

// The per-tensor sums of the epoch geometry (end_epoch), computed in float64 at an epoch boundary:
// s_k = θ_end(k) − θ_end(k−1), θ_0 where instrumentation began. Same X(name, combine, families,
// definition) form; the epoch_geometry op writes them in this order.
#define IA_FOR_EACH_EPOCH_STAT(X)                                                \
  X(step_sumsq, kSum, kAllFamilies, "‖s_k‖², the epoch's step")                   \
  X(step_dot_prev, kSum, kAllFamilies, "⟨s_k, s_{k-1}⟩ (0 for the first epoch)")  \
  X(prev_step_sumsq, kSum, kAllFamilies, "‖s_{k-1}‖² (0 for the first epoch)")    \
  X(distance_sumsq, kSum, kAllFamilies, "‖θ − θ_0‖², the distance from the start")

enum EpochStat : int {
#define IA_EPOCH_STAT_ENUM(name, combine, families, definition) k_epoch_##name,
  IA_FOR_EACH_EPOCH_STAT(IA_EPOCH_STAT_ENUM)
#undef IA_EPOCH_STAT_ENUM
  kNumEpochStats
};

struct StatInfo {
  const char* name;
  Combine combine;
  uint32_t families;
  const char* definition;
};

inline constexpr StatInfo kStatTable[] = {
#define IA_STAT_INFO(name, combine, families, definition) {#name, Combine::combine, families, definition},
    IA_FOR_EACH_STAT(IA_STAT_INFO)
#undef IA_STAT_INFO
};
static_assert(sizeof(kStatTable) / sizeof(kStatTable[0]) == kNumStats);

inline constexpr StatInfo kEpochStatTable[] = {
#define IA_EPOCH_STAT_INFO(name, combine, families, definition) {#name, Combine::combine, families, definition},
    IA_FOR_EACH_EPOCH_STAT(IA_EPOCH_STAT_INFO)
#undef IA_EPOCH_STAT_INFO
};
static_assert(sizeof(kEpochStatTable) / sizeof(kEpochStatTable[0]) == kNumEpochStats);

// The combine kinds alone, as a plain array: device code can read it (kStatTable holds strings).
inline constexpr Combine kStatCombine[] = {
#define IA_STAT_COMBINE(name, combine, families, definition) Combine::combine,
    IA_FOR_EACH_STAT(IA_STAT_COMBINE)
#undef IA_STAT_COMBINE
};

IA_HOST_DEVICE constexpr Combine stat_combine(int stat) {
#if defined(__CUDA_ARCH__)
  // A constexpr array is not addressable from device code; the switch over the X() list is.
  switch (stat) {
#define IA_STAT_COMBINE_CASE(name, combine, families, definition) \
  case k_##name: return Combine::combine;
    IA_FOR_EACH_STAT(IA_STAT_COMBINE_CASE)
#undef IA_STAT_COMBINE_CASE
  }
  return Combine::kSum;
#else
  return kStatCombine[stat];
#endif
}

// Combines two partial values of statistic `stat` (two chunks, two tensors, two ranks) as the
// table says: kSum and kCount add, kMax is a NaN-propagating maximum. The identity of every kind
// is 0: the kMax statistics are maxima of non-negative quantities (or NaN), so a tensor without
// elements reads 0 in every column.
template <class T>
IA_HOST_DEVICE T combine_partials(int stat, T a, T b) {
  if (stat_combine(stat) == Combine::kMax) return (a != a || b != b) ? a + b : (a > b ? a : b);
  return a + b;
}

}  // namespace instrumented_adam
