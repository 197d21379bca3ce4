// CPU implementation of the epoch-boundary ops (csrc/ops.cpp): one parallel pass over every
// tensor, float64 accumulation (separate multiply and add: the glue is built with
// -ffp-contract=off, and std::fma would be a library call without -mfma), per-chunk partials reduced in chunk order (the
// figures do not depend on the thread count, and sum_of_squares reproduces epoch_geometry's last
// column bit for bit). Once per epoch, so plain scalar loops: memory-bound anyway. The previous
// step and θ₀ may be stored in bfloat16 (compact epoch buffers); θ_end is always the parameter's
// type; without θ₀ (an empty initial_params list) the distance column is NaN.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../op_checks.h"

namespace instrumented_adam::cpu {
namespace {

constexpr int64_t kChunk = 32768;
constexpr int64_t kParallelGrain = 65536;
constexpr int kEpochColumns = 5;  // step_sumsq, step_dot_prev, prev_sumsq, distance_sumsq, stored_step_sumsq

struct Range {
  int64_t tensor, begin, end;
};

// Splits tensors into chunks, runs fn(range, partials) over them in parallel (threads get equal
// element ranges, as in the step) and sums the partials per tensor in chunk order into out.
template <class Fn>
void for_each_chunk(const std::vector<int64_t>& numels, int columns, double* out, Fn fn) {
  std::vector<Range> ranges;
  std::vector<int64_t> starts;
  int64_t total = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunk) {
      ranges.push_back({i, b, std::min(b + kChunk, numels[i])});
      starts.push_back(total + b);
    }
    total += numels[i];
  }
  std::vector<double> partials(ranges.size() * columns, 0.0);
  at::parallel_for(0, total, kParallelGrain, [&](int64_t begin, int64_t end) {
    const auto first = std::lower_bound(starts.begin(), starts.end(), begin) - starts.begin();
    const auto last = std::lower_bound(starts.begin(), starts.end(), end) - starts.begin();
    for (auto k = first; k < last; ++k) fn(ranges[k], partials.data() + k * columns);
  });
  std::fill(out, out + numels.size() * columns, 0.0);
  for (size_t k = 0; k < ranges.size(); ++k) {
    for (int j = 0; j < columns; ++j) out[ranges[k].tensor * columns + j] += partials[k * columns + j];
  }
}

// T: the parameter's type (and θ_end's, which stays exact); P: the previous step's storage type
// (T, or bfloat16 for compact buffers); I: θ₀'s (T or bfloat16), ignored without θ₀ (then the
// distance column is NaN: not measured).
template <class T, class P, class I>
void epoch_range(const at::Tensor& theta_t, const at::Tensor& start_t, const at::Tensor& prev_t,
                 const at::Tensor* initial_t, bool has_prev, const Range& r, double* acc) {
  const T* theta = static_cast<const T*>(theta_t.const_data_ptr());
  T* start = static_cast<T*>(start_t.data_ptr());
  P* prev = static_cast<P*>(prev_t.data_ptr());
  const I* initial = initial_t != nullptr ? static_cast<const I*>(initial_t->const_data_ptr()) : nullptr;
  double step = 0, dot = 0, prev_sq = 0, dist = 0, stored_sq = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const double t = static_cast<double>(theta[i]);
    const double s = t - static_cast<double>(start[i]);
    step += s * s;
    if (has_prev) {
      const double q = static_cast<double>(prev[i]);
      dot += s * q;
      prev_sq += q * q;
    }
    if (initial != nullptr) {
      const double d = t - static_cast<double>(initial[i]);
      dist += d * d;
    }
    // Rounded as torch's copy_ rounds a double (to float, then to P): the torch path gives the same bits.
    const P stored = static_cast<P>(s);
    const double sd = static_cast<double>(stored);
    stored_sq += sd * sd;
    prev[i] = stored;
    start[i] = theta[i];
  }
  acc[0] = step;
  acc[1] = dot;
  acc[2] = prev_sq;
  acc[3] = initial != nullptr ? dist : std::numeric_limits<double>::quiet_NaN();
  acc[4] = stored_sq;
}

template <class T>
void sumsq_range(const at::Tensor& t_t, const Range& r, double* acc) {
  const T* t = static_cast<const T*>(t_t.const_data_ptr());
  double sq = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const double x = static_cast<double>(t[i]);
    sq += x * x;
  }
  acc[0] = sq;
}

template <class Fn>
void dispatch_type(const at::Tensor& t, Fn fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "instrumented_adam: unsupported dtype ", t.scalar_type());
  }
}

void check_out(const at::Tensor& out, int64_t rows, int64_t columns) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kDouble && out.is_contiguous() &&
                  out.numel() == rows * columns && out.size(0) == rows,
              "instrumented_adam: out must be a contiguous float64 CPU tensor with ", rows, " rows of ", columns,
              ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
}

void check_dense_cpu(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && !t.is_complex() &&
                  (t.numel() == 0 || t.is_non_overlapping_and_dense()),
              "instrumented_adam: ", what, "[", i, "] must be a dense real CPU tensor");
}

// A previous-step or θ₀ buffer: the parameter's type or bfloat16 (compact epoch buffers).
void check_epoch_buffer(const at::Tensor& param, const at::Tensor& buffer, const char* what, int64_t i) {
  check_companion(param, buffer, what, i, /*allow_bfloat16=*/true);
}

template <class Fn>
void dispatch_same_or_bf16(const at::Tensor& param, const at::Tensor* buffer, Fn fn) {
  dispatch_type(param, [&](auto tag) {
    using T = decltype(tag);
    if (buffer != nullptr && buffer->scalar_type() == at::kBFloat16) fn(tag, c10::BFloat16{}); else fn(tag, T{});
  });
}

void epoch_geometry_cpu(at::TensorList params, at::TensorList epoch_starts, at::TensorList prev_steps,
                        at::TensorList initial_params, bool has_prev, const at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(epoch_starts.size() == params.size() && prev_steps.size() == params.size() &&
                  (initial_params.empty() || initial_params.size() == params.size()),
              "instrumented_adam: params, epoch starts and previous steps must have the same length, and initial "
              "params the same or none");
  check_out(out, n, kEpochColumns);
  std::vector<int64_t> numels;
  for (int64_t i = 0; i < n; ++i) {
    check_dense_cpu(params[i], "params", i);
    const auto dtype = params[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "instrumented_adam: params[", i, "] has unsupported dtype ", dtype);
    check_companion(params[i], epoch_starts[i], "epoch_starts", i);
    check_epoch_buffer(params[i], prev_steps[i], "prev_steps", i);
    if (!initial_params.empty()) check_epoch_buffer(params[i], initial_params[i], "initial_params", i);
    numels.push_back(params[i].numel());
  }
  const bool has_initial = !initial_params.empty();
  for_each_chunk(numels, kEpochColumns, out.data_ptr<double>(), [&](const Range& r, double* acc) {
    const int64_t i = r.tensor;
    const at::Tensor* initial = has_initial ? &initial_params[i] : nullptr;
    dispatch_same_or_bf16(params[i], &prev_steps[i], [&](auto tag, auto prev_tag) {
      using T = decltype(tag);
      using P = decltype(prev_tag);
      dispatch_same_or_bf16(params[i], initial, [&](auto, auto initial_tag) {
        epoch_range<T, P, decltype(initial_tag)>(params[i], epoch_starts[i], prev_steps[i], initial, has_prev, r,
                                                 acc);
      });
    });
  });
}

void sum_of_squares_cpu(at::TensorList tensors, const at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  check_out(out, n, 1);
  std::vector<int64_t> numels;
  for (int64_t i = 0; i < n; ++i) {
    check_dense_cpu(tensors[i], "tensors", i);
    const auto dtype = tensors[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "instrumented_adam: tensors[", i, "] has unsupported dtype ", dtype);
    numels.push_back(tensors[i].numel());
  }
  for_each_chunk(numels, 1, out.data_ptr<double>(), [&](const Range& r, double* acc) {
    dispatch_type(tensors[r.tensor], [&](auto tag) { sumsq_range<decltype(tag)>(tensors[r.tensor], r, acc); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CPU, m) {
  m.impl("epoch_geometry", &epoch_geometry_cpu);
  m.impl("sum_of_squares", &sum_of_squares_cpu);
}

}  // namespace instrumented_adam::cpu
