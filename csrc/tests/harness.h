// The test harness of deqfast's C++ tests (no gtest): every check counts, failures print with the
// case running, main() returns finish(...). Plus typed dispatcher handles for the three ops and the
// per-sample state tensors they take.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

namespace deqfast_test {

inline int g_checks = 0;
inline int g_failures = 0;
inline std::string g_case;  // the case running, printed with each failure

#define EXPECT_MSG(cond, msg)                                                                              \
  do {                                                                                                    \
    ++::deqfast_test::g_checks;                                                                           \
    if (!(cond)) {                                                                                        \
      ++::deqfast_test::g_failures;                                                                       \
      std::ostringstream os_;                                                                             \
      os_ << msg;                                                                                         \
      std::fprintf(stderr, "FAIL %s:%d [%s] EXPECT(%s) %s\n", __FILE__, __LINE__, ::deqfast_test::g_case.c_str(), #cond, \
                   os_.str().c_str());                                                                    \
    }                                                                                                     \
  } while (0)
#define EXPECT(cond) EXPECT_MSG(cond, "")
#define EXPECT_NEAR(a, b, tol)                                                                             \
  do {                                                                                                     \
    const double a_ = static_cast<double>(a), b_ = static_cast<double>(b), t_ = static_cast<double>(tol); \
    EXPECT_MSG(std::fabs(a_ - b_) <= t_,                                                                    \
              #a " = " << a_ << " vs " #b " = " << b_ << ", |diff| " << std::fabs(a_ - b_) << " > " << t_);  \
  } while (0)
#define EXPECT_THROWS_WITH(stmt, needle)                                                       \
  do {                                                                                        \
    std::string what_;                                                                        \
    try {                                                                                     \
      stmt;                                                                                   \
    } catch (const c10::Error& e_) {                                                          \
      what_ = e_.what_without_backtrace();                                                    \
    }                                                                                         \
    EXPECT_MSG(what_.find(needle) != std::string::npos,                                        \
              #stmt " should throw c10::Error mentioning '" << needle << "', got '" << what_ << "'"); \
  } while (0)

// got ≈ want elementwise (|got − want| ≤ atol + rtol |want|, NaN == NaN), compared in double.
inline void check_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol, const std::string& what) {
  ++g_checks;
  if (got.sizes() != want.sizes()) {
    ++g_failures;
    std::ostringstream os;
    os << got.sizes() << " vs " << want.sizes();
    std::fprintf(stderr, "FAIL [%s] %s: shape %s\n", g_case.c_str(), what.c_str(), os.str().c_str());
    return;
  }
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (!at::isclose(g, w, rtol, atol, /*equal_nan=*/true).all().item<bool>()) {
    ++g_failures;
    const double max_diff = at::nan_to_num((g - w).abs(), 1e300).max().item<double>();
    std::fprintf(stderr, "FAIL [%s] %s: not close (rtol %g, atol %g), max |diff| %g\n", g_case.c_str(), what.c_str(),
                 rtol, atol, max_diff);
  }
}

// Bitwise the same values (same dtype and shape; no NaN expected).
inline void check_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  EXPECT_MSG(got.scalar_type() == want.scalar_type() && got.sizes() == want.sizes() && at::equal(got, want),
            what << ": not equal, max |diff| "
                 << ((got.sizes() == want.sizes()) ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>()
                                                   : -1.0));
}

inline const at::TensorOptions kD = at::TensorOptions().dtype(at::kDouble);

// The ops' C++ signatures, for typed dispatcher handles.
using HistoryFn = at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t);
using StepFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                          at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t,
                          double, double, double, bool);
using FixedPointFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&,
                                at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, double, double, bool);

inline c10::TypedOperatorHandle<HistoryFn>& history_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("deqfast::anderson_history", "").typed<HistoryFn>();
  return op;
}
inline c10::TypedOperatorHandle<StepFn>& step_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("deqfast::anderson_step", "").typed<StepFn>();
  return op;
}
inline c10::TypedOperatorHandle<FixedPointFn>& fixed_point_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("deqfast::fixed_point_step", "").typed<FixedPointFn>();
  return op;
}

using BroydenDirectionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BroydenUpdateFn = void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t,
                             int64_t);

inline c10::TypedOperatorHandle<BroydenDirectionFn>& broyden_direction_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deqfast::broyden_direction", "")
                       .typed<BroydenDirectionFn>();
  return op;
}
inline c10::TypedOperatorHandle<BroydenUpdateFn>& broyden_update_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("deqfast::broyden_update", "").typed<BroydenUpdateFn>();
  return op;
}

using BroydenFusedStepFn = at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                      at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                      at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t,
                                      bool, double, bool);
inline c10::TypedOperatorHandle<BroydenFusedStepFn>& broyden_fused_step_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deqfast::broyden_fused_step", "")
                       .typed<BroydenFusedStepFn>();
  return op;
}

struct State {  // the per-sample state tensors of the ops
  at::Tensor best_x, best_residual, best_rel, nstep, converged, failed;
  State(const at::Tensor& x0) {
    const int64_t B = x0.size(0);
    const auto acc = at::toOpMathType(x0.scalar_type());
    best_x = x0.clone();
    best_residual = at::full({B}, std::numeric_limits<double>::infinity(), x0.options().dtype(acc));
    best_rel = best_residual.clone();
    nstep = at::zeros({B}, x0.options().dtype(at::kLong));
    converged = at::zeros({B}, x0.options().dtype(at::kBool));
    failed = at::zeros({B}, x0.options().dtype(at::kBool));
  }
};

// Prints the summary line; the exit code of main().
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace deqfast_test
