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
#include <cstring>
#include <type_traits>
#include <vector>

#include "../deqfast_numerics.h"
#include "../ops.h"
#include "common.h"

namespace deqfast {
namespace cpu {
namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DEQ_ALWAYS_INLINE inline __attribute__((always_inline))
#define DEQ_HAVE_AVX2_CLONE 1
#define DEQ_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define DEQ_ALWAYS_INLINE inline
#define DEQ_HAVE_AVX2_CLONE 0
#endif

// The same sums as dot_ordered (common.h) for J pairs a_j · b_j, in one pass:
// each of the J dots keeps its kLanes partial sums, each lane summing the same products in the
// same order as dot_ordered, combined in the same order at the end, so every dot has dot_ordered's
// bits. J·kLanes independent accumulators instead of kLanes: throughput- rather than
// latency-bound.
// With `w` (x, fx, F_slot, G_slot of the chunk) the slot is written first, as write_slot does
// (in the vector path block by block in the same pass: a block's G_slot is stored before any sum
// reads it).
template <typename scalar_t>
struct SlotWrite {
  const scalar_t* x;
  const scalar_t* fx;
  scalar_t* F;
  scalar_t* G;
};

// The scalar part of dots_pairs from element i on (the lanes of elements before i given).
template <int J, typename acc_t, typename scalar_t>
DEQ_ALWAYS_INLINE void dots_pairs_from(const scalar_t* const* a, const scalar_t* const* bs, int64_t i, int64_t n,
                                       acc_t (&lanes)[J][kLanes]) {
  const scalar_t* __restrict aj[J];
  const scalar_t* __restrict bj[J];
  for (int j = 0; j < J; ++j) {
    aj[j] = a[j];
    bj[j] = bs[j];
  }
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < J; ++j)
      for (int l = 0; l < kLanes; ++l) lanes[j][l] += static_cast<acc_t>(aj[j][i + l]) * static_cast<acc_t>(bj[j][i + l]);
  }
  // The tail: element i + l into lane l, as dot_ordered's.
  const int64_t rest = n - i;
  for (int l = 0; l < kLanes; ++l)
    if (l < rest)
      for (int j = 0; j < J; ++j) lanes[j][l] += static_cast<acc_t>(aj[j][i + l]) * static_cast<acc_t>(bj[j][i + l]);
}

template <int J, typename acc_t, typename scalar_t>
DEQ_ALWAYS_INLINE void dots_pairs(const scalar_t* const* a, const scalar_t* const* bs, int64_t n, acc_t* out,
                                  const SlotWrite<scalar_t>* w = nullptr) {
  acc_t lanes[J][kLanes] = {};
  int64_t i = 0;
#if DEQ_HAVE_AVX2_CLONE
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // The kLanes partial sums of each dot as one GCC vector (elementwise IEEE adds and multiplies:
    // the same bits), so that they stay in registers (as arrays indexed in loops they were kept in
    // memory, each add a store-to-load round trip). No restrict: G_slot, written here, may be one
    // of the a_j, b_j.
    typedef acc_t vec __attribute__((vector_size(sizeof(acc_t) * kLanes)));
    vec acc[J];
    for (int j = 0; j < J; ++j) acc[j] = vec{};
    for (; i + kLanes <= n; i += kLanes) {
      if (w != nullptr) {
        vec xv, fv;
        std::memcpy(&xv, w->x + i, sizeof(vec));
        std::memcpy(&fv, w->fx + i, sizeof(vec));
        const vec gv = fv - xv;
        std::memcpy(w->F + i, &fv, sizeof(vec));
        std::memcpy(w->G + i, &gv, sizeof(vec));
      }
      for (int j = 0; j < J; ++j) {
        vec av, bv;
        std::memcpy(&av, a[j] + i, sizeof(vec));
        std::memcpy(&bv, bs[j] + i, sizeof(vec));
        acc[j] += av * bv;
      }
    }
    for (int j = 0; j < J; ++j) std::memcpy(lanes[j], &acc[j], sizeof(vec));
  }
#endif
  if (w != nullptr) write_slot(w->x + i, w->fx + i, w->F + i, w->G + i, n - i);  // what is left of it
  dots_pairs_from<J>(a, bs, i, n, lanes);
  for (int j = 0; j < J; ++j) {
    acc_t total = acc_t(0);
    for (int l = 0; l < kLanes; ++l) total += lanes[j][l];
    out[j] = total;
  }
}

// Pass A of one task (sample b, elements [lo, lo + n)): the slot's F, G written, then the m + 1
// sums G_j·G_slot (j < m) and fx·fx into row, each with dot_ordered's bits.
template <typename acc_t, typename scalar_t>
DEQ_ALWAYS_INLINE void history_task_impl(const scalar_t* xb, const scalar_t* fb, scalar_t* Fb, scalar_t* Gb, int64_t d,
                                         int64_t m, int64_t slot, int64_t lo, int64_t n, acc_t* row) {
  scalar_t* Gs = Gb + slot * d + lo;
  const SlotWrite<scalar_t> w{xb + lo, fb + lo, Fb + slot * d + lo, Gs};
  const SlotWrite<scalar_t>* first = &w;  // the slot written in the first pass
  // Groups of 4 sums G_j·G_slot, the last group (1 to 4 sums) with fx·fx.
  const scalar_t* a[4];
  const scalar_t* b[4];
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    for (int t = 0; t < 4; ++t) {
      a[t] = Gb + (j + t) * d + lo;
      b[t] = Gs;
    }
    dots_pairs<4>(a, b, n, row + j, first);
    first = nullptr;
  }
  const int left = int(m - j);  // 0 to 3; fx·fx goes to row[m] = row[j + left]
  for (int t = 0; t < left; ++t) {
    a[t] = Gb + (j + t) * d + lo;
    b[t] = Gs;
  }
  a[left] = b[left] = fb + lo;
  if (left == 0) dots_pairs<1>(a, b, n, row + j, first);
  if (left == 1) dots_pairs<2>(a, b, n, row + j, first);
  if (left == 2) dots_pairs<3>(a, b, n, row + j, first);
  if (left == 3) dots_pairs<4>(a, b, n, row + j, first);
}

// The step over [lo, lo + n) of sample b: out = Σ_j α_j F_j − (1 − τ) Σ_j α_j G_j, each element's
// terms added in the order of j from 0 (the F terms, then the G terms), as the former slot-by-slot
// passes over a buffer did; here kLanes elements at a time in registers, one pass.
template <typename acc_t, typename scalar_t>
DEQ_ALWAYS_INLINE void mix_task_impl(const scalar_t* Fb, const scalar_t* Gb, int64_t d, int64_t m, const acc_t* a,
                                     acc_t damping, int64_t lo, int64_t n, scalar_t* __restrict out) {
  constexpr int kBlock = 2 * kLanes;
  const bool damp = damping != acc_t(0);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    acc_t v[kBlock] = {};
    for (int64_t j = 0; j < m; ++j) {
      const scalar_t* __restrict Fj = Fb + j * d + lo + i;
      const acc_t aj = a[j];
      for (int l = 0; l < kBlock; ++l) v[l] += aj * static_cast<acc_t>(Fj[l]);
    }
    if (damp) {
      for (int64_t j = 0; j < m; ++j) {
        const scalar_t* __restrict Gj = Gb + j * d + lo + i;
        const acc_t aj = damping * a[j];
        for (int l = 0; l < kBlock; ++l) v[l] -= aj * static_cast<acc_t>(Gj[l]);
      }
    }
    for (int l = 0; l < kBlock; ++l) out[lo + i + l] = static_cast<scalar_t>(v[l]);
  }
  for (; i < n; ++i) {
    acc_t v = acc_t(0);
    for (int64_t j = 0; j < m; ++j) v += a[j] * static_cast<acc_t>(Fb[j * d + lo + i]);
    if (damp)
      for (int64_t j = 0; j < m; ++j) v -= (damping * a[j]) * static_cast<acc_t>(Gb[j * d + lo + i]);
    out[lo + i] = static_cast<scalar_t>(v);
  }
}

template <typename acc_t, typename scalar_t>
void history_task_default(const scalar_t* xb, const scalar_t* fb, scalar_t* Fb, scalar_t* Gb, int64_t d, int64_t m,
                          int64_t slot, int64_t lo, int64_t n, acc_t* row) {
  history_task_impl(xb, fb, Fb, Gb, d, m, slot, lo, n, row);
}

template <typename acc_t, typename scalar_t>
void mix_task_default(const scalar_t* Fb, const scalar_t* Gb, int64_t d, int64_t m, const acc_t* a, acc_t damping,
                      int64_t lo, int64_t n, scalar_t* out) {
  mix_task_impl(Fb, Gb, d, m, a, damping, lo, n, out);
}

#if DEQ_HAVE_AVX2_CLONE
// The same code compiled for AVX2 (without FMA: no contraction, the same roundings, the same bits),
// chosen at run time: the kLanes = 8 float partial sums of a dot fill one register.
template <typename acc_t, typename scalar_t>
DEQ_TARGET_AVX2 void history_task_avx2(const scalar_t* xb, const scalar_t* fb, scalar_t* Fb, scalar_t* Gb, int64_t d,
                                       int64_t m, int64_t slot, int64_t lo, int64_t n, acc_t* row) {
  history_task_impl(xb, fb, Fb, Gb, d, m, slot, lo, n, row);
}

template <typename acc_t, typename scalar_t>
DEQ_TARGET_AVX2 void mix_task_avx2(const scalar_t* Fb, const scalar_t* Gb, int64_t d, int64_t m, const acc_t* a,
                                   acc_t damping, int64_t lo, int64_t n, scalar_t* out) {
  mix_task_impl(Fb, Gb, d, m, a, damping, lo, n, out);
}

inline bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <typename acc_t, typename scalar_t>
inline void history_task(const scalar_t* xb, const scalar_t* fb, scalar_t* Fb, scalar_t* Gb, int64_t d, int64_t m,
                         int64_t slot, int64_t lo, int64_t n, acc_t* row) {
#if DEQ_HAVE_AVX2_CLONE
  if (use_avx2()) return history_task_avx2(xb, fb, Fb, Gb, d, m, slot, lo, n, row);
#endif
  history_task_default(xb, fb, Fb, Gb, d, m, slot, lo, n, row);
}

template <typename acc_t, typename scalar_t>
inline void mix_task(const scalar_t* Fb, const scalar_t* Gb, int64_t d, int64_t m, const acc_t* a, acc_t damping,
                     int64_t lo, int64_t n, scalar_t* out) {
#if DEQ_HAVE_AVX2_CLONE
  if (use_avx2()) return mix_task_avx2(Fb, Gb, d, m, a, damping, lo, n, out);
#endif
  mix_task_default(Fb, Gb, d, m, a, damping, lo, n, out);
}


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
        history_task<acc_t>(xp + b * d, fp + b * d, Fp + b * m * d, Gp + b * m * d, d, m, slot, lo, hi - lo,
                            out + (b * C + c) * (m + 1));
      }
    });
  });
}

// Per-thread scratch of the per-sample weight solve: on the stack for a small problem (the common
// case at small sizes: no heap allocation per step).
template <typename acc_t>
struct SolveScratch {
  static constexpr int64_t kStack = 16;
  acc_t row_stack[kStack + 1], work_stack[kStack * kStack + 2 * kStack];
  std::vector<acc_t> row_heap, work_heap;
  acc_t* row = row_stack;
  acc_t* work = work_stack;
  SolveScratch(int64_t m, int64_t n_filled) {
    if (m > kStack) {
      row_heap.resize(m + 1);
      work_heap.resize(n_filled * n_filled + 2 * n_filled);
      row = row_heap.data();
      work = work_heap.data();
    }
  }
};

// Pass B into `x_next`; alpha (B·m accumulation values, or null: allocated here) and flags (2B bytes:
// improved, then done) are scratch. Arguments checked by the caller.
// With `fx` (the fused step, d <= kChunk: one chunk per sample), pass A runs here too, sample by
// sample in the same parallel region as the rest of its step (one region per step instead of three,
// and a sample's history still in cache when it is mixed); else `partials` holds pass A's sums.
void step_into(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
               const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
               at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, int64_t n_filled, int64_t slot, double lam,
               double tau, double tol, bool rel_mode, at::Tensor& x_next, void* alpha_buffer, uint8_t* flags,
               const at::Tensor* fx = nullptr) {
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1);
  if (B == 0) return;
  uint8_t* improved = flags;
  uint8_t* done = flags + B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> alpha_local(alpha_buffer ? 0 : B * m);
    acc_t* alpha = alpha_buffer ? static_cast<acc_t*>(alpha_buffer) : alpha_local.data();
    const int64_t P = partials.size(1);  // chunks of the partial sums (any split: they are summed in order)
    acc_t* gp = gram.mutable_data_ptr<acc_t>();
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    // Sample b: m + 1 sums of P partials and an (n × n) solve, a few hundred flops.
    const int64_t solve_grain = std::max<int64_t>(1, kMinElementsPerThread / ((m + 1) * (P + m * m)));
    auto solve = [&](int64_t b, const acc_t* part, acc_t* row, acc_t* work) {
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
    };
    const scalar_t* Fp = F.const_data_ptr<scalar_t>();
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const acc_t damping = static_cast<acc_t>(1.0 - tau);
    // Σ_j α_j F_j − (1 − τ) Σ_j α_j G_j over [lo, hi) of sample b
    auto mix = [&](int64_t b, int64_t lo, int64_t hi, scalar_t* out) {
      mix_task(Fp + b * m * d, Gp + b * m * d, d, m, alpha + b * m, damping, lo, hi - lo, out);
    };
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* best = best_x.mutable_data_ptr<scalar_t>();
    scalar_t* next = x_next.mutable_data_ptr<scalar_t>();
    if (fx != nullptr) {
      const scalar_t* fp = fx->const_data_ptr<scalar_t>();
      scalar_t* Fw = F.mutable_data_ptr<scalar_t>();
      scalar_t* Gw = G.mutable_data_ptr<scalar_t>();
      acc_t* part = partials.mutable_data_ptr<acc_t>();
      // The grain of either pass alone (the smaller: many samples of a few elements still split
      // for their solves).
      const int64_t grain = std::min(chunk_grain(d), solve_grain);
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        SolveScratch<acc_t> scratch(m, n_filled);
        for (int64_t b = begin; b < end; ++b) {
          history_task<acc_t>(xp + b * d, fp + b * d, Fw + b * m * d, Gw + b * m * d, d, m, slot, 0, d,
                              part + b * (m + 1));
          solve(b, part, scratch.row, scratch.work);
          scalar_t* bb = best + b * d;
          if (improved[b]) std::copy(xp + b * d, xp + (b + 1) * d, bb);
          if (done[b]) {
            std::copy(bb, bb + d, next + b * d);
          } else {
            mix(b, 0, d, next + b * d);
          }
        }
      });
      return;
    }
    const acc_t* part = partials.const_data_ptr<acc_t>();
    at::parallel_for(0, B, solve_grain, [&](int64_t begin, int64_t end) {
      SolveScratch<acc_t> scratch(m, n_filled);
      for (int64_t b = begin; b < end; ++b) solve(b, part, scratch.row, scratch.work);
    });
    apply_chunks<scalar_t>(B, d, xp, best, next, improved, done, mix);
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
  // One chunk per sample: both passes in one parallel region (the same sums, the same bits).
  const bool one_region = num_chunks(x.size(1)) == 1;
  if (!one_region) history_into(x, fx, F, G, slot, partials);
  step_into(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed, n_filled, slot, lam, tau,
            tol, rel_mode, x_next, alpha.data_ptr(), flags.mutable_data_ptr<uint8_t>(), one_region ? &fx : nullptr);
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
