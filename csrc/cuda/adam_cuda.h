// Plain-data description of one fused step on CUDA, passed from the torch glue (adam_cuda.cpp) to
// the kernels (adam_kernel.cu). No torch types here, and the .cu files include no torch header:
// they compile in seconds, and CI can compile-check them (and read ptxas' register report)
// without a GPU or a CUDA build of torch (scripts/check_cuda.sh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../adam_math.h"
#include "../kernel_tensor.h"

namespace instrumented_adam::cuda {

using instrumented_adam::DType;

// What lr is: the float `lr` argument (kHost), or an lr_tensor of this dtype (read on the device
// through lr_ptr, or, for a CPU tensor, already read into `lr`). Adamax's step size depends on it.
enum class LrSource : int8_t { kHost, kFloat, kDouble, kBFloat16, kHalf };

// Elements of one work item: one thread block updates one chunk of one tensor and writes one row of
// statistics partials. A multiple of every vector width, so only a tensor's last chunk has a tail.
constexpr int64_t kChunk = 32768;
// Threads per block of the update kernel (the statistics' block reduction assumes a multiple of 32).
constexpr int kThreads = 256;
// Threads per block of the kernel that reduces a tensor's partials into its statistics row.
constexpr int kFinalizeThreads = 128;

// Work-list capacity of one launch: the per-launch tables travel as kernel parameters (CUDA 12.1+
// allows 32 KB of them on every architecture CUDA 13 supports; nothing is copied to the device, so
// a launch is capturable in a CUDA graph as it stands). Longer lists are split over launches.
constexpr int kMaxTensorsPerLaunch = 128;
constexpr int kMaxFinalizePerLaunch = 640;

// One parameter as the glue sees it (all pointers on one device; absent ones null).
// The state slots are the CUDA rule's: the Adam family's AdamState order; for the classic rules
// the state tensors present, packed from slot 0 (classic_rules.cuh).
struct HostTensor : ParameterPointers {
  float* step;        // the state step (float32, on the device); incremented unless found_inf; null for SGD
  int64_t stats_row;  // row of the statistics buffer this tensor writes
  bool first_step;    // SGD: the momentum buffer is new and becomes the gradient
};

// The call-wide arguments.
struct CallArgs {
  Algorithm algorithm;  // any family: the Adam family's op (adam_cuda.cpp) and the classic ops (classic_cuda.cpp)
  bool amsgrad;     // ignored for Adamax and the classic rules
  bool maximize;
  bool prev_dot;    // accumulate update_dot_prev_epoch (every prev_step is set)
  double lr;           // used when lr_ptr is null
  const void* lr_ptr;  // a device lr_tensor (of dtype lr_source), read by every block; or null
  LrSource lr_source;
  double beta1, beta2, weight_decay, eps;
  // The classic rules' options (SGD: momentum, dampening, nesterov; RMSprop: alpha, momentum,
  // centered; Adagrad: lr_decay); weight_decay, eps and maximize above are shared.
  double momentum, dampening, alpha, lr_decay;
  bool nesterov, centered;
  const float* grad_scale;  // AMP: divide the gradient by *grad_scale and store it back; or null
  const float* found_inf;   // AMP: when *found_inf != 0 nothing changes, statistics are zero; or null
  double* stats;            // [stats_rows][kNumStats] float64 on the device, or null (statistics off)
  int64_t stats_rows;
  bool stats_rows_cover_all;  // every row is written by this call: no zero-fill needed
  double* partials;           // scratch [num_partials(tensors)][kNumStats] when stats, else null
  int64_t* histograms;        // [stats_rows][kNumHistograms][kHistBins] (histogram.h) on histogram steps, else null
};

// Rows of the partials scratch buffer the glue must allocate (one per chunk of every tensor).
inline int64_t num_partials(const HostTensor* tensors, int64_t n) {
  int64_t rows = 0;
  for (int64_t i = 0; i < n; ++i) rows += (tensors[i].numel + kChunk - 1) / kChunk;
  return rows;
}

// Test hooks: the largest number of tensors / blocks one update launch takes (0 = the defaults),
// so that tests can split small problems over many launches (the glue reads them from the
// environment variables IA_CUDA_MAX_TENSORS_PER_LAUNCH / IA_CUDA_MAX_BLOCKS_PER_LAUNCH).
struct LaunchLimits {
  int max_tensors = 0;
  int64_t max_blocks = 0;
};

// Enqueues the whole step of any family on `stream`: the update launches, then the launches that
// reduce the statistics and advance the step counters. Never synchronises, never allocates, never
// copies to or from the host. Returns the first launch error (cudaSuccess when all launched).
cudaError_t launch_step(const CallArgs& args, const HostTensor* tensors, int64_t n, LaunchLimits limits,
                        cudaStream_t stream);

}  // namespace instrumented_adam::cuda
