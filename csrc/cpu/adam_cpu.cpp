// CPU implementation of instrumented_adam::adam_step: argument checks, per-tensor step scalars,
// the (tensor, chunk) work list, the parallel loop and the deterministic reduction of the
// per-chunk statistics. The arithmetic itself is in adam_kernel_isa.cpp / adam_math.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../adam_step_call.h"
#include "kernel_args.h"

namespace instrumented_adam::cpu {
namespace {

// Elements per work item: large enough to amortise the per-item cost, small enough to balance
// two to a few dozen threads. A multiple of 64 so only a tensor's last item has a SIMD tail.
constexpr int64_t kChunk = 32768;
static_assert(kChunk <= kMaxHistogramItem, "a work item's histogram counts are 16-bit (histogram.h)");
// Below this many elements in a call, one thread does all the work (a parallel region costs more).
constexpr int64_t kParallelGrain = 65536;

double read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "instrumented_adam: ", what,
              " must be a one-element CPU tensor, got shape ", t.sizes(), " on ", t.device());
  return t.item<double>();
}

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

using ProcessItems = void (*)(const KernelArgs&, int64_t, int64_t);

// The instruction set torch dispatches its own kernels to (ATEN_CPU_CAPABILITY lowers it).
ProcessItems select_isa() {
  static const ProcessItems chosen = [] {
    const std::string capability = at::get_cpu_capability();
// The build defines IA_HAVE_ISA_<isa> for each copy it compiled (setup.py; CMake builds all three).
#if defined(IA_HAVE_ISA_AVX512)
    if (capability == "AVX512") return &AVX512::process_items;
#endif
#if defined(IA_HAVE_ISA_AVX2)
    if (capability == "AVX512" || capability == "AVX2") return &AVX2::process_items;
#endif
    return &DEFAULT::process_items;
  }();
  return chosen;
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
  const float* grad_scale_ptr = nullptr;
  if (call.grad_scale.has_value()) {
    TORCH_CHECK(call.grad_scale->scalar_type() == at::kFloat && call.grad_scale->numel() == 1 && call.grad_scale->device().is_cpu(),
                "instrumented_adam: grad_scale must be a one-element float32 CPU tensor");
    grad_scale_ptr = call.grad_scale->data_ptr<float>();
  }
  const bool skip_step = call.found_inf.has_value() && read_scalar(*call.found_inf, "found_inf") != 0;
  if (call.lr_tensor.has_value()) lr = read_scalar(*call.lr_tensor, "lr");

  std::vector<TensorArgs> tensors(n);
  std::vector<WorkItem> items;
  std::vector<int64_t> item_starts;  // element offset of each item in the whole call, for balancing
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    call.check_parameter(i, device);
    const at::Tensor& step_t = call.state_steps[i];
    TORCH_CHECK(step_t.numel() == 1 && step_t.device().is_cpu() &&
                    (step_t.scalar_type() == at::kFloat || step_t.scalar_type() == at::kDouble),
                "instrumented_adam: state_steps[", i, "] must be a one-element float32/float64 CPU tensor");
    TensorArgs& t = tensors[i];
    call.describe_parameter(i, t);
    for (int64_t begin = 0; begin < t.numel; begin += kChunk) {
      items.push_back({i, begin, std::min(begin + kChunk, t.numel)});
      item_starts.push_back(total + begin);
    }
    total += t.numel;
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
    const at::Tensor& step_t = call.state_steps[i];
    double step;
    if (step_t.scalar_type() == at::kFloat) {
      float* s = step_t.data_ptr<float>();
      step = *s += 1.0f;
    } else {
      double* s = step_t.data_ptr<double>();
      step = *s += 1.0;
    }
    if (step != coeff_step) {
      const StepScalars scalars{lr, call.beta1, call.beta2, call.eps, call.weight_decay, step};
      coeff_float = make_coefficients<float>(scalars, algo, call.maximize, amsgrad);
      coeff_double = make_coefficients<double>(scalars, algo, call.maximize, amsgrad);
      coeff_step = step;
    }
    tensors[i].coeff_float = coeff_float;
    tensors[i].coeff_double = coeff_double;
    if (algo == Algorithm::kAdamax && call.lr_tensor.has_value()) {
      adamax_tensor_lr_step_size(call.lr_tensor->scalar_type(), lr, call.beta1, step, tensors[i]);
    }
  }

  const int64_t num_items = static_cast<int64_t>(items.size());
  std::vector<double> item_stats(stats_data ? num_items * kNumStats : 0);
  KernelArgs args{algo,           stats_data != nullptr, !call.prev_epoch_steps.empty(),
                  grad_scale_ptr, tensors.data(),        items.data(),
                  item_stats.data()};
  // Per-item histogram counts, each written whole by its item (no zeroing needed).
  std::unique_ptr<int64_t[]> item_hist(hist_data ? new int64_t[num_items * kHistRow] : nullptr);
  args.item_hist = item_hist.get();
  const auto process_items = select_isa();
  // Threads get equal element ranges; each processes the items that start in its range, so
  // many small tensors share one parallel region and the partials do not depend on thread count.
  at::parallel_for(0, total, kParallelGrain, [&](int64_t begin, int64_t end) {
    const auto first = std::lower_bound(item_starts.begin(), item_starts.end(), begin) - item_starts.begin();
    const auto last = std::lower_bound(item_starts.begin(), item_starts.end(), end) - item_starts.begin();
    process_items(args, first, last);
  });

  if (stats_data) {
    for (int64_t k = 0; k < num_items; ++k) {
      const int64_t tensor = items[k].tensor;
      double* row = stats_data + (call.stat_rows.empty() ? tensor : call.stat_rows[tensor]) * kNumStats;
      const double* partial = item_stats.data() + k * kNumStats;
      for (int s = 0; s < kNumStats; ++s) {
        // A tensor's first item starts its row; later ones combine as the table says.
        row[s] = items[k].begin == 0 ? partial[s] : combine_partials(s, row[s], partial[s]);
      }
    }
  }
  if (hist_data) {  // integer counts: the sum does not depend on the order
    for (int64_t k = 0; k < num_items; ++k) {
      const int64_t tensor = items[k].tensor;
      int64_t* row = hist_data + (call.stat_rows.empty() ? tensor : call.stat_rows[tensor]) * kHistRow;
      const int64_t* partial = item_hist.get() + k * kHistRow;
      for (int64_t b = 0; b < kHistRow; ++b) row[b] += partial[b];
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(instrumented_adam, CPU, m) {
  m.impl("adam_step", &adam_step_entry<adam_step_cpu>);
}

}  // namespace instrumented_adam::cpu
