// CPU implementation of instrumented_adam::sgd_step, rmsprop_step and adagrad_step (schemas:
// csrc/ops.cpp): argument checks and per-tensor constants (ClassicCoefficients, classic_rules.h);
// the work list, its parallel region and the fold of the statistics are the Adam family's
// (work_list.h). The arithmetic is the rules' (classic_rules.h), run by the shared per-ISA harness
// (adam_kernel_isa.cpp).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <optional>

#include "../classic_call.h"
#include "work_list.h"

#include <ATen/Config.h>

// torch's CPU sqrt of float32/float64 tensors is MKL's vsSqrt/vdSqrt (at::vml) when torch is
// built with MKL: not IEEE's correctly rounded sqrt (an ulp off for ~15% of float32 values). RMSprop
// calls the same functions, resolved weakly from libtorch_cpu, so that it matches torch bitwise.
#if AT_MKL_ENABLED()
extern "C" void vsSqrt(int n, const float* a, float* r) __attribute__((weak));
extern "C" void vdSqrt(int n, const double* a, double* r) __attribute__((weak));
#endif

namespace instrumented_adam::cpu {
namespace {

void (*torch_sqrt_float())(int, const float*, float*) {
#if AT_MKL_ENABLED()
  return &vsSqrt;  // null when the symbol is absent
#else
  return nullptr;
#endif
}
void (*torch_sqrt_double())(int, const double*, double*) {
#if AT_MKL_ENABLED()
  return &vdSqrt;
#else
  return nullptr;
#endif
}

// Fills t's coefficients for parameter i at step `step` (the counter after its increment, or 0).
using MakeCoefficients = std::function<void(int64_t i, double lr, double step, at::ScalarType dtype, TensorArgs& t)>;


void run_classic(const ClassicCall& call, const MakeCoefficients& make) {
  call.check_lists();
  const int64_t n = static_cast<int64_t>(call.params.size());
  const at::Device device(at::kCPU);
  double* stats_data = nullptr;
  int64_t stats_rows_total = 0;
  if (call.stats.has_value()) {
    stats_rows_total = check_stats_buffer(*call.stats, device, n, call.stat_rows);
    stats_data = call.stats->data_ptr<double>();
  }
  const float* grad_scale_ptr = grad_scale_pointer(call.grad_scale);
  const bool skip_step = call.found_inf.has_value() && read_scalar(*call.found_inf, "found_inf") != 0;
  const double lr = call.lr_tensor.has_value() ? read_scalar(*call.lr_tensor, "lr") : call.lr;

  WorkList work(n);
  for (int64_t i = 0; i < n; ++i) {
    call.check_parameter(i, device, /*allow_compact_prev=*/true);
    if (call.has_steps) check_step_counter(call.state_steps[i], i);
    call.describe_parameter(i, work.tensor(i), /*packed=*/false);
    work.add_items(i);
  }

  // Validated: only now mutate. found_inf skips the whole step (counters and statistics too).
  if (stats_data) std::memset(stats_data, 0, sizeof(double) * stats_rows_total * kNumStats);
  if (skip_step) return;
  for (int64_t i = 0; i < n; ++i) {
    const double step = call.has_steps ? advance_step(call.state_steps[i]) : 0.0;
    make(i, lr, step, call.params[i].scalar_type(), work.tensor(i));
  }
  work.run(call.algorithm, !call.prev_epoch_steps.empty(), grad_scale_ptr, stats_data, nullptr, call.stat_rows);
}

// x rounded to the storage type of a bf16/fp16 parameter and back (torch's `fVec(scalar_t(x))`).
float round_to_storage(double x, at::ScalarType dtype) {
  const float f = static_cast<float>(x);
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(f));
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(f));
  return f;
}

template <class O>
ClassicCoefficients<O> zero_coefficients() {
  ClassicCoefficients<O> c{};
  return c;
}

// Both compute types from the double values; `vector_rounding` rounds the vector body's copies of
// lr, weight decay and eps to a reduced storage type as torch's fused Adagrad does.
void fill_common(TensorArgs& t, double lr, double weight_decay, double eps, bool maximize, at::ScalarType dtype,
                 bool vector_rounding) {
  auto& f = t.classic_float;
  auto& d = t.classic_double;
  f = zero_coefficients<float>();
  d = zero_coefficients<double>();
  const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
  const auto vec = [&](double x) { return vector_rounding && reduced ? round_to_storage(x, dtype) : static_cast<float>(x); };
  f.lr = vec(lr);
  f.neg_lr = vector_rounding && reduced ? -vec(lr) : static_cast<float>(-lr);
  f.weight_decay = vec(weight_decay);
  f.eps = vec(eps);
  f.tail_lr = static_cast<float>(lr);
  f.tail_weight_decay = static_cast<float>(weight_decay);
  f.tail_eps = static_cast<float>(eps);
  d.lr = d.tail_lr = lr;
  d.neg_lr = -lr;
  d.weight_decay = d.tail_weight_decay = weight_decay;
  d.eps = d.tail_eps = eps;
  f.has_weight_decay = d.has_weight_decay = weight_decay != 0;
  f.maximize = d.maximize = maximize;
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
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
  run_classic(call, [&](int64_t i, double lr_now, double, at::ScalarType dtype, TensorArgs& t) {
    fill_common(t, lr_now, weight_decay, 0.0, maximize, dtype, false);
    const bool first = !first_step.empty() && first_step[i] != 0;
    t.classic_float.momentum = static_cast<float>(momentum);
    t.classic_float.one_minus_dampening = static_cast<float>(1 - dampening);
    t.classic_double.momentum = momentum;
    t.classic_double.one_minus_dampening = 1 - dampening;
    t.classic_float.has_momentum = t.classic_double.has_momentum = has_momentum;
    t.classic_float.nesterov = t.classic_double.nesterov = nesterov;
    t.classic_float.first_step = t.classic_double.first_step = first;
  });
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList momentum_buffers, at::TensorList grad_avgs, at::TensorList prev_epoch_steps,
                      at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor, double alpha,
                      double eps, double weight_decay, double momentum, bool centered, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& stats, at::IntArrayRef stat_rows) {
  const bool has_momentum = momentum > 0;
  const ClassicCall call{"rmsprop_step", Algorithm::kRmsprop, params, grads,
                         {{square_avgs, "square_avgs", true},
                          {momentum_buffers, "momentum_buffers", has_momentum},
                          {grad_avgs, "grad_avgs", centered}},
                         prev_epoch_steps, state_steps, true, lr, lr_tensor, grad_scale, found_inf, stats, stat_rows};
  run_classic(call, [&](int64_t, double lr_now, double, at::ScalarType dtype, TensorArgs& t) {
    fill_common(t, lr_now, weight_decay, eps, maximize, dtype, false);
    const auto set = [&](auto& c, auto cast) {
      using O = decltype(cast(0.0));
      c.alpha = O(alpha);
      c.one_minus_alpha = O(1 - alpha);
      c.momentum = O(momentum);
      // grad_avg.lerp_(grad, 1 - alpha): torch's lerp rounds the weight, then picks its end.
      const O weight = O(1 - alpha);
      c.lerp_from_grad = !(std::abs(weight) < O(0.5));
      c.lerp_coeff = c.lerp_from_grad ? weight - O(1) : weight;
      c.has_momentum = has_momentum;
      c.centered = centered;
    };
    set(t.classic_float, [](double x) { return static_cast<float>(x); });
    // bf16/fp16: torch's sqrt of those is its own vectorised IEEE sqrt in fp32.
    if (dtype == at::kFloat) t.classic_float.cpu_sqrt = torch_sqrt_float();
    if (dtype == at::kDouble) t.classic_double.cpu_sqrt = torch_sqrt_double();
    set(t.classic_double, [](double x) { return x; });
  });
}

void adagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                      at::TensorList prev_epoch_steps, at::TensorList state_steps, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double lr_decay, double weight_decay, double eps,
                      bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& stats,
                      at::IntArrayRef stat_rows) {
  const ClassicCall call{"adagrad_step", Algorithm::kAdagrad, params, grads,
                         {{state_sums, "state_sums", true}, {{}, nullptr, false}, {{}, nullptr, false}},
                         prev_epoch_steps, state_steps, true, lr, lr_tensor, grad_scale, found_inf, stats, stat_rows};
  run_classic(call, [&](int64_t, double lr_now, double step, at::ScalarType dtype, TensorArgs& t) {
    // torch: clr = lr / (1 + (step - 1) * lr_decay) in double, with the float32 counter's value.
    const double clr = lr_now / (1.0 + (step - 1.0) * lr_decay);
    fill_common(t, clr, weight_decay, eps, maximize, dtype, true);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("rmsprop_step", &rmsprop_step_cpu);
  m.impl("adagrad_step", &adagrad_step_cpu);
}

}  // namespace instrumented_adam::cpu
