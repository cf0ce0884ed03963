// C++ tests of deqfast's shared numerics (deqfast_numerics.h) and of the CPU ops through the
// dispatcher, each against an independent computation. Built and run by CMake (see CMakeLists.txt):
//
//   cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
//   cmake --build build/cmake -j2 && ctest --test-dir build/cmake --output-on-failure
//
// The harness (no gtest) is harness.h: every check counts, failures print and the exit code is 1.
//
// (a) deqfast::anderson_weights on random SPD Gram matrices (double, float), vs the bordered KKT
//     system [[Gram + lam diag(Gram), 1], [1ᵀ, 0]] [α; ν] = [0; 1] solved by at::linalg_solve in
//     double; partial histories, badly scaled residuals, singular / zero / NaN / Inf Gram matrices.
// (b) deqfast::track_sample: improvement, strict comparisons, convergence, NaN/Inf → failed,
//     done samples frozen, rel mode.
// (c) the ops deqfast::anderson_history, anderson_step, fixed_point_step via typed dispatcher
//     handles on CPU vs plain ATen computations in double.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "deqfast_numerics.h"
#include "harness.h"
#include "ops.h"

namespace {

using namespace deqfast_test;


// ---------------------------------------------------------------------------------------------
// (a) anderson_weights
// ---------------------------------------------------------------------------------------------

struct WeightsResult {
  bool ok;
  std::vector<double> alpha;  // m values
};

// Runs deqfast::anderson_weights<acc_t> on gram (m × m, any dtype, converted to acc_t), checking it
// writes no more than the documented n·n + 2n work values.
template <typename acc_t>
WeightsResult run_weights(const at::Tensor& gram, int n, int slot, double lam) {
  const int m = static_cast<int>(gram.size(0));
  at::Tensor g = gram.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t sentinel = acc_t(-12345.5);
  std::vector<acc_t> alpha(m, sentinel), work(n * n + 2 * n + 8, sentinel);
  const bool ok = deqfast::anderson_weights<acc_t>(g.data_ptr<acc_t>(), m, n, slot, static_cast<acc_t>(lam),
                                                   alpha.data(), work.data());
  for (int i = n * n + 2 * n; i < n * n + 2 * n + 8; ++i)
    EXPECT_MSG(work[i] == sentinel, "anderson_weights wrote work[" << i << "] beyond n*n + 2n = " << n * n + 2 * n);
  WeightsResult r{ok, std::vector<double>(m)};
  for (int i = 0; i < m; ++i) r.alpha[i] = static_cast<double>(alpha[i]);
  return r;
}

// Independent solution: minimise αᵀ(H)α, H = Gram + lam·diag(Gram) over the first n slots,
// subject to Σα = 1, via the bordered (KKT) system solved by LAPACK in double.
std::vector<double> kkt_weights(const at::Tensor& gram, int n, double lam) {
  at::Tensor H = gram.to(at::kDouble).slice(0, 0, n).slice(1, 0, n);
  H = H + lam * at::diag(H.diagonal());
  at::Tensor K = at::zeros({n + 1, n + 1}, kD);
  K.slice(0, 0, n).slice(1, 0, n).copy_(H);
  K.slice(0, 0, n).select(1, n).fill_(1.0);
  K.select(0, n).slice(0, 0, n).fill_(1.0);
  at::Tensor rhs = at::zeros({n + 1, 1}, kD);
  rhs[n][0] = 1.0;
  at::Tensor sol = at::linalg_solve(K, rhs).squeeze(1);
  std::vector<double> out(n);
  for (int i = 0; i < n; ++i) out[i] = sol[i].item<double>();
  return out;
}

// Condition number of the Jacobi-scaled system C + lam I that anderson_weights solves.
double scaled_condition(const at::Tensor& gram, int n, double lam) {
  at::Tensor H = gram.to(at::kDouble).slice(0, 0, n).slice(1, 0, n);
  at::Tensor s = H.diagonal().rsqrt();
  at::Tensor C = H * s.unsqueeze(1) * s.unsqueeze(0) + lam * at::eye(n, kD);
  return at::linalg_cond(C).item<double>();
}

// gram (m × m double) whose first n slots hold G Gᵀ of n random residuals of length k (rows scaled
// by `scales` when given); the rest holds `outside` (0 as the ring buffer starts, or garbage).
at::Tensor random_gram(int m, int n, int k, double outside, const std::vector<double>& scales = {}) {
  at::Tensor G = at::randn({n, k}, kD);
  for (size_t i = 0; i < scales.size() && int(i) < n; ++i) G[i].mul_(scales[i]);
  at::Tensor gram = at::full({m, m}, outside, kD);
  gram.slice(0, 0, n).slice(1, 0, n).copy_(G.mm(G.t()));
  return gram;
}

template <typename acc_t>
void check_weights_vs_kkt(const at::Tensor& gram, int n, int slot, double lam, const std::string& name) {
  const int m = static_cast<int>(gram.size(0));
  // The reference solves the Gram matrix the kernel sees (rounded to acc_t).
  const at::Tensor seen = gram.to(c10::CppTypeToScalarType<acc_t>::value).to(at::kDouble);
  const WeightsResult r = run_weights<acc_t>(gram, n, slot, lam);
  const std::vector<double> ref = kkt_weights(seen, n, lam);
  const double cond = scaled_condition(seen, n, lam);
  double scale = 1.0;
  for (double v : ref) scale = std::max(scale, std::fabs(v));
  const double tol = 200.0 * std::numeric_limits<acc_t>::epsilon() * cond * scale;
  std::ostringstream c;
  c << name << " " << (sizeof(acc_t) == 8 ? "double" : "float") << " m=" << m << " n=" << n << " slot=" << slot
    << " lam=" << lam << " cond=" << cond;
  g_case = c.str();
  EXPECT_MSG(r.ok, "anderson_weights returned false on a well-posed system");
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(r.alpha[i], ref[i], tol);
    sum += r.alpha[i];
  }
  EXPECT_NEAR(sum, 1.0, 64.0 * std::numeric_limits<acc_t>::epsilon() * scale * n);
  for (int i = n; i < m; ++i) EXPECT_MSG(r.alpha[i] == 0.0, "empty slot " << i << " has weight " << r.alpha[i]);
}

// A degenerate system: the weights are finite and either sum to 1, or the solve reports failure
// and falls back to exactly e_slot.
template <typename acc_t>
bool check_weights_sane(const at::Tensor& gram, int n, int slot, double lam, const std::string& name) {
  const int m = static_cast<int>(gram.size(0));
  std::ostringstream c;
  c << name << " " << (sizeof(acc_t) == 8 ? "double" : "float") << " m=" << m << " n=" << n << " slot=" << slot
    << " lam=" << lam;
  g_case = c.str();
  const WeightsResult r = run_weights<acc_t>(gram, n, slot, lam);
  if (std::getenv("DEQFAST_TEST_VERBOSE")) {
    std::printf("[%s] ok=%d alpha =", g_case.c_str(), int(r.ok));
    for (double a : r.alpha) std::printf(" %.6g", a);
    std::printf("\n");
  }
  double sum = 0.0, biggest = 0.0;
  bool finite = true;
  for (int i = 0; i < m; ++i) {
    finite = finite && std::isfinite(r.alpha[i]);
    sum += r.alpha[i];
    biggest = std::max(biggest, std::fabs(r.alpha[i]));
  }
  EXPECT_MSG(finite, "non-finite weights");
  for (int i = n; i < m; ++i) EXPECT_MSG(r.alpha[i] == 0.0, "empty slot " << i << " has weight " << r.alpha[i]);
  if (r.ok) {
    EXPECT_NEAR(sum, 1.0, 1e-3);
    if (biggest > 1e6)
      std::printf("note [%s]: solve accepted with max |alpha| = %g (sum %.17g)\n", g_case.c_str(), biggest, sum);
  } else {
    for (int i = 0; i < m; ++i) EXPECT_MSG(r.alpha[i] == (i == slot ? 1.0 : 0.0), "fallback is not e_slot at " << i);
  }
  return r.ok;
}

template <typename acc_t>
void test_anderson_weights() {
  at::manual_seed(1234);
  const double lams[] = {0.0, 1e-4, 1e-2, 1.0};
  // Full histories, small to kMaxHistoryCuda.
  for (int n : {1, 2, 3, 5, 8, 32}) {
    for (double lam : lams) {
      const at::Tensor gram = random_gram(n, n, 2 * n + 4, 0.0);
      check_weights_vs_kkt<acc_t>(gram, n, 0, lam, "random SPD");
      check_weights_vs_kkt<acc_t>(gram, n, n - 1, lam, "random SPD");
    }
  }
  // Partial histories (n < m): the empty slots, zero or garbage, get weight exactly 0.
  for (auto [m, n] : {std::pair{2, 1}, std::pair{6, 3}, std::pair{8, 5}, std::pair{32, 7}}) {
    for (double lam : {0.0, 1e-4}) {
      check_weights_vs_kkt<acc_t>(random_gram(m, n, 2 * n + 4, 0.0), n, n - 1, lam, "partial, zeros outside");
      check_weights_vs_kkt<acc_t>(random_gram(m, n, 2 * n + 4, std::numeric_limits<double>::quiet_NaN()), n, 0, lam,
                                  "partial, NaN outside");
      check_weights_vs_kkt<acc_t>(random_gram(m, n, 2 * n + 4, 1e30), n, n / 2, lam, "partial, 1e30 outside");
    }
  }
  // Residual norms over 8 orders of magnitude: the Jacobi scaling keeps the solve accurate.
  for (double lam : {1e-4, 1e-2}) {
    check_weights_vs_kkt<acc_t>(random_gram(5, 5, 12, 0.0, {1e4, 1e2, 1.0, 1e-2, 1e-4}), 5, 4, lam, "scaled rows");
  }

  // Identical residuals, lam = 0: a rank-1 Gram matrix.
  {
    const int m = 4;
    at::Tensor exact = at::full({m, m}, 2.5, kD);  // every <g_i, g_j> = ‖g‖² bitwise
    check_weights_sane<acc_t>(exact, m, 2, 0.0, "identical residuals (exact)");
    at::Tensor g = at::randn({1, 50}, kD).repeat({m, 1});
    check_weights_sane<acc_t>(g.mm(g.t()), m, 1, 0.0, "identical residuals (BLAS Gram)");
    // with a ridge the problem is well posed again (and symmetric: the KKT weights are uniform)
    check_weights_vs_kkt<acc_t>(exact, m, 0, 1e-3, "identical residuals (exact)");
    g_case = "identical residuals (exact), lam = 1e-3: uniform";
    const WeightsResult r = run_weights<acc_t>(exact, m, 0, 1e-3);
    for (int i = 0; i < m; ++i) EXPECT_NEAR(r.alpha[i], 1.0 / m, 4000 * 200 * std::numeric_limits<acc_t>::epsilon());
    // linearly dependent residuals g_3 = g_0 + g_1
    at::Tensor G = at::randn({m, 20}, kD);
    G[3].copy_(G[0] + G[1]);
    check_weights_sane<acc_t>(G.mm(G.t()), m, 3, 0.0, "dependent residuals");
    // a converged history: all residuals zero
    check_weights_sane<acc_t>(at::zeros({m, m}, kD), m, 1, 0.0, "zero Gram");
    check_weights_sane<acc_t>(at::zeros({m, m}, kD), m, 1, 1e-4, "zero Gram");
    check_weights_sane<acc_t>(at::zeros({6, 6}, kD), 3, 1, 1e-4, "zero Gram, partial");
  }

  // NaN anywhere in the filled block, or +Inf on its diagonal (an overflowed ‖g_j‖²): false and
  // α = e_slot exactly.
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const int m = 5, n = 4, slot = 2;
  for (double bad : {nan, inf, -inf}) {
    for (int i = 0; i < n; ++i) {
      for (int j = i; j < n; ++j) {
        at::Tensor gram = random_gram(m, n, 12, 0.0);
        gram[i][j] = bad;
        gram[j][i] = bad;
        std::ostringstream c;
        c << "non-finite Gram " << bad << " at (" << i << "," << j << ")";
        if (std::isnan(bad) || (bad > 0 && i == j)) {
          g_case = c.str() + (sizeof(acc_t) == 8 ? " double" : " float");
          const WeightsResult r = run_weights<acc_t>(gram, n, slot, 1e-4);
          EXPECT_MSG(!r.ok, "returned true");
          for (int k = 0; k < m; ++k)
            EXPECT_MSG(r.alpha[k] == (k == slot ? 1.0 : 0.0), "alpha[" << k << "] = " << r.alpha[k]);
        } else {
          // ±Inf off the diagonal (impossible for a Gram matrix with a finite diagonal, by
          // Cauchy–Schwarz) or -Inf on it: like deqfast.reference.anderson_weights, the solve may
          // drop the slots involved; the weights must still be finite and sum to 1, or be e_slot.
          check_weights_sane<acc_t>(gram, n, slot, 1e-4, c.str());
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (b) track_sample
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct Samples {
  std::vector<acc_t> best_residual, best_rel;
  std::vector<int64_t> nstep;
  std::unique_ptr<bool[]> converged, failed;
  deqfast::SampleState<acc_t> state;
  explicit Samples(int B)
      : best_residual(B, std::numeric_limits<acc_t>::infinity()),
        best_rel(B, std::numeric_limits<acc_t>::infinity()),
        nstep(B, 0),
        converged(new bool[B]()),
        failed(new bool[B]()),
        state{best_residual.data(), best_rel.data(), nstep.data(), converged.get(), failed.get()} {}
};

template <typename acc_t>
void test_track_sample() {
  using deqfast::track_sample;
  const std::string type = sizeof(acc_t) == 8 ? " double" : " float";
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN(), inf = std::numeric_limits<acc_t>::infinity();
  const acc_t tol = acc_t(1e-3);
  {
    g_case = "track_sample abs mode" + type;
    const acc_t tol = acc_t(1.0 / 1024);  // a power of 2: tol² and its square root are exact
    Samples<acc_t> s(3);
    // sample 1 untouched throughout: samples are independent
    auto t = track_sample<acc_t>(s.state, 0, acc_t(4), acc_t(16), tol, false);  // residual 2, rel 0.5
    EXPECT(t.improved && !t.done);
    EXPECT(s.nstep[0] == 1 && s.best_residual[0] == acc_t(2) && s.best_rel[0] == acc_t(0.5));
    t = track_sample<acc_t>(s.state, 0, acc_t(9), acc_t(1), tol, false);  // worse: residual 3
    EXPECT(!t.improved && !t.done);
    EXPECT(s.nstep[0] == 2 && s.best_residual[0] == acc_t(2) && s.best_rel[0] == acc_t(0.5));
    t = track_sample<acc_t>(s.state, 0, acc_t(4), acc_t(100), tol, false);  // equal: not an improvement (strict)
    EXPECT(!t.improved && !t.done && s.best_rel[0] == acc_t(0.5));
    t = track_sample<acc_t>(s.state, 0, acc_t(1), acc_t(64), tol, false);  // better, rel ignored in abs mode
    EXPECT(t.improved && !t.done && s.best_residual[0] == acc_t(1) && s.best_rel[0] == acc_t(0.125));
    t = track_sample<acc_t>(s.state, 0, acc_t(-1e-30), acc_t(1), tol, false);  // rounding below 0 → residual 0
    EXPECT(t.improved && t.done && s.converged[0] && !s.failed[0]);
    EXPECT(s.best_residual[0] == acc_t(0) && s.nstep[0] == 5);
    // done: nothing changes any more, even for a better or a NaN evaluation
    t = track_sample<acc_t>(s.state, 0, nan, nan, tol, false);
    EXPECT(!t.improved && t.done && s.nstep[0] == 5 && !s.failed[0] && s.converged[0]);
    // converging at exactly tol is not converging (strict); just below is
    t = track_sample<acc_t>(s.state, 2, tol * tol, acc_t(1), tol, false);
    EXPECT(t.improved && !s.converged[2]);
    EXPECT(s.best_residual[2] == deqfast::sqrt_value(tol * tol));
    t = track_sample<acc_t>(s.state, 2, acc_t(0.25) * tol * tol, acc_t(1), tol, false);
    EXPECT(t.improved && t.done && s.converged[2] && s.nstep[2] == 2);
    EXPECT(s.nstep[1] == 0 && !s.converged[1] && !s.failed[1] && std::isinf(s.best_residual[1]));
  }
  {
    g_case = "track_sample rel mode" + type;
    Samples<acc_t> s(1);
    auto t = track_sample<acc_t>(s.state, 0, acc_t(4), acc_t(16), tol, true);  // rel 0.5
    EXPECT(t.improved && !t.done && s.best_rel[0] == acc_t(0.5));
    t = track_sample<acc_t>(s.state, 0, acc_t(1), acc_t(1), tol, true);  // residual smaller, rel 1 worse
    EXPECT(!t.improved && s.best_residual[0] == acc_t(2));
    t = track_sample<acc_t>(s.state, 0, acc_t(400), acc_t(1e8), tol, true);  // residual larger, rel 2e-3 better
    EXPECT(t.improved && !t.done && s.best_residual[0] == acc_t(20));
    EXPECT_NEAR(s.best_rel[0], 2e-3, 1e-9);
    t = track_sample<acc_t>(s.state, 0, acc_t(1), acc_t(1e8), tol, true);  // rel 1e-4 < tol
    EXPECT(t.improved && t.done && s.converged[0] && s.nstep[0] == 4);
  }
  {
    g_case = "track_sample rel mode, f = 0" + type;
    Samples<acc_t> s(2);
    // f(x) = x = 0: residual 0 over a clamped norm, converged rather than NaN
    auto t = track_sample<acc_t>(s.state, 0, acc_t(0), acc_t(0), tol, true);
    EXPECT(t.improved && t.done && s.converged[0] && !s.failed[0] && s.best_rel[0] == acc_t(0));
  }
  {
    g_case = "track_sample NaN/Inf" + type;
    Samples<acc_t> s(4);
    track_sample<acc_t>(s.state, 0, acc_t(4), acc_t(4), tol, false);
    auto t = track_sample<acc_t>(s.state, 0, nan, acc_t(4), tol, false);
    EXPECT(!t.improved && t.done && s.failed[0] && !s.converged[0] && s.nstep[0] == 2);
    EXPECT(s.best_residual[0] == acc_t(2));  // the best so far stays (x_next ← best_x)
    t = track_sample<acc_t>(s.state, 0, acc_t(0), acc_t(1), tol, false);  // failed is final
    EXPECT(!t.improved && t.done && !s.converged[0] && s.nstep[0] == 2);
    t = track_sample<acc_t>(s.state, 1, acc_t(1), nan, tol, false);  // NaN f norm fails in abs mode too
    EXPECT(!t.improved && t.done && s.failed[1] && s.nstep[1] == 1 && std::isinf(s.best_residual[1]));
    t = track_sample<acc_t>(s.state, 2, inf, acc_t(1), tol, false);
    EXPECT(!t.improved && t.done && s.failed[2]);
    t = track_sample<acc_t>(s.state, 3, acc_t(1), inf, tol, true);  // rel = 0 but ‖f‖ = inf
    EXPECT(!t.improved && t.done && s.failed[3] && !s.converged[3]);
  }
}

// ---------------------------------------------------------------------------------------------
// (c) the CPU ops through the dispatcher
// ---------------------------------------------------------------------------------------------

void test_anderson_history(at::ScalarType dtype) {
  const auto acc = at::toOpMathType(dtype);
  const double rtol = acc == at::kDouble ? 1e-12 : 5e-5;  // relative to Σ|terms|
  for (int64_t d : {1, 7, 4096, 5000, 8193, 3 * 4096}) {
    std::ostringstream c;
    c << "anderson_history " << dtype << " d=" << d;
    g_case = c.str();
    const int64_t B = 3, m = 4, slot = 2, C = deqfast::num_chunks(d);
    const auto opts = at::TensorOptions().dtype(dtype);
    at::Tensor x = at::randn({B, d}, opts), fx = at::randn({B, d}, opts);
    at::Tensor F = at::randn({B, m, d}, opts), G = at::randn({B, m, d}, opts);
    const at::Tensor F0 = F.clone(), G0 = G.clone();
    const at::Tensor partials = history_op().call(x, fx, F, G, slot);
    // the slot written, in x's dtype; the other slots untouched
    check_equal(F.select(1, slot), fx, "F[:, slot] == fx");
    check_equal(G.select(1, slot), fx - x, "G[:, slot] == fx - x");
    for (int64_t j = 0; j < m; ++j) {
      if (j == slot) continue;
      check_equal(F.select(1, j), F0.select(1, j), "other F slots unchanged");
      check_equal(G.select(1, j), G0.select(1, j), "other G slots unchanged");
    }
    EXPECT_MSG(partials.scalar_type() == acc && partials.sizes() == at::IntArrayRef({B, C, m + 1}),
              "partials " << partials.scalar_type() << " " << partials.sizes());
    if (partials.sizes() != at::IntArrayRef({B, C, m + 1})) continue;
    // per chunk and summed: <G_j, g> for every slot, then ‖fx‖², in double
    const at::Tensor Gd = G.to(at::kDouble), gd = (fx - x).to(at::kDouble), fd = fx.to(at::kDouble);
    for (int64_t c0 = 0; c0 < C; ++c0) {
      const int64_t lo = c0 * deqfast::kChunk, hi = std::min(d, lo + deqfast::kChunk);
      const at::Tensor Gc = Gd.slice(2, lo, hi), gc = gd.slice(1, lo, hi).unsqueeze(2), fc = fd.slice(1, lo, hi);
      const at::Tensor want = at::cat({at::bmm(Gc, gc).squeeze(2), fc.square().sum(1, true)}, 1);
      const at::Tensor mag = at::cat({at::bmm(Gc.abs(), gc.abs()).squeeze(2), fc.square().sum(1, true)}, 1);
      const at::Tensor got = partials.select(1, c0).to(at::kDouble);
      EXPECT_MSG(((got - want).abs() <= rtol * mag + 1e-300).all().item<bool>(),
                "chunk " << c0 << ": max |diff| " << (got - want).abs().max().item<double>());
    }
    const at::Tensor want = at::cat({at::bmm(Gd, gd.unsqueeze(2)).squeeze(2), fd.square().sum(1, true)}, 1);
    const at::Tensor mag = at::cat({at::bmm(Gd.abs(), gd.abs().unsqueeze(2)).squeeze(2), fd.square().sum(1, true)}, 1);
    const at::Tensor got = partials.sum(1).to(at::kDouble);
    EXPECT_MSG(((got - want).abs() <= rtol * mag + 1e-300).all().item<bool>(),
              "sum over chunks: max |diff| " << (got - want).abs().max().item<double>());
  }
}

void test_history_determinism() {
  g_case = "anderson_history: same bits for 1 and 2 threads";
  const int64_t B = 3, m = 5, d = 3 * 4096 + 17;
  at::Tensor x = at::randn({B, d}, kD.dtype(at::kFloat)), fx = at::randn({B, d}, kD.dtype(at::kFloat));
  at::Tensor F = at::zeros({B, m, d}, x.options()), G = at::randn({B, m, d}, x.options());
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor F1 = F.clone(), G1 = G.clone();
  const at::Tensor p1 = history_op().call(x, fx, F1, G1, 1);
  at::set_num_threads(std::max(2, threads));
  at::Tensor F2 = F.clone(), G2 = G.clone();
  const at::Tensor p2 = history_op().call(x, fx, F2, G2, 1);
  at::set_num_threads(threads);
  check_equal(p1, p2, "partials");
}

void test_anderson_step() {
  // B = 3 samples, m = 4 slots, 3 filled, new residual in slot 2, two chunks per sample:
  //   sample 0: fresh → improved, Anderson mix with KKT weights;
  //   sample 1: converged before → x_next = its best_x, state untouched;
  //   sample 2: f(x) is NaN → failed, x_next = its (old) best_x.
  g_case = "anderson_step";
  const int64_t B = 3, m = 4, n_filled = 3, slot = 2, d = 5000;
  const double lam = 1e-3, tau = 0.8, tol = 1e-8;
  at::Tensor x = at::randn({B, d}, kD), fx = at::randn({B, d}, kD);
  fx[2][1234] = std::numeric_limits<double>::quiet_NaN();
  at::Tensor F = at::randn({B, m, d}, kD), G = at::randn({B, m, d}, kD);  // slot 3 empty: finite garbage
  at::Tensor gram = at::zeros({B, m, m}, kD);
  {
    const at::Tensor Gf = G.slice(1, 0, n_filled);
    gram.slice(1, 0, n_filled).slice(2, 0, n_filled).copy_(at::bmm(Gf, Gf.transpose(1, 2)));
    gram.select(1, slot).fill_(-77.0);  // stale row/column: overwritten
    gram.select(2, slot).fill_(-77.0);
  }
  State s(at::randn({B, d}, kD));
  s.converged[1] = true;
  s.best_residual[1] = 0.5;
  s.best_rel[1] = 0.25;
  s.nstep[1] = 7;
  const at::Tensor best_x_before = s.best_x.clone();
  const at::Tensor partials = history_op().call(x, fx, F, G, slot);
  const at::Tensor x_next = step_op().call(x, F, G, gram, partials, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                           s.converged, s.failed, n_filled, slot, lam, tau, tol, false);
  // gram: row and column `slot` are the new inner products, for every sample
  const at::Tensor Gf = G.slice(1, 0, n_filled);
  const at::Tensor want_gram = at::bmm(Gf, Gf.transpose(1, 2));
  check_close(gram.slice(1, 0, n_filled).slice(2, 0, n_filled).slice(0, 0, 2), want_gram.slice(0, 0, 2), 1e-12,
              1e-9, "gram (filled block)");
  EXPECT(at::isnan(gram[2][slot][slot]).item<bool>());
  check_close(gram.select(1, slot).select(1, 3), at::bmm(G.select(1, slot).unsqueeze(1), G.select(1, 3).unsqueeze(2)).flatten(),
              1e-12, 1e-9, "gram (slot, empty slot)");
  // sample 0: state
  const at::Tensor g0 = fx[0] - x[0];
  EXPECT_NEAR(s.best_residual[0].item<double>(), g0.norm().item<double>(), 1e-10);
  EXPECT_NEAR(s.best_rel[0].item<double>(), (g0.norm() / fx[0].norm()).item<double>(), 1e-12);
  EXPECT(s.nstep[0].item<int64_t>() == 1 && !s.converged[0].item<bool>() && !s.failed[0].item<bool>());
  check_equal(s.best_x[0], x[0], "sample 0 best_x = x");
  // sample 0: x_next = Σ α_j F_j − (1 − τ) Σ α_j G_j with the KKT weights
  const std::vector<double> alpha = kkt_weights(want_gram[0], n_filled, lam);
  at::Tensor want0 = at::zeros({d}, kD);
  for (int64_t j = 0; j < n_filled; ++j) want0 += alpha[j] * (F[0][j] - (1.0 - tau) * G[0][j]);
  check_close(x_next[0], want0, 1e-9, 1e-9, "sample 0 x_next");
  // sample 1: frozen
  check_equal(x_next[1], best_x_before[1], "sample 1 x_next = best_x");
  check_equal(s.best_x[1], best_x_before[1], "sample 1 best_x unchanged");
  EXPECT(s.nstep[1].item<int64_t>() == 7 && s.converged[1].item<bool>() && s.best_residual[1].item<double>() == 0.5);
  // sample 2: failed
  EXPECT(s.failed[2].item<bool>() && !s.converged[2].item<bool>() && s.nstep[2].item<int64_t>() == 1);
  check_equal(x_next[2], best_x_before[2], "sample 2 x_next = best_x");
  EXPECT(std::isinf(s.best_residual[2].item<double>()));

  // argument checks name the argument
  g_case = "anderson_step argument checks";
  EXPECT_THROWS_WITH(step_op().call(x, F, G, gram, partials, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                   s.converged, s.failed, /*n_filled=*/2, slot, lam, tau, tol, false),
                    "n_filled");
  at::Tensor gram_f = gram.to(at::kFloat);
  EXPECT_THROWS_WITH(step_op().call(x, F, G, gram_f, partials, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                   s.converged, s.failed, n_filled, slot, lam, tau, tol, false),
                    "gram");
}

// One fixed_point_step over five hand-made samples, abs or rel mode, with or without offset.
//   0: fresh, far from converged → improved, damped step;
//   1: best residual already tiny → not improved, damped step, best_x kept;
//   2: converged before → frozen at best_x, nstep unchanged;
//   3: h(x) = x (+ 1e-12) → improves and converges now: x_next = best_x = x;
//   4: NaN in h → failed, x_next = the old best_x.
void test_fixed_point_step(at::ScalarType dtype, int64_t d, bool with_offset, double tau, bool rel_mode) {
  std::ostringstream c;
  c << "fixed_point_step " << dtype << " d=" << d << (with_offset ? " offset" : " no offset") << " tau=" << tau
    << (rel_mode ? " rel" : " abs");
  g_case = c.str();
  const auto opts = at::TensorOptions().dtype(dtype);
  const int64_t B = 5;
  const double tol = 1e-6;
  at::Tensor x = at::randn({B, d}, opts), fx = at::randn({B, d}, opts);
  std::optional<at::Tensor> offset;
  if (with_offset) offset = at::randn({B, d}, opts);
  // sample 3: h = x exactly
  fx[3].copy_(x[3]);
  if (with_offset) (*offset)[3].zero_();
  fx[4][d / 2] = std::numeric_limits<double>::quiet_NaN();
  State s(at::randn({B, d}, opts));
  s.best_residual[1] = 1e-30;
  s.best_rel[1] = 1e-30;
  s.converged[2] = true;
  s.nstep[2] = 4;
  s.best_residual[2] = 1e-7;
  s.best_rel[2] = 1e-7;
  const at::Tensor best_x0 = s.best_x.clone();
  const at::Tensor x_next = fixed_point_op().call(x, fx, offset, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                                  s.converged, s.failed, tau, tol, rel_mode);
  // hand computation in double (h rounded to x's dtype, as the op forms it)
  const at::Tensor h = (with_offset ? fx + *offset : fx).to(at::kDouble);
  const at::Tensor xd = x.to(at::kDouble);
  const at::Tensor step = tau == 1.0 ? h : xd + tau * (h - xd);
  const double rtol = dtype == at::kDouble ? 1e-14 : 1e-6;
  const double atol = dtype == at::kDouble ? 1e-14 : 4e-6;
  check_close(x_next[0], step[0], rtol, atol, "sample 0 x_next = step");
  check_equal(s.best_x[0], x[0], "sample 0 best_x = x");
  const double r0 = (h[0] - xd[0]).norm().item<double>(), f0 = h[0].norm().item<double>();
  EXPECT_NEAR(s.best_residual[0].item<double>(), r0, r0 * (dtype == at::kDouble ? 1e-13 : 5e-5));
  EXPECT_NEAR(s.best_rel[0].item<double>(), r0 / f0, r0 / f0 * (dtype == at::kDouble ? 1e-13 : 5e-5));
  check_close(x_next[1], step[1], rtol, atol, "sample 1 x_next = step");
  check_equal(s.best_x[1], best_x0[1], "sample 1 best_x kept");
  EXPECT(s.best_residual[1].item<double>() == s.best_residual.new_full({}, 1e-30).item<double>());
  check_equal(x_next[2], best_x0[2], "sample 2 x_next = best_x");
  check_equal(s.best_x[2], best_x0[2], "sample 2 best_x kept");
  EXPECT(s.best_residual[2].item<double>() == s.best_residual.new_full({}, 1e-7).item<double>());
  check_equal(s.best_x[3], x[3], "sample 3 best_x = x");
  check_equal(x_next[3], x[3], "sample 3 x_next = x");
  EXPECT(s.best_residual[3].item<double>() == 0.0);
  check_equal(x_next[4], best_x0[4], "sample 4 x_next = old best_x");
  check_equal(s.best_x[4], best_x0[4], "sample 4 best_x kept");
  const std::vector<int64_t> want_nstep = {1, 1, 4, 1, 1};
  const std::vector<bool> want_conv = {false, false, true, true, false}, want_fail = {false, false, false, false, true};
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_MSG(s.nstep[b].item<int64_t>() == want_nstep[b], "nstep[" << b << "] = " << s.nstep[b].item<int64_t>());
    EXPECT_MSG(s.converged[b].item<bool>() == want_conv[b], "converged[" << b << "]");
    EXPECT_MSG(s.failed[b].item<bool>() == want_fail[b], "failed[" << b << "]");
  }
  // a second step from x_next: sample 0 moves on, the done samples stay put
  const at::Tensor best_x1 = s.best_x.clone();
  const at::Tensor x2 = fixed_point_op().call(x_next, fx, offset, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                              s.converged, s.failed, tau, tol, rel_mode);
  for (int64_t b : {2, 3, 4}) check_equal(x2[b], best_x1[b], "second step: done sample frozen");
  EXPECT(s.nstep[0].item<int64_t>() == 2 && s.nstep[3].item<int64_t>() == 1 && s.nstep[4].item<int64_t>() == 1);
}

void test_fixed_point_argument_checks() {
  g_case = "fixed_point_step argument checks";
  at::Tensor x = at::randn({2, 3}, kD), fx = at::randn({2, 3}, kD);
  State s(x);
  at::Tensor bad = s.best_residual.to(at::kFloat);
  EXPECT_THROWS_WITH(fixed_point_op().call(x, fx, std::nullopt, s.best_x, bad, s.best_rel, s.nstep, s.converged,
                                          s.failed, 1.0, 1e-6, false),
                    "best_residual");
  std::optional<at::Tensor> off = at::randn({2, 4}, kD);
  EXPECT_THROWS_WITH(fixed_point_op().call(x, fx, off, s.best_x, s.best_residual, s.best_rel, s.nstep, s.converged,
                                          s.failed, 1.0, 1e-6, false),
                    "offset");
}

}  // namespace

int main() {
  try {
    g_case = "build";
    EXPECT_MSG(deqfast::cuda_build_info().empty(), "the CMake build has no CUDA kernels, got '"
                                                       << deqfast::cuda_build_info() << "'");
    EXPECT(deqfast::num_chunks(1) == 1 && deqfast::num_chunks(4096) == 1 && deqfast::num_chunks(4097) == 2);
    for (const char* name : {"deqfast::anderson_history", "deqfast::anderson_step", "deqfast::fixed_point_step"}) {
      const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
      EXPECT_MSG(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU), name << " has no CPU kernel");
    }

    test_anderson_weights<double>();
    test_anderson_weights<float>();
    test_track_sample<double>();
    test_track_sample<float>();

    at::manual_seed(0);
    for (auto dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) test_anderson_history(dtype);
    test_history_determinism();
    test_anderson_step();
    for (auto dtype : {at::kDouble, at::kFloat}) {
      for (int64_t d : {1, 7, 5000}) {
        for (bool with_offset : {false, true}) {
          for (double tau : {1.0, 0.7}) {
            for (bool rel : {false, true}) test_fixed_point_step(dtype, d, with_offset, tau, rel);
          }
        }
      }
    }
    test_fixed_point_argument_checks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL [%s] uncaught exception: %s\n", g_case.c_str(), e.what());
    return 1;
  }
  return finish("deqfast C++ tests");
}
