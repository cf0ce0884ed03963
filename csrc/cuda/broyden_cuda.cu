// CUDA kernels of Broyden's ring-buffer work (deqfast.solvers.broyden), the same arithmetic as
// csrc/cpu/broyden_cpu.cpp: blocks cover (sample, chunk) pairs; per-chunk sums are block reductions
// (fixed order), written as partials and summed over the chunks in order by the next launch, so a
// sample's result depends on its own elements and d only.
//   broyden_direction (2 launches): coefficients V_i · x, then (Σ U_i c_i) − x.
//   broyden_update (4 launches): U_i · dx and V_i · dg; v = Hᵀ dx, dx − H dg and v · dg; u = (dx − H dg)
//   / (v · dg); the slot write under the keep rule.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

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

}  // namespace
}  // namespace cuda

#ifndef DEQFAST_CUDA_EMULATION
TORCH_LIBRARY_IMPL(deqfast, CUDA, m) {
  m.impl("broyden_direction", &cuda::broyden_direction_cuda);
  m.impl("broyden_update", &cuda::broyden_update_cuda);
}
#endif

}  // namespace deqfast
