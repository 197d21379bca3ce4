// What the CUDA torch glue of every op shares (adam_cuda.cpp: adam_step; classic_cuda.cpp:
// sgd_step, rmsprop_step, adagrad_step): the device scalar tensors, lr as a tensor, the launch
// limits of the test hooks, the partials buffer and the launch. Nothing here synchronises with the
// device or reads device memory; the only allocation is the partials buffer, from torch's caching
// allocator. Narrow headers only (docs/design.md, "Building").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "adam_cuda.h"

namespace instrumented_adam::cuda {

// A one-element float32 tensor on `device`, read by the kernels (never on the host).
inline const float* device_scalar(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device() == device && t.scalar_type() == at::kFloat, "instrumented_adam: ", what,
              " must be a one-element float32 tensor on ", device, ", got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
  return t.data_ptr<float>();
}

// lr as a tensor: on the device it is read by the kernels; a CPU tensor is read here, which does
// not synchronise with the GPU (torch's fused optimizers do the same).
inline void set_lr_tensor(CallArgs& args, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, "instrumented_adam: lr must be a one-element tensor, got shape ", t.sizes());
  switch (t.scalar_type()) {
    case at::kFloat: args.lr_source = LrSource::kFloat; break;
    case at::kDouble: args.lr_source = LrSource::kDouble; break;
    case at::kBFloat16: args.lr_source = LrSource::kBFloat16; break;
    case at::kHalf: args.lr_source = LrSource::kHalf; break;
    default: TORCH_CHECK(false, "instrumented_adam: lr must be a floating-point tensor, got ", t.scalar_type());
  }
  if (t.device().is_cpu()) {
    args.lr = t.item<double>();
  } else {
    TORCH_CHECK(t.device() == device, "instrumented_adam: lr is on ", t.device(), " but the parameters are on ",
                device);
    args.lr_ptr = t.const_data_ptr();
  }
}

// Test hooks (adam_cuda.h, LaunchLimits): read at every call, so a test can set them for a while.
inline int64_t env_limit(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? 0 : std::max<int64_t>(0, std::atoll(value));
}

// Everything is validated: allocate the partials (statistics steps) and launch on the current
// stream. A bad argument must have been refused before this (it leaves the state untouched).
inline void launch_on_current_stream(CallArgs& args, std::vector<HostTensor>& tensors, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor partials;
  if (args.stats != nullptr) {
    const int64_t rows = num_partials(tensors.data(), n);
    partials = at::empty({std::max<int64_t>(rows, 1) * kNumStats}, at::TensorOptions().dtype(at::kDouble).device(device));
    args.partials = partials.data_ptr<double>();
  }
  LaunchLimits limits;
  limits.max_tensors = static_cast<int>(std::min<int64_t>(env_limit("IA_CUDA_MAX_TENSORS_PER_LAUNCH"), 1 << 30));
  limits.max_blocks = env_limit("IA_CUDA_MAX_BLOCKS_PER_LAUNCH");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(launch_step(args, tensors.data(), n, limits, stream));
}

}  // namespace instrumented_adam::cuda
