// A small CPU emulation of the CUDA execution model, enough to run deqfast's kernels
// (csrc/cuda/*.cu) on a machine without a GPU, for csrc/tests/test_cuda_emulated.cpp.
//
// Include this header, then the .cu files: with DEQFAST_CUDA_EMULATION defined, csrc/cuda/common.cuh
// takes its launch helper, stream and device guard from here instead of c10/cuda, and the .cu files
// skip their TORCH_LIBRARY_IMPL registration. The kernels and their host wrappers are then compiled by
// the host compiler and run on CPU tensors.
//
// What is emulated: a launch runs its blocks one after another; every CUDA thread is a std::thread
// (the same ones for every block of a launch), so __syncthreads() is a real barrier over the block
// and __shfl_down_sync a real exchange over the warp; `__shared__` variables are function statics,
// shared by the threads of the one block that runs at a time. Threads that return early drop out of
// the barriers (as exited threads do on sm_70+). Checked, and counted in emulation_errors(): launch
// geometry (grid size; threads per block a multiple of 32 and at most 1024); every thread of a block
// waiting at the *same* __syncthreads() (by source line); a shuffle with a partial mask or exited lanes.
// With CMake's DEQFAST_SANITIZE_EMULATION (on by default) the test that includes this is built with
// AddressSanitizer: an out-of-bounds access in a kernel fails it, as compute-sanitizer's memcheck would.
//
// What is not: timing, coalescing, the GPU memory model (a missing __syncthreads() is only caught
// when the race changes a result, which it did for each one removed on purpose), shared-memory size
// limits, device numerics (the host's libm takes sqrt; the CUDA build's ::sqrt is correctly rounded
// too). It finds logic errors in the kernels (indexing, chunking, reductions, barriers, frozen and
// failed samples); it does not replace a run on a GPU.
#pragma once

#define DEQFAST_CUDA_EMULATION 1

#include <c10/core/Device.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

namespace deqfast {
namespace emu {

struct Warp {
  std::barrier<> barrier{32};
  std::atomic<int> active{32};
  alignas(8) unsigned char lanes[32][8];
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps(threads / 32), sync_lines(new std::atomic<int>[2 * threads]) {
    for (int t = 0; t < 2 * threads; ++t) sync_lines[t] = -1;
  }
  std::barrier<> barrier;
  std::vector<Warp> warps;
  std::unique_ptr<std::atomic<int>[]> sync_lines;  // the __syncthreads() line each thread waits at, two phases
};

inline dim3 block_dim, grid_dim;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* block = nullptr;
inline thread_local int sync_phase = 0;
inline std::atomic<int> errors{0};
inline int64_t launches = 0;  // kernel launches so far (the tests count them per op)
inline std::string first_error;  // written once, by the thread that counts the first error

inline void report(const std::string& what) {
  if (errors.fetch_add(1) == 0) first_error = what;
}

inline void syncthreads(int line) {
  const int tid = static_cast<int>(thread_idx.x), threads = static_cast<int>(block_dim.x);
  std::atomic<int>* lines = block->sync_lines.get() + (sync_phase & 1) * threads;
  lines[tid] = line;
  block->barrier.arrive_and_wait();
  for (int t = 0; t < threads; ++t) {
    const int other = lines[t];
    if (other != -1 && other != line) {
      report("threads of block " + std::to_string(block_idx.x) + " wait at different __syncthreads() (lines " +
             std::to_string(line) + " and " + std::to_string(other) + ")");
      break;
    }
  }
  ++sync_phase;
}

template <typename T>
T shfl_down(unsigned mask, T v, unsigned offset) {
  static_assert(sizeof(T) <= 8, "emulated shuffles carry up to 8 bytes");
  Warp& w = block->warps[thread_idx.x / 32];
  const unsigned lane = thread_idx.x % 32;
  if (mask != 0xffffffffu || w.active.load() != 32) report("__shfl_down_sync with inactive lanes");
  std::memcpy(w.lanes[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out = v;
  if (lane + offset < 32) std::memcpy(&out, w.lanes[lane + offset], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

// Runs kernel(args...) over `blocks` blocks of `threads` threads: one std::thread per CUDA thread,
// which runs its thread of every block in turn; a fresh Block (barriers) for each block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, Args... args) {
  if (blocks < 1 || blocks > 0x7fffffff || threads < 32 || threads > 1024 || threads % 32 != 0) {
    report("bad launch geometry: " + std::to_string(blocks) + " blocks of " + std::to_string(threads) + " threads");
    return;
  }
  ++launches;
  grid_dim = dim3{static_cast<unsigned>(blocks), 1, 1};
  block_dim = dim3{static_cast<unsigned>(threads), 1, 1};
  auto state = std::make_unique<Block>(threads);
  auto next_block = [&]() noexcept { state = std::make_unique<Block>(threads); };
  std::barrier<decltype(next_block)> between_blocks(threads, next_block);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3{static_cast<unsigned>(t), 0, 0};
      for (int64_t b = 0; b < blocks; ++b) {
        block_idx = dim3{static_cast<unsigned>(b), 0, 0};
        block = state.get();
        sync_phase = 0;
        kernel(args...);
        // An exited thread no longer takes part in barriers or shuffles.
        block->sync_lines[t] = -1;
        block->sync_lines[threads + t] = -1;
        Warp& w = block->warps[t / 32];
        w.active.fetch_sub(1);
        w.barrier.arrive_and_drop();
        block->barrier.arrive_and_drop();
        between_blocks.arrive_and_wait();  // the last to arrive makes the next block's state
      }
      block = nullptr;
    });
  }
  for (auto& th : pool) th.join();
}

inline int emulation_errors() { return errors.load(); }

}  // namespace emu

namespace cuda {

using Stream = int;  // no streams: launches run to completion, in order
inline Stream current_stream() { return 0; }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, Stream, Args... args) {
  emu::launch(kernel, blocks, threads, args...);
}

}  // namespace cuda
}  // namespace deqfast

#define threadIdx (::deqfast::emu::thread_idx)
#define blockIdx (::deqfast::emu::block_idx)
#define blockDim (::deqfast::emu::block_dim)
#define gridDim (::deqfast::emu::grid_dim)
#define __syncthreads() ::deqfast::emu::syncthreads(__LINE__)
#define __shfl_down_sync(mask, v, offset) ::deqfast::emu::shfl_down(mask, v, offset)
