// CUDA kernels of Broyden's ring-buffer work (deqfast.solvers.broyden), the same arithmetic as
// csrc/cpu/broyden_cpu.cpp: blocks cover (sample, chunk) pairs; per-chunk sums are block reductions
// (fixed order), written as partials and summed over the chunks in order by the next launch, so a
// sample's result depends on its own elements and d only.
//   broyden_direction (2 launches): coefficients V_i · x, then (Σ U_i c_i) − x.
//   broyden_update (4 launches): U_i · dx and V_i · dg; v = Hᵀ dx, dx − H dg and v · dg; u = (dx − H dg)
//   / (v · dg); the slot write under the keep rule.
//   broyden_fused_step (one iteration after f): the per-sample decisions; the new point, (Δx, Δg), best_x
//   and the restart point; broyden_update's launches; the clearing of restarted samples' histories (with
//   `clear`: every step from solvers.broyden, masked per sample); broyden_direction's launches; x − H gx (best_x where done).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "common.cuh"

namespace deqfast {
namespace cuda {
namespace {

// partials[block, i] = A1_i · y1 over the block's chunk (i < n), then partials[block, n + i] = A2_i · y2
// when A2 is given. Samples with accept[b] false (accept given) are skipped. A: (B, m, d), y: (B, d).
template <typename scalar_t, typename acc_t>
__global__ void broyden_dots_kernel(const scalar_t* __restrict__ A1, const scalar_t* __restrict__ y1,
                                    const scalar_t* __restrict__ A2, const scalar_t* __restrict__ y2,
                                    const bool* __restrict__ accept, acc_t* __restrict__ partials, int64_t d, int m,
                                    int n, int64_t C) {
  __shared__ acc_t scratch[kThreads / 32];
  const ChunkIndex ci = chunk_of_block(d, C);
  if (accept != nullptr && !accept[ci.b]) return;  // uniform over the block, before any barrier
  const int per = A2 != nullptr ? 2 * n : n;
  acc_t* out = partials + int64_t(blockIdx.x) * per;
  for (int pass = 0; pass < (A2 != nullptr ? 2 : 1); ++pass) {
    const scalar_t* A = pass == 0 ? A1 : A2;
    const scalar_t* y = (pass == 0 ? y1 : y2) + ci.b * d;
    for (int i = 0; i < n; ++i) {
      const scalar_t* Ai = A + (ci.b * m + i) * d;
      acc_t s = acc_t(0);
      for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads)
        s += static_cast<acc_t>(Ai[e]) * static_cast<acc_t>(y[e]);
      s = block_sum(s, scratch);
      if (threadIdx.x == 0) out[pass * n + i] = s;
    }
  }
}

// coef[k] (k < count) = the sum over the C chunks, in order, of partials[(b, c), offset + k], rounded
// to scalar_t as the reference's `.to(x.dtype)`. Called by all threads; ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ void load_coefficients(const acc_t* partials, int64_t b, int64_t C, int per, int offset, int count,
                                  acc_t* coef) {
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t c = 0; c < C; ++c) s += partials[(b * C + c) * per + offset + k];
    coef[k] = static_cast<acc_t>(static_cast<scalar_t>(s));
  }
  __syncthreads();
}

// (Σ_{i<n} A_i[e] c_i) − y[e], the sum rounded to scalar_t first (the reference's (U * coef).sum(1) − x).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t combine(const scalar_t* A, const acc_t* c, scalar_t y, int64_t b, int m, int n,
                                            int64_t d, int64_t e) {
  if (n == 0) return -y;
  acc_t s = acc_t(0);
  for (int i = 0; i < n; ++i) s += static_cast<acc_t>(A[(b * m + i) * d + e]) * c[i];
  return static_cast<scalar_t>(static_cast<scalar_t>(s) - y);
}

template <typename scalar_t, typename acc_t>
__global__ void broyden_direction_kernel(const scalar_t* __restrict__ U, const scalar_t* __restrict__ x,
                                         const acc_t* __restrict__ partials, scalar_t* __restrict__ out, int64_t d,
                                         int m, int n, int64_t C) {
  __shared__ acc_t coef[kMaxHistoryCuda];
  const ChunkIndex ci = chunk_of_block(d, C);
  load_coefficients<scalar_t>(partials, ci.b, C, n, 0, n, coef);
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads)
    out[ci.b * d + e] = combine(U, coef, x[ci.b * d + e], ci.b, m, n, d, e);
}

// v = −dx + Σ V_i a_i (a_i = U_i · dx) and num = dx − H dg = dx − (−dg + Σ U_i c_i) (c_i = V_i · dg) into
// vbuf, ubuf; per block: sums[block] = (v · dg, 1 if some v is not finite).
template <typename scalar_t, typename acc_t>
__global__ void broyden_secant_kernel(const scalar_t* __restrict__ dx, const scalar_t* __restrict__ dg,
                                      const scalar_t* __restrict__ U, const scalar_t* __restrict__ V,
                                      const bool* __restrict__ accept, const acc_t* __restrict__ partials,
                                      scalar_t* __restrict__ vbuf, scalar_t* __restrict__ ubuf,
                                      acc_t* __restrict__ sums, int64_t d, int m, int n, int64_t C) {
  __shared__ acc_t coef[2 * kMaxHistoryCuda];
  __shared__ acc_t scratch[kThreads / 32];
  const ChunkIndex ci = chunk_of_block(d, C);
  if (!accept[ci.b]) return;
  load_coefficients<scalar_t>(partials, ci.b, C, 2 * n, 0, 2 * n, coef);
  acc_t dot = acc_t(0), bad = acc_t(0);
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads) {
    const int64_t k = ci.b * d + e;
    const scalar_t v = combine(V, coef, dx[k], ci.b, m, n, d, e);
    const scalar_t hdg = combine(U, coef + n, dg[k], ci.b, m, n, d, e);
    vbuf[k] = v;
    ubuf[k] = static_cast<scalar_t>(dx[k] - hdg);
    dot += static_cast<acc_t>(v) * static_cast<acc_t>(dg[k]);
    if (!is_finite(static_cast<acc_t>(v))) bad = acc_t(1);
  }
  dot = block_sum(dot, scratch);
  bad = block_sum(bad, scratch);
  if (threadIdx.x == 0) {
    sums[2 * int64_t(blockIdx.x)] = dot;
    sums[2 * int64_t(blockIdx.x) + 1] = bad;
  }
}

// Sample b's v · dg over its chunks in order; whether its update is usable (|v · dg| > tiny, v finite).
template <typename acc_t>
__device__ __forceinline__ bool usable_denominator(const acc_t* sums, int64_t b, int64_t C, acc_t* denom) {
  acc_t s = acc_t(0), bad = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    s += sums[2 * (b * C + c)];
    bad += sums[2 * (b * C + c) + 1];
  }
  *denom = s;
  return (s < acc_t(0) ? -s : s) > tiny_value<acc_t>() && bad == acc_t(0);  // NaN compares false
}

// u = num / (v · dg) in place in ubuf; u_bad[block] = 1 if some u of the chunk is not finite.
template <typename scalar_t, typename acc_t>
__global__ void broyden_divide_kernel(const bool* __restrict__ accept, const acc_t* __restrict__ sums,
                                      scalar_t* __restrict__ ubuf, acc_t* __restrict__ u_bad, int64_t d, int64_t C) {
  __shared__ acc_t scratch[kThreads / 32];
  __shared__ acc_t divisor;
  __shared__ int usable;
  const ChunkIndex ci = chunk_of_block(d, C);
  if (!accept[ci.b]) return;
  if (threadIdx.x == 0) {
    acc_t denom;
    usable = usable_denominator(sums, ci.b, C, &denom);
    divisor = denom;
  }
  __syncthreads();
  if (!usable) return;  // uniform: read after the barrier
  acc_t bad = acc_t(0);
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads) {
    const int64_t k = ci.b * d + e;
    const scalar_t u = static_cast<scalar_t>(static_cast<acc_t>(ubuf[k]) / divisor);
    ubuf[k] = u;
    if (!is_finite(static_cast<acc_t>(u))) bad = acc_t(1);
  }
  bad = block_sum(bad, scratch);
  if (threadIdx.x == 0) u_bad[blockIdx.x] = bad;
}

// Slot `slot` of U, V: (u, v) where the update is kept; else unchanged (slot < filled) or zeroed.
template <typename scalar_t, typename acc_t>
__global__ void broyden_write_kernel(const bool* __restrict__ accept, const acc_t* __restrict__ sums,
                                     const acc_t* __restrict__ u_bad, const scalar_t* __restrict__ vbuf,
                                     const scalar_t* __restrict__ ubuf, scalar_t* __restrict__ U,
                                     scalar_t* __restrict__ V, int64_t d, int m, int slot, bool fresh, int64_t C) {
  __shared__ int keep;
  const ChunkIndex ci = chunk_of_block(d, C);
  if (threadIdx.x == 0) {
    bool k = accept[ci.b];
    if (k) {
      acc_t denom;
      k = usable_denominator(sums, ci.b, C, &denom);
    }
    for (int64_t c = 0; c < C && k; ++c) k = u_bad[ci.b * C + c] == acc_t(0);
    keep = k;
  }
  __syncthreads();
  if (!keep && !fresh) return;
  scalar_t* Us = U + (ci.b * m + slot) * d;
  scalar_t* Vs = V + (ci.b * m + slot) * d;
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads) {
    Us[e] = keep ? ubuf[ci.b * d + e] : scalar_t(0);
    Vs[e] = keep ? vbuf[ci.b * d + e] : scalar_t(0);
  }
}

void check_broyden_history(const char* op, int64_t m) {
  TORCH_CHECK(m <= kMaxHistoryCuda, op, ": the CUDA kernels take m <= ", kMaxHistoryCuda, ", got m = ", m);
}

at::Tensor broyden_direction_cuda(const at::Tensor& U, const at::Tensor& V, const at::Tensor& x, int64_t filled) {
  constexpr const char* op = "deqfast::broyden_direction";
  check_broyden_direction_args(op, U, V, x, filled);
  check_broyden_history(op, U.size(1));
  const DeviceGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t B = x.size(0), d = x.size(1), m = U.size(1), n = filled, C = num_chunks(d);
  if (B == 0 || d == 0) return out;
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "broyden_direction_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials = at::empty({B * C * (n > 0 ? n : 1)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    if (n > 0) {
      launch(broyden_dots_kernel<scalar_t, acc_t>, B * C, kThreads, stream, V.const_data_ptr<scalar_t>(),
             x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), static_cast<const scalar_t*>(nullptr),
             static_cast<const bool*>(nullptr), partials.mutable_data_ptr<acc_t>(), d, int(m), int(n), C);
    }
    launch(broyden_direction_kernel<scalar_t, acc_t>, B * C, kThreads, stream, U.const_data_ptr<scalar_t>(),
           x.const_data_ptr<scalar_t>(), partials.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), d, int(m),
           int(n), C);
  });
  return out;
}

void broyden_update_cuda(const at::Tensor& dx, const at::Tensor& dg, at::Tensor& U, at::Tensor& V,
                         const at::Tensor& accept, int64_t filled, int64_t slot) {
  constexpr const char* op = "deqfast::broyden_update";
  check_broyden_update_args(op, dx, dg, U, V, accept, filled, slot);
  check_broyden_history(op, U.size(1));
  const DeviceGuard device_guard(dx.device());
  const int64_t B = dx.size(0), d = dx.size(1), m = U.size(1), n = filled, C = num_chunks(d);
  if (B == 0 || d == 0) return;
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "broyden_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = dx.options().dtype(at::toOpMathType(dx.scalar_type()));
    // One allocation for the per-block sums: dots (B·C·2n), (v · dg, v bad) (B·C·2), u bad (B·C).
    at::Tensor scratch = at::empty({B * C * (2 * n + 3)}, acc_options);
    acc_t* dots = scratch.mutable_data_ptr<acc_t>();
    acc_t* sums = dots + B * C * 2 * n;
    acc_t* u_bad = sums + B * C * 2;
    at::Tensor buffers = at::empty({2, B, d}, dx.options());
    scalar_t* vbuf = buffers.mutable_data_ptr<scalar_t>();
    scalar_t* ubuf = vbuf + B * d;
    const bool* ok = accept.const_data_ptr<bool>();
    scalar_t* Up = U.mutable_data_ptr<scalar_t>();
    scalar_t* Vp = V.mutable_data_ptr<scalar_t>();
    if (n > 0) {
      launch(broyden_dots_kernel<scalar_t, acc_t>, B * C, kThreads, stream, static_cast<const scalar_t*>(Up),
             dx.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(Vp), dg.const_data_ptr<scalar_t>(), ok, dots, d,
             int(m), int(n), C);
    }
    launch(broyden_secant_kernel<scalar_t, acc_t>, B * C, kThreads, stream, dx.const_data_ptr<scalar_t>(),
           dg.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(Up), static_cast<const scalar_t*>(Vp), ok,
           static_cast<const acc_t*>(dots), vbuf, ubuf, sums, d, int(m), int(n), C);
    launch(broyden_divide_kernel<scalar_t, acc_t>, B * C, kThreads, stream, ok, static_cast<const acc_t*>(sums), ubuf,
           u_bad, d, C);
    launch(broyden_write_kernel<scalar_t, acc_t>, B * C, kThreads, stream, ok, static_cast<const acc_t*>(sums),
           static_cast<const acc_t*>(u_bad), static_cast<const scalar_t*>(vbuf), static_cast<const scalar_t*>(ubuf), Up,
           Vp, d, int(m), int(slot), slot >= filled, C);
  });
}

// Per sample (one thread each): broyden_decide, into flags[b] and accept[b].
template <typename acc_t>
__global__ void broyden_decide_kernel(SampleState<acc_t> state, const acc_t* __restrict__ g_sq,
                                      const acc_t* __restrict__ g_norm, const acc_t* __restrict__ f_norm,
                                      acc_t* __restrict__ restart_sq,
                                      bool* __restrict__ pending, bool* __restrict__ accept,
                                      uint8_t* __restrict__ flags, int64_t B, acc_t tol, bool rel_mode) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const BroydenOutcome o = broyden_decide(state, b, g_sq[b], g_norm[b], f_norm[b], restart_sq, pending, tol, rel_mode);
  accept[b] = o.accept;
  flags[b] = o.flags;
}

// Elementwise over (sample, chunk): best_x, the restart point, (Δx, Δg) and the new point (x, gx).
template <typename scalar_t>
__global__ void broyden_advance_kernel(const uint8_t* __restrict__ flags, const scalar_t* __restrict__ x_next,
                                       const scalar_t* __restrict__ gx_next, scalar_t* __restrict__ x,
                                       scalar_t* __restrict__ gx, scalar_t* __restrict__ restart_x,
                                       scalar_t* __restrict__ restart_g, scalar_t* __restrict__ best_x,
                                       scalar_t* __restrict__ dx, scalar_t* __restrict__ dg, int64_t d, int64_t C) {
  const ChunkIndex ci = chunk_of_block(d, C);
  const uint8_t fl = flags[ci.b];
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads)
    broyden_advance_element(fl, ci.b * d + e, x_next, gx_next, x, gx, restart_x, restart_g, best_x, dx, dg);
}

// Slots [0, n) of a pending sample's U, V multiplied by 0 (the reference's `*= keep`), over (sample, chunk).
template <typename scalar_t>
__global__ void broyden_clear_kernel(const bool* __restrict__ pending, scalar_t* __restrict__ U,
                                     scalar_t* __restrict__ V, int64_t d, int m, int n, int64_t C) {
  const ChunkIndex ci = chunk_of_block(d, C);
  if (!pending[ci.b]) return;
  for (int i = 0; i < n; ++i) {
    scalar_t* Ui = U + (ci.b * m + i) * d;
    scalar_t* Vi = V + (ci.b * m + i) * d;
    for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads) {
      Ui[e] = static_cast<scalar_t>(Ui[e] * scalar_t(0));
      Vi[e] = static_cast<scalar_t>(Vi[e] * scalar_t(0));
    }
  }
}

// The next iterate in place of h = H gx: x − h, or best_x where done; with `clear`, pending reset (after
// broyden_clear_kernel read it: an earlier launch).
template <typename scalar_t>
__global__ void broyden_next_kernel(const uint8_t* __restrict__ flags, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ best_x, scalar_t* __restrict__ h,
                                    bool* __restrict__ pending, bool clear, int64_t d, int64_t C) {
  const ChunkIndex ci = chunk_of_block(d, C);
  const bool done = (flags[ci.b] & kBroydenDone) != 0;
  for (int64_t e = ci.lo + threadIdx.x; e < ci.hi; e += kThreads) {
    const int64_t k = ci.b * d + e;
    h[k] = done ? best_x[k] : static_cast<scalar_t>(x[k] - h[k]);
  }
  if (clear && ci.lo == 0 && threadIdx.x == 0) pending[ci.b] = false;
}

// pending reset for a state of no element (no (sample, chunk) blocks to do it).
__global__ void broyden_reset_pending_kernel(bool* __restrict__ pending, int64_t B) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b < B) pending[b] = false;
}

at::Tensor broyden_fused_step_cuda(const at::Tensor& x_next, const at::Tensor& fx_next, at::Tensor& x, at::Tensor& gx, at::Tensor& U,
                                   at::Tensor& V, at::Tensor& restart_x, at::Tensor& restart_g,
                                   at::Tensor& restart_sq, at::Tensor& pending, at::Tensor& best_x,
                                   at::Tensor& best_residual, at::Tensor& best_rel, at::Tensor& nstep,
                                   at::Tensor& converged, at::Tensor& failed, int64_t filled, int64_t slot, bool clear,
                                   double tol, bool rel_mode) {
  constexpr const char* op = "deqfast::broyden_fused_step";
  check_broyden_fused_step_args(op, x_next, fx_next, x, gx, U, V, restart_x, restart_g, restart_sq,
                                pending, best_x, best_residual, best_rel, nstep, converged, failed, filled, slot);
  check_broyden_history(op, U.size(1));
  const DeviceGuard device_guard(x_next.device());
  const int64_t B = x_next.size(0), d = x_next.size(1), m = U.size(1), C = num_chunks(d);
  const int64_t filled_next = std::min(filled + 1, m);
  if (B == 0) return at::empty_like(x_next);
  const BroydenResidual r = broyden_residual(x_next, fx_next);  // g, ‖g‖², ‖g‖, ‖f‖
  at::Tensor accept = at::empty({B}, x_next.options().dtype(at::kBool));
  at::Tensor flags = at::empty({B}, x_next.options().dtype(at::kByte));
  at::Tensor steps = at::empty({2, B, d}, x_next.options());  // Δx, Δg
  const Stream stream = current_stream();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_next.scalar_type(), "broyden_fused_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    const int threads = 128;
    launch(broyden_decide_kernel<acc_t>, (B + threads - 1) / threads, threads, stream, state,
           r.g_sq.const_data_ptr<acc_t>(), r.g_norm.const_data_ptr<acc_t>(), r.f_norm.const_data_ptr<acc_t>(),
           restart_sq.mutable_data_ptr<acc_t>(),
           pending.mutable_data_ptr<bool>(), accept.mutable_data_ptr<bool>(), flags.mutable_data_ptr<uint8_t>(), B,
           static_cast<acc_t>(tol), rel_mode);
    if (C > 0) {
      scalar_t* dxp = steps.mutable_data_ptr<scalar_t>();
      launch(broyden_advance_kernel<scalar_t>, B * C, kThreads, stream, flags.const_data_ptr<uint8_t>(),
             x_next.const_data_ptr<scalar_t>(), r.g.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(),
             gx.mutable_data_ptr<scalar_t>(), restart_x.mutable_data_ptr<scalar_t>(),
             restart_g.mutable_data_ptr<scalar_t>(), best_x.mutable_data_ptr<scalar_t>(), dxp, dxp + B * d, d, C);
    }
    broyden_update_cuda(steps[0], steps[1], U, V, accept, filled, slot);
    if (clear && C > 0) {
      launch(broyden_clear_kernel<scalar_t>, B * C, kThreads, stream, static_cast<const bool*>(pending.data_ptr<bool>()),
             U.mutable_data_ptr<scalar_t>(), V.mutable_data_ptr<scalar_t>(), d, int(m), int(filled_next), C);
    }
    out = broyden_direction_cuda(U, V, gx, filled_next);
    if (C > 0) {
      launch(broyden_next_kernel<scalar_t>, B * C, kThreads, stream, flags.const_data_ptr<uint8_t>(),
             x.const_data_ptr<scalar_t>(), best_x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
             pending.mutable_data_ptr<bool>(), clear, d, C);
    } else if (clear) {
      launch(broyden_reset_pending_kernel, (B + threads - 1) / threads, threads, stream,
             pending.mutable_data_ptr<bool>(), B);
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda

#ifndef DEQFAST_CUDA_EMULATION
TORCH_LIBRARY_IMPL(deqfast, CUDA, m) {
  m.impl("broyden_direction", &cuda::broyden_direction_cuda);
  m.impl("broyden_update", &cuda::broyden_update_cuda);
  m.impl("broyden_fused_step", &cuda::broyden_fused_step_cuda);
}
#endif

}  // namespace deqfast
