// CUDA implementation of instrumented_adam::sgd_step, rmsprop_step and adagrad_step (schemas:
// csrc/ops.cpp): the CPU glue's argument checks (cpu/classic_cpu.cpp) for device tensors, the
// plain-data description of the call, and the launch on the current stream through the harness
// the Adam family uses (adam_launch.cu, adam_kernel.cuh; the rules: classic_rules.cuh).
//
// As adam_cuda.cpp: nothing here synchronises with the device or reads device memory (step
// counters, lr_tensor, grad_scale and found_inf are read by the kernels), and the only allocation
// is the statistics partials buffer from torch's caching allocator, so a step runs under
// torch.cuda.set_sync_debug_mode("error") and inside CUDA graph capture.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../classic_call.h"
#include "adam_cuda.h"
#include "cuda_glue.h"

namespace instrumented_adam::cuda {
namespace {

// The step counter of parameter i (its parameter and state are checked by ClassicCall).
void check_step_counter(const ClassicCall& call, int64_t i, const at::Device& device) {
  if (call.has_steps) {
    const at::Tensor& step_t = call.state_steps[i];
    TORCH_CHECK(step_t.numel() == 1 && step_t.device() == device && step_t.scalar_type() == at::kFloat,
                "instrumented_adam: state_steps[", i, "] must be a one-element float32 tensor on ", device, " (got ",
                step_t.scalar_type(), " on ", step_t.device(), "), as torch's fused optimizers keep it");
  }
}

// Validates the call, describes it to the launcher and launches it. `args` holds the family's
// options; the call-wide tensors are filled in here.
void run_classic(const ClassicCall& call, CallArgs& args) {
  call.check_lists();
  const int64_t n = static_cast<int64_t>(call.params.size());
  const at::Device device = n > 0 ? call.params[0].device() : (call.stats.has_value() ? call.stats->device() : at::Device(at::kCUDA));
  TORCH_CHECK(device.is_cuda(), "instrumented_adam: the CUDA kernel got tensors on ", device);
  c10::cuda::CUDAGuard guard(device);

  args.algorithm = call.algorithm;
  args.lr = call.lr;
  if (call.stats.has_value()) {
    const at::Tensor& s = *call.stats;
    args.stats_rows = check_stats_buffer(s, device, n, call.stat_rows);
    args.stats = s.data_ptr<double>();
    args.stats_rows_cover_all = args.stats_rows == n;
  }
  // AMP (GradScaler): both read on the device; a found_inf step changes nothing (parameters, state,
  // gradients, step counters) and its statistics rows are zeros, as on the CPU.
  if (call.grad_scale.has_value()) args.grad_scale = device_scalar(*call.grad_scale, device, "grad_scale");
  if (call.found_inf.has_value()) args.found_inf = device_scalar(*call.found_inf, device, "found_inf");
  if (call.lr_tensor.has_value()) set_lr_tensor(args, *call.lr_tensor, device);

  std::vector<HostTensor> tensors(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    call.check_parameter(i, device, /*allow_compact_prev=*/false);
    check_step_counter(call, i, device);
    HostTensor& h = tensors[static_cast<size_t>(i)];
    call.describe_parameter(i, h, /*packed=*/true);
    h.step = call.has_steps ? call.state_steps[i].data_ptr<float>() : nullptr;
    h.stats_row = call.stat_rows.empty() ? i : call.stat_rows[i];
    h.first_step = !call.first_step.empty() && call.first_step[i] != 0;
  }
  args.prev_dot = args.stats != nullptr && !call.prev_epoch_steps.empty();
  launch_on_current_stream(args, tensors, device);
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList prev_epoch_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   at::IntArrayRef first_step, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& stats,
                   at::IntArrayRef stat_rows) {
  const bool has_momentum = momentum != 0;
  const ClassicCall call{"sgd_step", Algorithm::kSgd, params, grads,
                         {{momentum_buffers, "momentum_buffers", has_momentum}, {{}, nullptr, false}, {{}, nullptr, false}},
                         prev_epoch_steps, {}, false, lr, lr_tensor, grad_scale, found_inf, stats, stat_rows,
                         first_step};
  CallArgs args{};
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.maximize = maximize;
  run_classic(call, args);
}

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList momentum_buffers, at::TensorList grad_avgs, at::TensorList prev_epoch_steps,
                       at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                       double alpha, double eps, double weight_decay, double momentum, bool centered, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& stats, at::IntArrayRef stat_rows) {
  const ClassicCall call{"rmsprop_step", Algorithm::kRmsprop, params, grads,
                         {{square_avgs, "square_avgs", true},
                          {momentum_buffers, "momentum_buffers", momentum > 0},
                          {grad_avgs, "grad_avgs", centered}},
                         prev_epoch_steps, state_steps, true, lr, lr_tensor, grad_scale, found_inf, stats, stat_rows,
                         {}};
  CallArgs args{};
  args.alpha = alpha;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.momentum = momentum;
  args.centered = centered;
  args.maximize = maximize;
  run_classic(call, args);
}

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList prev_epoch_steps, at::TensorList state_steps, double lr,
                       const std::optional<at::Tensor>& lr_tensor, double lr_decay, double weight_decay, double eps,
                       bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& stats,
                       at::IntArrayRef stat_rows) {
  const ClassicCall call{"adagrad_step", Algorithm::kAdagrad, params, grads,
                         {{state_sums, "state_sums", true}, {{}, nullptr, false}, {{}, nullptr, false}},
                         prev_epoch_steps, state_steps, true, lr, lr_tensor, grad_scale, found_inf, stats, stat_rows,
                         {}};
  CallArgs args{};
  args.lr_decay = lr_decay;
  args.weight_decay = weight_decay;
  args.eps = eps;
  args.maximize = maximize;
  run_classic(call, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("rmsprop_step", &rmsprop_step_cuda);
  m.impl("adagrad_step", &adagrad_step_cuda);
}

}  // namespace instrumented_adam::cuda
