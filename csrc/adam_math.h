// Per-element Adam / AdamW / Adamax update and statistics, shared by the CPU and CUDA kernels.
//
// Everything here is templated on the value type V: a scalar (`float`, `double`; CUDA threads and
// scalar code) or a SIMD vector (`at::vec::Vectorized<float>` on CPU). The CPU kernel declares the
// few non-arithmetic helpers for its vector type (ia_sqrt, ia_maximum, ia_fmadd, ia_abs,
// ia_nonfinite) *before* including this header; the scalar overloads live here.
//
// Numerics follow torch.optim.Adam(fused=True) on CPU operation for operation, so that parameters
// and state match torch bitwise: the first moment is torch's `lerp` (fmadd from whichever end is
// nearer), the denominator is sqrt(v) / sqrt(bc2) + eps, and all per-step scalars (bias
// corrections, step size, decay factor) are computed in double on the host and rounded to the
// compute type once. Adamax follows torch's single-tensor path (add(alpha) as an fmadd, lerp,
// maximum(u·β2, |g|+eps), addcdiv).
#pragma once

#include <cmath>
#include <cstdint>

#include "stats_table.h"

#if defined(__CUDACC__)
#define IA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IA_HOST_DEVICE inline
#endif

namespace instrumented_adam {

// Values match the `algorithm` argument of the op (instrumented_adam/_ops.py keeps the same).
enum class Algorithm : int64_t { kAdam = 0, kAdamW = 1, kAdamax = 2 };

// The scalars of one tensor's step, in double, as torch computes them on the host.
struct StepScalars {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double step;  // the step number after this step's increment
};

// The same scalars rounded once to the compute type O (float for fp32/bf16/fp16, double for fp64).
template <class O>
struct ElementCoefficients {
  O lerp_weight;        // 1 - beta1 (torch rounds the weight before choosing the lerp form)
  O lerp_coeff;         // lerp_weight or lerp_weight - 1
  bool lerp_from_grad;  // true when |1 - beta1| >= 0.5: torch's lerp then starts from the grad
  O beta2;
  O one_minus_beta2;
  O weight_decay;
  O decay_factor;  // AdamW: 1 - lr * weight_decay
  O bias_correction2_sqrt;
  O eps;
  O step_size;      // lr / (1 - beta1^t)
  O neg_step_size;  // -(lr / (1 - beta1^t)), rounded after negation as torch does
  bool has_weight_decay;
  bool maximize;
  bool amsgrad;
};

template <class O>
IA_HOST_DEVICE ElementCoefficients<O> make_coefficients(const StepScalars& s, bool maximize, bool amsgrad) {
  ElementCoefficients<O> c;
  const double bias_correction1 = 1 - std::pow(s.beta1, s.step);
  const double bias_correction2 = 1 - std::pow(s.beta2, s.step);
  const double step_size = s.lr / bias_correction1;
  c.lerp_weight = O(1 - s.beta1);
  c.lerp_from_grad = !(std::abs(c.lerp_weight) < O(0.5));
  c.lerp_coeff = c.lerp_from_grad ? c.lerp_weight - O(1) : c.lerp_weight;
  c.beta2 = O(s.beta2);
  c.one_minus_beta2 = O(1 - s.beta2);
  c.weight_decay = O(s.weight_decay);
  c.decay_factor = O(1 - s.lr * s.weight_decay);
  c.bias_correction2_sqrt = O(std::sqrt(bias_correction2));
  c.eps = O(s.eps);
  c.step_size = O(step_size);
  c.neg_step_size = O(-step_size);
  c.has_weight_decay = s.weight_decay != 0;
  c.maximize = maximize;
  c.amsgrad = amsgrad;
  return c;
}

// Everything below is compiled once per CPU instruction set (the CPU_CAPABILITY inline namespace
// keeps those copies apart, so the linker never mixes an AVX-512 copy into the default path). The
// ISA-neutral part above is only ever instantiated by the host glue and the CUDA kernel.
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// ---- scalar helpers (the CPU kernel adds the same names for its SIMD vector type) ----
IA_HOST_DEVICE float ia_sqrt(float x) { return std::sqrt(x); }
IA_HOST_DEVICE double ia_sqrt(double x) { return std::sqrt(x); }
// NaN-propagating maximum, as torch.maximum and at::vec::maximum.
IA_HOST_DEVICE float ia_maximum(float a, float b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
IA_HOST_DEVICE double ia_maximum(double a, double b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
IA_HOST_DEVICE float ia_fmadd(float a, float b, float c) { return std::fma(a, b, c); }
IA_HOST_DEVICE double ia_fmadd(double a, double b, double c) { return std::fma(a, b, c); }
IA_HOST_DEVICE float ia_abs(float x) { return std::abs(x); }
IA_HOST_DEVICE double ia_abs(double x) { return std::abs(x); }
// 1 where x is NaN or ±inf, else 0 (x - x is NaN exactly then).
IA_HOST_DEVICE float ia_nonfinite(float x) { return (x - x) != (x - x) ? 1.0f : 0.0f; }
IA_HOST_DEVICE double ia_nonfinite(double x) { return (x - x) != (x - x) ? 1.0 : 0.0; }

// One update of one element (or one SIMD vector of elements).
//   grad:   the gradient after AMP unscaling (maximize and weight decay are applied here)
//   moment: out, the second moment that divides the step (v, max v or u)
//   denom:  out, the divisor of the first moment in the step (for the effective step size)
//   kTorchScalarTail: torch's CPU kernel computes the last (numel % lanes) elements of a tensor in
//     a remainder loop that its compiler contracts differently: v·β2 + (1-β2)·g·g is
//     fma(v, β2, (1-β2)·g·g) there instead of fma((1-β2)·g, g, v·β2). We reproduce it so those
//     elements match torch bitwise too (measured; tests/test_parity.py).
// Every multiply-add that torch's compiled kernel fuses is written as an explicit ia_fmadd, and
// the kernels are compiled with -ffp-contract=off: the rounding must not depend on how a compiler
// happens to contract an expression.
template <Algorithm algo, bool kTorchScalarTail = false, class V, class O>
IA_HOST_DEVICE void update_element(V& param, V grad, V& exp_avg, V& second, V& max_second,
                                   const ElementCoefficients<O>& c, V& moment, V& denom) {
  if (c.maximize) grad = grad * V(O(-1.0));
  if (c.has_weight_decay) {
    if constexpr (algo == Algorithm::kAdamW) {
      param = param * V(c.decay_factor);
    } else {  // L2: g + wd·θ, fused by torch's compiler (Adam) and by ATen's add(alpha) (Adamax)
      grad = ia_fmadd(param, V(c.weight_decay), grad);
    }
  }
  // exp_avg.lerp_(grad, 1 - beta1)
  exp_avg = ia_fmadd(V(c.lerp_coeff), grad - exp_avg, c.lerp_from_grad ? grad : exp_avg);
  if constexpr (algo == Algorithm::kAdamax) {
    second = ia_maximum(second * V(c.beta2), ia_abs(grad) + V(c.eps));
    moment = second;
    denom = second;
  } else {
    if constexpr (kTorchScalarTail) {
      second = ia_fmadd(second, V(c.beta2), V(c.one_minus_beta2) * grad * grad);
    } else {
      second = ia_fmadd(V(c.one_minus_beta2) * grad, grad, second * V(c.beta2));
    }
    if (c.amsgrad) {
      max_second = ia_maximum(max_second, second);
      moment = max_second;
    } else {
      moment = second;
    }
    denom = (ia_sqrt(moment) / V(c.bias_correction2_sqrt)) + V(c.eps);
  }
  param = param + V(c.neg_step_size) * exp_avg / denom;
}

// Adds one element's (vector's) contributions to the statistics accumulators acc[kNumStats].
// `delta` is the change actually applied (after rounding to the parameter's storage type);
// `prev_step` is ignored unless kPrevDot.
template <bool kPrevDot, class V, class O>
IA_HOST_DEVICE void accumulate_stats(V* acc, const V& grad, const V& exp_avg, const V& moment,
                                     const V& denom, const V& delta, const V& param, const V& prev_step,
                                     const ElementCoefficients<O>& c) {
  acc[k_grad_sumsq] = ia_fmadd(grad, grad, acc[k_grad_sumsq]);
  acc[k_exp_avg_sumsq] = ia_fmadd(exp_avg, exp_avg, acc[k_exp_avg_sumsq]);
  acc[k_second_moment_sum] += moment;
  acc[k_update_sumsq] = ia_fmadd(delta, delta, acc[k_update_sumsq]);
  acc[k_param_sumsq] = ia_fmadd(param, param, acc[k_param_sumsq]);
  acc[k_update_dot_grad] = ia_fmadd(delta, grad, acc[k_update_dot_grad]);
  acc[k_exp_avg_dot_grad] = ia_fmadd(exp_avg, grad, acc[k_exp_avg_dot_grad]);
  if constexpr (kPrevDot) acc[k_update_dot_prev_epoch] = ia_fmadd(delta, prev_step, acc[k_update_dot_prev_epoch]);
  acc[k_nonfinite_grads] += ia_nonfinite(grad);
  const V eff_lr = V(c.step_size) / denom;
  acc[k_eff_lr_sum] += eff_lr;
  acc[k_eff_lr_max] = ia_maximum(acc[k_eff_lr_max], eff_lr);
}

#ifdef CPU_CAPABILITY
}  // inline namespace CPU_CAPABILITY
#endif

}  // namespace instrumented_adam
