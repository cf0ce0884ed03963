// CUDA kernels of the fused fixed-point / adjoint step x_next = (1 − τ) x + τ (fx + offset):
// chunk partial sums of the two norms, a per-sample reduce-and-track, the elementwise tail.
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

template <typename scalar_t>
__device__ __forceinline__ scalar_t map_value(const scalar_t* fx, const scalar_t* offset, int64_t k) {
  return offset ? static_cast<scalar_t>(fx[k] + offset[k]) : fx[k];
}

template <typename scalar_t, typename acc_t>
__global__ void fixed_point_partials_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ fx,
                                            const scalar_t* __restrict__ offset, acc_t* __restrict__ partials,
                                            int64_t d, int64_t C) {
  __shared__ acc_t scratch[kThreads / 32];
  const ChunkIndex ci = chunk_of_block(d, C);
  const int64_t base = ci.b * d;
  acc_t r = acc_t(0), n = acc_t(0);
  for (int64_t i = ci.lo + threadIdx.x; i < ci.hi; i += kThreads) {
    const scalar_t h = map_value(fx, offset, base + i);
    const acc_t diff = static_cast<acc_t>(static_cast<scalar_t>(h - x[base + i]));
    r += diff * diff;
    n += static_cast<acc_t>(h) * static_cast<acc_t>(h);
  }
  r = block_sum(r, scratch);
  n = block_sum(n, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 2] = r;
    partials[blockIdx.x * 2 + 1] = n;
  }
}

template <typename acc_t>
__global__ void fixed_point_track_kernel(const acc_t* __restrict__ partials, SampleState<acc_t> state,
                                         uint8_t* __restrict__ flags, int64_t B, int64_t C, acc_t tol, bool rel_mode) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  acc_t r = acc_t(0), n = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    r += partials[(b * C + c) * 2];
    n += partials[(b * C + c) * 2 + 1];
  }
  const TrackOutcome t = track_sample(state, b, r, n, tol, rel_mode);
  flags[2 * b] = t.improved;
  flags[2 * b + 1] = t.done;
}

template <typename scalar_t, typename acc_t>
__global__ void fixed_point_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ fx,
                                         const scalar_t* __restrict__ offset, const uint8_t* __restrict__ flags,
                                         scalar_t* __restrict__ best, scalar_t* __restrict__ next, int64_t d,
                                         int64_t C, acc_t tau) {
  const ChunkIndex ci = chunk_of_block(d, C);
  const bool improved = flags[2 * ci.b], done = flags[2 * ci.b + 1];
  const int64_t base = ci.b * d;
  for (int64_t i = ci.lo + threadIdx.x; i < ci.hi; i += kThreads) {
    if (improved) best[base + i] = x[base + i];
    if (done) {
      next[base + i] = best[base + i];
    } else {
      const scalar_t h = map_value(fx, offset, base + i);
      if (tau == acc_t(1)) {
        next[base + i] = h;
      } else {
        const acc_t xv = static_cast<acc_t>(x[base + i]);
        next[base + i] = static_cast<scalar_t>(xv + tau * (static_cast<acc_t>(h) - xv));
      }
    }
  }
}

at::Tensor fixed_point_step_cuda(const at::Tensor& x, const at::Tensor& fx, const c10::optional<at::Tensor>& offset,
                                 at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
                                 at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, double tau, double tol,
                                 bool rel_mode) {
  const bool has_offset = check_fixed_point_step_args("deqfast::fixed_point_step", x, fx, offset, best_x, best_residual,
                                                      best_rel, nstep, converged, failed);
  const DeviceGuard device_guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), C = num_chunks(d);
  at::Tensor x_next = at::empty_like(x);
  if (B == 0) return x_next;
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor partials = at::empty({B, C > 0 ? C : 1, 2}, x.options().dtype(acc_type));
  at::Tensor flags = at::empty({B, 2}, x.options().dtype(at::kByte));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fixed_point_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* off = has_offset ? offset->const_data_ptr<scalar_t>() : nullptr;
    if (C > 0) {
      launch(fixed_point_partials_kernel<scalar_t, acc_t>, B * C, kThreads, stream, x.const_data_ptr<scalar_t>(),
             fx.const_data_ptr<scalar_t>(), off, partials.mutable_data_ptr<acc_t>(), d, C);
    }
    SampleState<acc_t> state{best_residual.mutable_data_ptr<acc_t>(), best_rel.mutable_data_ptr<acc_t>(),
                             nstep.mutable_data_ptr<int64_t>(), converged.mutable_data_ptr<bool>(),
                             failed.mutable_data_ptr<bool>()};
    const int threads = 128;
    launch(fixed_point_track_kernel<acc_t>, (B + threads - 1) / threads, threads, stream,
           partials.const_data_ptr<acc_t>(), state, flags.mutable_data_ptr<uint8_t>(), B, C, static_cast<acc_t>(tol),
           rel_mode);
    if (C > 0) {
      launch(fixed_point_apply_kernel<scalar_t, acc_t>, B * C, kThreads, stream, x.const_data_ptr<scalar_t>(),
             fx.const_data_ptr<scalar_t>(), off, flags.const_data_ptr<uint8_t>(), best_x.mutable_data_ptr<scalar_t>(),
             x_next.mutable_data_ptr<scalar_t>(), d, C, static_cast<acc_t>(tau));
    }
  });
  return x_next;
}

}  // namespace
}  // namespace cuda

#ifndef DEQFAST_CUDA_EMULATION
TORCH_LIBRARY_IMPL(deqfast, CUDA, m) { m.impl("fixed_point_step", &cuda::fixed_point_step_cuda); }
#endif

}  // namespace deqfast
