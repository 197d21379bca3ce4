// A param group's adam_step arguments kept on the C++ side between steps (issue 9: a per-step cost
// that does not grow with Python work per tensor).
//
// Calling torch.ops.instrumented_adam.adam_step from Python converts every tensor of its seven
// lists into an IValue and back (boxing) and copies each handle several times; with torch 2.13 a
// tensor handle's copy and release also touch its Python object, under the GIL. For 1000 tensors
// of 64 elements that was ~1 µs per tensor, 15× the kernel's own work. An AdamPlan holds the lists
// once (built with the Python optimizer's group plan, rebuilt whenever that is) and, per step,
// reads each parameter's .grad in C++ and calls the op unboxed through the dispatcher, so the
// device glue, its checks and its messages are exactly the op's (a bad call mutates nothing).
//
// Registered as a TorchScript class (torch.classes.instrumented_adam.AdamPlan): the eager CPU
// optimizer uses it; torch.compile, CUDA and the special cases (sharded, complex or relaid-out
// parameters, missing gradients) keep calling the op with Python lists.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace instrumented_adam {
namespace {

using AdamStepOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, int64_t, double, const std::optional<at::Tensor>&, double, double, double,
                        double, bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, at::IntArrayRef, const std::optional<at::Tensor>&);

struct AdamPlan : torch::CustomClassHolder {
  // A whole CPU group (the Python plan builds one only when every parameter of the group steps, so
  // parameter i writes statistics row i).
  std::vector<at::Tensor> params, exp_avgs, second_moments, max_second_moments, prev_epoch_steps, state_steps;
  std::vector<at::Tensor> grads;  // filled for one step, emptied after it (never keeps a gradient alive)

  AdamPlan(std::vector<at::Tensor> params_, std::vector<at::Tensor> exp_avgs_,
           std::vector<at::Tensor> second_moments_, std::vector<at::Tensor> max_second_moments_,
           std::vector<at::Tensor> prev_epoch_steps_, std::vector<at::Tensor> state_steps_)
      : params(std::move(params_)),
        exp_avgs(std::move(exp_avgs_)),
        second_moments(std::move(second_moments_)),
        max_second_moments(std::move(max_second_moments_)),
        prev_epoch_steps(std::move(prev_epoch_steps_)),
        state_steps(std::move(state_steps_)) {
    grads.reserve(params.size());
  }

  // One step of every parameter of the plan with its current .grad. Returns false, having changed
  // nothing, when the general path must take it: a parameter without a gradient, a sparse one, or
  // one whose strides are not its parameter's (the general path replans, re-lays it out or
  // reports). The op's other checks raise as the op does. The caller makes sure no dispatch or
  // function mode is active (the call below goes under them).
  bool step(int64_t algorithm, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
            double weight_decay, double eps, bool amsgrad, bool maximize,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& histograms) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("instrumented_adam::adam_step", "").typed<AdamStepOp>();
    struct ClearAfter {  // also on an exception from the op
      std::vector<at::Tensor>& grads;
      ~ClearAfter() { grads.clear(); }
    } clear_after{grads};
    grads.clear();
    if (params.empty() || !params.front().is_cpu()) return false;
    for (const at::Tensor& p : params) {
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.layout() != at::kStrided || (g.numel() != 0 && !g.strides().equals(p.strides()))) {
        return false;
      }
      grads.push_back(g);
    }
    // Straight to the CPU kernel: the keys above it (autograd's boxed fallback for an op without a
    // formula, which alone cost half the call; Python modes, tracing) are for the general path,
    // which the Python optimizer takes whenever a mode is active or it is compiled. torch's fused
    // optimizers likewise leave the version counters alone under no_grad.
    op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), params, grads, exp_avgs, second_moments,
                  max_second_moments, prev_epoch_steps, state_steps, algorithm, lr, lr_tensor, beta1, beta2,
                  weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, stats, /*stat_rows=*/{}, histograms);
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(instrumented_adam, m) {
  m.class_<AdamPlan>("AdamPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &AdamPlan::step);
}

}  // namespace instrumented_adam
