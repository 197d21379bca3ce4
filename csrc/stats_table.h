// The one table of per-tensor step statistics, shared by the CPU and CUDA kernels, the op that
// exports the names to Python, the reference, the recorder and the report.
//
// Each entry is X(name): the kernel writes, per tensor and step, one float64 value per entry, in
// this order. All entries are sums over the tensor's elements except `eff_lr_max` (a maximum).
// Definitions (DESIGN.md): g is the gradient as stored in p.grad after AMP unscaling and before
// `maximize` / weight decay; m_t, v_t the moments after the step; Δθ the change actually applied.
#pragma once

#define IA_FOR_EACH_STAT(X)                                                     \
  X(grad_sumsq)            /* Σ g²                                          */ \
  X(exp_avg_sumsq)         /* Σ m_t²                                        */ \
  X(second_moment_sum)     /* Σ v_t (max v for amsgrad, u_t for Adamax)     */ \
  X(update_sumsq)          /* Σ Δθ²                                         */ \
  X(param_sumsq)           /* Σ θ_t²                                        */ \
  X(update_dot_grad)       /* Σ Δθ·g                                        */ \
  X(exp_avg_dot_grad)      /* Σ m_t·g                                       */ \
  X(update_dot_prev_epoch) /* Σ Δθ·s_{k-1}, 0 when not tracked             */ \
  X(nonfinite_grads)       /* count of non-finite g                        */ \
  X(eff_lr_sum)            /* Σ lr/(bc1·(√v/√bc2+eps)), Adamax lr/(bc1·u)  */ \
  X(eff_lr_max)            /* max of the same                              */

namespace instrumented_adam {

enum Stat : int {
#define IA_STAT_ENUM(name) k_##name,
  IA_FOR_EACH_STAT(IA_STAT_ENUM)
#undef IA_STAT_ENUM
  kNumStats
};

inline constexpr const char* kStatNames[] = {
#define IA_STAT_NAME(name) #name,
    IA_FOR_EACH_STAT(IA_STAT_NAME)
#undef IA_STAT_NAME
};

}  // namespace instrumented_adam
