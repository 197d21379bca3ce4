// Per-element update rules of SGD (momentum, dampening, Nesterov), RMSprop (centered, momentum)
// and Adagrad, on the same harness as Adam (the rule concept is described above AdamRule in
// adam_math.h). Host/device inline and templated on the value type V, like adam_math.h.
//
// Numerics, CPU:
//   - SGD and Adagrad follow torch's fused CPU kernels (aten/src/ATen/native/cpu/FusedSGDKernel.cpp,
//     FusedAdagradKernel.cpp) operation for operation; where torch's source writes `a*b + c` and
//     leaves the contraction to its compiler (GCC, -ffp-contract=fast by default), the form here is
//     the one measured against torch 2.13 (tests/test_classic_parity.py), written as an explicit
//     ia_fmadd (the kernels are compiled with -ffp-contract=off).
//   - RMSprop follows torch's single-tensor path (it has no fused kernel): mul_, addcmul_, lerp_,
//     addcmul, sqrt, add_, addcdiv_ / add_(alpha) as ATen's CPU kernels compute them.
//   - Reduced types (bf16/fp16) compute in fp32 registers. torch's fused kernels round some
//     constants to the storage type in their vector body (`fVec(scalar_t(eps))`) but not in their
//     scalar remainder loop (`opmath_t(eps)`); Adagrad reproduces both (kTorchScalarTail). torch
//     2.13's fused SGD for bf16/fp16 leaves the parameters untouched in most elements (its vector
//     body never stores them and reads the momentum buffer as fp32: a torch bug,
//     tests/test_classic_parity.py shows it), so SGD's reduced types compute what its fp32 rule
//     computes, on the stored values, rounded once on store.
#pragma once

#include <type_traits>

#include "adam_math.h"

namespace instrumented_adam {

// The state tensors of each classic rule, in the order the rule declares them and the glue
// (cpu/classic_cpu.cpp) fills ParameterPointers::state.
struct SgdState {
  enum : int { kMomentumBuffer = 0, kCount = 1 };  // momentum_buffer (absent when momentum == 0)
};
struct RmspropState {
  // square_avg v (always); momentum_buffer (momentum > 0); grad_avg ḡ (centered)
  enum : int { kSquareAvg = 0, kMomentumBuffer = 1, kGradAvg = 2, kCount = 3 };
};
struct AdagradState {
  enum : int { kSum = 0, kCount = 1 };  // the accumulated Σ g²
};
static_assert(RmspropState::kCount <= kMaxStates, "kMaxStates must hold RMSprop's state");

// The per-tensor constants of one step of a classic rule, in the compute type O, made on the host
// by the glue (one struct for the three families; each uses its fields).
template <class O>
struct ClassicCoefficients {
  O lr;             // SGD, RMSprop: lr; Adagrad: clr = lr / (1 + (t − 1)·lr_decay). The eff_lr numerator
  O neg_lr;         // −lr, rounded after negation (torch passes Vec(scalar_t(-lr)) / value=-lr)
  O weight_decay;   // as the vector body rounds it
  O momentum;       // SGD, RMSprop
  O one_minus_dampening;  // SGD
  O eps;            // RMSprop, Adagrad
  O alpha;          // RMSprop's smoothing constant
  O one_minus_alpha;
  O lerp_coeff;     // centered RMSprop: grad_avg.lerp_(grad, 1 − alpha), as torch's lerp
  bool lerp_from_grad;
  // torch's scalar remainder loop rounds its constants to the compute type only (bf16/fp16
  // parameters; equal to the fields above for fp32/fp64).
  O tail_lr;
  O tail_weight_decay;
  O tail_eps;
  bool has_weight_decay;
  bool maximize;
  bool has_momentum;  // SGD: momentum != 0; RMSprop: momentum > 0
  bool nesterov;      // SGD
  bool first_step;    // SGD: the momentum buffer does not exist yet: it becomes the gradient
  bool centered;      // RMSprop
  // RMSprop: torch's CPU sqrt where it is not IEEE's (MKL's vsSqrt/vdSqrt, ~1 ulp: torch.sqrt of a
  // float32/float64 CPU tensor calls it), or null for the correctly rounded sqrt.
  void (*cpu_sqrt)(int n, const O* in, O* out);
};

// sqrt(x) as torch's CPU sqrt computes it (c.cpu_sqrt; per element, independent of how many
// elements one call gets: measured), or the IEEE sqrt where it is null (and on CUDA).
template <class V, class O>
IA_HOST_DEVICE V torch_sqrt(const ClassicCoefficients<O>& c, const V& x) {
#if !defined(__CUDA_ARCH__)
  if (c.cpu_sqrt != nullptr) {
    if constexpr (std::is_same_v<V, O>) {
      O out;
      c.cpu_sqrt(1, &x, &out);
      return out;
    } else {
      alignas(64) O in[V::size()];
      alignas(64) O out[V::size()];
      x.store(in);
      c.cpu_sqrt(V::size(), in, out);
      return V::loadu(out);
    }
  }
#endif
  return ia_sqrt(x);
}

#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// SGD with momentum, dampening, Nesterov, weight decay and maximize (torch.optim.SGD(fused=True)).
//   g ← −g (maximize); g ← g + λθ; b ← g (first step) or μ·b + (1 − τ)·g; g ← g + μ·b (Nesterov)
//   or b; θ ← θ − lr·g. Statistics: first moment b (0 without momentum), no second moment, the
//   effective step size lr (denominator 1).
struct SgdRule {
  static constexpr int kNumStates = SgdState::kCount;
  static constexpr int kNumRequiredStates = 0;  // no buffer without momentum
  static constexpr int kFirstMomentState = SgdState::kMomentumBuffer;
  // torch's remainder loop is auto-vectorised for its first lanes (the vector body's rounding of
  // the momentum update there) and scalar for the rest, as in fused Adam (measured: tail lanes
  // 0-7 of fp32 round as the body, 8-14 as the scalar form below).
  static constexpr bool kTorchVectorisedTail = true;

  template <class O>
  using Coefficients = ClassicCoefficients<O>;

  template <bool kTorchScalarTail, class V, class O>
  static IA_HOST_DEVICE void update(const Coefficients<O>& c, V& param, const V& grad_in, V (&state)[kMaxStates],
                                    V& second_moment, V& denom) {
    V grad = grad_in;
    if (c.maximize) grad = grad * V(O(-1.0));
    // SGD's constants are rounded to the compute type only (bf16/fp16: as torch's scalar loop;
    // its vector body is broken there, see the top of this file).
    if (c.has_weight_decay) grad = ia_fmadd(param, V(c.weight_decay), grad);
    V& buf = state[SgdState::kMomentumBuffer];
    if (c.has_momentum) {
      if (c.first_step) {
        buf = grad;
      } else if (kTorchScalarTail) {
        // buf·μ + g·(1 − τ): GCC fuses the first product into the sum in torch's scalar loop
        buf = ia_fmadd(buf, V(c.momentum), grad * V(c.one_minus_dampening));
      } else {
        buf = ia_fmadd(V(c.one_minus_dampening), grad, buf * V(c.momentum));  // torch: explicit fmadd
      }
      grad = c.nesterov ? ia_fmadd(buf, V(c.momentum), grad) : buf;
    } else {
      buf = V(O(0));  // the statistics' first moment; the absent slot is never stored
    }
    param = ia_fmadd(grad, V(c.neg_lr), param);  // θ + g·(−lr), contracted by GCC in both loops
    second_moment = V(O(0));
    denom = V(O(1));
  }

  template <class V, class O>
  static IA_HOST_DEVICE V denominator(const Coefficients<O>&, const V&) { return V(O(1)); }

  template <class O>
  static IA_HOST_DEVICE O step_numerator(const Coefficients<O>& c) { return c.tail_lr; }
};

// Adagrad with lr_decay, weight decay and maximize (torch.optim.Adagrad(fused=True)).
//   g ← −g; g ← g + λθ; s ← s + g²; θ ← θ − clr·g / (√s + ε). Statistics: no first moment, second
//   moment s, effective step size clr / (√s + ε).
struct AdagradRule {
  static constexpr int kNumStates = AdagradState::kCount;
  static constexpr int kNumRequiredStates = AdagradState::kCount;
  static constexpr int kFirstMomentState = -1;
  // torch's remainder loop is auto-vectorised for its first lanes, and those use the vector body's
  // (bf16/fp16-rounded) constants; the scalar rest uses the compute-type ones (measured, bf16).
  static constexpr bool kTorchVectorisedTail = true;

  template <class O>
  using Coefficients = ClassicCoefficients<O>;

  template <bool kTorchScalarTail, class V, class O>
  static IA_HOST_DEVICE void update(const Coefficients<O>& c, V& param, const V& grad_in, V (&state)[kMaxStates],
                                    V& second_moment, V& denom) {
    V grad = grad_in;
    if (c.maximize) grad = grad * V(O(-1.0));
    if (c.has_weight_decay) grad = ia_fmadd(param, V(kTorchScalarTail ? c.tail_weight_decay : c.weight_decay), grad);
    V& sum = state[AdagradState::kSum];
    sum = ia_fmadd(grad, grad, sum);
    second_moment = sum;
    denom = ia_sqrt(sum) + V(kTorchScalarTail ? c.tail_eps : c.eps);
    param = param - V(kTorchScalarTail ? c.tail_lr : c.lr) * grad / denom;
  }

  template <class V, class O>
  static IA_HOST_DEVICE V denominator(const Coefficients<O>& c, const V& second_moment) {
    return ia_sqrt(second_moment) + V(c.eps);
  }

  template <class O>
  static IA_HOST_DEVICE O step_numerator(const Coefficients<O>& c) { return c.tail_lr; }
};

// RMSprop with alpha, eps, centered, momentum, weight decay and maximize (torch.optim.RMSprop's
// single-tensor path, one ATen op after the other).
//   g ← −g; g ← g + λθ; v ← α·v + (1 − α)·g²; centered: ḡ ← lerp(ḡ, g, 1 − α), d ← √(v − ḡ²) + ε,
//   else d ← √v + ε; momentum: b ← μ·b + g/d, θ ← θ − lr·b; else θ ← θ − lr·g/d.
// Statistics: first moment b (0 without momentum), second moment v (v − ḡ² when centered: the
// moment under the root), effective step size lr / d.
struct RmspropRule {
  static constexpr int kNumStates = RmspropState::kCount;
  static constexpr int kNumRequiredStates = RmspropState::kSquareAvg + 1;
  static constexpr int kFirstMomentState = RmspropState::kMomentumBuffer;
  static constexpr bool kTorchVectorisedTail = false;

  template <class O>
  using Coefficients = ClassicCoefficients<O>;

  template <bool kTorchScalarTail, class V, class O>
  static IA_HOST_DEVICE void update(const Coefficients<O>& c, V& param, const V& grad_in, V (&state)[kMaxStates],
                                    V& second_moment, V& denom) {
    V grad = grad_in;
    if (c.maximize) grad = grad * V(O(-1.0));
    if (c.has_weight_decay) grad = ia_fmadd(param, V(c.weight_decay), grad);  // grad.add(param, alpha=λ)
    V& v = state[RmspropState::kSquareAvg];
    v = v * V(c.alpha);                                        // mul_(alpha)
    v = ia_fmadd(V(c.one_minus_alpha) * grad, grad, v);         // addcmul_(g, g, value=1−α)
    if (c.centered) {
      V& ga = state[RmspropState::kGradAvg];
      ga = ia_fmadd(V(c.lerp_coeff), grad - ga, c.lerp_from_grad ? grad : ga);  // lerp_(g, 1−α)
      second_moment = ia_fmadd(V(O(0)) - ga, ga, v);           // addcmul(ḡ, ḡ, value=−1)
    } else {
      second_moment = v;
    }
    denom = torch_sqrt(c, second_moment) + V(c.eps);           // sqrt, add_(eps)
    V& buf = state[RmspropState::kMomentumBuffer];
    if (c.has_momentum) {
      buf = buf * V(c.momentum) + grad / denom;                // mul_(μ).addcdiv_(g, d)
      param = ia_fmadd(buf, V(c.neg_lr), param);               // add_(buf, alpha=−lr)
    } else {
      buf = V(O(0));
      param = param + V(c.neg_lr) * grad / denom;              // addcdiv_(g, d, value=−lr)
    }
  }

  template <class V, class O>
  static IA_HOST_DEVICE V denominator(const Coefficients<O>& c, const V& second_moment) {
    return ia_sqrt(second_moment) + V(c.eps);
  }

  template <class O>
  static IA_HOST_DEVICE O step_numerator(const Coefficients<O>& c) { return c.tail_lr; }
};

#ifdef CPU_CAPABILITY
}  // inline namespace CPU_CAPABILITY
#endif

}  // namespace instrumented_adam
