// Host emulation of the CUDA features the cosattn kernels use, so that tests can run the kernels
// of cuda/ on a machine without a GPU (tests/test_cuda_emulated.py). Force-included (g++ -include)
// before the kernel sources; cuda_fp16.h, cuda_bf16.h, cuda_pipeline_primitives.h and mma.h of
// this folder stand in for NVIDIA's.
//
// A block runs as one fiber per thread on the calling thread. A fiber runs until it
// reaches __syncthreads or a warp-level synchronisation (__syncwarp, a shuffle), then the next
// one runs; a barrier opens when every thread of the block (of the warp) waits at it, and a
// barrier that can never open (divergent __syncthreads, a warp split between barriers) stops the
// launch with an error. Fibers run in ascending and descending thread order in turn between
// barriers, so a read that misses a barrier after a write sees the wrong data in one of the two.
// A lane's wmma accumulator holds its share of the tile (elements lane, lane + 32, ...), its A
// and B fragments the whole tiles. Blocks run one after another over one shared-memory buffer,
// refilled with 0xff (NaN) before each.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__
#define __constant__
#define __align__(n)

using std::isfinite;

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// vector_types.h: the 16-byte vectors the kernels move tiles and state rows with.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
// The read-only data cache load, the streaming load and the streaming and write-back stores:
// plain accesses on the host.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T value) {
  *p = value;
}
template <typename T>
inline void __stwb(T* p, T value) {
  *p = value;
}

inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

namespace emu {

enum class Wait { kRunnable, kBlock, kWarp, kDone };

// A fiber starts on its own stack through ucontext, then switches with _setjmp/_longjmp, which
// (unlike swapcontext) make no system call.
struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  bool started = false;
  Wait wait = Wait::kRunnable;
};

// The threads of the block being run, and where they stand.
struct BlockState {
  ucontext_t scheduler;
  jmp_buf back;
  std::vector<Fiber> fibers;
  std::vector<std::uint64_t> exchange;  // two slots per thread for the shuffles
  std::vector<unsigned> parity;         // shuffles done per thread
  unsigned current = 0;
};

inline dim3 thread_index, block_index, block_dim, grid_dim;
inline unsigned lane = 0, warp = 0;
inline BlockState* block = nullptr;

inline void wait(Wait why) {
  Fiber& fiber = block->fibers[block->current];
  fiber.wait = why;
  if (_setjmp(fiber.jump) == 0) _longjmp(block->back, 1);
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::wait(emu::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::Wait::kWarp); }

namespace emu {

// Two banks of slots, used in turn: a lane may deposit its value for the next shuffle while
// others still read this one, and it cannot come back to this bank before they have, since the
// next shuffle's barrier waits for them. One warp barrier per shuffle.
template <typename X>
X shuffle(X value, int source) {
  static_assert(sizeof(X) <= sizeof(std::uint64_t));
  const unsigned bank = block->parity[block->current]++ % 2;
  std::uint64_t* slots = &block->exchange[(bank * block->fibers.size() + warp * 32)];
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(X));
  slots[lane] = bits;
  __syncwarp();
  const std::uint64_t got = slots[source];
  X out;
  std::memcpy(&out, &got, sizeof(X));
  return out;
}

}  // namespace emu

template <typename X>
X __shfl_sync(unsigned, X value, int source) {
  return emu::shuffle(value, source & 31);
}
template <typename X>
X __shfl_xor_sync(unsigned, X value, int mask) {
  return emu::shuffle(value, int(emu::lane) ^ mask);
}
template <typename X>
X __shfl_up_sync(unsigned, X value, unsigned delta) {
  const int source = int(emu::lane) - int(delta);
  const X got = emu::shuffle(value, source < 0 ? int(emu::lane) : source);
  return source < 0 ? value : got;
}
