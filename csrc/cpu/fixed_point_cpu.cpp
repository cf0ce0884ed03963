// CPU implementation of the fused fixed-point / adjoint step x_next = (1 − τ) x + τ (fx + offset),
// parallel over (sample, chunk) with at::parallel_for, fixed-order reductions.
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

at::Tensor fixed_point_step_cpu(const at::Tensor& x, const at::Tensor& fx, const c10::optional<at::Tensor>& offset,
                                at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
                                at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, double tau, double tol,
                                bool rel_mode) {
  const bool has_offset = check_fixed_point_step_args("deqfast::fixed_point_step", x, fx, offset, best_x, best_residual,
                                                      best_rel, nstep, converged, failed);
  const int64_t B = x.size(0), d = x.size(1), C = num_chunks(d);
  at::Tensor x_next = at::empty_like(x);
  if (B == 0) return x_next;
  std::vector<uint8_t> improved(B), done(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fixed_point_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    const scalar_t* op_ = has_offset ? offset->const_data_ptr<scalar_t>() : nullptr;
    auto h = [&](int64_t k) { return op_ ? static_cast<scalar_t>(fp[k] + op_[k]) : fp[k]; };
    std::vector<acc_t> part(B * C * 2);
    at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, c = task % C;
        const int64_t lo = c * kChunk, hi = std::min(d, lo + kChunk);
        const int64_t at = b * d + lo;
        if (op_) {
          step_norms<acc_t>(xp + at, fp + at, op_ + at, hi - lo, &part[task * 2], &part[task * 2 + 1]);
        } else {
          step_norms<acc_t, scalar_t>(xp + at, fp + at, nullptr, hi - lo, &part[task * 2], &part[task * 2 + 1]);
        }
      }
    });
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    for (int64_t b = 0; b < B; ++b) {
      acc_t r = acc_t(0), n = acc_t(0);
      for (int64_t c = 0; c < C; ++c) {
        r += part[(b * C + c) * 2];
        n += part[(b * C + c) * 2 + 1];
      }
      const TrackOutcome t = track_sample(state, b, r, n, static_cast<acc_t>(tol), rel_mode);
      improved[b] = t.improved;
      done[b] = t.done;
    }
    const acc_t weight = static_cast<acc_t>(tau);
    apply_chunks<scalar_t>(B, d, xp, best_x.mutable_data_ptr<scalar_t>(), x_next.mutable_data_ptr<scalar_t>(),
                           improved.data(), done.data(), [&](int64_t b, int64_t lo, int64_t hi, scalar_t* out) {
                             for (int64_t i = lo; i < hi; ++i) {
                               const scalar_t hv = h(b * d + i);
                               if (weight == acc_t(1)) {
                                 out[i] = hv;
                               } else {
                                 const acc_t xv = static_cast<acc_t>(xp[b * d + i]);
                                 out[i] = static_cast<scalar_t>(xv + weight * (static_cast<acc_t>(hv) - xv));
                               }
                             }
                           });
  });
  return x_next;
}
}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(deqfast, CPU, m) { m.impl("fixed_point_step", &cpu::fixed_point_step_cpu); }

}  // namespace deqfast
