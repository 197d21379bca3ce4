// The one place the op signatures live. Kernels register implementations per device
// (cpu/adam_cpu.cpp, cuda/adam_cuda.cpp); instrumented_adam/_ops.py registers the fake kernels.
#include <torch/library.h>

TORCH_LIBRARY(instrumented_adam, m) {
  // One fused Adam / AdamW / Adamax step over a list of parameters.
  //   algorithm: 0 Adam (L2 weight decay), 1 AdamW (decoupled), 2 Adamax
  //   second_moments: exp_avg_sq (Adam, AdamW) or exp_inf (Adamax)
  //   max_second_moments: max_exp_avg_sq when amsgrad, else empty
  //   prev_epoch_steps: s_{k-1} per parameter for update_dot_prev_epoch, or empty
  //   state_steps: incremented by the op (not when found_inf is set)
  //   lr_tensor: when given, overrides lr (a one-element tensor, on the device for CUDA)
  //   grad_scale / found_inf: GradScaler's tensors; grads are unscaled in place
  //   stats: [rows, num_stats] float64, zeroed and filled; stat_rows maps parameter i to a row
  //          (empty: row i). Rows of parameters not in this call stay zero.
  //   histograms: [rows, 3, 258] int64 (csrc/histogram.h: |g|, |Δθ|, effective step size, log2
  //          bins), zeroed and filled with the same rows as stats; needs stats. None: no histograms.
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] second_moments, Tensor(e!)[] max_second_moments, Tensor[] prev_epoch_steps, "
      "Tensor(f!)[] state_steps, *, int algorithm, float lr, Tensor? lr_tensor, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(g!)? stats, int[] stat_rows, Tensor(h!)? histograms=None) -> ()");

  // The classic optimizers (classic_rules.h), one op each, with the statistics of the same table
  // and the same conventions as adam_step (lr_tensor, grad_scale/found_inf, stats/stat_rows,
  // prev_epoch_steps). State lists hold one tensor per parameter, or are empty when the option
  // that needs them is off.
  //   sgd_step: momentum_buffers (empty when momentum == 0); first_step: for each parameter 1
  //     when its momentum buffer is new (it becomes the gradient), 0 otherwise, or empty (none).
  //     SGD keeps no step counter.
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor[] prev_epoch_steps, *, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, int[] first_step, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor(d!)? stats, int[] stat_rows) -> ()");
  //   rmsprop_step: momentum_buffers (empty unless momentum > 0), grad_avgs (empty unless centered)
  m.def(
      "rmsprop_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] grad_avgs, Tensor[] prev_epoch_steps, "
      "Tensor(f!)[] state_steps, *, float lr, Tensor? lr_tensor, float alpha, float eps, float weight_decay, "
      "float momentum, bool centered, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(g!)? stats, int[] stat_rows) -> ()");
  //   adagrad_step: state_sums, the accumulated squared gradients
  m.def(
      "adagrad_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor[] prev_epoch_steps, Tensor(d!)[] state_steps, *, float lr, Tensor? lr_tensor, float lr_decay, "
      "float weight_decay, float eps, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(e!)? stats, int[] stat_rows) -> ()");

  // The epoch boundary, per tensor i, in float64: s = θ − start; out[i] = (‖s‖², ⟨s, prev⟩, ‖prev‖²,
  // ‖θ − initial‖², ‖s as stored‖²) with ⟨s, prev⟩ = ‖prev‖² = 0 unless has_prev; then prev ← s
  // (rounded to prev's dtype: θ's, or bfloat16) and start ← θ. initial (θ's dtype or bfloat16) may
  // be an empty list: the distance is then NaN. out: [n, 5] float64.
  // adam_step's prev_epoch_steps may likewise be bfloat16 for any parameter dtype.
  m.def(
      "epoch_geometry(Tensor[] params, Tensor(a!)[] epoch_starts, Tensor(b!)[] prev_steps, "
      "Tensor[] initial_params, bool has_prev, Tensor(c!) out) -> ()");
  // out[i] = Σ t_i² in float64, summed exactly as epoch_geometry sums ‖s as stored‖² (a checkpoint's
  // previous-epoch steps must give the same bits as the epoch that stored them).
  m.def("sum_of_squares(Tensor[] tensors, Tensor(a!) out) -> ()");
}
