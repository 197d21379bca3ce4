// Argument checks of instrumented_adam::adam_step shared by the CPU and CUDA glue: the op's
// contract (csrc/ops.cpp) is validated in one place, before anything is mutated, with the same
// messages on every device. Device-specific checks (scalar tensors, step dtypes) stay in the glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "histogram.h"
#include "kernel_tensor.h"
#include "stats_table.h"

namespace instrumented_adam {

// The parameter dtypes the kernels support, in any enum that names them kFloat/kDouble/...
template <class DTypeEnum>
DTypeEnum kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DTypeEnum::kFloat;
    case at::kDouble: return DTypeEnum::kDouble;
    case at::kBFloat16: return DTypeEnum::kBFloat16;
    case at::kHalf: return DTypeEnum::kHalf;
    default:
      TORCH_CHECK(false, "instrumented_adam: parameters must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

inline void check_list_lengths(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList second_moments, at::TensorList max_second_moments,
                               at::TensorList prev_epoch_steps, at::TensorList state_steps, at::IntArrayRef stat_rows,
                               int64_t algorithm, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(algorithm >= 0 && algorithm <= 2, "instrumented_adam: unknown algorithm ", algorithm);
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && second_moments.size() == n && state_steps.size() == n,
              "instrumented_adam: params, grads, exp_avgs, second moments and steps must have the same length");
  TORCH_CHECK(!amsgrad || max_second_moments.size() == n,
              "instrumented_adam: amsgrad needs one max_exp_avg_sq per parameter");
  TORCH_CHECK(prev_epoch_steps.empty() || prev_epoch_steps.size() == n,
              "instrumented_adam: prev_epoch_steps must be empty or have one tensor per parameter");
  TORCH_CHECK(stat_rows.empty() || stat_rows.size() == n,
              "instrumented_adam: stat_rows must be empty or have one row per parameter");
}

// Every tensor the kernel reads for a parameter must share the parameter's device, dtype, size and
// memory layout (any dense layout: the kernels walk the underlying storage linearly).
// allow_bfloat16: `other` may also be bfloat16 (a compact previous-epoch step, check_prev_step).
inline void check_companion(const at::Tensor& param, const at::Tensor& other, const char* what, int64_t i,
                            bool allow_bfloat16 = false) {
  TORCH_CHECK(other.device() == param.device(), "instrumented_adam: ", what, "[", i, "] is on ", other.device(),
              " but its parameter is on ", param.device());
  TORCH_CHECK(other.scalar_type() == param.scalar_type() || (allow_bfloat16 && other.scalar_type() == at::kBFloat16),
              "instrumented_adam: ", what, "[", i, "] has dtype ", other.scalar_type(),
              " but its parameter has dtype ", param.scalar_type(), allow_bfloat16 ? " (or bfloat16)" : "");
  TORCH_CHECK(other.sizes().equals(param.sizes()), "instrumented_adam: ", what, "[", i, "] has shape ",
              other.sizes(), " but its parameter has shape ", param.sizes());
  TORCH_CHECK(other.numel() == 0 || other.strides().equals(param.strides()), "instrumented_adam: ", what, "[", i,
              "] has strides ", other.strides(), " but its parameter has strides ", param.strides(),
              " (the Python optimizer re-lays such tensors out before calling the op)");
}

// The previous epoch's step of a parameter: a companion except that it may also be stored in
// bfloat16 whatever the parameter's dtype (compact epoch buffers).
inline void check_prev_step(const at::Tensor& param, const at::Tensor& prev, const char* what, int64_t i) {
  check_companion(param, prev, what, i, /*allow_bfloat16=*/true);
}

// Parameter i itself, on `device`, and its gradient: the checks every op (Adam's, the classic
// ones) makes before its state's.
inline void check_parameter_and_grad(const at::Tensor& p, const at::Tensor& grad, int64_t i,
                                     const at::Device& device) {
  TORCH_CHECK(p.device() == device, "instrumented_adam: params[", i, "] is on ", p.device(), " but the call is on ",
              device, "; use one optimizer per device");
  TORCH_CHECK(!p.is_complex(), "instrumented_adam: complex parameters are not supported (params[", i,
              "]); view them as real with torch.view_as_real");
  TORCH_CHECK(p.layout() == at::kStrided, "instrumented_adam: params[", i, "] must be a strided tensor");
  TORCH_CHECK(grad.layout() == at::kStrided, "instrumented_adam: sparse gradients are not supported");
  TORCH_CHECK(p.numel() == 0 || p.is_non_overlapping_and_dense(), "instrumented_adam: params[", i,
              "] is not dense (strides ", p.strides(), "); the Python optimizer handles such parameters");
  (void)kernel_dtype<DType>(p);  // the supported dtypes, with the shared message
  check_companion(p, grad, "grads", i);
}

// Parameter i and the tensors that go with it, on `device`.
inline void check_parameter(const at::Tensor& p, int64_t i, const at::Device& device, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList second_moments,
                            at::TensorList max_second_moments, at::TensorList prev_epoch_steps, bool amsgrad) {
  check_parameter_and_grad(p, grads[i], i, device);
  check_companion(p, exp_avgs[i], "exp_avgs", i);
  check_companion(p, second_moments[i], "second_moments", i);
  if (amsgrad) check_companion(p, max_second_moments[i], "max_second_moments", i);
  if (!prev_epoch_steps.empty()) check_prev_step(p, prev_epoch_steps[i], "prev_epoch_steps", i);
}

// The statistics buffer: [rows, kNumStats] float64, contiguous, on `device`; parameter i writes row
// stat_rows[i] (or i), each row at most once. Returns the number of rows.
inline int64_t check_stats_buffer(const at::Tensor& s, const at::Device& device, int64_t num_params,
                                  at::IntArrayRef stat_rows) {
  TORCH_CHECK(s.device() == device && s.scalar_type() == at::kDouble && s.dim() == 2 && s.size(1) == kNumStats &&
                  s.is_contiguous(),
              "instrumented_adam: stats must be a contiguous float64 tensor of shape [rows, ", kNumStats, "] on ",
              device, ", got ", s.scalar_type(), " ", s.sizes(), " on ", s.device());
  const int64_t rows = s.size(0);
  TORCH_CHECK(!stat_rows.empty() || rows == num_params, "instrumented_adam: stats has ", rows, " rows for ",
              num_params, " parameters");
  std::vector<bool> used(static_cast<size_t>(rows), false);
  for (int64_t row : stat_rows) {
    TORCH_CHECK(row >= 0 && row < rows, "instrumented_adam: stat row ", row, " out of range");
    TORCH_CHECK(!used[static_cast<size_t>(row)], "instrumented_adam: stat row ", row, " is used twice");
    used[static_cast<size_t>(row)] = true;
  }
  return rows;
}

// The histograms buffer of a step (histogram.h): one [kNumHistograms, kHistBins] int64 block per
// row of the statistics buffer, which it needs (histograms are taken on statistics steps).
inline void check_histogram_buffer(const at::Tensor& h, const std::optional<at::Tensor>& stats,
                                   const at::Device& device) {
  TORCH_CHECK(stats.has_value(), "instrumented_adam: histograms need stats (they are taken on statistics steps)");
  TORCH_CHECK(h.device() == device && h.scalar_type() == at::kLong && h.dim() == 3 && h.size(0) == stats->size(0) &&
                  h.size(1) == kNumHistograms && h.size(2) == kHistBins && h.is_contiguous(),
              "instrumented_adam: histograms must be a contiguous int64 tensor of shape [", stats->size(0), ", ",
              kNumHistograms, ", ", kHistBins, "] on ", device, ", got ", h.scalar_type(), " ", h.sizes(), " on ",
              h.device());
}

}  // namespace instrumented_adam
