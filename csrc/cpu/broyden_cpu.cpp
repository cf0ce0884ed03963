// CPU implementation of Broyden's ring-buffer work (deqfast.solvers.broyden): the product of
// H = −I + Σ_{i<filled} U_i V_iᵀ with a vector (broyden_direction) and the rank-1 good-Broyden update
// (broyden_update), parallel over (sample, chunk) with at::parallel_for. Every per-sample sum runs per
// chunk in a fixed order (dot_ordered) and the chunks are summed in order: a sample's result depends
// on its own elements and d only, whatever the batch and the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../deqfast_numerics.h"
#include "../ops.h"
#include "common.h"

namespace deqfast {
namespace cpu {
namespace {

// coef[b, i] (i < n) = Σ_e A[b, i, e] y[b, e] for the samples with take(b), each a sum of chunk sums
// in order, rounded to scalar_t as the reference's `.to(x.dtype)`. A: (B, m, d), y: (B, d).
template <typename scalar_t, typename acc_t, typename Take>
void slot_dots(const scalar_t* A, const scalar_t* y, int64_t B, int64_t m, int64_t d, int64_t n, Take take,
               acc_t* coef) {
  const int64_t C = num_chunks(d);
  std::vector<acc_t> part(B * C * n);
  at::parallel_for(0, B * C, std::max<int64_t>(1, chunk_grain(d) / n), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, c = task % C;
      if (!take(b)) continue;
      const int64_t lo = c * kChunk, hi = std::min(d, lo + kChunk);
      for (int64_t i = 0; i < n; ++i)
        part[task * n + i] = dot_ordered<acc_t>(A + (b * m + i) * d + lo, y + b * d + lo, hi - lo);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    if (!take(b)) continue;
    for (int64_t i = 0; i < n; ++i) {
      acc_t s = acc_t(0);
      for (int64_t c = 0; c < C; ++c) s += part[(b * C + c) * n + i];
      coef[b * n + i] = static_cast<acc_t>(static_cast<scalar_t>(s));
    }
  }
}

// out[lo, hi) = (Σ_i A_i c_i) − y over one chunk of sample b: slot outer, elements inner (vectorisable);
// the sum rounded to scalar_t, then y subtracted, as the reference's (U * coef).sum(1) − x.
template <typename scalar_t, typename acc_t>
inline void combine_chunk(const scalar_t* A, const acc_t* c, const scalar_t* y, int64_t m, int64_t d, int64_t n,
                          int64_t b, int64_t lo, int64_t hi, scalar_t* out) {
  const int64_t len = hi - lo;
  if (n == 0) {
    for (int64_t e = 0; e < len; ++e) out[e] = -y[b * d + lo + e];
    return;
  }
  acc_t s[kChunk];
  std::fill(s, s + len, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* __restrict Ai = A + (b * m + i) * d + lo;
    const acc_t ci = c[b * n + i];
    for (int64_t e = 0; e < len; ++e) s[e] += static_cast<acc_t>(Ai[e]) * ci;
  }
  const scalar_t* yb = y + b * d + lo;
  for (int64_t e = 0; e < len; ++e) out[e] = static_cast<scalar_t>(static_cast<scalar_t>(s[e]) - yb[e]);
}

// (−I + Σ_{i<n} A_i B_iᵀ) y per sample into out (B, d); A, B: (B, m, d).
template <typename scalar_t>
void direction_impl(const scalar_t* Up, const scalar_t* Vp, const scalar_t* xp, scalar_t* op, int64_t B, int64_t d,
                    int64_t m, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = num_chunks(d);
  std::vector<acc_t> coef(B * n);
  if (n > 0) slot_dots<scalar_t, acc_t>(Vp, xp, B, m, d, n, [](int64_t) { return true; }, coef.data());
  at::parallel_for(0, B * C, std::max<int64_t>(1, chunk_grain(d) / std::max<int64_t>(n, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t task = begin; task < end; ++task) {
                       const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk);
                       combine_chunk(Up, coef.data(), xp, m, d, n, b, lo, hi, op + b * d + lo);
                     }
                   });
}

at::Tensor broyden_direction_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& x, int64_t filled) {
  check_broyden_direction_args("deqfast::broyden_direction", U, V, x, filled);
  at::Tensor out = at::empty_like(x);
  const int64_t B = x.size(0), d = x.size(1), m = U.size(1);
  if (B == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "broyden_direction_cpu", [&] {
    direction_impl(U.const_data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), B, d, m, filled);
  });
  return out;
}

// Broyden's update into slot `slot` of U, V (B, m, d) from dx, dg (B, d), over the n filled slots.
template <typename scalar_t>
void update_impl(const scalar_t* dxp, const scalar_t* dgp, scalar_t* Up, scalar_t* Vp, const bool* acc_ok, int64_t B,
                 int64_t d, int64_t m, int64_t n, int64_t filled, int64_t slot) {
  const int64_t C = num_chunks(d);
  using acc_t = at::opmath_type<scalar_t>;
  auto take = [&](int64_t b) { return acc_ok[b]; };
  // a_i = U_i · dx (for v = Hᵀ dx = −dx + Σ V_i a_i) and c_i = V_i · dg (for H dg = −dg + Σ U_i c_i).
  std::vector<acc_t> a(B * n), c(B * n);
  if (n > 0) {
    slot_dots<scalar_t, acc_t>(Up, dxp, B, m, d, n, take, a.data());
    slot_dots<scalar_t, acc_t>(Vp, dgp, B, m, d, n, take, c.data());
  }
  // v and the numerator dx − H dg of u, per chunk, with the chunk's v · dg and whether v is finite.
  std::unique_ptr<scalar_t[]> scratch(new scalar_t[2 * B * d]);  // uninitialised: every read element is written
  scalar_t* vbuf = scratch.get();
  scalar_t* ubuf = vbuf + B * d;
  std::vector<acc_t> denom_part(B * C);
  std::vector<uint8_t> v_bad(B * C, 0), u_bad(B * C, 0);
  const int64_t grain = std::max<int64_t>(1, chunk_grain(d) / std::max<int64_t>(2 * n, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    scalar_t hdg[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk), len = hi - lo;
      if (!acc_ok[b]) continue;
      scalar_t* vb = vbuf + b * d + lo;
      scalar_t* ub = ubuf + b * d + lo;
      combine_chunk(Vp, a.data(), dxp, m, d, n, b, lo, hi, vb);
      combine_chunk(Up, c.data(), dgp, m, d, n, b, lo, hi, hdg);
      const scalar_t* dxb = dxp + b * d + lo;
      bool bad = false;
      for (int64_t e = 0; e < len; ++e) {
        ub[e] = static_cast<scalar_t>(dxb[e] - hdg[e]);
        bad |= !is_finite(static_cast<acc_t>(vb[e]));
      }
      v_bad[task] = bad;
      denom_part[task] = dot_ordered<acc_t>(vb, dgp + b * d + lo, len);
    }
  });
  // Per sample: the divisor (1 where the update is dropped, as the reference divides by).
  std::vector<acc_t> divisor(B, acc_t(1));
  std::vector<uint8_t> usable(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (!acc_ok[b]) continue;
    acc_t s = acc_t(0);
    bool bad = false;
    for (int64_t ch = 0; ch < C; ++ch) {
      s += denom_part[b * C + ch];
      bad |= v_bad[b * C + ch] != 0;
    }
    const acc_t mag = s < acc_t(0) ? -s : s;
    usable[b] = mag > tiny_value<acc_t>() && !bad;  // NaN denominators compare false
    if (mag > tiny_value<acc_t>()) divisor[b] = s;
  }
  at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk);
      if (!usable[b]) continue;
      scalar_t* ub = ubuf + b * d;
      bool bad = false;
      for (int64_t e = lo; e < hi; ++e) {
        ub[e] = static_cast<scalar_t>(static_cast<acc_t>(ub[e]) / divisor[b]);
        bad |= !is_finite(static_cast<acc_t>(ub[e]));
      }
      u_bad[task] = bad;
    }
  });
  std::vector<uint8_t> keep(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    bool k = usable[b] != 0;
    for (int64_t ch = 0; ch < C && k; ++ch) k = u_bad[b * C + ch] == 0;
    keep[b] = k;
  }
  // The slot: (u, v) where kept; else the older update stays (slot < filled) or the slot is zeroed.
  at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk);
      scalar_t* Us = Up + (b * m + slot) * d;
      scalar_t* Vs = Vp + (b * m + slot) * d;
      if (keep[b]) {
        std::copy(ubuf + b * d + lo, ubuf + b * d + hi, Us + lo);
        std::copy(vbuf + b * d + lo, vbuf + b * d + hi, Vs + lo);
      } else if (slot >= filled) {
        std::fill(Us + lo, Us + hi, scalar_t(0));
        std::fill(Vs + lo, Vs + hi, scalar_t(0));
      }
    }
  });
}

void broyden_update_cpu(const at::Tensor& dx, const at::Tensor& dg, at::Tensor& U, at::Tensor& V,
                        const at::Tensor& accept, int64_t filled, int64_t slot) {
  check_broyden_update_args("deqfast::broyden_update", dx, dg, U, V, accept, filled, slot);
  const int64_t B = dx.size(0), d = dx.size(1), m = U.size(1);
  if (B == 0 || d == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "broyden_update_cpu", [&] {
    update_impl(dx.const_data_ptr<scalar_t>(), dg.const_data_ptr<scalar_t>(), U.mutable_data_ptr<scalar_t>(),
                V.mutable_data_ptr<scalar_t>(), accept.const_data_ptr<bool>(), B, d, m, filled, filled, slot);
  });
}

// One Broyden iteration after f (deqfast::broyden_fused_step): per sample, the record of the evaluation
// (track_sample), the restart decision and the keep rule's `accept`; elementwise, the best iterate, the
// restart point, (Δx, Δg) and the new point (x, gx); then broyden_update, the clearing of restarted
// samples' histories, broyden_direction over the new fill, and x − H gx (best_x for a finished sample).
// The same arithmetic as deqfast.solvers.broyden's _step over the per-op path, bit for bit.
at::Tensor broyden_fused_step_cpu(const at::Tensor& x_next, const at::Tensor& fx_next, at::Tensor& x, at::Tensor& gx, at::Tensor& U, at::Tensor& V,
                                  at::Tensor& restart_x, at::Tensor& restart_g, at::Tensor& restart_sq,
                                  at::Tensor& pending, at::Tensor& best_x, at::Tensor& best_residual,
                                  at::Tensor& best_rel, at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed,
                                  int64_t filled, int64_t slot, bool clear, double tol, bool rel_mode) {
  check_broyden_fused_step_args("deqfast::broyden_fused_step", x_next, fx_next, x, gx, U, V, restart_x,
                                restart_g, restart_sq, pending, best_x, best_residual, best_rel, nstep, converged,
                                failed, filled, slot);
  const int64_t B = x_next.size(0), d = x_next.size(1), m = U.size(1), C = num_chunks(d);
  const int64_t filled_next = std::min(filled + 1, m);
  if (B == 0) return at::empty_like(x_next);
  const BroydenResidual r = broyden_residual(x_next, fx_next);  // g, ‖g‖², ‖g‖, ‖f‖
  at::Tensor out = at::empty_like(x_next);
  std::vector<uint8_t> flags(B);
  std::unique_ptr<bool[]> accept(new bool[B]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_next.scalar_type(), "broyden_fused_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    const acc_t* g_sq = r.g_sq.const_data_ptr<acc_t>();
    const acc_t* g_norm = r.g_norm.const_data_ptr<acc_t>();
    const acc_t* f_norm = r.f_norm.const_data_ptr<acc_t>();
    acc_t* rsq = restart_sq.mutable_data_ptr<acc_t>();
    bool* pend = pending.mutable_data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      const BroydenOutcome o =
          broyden_decide<acc_t>(state, b, g_sq[b], g_norm[b], f_norm[b], rsq, pend, static_cast<acc_t>(tol), rel_mode);
      accept[b] = o.accept;
      flags[b] = o.flags;
    }
    if (d == 0) {
      if (clear) std::fill(pend, pend + B, false);
      return;
    }
    const scalar_t* xn = x_next.const_data_ptr<scalar_t>();
    const scalar_t* gn = r.g.const_data_ptr<scalar_t>();
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* rx = restart_x.mutable_data_ptr<scalar_t>();
    scalar_t* rg = restart_g.mutable_data_ptr<scalar_t>();
    scalar_t* best = best_x.mutable_data_ptr<scalar_t>();
    scalar_t* Up = U.mutable_data_ptr<scalar_t>();
    scalar_t* Vp = V.mutable_data_ptr<scalar_t>();
    std::unique_ptr<scalar_t[]> steps(new scalar_t[2 * B * d]);  // Δx, Δg
    scalar_t* dxp = steps.get();
    scalar_t* dgp = dxp + B * d;
    at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk);
        const uint8_t fl = flags[b];
        for (int64_t k = b * d + lo; k < b * d + hi; ++k)
          broyden_advance_element(fl, k, xn, gn, xp, gp, rx, rg, best, dxp, dgp);
      }
    });
    update_impl(static_cast<const scalar_t*>(dxp), static_cast<const scalar_t*>(dgp), Up, Vp,
                static_cast<const bool*>(accept.get()), B, d, m, filled, filled, slot);
    if (clear) {
      for (int64_t b = 0; b < B; ++b) {
        if (!pend[b]) continue;
        for (int64_t k = b * m * d; k < (b * m + filled_next) * d; ++k) {
          Up[k] = static_cast<scalar_t>(Up[k] * scalar_t(0));  // × 0 as the reference (−0, NaN kept)
          Vp[k] = static_cast<scalar_t>(Vp[k] * scalar_t(0));
        }
        pend[b] = false;
      }
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    direction_impl(static_cast<const scalar_t*>(Up), static_cast<const scalar_t*>(Vp), static_cast<const scalar_t*>(gp),
                   op, B, d, m, filled_next);
    at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, lo = (task % C) * kChunk, hi = std::min(d, lo + kChunk);
        const bool done = (flags[b] & kBroydenDone) != 0;
        for (int64_t k = b * d + lo; k < b * d + hi; ++k) op[k] = done ? best[k] : static_cast<scalar_t>(xp[k] - op[k]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(deqfast, CPU, m) {
  m.impl("broyden_direction", &cpu::broyden_direction_cpu);
  m.impl("broyden_update", &cpu::broyden_update_cpu);
  m.impl("broyden_fused_step", &cpu::broyden_fused_step_cpu);
}

}  // namespace deqfast
