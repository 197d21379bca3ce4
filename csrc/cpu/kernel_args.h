// Plain-data description of one fused step, passed from the torch glue (adam_cpu.cpp) to the
// per-instruction-set kernels (adam_kernel_isa.cpp, compiled once per ISA). No torch types here.
#pragma once

#include <cstdint>

#include <type_traits>

#include "../adam_math.h"
#include "../classic_rules.h"
#include "../kernel_tensor.h"

namespace instrumented_adam::cpu {

using instrumented_adam::DType;

// One parameter: its pointers (kernel_tensor.h) and the step's coefficients in the compute type.
struct TensorArgs : ParameterPointers {
  ElementCoefficients<float> coeff_float;    // used for fp32, bf16 and fp16 parameters
  ElementCoefficients<double> coeff_double;  // used for fp64 parameters
  // The same for the classic rules (SGD, RMSprop, Adagrad: classic_rules.h).
  ClassicCoefficients<float> classic_float;
  ClassicCoefficients<double> classic_double;
};

// The coefficients of `Rule` in the compute type O for one tensor.
template <class Rule, class O>
const typename Rule::template Coefficients<O>& coefficients_of(const TensorArgs& t) {
  using C = typename Rule::template Coefficients<O>;
  if constexpr (std::is_same_v<C, ElementCoefficients<O>>) {
    if constexpr (std::is_same_v<O, double>) return t.coeff_double; else return t.coeff_float;
  } else {
    static_assert(std::is_same_v<C, ClassicCoefficients<O>>, "a rule's coefficients live in TensorArgs");
    if constexpr (std::is_same_v<O, double>) return t.classic_double; else return t.classic_float;
  }
}

// Whether torch's remainder loop for this rule is partly auto-vectorised by its compiler, with the
// vector body's rounding in those lanes (Adam's fused kernel; see process_range). A rule whose
// torch counterpart computes every remainder element alike declares kTorchVectorisedTail = false.
template <class Rule, class = void>
struct TorchVectorisedTail : std::true_type {};
template <class Rule>
struct TorchVectorisedTail<Rule, std::void_t<decltype(Rule::kTorchVectorisedTail)>>
    : std::bool_constant<Rule::kTorchVectorisedTail> {};

// A contiguous range of one tensor; the unit of parallel work and of statistics partials.
struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct KernelArgs {
  Algorithm algorithm;  // picks the rule (process_items); its state tensors are TensorArgs::state
  bool stats;
  bool prev_dot;           // accumulate update_dot_prev_epoch (prev_step pointers are set)
  const float* grad_scale;  // AMP: divide the gradient by this and store it back; null otherwise
  const TensorArgs* tensors;
  const WorkItem* items;
  double* item_stats;  // [num_items][kNumStats] when stats
  // [num_items][kNumHistograms][kHistBins] when this step takes histograms (histogram.h), else null
  int64_t* item_hist = nullptr;
};

// Processes items [first, last). One definition per instruction set; the glue picks one at run
// time from at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY).
#define IA_DECLARE_ISA(isa) \
  namespace isa {           \
  void process_items(const KernelArgs& args, int64_t first, int64_t last); \
  }
IA_DECLARE_ISA(DEFAULT)
IA_DECLARE_ISA(AVX2)
IA_DECLARE_ISA(AVX512)
#undef IA_DECLARE_ISA

}  // namespace instrumented_adam::cpu
