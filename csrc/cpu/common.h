// Helpers the CPU kernels share: thread grain, vectorisable fixed-order reductions, the
// elementwise tail of a step.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../deqfast_numerics.h"

namespace deqfast {
namespace cpu {

// Reductions keep kLanes independent partial sums combined in a fixed order: deterministic, and
// free of the add-latency chain of one accumulator (the compiler keeps the lanes in SIMD
// registers; it may not reorder a single running sum without -ffast-math).
constexpr int kLanes = 8;

// Tasks per thread so that each thread gets at least ~16k elements: small problems run on one
// thread. A parallel region costs microseconds, and when another process holds a core it can wait
// a whole scheduler time slice (milliseconds) for its second thread.
constexpr int64_t kMinElementsPerThread = 16384;

inline int64_t chunk_grain(int64_t d) {
  const int64_t per_task = d < kChunk ? (d > 0 ? d : 1) : kChunk;
  return std::max<int64_t>(1, kMinElementsPerThread / per_task);
}

// Σ a_i b_i over n elements, in kLanes partial sums; raw restrict pointers so
// the compiler vectorises it (through a lambda it kept the loads scalar).
template <typename acc_t, typename scalar_t>
inline acc_t dot_ordered(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(b[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  acc_t total = acc_t(0);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename scalar_t>
inline void write_slot(const scalar_t* __restrict x, const scalar_t* __restrict fx, scalar_t* __restrict F,
                       scalar_t* __restrict G, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    F[i] = fx[i];
    G[i] = static_cast<scalar_t>(fx[i] - x[i]);
  }
}

// ‖h − x‖² and ‖h‖² for h = fx (+ offset), in kLanes partial sums each (see dot_ordered).
template <typename acc_t, typename scalar_t>
inline void step_norms(const scalar_t* __restrict x, const scalar_t* __restrict fx, const scalar_t* __restrict offset,
                       int64_t n, acc_t* residual_sq, acc_t* value_sq) {
  acc_t r[kLanes] = {}, v[kLanes] = {};
  auto term = [&](int64_t i, int l) {
    const scalar_t h = offset ? static_cast<scalar_t>(fx[i] + offset[i]) : fx[i];
    const acc_t diff = static_cast<acc_t>(static_cast<scalar_t>(h - x[i]));
    const acc_t hv = static_cast<acc_t>(h);
    r[l] += diff * diff;
    v[l] += hv * hv;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) term(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) term(i, l);
  *residual_sq = *value_sq = acc_t(0);
  for (int l = 0; l < kLanes; ++l) {
    *residual_sq += r[l];
    *value_sq += v[l];
  }
}

// Elementwise tail shared by both steps: best_x <- x where improved; x_next <- best_x where done,
// else the step, which `fill(b, lo, hi, out)` writes for the chunk [lo, hi) of sample b.
template <typename scalar_t, typename Fill>
inline void apply_chunks(int64_t B, int64_t d, const scalar_t* xp, scalar_t* best, scalar_t* next, const uint8_t* improved,
                  const uint8_t* done, Fill fill) {
  const int64_t C = num_chunks(d);
  at::parallel_for(0, B * C, chunk_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, c = task % C;
      const int64_t lo = c * kChunk, hi = std::min(d, lo + kChunk);
      scalar_t* bb = best + b * d;
      if (improved[b]) std::copy(xp + b * d + lo, xp + b * d + hi, bb + lo);
      if (done[b]) {
        std::copy(bb + lo, bb + hi, next + b * d + lo);
      } else {
        fill(b, lo, hi, next + b * d);
      }
    }
  });
}

}  // namespace cpu
}  // namespace deqfast
