// Running an emulated kernel (see emulation.h): the arguments arrive as cuLaunchKernel's
// void** kernelParams; each block runs as `block` fibers, the blocks one after another. Writes
// past the dynamic shared memory the launch asked for are caught (and, under AddressSanitizer,
// reads too), as are asynchronous copies a block never waited for.
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

inline void resume(unsigned t) {
  block->current = t;
  thread_index = dim3{t, 0, 0};
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

// Run every fiber until all wait or are done; then open the barriers that can open.
inline void schedule(BlockState& state) {
  const unsigned n = unsigned(state.fibers.size());
  bool ascending = true;
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      const unsigned t = ascending ? i : n - 1 - i;
      if (state.fibers[t].wait == Wait::kRunnable) resume(t);
    }
    ascending = !ascending;
    bool opened = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
      bool all = true;
      for (unsigned t = w * 32; t < w * 32 + 32; ++t) all = all && state.fibers[t].wait == Wait::kWarp;
      if (all) {
        for (unsigned t = w * 32; t < w * 32 + 32; ++t) state.fibers[t].wait = Wait::kRunnable;
        opened = true;
      }
    }
    if (opened) continue;
    unsigned at_block = 0, done = 0;
    for (const Fiber& f : state.fibers) {
      at_block += f.wait == Wait::kBlock;
      done += f.wait == Wait::kDone;
    }
    if (done == n) return;
    if (at_block != n) throw std::runtime_error("barrier deadlock: threads wait at different barriers");
    for (Fiber& f : state.fibers) f.wait = Wait::kRunnable;
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

template <typename... P>
void run(void (*kernel)(P...), unsigned grid, unsigned threads, std::size_t shared, void** args) {
  if (shared > kSharedCapacity) throw std::runtime_error("shared memory request too large");
  if (threads % 32 != 0) throw std::runtime_error("blocks are whole warps");
  const std::tuple<P...> values = arguments<P...>(args, std::index_sequence_for<P...>{});
  body = [&] { std::apply(kernel, values); };
  grid_dim = dim3{grid, 1, 1};
  block_dim = dim3{threads, 1, 1};
  unsigned char* memory = cosattn::cosattn_shared;
  BlockState state;
  state.fibers.resize(threads);
  state.exchange.resize(2 * threads);
  state.parity.resize(threads);
  block = &state;
  for (unsigned b = 0; b < grid; ++b) {
    block_index = dim3{b, 0, 0};
    EMU_UNPOISON(memory, kSharedCapacity);
    std::memset(memory, 0xff, kSharedCapacity);
    EMU_POISON(memory + shared, kSharedCapacity - shared);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = state.fibers[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stack(t);
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, entry, 0);
      f.started = false;
      f.wait = Wait::kRunnable;
      state.parity[t] = 0;
    }
    pipeline_fault();
    schedule(state);
    if (const char* fault = pipeline_fault()) throw std::runtime_error(fault);
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
