// Host stand-in for cuda_pipeline_primitives.h (see emulation.h): the asynchronous copies
// (cp.async) of the cosattn kernels. A thread's copies are queued, committed as groups, and made
// only when the thread waits for their group (__pipeline_wait_prior), so a tile read before its
// wait, or by another thread before the barrier that follows the waits, holds the old bytes (the
// 0xff NaN of a fresh block, or the chunk before). A block that ends with copies it never waited
// for stops the launch (launch.h), as does a copy of another size than 4, 8 or 16 bytes or with
// a source or destination not aligned to its size (which is then not made: an exception cannot
// leave a fiber, so the launch reports it once the block has run). The bytes copied are
// counted, for the tests of what a kernel reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace emu {

struct AsyncCopy {
  void* dst;
  const void* src;
  std::size_t size, zfill;
};

// One thread's copies: those issued since its last commit, and the committed groups, oldest first.
struct Pipeline {
  std::vector<AsyncCopy> open;
  std::vector<std::vector<AsyncCopy>> groups;
};

inline std::vector<Pipeline> pipelines;  // per thread of the block being run
inline const char* pipeline_error = nullptr;  // the first bad copy's fault
inline std::size_t copied = 0;  // bytes the copies have moved from global memory

inline Pipeline& pipeline() {
  const unsigned t = block->current;
  if (pipelines.size() <= t) pipelines.resize(t + 1);
  return pipelines[t];
}

// Why the block just run misused the copies (null when it did not); clears the queues and the
// fault for the next block.
inline const char* pipeline_fault() {
  const char* fault = pipeline_error;
  for (Pipeline& p : pipelines) {
    if (fault == nullptr && !(p.open.empty() && p.groups.empty())) {
      fault = "a block ended with asynchronous copies it never waited for";
    }
    p.open.clear();
    p.groups.clear();
  }
  pipeline_error = nullptr;
  return fault;
}

}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, std::size_t size_and_align,
                                    std::size_t zfill = 0) {
  const std::size_t n = size_and_align;
  const char* fault = nullptr;
  if ((n != 4 && n != 8 && n != 16) || zfill > n) {
    fault = "__pipeline_memcpy_async copies 4, 8 or 16 bytes";
  } else if (reinterpret_cast<std::uintptr_t>(dst) % n != 0 ||
             reinterpret_cast<std::uintptr_t>(src) % n != 0) {
    fault = "__pipeline_memcpy_async: a source or destination not aligned to the copy's size";
  }
  if (fault != nullptr) {
    if (emu::pipeline_error == nullptr) emu::pipeline_error = fault;
    return;
  }
  emu::pipeline().open.push_back(emu::AsyncCopy{dst, src, n, zfill});
}

inline void __pipeline_commit() {
  emu::Pipeline& p = emu::pipeline();
  p.groups.push_back(std::move(p.open));
  p.open.clear();
}

// Make the copies of every committed group but the `prior` most recent ones.
inline void __pipeline_wait_prior(std::size_t prior) {
  emu::Pipeline& p = emu::pipeline();
  while (p.groups.size() > prior) {
    for (const emu::AsyncCopy& c : p.groups.front()) {
      std::memcpy(c.dst, c.src, c.size - c.zfill);
      emu::copied += c.size - c.zfill;
      std::memset(static_cast<unsigned char*>(c.dst) + (c.size - c.zfill), 0, c.zfill);
    }
    p.groups.erase(p.groups.begin());
  }
}
