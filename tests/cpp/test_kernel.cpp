// C++ unit tests of the CPU kernel, run under ctest (see CMakeLists.txt).
//
//  1. The raw per-ISA kernels (process_items) against a plain double-precision Adam written here,
//     for every ISA this CPU supports: parameters within a few fp32 ulps, statistics within 1e-6
//     relative of fp64 sums of the kernel's own inputs/outputs.
//  2. The AVX2 and AVX-512 builds give bitwise identical results for every size (tails included):
//     both follow torch's rounding, which does not depend on the vector width.
//  3. The op through the dispatcher: a bad argument throws and leaves the state untouched; a step
//     with found_inf set is skipped.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernel_args.h"

namespace ia = instrumented_adam;
namespace cpu = instrumented_adam::cpu;

static int failures = 0;
#define EXPECT(cond, ...)                                          \
  do {                                                             \
    if (!(cond)) {                                                 \
      ++failures;                                                  \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
    }                                                              \
  } while (0)

struct Config {
  ia::Algorithm algo;
  bool amsgrad, maximize;
  double lr, beta1, beta2, eps, weight_decay;
};

struct Buffers {
  std::vector<float> p, g, m, v, vmax, prev;
};

Buffers make_buffers(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.f, 0.01f);
  Buffers b;
  for (int64_t i = 0; i < n; ++i) {
    b.p.push_back(normal(rng));
    b.g.push_back(normal(rng));
    b.m.push_back(0.1f * normal(rng));
    b.v.push_back(uniform(rng));
    b.vmax.push_back(b.v.back() * 1.5f);
    b.prev.push_back(0.01f * normal(rng));
  }
  return b;
}

// One step of one tensor through a raw ISA kernel. Returns the statistics row.
std::vector<double> run_kernel(void (*process)(const cpu::KernelArgs&, int64_t, int64_t), Buffers& b,
                               const Config& c, double step) {
  const int64_t n = static_cast<int64_t>(b.p.size());
  cpu::TensorArgs t{};
  t.param = b.p.data();
  t.grad = b.g.data();
  // The Adam family's state slots (adam_math.h, AdamState); no max_exp_avg_sq without amsgrad.
  t.state[ia::AdamState::kExpAvg] = b.m.data();
  t.state[ia::AdamState::kSecondMoment] = b.v.data();
  t.state[ia::AdamState::kMaxSecondMoment] = c.amsgrad ? b.vmax.data() : nullptr;
  t.prev_step = b.prev.data();
  t.numel = n;
  t.dtype = cpu::DType::kFloat;
  const ia::StepScalars s{c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, step};
  t.coeff_float = ia::make_coefficients<float>(s, c.algo, c.maximize, c.amsgrad);
  t.coeff_double = ia::make_coefficients<double>(s, c.algo, c.maximize, c.amsgrad);
  // Two items, split at a multiple of 64 elements, as the glue does.
  std::vector<cpu::WorkItem> items;
  const int64_t half = (n / 2) / 64 * 64;
  if (half > 0) items.push_back({0, 0, half});
  if (n > half) items.push_back({0, half, n});
  std::vector<double> item_stats(items.size() * ia::kNumStats, 0.0);
  cpu::KernelArgs args{c.algo, true, true, nullptr, &t, items.data(), item_stats.data()};
  process(args, 0, static_cast<int64_t>(items.size()));
  std::vector<double> row(ia::kNumStats, 0.0);
  for (size_t k = 0; k < items.size(); ++k) {
    for (int j = 0; j < ia::kNumStats; ++j) {
      const double x = item_stats[k * ia::kNumStats + j];
      row[j] = k == 0 ? x : ia::combine_partials(j, row[j], x);  // as the table says
    }
  }
  return row;
}

// Plain double-precision Adam / AdamW / Adamax for one element (Algorithm 1 of the paper,
// written in torch's arrangement of the bias corrections).
void reference_element(double& p, double g, double& m, double& v, double& vmax, const Config& c, double t) {
  if (c.maximize) g = -g;
  if (c.weight_decay != 0) {
    if (c.algo == ia::Algorithm::kAdamW) p *= 1 - c.lr * c.weight_decay;
    else g += c.weight_decay * p;
  }
  m = c.beta1 * m + (1 - c.beta1) * g;
  const double step_size = c.lr / (1 - std::pow(c.beta1, t));
  if (c.algo == ia::Algorithm::kAdamax) {
    v = std::max(c.beta2 * v, std::abs(g) + c.eps);
    p -= step_size * m / v;
    return;
  }
  v = c.beta2 * v + (1 - c.beta2) * g * g;
  double moment = v;
  if (c.amsgrad) moment = vmax = std::max(vmax, v);
  p -= step_size * m / (std::sqrt(moment) / std::sqrt(1 - std::pow(c.beta2, t)) + c.eps);
}

bool cpu_supports(const char* isa) {
  if (std::string(isa) == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (std::string(isa) == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
}

void test_raw_kernels() {
  const std::vector<std::pair<const char*, void (*)(const cpu::KernelArgs&, int64_t, int64_t)>> isas = {
      {"DEFAULT", &cpu::DEFAULT::process_items}, {"AVX2", &cpu::AVX2::process_items},
      {"AVX512", &cpu::AVX512::process_items}};
  const std::vector<Config> configs = {
      {ia::Algorithm::kAdam, false, false, 1e-2, 0.9, 0.999, 1e-8, 0.0},
      {ia::Algorithm::kAdam, true, true, 1e-3, 0.9, 0.99, 1e-6, 0.1},
      {ia::Algorithm::kAdamW, false, false, 1e-2, 0.3, 0.999, 1e-8, 0.05},
      {ia::Algorithm::kAdamax, false, true, 2e-3, 0.9, 0.999, 1e-8, 0.01},
  };
  const std::vector<int64_t> sizes = {1, 7, 8, 9, 15, 16, 17, 31, 33, 127, 129, 1000, 4099};
  for (const Config& c : configs) {
    for (int64_t n : sizes) {
      std::vector<Buffers> results;
      for (const auto& [name, process] : isas) {
        if (!cpu_supports(name)) continue;
        Buffers before = make_buffers(n, static_cast<uint32_t>(n));
        Buffers b = before;
        const double t = 3;
        const std::vector<double> stats = run_kernel(process, b, c, t);

        // Parameters and moments against the double reference.
        double sums[ia::kNumStats] = {};
        double abs_sums[ia::kNumStats] = {};
        for (int64_t i = 0; i < n; ++i) {
          double p = before.p[i], m = before.m[i], v = before.v[i], vmax = before.vmax[i];
          reference_element(p, before.g[i], m, v, vmax, c, t);
          const double update = std::abs(p - before.p[i]);
          EXPECT(std::abs(b.p[i] - p) <= 4e-7 * std::abs(p) + 1e-5 * update + 1e-12,
                 "%s n=%lld i=%lld param %.9g vs %.9g", name, (long long)n, (long long)i, b.p[i], p);
          EXPECT(std::abs(b.m[i] - m) <= 1e-6 * std::abs(m) + 1e-7 * std::abs(before.g[i]),
                 "%s exp_avg %.9g vs %.9g", name, b.m[i], m);
          // Statistics recomputed in fp64 from the kernel's own inputs and outputs.
          const double g = before.g[i], delta = double(b.p[i]) - double(before.p[i]);
          const double moment = c.amsgrad ? b.vmax[i] : b.v[i];
          const double terms[ia::kNumStats] = {
              g * g, double(b.m[i]) * b.m[i], moment, delta * delta, double(b.p[i]) * b.p[i], delta * g,
              double(b.m[i]) * g, delta * before.prev[i], std::isfinite(g) ? 0.0 : 1.0, 0.0, 0.0};
          for (int j = 0; j < ia::kNumStats; ++j) {
            sums[j] += terms[j];
            abs_sums[j] += std::abs(terms[j]);
          }
        }
        for (int j = 0; j < ia::kNumStats; ++j) {
          if (j == ia::k_eff_lr_sum || j == ia::k_eff_lr_max) continue;  // checked in Python tests
          EXPECT(std::abs(stats[j] - sums[j]) <= 1e-6 * abs_sums[j] + 1e-300, "%s n=%lld stat %s: %.12g vs %.12g",
                 name, (long long)n, ia::kStatTable[j].name, stats[j], sums[j]);
        }
        EXPECT(stats[ia::k_eff_lr_max] > 0, "%s eff_lr_max must be positive", name);
        if (std::string(name) != "DEFAULT") results.push_back(b);
      }
      // Vector width must not change the rounding.
      if (results.size() == 2) {
        for (int64_t i = 0; i < n; ++i) {
          EXPECT(results[0].p[i] == results[1].p[i] && results[0].v[i] == results[1].v[i] &&
                     results[0].m[i] == results[1].m[i],
                 "AVX2 and AVX512 differ at n=%lld i=%lld", (long long)n, (long long)i);
        }
      }
    }
  }
}

using AdamStep = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       at::TensorList, at::TensorList, int64_t, double, const std::optional<at::Tensor>&, double,
                       double, double, double, bool, bool, const std::optional<at::Tensor>&,
                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                       const std::optional<at::Tensor>&);  // histograms (csrc/histogram.h)

void test_dispatcher() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("instrumented_adam::adam_step", "").typed<AdamStep>();
  at::Tensor p = at::randn({33}), g = at::randn({33}), m = at::zeros({33}), v = at::zeros({33});
  at::Tensor bad_v = at::zeros({32});
  at::Tensor step = at::zeros({}, at::kFloat);
  at::Tensor stats = at::zeros({1, ia::kNumStats}, at::kDouble);
  const at::Tensor p_before = p.clone();
  bool threw = false;
  try {
    op.call({p}, {g}, {m}, {bad_v}, {}, {}, {step}, 0, 1e-3, std::nullopt, 0.9, 0.999, 0.0, 1e-8, false, false,
            std::nullopt, std::nullopt, stats, {}, std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("shape") != std::string::npos;
  }
  EXPECT(threw, "a second moment of the wrong shape must raise a shape error");
  EXPECT(at::equal(p, p_before) && step.item<float>() == 0.f, "a rejected call must not touch the state");

  at::Tensor found_inf = at::ones({}, at::kFloat);
  op.call({p}, {g}, {m}, {v}, {}, {}, {step}, 0, 1e-3, std::nullopt, 0.9, 0.999, 0.0, 1e-8, false, false,
          std::nullopt, found_inf, stats, {}, std::nullopt);
  EXPECT(at::equal(p, p_before) && step.item<float>() == 0.f && stats.abs().sum().item<double>() == 0.0,
         "a step with found_inf must be skipped with zero statistics");

  op.call({p}, {g}, {m}, {v}, {}, {}, {step}, 0, 1e-3, std::nullopt, 0.9, 0.999, 0.0, 1e-8, false, false,
          std::nullopt, std::nullopt, stats, {}, std::nullopt);
  EXPECT(!at::equal(p, p_before) && step.item<float>() == 1.f, "a normal step must update and count");
  const double grad_sumsq = g.to(at::kDouble).pow(2).sum().item<double>();
  EXPECT(std::abs(stats[0][ia::k_grad_sumsq].item<double>() - grad_sumsq) < 1e-6 * grad_sumsq,
         "grad_sumsq through the dispatcher");
}

int main() {
  test_raw_kernels();
  test_dispatcher();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel checks passed\n");
  return 0;
}
