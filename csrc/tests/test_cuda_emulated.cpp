// deqfast's CUDA kernels (csrc/cuda/*.cu, kernels and host wrappers) run on the CPU under the
// emulation of cuda_emulation.h, against the CPU ops through the dispatcher (themselves tested
// against plain ATen in test_ops.cpp and against the pure-PyTorch reference in tests/test_ops.py).
// Built and run by CMake/ctest (see CMakeLists.txt), for machines without a GPU: it checks the
// kernels' logic (indexing, chunking, block reductions, barriers, frozen/failed samples, the
// fallback of a singular system) and their launch count (3 per step), not their speed nor the
// hardware's memory model.
//
// Outputs the kernels allocate are NaN-filled on allocation (torch's deterministic
// fill-uninitialised-memory mode), so an element a kernel forgets to write fails the comparison.
#include "cuda_emulation.h"  // first: the .cu files below compile against it

#include "../cuda/anderson_cuda.cu"
#include "../cuda/broyden_cuda.cu"
#include "../cuda/fixed_point_cuda.cu"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "harness.h"

namespace {

using namespace deqfast_test;
namespace emu = deqfast::emu;

// Tolerances of the comparison emulated-CUDA vs CPU, per dtype. The two backends sum in different
// orders (16 strided values per thread, then the block tree; vs 8 lanes per chunk), so reductions
// agree to rounding. x_next is mixed from the same partials with the same weights, in the same
// order over the history: it agrees to an ulp of its dtype (a few float32 ulps for the
// near-singular sample, whose weights are large and cancel).
struct Tol {
  double reduce;  // relative, of the sums (Gram row, norms)
  double value;   // relative and absolute, of x_next
};
Tol tol_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-12, 1e-13};
    case at::kFloat: return {2e-5, 2e-6};
    case at::kHalf: return {2e-5, 1e-3};  // float accumulation, half results: 1 ulp = 2^-10
    default: return {2e-5, 8e-3};         // bfloat16: 1 ulp = 2^-7
  }
}

void check_no_emulation_errors(const std::string& where) {
  EXPECT_MSG(emu::emulation_errors() == 0, where << ": " << emu::emulation_errors() << " emulation errors, first: "
                                                 << emu::first_error);
}

void check_state_equal(const State& got, const State& want, double rtol) {
  check_equal(got.best_x, want.best_x, "best_x");
  check_close(got.best_residual, want.best_residual, rtol, 0.0, "best_residual");
  check_close(got.best_rel, want.best_rel, rtol, 0.0, "best_rel");
  check_equal(got.nstep, want.nstep, "nstep");
  check_equal(got.converged, want.converged, "converged");
  check_equal(got.failed, want.failed, "failed");
}

State clone_state(const State& s) {
  State c(s.best_x);
  c.best_residual.copy_(s.best_residual);
  c.best_rel.copy_(s.best_rel);
  c.nstep.copy_(s.nstep);
  c.converged.copy_(s.converged);
  c.failed.copy_(s.failed);
  return c;
}

// ---------------------------------------------------------------------------------------------
// The emulation itself: a block reduction gives the exact sum, and a broken kernel is caught.
// ---------------------------------------------------------------------------------------------

__global__ void block_sum_kernel(double* out) {
  __shared__ double scratch[deqfast::cuda::kThreads / 32];
  const double total = deqfast::cuda::block_sum(static_cast<double>(threadIdx.x + 1), scratch);
  const double twice = deqfast::cuda::block_sum(total, scratch);  // scratch reused across calls
  out[blockIdx.x * deqfast::cuda::kThreads + threadIdx.x] = twice;
}

__global__ void divergent_sync_kernel(int* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

void test_emulation() {
  g_case = "emulation: block_sum";
  constexpr int T = deqfast::cuda::kThreads;
  std::vector<double> out(3 * T, -1.0);
  emu::launch(block_sum_kernel, 3, T, out.data());
  const double want = double(T) * (T + 1) / 2 * T;  // every thread sees the sum; summed again
  for (int i = 0; i < 3 * T; ++i) EXPECT_MSG(out[i] == want, "out[" << i << "] = " << out[i] << ", want " << want);
  check_no_emulation_errors(g_case);

  g_case = "emulation: a broken kernel is reported";
  std::vector<int> flags(T, 0);
  emu::launch(divergent_sync_kernel, 1, T, flags.data());
  EXPECT_MSG(emu::emulation_errors() > 0, "divergent __syncthreads() went unnoticed");
  emu::errors = 0;
  emu::launch(divergent_sync_kernel, 1, 48, flags.data());  // not a whole number of warps
  EXPECT_MSG(emu::emulation_errors() == 1, "bad launch geometry: " << emu::emulation_errors() << " errors");
  emu::errors = 0;
}

// ---------------------------------------------------------------------------------------------
// One Anderson step (pass A + pass B), emulated CUDA vs CPU.
// ---------------------------------------------------------------------------------------------

struct AndersonCase {
  int64_t B, d, m, n_filled, slot;
  double tau;
  bool rel_mode;
};

void test_anderson_step(at::ScalarType dtype, const AndersonCase& k) {
  std::ostringstream c;
  c << "anderson " << dtype << " B=" << k.B << " d=" << k.d << " m=" << k.m << " n=" << k.n_filled << " slot=" << k.slot
    << " tau=" << k.tau << (k.rel_mode ? " rel" : " abs");
  g_case = c.str();
  const Tol tol = tol_for(dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto acc = at::toOpMathType(dtype);
  const double lam = 1e-4, conv_tol = 1e-6;
  at::Tensor x = at::randn({k.B, k.d}, opts), fx = (0.5 * at::randn({k.B, k.d}, opts) + x).to(dtype);
  // History: F_j = x_j + G_j for the filled slots; the slots past n_filled are stale garbage.
  at::Tensor F = at::randn({k.B, k.m, k.d}, opts), G = at::randn({k.B, k.m, k.d}, opts);
  at::Tensor gram = at::full({k.B, k.m, k.m}, -77.0, opts.dtype(acc));
  {
    const at::Tensor Gf = G.slice(1, 0, k.n_filled).to(acc);
    gram.slice(1, 0, k.n_filled).slice(2, 0, k.n_filled).copy_(at::bmm(Gf, Gf.transpose(1, 2)));
  }
  State s(at::randn({k.B, k.d}, opts));
  if (k.B >= 2) {  // sample 1 converged before: frozen
    s.converged[1] = true;
    s.nstep[1] = 3;
    s.best_residual[1] = 0.5;
    s.best_rel[1] = 0.25;
  }
  if (k.B >= 3) fx[2][k.d / 2] = std::numeric_limits<double>::quiet_NaN();  // sample 2 fails now
  if (k.B >= 4 && k.n_filled >= 2 && k.slot != 0) {  // sample 3: the new residual repeats slot 0's (near-singular)
    G[3][0].copy_((fx[3] - x[3]).to(dtype));
  }

  // CPU ops
  at::Tensor F_cpu = F.clone(), G_cpu = G.clone(), gram_cpu = gram.clone();
  State s_cpu = clone_state(s);
  const at::Tensor part_cpu = history_op().call(x, fx, F_cpu, G_cpu, k.slot);
  const at::Tensor next_cpu = step_op().call(x, F_cpu, G_cpu, gram_cpu, part_cpu, s_cpu.best_x, s_cpu.best_residual,
                                             s_cpu.best_rel, s_cpu.nstep, s_cpu.converged, s_cpu.failed, k.n_filled,
                                             k.slot, lam, k.tau, conv_tol, k.rel_mode);
  // emulated CUDA: pass A, then pass B on the CPU's partials (so that x_next compares tightly)
  at::Tensor F_emu = F.clone(), G_emu = G.clone(), gram_emu = gram.clone();
  State s_emu = clone_state(s);
  const int64_t launches_before = emu::launches;
  const at::Tensor part_emu = deqfast::cuda::anderson_history_cuda(x, fx, F_emu, G_emu, k.slot);
  check_no_emulation_errors("anderson_history");
  EXPECT_MSG(emu::launches - launches_before == 1, "anderson_history: " << emu::launches - launches_before << " launches");
  const at::Tensor next_emu = deqfast::cuda::anderson_step_cuda(
      x, F_emu, G_emu, gram_emu, part_cpu, s_emu.best_x, s_emu.best_residual, s_emu.best_rel, s_emu.nstep,
      s_emu.converged, s_emu.failed, k.n_filled, k.slot, lam, k.tau, conv_tol, k.rel_mode);
  check_no_emulation_errors("anderson_step");
  // PERFORMANCE.md's target: at most 3 launches per Anderson step (pass A, then pass B as two)
  EXPECT_MSG(emu::launches - launches_before == 3, "an Anderson step: " << emu::launches - launches_before << " launches");

  check_close(F_emu, F_cpu, 0.0, 0.0, "F");  // equal, NaN included
  check_close(G_emu, G_cpu, 0.0, 0.0, "G");
  // partials: per (sample, chunk), relative to the sum of |terms| (cancellation-proof)
  {
    const at::Tensor Gd = G_cpu.to(at::kDouble), gd = (G_cpu.select(1, k.slot)).to(at::kDouble);
    const at::Tensor fd = fx.to(at::kDouble);
    const int64_t C = deqfast::num_chunks(k.d);
    EXPECT_MSG(part_emu.sizes() == part_cpu.sizes() && part_emu.scalar_type() == acc, "partials " << part_emu.sizes());
    for (int64_t c0 = 0; c0 < C && part_emu.sizes() == part_cpu.sizes(); ++c0) {
      const int64_t lo = c0 * deqfast::kChunk, hi = std::min(k.d, lo + deqfast::kChunk);
      const at::Tensor Gc = Gd.slice(2, lo, hi).abs(), gc = gd.slice(1, lo, hi).abs().unsqueeze(2);
      const at::Tensor fc = fd.slice(1, lo, hi);
      const at::Tensor mag = at::cat({at::bmm(Gc, gc).squeeze(2), fc.square().sum(1, true)}, 1);
      const at::Tensor got = part_emu.select(1, c0).to(at::kDouble), want = part_cpu.select(1, c0).to(at::kDouble);
      const at::Tensor bad = ((got - want).abs() > tol.reduce * mag) & mag.isfinite();
      EXPECT_MSG(!bad.any().item<bool>(), "partials, chunk " << c0 << ": max |diff| "
                                                              << at::nan_to_num((got - want).abs()).max().item<double>());
      EXPECT_MSG((got.isnan() == want.isnan()).all().item<bool>(), "partials, chunk " << c0 << ": NaN pattern");
    }
  }
  check_close(gram_emu, gram_cpu, 1e-12, 0.0, "gram");  // the same partials: the same sums, in order
  check_state_equal(s_emu, s_cpu, 1e-12);
  check_close(next_emu, next_cpu, tol.value, tol.value, "x_next");
  EXPECT_MSG(!next_emu.isnan().any().item<bool>(), "x_next has NaN (an unwritten element, or a failed sample's NaN)");

  // anderson_fused_step: both passes from one call on preallocated scratch buffers, the same bits as
  // anderson_history then anderson_step (emulated), in the same 3 launches.
  {
    at::Tensor F1 = F.clone(), G1 = G.clone(), gram1 = gram.clone();
    State s1 = clone_state(s);
    const at::Tensor p1 = deqfast::cuda::anderson_history_cuda(x, fx, F1, G1, k.slot);
    const at::Tensor n1 = deqfast::cuda::anderson_step_cuda(x, F1, G1, gram1, p1, s1.best_x, s1.best_residual,
                                                            s1.best_rel, s1.nstep, s1.converged, s1.failed, k.n_filled,
                                                            k.slot, lam, k.tau, conv_tol, k.rel_mode);
    at::Tensor F2 = F.clone(), G2 = G.clone(), gram2 = gram.clone();
    State s2 = clone_state(s);
    at::Tensor partials = at::full_like(p1, std::numeric_limits<double>::quiet_NaN());
    at::Tensor alpha = at::full({k.B, k.m}, std::numeric_limits<double>::quiet_NaN(), opts.dtype(acc));
    at::Tensor flags = at::full({k.B, 2}, 7, opts.dtype(at::kByte));
    const int64_t before = emu::launches;
    const at::Tensor out = deqfast::cuda::anderson_fused_step_cuda(
        x, fx, F2, G2, gram2, partials, alpha, flags, s2.best_x, s2.best_residual, s2.best_rel, s2.nstep, s2.converged,
        s2.failed, k.n_filled, k.slot, lam, k.tau, conv_tol, k.rel_mode);
    check_no_emulation_errors("anderson_fused_step");
    EXPECT_MSG(emu::launches - before == 3, "anderson_fused_step: " << emu::launches - before << " launches");
    check_close(out, n1, 0.0, 0.0, "fused step x_next");
    check_close(F2, F1, 0.0, 0.0, "fused step F");
    check_close(G2, G1, 0.0, 0.0, "fused step G");
    check_close(partials, p1, 0.0, 0.0, "fused step partials");
    check_close(gram2, gram1, 0.0, 0.0, "fused step gram");
    check_state_equal(s2, s1, 0.0);
  }
}

// Whole Anderson solves of z = tanh(W z + b) (a contraction) with either backend's ops, the ring
// buffer as deqfast.solvers.anderson drives it: both reach the fixed point, with the same stats.
void test_anderson_solve(at::ScalarType dtype, int64_t B, int64_t d, int64_t m, double tau) {
  std::ostringstream c;
  c << "anderson solve " << dtype << " B=" << B << " d=" << d << " m=" << m << " tau=" << tau;
  g_case = c.str();
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor W = (at::randn({d, d}, opts) * (0.4 / std::sqrt(double(d)))).to(dtype);  // ‖W‖ ≈ 0.8
  const at::Tensor bias = at::randn({B, d}, opts);
  auto f = [&](const at::Tensor& z) { return at::tanh(at::matmul(z, W) + bias); };
  const double conv_tol = dtype == at::kDouble ? 1e-9 : 1e-4, lam = 1e-4;
  const int64_t iters = 60;
  auto solve = [&](bool emulated) {
    at::Tensor x = at::zeros({B, d}, opts), F = at::zeros({B, m, d}, opts), G = at::zeros_like(F);
    at::Tensor gram = at::zeros({B, m, m}, opts.dtype(at::toOpMathType(dtype)));
    State s(x);
    for (int64_t it = 0; it < iters; ++it) {
      const at::Tensor fx = f(x);
      const int64_t slot = it % m, n_filled = std::min(it + 1, m);
      if (emulated) {
        const at::Tensor part = deqfast::cuda::anderson_history_cuda(x, fx, F, G, slot);
        x = deqfast::cuda::anderson_step_cuda(x, F, G, gram, part, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                              s.converged, s.failed, n_filled, slot, lam, tau, conv_tol, false);
      } else {
        const at::Tensor part = history_op().call(x, fx, F, G, slot);
        x = step_op().call(x, F, G, gram, part, s.best_x, s.best_residual, s.best_rel, s.nstep, s.converged,
                           s.failed, n_filled, slot, lam, tau, conv_tol, false);
      }
      if (s.converged.all().item<bool>()) break;
    }
    return std::make_pair(x, s);
  };
  const auto [x_cpu, s_cpu] = solve(false);
  const auto [x_emu, s_emu] = solve(true);
  check_no_emulation_errors("anderson solve");
  EXPECT_MSG(s_cpu.converged.all().item<bool>(), "the CPU solve did not converge in " << iters << " iterations");
  EXPECT_MSG(s_emu.converged.all().item<bool>(), "the emulated CUDA solve did not converge in " << iters << " iterations");
  const double res = (f(x_emu) - x_emu).norm(2, {1}).max().item<double>();
  EXPECT_MSG(res < 10 * conv_tol, "emulated solve: max residual " << res);
  check_close(x_emu, x_cpu, 0.0, 10 * conv_tol, "solution");
  // a different summation order may move a convergence test by one iteration, never more
  EXPECT_MSG((s_emu.nstep - s_cpu.nstep).abs().max().item<int64_t>() <= 1,
             "nstep " << s_emu.nstep << " vs " << s_cpu.nstep);
}

// ---------------------------------------------------------------------------------------------
// fixed_point_step, emulated CUDA vs CPU.
// ---------------------------------------------------------------------------------------------

void test_fixed_point_step(at::ScalarType dtype, int64_t B, int64_t d, bool with_offset, double tau, bool rel_mode) {
  std::ostringstream c;
  c << "fixed_point_step " << dtype << " B=" << B << " d=" << d << (with_offset ? " offset" : "") << " tau=" << tau
    << (rel_mode ? " rel" : " abs");
  g_case = c.str();
  const Tol tol = tol_for(dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  const double conv_tol = 1e-3;
  at::Tensor x = at::randn({B, d}, opts), fx = at::randn({B, d}, opts);
  std::optional<at::Tensor> offset;
  if (with_offset) offset = at::randn({B, d}, opts);
  State s(at::randn({B, d}, opts));
  s.converged[0] = true;  // frozen
  s.nstep[0] = 2;
  if (B >= 2) fx[1][d - 1] = std::numeric_limits<double>::infinity();  // fails
  if (B >= 3) {  // converges now: h(x) = x
    fx[2].copy_(x[2]);
    if (with_offset) (*offset)[2].zero_();
  }
  if (B >= 4) {  // not improved
    s.best_residual[3] = 1e-30;
    s.best_rel[3] = 1e-30;
  }
  State s_cpu = clone_state(s), s_emu = clone_state(s);
  const at::Tensor next_cpu = fixed_point_op().call(x, fx, offset, s_cpu.best_x, s_cpu.best_residual, s_cpu.best_rel,
                                                    s_cpu.nstep, s_cpu.converged, s_cpu.failed, tau, conv_tol, rel_mode);
  const int64_t launches_before = emu::launches;
  const at::Tensor next_emu = deqfast::cuda::fixed_point_step_cuda(x, fx, offset, s_emu.best_x, s_emu.best_residual,
                                                                    s_emu.best_rel, s_emu.nstep, s_emu.converged,
                                                                    s_emu.failed, tau, conv_tol, rel_mode);
  check_no_emulation_errors("fixed_point_step");
  EXPECT_MSG(emu::launches - launches_before == 3, "fixed_point_step: " << emu::launches - launches_before << " launches");
  check_state_equal(s_emu, s_cpu, tol.reduce);
  check_close(next_emu, next_cpu, tol.value, tol.value, "x_next");
  EXPECT_MSG(!next_emu.isnan().any().item<bool>(), "x_next has NaN (an unwritten element?)");
  if (B >= 3) EXPECT(s_emu.converged[2].item<bool>() && s_emu.failed[1].item<bool>());
}

// Whole adjoint-style solves u = g + Aᵀu (‖A‖ ≈ 0.6) by fixed_point_step with offset g, either
// backend: both reach the dense solution (I − Aᵀ)⁻¹ g, with the same stats.
void test_fixed_point_solve(at::ScalarType dtype, int64_t B, int64_t d, double tau) {
  std::ostringstream c;
  c << "fixed-point solve " << dtype << " B=" << B << " d=" << d << " tau=" << tau;
  g_case = c.str();
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor A = at::randn({d, d}, opts) * (0.3 / std::sqrt(double(d)));
  const at::Tensor g = at::randn({B, d}, opts);
  const double conv_tol = dtype == at::kDouble ? 1e-10 : 1e-5;
  auto solve = [&](bool emulated) {
    at::Tensor u = at::zeros({B, d}, opts);
    State s(u);
    for (int it = 0; it < 200 && !s.converged.all().item<bool>(); ++it) {
      const at::Tensor v = at::matmul(u, A);  // (Aᵀ u) for each row u
      const std::optional<at::Tensor> offset = g;
      u = emulated ? deqfast::cuda::fixed_point_step_cuda(u, v, offset, s.best_x, s.best_residual, s.best_rel, s.nstep,
                                                          s.converged, s.failed, tau, conv_tol, false)
                   : fixed_point_op().call(u, v, offset, s.best_x, s.best_residual, s.best_rel, s.nstep, s.converged,
                                           s.failed, tau, conv_tol, false);
    }
    return std::make_pair(s.best_x, s);
  };
  const auto [u_cpu, s_cpu] = solve(false);
  const auto [u_emu, s_emu] = solve(true);
  check_no_emulation_errors("fixed-point solve");
  EXPECT_MSG(s_emu.converged.all().item<bool>(), "the emulated CUDA solve did not converge");
  // u (I − A) = g, row-wise, solved densely in double
  const at::Tensor I = at::eye(d, kD);
  const at::Tensor want = at::linalg_solve((I - A.to(at::kDouble)).t(), g.to(at::kDouble).t()).t();
  check_close(u_emu, want, 0.0, 20 * conv_tol, "solution vs dense solve");
  check_close(u_emu, u_cpu, 0.0, 20 * conv_tol, "solution vs CPU ops");
  EXPECT_MSG((s_emu.nstep - s_cpu.nstep).abs().max().item<int64_t>() <= 1,
             "nstep " << s_emu.nstep << " vs " << s_cpu.nstep);
}

// ---------------------------------------------------------------------------------------------
// Broyden's ring-buffer ops, emulated CUDA vs CPU.
// ---------------------------------------------------------------------------------------------

struct BroydenCase {
  int64_t B, d, m, filled, slot;
};

void test_broyden(at::ScalarType dtype, const BroydenCase& k) {
  std::ostringstream c;
  c << "broyden " << dtype << " B=" << k.B << " d=" << k.d << " m=" << k.m << " filled=" << k.filled
    << " slot=" << k.slot;
  g_case = c.str();
  const Tol tol = tol_for(dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  // U scaled so that H = −I + Σ U_i V_iᵀ is O(1); the slots past `filled` are garbage the ops must not read.
  at::Tensor U = (at::randn({k.B, k.m, k.d}, opts) / std::sqrt(double(k.d))).to(dtype);
  at::Tensor V = at::randn({k.B, k.m, k.d}, opts);
  if (k.filled < k.m) {
    U.slice(1, k.filled, k.m).fill_(std::numeric_limits<double>::quiet_NaN());
    V.slice(1, k.filled, k.m).fill_(std::numeric_limits<double>::quiet_NaN());
  }
  const at::Tensor x = at::randn({k.B, k.d}, opts), dx = at::randn({k.B, k.d}, opts);
  at::Tensor dg = at::randn({k.B, k.d}, opts);
  at::Tensor accept = at::ones({k.B}, opts.dtype(at::kBool));
  // The coefficients are sums over d in another order than the CPU's: an error of tol.reduce relative
  // to the largest |value| (not to each element, which may cancel).
  auto atol = [&](const at::Tensor& want) {
    return std::max(tol.value, tol.reduce * at::nan_to_num(want.to(at::kDouble), 0.0, 0.0, 0.0).abs().max().item<double>());
  };
  if (k.B >= 2) accept[1] = false;                   // frozen: dropped
  if (k.B >= 3) dg[2].zero_();                       // v · dg = 0: dropped
  if (k.B >= 4) dx[3][k.d / 2] = std::numeric_limits<double>::infinity();  // non-finite: dropped

  // direction, and the transpose's product
  for (bool transpose : {false, true}) {
    const at::Tensor& A = transpose ? V : U;
    const at::Tensor& Bm = transpose ? U : V;
    const at::Tensor want = broyden_direction_op().call(A, Bm, x, k.filled);
    const int64_t before = emu::launches;
    const at::Tensor got = deqfast::cuda::broyden_direction_cuda(A, Bm, x, k.filled);
    check_no_emulation_errors("broyden_direction");
    EXPECT_MSG(emu::launches - before == (k.filled > 0 ? 2 : 1),
               "broyden_direction: " << emu::launches - before << " launches");
    check_close(got, want, tol.value, atol(want), transpose ? "direction (transpose)" : "direction");
    EXPECT_MSG(!got.isnan().any().item<bool>(), "direction has NaN (an unwritten element, or a stale slot read)");
  }

  // update
  at::Tensor U_cpu = U.clone(), V_cpu = V.clone(), U_emu = U.clone(), V_emu = V.clone();
  broyden_update_op().call(dx, dg, U_cpu, V_cpu, accept, k.filled, k.slot);
  const int64_t before = emu::launches;
  deqfast::cuda::broyden_update_cuda(dx, dg, U_emu, V_emu, accept, k.filled, k.slot);
  check_no_emulation_errors("broyden_update");
  EXPECT_MSG(emu::launches - before == (k.filled > 0 ? 4 : 3), "broyden_update: " << emu::launches - before << " launches");
  check_close(U_emu, U_cpu, tol.value, atol(U_cpu), "U");  // NaN == NaN: the stale slots stay as they were
  check_close(V_emu, V_cpu, tol.value, atol(V_cpu), "V");
  // the dropped samples: the slot unchanged (slot < filled) or zeroed
  for (int64_t b = 1; b < std::min<int64_t>(k.B, 4); ++b) {
    const at::Tensor want_u = k.slot < k.filled ? U[b][k.slot] : at::zeros_like(U[b][k.slot]);
    const at::Tensor want_v = k.slot < k.filled ? V[b][k.slot] : at::zeros_like(V[b][k.slot]);
    check_close(U_emu[b][k.slot], want_u, 0.0, 0.0, "dropped u");
    check_close(V_emu[b][k.slot], want_v, 0.0, 0.0, "dropped v");
  }
  // the kept sample 0 really changed its slot, to finite values
  EXPECT_MSG(at::isfinite(U_emu[0][k.slot]).all().item<bool>() && at::isfinite(V_emu[0][k.slot]).all().item<bool>(),
             "the kept update is not finite");
}

// One whole Broyden iteration after f (broyden_fused_step), emulated CUDA vs CPU, on samples in every
// situation: active (its update kept), done before, failing now (NaN in f), converging now, improving the
// restart point, blowing up (back to the restart point, pending), pending from before (cleared with `clear`).
struct BroydenWork {
  at::Tensor x, gx, restart_x, restart_g, restart_sq, pending, U, V;
  State s;
  BroydenWork clone() const {
    return {x.clone(), gx.clone(), restart_x.clone(), restart_g.clone(), restart_sq.clone(), pending.clone(),
            U.clone(), V.clone(), clone_state(s)};
  }
};

void test_broyden_fused_step(at::ScalarType dtype, const BroydenCase& k, bool clear) {
  std::ostringstream c;
  c << "broyden_fused_step " << dtype << " B=" << k.B << " d=" << k.d << " m=" << k.m << " filled=" << k.filled
    << " slot=" << k.slot << " clear=" << clear;
  g_case = c.str();
  const Tol tol = tol_for(dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto acc = at::toOpMathType(dtype);
  at::Tensor x = at::randn({k.B, k.d}, opts), gx = at::randn({k.B, k.d}, opts);
  at::Tensor x_next = at::randn({k.B, k.d}, opts);
  // A well-posed update (v · Δg ≈ |Δx|² > 0, H = −I + E with ‖E‖ <~ 0.3): Δg = −Δx + noise.
  at::Tensor fx_next = (x_next + gx - (x_next - x) + 0.1 * at::randn({k.B, k.d}, opts)).to(dtype);
  BroydenWork w{x, gx, at::randn({k.B, k.d}, opts), at::randn({k.B, k.d}, opts),
                at::full({k.B}, 1e30, opts.dtype(acc)), at::zeros({k.B}, opts.dtype(at::kBool)),
                (0.3 * at::randn({k.B, k.m, k.d}, opts) / (std::sqrt(double(k.d)) * double(k.m))).to(dtype),
                at::randn({k.B, k.m, k.d}, opts), State(at::randn({k.B, k.d}, opts))};
  // Slots past `filled` are garbage the op must not read; slot `filled` (fresh) it must write, kept or zeroed.
  if (k.filled < k.m) {
    w.U.slice(1, k.filled, k.m).fill_(std::numeric_limits<double>::quiet_NaN());
    w.V.slice(1, k.filled, k.m).fill_(std::numeric_limits<double>::quiet_NaN());
  }
  w.s.best_rel.fill_(10.0);
  w.s.best_residual.fill_(10.0);
  w.s.nstep.fill_(3);
  if (k.B >= 2) w.s.converged[1] = true;                                     // done before: frozen
  if (k.B >= 3) fx_next[2][k.d / 2] = std::numeric_limits<double>::quiet_NaN();  // fails now
  if (k.B >= 4) fx_next[3].copy_(x_next[3]);                                   // converges now (g = 0)
  if (k.B >= 5) w.restart_sq[4] = 1e-12;                                       // blows up now
  if (k.B >= 6) w.pending[5] = true;                                           // restarted before
  BroydenWork cpu = w.clone(), emu = w.clone();
  const double conv_tol = 1e-3;
  const at::Tensor want = broyden_fused_step_op().call(
      x_next, fx_next, cpu.x, cpu.gx, cpu.U, cpu.V, cpu.restart_x, cpu.restart_g, cpu.restart_sq, cpu.pending,
      cpu.s.best_x, cpu.s.best_residual, cpu.s.best_rel, cpu.s.nstep, cpu.s.converged, cpu.s.failed, k.filled, k.slot,
      clear, conv_tol, true);
  const int64_t before = emu::launches;
  const at::Tensor got = deqfast::cuda::broyden_fused_step_cuda(
      x_next, fx_next, emu.x, emu.gx, emu.U, emu.V, emu.restart_x, emu.restart_g, emu.restart_sq, emu.pending,
      emu.s.best_x, emu.s.best_residual, emu.s.best_rel, emu.s.nstep, emu.s.converged, emu.s.failed, k.filled,
      k.slot, clear, conv_tol, true);
  check_no_emulation_errors("broyden_fused_step");
  const int64_t filled_next = std::min(k.filled + 1, k.m);
  // decide, advance, broyden_update's (3 or 4), the clear, broyden_direction's (1 or 2), the next iterate
  const int64_t launches = 2 + (k.filled > 0 ? 4 : 3) + (clear ? 1 : 0) + (filled_next > 0 ? 2 : 1) + 1;
  EXPECT_MSG(emu::launches - before == launches,
             "broyden_fused_step: " << emu::launches - before << " launches, expected " << launches);
  auto atol = [&](const at::Tensor& t) {
    return std::max(tol.value, tol.reduce * at::nan_to_num(t.to(at::kDouble), 0.0, 0.0, 0.0).abs().max().item<double>());
  };
  // The norms come from the same ATen ops on either side, the decisions from the same code: exact.
  check_state_equal(emu.s, cpu.s, 0.0);
  check_equal(emu.x, cpu.x, "x");
  check_close(emu.gx, cpu.gx, 0.0, 0.0, "gx");  // NaN where f failed
  check_equal(emu.restart_x, cpu.restart_x, "restart_x");
  check_equal(emu.restart_g, cpu.restart_g, "restart_g");
  check_equal(emu.restart_sq, cpu.restart_sq, "restart_sq");
  check_equal(emu.pending, cpu.pending, "pending");
  // the update's and the direction's sums run in another order than the CPU's
  check_close(emu.U, cpu.U, tol.value, atol(cpu.U), "U");
  check_close(emu.V, cpu.V, tol.value, atol(cpu.V), "V");
  // The next iterate: x − H gx over the op's own new state (its update and clear), best_x where done,
  // exactly; against the CPU op up to the sums' order, amplified by the subtraction's cancellation.
  const at::Tensor h = deqfast::cuda::broyden_direction_cuda(emu.U, emu.V, emu.gx, filled_next);
  const at::Tensor done = at::logical_or(emu.s.converged, emu.s.failed).unsqueeze(1);
  check_close(got, at::where(done, emu.s.best_x, at::sub(emu.x, h)), 0.0, 0.0, "next iterate from the op's state");
  const double scale = at::nan_to_num(at::cat({emu.x, h}).to(at::kDouble), 0.0, 0.0, 0.0).abs().max().item<double>();
  check_close(got, want, tol.value, std::max(atol(want), 4 * tol.value * scale), "next iterate");
  EXPECT_MSG(!got.isnan().any().item<bool>(), "the next iterate has NaN (an unwritten element, or a stale slot read)");
  // the situations really arose
  if (k.B >= 6) {
    const auto conv = cpu.s.converged.to(at::kLong), failed = cpu.s.failed.to(at::kLong);
    EXPECT_MSG(conv[1].item<int64_t>() == 1 && conv[3].item<int64_t>() == 1 && failed[2].item<int64_t>() == 1,
               "converged " << cpu.s.converged << " failed " << cpu.s.failed);
    EXPECT_MSG(cpu.pending[4].item<bool>() != clear, "pending " << cpu.pending);  // blown: pending unless cleared
    EXPECT_MSG(!cpu.pending[5].item<bool>() || !clear, "pending " << cpu.pending);
    check_equal(cpu.x[4], w.restart_x[4], "a blown sample goes back to its restart point");
    if (clear) {
      EXPECT_MSG(cpu.U[5].slice(0, 0, filled_next).abs().sum().item<double>() == 0.0, "a pending history not cleared");
    }
    check_equal(got[1], w.s.best_x[1], "a frozen sample's next iterate is its best");
  }
}

// Empty batches and empty states: nothing to launch, outputs of the right shape.
void test_empty() {
  g_case = "empty shapes";
  for (int64_t B : {0, 2}) {
    const int64_t d = B == 0 ? 5 : 0, m = 3;
    at::Tensor x = at::randn({B, d}, kD), fx = at::randn({B, d}, kD);
    at::Tensor F = at::zeros({B, m, d}, kD), G = at::zeros_like(F), gram = at::zeros({B, m, m}, kD);
    State s(x), s_cpu(x);
    const at::Tensor part_emu = deqfast::cuda::anderson_history_cuda(x, fx, F, G, 1);
    const at::Tensor part_cpu = history_op().call(x, fx, F, G, 1);
    check_equal(part_emu, part_cpu, "partials");
    const at::Tensor next = deqfast::cuda::anderson_step_cuda(x, F, G, gram, part_emu, s.best_x, s.best_residual,
                                                              s.best_rel, s.nstep, s.converged, s.failed, 2, 1, 1e-4,
                                                              1.0, 1e-6, false);
    at::Tensor gram_cpu = at::zeros({B, m, m}, kD);
    const at::Tensor next_cpu = step_op().call(x, F, G, gram_cpu, part_cpu, s_cpu.best_x, s_cpu.best_residual,
                                               s_cpu.best_rel, s_cpu.nstep, s_cpu.converged, s_cpu.failed, 2, 1, 1e-4,
                                               1.0, 1e-6, false);
    EXPECT(next.sizes() == x.sizes());
    check_equal(gram, gram_cpu, "gram");
    check_state_equal(s, s_cpu, 0.0);
    State s2(x), s2_cpu(x);
    const at::Tensor y = deqfast::cuda::fixed_point_step_cuda(x, fx, std::nullopt, s2.best_x, s2.best_residual,
                                                              s2.best_rel, s2.nstep, s2.converged, s2.failed, 1.0, 1e-6,
                                                              false);
    fixed_point_op().call(x, fx, std::nullopt, s2_cpu.best_x, s2_cpu.best_residual, s2_cpu.best_rel, s2_cpu.nstep,
                          s2_cpu.converged, s2_cpu.failed, 1.0, 1e-6, false);
    EXPECT(y.sizes() == x.sizes());
    check_state_equal(s2, s2_cpu, 0.0);
    at::Tensor U = at::randn({B, m, d}, kD), V = at::randn({B, m, d}, kD);
    const at::Tensor U0 = U.clone();
    EXPECT(deqfast::cuda::broyden_direction_cuda(U, V, x, 2).sizes() == x.sizes());
    deqfast::cuda::broyden_update_cuda(x, fx, U, V, at::ones({B}, kD.dtype(at::kBool)), 1, 1);
    check_equal(U, U0, "broyden_update on an empty state");
    check_no_emulation_errors(g_case);
  }
}

// The host wrappers' own argument checks (the CUDA-only limit on m).
void test_cuda_argument_checks() {
  g_case = "CUDA argument checks";
  const int64_t m = deqfast::kMaxHistoryCuda + 1;
  at::Tensor x = at::randn({2, 3}, kD), fx = at::randn({2, 3}, kD);
  at::Tensor F = at::zeros({2, m, 3}, kD), G = at::zeros_like(F);
  EXPECT_THROWS_WITH(deqfast::cuda::anderson_history_cuda(x, fx, F, G, 0), "m <= 32");
  at::Tensor F2 = at::zeros({2, 4, 3}, kD), G2 = at::zeros({2, 4, 4}, kD);
  EXPECT_THROWS_WITH(deqfast::cuda::anderson_history_cuda(x, fx, F2, G2, 0), "G");
  EXPECT_THROWS_WITH(deqfast::cuda::broyden_direction_cuda(F, G, x, 1), "m <= 32");
  EXPECT_THROWS_WITH(deqfast::cuda::broyden_update_cuda(x, fx, F, G, at::ones({2}, kD.dtype(at::kBool)), 1, 1),
                     "m <= 32");
  EXPECT_THROWS_WITH(deqfast::cuda::broyden_direction_cuda(F2, G2, x, 1), "V must be");
}

}  // namespace

// With --races (the ThreadSanitizer build, ~10× slower): every kernel once on every shape case, in
// float32; races do not depend on the dtype, nor on the iterations of a solve.
int main(int argc, char** argv) {
  const bool races_only = argc > 1 && std::string(argv[1]) == "--races";
  const std::vector<at::ScalarType> dtypes =
      races_only ? std::vector<at::ScalarType>{at::kFloat}
                 : std::vector<at::ScalarType>{at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};
  try {
    // Every tensor a kernel allocates starts as NaN (floating) / the max value (integral).
    at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
    at::globalContext().setDeterministicFillUninitializedMemory(true);
    at::manual_seed(0);
    test_emulation();
    const std::vector<AndersonCase> cases = {
        {1, 1, 1, 1, 0, 1.0, false},      // B = 1, d = 1, m = 1
        {3, 7, 4, 2, 1, 1.0, true},       // partial history, odd d
        {4, 4096, 5, 5, 3, 0.6, false},   // one full chunk, damping, near-singular sample 3
        {4, 8193, 4, 3, 2, 1.0, false},   // three chunks, the last of one element
        {2, 300, 32, 32, 17, 0.8, true},  // the longest history the CUDA kernels take
        {3, 5000, 6, 1, 0, 1.0, false},   // the first step
    };
    for (auto dtype : dtypes) {
      for (const auto& k : cases) test_anderson_step(dtype, k);
    }
    if (!races_only) {
      test_anderson_solve(at::kDouble, 3, 64, 5, 1.0);
      test_anderson_solve(at::kDouble, 2, 4500, 4, 0.7);
      test_anderson_solve(at::kFloat, 2, 200, 6, 1.0);
    }
    for (auto dtype : dtypes) {
      for (int64_t d : {1, 7, 8193}) {
        for (bool with_offset : {false, true}) {
          test_fixed_point_step(dtype, 5, d, with_offset, with_offset ? 0.7 : 1.0, d == 7);
        }
      }
    }
    test_fixed_point_step(at::kFloat, 130, 33, true, 1.0, false);  // two blocks of the per-sample kernel
    const std::vector<BroydenCase> broyden_cases = {
        {1, 1, 1, 1, 0},     // B = 1, d = 1, m = 1
        {4, 7, 4, 2, 2},     // filled < m, odd d, every dropped-update case
        {4, 8193, 3, 3, 1},  // three chunks (the last of one element), the ring wrapping
        {3, 300, 32, 0, 0},  // the first update, the longest history the CUDA kernels take
        {2, 4096, 32, 32, 31},
    };
    for (auto dtype : dtypes) {
      for (const auto& k : broyden_cases) test_broyden(dtype, k);
    }
    const std::vector<BroydenCase> fused_cases = {
        {1, 1, 1, 0, 0},     // the first update, B = d = m = 1
        {6, 7, 4, 2, 2},     // every situation, filled < m, odd d
        {6, 8193, 3, 3, 1},  // three chunks (the last of one element), the ring wrapping
        {6, 300, 32, 31, 31},
    };
    for (auto dtype : dtypes) {
      for (const auto& k : fused_cases) {
        for (bool clear : {false, true}) test_broyden_fused_step(dtype, k, clear);
      }
    }
    if (!races_only) {
      test_fixed_point_solve(at::kDouble, 3, 5000, 1.0);
      test_fixed_point_solve(at::kFloat, 2, 64, 0.8);
    }
    test_empty();
    test_cuda_argument_checks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL [%s] uncaught exception: %s\n", g_case.c_str(), e.what());
    return 1;
  }
  return finish(races_only ? "deqfast emulated CUDA kernel tests (--races)" : "deqfast emulated CUDA kernel tests");
}
