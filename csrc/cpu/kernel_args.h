// Plain-data description of one fused step, passed from the torch glue (adam_cpu.cpp) to the
// per-instruction-set kernels (adam_kernel_isa.cpp, compiled once per ISA). No torch types here.
#pragma once

#include <cstdint>

#include "../adam_math.h"

namespace instrumented_adam::cpu {

enum class DType : int8_t { kFloat, kDouble, kBFloat16, kHalf };

struct TensorArgs {
  void* param;
  void* grad;
  void* exp_avg;
  void* second;            // exp_avg_sq (Adam/AdamW) or exp_inf (Adamax)
  void* max_second;        // max_exp_avg_sq (amsgrad) or null
  const void* prev_step;   // previous epoch's step s_{k-1} (same dtype as param) or null
  int64_t numel;
  DType dtype;
  ElementCoefficients<float> coeff_float;    // used for fp32, bf16 and fp16 parameters
  ElementCoefficients<double> coeff_double;  // used for fp64 parameters
};

// A contiguous range of one tensor; the unit of parallel work and of statistics partials.
struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct KernelArgs {
  Algorithm algorithm;
  bool amsgrad;
  bool stats;
  bool prev_dot;           // accumulate update_dot_prev_epoch (prev_step pointers are set)
  const float* grad_scale;  // AMP: divide the gradient by this and store it back; null otherwise
  const TensorArgs* tensors;
  const WorkItem* items;
  double* item_stats;  // [num_items][kNumStats] when stats
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
