// CPU implementation of the fused Anderson step (pass A: anderson_history, pass B: anderson_step),
// parallel over (sample, chunk) with at::parallel_for. Each reduction runs in a fixed order per
// chunk, and chunks are summed in order: the same inputs give the same bits whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deqfast_numerics.h"
#include "../ops.h"
#include "common.h"

namespace deqfast {
namespace cpu {
namespace {

// Pass A into `partials` (B, C, m + 1); arguments checked by the caller.
void history_into(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G, int64_t slot,
                  at::Tensor& partials) {
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  if (B == 0 || d == 0) {
    partials.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_history_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    scalar_t* Fp = F.mutable_data_ptr<scalar_t>();
    scalar_t* Gp = G.mutable_data_ptr<scalar_t>();
    acc_t* out = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, c = task % C;
        const int64_t lo = c * kChunk, hi = std::min(d, lo + kChunk);
        const scalar_t* xb = xp + b * d;
        const scalar_t* fb = fp + b * d;
        scalar_t* Fs = Fp + (b * m + slot) * d;
        scalar_t* Gs = Gp + (b * m + slot) * d;
        const int64_t n = hi - lo;
        write_slot(xb + lo, fb + lo, Fs + lo, Gs + lo, n);
        acc_t* row = out + (b * C + c) * (m + 1);
        for (int64_t j = 0; j < m; ++j) row[j] = dot_ordered<acc_t>(Gp + (b * m + j) * d + lo, Gs + lo, n);
        row[m] = dot_ordered<acc_t>(fb + lo, fb + lo, n);
      }
    });
  });
}

// Pass B into `x_next`; alpha (B·m accumulation values, or null: allocated here) and flags (2B bytes:
// improved, then done) are scratch. Arguments checked by the caller.
void step_into(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
               const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
               at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, int64_t n_filled, int64_t slot, double lam,
               double tau, double tol, bool rel_mode, at::Tensor& x_next, void* alpha_buffer, uint8_t* flags) {
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1);
  if (B == 0) return;
  uint8_t* improved = flags;
  uint8_t* done = flags + B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> alpha_local(alpha_buffer ? 0 : B * m);
    acc_t* alpha = alpha_buffer ? static_cast<acc_t*>(alpha_buffer) : alpha_local.data();
    const acc_t* part = partials.const_data_ptr<acc_t>();
    const int64_t P = partials.size(1);  // chunks of the partial sums (any split: they are summed in order)
    acc_t* gp = gram.mutable_data_ptr<acc_t>();
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    // Per sample: m + 1 sums of P partials and an (n × n) solve, a few hundred flops.
    at::parallel_for(0, B, std::max<int64_t>(1, kMinElementsPerThread / ((m + 1) * (P + m * m))), [&](int64_t begin, int64_t end) {
      // A small problem (the common case at small sizes) needs no heap allocation per step.
      constexpr int64_t kStack = 16;
      acc_t row_stack[kStack + 1], work_stack[kStack * kStack + 2 * kStack];
      std::vector<acc_t> row_heap, work_heap;
      acc_t* row = row_stack;
      acc_t* work = work_stack;
      if (m > kStack) {
        row_heap.resize(m + 1);
        work_heap.resize(n_filled * n_filled + 2 * n_filled);
        row = row_heap.data();
        work = work_heap.data();
      }
      for (int64_t b = begin; b < end; ++b) {
        std::fill(row, row + m + 1, acc_t(0));
        for (int64_t c = 0; c < P; ++c)
          for (int64_t v = 0; v <= m; ++v) row[v] += part[(b * P + c) * (m + 1) + v];
        acc_t* gb = gp + b * m * m;
        for (int64_t j = 0; j < m; ++j) gb[slot * m + j] = gb[j * m + slot] = row[j];
        const TrackOutcome t = track_sample(state, b, row[slot], row[m], static_cast<acc_t>(tol), rel_mode);
        improved[b] = t.improved;
        done[b] = t.done;
        if (!t.done)
          anderson_weights(gb, int(m), int(n_filled), int(slot), static_cast<acc_t>(lam), alpha + b * m, work);
      }
    });
    const scalar_t* Fp = F.const_data_ptr<scalar_t>();
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const acc_t damping = static_cast<acc_t>(1.0 - tau);
    apply_chunks<scalar_t>(B, d, x.const_data_ptr<scalar_t>(), best_x.mutable_data_ptr<scalar_t>(),
                           x_next.mutable_data_ptr<scalar_t>(), improved, done,
                           [&](int64_t b, int64_t lo, int64_t hi, scalar_t* out) {
                             // Σ_j α_j F_j − (1 − τ) Σ_j α_j G_j, slot by slot over the chunk (vectorisable)
                             acc_t mix[kChunk];
                             const acc_t* a = alpha + b * m;
                             const int64_t n = hi - lo;
                             std::fill(mix, mix + n, acc_t(0));
                             for (int64_t j = 0; j < m; ++j) {
                               const scalar_t* Fj = Fp + (b * m + j) * d + lo;
                               for (int64_t i = 0; i < n; ++i) mix[i] += a[j] * static_cast<acc_t>(Fj[i]);
                             }
                             if (damping != acc_t(0)) {
                               for (int64_t j = 0; j < m; ++j) {
                                 const scalar_t* Gj = Gp + (b * m + j) * d + lo;
                                 const acc_t aj = damping * a[j];
                                 for (int64_t i = 0; i < n; ++i) mix[i] -= aj * static_cast<acc_t>(Gj[i]);
                               }
                             }
                             for (int64_t i = 0; i < n; ++i) out[lo + i] = static_cast<scalar_t>(mix[i]);
                           });
  });
}

at::Tensor anderson_history_cpu(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G, int64_t slot) {
  constexpr const char* op = "deqfast::anderson_history";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, d) tensor, got sizes ", x.sizes());
  check_same(op, "fx", fx, x);
  check_history_args(op, x, F, G, slot);
  check_history_overlap(x, fx, F, G);
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  at::Tensor partials = at::empty({B, C, m + 1}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  history_into(x, fx, F, G, slot, partials);
  return partials;
}

at::Tensor anderson_step_cpu(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
                             const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual,
                             at::Tensor& best_rel, at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed,
                             int64_t n_filled, int64_t slot, double lam, double tau, double tol, bool rel_mode) {
  check_anderson_step_args("deqfast::anderson_step", x, F, G, gram, partials, best_x, best_residual, best_rel, nstep,
                           converged, failed, n_filled, slot);
  at::Tensor x_next = at::empty_like(x);
  std::vector<uint8_t> flags(2 * x.size(0));
  step_into(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed, n_filled, slot, lam, tau,
            tol, rel_mode, x_next, nullptr, flags.data());
  return x_next;
}

at::Tensor anderson_fused_step_cpu(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G,
                                   at::Tensor& gram, at::Tensor& partials, at::Tensor& alpha, at::Tensor& flags,
                                   at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
                                   at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, int64_t n_filled,
                                   int64_t slot, double lam, double tau, double tol, bool rel_mode) {
  check_anderson_fused_step_args("deqfast::anderson_fused_step", x, fx, F, G, gram, partials, alpha, flags, best_x,
                                 best_residual, best_rel, nstep, converged, failed, n_filled, slot);
  at::Tensor x_next = at::empty_like(x);
  history_into(x, fx, F, G, slot, partials);
  step_into(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed, n_filled, slot, lam, tau,
            tol, rel_mode, x_next, alpha.data_ptr(), flags.mutable_data_ptr<uint8_t>());
  return x_next;
}
}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(deqfast, CPU, m) {
  m.impl("anderson_history", &cpu::anderson_history_cpu);
  m.impl("anderson_step", &cpu::anderson_step_cpu);
  m.impl("anderson_fused_step", &cpu::anderson_fused_step_cpu);
}

}  // namespace deqfast
