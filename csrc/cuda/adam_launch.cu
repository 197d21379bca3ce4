// The second stage of a step on CUDA and the host side of the whole step, for every family (the
// Adam family's adam_step and the classic sgd_step, rmsprop_step, adagrad_step): the (tensor,
// chunk) work list, split into launches, and the launches themselves (the update kernel is in
// adam_kernel.cuh, the classic rules in classic_rules.cuh). No torch headers; the glue is
// adam_cuda.cpp and classic_cuda.cpp.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "adam_kernel.cuh"

namespace instrumented_adam::cuda {
namespace detail {
namespace {

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const __grid_constant__ FinalizeLaunch launch, const double* __restrict__ partials,
                    double* __restrict__ stats, const float* __restrict__ found_inf) {
  const FinalizeTensor& t = launch.tensors[blockIdx.x];
  const bool skipped = found_inf != nullptr && *found_inf != 0.0f;
  double x[kNumStats];
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) x[k] = 0.0;
  if (!skipped) {
    for (int64_t r = threadIdx.x; r < t.num_partials; r += kFinalizeThreads) {
      const double* row = partials + (t.partial_begin + r) * kNumStats;
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) x[k] = combine(k, x[k], row[k]);
    }
  }
  block_reduce<kFinalizeThreads>(x);
  if (threadIdx.x == 0) {
    double* out = stats + t.row * kNumStats;
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) out[k] = x[k];
    // Every update block of this call has read the step (stream order): advance it now (SGD has
    // no step counter: null).
    if (!skipped && t.step != nullptr) *t.step = *t.step + 1.0f;
  }
}

__global__ void __launch_bounds__(128)
    steps_kernel(const __grid_constant__ StepsLaunch launch, const float* __restrict__ found_inf) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= launch.num_tensors) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  float* step = launch.steps[i];
  *step = *step + 1.0f;
}

bool is_classic(Algorithm algo) {
  return algo == Algorithm::kSgd || algo == Algorithm::kRmsprop || algo == Algorithm::kAdagrad;
}

// variant: amsgrad for the Adam family; the classic rules' ClassicVariant bits (see launch_step).
void dispatch_update(DType dtype, Algorithm algo, int variant, Stats mode, const UpdateLaunch& launch,
                     int64_t blocks, const KernelScalars& s, cudaStream_t stream) {
  if (is_classic(algo)) {
    switch (dtype) {
      case DType::kFloat: return launch_classic_update<float>(algo, variant, mode, launch, blocks, s, stream);
      case DType::kDouble: return launch_classic_update<double>(algo, variant, mode, launch, blocks, s, stream);
      case DType::kBFloat16:
        return launch_classic_update<__nv_bfloat16>(algo, variant, mode, launch, blocks, s, stream);
      case DType::kHalf: return launch_classic_update<__half>(algo, variant, mode, launch, blocks, s, stream);
    }
    return;
  }
  const bool amsgrad = variant != 0;
  switch (dtype) {
    case DType::kFloat: return launch_update<float>(algo, amsgrad, mode, launch, blocks, s, stream);
    case DType::kDouble: return launch_update<double>(algo, amsgrad, mode, launch, blocks, s, stream);
    case DType::kBFloat16: return launch_update<__nv_bfloat16>(algo, amsgrad, mode, launch, blocks, s, stream);
    case DType::kHalf: return launch_update<__half>(algo, amsgrad, mode, launch, blocks, s, stream);
  }
}

}  // namespace
}  // namespace detail

using namespace detail;

cudaError_t launch_step(const CallArgs& a, const HostTensor* tensors, int64_t n, LaunchLimits limits,
                        cudaStream_t stream) {
  const bool stats = a.stats != nullptr;
  const bool classic = is_classic(a.algorithm);
  const bool amsgrad = a.amsgrad && !classic && a.algorithm != Algorithm::kAdamax;
  // The instantiation: amsgrad for the Adam family; for the classic rules the options that decide
  // their state tensors (ClassicVariant, adam_kernel.cuh; Adagrad has one variant, 0).
  int variant = amsgrad ? 1 : 0;
  if (a.algorithm == Algorithm::kSgd) variant = a.momentum != 0 ? kVariantMomentum : 0;
  if (a.algorithm == Algorithm::kRmsprop) {
    variant = (a.momentum > 0 ? kVariantMomentum : 0) | (a.centered ? kVariantCentered : 0);
  }
  const bool hist = stats && a.histograms != nullptr;
  const Stats call_mode = !stats ? Stats::kOff
                          : hist ? (a.prev_dot ? Stats::kOnPrevHist : Stats::kOnHist)
                                 : (a.prev_dot ? Stats::kOnPrev : Stats::kOn);
  // A tensor whose previous step is bf16 while it is not (compact epoch buffers) takes the kernel
  // instantiated for that; launches are split by mode as they are by dtype.
  auto mode_of = [&](const HostTensor& h) {
    return stats_prev(call_mode) && h.prev_dtype != h.dtype ? with_prev_bf16(call_mode) : call_mode;
  };
  Stats mode = call_mode;
  const int max_tensors = limits.max_tensors > 0 ? std::min(limits.max_tensors, kMaxTensorsPerLaunch)
                                                 : kMaxTensorsPerLaunch;
  const int64_t max_blocks = limits.max_blocks > 0 ? std::min<int64_t>(limits.max_blocks, INT32_MAX)
                                                   : int64_t{INT32_MAX};

  if (stats && !a.stats_rows_cover_all && a.stats_rows > 0) {
    // Rows of parameters that are not in this call stay zero (the buffer is "zeroed and filled").
    const cudaError_t err =
        cudaMemsetAsync(a.stats, 0, static_cast<size_t>(a.stats_rows) * kNumStats * sizeof(double), stream);
    if (err != cudaSuccess) return err;
  }

  if (hist && a.stats_rows > 0) {
    // The update blocks add their counts to the rows (histogram.h): start from zero, every row
    // (rows of parameters not in this call stay zero, as for the statistics). A found_inf step
    // then leaves them zero, since its blocks return before counting.
    const cudaError_t err = cudaMemsetAsync(
        a.histograms, 0, static_cast<size_t>(a.stats_rows) * kNumHistograms * kHistBins * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
  }

  KernelScalars scalars;
  scalars.lr = a.lr;
  scalars.beta1 = a.beta1;
  scalars.beta2 = a.beta2;
  scalars.weight_decay = a.weight_decay;
  scalars.eps = a.eps;
  scalars.lr_ptr = a.lr_ptr;
  scalars.lr_source = a.lr_source;
  scalars.grad_scale = a.grad_scale;
  scalars.found_inf = a.found_inf;
  scalars.partials = a.partials;
  scalars.histograms = hist ? reinterpret_cast<unsigned long long*>(a.histograms) : nullptr;
  scalars.maximize = a.maximize;
  scalars.momentum = a.momentum;
  scalars.dampening = a.dampening;
  scalars.alpha = a.alpha;
  scalars.lr_decay = a.lr_decay;
  scalars.nesterov = a.nesterov;

  // Update launches, one dtype (and previous-step storage) at a time (the kernel is templated on
  // them), tensors in call order.
  // Partial rows follow the same order: tensor i's chunk c writes row partial_begin[i] + c.
  std::vector<int64_t> partial_begin(static_cast<size_t>(n), 0);
  int64_t next_partial = 0;
  UpdateLaunch launch;
  int64_t blocks = 0;
  cudaError_t first_error = cudaSuccess;
  auto start = [&] {
    launch.partial_base = next_partial;
    launch.num_tensors = 0;
    blocks = 0;
  };
  auto flush = [&](DType dtype) {
    if (launch.num_tensors == 0) return;
    launch.block_begin[launch.num_tensors] = static_cast<int32_t>(blocks);
    dispatch_update(dtype, a.algorithm, variant, mode, launch, blocks, scalars, stream);
    const cudaError_t err = cudaGetLastError();
    if (first_error == cudaSuccess) first_error = err;
    start();
  };
  for (DType dtype : {DType::kFloat, DType::kBFloat16, DType::kHalf, DType::kDouble}) {
    // A second pass, for the tensors whose previous step is stored in bf16, only when the call
    // has a previous-epoch dot (with_prev_bf16 changes nothing otherwise).
    const Stats launch_modes[2] = {call_mode, with_prev_bf16(call_mode)};
    for (int m = 0; m < (launch_modes[1] != launch_modes[0] ? 2 : 1); ++m) {
      const Stats launch_mode = launch_modes[m];
      mode = launch_mode;
      start();
      for (int64_t i = 0; i < n; ++i) {
        const HostTensor& h = tensors[i];
        if (h.dtype != dtype || h.numel == 0 || mode_of(h) != launch_mode) continue;
        partial_begin[i] = next_partial;
        const int64_t chunks = (h.numel + kChunk - 1) / kChunk;
        for (int64_t chunk = 0; chunk < chunks;) {
          if (launch.num_tensors == max_tensors || blocks == max_blocks) flush(dtype);
          const int64_t take = std::min(chunks - chunk, max_blocks - blocks);
          LaunchTensor& t = launch.tensors[launch.num_tensors];
          t.ptr[kParam] = h.param;
          t.ptr[kGrad] = h.grad;
          // The rule's state tensors as the glue filled them (adam_step_call.h); absent ones null.
          for (int k = 0; k < kMaxStates; ++k) t.ptr[kFirstState + k] = h.state[k];
          t.ptr[kPrev] = stats_prev(mode) ? const_cast<void*>(h.prev_step) : nullptr;
          t.step = h.step;
          t.numel = h.numel;
          t.first_chunk = chunk;
          t.hist_row = h.stats_row;
          t.flags = h.first_step ? kFlagFirstStep : 0;
          launch.block_begin[launch.num_tensors] = static_cast<int32_t>(blocks);
          ++launch.num_tensors;
          blocks += take;
          chunk += take;
          next_partial += take;
        }
      }
      flush(dtype);
    }
  }

  // Second stage, after every update block: statistics rows and step counters.
  if (stats) {
    FinalizeLaunch fin;
    fin.num_tensors = 0;
    auto flush_fin = [&] {
      if (fin.num_tensors == 0) return;
      finalize_kernel<<<fin.num_tensors, kFinalizeThreads, 0, stream>>>(fin, a.partials, a.stats, a.found_inf);
      const cudaError_t err = cudaGetLastError();
      if (first_error == cudaSuccess) first_error = err;
      fin.num_tensors = 0;
    };
    for (int64_t i = 0; i < n; ++i) {
      if (fin.num_tensors == kMaxFinalizePerLaunch) flush_fin();
      FinalizeTensor& f = fin.tensors[fin.num_tensors++];
      f.step = tensors[i].step;
      f.partial_begin = partial_begin[i];
      f.num_partials = (tensors[i].numel + kChunk - 1) / kChunk;
      f.row = tensors[i].stats_row;
    }
    flush_fin();
  } else {
    StepsLaunch steps;
    steps.num_tensors = 0;
    auto flush_steps = [&] {
      if (steps.num_tensors == 0) return;
      steps_kernel<<<(steps.num_tensors + 127) / 128, 128, 0, stream>>>(steps, a.found_inf);
      const cudaError_t err = cudaGetLastError();
      if (first_error == cudaSuccess) first_error = err;
      steps.num_tensors = 0;
    };
    for (int64_t i = 0; i < n; ++i) {
      if (tensors[i].step == nullptr) continue;  // SGD: no step counter
      if (steps.num_tensors == kMaxFinalizePerLaunch) flush_steps();
      steps.steps[steps.num_tensors++] = tensors[i].step;
    }
    flush_steps();
  }
  return first_error;
}

}  // namespace instrumented_adam::cuda
