// One call of instrumented_adam::adam_step (schema: csrc/ops.cpp) as one value, and the op's
// entry point shared by every device: the argument list is spelled out once, here, and the
// device glue (cpu/adam_cpu.cpp, cuda/adam_cuda.cpp) receives the call already checked for what
// does not depend on the device (list lengths, the algorithm; amsgrad folded to false for
// Adamax, which has no amsgrad variant).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "adam_math.h"
#include "kernel_tensor.h"
#include "op_checks.h"

namespace instrumented_adam {

struct AdamStepCall {
  at::TensorList params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps;
  Algorithm algorithm;
  double lr;
  const std::optional<at::Tensor>& lr_tensor;
  double beta1, beta2, weight_decay, eps;
  bool amsgrad;  // false for Adamax
  bool maximize;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& stats;
  at::IntArrayRef stat_rows;
  const std::optional<at::Tensor>& histograms;  // [rows, kNumHistograms, kHistBins] int64 (histogram.h)

  int64_t size() const { return static_cast<int64_t>(params.size()); }

  // Parameter i's data pointers and size into a kernel's plain-data description (the CPU's
  // TensorArgs, the CUDA HostTensor: ParameterPointers, kernel_tensor.h); absent tensors are null.
  // The state slots follow the Adam family's rule (AdamRule in adam_math.h): exp_avg, the second
  // moment (exp_avg_sq or exp_inf), max_exp_avg_sq (amsgrad only).
  template <class KernelTensor>
  void describe_parameter(int64_t i, KernelTensor& t) const {
    const at::Tensor& p = params[i];
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    for (void*& state : t.state) state = nullptr;
    t.state[AdamState::kExpAvg] = exp_avgs[i].data_ptr();
    t.state[AdamState::kSecondMoment] = second_moments[i].data_ptr();
    if (amsgrad) t.state[AdamState::kMaxSecondMoment] = max_second_moments[i].data_ptr();
    t.prev_step = prev_epoch_steps.empty() ? nullptr : prev_epoch_steps[i].const_data_ptr();
    t.numel = p.numel();
    t.dtype = kernel_dtype<DType>(p);
    t.prev_dtype = prev_epoch_steps.empty() ? t.dtype : kernel_dtype<DType>(prev_epoch_steps[i]);
  }

  // Parameter i and its companions on `device` (op_checks.h).
  void check_parameter(int64_t i, const at::Device& device) const {
    instrumented_adam::check_parameter(params[i], i, device, grads, exp_avgs, second_moments, max_second_moments,
                                       prev_epoch_steps, amsgrad);
  }
};

// The function registered for a device: m.impl("adam_step", &adam_step_entry<run_on_device>).
template <void (*Run)(const AdamStepCall&)>
void adam_step_entry(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList second_moments, at::TensorList max_second_moments,
                     at::TensorList prev_epoch_steps, at::TensorList state_steps, int64_t algorithm, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay,
                     double eps, bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& stats,
                     at::IntArrayRef stat_rows, const std::optional<at::Tensor>& histograms) {
  check_list_lengths(params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps,
                     stat_rows, algorithm, amsgrad);
  const auto algo = static_cast<Algorithm>(algorithm);
  Run(AdamStepCall{params, grads, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps, algo,
                   lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad && algo != Algorithm::kAdamax, maximize,
                   grad_scale, found_inf, stats, stat_rows, histograms});
}

}  // namespace instrumented_adam
