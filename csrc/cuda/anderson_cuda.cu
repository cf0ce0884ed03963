// CUDA kernels of the fused Anderson step: pass A (history write + Gram-row partial sums), then
// pass B as two launches (per-sample reduce/track/solve, elementwise mix and freeze); anderson_fused_step
// runs both passes from one call on preallocated scratch buffers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <vector>
#ifndef DEQFAST_CUDA_EMULATION
#include <cuda_runtime_api.h>  // CUDART_VERSION

#include <map>
#include <mutex>
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

// deqfast::anderson_weights (csrc/deqfast_numerics.h) spread over the 32 lanes of a one-warp block,
// on the n × n Gram block `gs` in shared memory: lane r eliminates row r, lanes swap a pivot row
// element each; the pivot search, back substitution and normalisation stay on lane 0 (O(n²) on
// shared memory). Every element sees the serial version's operations in the serial order, so the
// weights are the same bits. `A` holds n·n values, `sv`, `xv` n each; `ok` is block-shared.
// Called by all threads of the block (it has barriers).
template <typename acc_t>
__device__ void anderson_weights_warp(const acc_t* gs, int m, int n, int slot, acc_t lam, acc_t* alpha, acc_t* A,
                                      acc_t* sv, acc_t* xv, int* ok) {
  const int lane = threadIdx.x;
  for (int i = lane; i < n; i += blockDim.x) {
    const acc_t diag = gs[i * n + i];
    sv[i] = acc_t(1) / sqrt_value(diag > tiny_value<acc_t>() ? diag : tiny_value<acc_t>());
  }
  if (lane == 0) *ok = 1;
  __syncthreads();
  for (int e = lane; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e % n;
    acc_t v = gs[e] * (sv[i] * sv[j]);
    if (i == j) v += lam;
    A[e] = v;
  }
  for (int i = lane; i < n; i += blockDim.x) xv[i] = sv[i];
  __syncthreads();
  for (int col = 0; col < n; ++col) {
    __shared__ int pivot_row;
    if (lane == 0) {
      acc_t best;
      const int pivot = find_pivot(A, n, col, &best);
      if (!(best > acc_t(0))) *ok = 0;  // zero or NaN pivot
      pivot_row = pivot;
    }
    __syncthreads();
    if (!*ok) break;  // uniform: every lane reads the same flag after the barrier
    const int pivot = pivot_row;
    if (pivot != col) {
      for (int j = lane; j < n; j += blockDim.x) {
        const acc_t t = A[col * n + j];
        A[col * n + j] = A[pivot * n + j];
        A[pivot * n + j] = t;
      }
      if (lane == 0) {
        const acc_t t = xv[col];
        xv[col] = xv[pivot];
        xv[pivot] = t;
      }
      __syncthreads();
    }
    for (int r = col + 1 + lane; r < n; r += blockDim.x) {
      const acc_t factor = A[r * n + col] / A[col * n + col];
      for (int j = col; j < n; ++j) A[r * n + j] -= factor * A[col * n + j];
      xv[r] -= factor * xv[col];
    }
    __syncthreads();
  }
  if (lane == 0) {
    bool good = *ok != 0;
    acc_t w_sum = acc_t(0);
    if (good) {
      w_sum = back_substitute(A, xv, sv, n);
      good = w_sum > acc_t(0) && is_finite(w_sum);
    }
    if (good) {
      for (int i = 0; i < n; ++i) {
        xv[i] = xv[i] / w_sum;
        good = good && is_finite(xv[i]);
      }
    }
    *ok = good ? 1 : 0;
  }
  __syncthreads();
  const bool good = *ok != 0;
  for (int i = lane; i < m; i += blockDim.x) alpha[i] = good ? (i < n ? xv[i] : acc_t(0)) : (i == slot ? acc_t(1) : acc_t(0));
}

// One warp per sample: sum the chunks' partials in order, complete the Gram row, track, solve
// (the n_filled × n_filled Gram block loaded into shared memory by the whole warp).
template <typename acc_t>
__global__ void anderson_track_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ gram,
                                      SampleState<acc_t> state, acc_t* __restrict__ alpha, uint8_t* __restrict__ flags,
                                      int m, int64_t C, int n_filled, int slot, acc_t lam, acc_t tol, bool rel_mode) {
  __shared__ acc_t row[kMaxHistoryCuda + 1];
  __shared__ acc_t gs[kMaxHistoryCuda * kMaxHistoryCuda];
  __shared__ acc_t A[kMaxHistoryCuda * kMaxHistoryCuda];
  __shared__ acc_t sv[kMaxHistoryCuda], xv[kMaxHistoryCuda];
  __shared__ int done, ok;
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
  // The filled block with the new row/column, from the old Gram (rows other than slot) and row[].
  const int n = n_filled;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e % n;
    gs[e] = i == slot ? row[j] : j == slot ? row[i] : gb[i * m + j];
  }
  if (threadIdx.x == 0) {
    const TrackOutcome t = track_sample(state, b, row[slot], row[m], tol, rel_mode);
    flags[2 * b] = t.improved;
    flags[2 * b + 1] = t.done;
    done = t.done;
  }
  __syncthreads();
  if (!done) anderson_weights_warp(gs, m, n, slot, lam, alpha + b * m, A, sv, xv, &ok);
}

// V consecutive elements, loaded and stored as one aligned 16-byte access when V > 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// x_next = Σ_j α_j F_j − (1 − τ) Σ_j α_j G_j over one chunk: each thread keeps kPerThread elements
// in registers and walks the history slot by slot (slot outer, as the history pass), so it has
// kPerThread / V independent loads in flight per slot. V > 1 (16-byte vector loads/stores: 4 float,
// 2 double, 8 half) when d % V == 0 and F, G and x_next are 16-byte aligned (the host checks);
// V = 1 otherwise. Every element's sums run over j in order, as on the CPU: the same bits either way.
template <typename scalar_t, typename acc_t, int V>
__global__ void anderson_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ F,
                                      const scalar_t* __restrict__ G, const acc_t* __restrict__ alpha,
                                      const uint8_t* __restrict__ flags, scalar_t* __restrict__ best,
                                      scalar_t* __restrict__ next, int64_t d, int m, int64_t C, acc_t damping) {
  static_assert(kPerThread % V == 0, "a thread's elements must split into whole packs");
  constexpr int P = kPerThread / V;  // packs per thread
  using PackT = Pack<scalar_t, V>;
  __shared__ acc_t a[kMaxHistoryCuda];
  const ChunkIndex ci = chunk_of_block(d, C);
  const bool improved = flags[2 * ci.b], done = flags[2 * ci.b + 1];
  if (!done && threadIdx.x < m) a[threadIdx.x] = alpha[ci.b * m + threadIdx.x];
  __syncthreads();
  const int64_t base = ci.b * d;
  if (improved || done) {
    for (int64_t i = ci.lo + threadIdx.x; i < ci.hi; i += kThreads) {
      if (improved) best[base + i] = x[base + i];
      if (done) next[base + i] = best[base + i];
    }
    if (done) return;
  }
  // Pack p of this thread starts at element lo + (p·kThreads + thread)·V; with (hi − lo) % V == 0 a
  // pack that starts before hi lies inside the chunk.
  acc_t v[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) v[k] = acc_t(0);
  for (int j = 0; j < m; ++j) {
    const acc_t aj = a[j];
    const scalar_t* Fj = F + (ci.b * m + j) * d;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t i0 = ci.lo + (int64_t(p) * kThreads + threadIdx.x) * V;
      if (i0 < ci.hi) {
        const PackT f = *reinterpret_cast<const PackT*>(Fj + i0);
#pragma unroll
        for (int e = 0; e < V; ++e) v[p * V + e] += aj * static_cast<acc_t>(f.v[e]);
      }
    }
  }
  if (damping != acc_t(0)) {
    acc_t w[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) w[k] = acc_t(0);
    for (int j = 0; j < m; ++j) {
      const acc_t aj = a[j];
      const scalar_t* Gj = G + (ci.b * m + j) * d;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t i0 = ci.lo + (int64_t(p) * kThreads + threadIdx.x) * V;
        if (i0 < ci.hi) {
          const PackT g = *reinterpret_cast<const PackT*>(Gj + i0);
#pragma unroll
          for (int e = 0; e < V; ++e) w[p * V + e] += aj * static_cast<acc_t>(g.v[e]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) v[k] -= damping * w[k];
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t i0 = ci.lo + (int64_t(p) * kThreads + threadIdx.x) * V;
    if (i0 < ci.hi) {
      PackT out;
#pragma unroll
      for (int e = 0; e < V; ++e) out.v[e] = static_cast<scalar_t>(v[p * V + e]);
      *reinterpret_cast<PackT*>(next + base + i0) = out;
    }
  }
}

// Pass A into `partials` (B, C, m + 1); arguments checked by the caller.
void history_into(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G, int64_t slot,
                  at::Tensor& partials, Stream stream) {
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  if (B == 0 || d == 0) {
    partials.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_history_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(anderson_history_kernel<scalar_t, acc_t>, B * C, kThreads, stream, x.const_data_ptr<scalar_t>(),
           fx.const_data_ptr<scalar_t>(), F.mutable_data_ptr<scalar_t>(), G.mutable_data_ptr<scalar_t>(),
           partials.mutable_data_ptr<acc_t>(), d, int(m), int(slot), C);
  });
}

// Pass B (two launches) into `x_next`, with the scratch alpha (B, m) and flags (B, 2).
void step_into(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
               const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
               at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, int64_t n_filled, int64_t slot, double lam,
               double tau, double tol, bool rel_mode, at::Tensor& x_next, at::Tensor& alpha, at::Tensor& flags,
               Stream stream) {
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  if (B == 0) return;
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
    constexpr int V = 16 / int(sizeof(scalar_t));
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool vector = d % V == 0 && aligned(F.const_data_ptr()) && aligned(G.const_data_ptr()) &&
                        aligned(x_next.const_data_ptr());
    launch(vector ? anderson_apply_kernel<scalar_t, acc_t, V> : anderson_apply_kernel<scalar_t, acc_t, 1>, B * C,
           kThreads, stream, x.const_data_ptr<scalar_t>(), F.const_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(),
           alpha.const_data_ptr<acc_t>(), flags.const_data_ptr<uint8_t>(), best_x.mutable_data_ptr<scalar_t>(),
           x_next.mutable_data_ptr<scalar_t>(), d, int(m), C, static_cast<acc_t>(1.0 - tau));
  });
}

void check_cuda_history(const char* op, int64_t m) {
  TORCH_CHECK(m <= kMaxHistoryCuda, op, ": the CUDA kernels take m <= ", kMaxHistoryCuda, ", got m = ", m);
}

at::Tensor anderson_history_cuda(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G,
                                 int64_t slot) {
  constexpr const char* op = "deqfast::anderson_history";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, d) tensor, got sizes ", x.sizes());
  check_same(op, "fx", fx, x);
  check_history_args(op, x, F, G, slot);
  check_cuda_history(op, F.size(1));
  check_history_overlap(x, fx, F, G);
  const DeviceGuard device_guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), m = F.size(1), C = num_chunks(d);
  at::Tensor partials = at::empty({B, C, m + 1}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  history_into(x, fx, F, G, slot, partials, current_stream());
  return partials;
}

at::Tensor anderson_step_cuda(const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, at::Tensor& gram,
                              const at::Tensor& partials, at::Tensor& best_x, at::Tensor& best_residual,
                              at::Tensor& best_rel, at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed,
                              int64_t n_filled, int64_t slot, double lam, double tau, double tol, bool rel_mode) {
  constexpr const char* op = "deqfast::anderson_step";
  check_anderson_step_args(op, x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed,
                           n_filled, slot);
  const int64_t B = x.size(0), m = F.size(1);
  check_cuda_history(op, m);
  const DeviceGuard device_guard(x.device());
  at::Tensor x_next = at::empty_like(x);
  if (B == 0) return x_next;
  at::Tensor alpha = at::empty({B, m}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  at::Tensor flags = at::empty({B, 2}, x.options().dtype(at::kByte));
  step_into(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed, n_filled, slot, lam, tau,
            tol, rel_mode, x_next, alpha, flags, current_stream());
  return x_next;
}

at::Tensor anderson_fused_step_cuda(const at::Tensor& x, const at::Tensor& fx, at::Tensor& F, at::Tensor& G,
                                    at::Tensor& gram, at::Tensor& partials, at::Tensor& alpha, at::Tensor& flags,
                                    at::Tensor& best_x, at::Tensor& best_residual, at::Tensor& best_rel,
                                    at::Tensor& nstep, at::Tensor& converged, at::Tensor& failed, int64_t n_filled,
                                    int64_t slot, double lam, double tau, double tol, bool rel_mode) {
  constexpr const char* op = "deqfast::anderson_fused_step";
  check_anderson_fused_step_args(op, x, fx, F, G, gram, partials, alpha, flags, best_x, best_residual, best_rel, nstep,
                                 converged, failed, n_filled, slot);
  check_cuda_history(op, F.size(1));
  const DeviceGuard device_guard(x.device());
  at::Tensor x_next = at::empty_like(x);
  const Stream stream = current_stream();
  history_into(x, fx, F, G, slot, partials, stream);
  step_into(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed, n_filled, slot, lam, tau,
            tol, rel_mode, x_next, alpha, flags, stream);
  return x_next;
}

}  // namespace
}  // namespace cuda

#ifndef DEQFAST_CUDA_EMULATION
#define DEQFAST_STR2(x) #x
#define DEQFAST_STR(x) DEQFAST_STR2(x)

std::string cuda_build_info() {
  std::string info = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#ifdef __CUDA_ARCH_LIST__
  info += ", archs " DEQFAST_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

std::vector<std::string> cuda_build_archs() {
  std::vector<std::string> archs;
#ifdef __CUDA_ARCH_LIST__
  const std::string list = DEQFAST_STR(__CUDA_ARCH_LIST__);  // e.g. "800,900": the -arch values, x10
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string num = list.substr(start, end - start);
    if (!num.empty()) archs.push_back("sm_" + std::to_string(std::stoi(num) / 10));
    start = end + 1;
  }
#endif
  return archs;
}

std::string cuda_kernel_status(int64_t device) {
  static std::mutex mutex;
  static std::map<int64_t, std::string> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  int count = 0;
  std::string reason;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    (void)cudaGetLastError();
    reason = "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " devices)";
  } else {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaDeviceProp prop{};
    (void)cudaGetDeviceProperties(&prop, static_cast<int>(device));
    cudaFuncAttributes attributes{};
    // Any of our kernels: they are all built for the same architectures.
    const cudaError_t err = cudaFuncGetAttributes(&attributes, cuda::anderson_apply_kernel<float, float, 1>);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky; clear it so that torch's next check does not see it
      reason = std::string("no deqfast kernel image runs on CUDA device ") + std::to_string(device) + " (" + prop.name +
               ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + "): " + cudaGetErrorString(err) +
               "; deqfast was compiled for " + cuda_build_info() +
               " (rebuild with TORCH_CUDA_ARCH_LIST including " + std::to_string(prop.major) + "." +
               std::to_string(prop.minor) + ")";
    }
  }
  cache[device] = reason;
  return reason;
}

TORCH_LIBRARY_IMPL(deqfast, CUDA, m) {
  m.impl("anderson_history", &cuda::anderson_history_cuda);
  m.impl("anderson_step", &cuda::anderson_step_cuda);
  m.impl("anderson_fused_step", &cuda::anderson_fused_step_cuda);
}
#endif

}  // namespace deqfast
