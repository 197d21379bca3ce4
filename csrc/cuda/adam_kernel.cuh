// The CUDA update kernel of instrumented_adam::adam_step and what it shares with the second stage.
// The templates are instantiated once per storage type in adam_kernel_<type>.cu (the compiles run
// in parallel); adam_launch.cu holds the second stage and the host side of the step.
// Raw pointers and CUDA runtime only (no torch headers): the glue is adam_cuda.cpp. Design notes,
// parity expectations and the commands a GPU session runs: docs/cuda.md.
//
//   update_kernel     one block per (tensor, chunk of kChunk elements). Each thread walks the chunk
//                     in 16-byte vectors (4 fp32, 8 bf16/fp16, 2 fp64 elements per load of each
//                     array), all loads of an iteration issued before the arithmetic; a scalar loop
//                     takes a tensor's tail and tensors whose pointers are not 16-byte aligned.
//                     Statistics (a template flag: off compiles to the plain update loop) are summed
//                     per thread in the compute type, then reduced over the block in double by a
//                     fixed shuffle tree into one partial row per block. No atomics anywhere.
//   finalize_kernel   one block per tensor: sums the tensor's partial rows in a fixed order into its
//                     float64 statistics row (zeros after a found_inf step) and advances its step.
//   steps_kernel      statistics off: only advances the step counters.
//
// The step counter is read on the device (step + 1, exactly as torch's _foreach_add_(steps, 1)) by
// every block and written back by the second stage, which runs after every update block on the
// stream; lr (lr_tensor), grad_scale and found_inf are read on the device too. Nothing is copied
// from or to the host and nothing is allocated here: the work list travels as kernel parameters and
// the partials buffer comes from the glue (torch's caching allocator), so a step can be captured in
// a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../histogram.h"
#include "../stats_accumulate.h"
#include "adam_cuda.h"

namespace instrumented_adam::cuda::detail {

// ---- storage types: loads convert exactly to the compute type O, stores round to nearest even ----
template <class T>
struct Traits;
template <>
struct Traits<float> {
  using O = float;
  static __device__ __forceinline__ O load(float x) { return x; }
  static __device__ __forceinline__ float store(O x) { return x; }
};
template <>
struct Traits<double> {
  using O = double;
  static __device__ __forceinline__ O load(double x) { return x; }
  static __device__ __forceinline__ double store(O x) { return x; }
};
template <>
struct Traits<__nv_bfloat16> {  // bf16 and fp16 compute in fp32 registers, as torch's kernels do
  using O = float;
  static __device__ __forceinline__ O load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(O x) { return __float2bfloat16_rn(x); }
};
template <>
struct Traits<__half> {
  using O = float;
  static __device__ __forceinline__ O load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(O x) { return __float2half_rn(x); }
};

// ---- the per-launch work list, passed by value as kernel parameters ----
// The arrays of one tensor: parameter, gradient, previous epoch's step, then the rule's state
// tensors kFirstState + 0 .. kFirstState + kMaxStates - 1 (in the order the rule declares them).
enum Array : int { kParam, kGrad, kPrev, kFirstState, kNumArrays = kFirstState + kMaxStates };

// Per-tensor flags of a launch (LaunchTensor::flags), read by the rules that need them.
enum TensorFlag : int32_t { kFlagFirstStep = 1 };  // SGD: the momentum buffer is new (it becomes g)

struct LaunchTensor {
  void* ptr[kNumArrays];  // unused arrays are null
  const float* step;    // null for a rule without a step counter (R::kHasStep false: SGD)
  int64_t numel;
  int64_t first_chunk;  // the tensor's chunk that its first block in this launch updates
  int64_t hist_row;     // the tensor's row of the histograms buffer (its statistics row)
  int32_t flags;        // TensorFlag bits
};

struct UpdateLaunch {
  int64_t partial_base;  // partial row of block 0; a launch's blocks take consecutive rows
  int32_t num_tensors;
  int32_t block_begin[kMaxTensorsPerLaunch + 1];  // first block of each tensor; [num_tensors] = grid
  LaunchTensor tensors[kMaxTensorsPerLaunch];
};

struct KernelScalars {
  double lr, beta1, beta2, weight_decay, eps;
  // The classic rules' options (classic_rules.cuh); unused by the Adam family.
  double momentum, dampening, alpha, lr_decay;
  bool nesterov;
  const void* lr_ptr;
  LrSource lr_source;
  const float* grad_scale;
  const float* found_inf;
  double* partials;
  unsigned long long* histograms;  // [rows][kNumHistograms][kHistBins] counts on histogram steps, else null
  bool maximize;
};

struct FinalizeTensor {
  float* step;
  int64_t partial_begin;
  int64_t num_partials;
  int64_t row;
};

struct FinalizeLaunch {
  int32_t num_tensors;
  FinalizeTensor tensors[kMaxFinalizePerLaunch];
};

struct StepsLaunch {
  int32_t num_tensors;
  float* steps[kMaxFinalizePerLaunch];
};

// CUDA 12.1+ takes up to 32764 bytes of kernel parameters (sm_70 and newer).
static_assert(sizeof(UpdateLaunch) + sizeof(KernelScalars) <= 32764, "update launch parameters too large");
static_assert(sizeof(FinalizeLaunch) + 3 * sizeof(void*) <= 32764, "finalize launch parameters too large");
static_assert(kChunk % (kThreads * 8) == 0, "a chunk must be a whole number of block-wide vector steps");
static_assert(kThreads % 32 == 0 && kFinalizeThreads % 32 == 0, "blocks must be whole warps");

// lr from the lr_tensor on the device (exactly: every source dtype converts to double exactly).
__device__ __forceinline__ double read_lr(const KernelScalars& s) {
  if (s.lr_ptr == nullptr) return s.lr;
  switch (s.lr_source) {
    case LrSource::kFloat: return static_cast<double>(*static_cast<const float*>(s.lr_ptr));
    case LrSource::kDouble: return *static_cast<const double*>(s.lr_ptr);
    case LrSource::kBFloat16: return static_cast<double>(__bfloat162float(*static_cast<const __nv_bfloat16*>(s.lr_ptr)));
    case LrSource::kHalf: return static_cast<double>(__half2float(*static_cast<const __half*>(s.lr_ptr)));
    default: return s.lr;
  }
}

// ---- the update rules ----
// Adam and AdamW: torch.optim.Adam(fused=True)'s CUDA arithmetic (adam_math.h, torch_cuda).
// `state` holds the AdamState slots (adam_math.h): exp_avg, the second moment, max_exp_avg_sq.
template <Algorithm algo, bool amsgrad, class O>
struct Rule {
  torch_cuda::AdamCoefficients<O> c;
  bool maximize;
  __device__ __forceinline__ Rule(const KernelScalars& s, double lr, float step, int32_t /*flags*/)
      : c(torch_cuda::make_adam_coefficients<O>(lr, s.beta1, s.beta2, s.weight_decay, s.eps, step)),
        maximize(s.maximize) {}
  __device__ __forceinline__ void apply(O& p, O g, O (&state)[kMaxStates], O& moment, O& denom) const {
    torch_cuda::adam_update<algo, amsgrad>(p, g, state[AdamState::kExpAvg], state[AdamState::kSecondMoment],
                                           state[AdamState::kMaxSecondMoment], c, maximize, moment, denom);
  }
  __device__ __forceinline__ O step_size() const { return c.step_size; }
};

// Adamax: torch has no fused kernel; the shared formulas (torch's single-tensor path, as on the
// CPU), with the coefficients computed on the device from the device step.
template <bool amsgrad, class O>
struct Rule<Algorithm::kAdamax, amsgrad, O> {
  ElementCoefficients<O> c;
  __device__ __forceinline__ Rule(const KernelScalars& s, double lr, float step, int32_t /*flags*/)
      : c(make_coefficients<O>(StepScalars{lr, s.beta1, s.beta2, s.eps, s.weight_decay, static_cast<double>(step)},
                               Algorithm::kAdamax, s.maximize, false)) {
    // With lr as a tensor torch's single-tensor Adamax computes the step size as a tensor operation
    // in lr's dtype: float(lr) / float(1 - beta1^t), rounded to bf16/fp16 for those (the CPU glue,
    // adamax_tensor_lr_step_size in cpu/adam_cpu.cpp, does the same).
    if (s.lr_source != LrSource::kHost && s.lr_source != LrSource::kDouble) {
      const double bias_correction1 = 1 - std::pow(s.beta1, static_cast<double>(step));
      float step_size = torch_cuda::rn_div(static_cast<float>(lr), static_cast<float>(bias_correction1));
      if (s.lr_source == LrSource::kBFloat16) step_size = __bfloat162float(__float2bfloat16_rn(step_size));
      if (s.lr_source == LrSource::kHalf) step_size = __half2float(__float2half_rn(step_size));
      c.step_size = static_cast<O>(step_size);
      c.neg_step_size = static_cast<O>(-step_size);
    }
  }
  __device__ __forceinline__ void apply(O& p, O g, O (&state)[kMaxStates], O& moment, O& denom) const {
    update_element<Algorithm::kAdamax>(p, g, state[AdamState::kExpAvg], state[AdamState::kSecondMoment],
                                       state[AdamState::kMaxSecondMoment], c, moment, denom);
  }
  __device__ __forceinline__ O step_size() const { return c.step_size; }
};

// The rule the kernel is templated on (the concept: adam_math.h, "update rules"): the state
// tensors it declares and the per-element rule for each compute type O. It is instantiated per
// option, so kNumStates counts exactly the states this instantiation reads and writes (without
// amsgrad the kernel never touches a max_exp_avg_sq slot, decided at compile time as before).
// kHasStep: the tensors have a float32 step counter (read as step + 1, advanced by the second
// stage); SGD has none (its LaunchTensor::step is null and the rule sees step 0).
// For<O> is constructed per block from (KernelScalars, lr, step, LaunchTensor::flags) and provides
// apply(p, g, state, moment, denom) and step_size() (the numerator of the effective step size).
// Adding an optimizer family adds one such type and its rules, and a case in launch_update below
// (the classic families: classic_rules.cuh, launch_classic_update); the launcher, the kernel and
// both reduction stages stay as they are.
template <Algorithm algo, bool amsgrad>
struct AdamFamilyRule {
  static constexpr int kNumStates = amsgrad ? AdamState::kMaxSecondMoment + 1 : AdamState::kSecondMoment + 1;
  static constexpr int kNumRequiredStates = kNumStates;
  static constexpr int kFirstMomentState = AdamState::kExpAvg;
  static constexpr bool kHasStep = true;
  template <class O>
  using For = Rule<algo, amsgrad, O>;
};

// One element: unscale (and store back) the gradient, update, store, accumulate the statistics.
// The values live in the caller's registers (a vector's lanes) in the storage type.
template <class T, class R, bool kStats, bool kPrev, bool kHist = false, class P = T>
struct ElementStep {
  using O = typename Traits<T>::O;
  static constexpr int kStates = R::kNumStates;
  static constexpr int kFirstMoment = R::kFirstMomentState;
  static_assert(kStates >= 0 && kStates <= kMaxStates, "a rule declares at most kMaxStates state tensors");
  static_assert(kFirstMoment >= -1 && kFirstMoment < kStates, "kFirstMomentState names one of the rule's states");
  static_assert(R::kNumRequiredStates == kStates, "a CUDA rule is instantiated per option: every state it declares is present");
  typename R::template For<O> rule;
  O scale;
  bool unscale;

  __device__ __forceinline__ ElementStep(const KernelScalars& s, double lr, float step, int32_t flags)
      : rule(s, lr, step, flags), scale(O(1)), unscale(s.grad_scale != nullptr) {
    if (unscale) scale = static_cast<O>(*s.grad_scale);
  }

  // state_s: the rule's state values in the storage type, slots 0 .. kStates-1 (the rest unused);
  // prev_s: the previous epoch's step in its storage type P (T, or bf16: compact epoch buffers).
  // hist: the block's shared [kNumHistograms][kHistBins] counts (kHist only).
  __device__ __forceinline__ void operator()(T& p_s, T& g_s, T (&state_s)[kMaxStates], const P& prev_s,
                                             O* acc, unsigned int* hist = nullptr) const {
    O g = Traits<T>::load(g_s);
    if (unscale) {
      g = torch_cuda::rn_div(g, scale);
      g_s = Traits<T>::store(g);
    }
    O p = Traits<T>::load(p_s);
    const O p_old = p;
    O state[kMaxStates];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k) state[k] = k < kStates ? Traits<T>::load(state_s[k]) : O(0);
    O moment, denom;
    rule.apply(p, g, state, moment, denom);
    p_s = Traits<T>::store(p);
#pragma unroll
    for (int k = 0; k < kStates; ++k) state_s[k] = Traits<T>::store(state[k]);
    if constexpr (kStats) {
      const O p_new = Traits<T>::load(p_s);  // the value as stored: Δθ is the change actually applied
      const O prev = kPrev ? static_cast<O>(Traits<P>::load(prev_s)) : O(0);
      const O first_moment = kFirstMoment >= 0 ? state[kFirstMoment < 0 ? 0 : kFirstMoment] : O(0);
      DirectAccumulator<O> stats{acc, rule.step_size()};
      contribute<kPrev>(stats, Observed<O>{g, first_moment, moment, denom, p_new - p_old, p_new, prev});
      if constexpr (kHist) {
        // Integer counts: the totals do not depend on the order of the atomics (deterministic).
        atomicAdd(hist + k_hist_grad_abs * kHistBins + histogram_bin(g), 1u);
        atomicAdd(hist + k_hist_update_abs * kHistBins + histogram_bin(p_new - p_old), 1u);
        atomicAdd(hist + k_hist_eff_lr * kHistBins + histogram_bin(rule.step_size() / denom), 1u);
      }
    }
  }
};

// ---- deterministic block reduction of kNumStats values, each combined as the table says ----
__device__ __forceinline__ double combine(int stat, double a, double b) { return combine_partials(stat, a, b); }

__device__ __forceinline__ double warp_reduce(int stat, double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = combine(stat, x, __shfl_down_sync(0xffffffffu, x, offset));
  return x;  // lane 0 holds the warp's result
}

// On return thread 0 holds the block's result in x. The order of every addition is fixed by the
// block size alone. (0 is the identity of every combine kind: stats_table.h, combine_partials.)
template <int kBlock>
__device__ __forceinline__ void block_reduce(double (&x)[kNumStats]) {
  constexpr int kWarps = kBlock / 32;
  __shared__ double shared[kWarps][kNumStats];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int s = 0; s < kNumStats; ++s) x[s] = warp_reduce(s, x[s]);
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kNumStats; ++s) shared[warp][s] = x[s];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < kNumStats; ++s) x[s] = warp_reduce(s, lane < kWarps ? shared[lane][s] : 0.0);
  }
}

// kOnPrevBf16*: the previous epoch's steps are stored in bfloat16 whatever T is (compact epoch
// buffers); *Hist: statistics steps that also take the histograms (histogram.h).
enum class Stats : int { kOff, kOn, kOnPrev, kOnPrevBf16, kOnHist, kOnPrevHist, kOnPrevBf16Hist };

__host__ __device__ constexpr bool stats_prev(Stats m) {
  return m == Stats::kOnPrev || m == Stats::kOnPrevBf16 || m == Stats::kOnPrevHist || m == Stats::kOnPrevBf16Hist;
}
__host__ __device__ constexpr bool stats_hist(Stats m) {
  return m == Stats::kOnHist || m == Stats::kOnPrevHist || m == Stats::kOnPrevBf16Hist;
}
__host__ __device__ constexpr bool stats_prev_bf16(Stats m) { return m == Stats::kOnPrevBf16 || m == Stats::kOnPrevBf16Hist; }
// The mode of a tensor whose previous step is stored in bfloat16 in a call of mode m.
__host__ __device__ constexpr Stats with_prev_bf16(Stats m) {
  return m == Stats::kOnPrev ? Stats::kOnPrevBf16 : m == Stats::kOnPrevHist ? Stats::kOnPrevBf16Hist : m;
}

template <class T, class R, Stats stats>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const __grid_constant__ UpdateLaunch launch, const __grid_constant__ KernelScalars s) {
  using O = typename Traits<T>::O;
  constexpr bool kStats = stats != Stats::kOff;
  constexpr bool kPrev = stats_prev(stats);
  constexpr bool kHist = stats_hist(stats);
  using P = std::conditional_t<stats_prev_bf16(stats), __nv_bfloat16, T>;  // the previous step's storage
  constexpr int kStates = R::kNumStates;  // state arrays kFirstState .. kFirstState + kStates - 1
  constexpr int kVec = 16 / sizeof(T);
  struct alignas(16) Pack {
    T v[kVec];
  };
  struct alignas(sizeof(P) * kVec) PrevPack {  // kVec previous-step values (8 bytes for bf16 beside fp32)
    P v[kVec];
  };

  // GradScaler found inf/NaN gradients: the whole step is skipped (the second stage zeroes the
  // statistics and leaves the step counters alone).
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;

  // This block's tensor: the last one whose first block is <= blockIdx.x (uniform over the block).
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = launch.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (launch.block_begin[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const LaunchTensor& t = launch.tensors[lo];
  const int64_t begin = (t.first_chunk + (block - launch.block_begin[lo])) * kChunk;
  const int64_t n = min(kChunk, t.numel - begin);

  T* const __restrict__ param = static_cast<T*>(t.ptr[kParam]) + begin;
  T* const __restrict__ grad = static_cast<T*>(t.ptr[kGrad]) + begin;
  T* __restrict__ state[kMaxStates];
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k) state[k] = k < kStates ? static_cast<T*>(t.ptr[kFirstState + k]) + begin : nullptr;
  const P* const __restrict__ prev = kPrev ? static_cast<const P*>(t.ptr[kPrev]) + begin : nullptr;

  // The step number after this step's increment, as torch's _foreach_add_(state_steps, 1) makes it.
  const float step = R::kHasStep ? *t.step + 1.0f : 0.0f;
  const double lr = read_lr(s);
  const ElementStep<T, R, kStats, kPrev, kHist, P> element(s, lr, step, t.flags);
  // The block's histograms in shared memory (3 KB), added to the tensor's row at the end.
  __shared__ unsigned int hist[kHist ? kNumHistograms * kHistBins : 1];
  if constexpr (kHist) {
    for (int i = threadIdx.x; i < kNumHistograms * kHistBins; i += kThreads) hist[i] = 0;
    __syncthreads();
  }

  O acc[kNumStats];
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) acc[k] = O(0);

  uintptr_t addresses = reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad) |
                        reinterpret_cast<uintptr_t>(prev);
#pragma unroll
  for (int k = 0; k < kStates; ++k) addresses |= reinterpret_cast<uintptr_t>(state[k]);
  int64_t scalar_begin = 0;
  if (addresses % 16 == 0) {
    const int64_t num_vecs = n / kVec;
    for (int64_t k = threadIdx.x; k < num_vecs; k += kThreads) {
      Pack p = reinterpret_cast<const Pack*>(param)[k];
      Pack g = reinterpret_cast<const Pack*>(grad)[k];
      Pack st[kMaxStates];
      PrevPack q;
#pragma unroll
      for (int s_ = 0; s_ < kStates; ++s_) st[s_] = reinterpret_cast<const Pack*>(state[s_])[k];
      if constexpr (kPrev) q = reinterpret_cast<const PrevPack*>(prev)[k];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        T st_j[kMaxStates];
#pragma unroll
        for (int s_ = 0; s_ < kStates; ++s_) st_j[s_] = st[s_].v[j];
        element(p.v[j], g.v[j], st_j, q.v[j], acc, hist);
#pragma unroll
        for (int s_ = 0; s_ < kStates; ++s_) st[s_].v[j] = st_j[s_];
      }
      reinterpret_cast<Pack*>(param)[k] = p;
#pragma unroll
      for (int s_ = 0; s_ < kStates; ++s_) reinterpret_cast<Pack*>(state[s_])[k] = st[s_];
      if (element.unscale) reinterpret_cast<Pack*>(grad)[k] = g;
    }
    scalar_begin = num_vecs * kVec;
  }
  // The tail (fewer than kVec elements), or the whole chunk when a pointer is not 16-byte aligned.
  for (int64_t i = scalar_begin + threadIdx.x; i < n; i += kThreads) {
    T p = param[i], g = grad[i], st[kMaxStates];
    P q;
#pragma unroll
    for (int s_ = 0; s_ < kStates; ++s_) st[s_] = state[s_][i];
    if constexpr (kPrev) q = prev[i];
    element(p, g, st, q, acc, hist);
    param[i] = p;
#pragma unroll
    for (int s_ = 0; s_ < kStates; ++s_) state[s_][i] = st[s_];
    if (element.unscale) grad[i] = g;
  }

  if constexpr (kStats) {
    double x[kNumStats];
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) x[k] = static_cast<double>(acc[k]);
    block_reduce<kThreads>(x);
    if (threadIdx.x == 0) {
      double* out = s.partials + (launch.partial_base + block) * kNumStats;
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) out[k] = x[k];
    }
  }
  if constexpr (kHist) {
    __syncthreads();
    unsigned long long* row = s.histograms + t.hist_row * (kNumHistograms * kHistBins);
    for (int i = threadIdx.x; i < kNumHistograms * kHistBins; i += kThreads) {
      if (hist[i] != 0) atomicAdd(row + i, static_cast<unsigned long long>(hist[i]));
    }
  }
}

// ---- host side: one update launch ----
template <class T, class R>
void launch_update_typed(Stats mode, const UpdateLaunch& launch, int64_t blocks, const KernelScalars& s,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (mode) {
    case Stats::kOff: update_kernel<T, R, Stats::kOff><<<grid, kThreads, 0, stream>>>(launch, s); break;
    case Stats::kOn: update_kernel<T, R, Stats::kOn><<<grid, kThreads, 0, stream>>>(launch, s); break;
    case Stats::kOnPrev:
      update_kernel<T, R, Stats::kOnPrev><<<grid, kThreads, 0, stream>>>(launch, s);
      break;
    case Stats::kOnPrevBf16:
      update_kernel<T, R, Stats::kOnPrevBf16><<<grid, kThreads, 0, stream>>>(launch, s);
      break;
    case Stats::kOnHist: update_kernel<T, R, Stats::kOnHist><<<grid, kThreads, 0, stream>>>(launch, s); break;
    case Stats::kOnPrevHist:
      update_kernel<T, R, Stats::kOnPrevHist><<<grid, kThreads, 0, stream>>>(launch, s);
      break;
    case Stats::kOnPrevBf16Hist:
      update_kernel<T, R, Stats::kOnPrevBf16Hist><<<grid, kThreads, 0, stream>>>(launch, s);
      break;
  }
}

// Launches update_kernel for storage type T over `launch` (`blocks` blocks) on `stream`.
template <class T>
void launch_update(Algorithm algo, bool amsgrad, Stats mode, const UpdateLaunch& launch, int64_t blocks,
                   const KernelScalars& s, cudaStream_t stream) {
  switch (algo) {
    case Algorithm::kAdam:
      if (amsgrad) launch_update_typed<T, AdamFamilyRule<Algorithm::kAdam, true>>(mode, launch, blocks, s, stream);
      else launch_update_typed<T, AdamFamilyRule<Algorithm::kAdam, false>>(mode, launch, blocks, s, stream);
      break;
    case Algorithm::kAdamW:
      if (amsgrad) launch_update_typed<T, AdamFamilyRule<Algorithm::kAdamW, true>>(mode, launch, blocks, s, stream);
      else launch_update_typed<T, AdamFamilyRule<Algorithm::kAdamW, false>>(mode, launch, blocks, s, stream);
      break;
    case Algorithm::kAdamax:  // no amsgrad variant
      launch_update_typed<T, AdamFamilyRule<Algorithm::kAdamax, false>>(mode, launch, blocks, s, stream);
      break;
    default: break;  // SGD, RMSprop, Adagrad: launch_classic_update
  }
}

// The classic families' update launch (SGD, RMSprop, Adagrad): defined in classic_rules.cuh and
// instantiated in classic_kernel_<type>.cu, one translation unit per storage type, apart from the
// Adam family's; the classic ops take the modes kOff, kOn and kOnPrev only. `variant` selects the
// instantiation by the options that decide which state tensors exist (set in launch_step,
// adam_launch.cu): SGD bit 0 momentum != 0 (a momentum buffer); RMSprop bit 0 momentum > 0,
// bit 1 centered; Adagrad 0.
enum ClassicVariant : int { kVariantMomentum = 1, kVariantCentered = 2 };
template <class T>
void launch_classic_update(Algorithm algo, int variant, Stats mode, const UpdateLaunch& launch, int64_t blocks,
                           const KernelScalars& s, cudaStream_t stream);

// Instantiated in adam_kernel_<type>.cu, one translation unit per type.
extern template void launch_update<float>(Algorithm, bool, Stats, const UpdateLaunch&, int64_t,
                                          const KernelScalars&, cudaStream_t);
extern template void launch_update<double>(Algorithm, bool, Stats, const UpdateLaunch&, int64_t,
                                           const KernelScalars&, cudaStream_t);
extern template void launch_update<__nv_bfloat16>(Algorithm, bool, Stats, const UpdateLaunch&, int64_t,
                                                  const KernelScalars&, cudaStream_t);
extern template void launch_update<__half>(Algorithm, bool, Stats, const UpdateLaunch&, int64_t,
                                           const KernelScalars&, cudaStream_t);

extern template void launch_classic_update<float>(Algorithm, int, Stats, const UpdateLaunch&, int64_t,
                                                  const KernelScalars&, cudaStream_t);
extern template void launch_classic_update<double>(Algorithm, int, Stats, const UpdateLaunch&, int64_t,
                                                   const KernelScalars&, cudaStream_t);
extern template void launch_classic_update<__nv_bfloat16>(Algorithm, int, Stats, const UpdateLaunch&, int64_t,
                                                          const KernelScalars&, cudaStream_t);
extern template void launch_classic_update<__half>(Algorithm, int, Stats, const UpdateLaunch&, int64_t,
                                                   const KernelScalars&, cudaStream_t);

}  // namespace instrumented_adam::cuda::detail
