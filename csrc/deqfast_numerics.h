// Numerics that the CPU and CUDA backends share, written once as __host__ __device__ functions so
// the CPU tests exercise the very code the GPU runs: per-sample convergence tracking, the tiny
// regularised Anderson solve, and the chunking rule of the reductions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DEQ_HD __host__ __device__ __forceinline__
#else
#define DEQ_HD inline
#endif

namespace deqfast {

// Elements of one sample reduced by one block/task. Partials have shape (B, C, k) with
// C = num_chunks(d); the Python fake kernels use the same rule.
constexpr int64_t kChunk = 4096;
// The CUDA kernels keep the history's weights in shared memory; longer histories use the reference.
constexpr int kMaxHistoryCuda = 32;

DEQ_HD int64_t num_chunks(int64_t d) { return (d + kChunk - 1) / kChunk; }

template <typename acc_t>
DEQ_HD bool is_finite(acc_t v) {
  return v == v && v - v == v - v;  // false for NaN and ±Inf, without <cmath> on the device
}

template <typename acc_t>
DEQ_HD acc_t tiny_value() {
  return std::numeric_limits<acc_t>::min();
}

template <typename acc_t>
DEQ_HD acc_t sqrt_value(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// Per-sample state of a solve, the fields of SolverStats plus the best iterate (kept elsewhere).
template <typename acc_t>
struct SampleState {
  acc_t* best_residual;  // (B,)
  acc_t* best_rel;       // (B,)
  int64_t* nstep;        // (B,)
  bool* converged;       // (B,)
  bool* failed;          // (B,)
};

// Outcome of recording one evaluation of f for one sample.
struct TrackOutcome {
  bool improved;  // this iterate is the sample's best so far: best_x ← x
  bool done;      // converged or failed (now or before): x_next ← best_x
};

// Record the evaluation of f at iterate x for sample b, given ‖f(x) − x‖² and ‖f(x)‖².
// The same logic as deqfast.reference.SampleTracker.update.
template <typename acc_t>
DEQ_HD TrackOutcome track_sample_norms(const SampleState<acc_t>& s, int64_t b, acc_t residual, acc_t f_norm,
                                       acc_t tol, bool rel_mode);

template <typename acc_t>
DEQ_HD TrackOutcome track_sample(const SampleState<acc_t>& s, int64_t b, acc_t residual_sq, acc_t f_norm_sq,
                                 acc_t tol, bool rel_mode) {
  // Written so that NaN passes through (a NaN compares false): it must mark the sample failed.
  const acc_t residual = sqrt_value(residual_sq < acc_t(0) ? acc_t(0) : residual_sq);
  const acc_t f_norm = sqrt_value(f_norm_sq < acc_t(0) ? acc_t(0) : f_norm_sq);
  return track_sample_norms(s, b, residual, f_norm, tol, rel_mode);
}

// The same, given the norms ‖f(x) − x‖ and ‖f(x)‖ themselves (deqfast::broyden_fused_step takes them from
// torch's sqrt, whose float32 result can differ from a correctly rounded one in the last bit, so that its
// stats are those of deqfast.reference.SampleState.update bit for bit).
template <typename acc_t>
DEQ_HD TrackOutcome track_sample_norms(const SampleState<acc_t>& s, int64_t b, acc_t residual, acc_t f_norm,
                                       acc_t tol, bool rel_mode) {
  const acc_t rel = residual / (f_norm > tiny_value<acc_t>() ? f_norm : tiny_value<acc_t>());
  const acc_t criterion = rel_mode ? rel : residual;
  const acc_t best = rel_mode ? s.best_rel[b] : s.best_residual[b];
  const bool active = !(s.converged[b] || s.failed[b]);
  // Failed means f produced NaN/Inf; an infinite relative residual (f(x) = 0, x != 0) is merely large.
  const bool finite = is_finite(residual) && is_finite(f_norm);
  TrackOutcome out{false, !active};
  if (!active) return out;
  s.nstep[b] += 1;
  if (!finite) {
    s.failed[b] = true;
    out.done = true;
    return out;
  }
  if (criterion < best) {
    out.improved = true;
    s.best_residual[b] = residual;
    s.best_rel[b] = rel;
  }
  if (criterion < tol) {
    s.converged[b] = true;
    out.done = true;
  }
  return out;
}

// Broyden (deqfast::broyden_fused_step): a sample whose ‖g‖² exceeds this factor times its least ‖g‖² so
// far restarts from that point (deqfast.solvers.broyden: _RESTART², _RESTART = 1e3).
constexpr double kBroydenRestartSq = 1e6;
// The per-sample flags of one Broyden iteration.
constexpr uint8_t kBroydenImproved = 1;  // best_x <- x_next
constexpr uint8_t kBroydenDone = 2;      // converged or failed: the next iterate is best_x
constexpr uint8_t kBroydenBetter = 4;    // the restart point <- (x_next, gx_next)
constexpr uint8_t kBroydenBlown = 8;     // the new point is the restart point

struct BroydenOutcome {
  uint8_t flags;
  bool accept;  // the update may be kept: not done, not restarted
};

// Sample b's decisions of one Broyden iteration after f, given ‖g‖², ‖g‖ and ‖f‖ at x_next: the record of the
// evaluation (track_sample), the restart point's ‖g‖² and the pending flag, updated in place. The same
// logic as deqfast.solvers.broyden._step.
template <typename acc_t>
DEQ_HD BroydenOutcome broyden_decide(const SampleState<acc_t>& s, int64_t b, acc_t g_sq, acc_t residual,
                                     acc_t f_norm, acc_t* restart_sq, bool* pending, acc_t tol, bool rel_mode) {
  const TrackOutcome t = track_sample_norms(s, b, residual, f_norm, tol, rel_mode);
  const bool better = g_sq < restart_sq[b];  // NaN compares false
  if (better) restart_sq[b] = g_sq;
  const bool blown = !t.done && g_sq > static_cast<acc_t>(kBroydenRestartSq) * restart_sq[b];
  if (blown) pending[b] = true;
  const uint8_t flags = (t.improved ? kBroydenImproved : 0) | (t.done ? kBroydenDone : 0) |
                        (better ? kBroydenBetter : 0) | (blown ? kBroydenBlown : 0);
  return {flags, !t.done && !blown};
}

// Element k of one Broyden iteration, for a sample with `flags`: best_x, the restart point, the new
// point (x, gx) and the steps Δx = x_new − x, Δg = gx_new − gx (rounded to scalar_t as the reference's
// subtractions).
template <typename scalar_t>
DEQ_HD void broyden_advance_element(uint8_t flags, int64_t k, const scalar_t* x_next, const scalar_t* gx_next,
                                    scalar_t* x, scalar_t* gx, scalar_t* restart_x, scalar_t* restart_g,
                                    scalar_t* best_x, scalar_t* dx, scalar_t* dg) {
  const scalar_t xn = x_next[k], gn = gx_next[k];
  if (flags & kBroydenImproved) best_x[k] = xn;
  if (flags & kBroydenBetter) {
    restart_x[k] = xn;
    restart_g[k] = gn;
  }
  const bool blown = (flags & kBroydenBlown) != 0;
  const scalar_t cx = blown ? restart_x[k] : xn;
  const scalar_t cg = blown ? restart_g[k] : gn;
  dx[k] = static_cast<scalar_t>(cx - x[k]);
  dg[k] = static_cast<scalar_t>(cg - gx[k]);
  x[k] = cx;
  gx[k] = cg;
}

// Type-II Anderson weights for one sample:
//   α = argmin ‖Σ α_j g_j‖² + λ Σ α_j² ‖g_j‖²  subject to Σ α_j = 1,
// over the n filled slots 0..n−1 of the (m × m) row-major Gram matrix. Solved on the Jacobi-scaled
// system (C + λI) β = s with s_j = ‖g_j‖⁻¹, C_ij = gram_ij s_i s_j, then w = s ∘ β, α = w / Σ w, by
// Gaussian elimination with partial pivoting. ``work`` holds n·n + 2n values. Returns false (and
// α = e_slot, the plain step) when the system is singular or the weights are not finite.
// The same as deqfast.reference.anderson_weights.
// Partial pivoting of column col of the n × n matrix A (rows col..n−1): the row of largest |A[r][col]|
// (the first on ties) and that magnitude in *best. Shared by the serial and the CUDA warp solve.
template <typename acc_t>
DEQ_HD int find_pivot(const acc_t* A, int n, int col, acc_t* best) {
  int pivot = col;
  acc_t b = A[col * n + col] < acc_t(0) ? -A[col * n + col] : A[col * n + col];
  for (int r = col + 1; r < n; ++r) {
    const acc_t v = A[r * n + col] < acc_t(0) ? -A[r * n + col] : A[r * n + col];
    if (v > b) {
      b = v;
      pivot = r;
    }
  }
  *best = b;
  return pivot;
}

// The tail of the weight solve, shared by the serial solve below and the warp solve of the CUDA
// kernel: back substitution of the eliminated (upper triangular) n × n system A x = x, then the
// Jacobi unscaling x_i ← s_i x_i. Returns Σ x_i (the weights' normaliser).
template <typename acc_t>
DEQ_HD acc_t back_substitute(const acc_t* A, acc_t* x, const acc_t* s, int n) {
  for (int i = n - 1; i >= 0; --i) {
    acc_t v = x[i];
    for (int j = i + 1; j < n; ++j) v -= A[i * n + j] * x[j];
    x[i] = v / A[i * n + i];
  }
  acc_t w_sum = acc_t(0);
  for (int i = 0; i < n; ++i) {
    x[i] *= s[i];
    w_sum += x[i];
  }
  return w_sum;
}

template <typename acc_t>
DEQ_HD bool anderson_weights(const acc_t* gram, int m, int n, int slot, acc_t lam, acc_t* alpha, acc_t* work) {
  acc_t* A = work;          // n × n
  acc_t* s = work + n * n;  // n
  acc_t* x = s + n;         // n
  for (int i = 0; i < n; ++i) {
    const acc_t diag = gram[i * m + i];
    s[i] = acc_t(1) / sqrt_value(diag > tiny_value<acc_t>() ? diag : tiny_value<acc_t>());
  }
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) A[i * n + j] = gram[i * m + j] * (s[i] * s[j]);
    A[i * n + i] += lam;
    x[i] = s[i];
  }
  bool ok = true;
  for (int col = 0; col < n && ok; ++col) {
    acc_t best;
    const int pivot = find_pivot(A, n, col, &best);
    if (!(best > acc_t(0))) {  // zero or NaN pivot
      ok = false;
      break;
    }
    if (pivot != col) {
      for (int j = 0; j < n; ++j) {
        const acc_t t = A[col * n + j];
        A[col * n + j] = A[pivot * n + j];
        A[pivot * n + j] = t;
      }
      const acc_t t = x[col];
      x[col] = x[pivot];
      x[pivot] = t;
    }
    for (int r = col + 1; r < n; ++r) {
      const acc_t factor = A[r * n + col] / A[col * n + col];
      for (int j = col; j < n; ++j) A[r * n + j] -= factor * A[col * n + j];
      x[r] -= factor * x[col];
    }
  }
  acc_t w_sum = acc_t(0);
  if (ok) {
    w_sum = back_substitute(A, x, s, n);
    ok = w_sum > acc_t(0) && is_finite(w_sum);
  }
  for (int i = 0; i < m; ++i) alpha[i] = acc_t(0);
  if (ok) {
    for (int i = 0; i < n; ++i) {
      alpha[i] = x[i] / w_sum;
      ok = ok && is_finite(alpha[i]);
    }
  }
  if (!ok) {
    for (int i = 0; i < m; ++i) alpha[i] = acc_t(0);
    alpha[slot] = acc_t(1);
  }
  return ok;
}

}  // namespace deqfast
