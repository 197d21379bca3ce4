// One call of a classic op (sgd_step, rmsprop_step, adagrad_step; schemas: csrc/ops.cpp) as one
// value, and its device-independent checks, shared by the CPU glue (cpu/classic_cpu.cpp) and the
// CUDA glue (cuda/classic_cuda.cpp), as adam_step_call.h is for adam_step. The step counters'
// checks differ per device (a CPU float32/float64 counter, a CUDA float32 one) and stay there.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "adam_math.h"
#include "kernel_tensor.h"
#include "op_checks.h"

namespace instrumented_adam {

// A state list of the call: `name`, and whether the call's options use it (one tensor per
// parameter then).
struct StateList {
  at::TensorList tensors;
  const char* name;
  bool used;
};

struct ClassicCall {
  const char* op;
  Algorithm algorithm;
  at::TensorList params, grads;
  StateList states[kMaxStates];  // in the rule's slot order (classic_rules.h); unused lists are empty
  at::TensorList prev_epoch_steps, state_steps;  // state_steps empty for SGD (no counter)
  bool has_steps;
  double lr;
  const std::optional<at::Tensor>& lr_tensor;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& stats;
  at::IntArrayRef stat_rows;
  at::IntArrayRef first_step = {};  // SGD: 1 where a parameter's momentum buffer is new; else empty

  void check_lists() const {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n, "instrumented_adam: ", op, ": params and grads must have the same length");
    for (const StateList& s : states) {
      if (s.name == nullptr) continue;
      TORCH_CHECK(!s.used || s.tensors.size() == n, "instrumented_adam: ", op, ": ", s.name,
                  " must have one tensor per parameter");
    }
    TORCH_CHECK(!has_steps || state_steps.size() == n, "instrumented_adam: ", op,
                ": state_steps must have one tensor per parameter");
    TORCH_CHECK(prev_epoch_steps.empty() || prev_epoch_steps.size() == n,
                "instrumented_adam: prev_epoch_steps must be empty or have one tensor per parameter");
    TORCH_CHECK(stat_rows.empty() || stat_rows.size() == n,
                "instrumented_adam: stat_rows must be empty or have one row per parameter");
    TORCH_CHECK(first_step.empty() || first_step.size() == n, "instrumented_adam: ", op,
                ": first_step must be empty or have one entry per parameter");
  }

  // Parameter i, its gradient, its state and its previous epoch's step, on `device`. The previous
  // step may be bfloat16 (compact epoch buffers) where the device's kernels read it so: the CPU's;
  // the CUDA classic kernels read it in the parameter's dtype only so far.
  void check_parameter(int64_t i, const at::Device& device, bool allow_compact_prev) const {
    const at::Tensor& p = params[i];
    check_parameter_and_grad(p, grads[i], i, device);
    for (const StateList& s : states) {
      if (s.name != nullptr && s.used) check_companion(p, s.tensors[i], s.name, i);
    }
    if (prev_epoch_steps.empty()) return;
    const at::Tensor& prev = prev_epoch_steps[i];
    TORCH_CHECK(allow_compact_prev || prev.scalar_type() == p.scalar_type(),
                "instrumented_adam: ", op, " on ", device, " reads the previous epoch's step in the parameter's dtype "
                "only: compact epoch buffers for SGD, RMSprop and Adagrad run on CPU so far (use epoch_buffers='exact')");
    check_prev_step(p, prev, "prev_epoch_steps", i);
  }

  // Parameter i's pointers and size into a kernel's description (ParameterPointers: the CPU's
  // TensorArgs, the CUDA HostTensor). The state tensors go to their rule slots (the CPU rules;
  // an unused slot is null) or, `packed`, the ones present from slot 0 on (the CUDA rules,
  // cuda/classic_rules.cuh: RMSprop's grad_avg moves up when there is no momentum buffer).
  template <class KernelTensor>
  void describe_parameter(int64_t i, KernelTensor& t, bool packed) const {
    const at::Tensor& p = params[i];
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    int slot = 0;
    for (int s = 0; s < kMaxStates; ++s) {
      const bool present = states[s].name != nullptr && states[s].used;
      if (present) t.state[packed ? slot++ : s] = states[s].tensors[i].data_ptr();
      else if (!packed) t.state[s] = nullptr;
    }
    if (packed) for (; slot < kMaxStates; ++slot) t.state[slot] = nullptr;
    t.prev_step = prev_epoch_steps.empty() ? nullptr : prev_epoch_steps[i].const_data_ptr();
    t.numel = p.numel();
    t.dtype = kernel_dtype<DType>(p);
    t.prev_dtype = prev_epoch_steps.empty() ? t.dtype : kernel_dtype<DType>(prev_epoch_steps[i]);
  }
};

}  // namespace instrumented_adam
