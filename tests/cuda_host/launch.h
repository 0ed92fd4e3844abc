// Running an emulated kernel (see emulation.h): the arguments arrive as cuLaunchKernel's
// void** kernelParams; each block runs as `block` fibers, the blocks one after another, or
// the blocks of each cluster together. Writes past the dynamic shared memory the launch asked
// for are caught (and, under AddressSanitizer, reads too), as are asynchronous copies a block
// never waited for and reads of another block's shared memory outside it.
#pragma once

#include <sys/mman.h>
#include <string>
#include <unistd.h>

#include "cuda_pipeline_primitives.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace cosattn {
extern unsigned char cosattn_shared[];  // defined by the registry, kSharedCapacity bytes
}

namespace emu {

constexpr std::size_t kSharedCapacity = std::size_t(1) << 20;
constexpr std::size_t kStack = std::size_t(256) << 10;

// Fiber stacks, each above a guard page, kept for the whole process.
inline unsigned char* stack(unsigned t) {
  static std::vector<unsigned char*> stacks;
  const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= t) {
    void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    stacks.push_back(static_cast<unsigned char*>(p) + page);
  }
  return stacks[t];
}

inline std::function<void()> body;

inline void entry() {
  body();
  block->fibers[block->current].wait = Wait::kDone;
  _longjmp(block->back, 1);
}

// Put block b's shared memory in the buffer the kernels address.
inline void swap_in(unsigned b) {
  std::memcpy(block->saved[block->resident].data(), block->memory, block->bytes);
  std::memcpy(block->memory, block->saved[b].data(), block->bytes);
  block->resident = b;
}

inline void resume(unsigned t, unsigned first) {
  const unsigned b = t / block->threads;
  if (b != block->resident) swap_in(b);
  block->current = t;
  thread_index = dim3{t % block->threads, 0, 0};
  block_index = dim3{first + b, 0, 0};
  lane = t % 32;
  warp = t / 32;
  Fiber& fiber = block->fibers[t];
  if (_setjmp(block->back) != 0) return;
  if (!fiber.started) {
    fiber.started = true;
    swapcontext(&block->scheduler, &fiber.context);
  } else {
    _longjmp(fiber.jump, 1);
  }
}

// Open the barrier of fibers [begin, end) if every one of them waits at it.
inline bool open(BlockState& state, unsigned begin, unsigned end, Wait at) {
  for (unsigned t = begin; t < end; ++t) {
    if (state.fibers[t].wait != at) return false;
  }
  for (unsigned t = begin; t < end; ++t) state.fibers[t].wait = Wait::kRunnable;
  return true;
}

// Run the fibers [begin, end) of one block as far as they go: each until it waits or is done,
// in ascending and descending order in turn, opening their warp and block barriers, until all
// wait at a cluster barrier or are done (or a barrier can never open).
inline void advance(BlockState& state, unsigned begin, unsigned end, unsigned first) {
  bool ascending = true;
  for (bool opened = true; opened;) {
    for (unsigned i = begin; i < end; ++i) {
      const unsigned t = ascending ? i : end - 1 - (i - begin);
      if (state.fibers[t].wait == Wait::kRunnable) resume(t, first);
    }
    ascending = !ascending;
    opened = false;
    for (unsigned w = begin; w < end; w += 32) opened |= open(state, w, w + 32, Wait::kWarp);
    if (!opened) opened = open(state, begin, end, Wait::kBlock);
  }
}

// Run the block, or the blocks of a cluster (the first being block `first`): each block as far
// as it goes, one after another, in ascending and descending order in turn (so that a block
// that reads another's shared memory without the barrier that orders the two sees the wrong
// data in one of the two orders), then open the cluster barriers every thread has arrived at.
inline void schedule(BlockState& state, unsigned first) {
  const unsigned n = unsigned(state.fibers.size()), blocks = n / state.threads;
  bool ascending = true;
  for (;;) {
    for (unsigned i = 0; i < blocks; ++i) {
      const unsigned b = ascending ? i : blocks - 1 - i;
      advance(state, b * state.threads, (b + 1) * state.threads, first);
    }
    ascending = !ascending;
    unsigned arrived = ~0u, done = 0;
    for (const Fiber& f : state.fibers) {
      arrived = f.arrived < arrived ? f.arrived : arrived;
      done += f.wait == Wait::kDone;
    }
    if (done == n) return;
    bool opened = false;
    for (Fiber& f : state.fibers) {
      if (f.wait == Wait::kCluster && f.phase <= arrived) {
        f.wait = Wait::kRunnable;
        opened = true;
      }
    }
    if (!opened) throw std::runtime_error("barrier deadlock: threads wait at different barriers");
  }
}

template <typename P>
P argument(void* slot) {
  P value;
  std::memcpy(&value, slot, sizeof(P));
  return value;
}

template <typename... P, std::size_t... I>
std::tuple<P...> arguments(void** args, std::index_sequence<I...>) {
  return std::tuple<P...>(argument<P>(args[I])...);
}

// A launch of `grid` blocks of `threads` threads in clusters of `cluster` blocks (1: none).
template <typename... P>
void run(void (*kernel)(P...), unsigned grid, unsigned threads, std::size_t shared, void** args,
         unsigned cluster) {
  if (shared > kSharedCapacity) throw std::runtime_error("shared memory request too large");
  if (threads % 32 != 0) throw std::runtime_error("blocks are whole warps");
  if (cluster == 0 || grid % cluster != 0) {
    throw std::runtime_error("a grid of whole clusters (" + std::to_string(grid) + " blocks, " +
                             "clusters of " + std::to_string(cluster) + ")");
  }
  const std::tuple<P...> values = arguments<P...>(args, std::index_sequence_for<P...>{});
  body = [&] { std::apply(kernel, values); };
  grid_dim = dim3{grid, 1, 1};
  block_dim = dim3{threads, 1, 1};
  unsigned char* memory = cosattn::cosattn_shared;
  const unsigned n = threads * cluster;
  BlockState state;
  state.fibers.resize(n);
  state.exchange.resize(2 * n);
  state.parity.resize(n);
  state.threads = threads;
  state.memory = memory;
  state.bytes = shared;
  state.saved.resize(cluster);
  block = &state;
  for (unsigned first = 0; first < grid; first += cluster) {
    EMU_UNPOISON(memory, kSharedCapacity);
    std::memset(memory, 0xff, kSharedCapacity);
    EMU_POISON(memory + shared, kSharedCapacity - shared);
    for (std::vector<unsigned char>& own : state.saved) own.assign(shared, 0xff);
    state.resident = 0;
    for (unsigned t = 0; t < n; ++t) {
      Fiber& f = state.fibers[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stack(t);
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, entry, 0);
      f.started = false;
      f.wait = Wait::kRunnable;
      f.arrived = f.phase = 0;
      state.parity[t] = 0;
    }
    pipeline_fault();
    cluster_error = nullptr;
    schedule(state, first);
    if (const char* fault = pipeline_fault()) throw std::runtime_error(fault);
    if (cluster_error != nullptr) throw std::runtime_error(cluster_error);
    EMU_UNPOISON(memory, kSharedCapacity);
    for (std::size_t i = shared; i < kSharedCapacity; ++i) {
      if (memory[i] != 0xff) {
        throw std::runtime_error("a kernel wrote past its shared memory (" +
                                 std::to_string(shared) + " bytes): at byte " +
                                 std::to_string(i));
      }
    }
  }
  EMU_UNPOISON(memory, kSharedCapacity);
  block = nullptr;
}

using Launcher = void (*)(unsigned, unsigned, std::size_t, void**);

struct Entry {
  const char* expression;
  Launcher launch;
};

}  // namespace emu
