// Cottention forward (docs/spec.md, "Forward"): o = the forward sweep with Q = q̂', K = k̂', V = ṽ.
//
// A block owns (b, h, a slice of SL columns of Dv, a segment of the sequence), with
// Shared<T, W, C, SL>::kBytes of dynamic shared memory. Causal: one sweep over the segment's
// chunks from its incoming state, the outgoing state written to kv_out when it is given.
// Bidirectional: the global sweep (State = K̂'ᵀ Ṽ over the row, then o = Q̂' Stateᵀ), or, given
// kv0 (total=: the whole sequence's sum, count0 every token's count), o = Q̂' kv0ᵀ without a sum
// of its own. Padded rows of o are +0. With o null, only the state (cosattn.absorb): kv0 (or
// zero) + K̂'ᵀ Ṽ into kv_out, with the causal counts (from count0) or the global ones (count0, or
// the row's own), and q is not read.
//
// The sequence split (docs/design.md, "GPU kernels: what makes them fast"): when B * H * slices
// is too small to fill the GPU, the row is cut into segments of segment_chunks chunks, and the
// forward takes three launches: forward_kernel with states_only forms each segment's own state
// Σ_{n in segment} Ṽ_nᵀ K̂_n (its counts start after the real tokens before it), scan_kernel
// turns them into each segment's incoming state (kv0 plus the states of the segments before it;
// bidirectional: the sum over all segments) and writes kv_out, and forward_kernel runs each
// segment from its incoming state. Without the split (one segment) forward_kernel alone runs.
// Both passes are the same sweep (Block::run) with run-time flags, compiled once. The state
// alone (o null) split is the first two launches (kv_out = kv0 + the segments' sum); a
// bidirectional forward given kv0 (total=) split is the last alone, every segment from kv0.
#include "common.cuh"

namespace cosattn {

// Which (b, h, slice, segment) block blockIdx.x is, and the geometry around it.
template <typename T, int W, int C, int SL>
struct Place {
  index_t b, h, slice, segment, first, last;

  __device__ __forceinline__ explicit Place(const ForwardParams<T>& p) {
    const index_t slices = (p.Dv + SL - 1) / SL;
    index_t i = index_t(blockIdx.x);
    segment = i % p.segments;
    i /= p.segments;
    slice = i % slices;
    i /= slices;
    h = i % p.H;
    b = i / p.H;
    const index_t chunks = (p.S + C - 1) / C;
    first = segment * p.segment_chunks;
    last = first + p.segment_chunks < chunks ? first + p.segment_chunks : chunks;
  }

  // Offset of this (b, h)'s state, and of this segment's in segment_states.
  __device__ __forceinline__ index_t state(const ForwardParams<T>& p) const {
    return (b * p.H + h) * p.Dv * p.Dk;
  }
  __device__ __forceinline__ index_t segment_state(const ForwardParams<T>& p) const {
    return ((b * p.H + h) * p.segments + segment) * p.Dv * p.Dk;
  }
};

// W: the tile width, a multiple of 16 at least Dk and Dv; C: the chunk; SL: the slice of Dv.
// p.o may be null (the state alone; p.kv_out is then given).
template <typename T, int W, int C, int SL>
__global__ void __launch_bounds__(kThreads, Block<T, W, C, SL>::kMinBlocks) forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const Place<T, W, C, SL> at(p);
  const int dk = int(p.Dk), dv = int(p.Dv);
  const Sequence<T> seq = sequence_of<T>(p, dk, at.b, at.h);
  Block<T, W, C, SL> block(seq, dk, int(at.slice) * SL, dv, p.passes > 1);
  block.begin();
  const Operand<T> Q{seq.q, dk, Scale::kQuery};
  const Operand<T> K{seq.k, dk, Scale::kKey};
  const Operand<T> V{rows_of(p.v, p.v_stride, at.b, at.h), dv, Scale::kValue};
  const Rows<T> out = rows_of(p.o, p.o_stride, at.b, at.h);  // o null: never written
  const bool split = p.segments > 1;
  // The split's first launch (states_only): the segment's own state, from zero, no outputs.
  const bool states = p.states_only != 0;
  const bool outputs = !states && p.o != nullptr;
  // Bidirectional total=: kv0 is the whole sequence's sum, every segment's state as it is.
  const bool given_total = !p.causal && p.o != nullptr && p.kv0 != nullptr;
  const A* kv0 = p.kv0 == nullptr ? nullptr : static_cast<const A*>(p.kv0) + at.state(p);
  A* segment_state = split ? static_cast<A*>(p.segment_states) + at.segment_state(p) : nullptr;
  const A* state0 = states ? nullptr : (given_total || !split ? kv0 : segment_state);
  A* state_out = states                          ? segment_state
                 : split || p.kv_out == nullptr ? nullptr
                                                : static_cast<A*>(p.kv_out) + at.state(p);

  const int c0 = block.c0, cols = block.cols;
  const A* tile = block.sm.out();
  const A* real = block.sm.real();
  auto write = [&](index_t t0, int rows) {
    for (int idx = int(threadIdx.x); idx < rows * SL; idx += kThreads) {
      const int r = idx / SL, c = idx % SL;
      if (c < cols) {
        const A x = real[r] != A(0) ? tile[r * Shared<T, W, C, SL>::kLdO + c] : A(0);
        out.store(t0 + r, c0 + c, Num<T>::store(x));
      }
    }
  };
  const index_t count = seq.n0 + (p.causal && split ? block.real_before(at.first * C) : 0);
  // A global sweep sums its chunks into the state unless it starts from the whole sum: a
  // segment's incoming state (the scan's) or total=.
  const bool absorb_first = states || (!split && !given_total);
  block.run(p.causal ? Mode::kForward : Mode::kGlobal, at.first, at.last, count, outputs,
            absorb_first, Q, K, V, state0, false, state_out, false, false, write);
}

// The sequence split, second launch: one thread per entry of a (b, h) state, in a fixed order.
// Causal: segment g's slot becomes kv0 + Σ_{g' < g} (own state of g'), and kv_out the sum over
// all; bidirectional: every slot becomes kv0 (or zero) + the sum over all segments (kv0 given
// only to the state alone, o null), or kv0 itself with o given (total=: the whole sequence's
// sum, in place of the segments'; forward_kernel then reads kv0 directly, and the backend does
// not run this pass at all).
template <typename T>
__global__ void __launch_bounds__(kThreads) scan_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const index_t size = p.Dv * p.Dk;
  const index_t i = index_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.B * p.H * size) return;
  const index_t bh = i / size, e = i % size;
  A* slot = static_cast<A*>(p.segment_states) + bh * p.segments * size + e;
  const bool given_total = !p.causal && p.o != nullptr && p.kv0 != nullptr;
  A total = p.kv0 != nullptr ? static_cast<const A*>(p.kv0)[i] : A(0);
  for (index_t g = 0; g < p.segments; ++g) {
    const A own = slot[g * size];
    if (p.causal) slot[g * size] = total;
    if (!given_total) total += own;
  }
  if (!p.causal) {
    for (index_t g = 0; g < p.segments; ++g) slot[g * size] = total;
  }
  if (p.kv_out != nullptr) static_cast<A*>(p.kv_out)[i] = total;
}

}  // namespace cosattn
