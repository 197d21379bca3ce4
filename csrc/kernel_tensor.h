// What every kernel gets to know about one parameter of an optimizer step, on any device: raw
// pointers of the parameter, its gradient and the state tensors its rule declares, its size and
// storage type. Torch-free, so
// that the CUDA kernel files (which include no torch header) and the CPU ISA files share it; the
// glue fills it with AdamStepCall::describe_parameter (adam_step_call.h).
#pragma once

#include <cstdint>

namespace instrumented_adam {

// The parameter dtypes the kernels support.
enum class DType : int8_t { kFloat, kDouble, kBFloat16, kHalf };

// The most state tensors (of the parameter's shape and dtype) one update rule may declare. Three
// cover every planned optimizer: Adam with amsgrad (exp_avg, exp_avg_sq, max_exp_avg_sq), RMSprop
// (square_avg, momentum_buffer, grad_avg), SGD (momentum_buffer), Adagrad (sum). The harnesses
// keep this many value slots per element in registers, so it should not grow without need.
constexpr int kMaxStates = 3;

struct ParameterPointers {
  void* param;
  void* grad;
  // The rule's state tensors in the order its kNumStates declares them (adam_math.h, "update
  // rules"); null for an absent optional state (amsgrad's max_exp_avg_sq) and past kNumStates.
  void* state[kMaxStates];
  const void* prev_step;  // previous epoch's step s_{k-1} or null
  int64_t numel;
  DType dtype;
  // Storage type of prev_step: the parameter's own, or kBFloat16 for any parameter type (compact
  // epoch buffers: the previous-epoch dot then reads 2 B/element; docs/design.md, "Epoch geometry").
  DType prev_dtype;
};

}  // namespace instrumented_adam
