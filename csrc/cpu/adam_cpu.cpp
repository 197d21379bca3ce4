// CPU implementation of instrumented_adam::adam_step: argument checks and per-tensor step scalars;
// the (tensor, chunk) work list, the parallel loop and the deterministic reduction of the
// per-chunk statistics are work_list.h (shared with the classic ops). The arithmetic itself is in
// adam_kernel_isa.cpp / adam_math.h.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../adam_step_call.h"
#include "work_list.h"

namespace instrumented_adam::cpu {
namespace {

// torch.optim.Adamax has no fused kernel; ours follows its single-tensor path, which computes the
// step size as a tensor operation when lr is a tensor: clr = lr / (1 - beta1**t), the bias
// correction a Python float (double) rounded to float, the division done in lr's dtype (in float
// for bf16/fp16, then rounded to that type). With a float32 lr that differs from lr / bc in double by an
// ulp on about 1% of the steps, so we round the same way (tests/test_parity.py,
// test_adamax_vs_torch_single_tensor[adamax-lr-tensor-*]).
void adamax_tensor_lr_step_size(at::ScalarType lr_type, double lr, double beta1, double step, TensorArgs& t) {
  const double bias_correction1 = 1 - std::pow(beta1, step);
  double step_size;
  switch (lr_type) {
    case at::kDouble: return;  // the double computation is already torch's
    case at::kFloat: step_size = static_cast<float>(lr) / static_cast<float>(bias_correction1); break;
    case at::kBFloat16:  // lr is already a bf16 value; torch divides in float and rounds
      step_size = static_cast<float>(c10::BFloat16(static_cast<float>(lr) / static_cast<float>(bias_correction1)));
      break;
    case at::kHalf:
      step_size = static_cast<float>(c10::Half(static_cast<float>(lr) / static_cast<float>(bias_correction1)));
      break;
    default: return;
  }
  // torch passes -clr as addcdiv's value, which the kernel rounds to the parameter's type.
  t.coeff_float.step_size = static_cast<float>(step_size);
  t.coeff_float.neg_step_size = static_cast<float>(-step_size);
  t.coeff_double.step_size = step_size;
  t.coeff_double.neg_step_size = -step_size;
}

void adam_step_cpu(const AdamStepCall& call) {
  const int64_t n = call.size();
  const Algorithm algo = call.algorithm;
  const bool amsgrad = call.amsgrad;
  double lr = call.lr;
  const at::Device device(at::kCPU);

  double* stats_data = nullptr;
  int64_t stats_rows_total = 0;
  if (call.stats.has_value()) {
    stats_rows_total = check_stats_buffer(*call.stats, device, n, call.stat_rows);
    stats_data = call.stats->data_ptr<double>();
  }
  int64_t* hist_data = nullptr;
  if (call.histograms.has_value()) {
    check_histogram_buffer(*call.histograms, call.stats, device);
    hist_data = call.histograms->data_ptr<int64_t>();
  }

  // AMP (GradScaler): the kernel divides each gradient by grad_scale and stores it back.
  const float* grad_scale_ptr = grad_scale_pointer(call.grad_scale);
  const bool skip_step = call.found_inf.has_value() && read_scalar(*call.found_inf, "found_inf") != 0;
  if (call.lr_tensor.has_value()) lr = read_scalar(*call.lr_tensor, "lr");

  WorkList work(n);
  for (int64_t i = 0; i < n; ++i) {
    call.check_parameter(i, device);
    check_step_counter(call.state_steps[i], i);
    call.describe_parameter(i, work.tensor(i));
    work.add_items(i);
  }

  // Everything is validated: only now mutate (a bad argument must leave the state untouched).
  // AMP: a step with inf/NaN gradients is skipped whole (its step counters do not advance and its
  // statistics stay zero), exactly as torch's fused optimizers do with GradScaler.
  if (stats_data) std::memset(stats_data, 0, sizeof(double) * stats_rows_total * kNumStats);
  constexpr int64_t kHistRow = kNumHistograms * kHistBins;
  if (hist_data) std::memset(hist_data, 0, sizeof(int64_t) * stats_rows_total * kHistRow);
  if (skip_step) return;
  // The tensors of a group nearly always share their step number: the coefficients (four pow()
  // and two sqrt() in double) are computed once per distinct step, not once per tensor, which is
  // a fifth of the op's fixed cost per tensor for a model of many small tensors.
  double coeff_step = -1;
  ElementCoefficients<float> coeff_float{};
  ElementCoefficients<double> coeff_double{};
  for (int64_t i = 0; i < n; ++i) {
    const double step = advance_step(call.state_steps[i]);
    if (step != coeff_step) {
      const StepScalars scalars{lr, call.beta1, call.beta2, call.eps, call.weight_decay, step};
      coeff_float = make_coefficients<float>(scalars, algo, call.maximize, amsgrad);
      coeff_double = make_coefficients<double>(scalars, algo, call.maximize, amsgrad);
      coeff_step = step;
    }
    TensorArgs& t = work.tensor(i);
    t.coeff_float = coeff_float;
    t.coeff_double = coeff_double;
    if (algo == Algorithm::kAdamax && call.lr_tensor.has_value()) {
      adamax_tensor_lr_step_size(call.lr_tensor->scalar_type(), lr, call.beta1, step, t);
    }
  }

  work.run(algo, !call.prev_epoch_steps.empty(), grad_scale_ptr, stats_data, hist_data, call.stat_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CPU, m) {
  m.impl("adam_step", &adam_step_entry<adam_step_cpu>);
}

}  // namespace instrumented_adam::cpu
