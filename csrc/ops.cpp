// Every deqfast op schema, declared once. Backends register implementations with
// TORCH_LIBRARY_IMPL in cpu/ and cuda/; fake (meta) kernels live in deqfast/_fake.py.
#ifndef DEQFAST_NO_PYTHON  // defined by the CMake build (a libtorch-only library, no Python module)
#include <Python.h>
#include <pybind11/pybind11.h>
#endif
#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <sstream>

#include "deqfast_numerics.h"
#include "ops.h"

namespace deqfast {

namespace {
std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << t.scalar_type() << " " << t.sizes() << " on " << t.device() << (t.is_contiguous() ? "" : " (non-contiguous)");
  return out.str();
}
}  // namespace

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() && t.device() == like.device() &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous tensor like x (", describe(like), "), got ", describe(t));
}

void check_state_args(const char* op, const at::Tensor& x, const at::Tensor& best_x, const at::Tensor& best_residual,
                      const at::Tensor& best_rel, const at::Tensor& nstep, const at::Tensor& converged,
                      const at::Tensor& failed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, d) tensor, got ", describe(x));
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  check_same(op, "best_x", best_x, x);
  const auto B = x.size(0);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto check_vec = [&](const at::Tensor& t, const char* name, c10::ScalarType dtype) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == dtype && t.device() == x.device() &&
                    t.is_contiguous(),
                op, ": ", name, " must be a contiguous (", B, ",) ", dtype, " tensor on ", x.device(), ", got ",
                describe(t));
  };
  check_vec(best_residual, "best_residual", acc);
  check_vec(best_rel, "best_rel", acc);
  check_vec(nstep, "nstep", at::kLong);
  check_vec(converged, "converged", at::kBool);
  check_vec(failed, "failed", at::kBool);
}

void check_history_args(const char* op, const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, int64_t slot) {
  TORCH_CHECK(F.dim() == 3 && F.size(0) == x.size(0) && F.size(2) == x.size(1) && F.size(1) >= 1 &&
                  F.scalar_type() == x.scalar_type() && F.device() == x.device() && F.is_contiguous(),
              op, ": F must be a contiguous (B, m, d) history of x's dtype and device with (B, d) = ", x.sizes(),
              ", got ", describe(F));
  check_same(op, "G", G, F);
  TORCH_CHECK(slot >= 0 && slot < F.size(1), op, ": slot must be in [0, m) = [0, ", F.size(1), "), got ", slot);
}

void check_anderson_step_args(const char* op, const at::Tensor& x, const at::Tensor& F, const at::Tensor& G,
                              const at::Tensor& gram, const at::Tensor& partials, const at::Tensor& best_x,
                              const at::Tensor& best_residual, const at::Tensor& best_rel, const at::Tensor& nstep,
                              const at::Tensor& converged, const at::Tensor& failed, int64_t n_filled, int64_t slot) {
  check_state_args(op, x, best_x, best_residual, best_rel, nstep, converged, failed);
  check_history_args(op, x, F, G, slot);
  const int64_t B = x.size(0), m = F.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(gram.dim() == 3 && gram.size(0) == B && gram.size(1) == m && gram.size(2) == m &&
                  gram.scalar_type() == acc_type && gram.device() == x.device() && gram.is_contiguous(),
              op, ": gram must be a contiguous (", B, ", ", m, ", ", m, ") ", acc_type, " tensor on ", x.device(),
              ", got ", describe(gram));
  TORCH_CHECK(partials.dim() == 3 && partials.size(0) == B && partials.size(2) == m + 1 &&
                  partials.scalar_type() == acc_type && partials.device() == x.device() && partials.is_contiguous(),
              op, ": partials must be the (", B, ", C, ", m + 1, ") ", acc_type, " output of anderson_history, got ",
              describe(partials));
  TORCH_CHECK(n_filled >= 1 && n_filled <= m && slot < n_filled, op, ": n_filled must be in [slot + 1, m] = [",
              slot + 1, ", ", m, "], got ", n_filled);
  // Outputs must not share memory with the inputs the kernels read through __restrict__ pointers.
  at::assert_no_overlap(best_x, x);
  at::assert_no_overlap(best_x, F);
  at::assert_no_overlap(best_x, G);
  at::assert_no_overlap(gram, partials);
}

void check_history_overlap(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& F, const at::Tensor& G) {
  for (const at::Tensor* written : {&F, &G}) {
    at::assert_no_overlap(*written, x);
    at::assert_no_overlap(*written, fx);
  }
  at::assert_no_overlap(F, G);
}

void check_anderson_fused_step_args(const char* op, const at::Tensor& x, const at::Tensor& fx, const at::Tensor& F,
                                    const at::Tensor& G, const at::Tensor& gram, const at::Tensor& partials,
                                    const at::Tensor& alpha, const at::Tensor& flags, const at::Tensor& best_x,
                                    const at::Tensor& best_residual, const at::Tensor& best_rel,
                                    const at::Tensor& nstep, const at::Tensor& converged, const at::Tensor& failed,
                                    int64_t n_filled, int64_t slot) {
  check_same(op, "fx", fx, x);
  check_anderson_step_args(op, x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed,
                           n_filled, slot);
  const int64_t B = x.size(0), m = F.size(1), C = num_chunks(x.size(1));
  TORCH_CHECK(partials.size(1) == C, op, ": partials must be a (", B, ", ", C, ", ", m + 1,
              ") buffer (C = ceil(d / ", kChunk, ")), got ", describe(partials));
  const auto acc_type = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == B && alpha.size(1) == m && alpha.scalar_type() == acc_type &&
                  alpha.device() == x.device() && alpha.is_contiguous(),
              op, ": alpha must be a contiguous (", B, ", ", m, ") ", acc_type, " buffer on ", x.device(), ", got ",
              describe(alpha));
  TORCH_CHECK(flags.dim() == 2 && flags.size(0) == B && flags.size(1) == 2 && flags.scalar_type() == at::kByte &&
                  flags.device() == x.device() && flags.is_contiguous(),
              op, ": flags must be a contiguous (", B, ", 2) uint8 buffer on ", x.device(), ", got ", describe(flags));
  check_history_overlap(x, fx, F, G);
  at::assert_no_overlap(best_x, fx);
}

bool check_fixed_point_step_args(const char* op, const at::Tensor& x, const at::Tensor& fx,
                                 const c10::optional<at::Tensor>& offset, const at::Tensor& best_x,
                                 const at::Tensor& best_residual, const at::Tensor& best_rel, const at::Tensor& nstep,
                                 const at::Tensor& converged, const at::Tensor& failed) {
  check_state_args(op, x, best_x, best_residual, best_rel, nstep, converged, failed);
  check_same(op, "fx", fx, x);
  const bool has_offset = offset.has_value() && offset->defined();
  if (has_offset) check_same(op, "offset", *offset, x);
  at::assert_no_overlap(best_x, x);
  at::assert_no_overlap(best_x, fx);
  if (has_offset) at::assert_no_overlap(best_x, *offset);
  return has_offset;
}

namespace {
// A (B, m, d) ring buffer like x (B, d): contiguous, x's dtype and device, m >= 1.
void check_ring(const char* op, const char* name, const char* like_name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == x.size(0) && t.size(2) == x.size(1) && t.size(1) >= 1 &&
                  t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.is_contiguous(),
              op, ": ", name, " must be a contiguous (B, m, d) history of ", like_name,
              "'s dtype and device with (B, d) = ", x.sizes(), ", got ", describe(t));
}
}  // namespace

void check_broyden_direction_args(const char* op, const at::Tensor& U, const at::Tensor& V, const at::Tensor& x,
                                  int64_t filled) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, d) tensor, got ", describe(x));
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  check_ring(op, "U", "x", U, x);
  check_same(op, "V", V, U);
  TORCH_CHECK(filled >= 0 && filled <= U.size(1), op, ": filled must be in [0, m] = [0, ", U.size(1), "], got ",
              filled);
}

void check_broyden_update_args(const char* op, const at::Tensor& dx, const at::Tensor& dg, const at::Tensor& U,
                               const at::Tensor& V, const at::Tensor& accept, int64_t filled, int64_t slot) {
  TORCH_CHECK(dx.dim() == 2 && dx.is_contiguous(), op, ": dx must be a contiguous (B, d) tensor, got ", describe(dx));
  TORCH_CHECK(dx.is_floating_point(), op, ": dx must be floating point, got ", dx.scalar_type());
  TORCH_CHECK(dg.sizes() == dx.sizes() && dg.scalar_type() == dx.scalar_type() && dg.device() == dx.device() &&
                  dg.is_contiguous(),
              op, ": dg must be a contiguous tensor like dx (", describe(dx), "), got ", describe(dg));
  check_ring(op, "U", "dx", U, dx);
  check_same(op, "V", V, U);
  const int64_t B = dx.size(0), m = U.size(1);
  TORCH_CHECK(accept.dim() == 1 && accept.size(0) == B && accept.scalar_type() == at::kBool &&
                  accept.device() == dx.device() && accept.is_contiguous(),
              op, ": accept must be a contiguous (", B, ",) bool tensor on ", dx.device(), ", got ", describe(accept));
  TORCH_CHECK(filled >= 0 && filled <= m, op, ": filled must be in [0, m] = [0, ", m, "], got ", filled);
  TORCH_CHECK(slot >= 0 && slot < m && slot <= filled, op, ": slot must be in [0, min(filled, m - 1)] = [0, ",
              std::min(filled, m - 1), "], got ", slot);
  // U and V are written; the kernels read every input through __restrict__ pointers.
  for (const at::Tensor* written : {&U, &V}) {
    at::assert_no_overlap(*written, dx);
    at::assert_no_overlap(*written, dg);
    at::assert_no_overlap(*written, accept);
  }
  at::assert_no_overlap(U, V);
}

void check_broyden_fused_step_args(const char* op, const at::Tensor& x_next, const at::Tensor& fx_next,
                                   const at::Tensor& x, const at::Tensor& gx, const at::Tensor& U, const at::Tensor& V,
                                   const at::Tensor& restart_x, const at::Tensor& restart_g,
                                   const at::Tensor& restart_sq, const at::Tensor& pending, const at::Tensor& best_x,
                                   const at::Tensor& best_residual, const at::Tensor& best_rel,
                                   const at::Tensor& nstep, const at::Tensor& converged, const at::Tensor& failed,
                                   int64_t filled, int64_t slot) {
  check_state_args(op, x_next, best_x, best_residual, best_rel, nstep, converged, failed);
  check_same(op, "fx_next", fx_next, x_next);
  check_same(op, "x", x, x_next);
  check_same(op, "gx", gx, x_next);
  check_same(op, "restart_x", restart_x, x_next);
  check_same(op, "restart_g", restart_g, x_next);
  const int64_t B = x_next.size(0);
  auto check_vec = [&](const at::Tensor& t, const char* name, c10::ScalarType dtype) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == dtype && t.device() == x_next.device() &&
                    t.is_contiguous(),
                op, ": ", name, " must be a contiguous (", B, ",) ", dtype, " tensor on ", x_next.device(), ", got ",
                describe(t));
  };
  check_vec(restart_sq, "restart_sq", at::toOpMathType(x_next.scalar_type()));
  check_vec(pending, "pending", at::kBool);
  check_ring(op, "U", "x", U, x_next);
  check_same(op, "V", V, U);
  const int64_t m = U.size(1);
  TORCH_CHECK(filled >= 0 && filled <= m, op, ": filled must be in [0, m] = [0, ", m, "], got ", filled);
  TORCH_CHECK(slot >= 0 && slot < m && slot <= filled, op, ": slot must be in [0, min(filled, m - 1)] = [0, ",
              std::min(filled, m - 1), "], got ", slot);
  // Every written tensor is distinct from the inputs and from the other written (B, d) and (B, m, d) ones (the
  // kernels use __restrict__ pointers). check_state_args covers the per-sample vectors among themselves.
  const at::Tensor* written[] = {&x, &gx, &U, &V, &restart_x, &restart_g, &best_x, &restart_sq, &pending};
  for (const at::Tensor* w : written) {
    at::assert_no_overlap(*w, x_next);
    at::assert_no_overlap(*w, fx_next);
  }
  for (size_t i = 0; i < 7; ++i)
    for (size_t j = i + 1; j < 7; ++j) at::assert_no_overlap(*written[i], *written[j]);
}

namespace {
// p.sum(-1, dtype=acc) per row, as deqfast.solvers.broyden._row_sum: beyond kRowChunk elements, in pieces
// of kRowChunk first (torch's CPU sum would split a long single row between threads).
constexpr int64_t kRowChunk = 16384;
at::Tensor row_sum(const at::Tensor& p, c10::ScalarType acc) {
  const int64_t d = p.size(-1);
  if (d <= kRowChunk) return at::sum(p, {-1}, false, acc);
  const int64_t main = d - d % kRowChunk;
  at::Tensor s = at::sum(p.slice(-1, 0, main).unflatten(-1, {main / kRowChunk, kRowChunk}), {-1}, false, acc).sum(-1);
  if (main < d) s = at::add(s, at::sum(p.slice(-1, main, d), {-1}, false, acc));
  return s;
}
}  // namespace

BroydenResidual broyden_residual(const at::Tensor& x, const at::Tensor& fx) {
  // Inside a kernel: no autograd to record (the tensors need no grad), the backend kernels directly.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor g = at::sub(fx, x);
  at::Tensor g_sq = row_sum(at::mul(g, g), acc);
  at::Tensor g_norm = at::sqrt(g_sq);
  at::Tensor f_norm = at::sqrt(row_sum(at::mul(fx, fx), acc));
  return {std::move(g), std::move(g_sq), std::move(g_norm), std::move(f_norm)};
}

}  // namespace deqfast

TORCH_LIBRARY(deqfast, m) {
  // Pass A of an Anderson step. x, fx: (B, d); F, G: (B, m, d) ring buffers. Writes F[:, slot] = fx,
  // G[:, slot] = fx - x; returns partials (B, C, m + 1), C = ceil(d / 4096): per chunk,
  // <G_j, g> for each slot j, then ||fx||^2 (accumulation dtype).
  m.def("anderson_history(Tensor x, Tensor fx, Tensor(a!) F, Tensor(b!) G, int slot) -> Tensor");
  // Pass B: completes gram's row/column `slot` from partials, records the evaluation in the
  // per-sample state, solves the weights over the n_filled slots and returns x_next (B, d);
  // finished samples get their best iterate.
  m.def(
      "anderson_step(Tensor x, Tensor F, Tensor G, Tensor(a!) gram, Tensor partials, Tensor(b!) best_x, "
      "Tensor(c!) best_residual, Tensor(d!) best_rel, Tensor(e!) nstep, Tensor(f!) converged, Tensor(g!) failed, "
      "int n_filled, int slot, float lam, float tau, float tol, bool rel_mode) -> Tensor");
  // Damped fixed-point step of h = fx + offset (offset optional), with the same per-sample state;
  // with fx = J^T u and offset = g it is the adjoint step u <- g + J^T u.
  m.def(
      "fixed_point_step(Tensor x, Tensor fx, Tensor? offset, Tensor(a!) best_x, Tensor(b!) best_residual, "
      "Tensor(c!) best_rel, Tensor(d!) nstep, Tensor(e!) converged, Tensor(f!) failed, float tau, float tol, "
      "bool rel_mode) -> Tensor");
  // One whole Anderson step in one call (pass A, then pass B) on preallocated scratch buffers: partials
  // (B, C, m + 1) and alpha (B, m) in the accumulation dtype, flags (B, 2) uint8. Returns x_next (B, d),
  // a new tensor (an iterate handed to f is never written again). The same bits as anderson_history
  // followed by anderson_step.
  m.def(
      "anderson_fused_step(Tensor x, Tensor fx, Tensor(a!) F, Tensor(b!) G, Tensor(c!) gram, Tensor(d!) partials, "
      "Tensor(e!) alpha, Tensor(f!) flags, Tensor(g!) best_x, Tensor(h!) best_residual, Tensor(i!) best_rel, "
      "Tensor(j!) nstep, Tensor(k!) converged, Tensor(l!) failed, int n_filled, int slot, "
      "float lam, float tau, float tol, bool rel_mode) -> Tensor");
  // Broyden: (-I + sum_{i < filled} U_i V_i^T) x per sample, over the filled slots of the (B, m, d) ring
  // buffers U, V; x (B, d). With U and V swapped, the transpose's product. Returns a new (B, d) tensor.
  m.def("broyden_direction(Tensor U, Tensor V, Tensor x, int filled) -> Tensor");
  // Broyden's rank-1 "good" update from dx, dg (B, d), with H = -I + sum_{i < filled} U_i V_i^T:
  // v = H^T dx, u = (dx - H dg) / (v . dg); slot `slot` of U, V gets (u, v) where accept (B,) and
  // |v . dg| > tiny and u, v are finite; else it keeps its update (slot < filled) or is zeroed.
  m.def("broyden_update(Tensor dx, Tensor dg, Tensor(a!) U, Tensor(b!) V, Tensor accept, int filled, int slot) -> ()");
  // One Broyden iteration after f (deqfast.solvers.broyden's _step) in one call. x_next: the iterate f was
  // evaluated at, fx_next = f(x_next); gx_next = fx_next - x_next and its norms as the solver takes them in
  // torch ops (broyden_residual). In place: records the evaluation in the per-sample state (best_x ... failed); restart point (restart_x,
  // restart_g, restart_sq): x_next where g_sq < restart_sq; a sample not done with g_sq > 1e6 restart_sq
  // blew up: it goes back to the restart point and is marked pending; (x, gx) <- the new point, and
  // broyden_update(new x - x, new gx - gx, U, V, not done and not blown, filled, slot); with clear, the
  // pending samples' slots [0, min(filled + 1, m)) are multiplied by 0 and pending is reset. Returns the
  // next iterate x - H gx over min(filled + 1, m) slots, or best_x for a finished sample: a new tensor.
  m.def(
      "broyden_fused_step(Tensor x_next, Tensor fx_next, Tensor(a!) x, Tensor(b!) gx, "
      "Tensor(c!) U, Tensor(d!) V, Tensor(e!) restart_x, Tensor(f!) restart_g, Tensor(g!) restart_sq, "
      "Tensor(h!) pending, Tensor(i!) best_x, Tensor(j!) best_residual, Tensor(k!) best_rel, Tensor(l!) nstep, "
      "Tensor(m!) converged, Tensor(n!) failed, int filled, int slot, bool clear, float tol, bool rel_mode) -> Tensor");
}

#ifndef DEQFAST_NO_PYTHON
namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = TORCH_VERSION;
  info["cpu"] = true;
  const std::string cuda = deqfast::cuda_build_info();
  info["cuda"] = !cuda.empty();
  info["cuda_info"] = cuda;
  info["chunk"] = deqfast::kChunk;
  info["max_history_cuda"] = deqfast::kMaxHistoryCuda;
  pybind11::list archs;
  for (const std::string& arch : deqfast::cuda_build_archs()) archs.append(arch);
  info["cuda_archs"] = archs;
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "deqfast's fused Anderson, Broyden and fixed-point/adjoint steps (ops under torch.ops.deqfast)";
  module.def("build_info", &build_info, "How this extension was built: torch and CUDA versions, backends, archs.");
  module.def("has_cuda", [] { return !deqfast::cuda_build_info().empty(); }, "Whether the CUDA kernels are compiled in.");
  module.def("cuda_kernel_status", &deqfast::cuda_kernel_status, pybind11::arg("device"),
             "\"\" when the CUDA kernels can run on CUDA device `device`, else why not (e.g. no kernel image for "
             "its architecture).");
}
#endif  // DEQFAST_NO_PYTHON

#ifndef DEQFAST_WITH_CUDA
std::string deqfast::cuda_build_info() { return ""; }
std::vector<std::string> deqfast::cuda_build_archs() { return {}; }
std::string deqfast::cuda_kernel_status(int64_t) { return "the CUDA kernels are not compiled in"; }
#endif
