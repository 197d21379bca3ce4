// What the CPU ops' glue shares (adam_cpu.cpp for the Adam family, classic_cpu.cpp for SGD,
// RMSprop and Adagrad): the scalar-tensor reads, the step counters, the instruction set, and the
// work list: every tensor of the call split into (tensor, chunk) items, processed in one parallel
// region, with the per-item statistics and histograms folded into the tensors' rows in item order
// (so the figures do not depend on the thread count). Each glue checks its arguments, fills the
// list's TensorArgs with its rule's pointers and coefficients, and calls run().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "../histogram.h"
#include "../stats_table.h"
#include "kernel_args.h"

namespace instrumented_adam::cpu {

// Elements per work item: large enough to amortise the per-item cost, small enough to balance
// two to a few dozen threads. A multiple of 64 so only a tensor's last item has a SIMD tail.
constexpr int64_t kChunk = 32768;
static_assert(kChunk <= kMaxHistogramItem, "a work item's histogram counts are 16-bit (histogram.h)");
// Below this many elements in a call, one thread does all the work (a parallel region costs more).
constexpr int64_t kParallelGrain = 65536;

// lr_tensor, found_inf: one-element CPU tensors read on the host.
inline double read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "instrumented_adam: ", what,
              " must be a one-element CPU tensor, got shape ", t.sizes(), " on ", t.device());
  return t.item<double>();
}

// GradScaler's scale, which the kernel divides each gradient by (and stores it back); null: none.
inline const float* grad_scale_pointer(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value()) return nullptr;
  TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1 && grad_scale->device().is_cpu(),
              "instrumented_adam: grad_scale must be a one-element float32 CPU tensor");
  return grad_scale->data_ptr<float>();
}

inline void check_step_counter(const at::Tensor& step_t, int64_t i) {
  TORCH_CHECK(step_t.numel() == 1 && step_t.device().is_cpu() &&
                  (step_t.scalar_type() == at::kFloat || step_t.scalar_type() == at::kDouble),
              "instrumented_adam: state_steps[", i, "] must be a one-element float32/float64 CPU tensor");
}

// Adds 1 to a step counter in its own dtype (as torch's _foreach_add_(steps, 1)); returns the new value.
inline double advance_step(const at::Tensor& step_t) {
  if (step_t.scalar_type() == at::kFloat) {
    float* s = step_t.data_ptr<float>();
    return *s += 1.0f;
  }
  double* s = step_t.data_ptr<double>();
  return *s += 1.0;
}

using ProcessItems = void (*)(const KernelArgs&, int64_t, int64_t);

// The instruction set torch dispatches its own kernels to (ATEN_CPU_CAPABILITY lowers it).
inline ProcessItems select_isa() {
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

class WorkList {
 public:
  explicit WorkList(int64_t num_tensors) : tensors_(static_cast<size_t>(num_tensors)) {}

  TensorArgs& tensor(int64_t i) { return tensors_[static_cast<size_t>(i)]; }

  // Splits tensor i (its numel set) into items.
  void add_items(int64_t i) {
    const int64_t numel = tensors_[static_cast<size_t>(i)].numel;
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      items_.push_back({i, begin, std::min(begin + kChunk, numel)});
      item_starts_.push_back(total_ + begin);
    }
    total_ += numel;
  }

  // Runs every item and writes tensor i's statistics into row stat_rows[i] (or i) of stats_data
  // (kNumStats doubles per row) and its histograms likewise into hist_data (rows of
  // kNumHistograms × kHistBins, which must be zero); either may be null.
  void run(Algorithm algorithm, bool prev_dot, const float* grad_scale, double* stats_data, int64_t* hist_data,
           at::IntArrayRef stat_rows) const {
    const int64_t num_items = static_cast<int64_t>(items_.size());
    std::vector<double> item_stats(stats_data ? num_items * kNumStats : 0);
    KernelArgs args{algorithm, stats_data != nullptr, prev_dot, grad_scale, tensors_.data(), items_.data(),
                    item_stats.data()};
    constexpr int64_t kHistRow = kNumHistograms * kHistBins;
    // Per-item histogram counts, each written whole by its item (no zeroing needed).
    std::unique_ptr<int64_t[]> item_hist(hist_data ? new int64_t[num_items * kHistRow] : nullptr);
    args.item_hist = item_hist.get();
    const ProcessItems process_items = select_isa();
    // Threads get equal element ranges; each processes the items that start in its range, so
    // many small tensors share one parallel region and the partials do not depend on thread count.
    at::parallel_for(0, total_, kParallelGrain, [&](int64_t begin, int64_t end) {
      const auto first = std::lower_bound(item_starts_.begin(), item_starts_.end(), begin) - item_starts_.begin();
      const auto last = std::lower_bound(item_starts_.begin(), item_starts_.end(), end) - item_starts_.begin();
      process_items(args, first, last);
    });
    const auto row_of = [&](int64_t tensor) { return stat_rows.empty() ? tensor : stat_rows[tensor]; };
    if (stats_data) {
      for (int64_t k = 0; k < num_items; ++k) {
        double* row = stats_data + row_of(items_[k].tensor) * kNumStats;
        const double* partial = item_stats.data() + k * kNumStats;
        for (int s = 0; s < kNumStats; ++s) {
          // A tensor's first item starts its row; later ones combine as the table says.
          row[s] = items_[k].begin == 0 ? partial[s] : combine_partials(s, row[s], partial[s]);
        }
      }
    }
    if (hist_data) {  // integer counts: the sum does not depend on the order
      for (int64_t k = 0; k < num_items; ++k) {
        int64_t* row = hist_data + row_of(items_[k].tensor) * kHistRow;
        const int64_t* partial = item_hist.get() + k * kHistRow;
        for (int64_t b = 0; b < kHistRow; ++b) row[b] += partial[b];
      }
    }
  }

 private:
  std::vector<TensorArgs> tensors_;
  std::vector<WorkItem> items_;
  std::vector<int64_t> item_starts_;  // element offset of each item in the whole call, for balancing
  int64_t total_ = 0;
};

}  // namespace instrumented_adam::cpu
