// CUDA implementation of instrumented_adam::adam_step: argument checks (those of the CPU glue,
// cpu/adam_cpu.cpp, for device tensors), the plain-data description of the call, the partials
// scratch buffer, and the launch on the current stream (adam_launch.cu / adam_kernel.cuh).
//
// Nothing here synchronises with the device or reads device memory: the step counters, lr_tensor,
// grad_scale and found_inf are read by the kernels, and the only allocation is the partials buffer
// from torch's caching allocator, so the op runs under torch.cuda.set_sync_debug_mode("error") and
// inside CUDA graph capture. Narrow headers only (no torch/extension.h, no ATen/cuda/CUDAContext.h):
// see docs/design.md, "Building".
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../adam_step_call.h"
#include "adam_cuda.h"
#include "cuda_glue.h"

namespace instrumented_adam::cuda {
namespace {

void adam_step_cuda(const AdamStepCall& call) {
  const int64_t n = call.size();
  const Algorithm algo = call.algorithm;
  const bool amsgrad = call.amsgrad;
  double lr = call.lr;

  // The device of the call: the parameters' (or, with no parameters, the statistics buffer's).
  const at::Device device = n > 0 ? call.params[0].device() : (call.stats.has_value() ? call.stats->device() : at::Device(at::kCUDA));
  TORCH_CHECK(device.is_cuda(), "instrumented_adam: the CUDA kernel got tensors on ", device);
  c10::cuda::CUDAGuard guard(device);

  CallArgs args{};
  args.algorithm = algo;
  args.amsgrad = amsgrad;
  args.maximize = call.maximize;
  args.lr = lr;
  args.beta1 = call.beta1;
  args.beta2 = call.beta2;
  args.weight_decay = call.weight_decay;
  args.eps = call.eps;

  if (call.stats.has_value()) {
    const at::Tensor& s = *call.stats;
    args.stats_rows = check_stats_buffer(s, device, n, call.stat_rows);
    args.stats = s.data_ptr<double>();
    args.stats_rows_cover_all = args.stats_rows == n;
  }
  if (call.histograms.has_value()) {
    check_histogram_buffer(*call.histograms, call.stats, device);
    args.histograms = call.histograms->data_ptr<int64_t>();
  }

  // AMP (GradScaler): both read on the device; a found_inf step changes nothing but the statistics
  // (zeros), exactly as torch's fused optimizers skip it.
  if (call.grad_scale.has_value()) args.grad_scale = device_scalar(*call.grad_scale, device, "grad_scale");
  if (call.found_inf.has_value()) args.found_inf = device_scalar(*call.found_inf, device, "found_inf");

  // lr as a tensor: read by the kernels on the device, here for a CPU tensor (cuda_glue.h).
  if (call.lr_tensor.has_value()) set_lr_tensor(args, *call.lr_tensor, device);

  std::vector<HostTensor> tensors(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    call.check_parameter(i, device);
    const at::Tensor& step_t = call.state_steps[i];
    TORCH_CHECK(step_t.numel() == 1 && step_t.device() == device && step_t.scalar_type() == at::kFloat,
                "instrumented_adam: state_steps[", i, "] must be a one-element float32 tensor on ", device, " (got ",
                step_t.scalar_type(), " on ", step_t.device(), "), as torch's fused Adam keeps it");

    HostTensor& h = tensors[static_cast<size_t>(i)];
    h.step = step_t.data_ptr<float>();
    call.describe_parameter(i, h);
    h.stats_row = call.stat_rows.empty() ? i : call.stat_rows[i];
  }
  args.prev_dot = args.stats != nullptr && !call.prev_epoch_steps.empty();

  // Everything is validated: only now allocate and launch (a bad argument leaves the state untouched).
  launch_on_current_stream(args, tensors, device);
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CUDA, m) {
  m.impl("adam_step", &adam_step_entry<adam_step_cuda>);
}

}  // namespace instrumented_adam::cuda
