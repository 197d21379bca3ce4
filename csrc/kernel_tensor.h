// What every kernel gets to know about one parameter of an adam_step call, on any device: raw
// pointers of the parameter, its gradient and its state, its size and storage type. Torch-free, so
// that the CUDA kernel files (which include no torch header) and the CPU ISA files share it; the
// glue fills it with AdamStepCall::describe_parameter (adam_step_call.h).
#pragma once

#include <cstdint>

namespace instrumented_adam {

// The parameter dtypes the kernels support.
enum class DType : int8_t { kFloat, kDouble, kBFloat16, kHalf };

struct ParameterPointers {
  void* param;
  void* grad;
  void* exp_avg;
  void* second;           // exp_avg_sq (Adam/AdamW) or exp_inf (Adamax)
  void* max_second;       // max_exp_avg_sq (amsgrad) or null
  const void* prev_step;  // previous epoch's step s_{k-1} (same dtype as param) or null
  int64_t numel;
  DType dtype;
};

}  // namespace instrumented_adam
