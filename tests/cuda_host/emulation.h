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
// refilled with 0xff (NaN) before each; the blocks of a thread-block cluster run together, as
// the fibers of all their threads, each block with its own shared memory (swapped into the
// buffer while one of its threads runs), which the others read through peer(). A cluster
// barrier (split into an arrival and a wait) opens when every thread of the cluster has
// arrived.
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

enum class Wait { kRunnable, kBlock, kWarp, kCluster, kDone };

// A fiber starts on its own stack through ucontext, then switches with _setjmp/_longjmp, which
// (unlike swapcontext) make no system call.
struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  bool started = false;
  Wait wait = Wait::kRunnable;
  unsigned arrived = 0;  // cluster barriers it has arrived at
  unsigned phase = 0;    // the cluster barrier it waits for (kCluster): arrivals it needs
};

// The threads of the block being run, or of the blocks of a cluster (threads of block b are
// fibers [b threads, (b + 1) threads)), and where they stand.
struct BlockState {
  ucontext_t scheduler;
  jmp_buf back;
  std::vector<Fiber> fibers;
  std::vector<std::uint64_t> exchange;  // two slots per thread for the shuffles
  std::vector<unsigned> parity;         // shuffles done per thread
  unsigned current = 0;
  unsigned threads = 0;  // per block
  // The shared-memory buffer the kernels address, its bytes per block, the block whose memory
  // it holds, and every block's (for the one it holds, as it was when it was swapped in).
  unsigned char* memory = nullptr;
  std::size_t bytes = 0;
  unsigned resident = 0;
  std::vector<std::vector<unsigned char>> saved;
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

inline const char* cluster_error = nullptr;  // the first bad access to another block's memory

inline void cluster_arrive() { ++block->fibers[block->current].arrived; }

inline void cluster_wait() {
  Fiber& fiber = block->fibers[block->current];
  fiber.phase = fiber.arrived;
  wait(Wait::kCluster);
}

// What stands at shared address p (of the running block's shared memory) in the shared memory
// of the cluster's block `rank`.
inline const void* peer(const void* p, unsigned rank) {
  const auto* at = static_cast<const unsigned char*>(p);
  const std::size_t offset = std::size_t(at - block->memory);
  if (at < block->memory || offset >= block->bytes || rank >= block->saved.size()) {
    if (cluster_error == nullptr) {
      cluster_error = "a read of another block's shared memory outside it";
    }
    return p;
  }
  return rank == block->resident ? p : block->saved[rank].data() + offset;
}

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
