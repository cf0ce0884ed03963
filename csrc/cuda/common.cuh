// Pieces both CUDA ops use: the launch helper, a deterministic block reduction, the chunk of a block.
//
// Under DEQFAST_CUDA_EMULATION (csrc/tests/cuda_emulation.h, included first) the launch helper, the
// stream and the device guard come from the emulation and the kernels run on the CPU, for the tests.
#pragma once

#include <cstdint>

#ifndef DEQFAST_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#endif

#include "../deqfast_numerics.h"

namespace deqfast {
namespace cuda {

#ifndef DEQFAST_CUDA_EMULATION
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

// kernel<<<blocks, threads, 0, stream>>>(args...), then the launch-error check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, Stream stream, Args... args) {
  TORCH_CHECK(blocks <= 0x7fffffff, "deqfast: a launch of ", blocks, " blocks exceeds the grid limit 2^31 - 1");
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kChunk / kThreads);  // 16 elements of a chunk per thread
static_assert(kChunk % kThreads == 0, "a chunk must split evenly over the block");

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the warp sums): the same
// inputs give the same bits. Every thread gets the result. `scratch` holds kThreads / 32 values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? scratch[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Blocks cover (sample, chunk) pairs along grid.x, so any batch size fits (grid.y is capped at 65535).
struct ChunkIndex {
  int64_t b, lo, hi;
};

__device__ __forceinline__ ChunkIndex chunk_of_block(int64_t d, int64_t C) {
  const int64_t block = blockIdx.x;
  const int64_t b = block / C, c = block % C;
  const int64_t lo = c * kChunk;
  return {b, lo, lo + kChunk < d ? lo + kChunk : d};
}

}  // namespace cuda
}  // namespace deqfast
