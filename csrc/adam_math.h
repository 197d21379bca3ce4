// Per-element Adam / AdamW / Adamax update, shared by the CPU and CUDA kernels (the statistics of
// what it observed: stats_accumulate.h).
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

#include "kernel_tensor.h"
#include "stats_table.h"

namespace instrumented_adam {

// Values match the `algorithm` argument of the op (instrumented_adam/_ops.py keeps the same).
// kSgd, kRmsprop and kAdagrad only select the kernel rule (classic_rules.h); their ops are their own.
enum class Algorithm : int64_t { kAdam = 0, kAdamW = 1, kAdamax = 2, kSgd = 3, kRmsprop = 4, kAdagrad = 5 };

// The state tensors of the Adam family, in the order its rules (AdamRule below, the CUDA
// AdamFamilyRule) declare them and the glue fills ParameterPointers::state (adam_step_call.h).
struct AdamState {
  enum : int {
    kExpAvg = 0,           // exp_avg m: the first moment (the statistics' first_moment)
    kSecondMoment = 1,     // exp_avg_sq v (Adam, AdamW) or exp_inf u (Adamax)
    kMaxSecondMoment = 2,  // max_exp_avg_sq (amsgrad only; absent, i.e. a null pointer, otherwise)
    kCount = 3,
  };
};
static_assert(AdamState::kCount <= kMaxStates, "kMaxStates must hold the Adam family's state");

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
  // AdamW: weight decay applied to θ (decay_factor) rather than added to g. A coefficient, not a
  // template parameter, so that the CPU kernel compiles one copy of the loop for Adam and AdamW
  // (the loop is unswitched on it like on has_weight_decay; ~30% of the kernel's compile time).
  bool decoupled_weight_decay;
  bool maximize;
  bool amsgrad;
};

template <class O>
IA_HOST_DEVICE ElementCoefficients<O> make_coefficients(const StepScalars& s, Algorithm algo, bool maximize,
                                                        bool amsgrad) {
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
  c.decoupled_weight_decay = algo == Algorithm::kAdamW;
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
// std::max(a, b) = (a < b) ? b : a: keeps `a` when either is NaN. torch's scalar remainder loop
// takes amsgrad's running maximum this way (the vector body uses the NaN-propagating maximum).
IA_HOST_DEVICE float ia_max_keep_first(float a, float b) { return a < b ? b : a; }
IA_HOST_DEVICE double ia_max_keep_first(double a, double b) { return a < b ? b : a; }
// The same for a SIMD vector type (anything with V::blendv and a lane-mask operator<); the
// non-template scalar overloads above win for float and double.
template <class V>
IA_HOST_DEVICE V ia_max_keep_first(const V& a, const V& b) { return V::blendv(a, b, a < b); }
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
    if (algo == Algorithm::kAdamW || c.decoupled_weight_decay) {
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
      // torch's scalar remainder loop keeps the old maximum when v is NaN (std::max); its vector
      // body propagates the NaN (tests/test_statistics.py, test_nonfinite_gradients_*).
      max_second = kTorchScalarTail ? ia_max_keep_first(max_second, second) : ia_maximum(max_second, second);
      moment = max_second;
    } else {
      moment = second;
    }
    denom = (ia_sqrt(moment) / V(c.bias_correction2_sqrt)) + V(c.eps);
  }
  param = param + V(c.neg_step_size) * exp_avg / denom;
}

// The statistics of what update_element observed are in stats_accumulate.h (contribute).

// ---- update rules --------------------------------------------------------------------------------
// The kernels' harnesses (CPU: cpu/adam_kernel_isa.cpp, the (tensor, chunk) work list and the
// per-ISA vector loop; CUDA: cuda/adam_kernel.cuh, the multi-tensor launcher and the two-stage
// reduction) are templated on a *rule*: the per-element update of one optimizer, which declares the
// state tensors it keeps per parameter and tells the shared statistics (stats_accumulate.h) what it
// observed. The harnesses never name a state: they load state slots 0 .. kNumStates-1 from the
// pointers in ParameterPointers::state (kernel_tensor.h), prefetch them, hand their values to the
// rule as an array and store them back. A rule provides
//   kNumStates                      how many state tensors it uses (<= kMaxStates), in a fixed
//                                   order that its glue fills ParameterPointers::state in;
//   kNumRequiredStates              the first ones, always present. The rest are optional
//                                   (amsgrad's max_exp_avg_sq): a null pointer when absent, and the
//                                   CPU harness then neither loads nor stores it, and its slot holds
//                                   an unspecified value the rule must not read. (Required slots
//                                   are loaded without a check, which keeps the CPU loop as tight
//                                   as a hand-written one.) The CUDA rules are instantiated per
//                                   option (amsgrad or not), so there kNumStates counts the states
//                                   that instantiation uses and all of them are required;
//   kFirstMomentState               the slot the statistics read as the first moment m_t (the
//                                   momentum-like state, after the update), or -1 for a rule
//                                   without one (the statistics then see 0);
//   Coefficients<O>                 the per-tensor step constants in the compute type O, made by the
//                                   family's glue on the host (CPU) or by the rule on the device;
//   update<kTorchScalarTail>(c, param, grad, state, second_moment, denom)
//                                   one element or SIMD vector: param and state[0 .. kNumStates-1]
//                                   (`V (&state)[kMaxStates]`) updated in place; out the moment in
//                                   the denominator and the step's divisor (kTorchScalarTail: the
//                                   rounding of torch's scalar remainder loop, for rules that match
//                                   a torch CPU kernel);
//   denominator(c, second_moment)   the divisor recomputed from a stored (rounded) moment, so that
//                                   reduced-precision statistics describe the stored state;
//   step_numerator(c)               c of the effective step size c / denom.
// A new family also adds one line where the harness picks the rule at run time: a case of
// process_items (cpu/adam_kernel_isa.cpp) and of launch_update (cuda/adam_kernel.cuh), which is
// what instantiates the harness with it.
template <Algorithm algo>
struct AdamRule {
  // AdamState: exp_avg, the second moment (exp_avg_sq or exp_inf), max_exp_avg_sq (amsgrad only;
  // Adamax has no amsgrad variant).
  static constexpr int kNumStates = algo == Algorithm::kAdamax ? AdamState::kSecondMoment + 1 : AdamState::kCount;
  static constexpr int kNumRequiredStates = AdamState::kSecondMoment + 1;
  static constexpr int kFirstMomentState = AdamState::kExpAvg;

  template <class O>
  using Coefficients = ElementCoefficients<O>;

  template <bool kTorchScalarTail, class V, class O>
  static IA_HOST_DEVICE void update(const Coefficients<O>& c, V& param, const V& grad, V (&state)[kMaxStates],
                                    V& second_moment, V& denom) {
    update_element<algo, kTorchScalarTail>(param, grad, state[AdamState::kExpAvg], state[AdamState::kSecondMoment],
                                           state[AdamState::kMaxSecondMoment], c, second_moment, denom);
  }

  template <class V, class O>
  static IA_HOST_DEVICE V denominator(const Coefficients<O>& c, const V& second_moment) {
    if constexpr (algo == Algorithm::kAdamax) {
      return second_moment;
    } else {
      return (ia_sqrt(second_moment) / V(c.bias_correction2_sqrt)) + V(c.eps);
    }
  }

  template <class O>
  static IA_HOST_DEVICE O step_numerator(const Coefficients<O>& c) { return c.step_size; }
};

#ifdef CPU_CAPABILITY
}  // inline namespace CPU_CAPABILITY
#endif

#if defined(__CUDACC__)
// ---- CUDA only: torch.optim.Adam(fused=True)'s CUDA arithmetic for Adam and AdamW ----------------
//
// torch's CUDA kernel (aten/src/ATen/native/cuda/fused_adam_utils.cuh) does not compute what its CPU
// kernel computes: no lerp, no host-side double scalars, and its form changed between releases.
// The CUDA kernel (csrc/cuda/) uses the formulas below for Adam and AdamW so that parameters and
// state match torch's fused CUDA step bitwise; Adamax has no torch fused kernel and keeps the
// shared formulas above (update_element), with its coefficients computed on the device.
//
// IA_TORCH_CUDA_ADAM_FORM selects torch's form; setup.py (torch_cuda_adam_form) reads it off the
// installed torch's fused_adam_utils.cuh:
//   1  scalars in double: moments as fma(β, m, (1-β)·g) in double rounded to the compute type,
//      bias corrections 1 - pow(β, t) in double (torch before pytorch PRs 173224/173227, early
//      2026);
//   2  everything in the compute type ("opmath"): scalars rounded once, pow(float, float) bias
//      corrections, the moments as fma(β, m, fma(-β, g, g)) (after those PRs; torch 2.13 has it).
// Every operation is a correctly rounded intrinsic (__fmul_rn, __fmaf_rn, ...), which the compiler
// never contracts or reorders, so the statistics code cannot change the update. Where torch's
// source leaves a multiply-add to nvcc's contraction (its default --fmad=true), the form written
// here is the one nvcc 13.0 emits for torch's expression on sm_90 (read off the SASS of a replica
// of those expressions). The bias corrections call the same pow builtin as torch (::pow), which
// gives the same bits when both are built by the same nvcc version with default flags.
#ifndef IA_TORCH_CUDA_ADAM_FORM
#define IA_TORCH_CUDA_ADAM_FORM 2
#endif
#if IA_TORCH_CUDA_ADAM_FORM != 1 && IA_TORCH_CUDA_ADAM_FORM != 2
#error "IA_TORCH_CUDA_ADAM_FORM must be 1 or 2"
#endif

namespace torch_cuda {

__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float rn_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rn_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double rn_sqrt(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ double rn_fma(double a, double b, double c) { return __fma_rn(a, b, c); }

// The scalars of one tensor's step; O is the compute type (float for fp32/bf16/fp16, double for
// fp64), `step` the step number after this step's increment, lr already read from lr_tensor.
template <class O>
struct AdamCoefficients {
#if IA_TORCH_CUDA_ADAM_FORM == 1
  double beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, lr_weight_decay, eps;
#else
  O beta1, beta2, weight_decay, lr_weight_decay, eps;
#endif
  O bias_correction2_sqrt;
  O step_size;  // lr / (1 - beta1^t), as torch rounds it; also the numerator of eff_lr
  bool has_weight_decay;
};

template <class O>
__device__ __forceinline__ AdamCoefficients<O> make_adam_coefficients(double lr, double beta1, double beta2,
                                                                      double weight_decay, double eps, float step) {
  AdamCoefficients<O> c;
#if IA_TORCH_CUDA_ADAM_FORM == 1
  c.beta1 = beta1;
  c.one_minus_beta1 = rn_sub(1.0, beta1);
  c.beta2 = beta2;
  c.one_minus_beta2 = rn_sub(1.0, beta2);
  c.weight_decay = weight_decay;
  c.lr_weight_decay = rn_mul(lr, weight_decay);
  c.eps = eps;
  // torch: 1 - pow(double β, float t) in double, passed on as the compute type.
  const O bias_correction1 = static_cast<O>(rn_sub(1.0, ::pow(beta1, static_cast<double>(step))));
  c.bias_correction2_sqrt = static_cast<O>(rn_sqrt(rn_sub(1.0, ::pow(beta2, static_cast<double>(step)))));
  c.step_size = static_cast<O>(rn_div(lr, static_cast<double>(bias_correction1)));
  c.has_weight_decay = weight_decay != 0;
#else
  const O lr_o = static_cast<O>(lr);
  c.beta1 = static_cast<O>(beta1);
  c.beta2 = static_cast<O>(beta2);
  c.weight_decay = static_cast<O>(weight_decay);
  c.lr_weight_decay = rn_mul(lr_o, c.weight_decay);
  c.eps = static_cast<O>(eps);
  const O t = static_cast<O>(step);
  const O bias_correction1 = rn_sub(O(1), ::pow(c.beta1, t));  // ::pow(float, float) is powf
  c.bias_correction2_sqrt = rn_sqrt(rn_sub(O(1), ::pow(c.beta2, t)));
  c.step_size = rn_div(lr_o, bias_correction1);
  c.has_weight_decay = c.weight_decay != O(0);
#endif
  return c;
}

// One element of Adam (algo kAdam: L2 weight decay) or AdamW. `grad` is the gradient after AMP
// unscaling (maximize and weight decay are applied here); `moment` and `denom` are out-values for
// the statistics, as in update_element.
template <Algorithm algo, bool amsgrad, class O>
__device__ __forceinline__ void adam_update(O& param, O grad, O& exp_avg, O& exp_avg_sq, O& max_exp_avg_sq,
                                            const AdamCoefficients<O>& c, bool maximize, O& moment, O& denom) {
  static_assert(algo != Algorithm::kAdamax, "Adamax uses update_element");
  if (maximize) grad = -grad;
#if IA_TORCH_CUDA_ADAM_FORM == 1
  using D = double;
  if (c.has_weight_decay) {
    if constexpr (algo == Algorithm::kAdamW) {  // param -= lr * wd * param, contracted
      param = static_cast<O>(rn_fma(D(param), -c.lr_weight_decay, D(param)));
    } else {  // grad += param * wd, contracted
      grad = static_cast<O>(rn_fma(D(param), c.weight_decay, D(grad)));
    }
  }
  // beta1 * m + (1 - beta1) * g and beta2 * v + (1 - beta2) * g * g in double; nvcc fuses the first
  // product into the addition.
  exp_avg = static_cast<O>(rn_fma(c.beta1, D(exp_avg), rn_mul(c.one_minus_beta1, D(grad))));
  exp_avg_sq = static_cast<O>(rn_fma(c.beta2, D(exp_avg_sq), rn_mul(rn_mul(c.one_minus_beta2, D(grad)), D(grad))));
#else
  if (c.has_weight_decay) {
    if constexpr (algo == Algorithm::kAdamW) {  // param -= lr * wd * param, contracted
      param = rn_fma(param, -c.lr_weight_decay, param);
    } else {  // grad += param * wd, contracted
      grad = rn_fma(param, c.weight_decay, grad);
    }
  }
  exp_avg = rn_fma(c.beta1, exp_avg, rn_fma(-c.beta1, grad, grad));
  const O grad_sq = rn_mul(grad, grad);
  exp_avg_sq = rn_fma(c.beta2, exp_avg_sq, rn_fma(-c.beta2, grad_sq, grad_sq));
#endif
  if constexpr (amsgrad) {
    max_exp_avg_sq = max_exp_avg_sq < exp_avg_sq ? exp_avg_sq : max_exp_avg_sq;  // std::max(max, v)
    moment = max_exp_avg_sq;
  } else {
    moment = exp_avg_sq;
  }
#if IA_TORCH_CUDA_ADAM_FORM == 1
  denom = static_cast<O>(rn_add(D(rn_div(rn_sqrt(moment), c.bias_correction2_sqrt)), c.eps));
#else
  denom = rn_add(rn_div(rn_sqrt(moment), c.bias_correction2_sqrt), c.eps);
#endif
  param = rn_sub(param, rn_div(rn_mul(c.step_size, exp_avg), denom));
}

}  // namespace torch_cuda
#endif  // __CUDACC__

}  // namespace instrumented_adam
