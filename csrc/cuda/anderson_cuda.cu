// CUDA kernels of the fused Anderson step: pass A (history write + Gram-row partial sums), then
// pass B as two launches (per-sample reduce/track/solve, elementwise mix and freeze).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#ifndef DEQFAST_CUDA_EMULATION
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#include "../ops.h"
#include "common.cuh"

namespace deqfast {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void anderson_history_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ fx,
                                        scalar_t* __restrict__ F, scalar_t* __restrict__ G,
                                        acc_t* __restrict__ partials, int64_t d, int m, int slot, int64_t C) {
  __shared__ acc_t scratch[kThreads / 32];
  const ChunkIndex ci = chunk_of_block(d, C);
  const int64_t base = ci.b * d;
  scalar_t g_local[kPerThread];
  acc_t f_norm_sq = acc_t(0);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = ci.lo + threadIdx.x + int64_t(k) * kThreads;
    g_local[k] = scalar_t(0);
    if (i < ci.hi) {
      const scalar_t fv = fx[base + i];
      const scalar_t gv = static_cast<scalar_t>(fv - x[base + i]);
      F[(ci.b * m + slot) * d + i] = fv;
      G[(ci.b * m + slot) * d + i] = gv;
      g_local[k] = gv;
      f_norm_sq += static_cast<acc_t>(fv) * static_cast<acc_t>(fv);
    }
  }
  acc_t* out = partials + blockIdx.x * int64_t(m + 1);
  for (int j = 0; j < m; ++j) {
    const scalar_t* Gj = G + (ci.b * m + j) * d;
    acc_t dot = acc_t(0);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = ci.lo + threadIdx.x + int64_t(k) * kThreads;
      if (i < ci.hi) {
        const scalar_t gj = j == slot ? g_local[k] : Gj[i];
        dot += static_cast<acc_t>(gj) * static_cast<acc_t>(g_local[k]);
      }
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) out[j] = dot;
  }
  f_norm_sq = block_sum(f_norm_sq, scratch);
  if (threadIdx.x == 0) out[m] = f_norm_sq;
}

// One warp per sample: sum the chunks' partials in order, complete the Gram row, track, solve.
template <typename acc_t>
__global__ void anderson_track_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ gram,
                                      SampleState<acc_t> state, acc_t* __restrict__ alpha, uint8_t* __restrict__ flags,
                                      int m, int64_t C, int n_filled, int slot, acc_t lam, acc_t tol, bool rel_mode) {
  __shared__ acc_t row[kMaxHistoryCuda + 1];
  __shared__ acc_t work[kMaxHistoryCuda * kMaxHistoryCuda + 2 * kMaxHistoryCuda];
  const int64_t b = blockIdx.x;
  for (int v = threadIdx.x; v <= m; v += blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t c = 0; c < C; ++c) s += partials[(b * C + c) * (m + 1) + v];
    row[v] = s;
  }
  __syncthreads();
  acc_t* gb = gram + b * m * m;
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    gb[slot * m + j] = row[j];
    gb[j * m + slot] = row[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const TrackOutcome t = track_sample(state, b, row[slot], row[m], tol, rel_mode);
    flags[2 * b] = t.improved;
    flags[2 * b + 1] = t.done;
    if (!t.done) anderson_weights(gb, m, n_filled, slot, lam, alpha + b * m, work);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void anderson_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ F,
                                      const scalar_t* __restrict__ G, const acc_t* __restrict__ alpha,
                                      const uint8_t* __restrict__ flags, scalar_t* __restrict__ best,
                                      scalar_t* __restrict__ next, int64_t d, int m, int64_t C, acc_t damping) {
  __shared__ acc_t a[kMaxHistoryCuda];
  const ChunkIndex ci = chunk_of_block(d, C);
  const bool improved = flags[2 * ci.b], done = flags[2 * ci.b + 1];
  if (!done && threadIdx.x < m) a[threadIdx.x] = alpha[ci.b * m + threadIdx.x];
  __syncthreads();
  const int64_t base = ci.b * d;
  for (int64_t i = ci.lo + threadIdx.x; i < ci.hi; i += kThreads) {
    if (improved) best[base + i] = x[base + i];
    if (done) {
      next[base + i] = best[base + i];
      continue;
    }
    acc_t v = acc_t(0), w = acc_t(0);
    for (int j = 0; j < m; ++j) v += a[j] * static_cast<acc_t>(F[(ci.b * m + j) * d + i]);
    if (damping != acc_t(0)) {
      for (int j = 0; j < m; ++j) w += a[j] * static_cast<acc_t>(G[(ci.b * m + j) * d + i]);
      v -= damping * w;
    }
    next[base + i] = static_cast<scalar_t>(v);
  }
}

at::Tensor anderson_history_cuda(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G,
                                 int64_t slot) {
  constexpr const char* op = "deqfast::anderson_history";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, d) tensor, got sizes ", x.sizes());
  check_same(op, "fx", fx, x);
  check_history_args(op, x, F, G, slot);
  TORCH_CHECK(F.size(1) <= kMaxHistoryCuda, op, ": the CUDA kernels take m <= ", kMaxHistoryCuda, ", got m = ",
              F.size(1));
  const DeviceGuard device_guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  at::Tensor partials = at::empty({B, C, m + 1}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (B == 0 || d == 0) return partials.zero_();
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_history_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(anderson_history_kernel<scalar_t, acc_t>, B * C, kThreads, stream, x.const_data_ptr<scalar_t>(),
           fx.const_data_ptr<scalar_t>(), F.mutable_data_ptr<scalar_t>(), G.mutable_data_ptr<scalar_t>(),
           partials.mutable_data_ptr<acc_t>(), d, int(m), int(slot), C);
  });
  return partials;
}

at::Tensor anderson_step_cuda(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
                              const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual,
                              at::Tensor& best_rel, at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed,
                              int64_t n_filled, int64_t slot, double lam, double tau, double tol, bool rel_mode) {
  constexpr const char* op = "deqfast::anderson_step";
  check_anderson_step_args(op, x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed,
                           n_filled, slot);
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  TORCH_CHECK(m <= kMaxHistoryCuda, op, ": the CUDA kernels take m <= ", kMaxHistoryCuda, ", got m = ", m);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const DeviceGuard device_guard(x.device());
  at::Tensor x_next = at::empty_like(x);
  if (B == 0) return x_next;
  at::Tensor alpha = at::empty({B, m}, x.options().dtype(acc_type));
  at::Tensor flags = at::empty({B, 2}, x.options().dtype(at::kByte));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    launch(anderson_track_kernel<acc_t>, B, 32, stream, partials.const_data_ptr<acc_t>(),
           gram.mutable_data_ptr<acc_t>(), state, alpha.mutable_data_ptr<acc_t>(), flags.mutable_data_ptr<uint8_t>(),
           int(m), partials.size(1), int(n_filled), int(slot), static_cast<acc_t>(lam), static_cast<acc_t>(tol),
           rel_mode);
    if (d == 0) return;
    launch(anderson_apply_kernel<scalar_t, acc_t>, B * C, kThreads, stream, x.const_data_ptr<scalar_t>(),
           F.const_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(),
           flags.const_data_ptr<uint8_t>(), best_x.mutable_data_ptr<scalar_t>(), x_next.mutable_data_ptr<scalar_t>(),
           d, int(m), C, static_cast<acc_t>(1.0 - tau));
  });
  return x_next;
}

}  // namespace
}  // namespace cuda

#ifndef DEQFAST_CUDA_EMULATION
std::string cuda_build_info() {
  std::string info = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#ifdef __CUDA_ARCH_LIST__
#define DEQFAST_STR2(x) #x
#define DEQFAST_STR(x) DEQFAST_STR2(x)
  info += ", archs " DEQFAST_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

TORCH_LIBRARY_IMPL(deqfast, CUDA, m) {
  m.impl("anderson_history", &cuda::anderson_history_cuda);
  m.impl("anderson_step", &cuda::anderson_step_cuda);
}
#endif

}  // namespace deqfast
