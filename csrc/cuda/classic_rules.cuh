// The CUDA rules of SGD, RMSprop and Adagrad on the Adam kernel's harness (adam_kernel.cuh:
// update_kernel, the block reduction and the second stage are shared; only the per-element rule
// differs), and their update launch. Included by classic_kernel_<type>.cu only, one storage type
// per translation unit. Design notes and parity expectations: docs/cuda.md, "SGD, RMSprop, Adagrad".
//
// Numerics. torch's CUDA kernels do not compute what its CPU kernels compute, so the CPU rules of
// classic_rules.h (which follow torch's CPU kernels) are not what runs here:
//   - SGD and Adagrad follow torch.optim.SGD/Adagrad(fused=True) on CUDA (aten/src/ATen/native/
//     cuda/FusedSgdKernel.cu, fused_adagrad_utils.cuh). Adagrad's hyperparameters are C++
//     doubles, so in an fp32 (or bf16/fp16) step every expression that meets one is evaluated in
//     double and rounded to fp32 where torch assigns it to an fp32 variable; the rest is fp32.
//     SGD was the same until torch moved it to the compute type with fused Adam (both forms
//     below, selected by IA_TORCH_CUDA_ADAM_FORM). Where torch leaves a multiply-add to nvcc's
//     contraction, the form written here is the one nvcc 13.0 emits
//     for torch's expressions on sm_90 (read off the PTX of a replica of sgd_math / adagrad_math,
//     and for the one mul+sub pair that NVVM leaves to ptxas, p -= lr * g, by comparing ptxas'
//     code for the PTX as emitted with the explicit fma and the explicitly unfused forms: it is the
//     fma). Adagrad's corrected lr is computed on the device from the device step, as torch does:
//     lr / fma(float(step - 1), lr_decay, 1) in double.
//   - RMSprop: torch has no fused kernel. The rule is its single-tensor path's sequence of ATen
//     ops (mul_, addcmul_, lerp_, addcmul, sqrt, add_, addcdiv_ / add_(alpha)) as torch's CUDA
//     kernels compute each (not as its CPU kernels do: CUDA's addcmul / addcdiv are
//     fma(value, t1 op t2, input), DeviceAddCmulCdiv.cuh, shared by the foreach kernels), each a
//     correctly rounded intrinsic in the compute type, with IEEE sqrt.
// Every operation is a correctly rounded intrinsic (torch_cuda::rn_*, adam_math.h): nvcc can
// neither contract nor reorder it, so the statistics code cannot change the update.
#pragma once

#include "../classic_rules.h"
#include "adam_kernel.cuh"

namespace instrumented_adam::cuda::detail {

using torch_cuda::rn_add;
using torch_cuda::rn_div;
using torch_cuda::rn_fma;
using torch_cuda::rn_mul;
using torch_cuda::rn_sqrt;
using torch_cuda::rn_sub;

// ---- SGD: torch.optim.SGD(fused=True)'s CUDA arithmetic (sgd_math of FusedSgdKernel.cu) ----
// torch changed it together with fused Adam (pytorch PR 173227, "Use opmath_t and not double
// compute in fused SGD and Adam"), so the form follows IA_TORCH_CUDA_ADAM_FORM (adam_math.h;
// setup.py reads it off the installed torch's fused_adam_utils.cuh: the same PR changed both):
//   form 1 (double hyperparameters): g ← −g (maximize); g ← fl(fma_D(θ, λ, g)); b_D ← g (first
//     step) or fma_D(1 − τ, g, μ·b); b ← fl(b_D); g ← fl(fma_D(b_D, μ, g)) (Nesterov, b before its
//     rounding) or fl(b_D); θ ← fl(fma_D(−g, lr, θ)). D: in double; fl: rounded to the compute type.
//   form 2 (hyperparameters rounded to the compute type, everything in it): g ← −g;
//     g ← fma(θ, λ, g); b ← g or fma(1 − τ, g, μ·b); g ← fma(b, μ, g) or b; θ ← fma(−g, lr, θ).
// (Both read off the PTX of replicas of each sgd_math compiled by nvcc 13.0 for sm_90; θ − lr·g
// is left to ptxas as a mul and a sub, which it fuses: the cubin of the PTX as emitted is
// byte-identical to that of the explicit fma.)
// State slot 0: momentum_buffer (kMomentum only). Statistics: first moment b (0 without
// momentum), no second moment, effective step size lr (denominator 1).
template <bool kMomentum, class O>
struct SgdCuda {
#if IA_TORCH_CUDA_ADAM_FORM == 1
  using S = double;  // the type torch's sgd_math computes the hyperparameter terms in
#else
  using S = O;
#endif
  S lr, weight_decay, momentum, one_minus_dampening;
  bool has_weight_decay, nesterov, maximize, first_step;
  __device__ __forceinline__ SgdCuda(const KernelScalars& s, double lr_, float /*step*/, int32_t flags)
      : lr(static_cast<S>(lr_)),  // lr_ptr ? *lr_ptr : lr (a float tensor is exact in either type)
        weight_decay(static_cast<S>(s.weight_decay)),
        momentum(static_cast<S>(s.momentum)),
        one_minus_dampening(rn_sub(S(1), static_cast<S>(s.dampening))),  // (1 - dampening) in S
        has_weight_decay(static_cast<S>(s.weight_decay) != S(0)),
        nesterov(s.nesterov),
        maximize(s.maximize),
        first_step((flags & kFlagFirstStep) != 0) {}
  __device__ __forceinline__ void apply(O& p, O g, O (&state)[kMaxStates], O& moment, O& denom) const {
    if (maximize) g = -g;  // g *= -1.0: exact
    if (has_weight_decay) g = static_cast<O>(rn_fma(S(p), weight_decay, S(g)));  // g += wd * p
    if constexpr (kMomentum) {
      O& buf = state[SgdState::kMomentumBuffer];
      // const auto momentum_buffer = is_first_step ? g : momentum * buf + (1 - dampening) * g;
      // (of type S either way: the ternary's common type)
      const S b = first_step ? S(g) : rn_fma(one_minus_dampening, S(g), rn_mul(momentum, S(buf)));
      buf = static_cast<O>(b);
      g = nesterov ? static_cast<O>(rn_fma(b, momentum, S(g))) : static_cast<O>(b);
    }
    p = static_cast<O>(rn_fma(-S(g), lr, S(p)));  // p -= lr * g (the fma ptxas makes of it)
    moment = O(0);
    denom = O(1);
  }
  __device__ __forceinline__ O step_size() const { return static_cast<O>(lr); }
};

template <bool kMomentum>
struct SgdCudaRule {
  static constexpr int kNumStates = kMomentum ? SgdState::kCount : 0;
  static constexpr int kNumRequiredStates = kNumStates;
  static constexpr int kFirstMomentState = kMomentum ? SgdState::kMomentumBuffer : -1;
  static constexpr bool kHasStep = false;  // torch's SGD keeps no step counter
  template <class O>
  using For = SgdCuda<kMomentum, O>;
};

// ---- Adagrad: torch.optim.Adagrad(fused=True)'s CUDA arithmetic (adagrad_math) ----
//   clr = lr / fma(float(t − 1), lr_decay, 1) in double (t the step after its increment);
//   g ← −g; g ← fl(fma(θ, λ, g)) in double; s ← fma(g, g, s) in the compute type;
//   θ ← fl(θ − (clr·g) / (√s + ε)) in double, √s the compute type's sqrt.
// State slot 0: sum. Statistics: no first moment, second moment s, effective step size
// clr / (√s + ε) (the double denominator rounded to the compute type).
template <class O>
struct AdagradCuda {
  double clr, weight_decay, eps;
  bool has_weight_decay, maximize;
  __device__ __forceinline__ AdagradCuda(const KernelScalars& s, double lr, float step, int32_t /*flags*/)
      : clr(rn_div(lr, rn_fma(static_cast<double>(torch_cuda::rn_sub(step, 1.0f)), s.lr_decay, 1.0))),
        weight_decay(s.weight_decay),
        eps(s.eps),
        has_weight_decay(s.weight_decay != 0),
        maximize(s.maximize) {}
  __device__ __forceinline__ void apply(O& p, O g, O (&state)[kMaxStates], O& moment, O& denom) const {
    using D = double;
    if (maximize) g = -g;
    if (has_weight_decay) g = static_cast<O>(rn_fma(D(p), weight_decay, D(g)));  // grad += param * wd
    O& sum = state[AdagradState::kSum];
    sum = rn_fma(g, g, sum);                                   // state_sum += grad * grad
    const D d = rn_add(D(rn_sqrt(sum)), eps);                  // std::sqrt(state_sum) + eps
    p = static_cast<O>(rn_sub(D(p), rn_div(rn_mul(clr, D(g)), d)));  // param - clr * grad / d
    moment = sum;
    denom = static_cast<O>(d);
  }
  __device__ __forceinline__ O step_size() const { return static_cast<O>(clr); }
};

struct AdagradCudaRule {
  static constexpr int kNumStates = AdagradState::kCount;
  static constexpr int kNumRequiredStates = kNumStates;
  static constexpr int kFirstMomentState = -1;
  static constexpr bool kHasStep = true;
  template <class O>
  using For = AdagradCuda<O>;
};

// ---- RMSprop: torch's single-tensor path (the ops of RmspropRule, classic_rules.h) as torch's
// CUDA kernels compute them ----
//   g ← −g; g ← fma(λ, θ, g) (add(alpha)); v ← v·α; v ← fma(1 − α, g·g, v) (addcmul_, value
//   1 − α; fma(g, g, v) when that value is 1); centered: ḡ ← lerp(ḡ, g, 1 − α) (fma from the
//   nearer end), m ← v − ḡ·ḡ (addcmul, value −1), else m ← v; d ← √m + ε; momentum: b ← b·μ + g/d
//   (addcdiv_, value 1: input + t1/t2), θ ← fma(−lr, b, θ); else θ ← fma(−lr, g/d, θ) (addcdiv_).
//   All in the compute type; pytorch's DeviceAddCmulCdiv.cuh (torch 2.13) is where addcmul and
//   addcdiv are spelled out, the rest are nvcc's contractions of `a + alpha * b`.
// The state tensors present are packed into consecutive slots (the CUDA harness loads slots
// 0 .. kNumStates−1): square_avg, then momentum_buffer (kMomentum), then grad_avg (kCentered).
template <bool kMomentum, bool kCentered, class O>
struct RmspropCuda {
  static constexpr int kBufSlot = 1;
  static constexpr int kGradAvgSlot = kMomentum ? 2 : 1;
  O lr, neg_lr, weight_decay, momentum, eps, alpha, one_minus_alpha, lerp_coeff;
  bool lerp_from_grad, has_weight_decay, maximize, unit_sq_weight;
  __device__ __forceinline__ RmspropCuda(const KernelScalars& s, double lr_, float /*step*/, int32_t /*flags*/)
      : lr(static_cast<O>(lr_)),
        neg_lr(static_cast<O>(-lr_)),
        weight_decay(static_cast<O>(s.weight_decay)),
        momentum(static_cast<O>(s.momentum)),
        eps(static_cast<O>(s.eps)),
        alpha(static_cast<O>(s.alpha)),
        one_minus_alpha(static_cast<O>(1 - s.alpha)),
        has_weight_decay(s.weight_decay != 0),
        maximize(s.maximize),
        unit_sq_weight(one_minus_alpha == O(1)) {
    // grad_avg.lerp_(grad, 1 - alpha): torch's lerp rounds the weight, then picks its end.
    const O weight = static_cast<O>(1 - s.alpha);
    lerp_from_grad = !((weight < O(0) ? -weight : weight) < O(0.5));
    lerp_coeff = lerp_from_grad ? rn_sub(weight, O(1)) : weight;
  }
  __device__ __forceinline__ void apply(O& p, O g, O (&state)[kMaxStates], O& moment, O& denom) const {
    if (maximize) g = -g;
    if (has_weight_decay) g = rn_fma(weight_decay, p, g);  // grad.add(param, alpha=wd)
    O& v = state[0];
    v = rn_mul(v, alpha);  // mul_(alpha)
    // addcmul_(g, g, value=1-alpha): fma(value, g*g, v), or fma(g, g, v) for value 1
    if (unit_sq_weight) {
      v = rn_fma(g, g, v);
    } else {
      v = rn_fma(one_minus_alpha, rn_mul(g, g), v);
    }
    O m = v;
    if constexpr (kCentered) {
      O& ga = state[kGradAvgSlot];
      ga = rn_fma(lerp_coeff, rn_sub(g, ga), lerp_from_grad ? g : ga);  // lerp_(g, 1-alpha)
      m = rn_sub(v, rn_mul(ga, ga));  // addcmul(ga, ga, value=-1): fma(-1, ga*ga, v)
    }
    const O d = rn_add(rn_sqrt(m), eps);  // sqrt, add_(eps)
    const O q = rn_div(g, d);             // the t1/t2 of either addcdiv_
    if constexpr (kMomentum) {
      O& buf = state[kBufSlot];
      buf = rn_add(rn_mul(buf, momentum), q);  // mul_(momentum).addcdiv_(g, d): value 1, input + t1/t2
      p = rn_fma(neg_lr, buf, p);              // add_(buf, alpha=-lr)
    } else {
      p = rn_fma(neg_lr, q, p);  // addcdiv_(g, d, value=-lr): fma(value, g/d, p)
    }
    moment = m;
    denom = d;
  }
  __device__ __forceinline__ O step_size() const { return lr; }
};

template <bool kMomentum, bool kCentered>
struct RmspropCudaRule {
  static constexpr int kNumStates = 1 + (kMomentum ? 1 : 0) + (kCentered ? 1 : 0);
  static constexpr int kNumRequiredStates = kNumStates;
  static constexpr int kFirstMomentState = kMomentum ? 1 : -1;
  static constexpr bool kHasStep = true;
  template <class O>
  using For = RmspropCuda<kMomentum, kCentered, O>;
};

// ---- host side: one update launch of a classic rule (the classic ops take no histograms and no
// compact previous-epoch steps: modes kOff, kOn, kOnPrev) ----
template <class T, class R>
void launch_classic_typed(Stats mode, const UpdateLaunch& launch, int64_t blocks, const KernelScalars& s,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (mode) {
    case Stats::kOff: update_kernel<T, R, Stats::kOff><<<grid, kThreads, 0, stream>>>(launch, s); break;
    case Stats::kOn: update_kernel<T, R, Stats::kOn><<<grid, kThreads, 0, stream>>>(launch, s); break;
    case Stats::kOnPrev: update_kernel<T, R, Stats::kOnPrev><<<grid, kThreads, 0, stream>>>(launch, s); break;
    default: break;  // refused by the glue (classic_cuda.cpp) before anything is launched
  }
}

template <class T>
void launch_classic_update(Algorithm algo, int variant, Stats mode, const UpdateLaunch& launch, int64_t blocks,
                           const KernelScalars& s, cudaStream_t stream) {
  const bool momentum = (variant & kVariantMomentum) != 0;
  const bool centered = (variant & kVariantCentered) != 0;
  switch (algo) {
    case Algorithm::kSgd:
      if (momentum) launch_classic_typed<T, SgdCudaRule<true>>(mode, launch, blocks, s, stream);
      else launch_classic_typed<T, SgdCudaRule<false>>(mode, launch, blocks, s, stream);
      break;
    case Algorithm::kRmsprop:
      if (momentum && centered) launch_classic_typed<T, RmspropCudaRule<true, true>>(mode, launch, blocks, s, stream);
      else if (momentum) launch_classic_typed<T, RmspropCudaRule<true, false>>(mode, launch, blocks, s, stream);
      else if (centered) launch_classic_typed<T, RmspropCudaRule<false, true>>(mode, launch, blocks, s, stream);
      else launch_classic_typed<T, RmspropCudaRule<false, false>>(mode, launch, blocks, s, stream);
      break;
    case Algorithm::kAdagrad: launch_classic_typed<T, AdagradCudaRule>(mode, launch, blocks, s, stream); break;
    default: break;  // the Adam family: launch_update
  }
}

}  // namespace instrumented_adam::cuda::detail
