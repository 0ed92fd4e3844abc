// Cottention forward (docs/spec.md, "Forward"): o = the forward sweep with Q = q̂', K = k̂', V = ṽ.
//
// A block owns (sequence n, h, a slice of SL columns of Dv, a segment of the sequence), with
// Shared<T, W, C, SL>::kBytes of dynamic shared memory. The slices of a (sequence, h, segment)
// are consecutive blocks, ceil(Dv / SL) rounded up to a multiple of G (those past Dv own no
// columns: they compute on zeros and write nothing), and on sm_90 each G of them form a
// cluster that shares the q and k tiles (common.cuh, "clusters"): G is 1, 2, 4 or 8, chosen by
// the cupy backend (_cupy.cluster), which launches a whole number of clusters. A sequence is a
// batch row, or one span of a packed row (cu_seqlens, read here: Span); its state is its row of
// kv0 and kv_out or the pool slot it names. Causal: one sweep over the segment's chunks from
// its incoming state, the outgoing state written to kv_out when it is given. Bidirectional: the
// global sweep (State = K̂'ᵀ Ṽ over the sequence, then o = Q̂' Stateᵀ), or, given kv0 (total=:
// the whole sequence's sum, count0 every token's count), o = Q̂' kv0ᵀ without a sum of its own.
// Padded rows of o are +0, and so are the rows of a pool's padding entry (state_indices -1),
// whose blocks read and write no state. With o null, only the state (cosattn.absorb): kv0 (or
// zero) + K̂'ᵀ Ṽ into kv_out, with the causal counts (from count0) or the global ones (count0,
// or the row's own), and q is not read. count_kernel writes the outgoing counts afterwards: a
// pool's count0 and count_out are one array, which the sweeps read.
//
// The sequence split (docs/design.md, "GPU kernels: what makes them fast"): when N * H * slices
// is too small to fill the GPU, each sequence is cut into segments of segment_chunks chunks,
// and the forward takes three launches: forward_kernel with states_only forms each segment's own
// state Σ_{n in segment} Ṽ_nᵀ K̂_n (its counts start after the real tokens before it),
// scan_kernel turns them into each segment's incoming state (kv0 plus the states of the segments
// before it; bidirectional: the sum over all segments) and writes kv_out, and forward_kernel runs
// each segment from its incoming state. Without the split (one segment) forward_kernel alone
// runs. Both passes are the same sweep (Block::run) with run-time flags, compiled once. The state
// alone (o null) split is the first two launches (kv_out = kv0 + the segments' sum); a
// bidirectional forward given kv0 (total=) split is the last alone, every segment from kv0.
// Packed, the host does not know the lengths (reading them would wait for the device), so the
// plan cuts every sequence as it would cut the longest possible one, the whole row: segment g of
// a sequence is its chunks [g * segment_chunks, (g + 1) * segment_chunks), empty past its end
// (such a block forms a zero state, and its scan adds nothing). Each sequence's scan restarts at
// its own first segment, so no state crosses a sequence boundary.
#include "common.cuh"

namespace cosattn {

// Which (sequence, h, segment, slice) block blockIdx.x is, and the geometry around it.
template <typename T, int W, int C, int SL, int G>
struct Place {
  index_t n, h, slice, segment, first, last;
  Span span;

  __device__ __forceinline__ explicit Place(const ForwardParams<T>& p) {
    const index_t slices = cluster_slices<SL, G>(p.Dv);
    index_t i = index_t(blockIdx.x);
    slice = i % slices;
    i /= slices;
    segment = i % p.segments;
    i /= p.segments;
    h = i % p.H;
    n = i / p.H;
    span = span_of(p.cu_seqlens, p.S, p.state_indices, p.has_initial, p.P, n);
    const Segment chunks = segment_of<C>(segment, p.segment_chunks, span.length);
    first = chunks.first;
    last = chunks.last;
  }

  // This segment's state in segment_states (contiguous, in the accumulation type).
  template <typename V>
  __device__ __forceinline__ StateView<V> segment_state(const ForwardParams<T>& p,
                                                        V* states) const {
    return cosattn::segment_state<acc_t<T>>(states, p.H, p.segments, p.Dv, p.Dk, n, h, segment,
                                            false);
  }
};

// W: the tile width, a multiple of 16 at least Dk and Dv; C: the chunk; SL: the slice of Dv;
// G: the cluster. p.o may be null (the state alone; p.kv_out is then given).
template <typename T, int W, int C, int SL, int G>
__global__ void COSATTN_CLUSTER(G) __launch_bounds__(kThreads, Block<T, W, C, SL, G>::kMinBlocks)
    forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const Place<T, W, C, SL, G> at(p);
  const int dk = int(p.Dk), dv = int(p.Dv);
  const Sequence<T> seq = sequence_of<T>(p, dk, at.span, at.h, p.count_stride);
  Block<T, W, C, SL, G> block(seq, dk, int(at.slice) * SL, dv, p.passes > 1);
  const Rows<T> out = rows_of(p.o, p.o_stride, at.span, at.h);  // o null: never written
  const bool split = p.segments > 1;
  // The split's first launch (states_only): the segment's own state, from zero, no outputs.
  const bool states = p.states_only != 0;
  const bool outputs = !states && p.o != nullptr;
  const int c0 = block.c0, cols = block.cols;
  // A pool's padding entry (the whole cluster's): +0 outputs, no state read or written.
  if (at.span.padding) {
    if (outputs) {
      const index_t t0 = at.first * C;
      const index_t rows = (at.last * C < seq.S ? at.last * C : seq.S) - t0;
      for (index_t idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
        out.store(t0 + idx / cols, c0 + int(idx % cols), Num<T>::store(A(0)));
      }
    }
    return;  // the whole cluster, before any barrier
  }
  block.begin();
  const Operand<T> Q{seq.q, dk, Scale::kQuery};
  const Operand<T> K{seq.k, dk, Scale::kKey};
  const Operand<T> V{rows_of(p.v, p.v_stride, at.span, at.h), dv, Scale::kValue};
  // Bidirectional total=: kv0 is the whole sequence's sum, every segment's state as it is.
  const bool given_total = !p.causal && p.o != nullptr && p.kv0 != nullptr;
  const bool wide = p.state_wide != 0;
  // A sequence that does not start from its pool slot (has_initial false) starts from zero.
  const StateView<const void> kv0 =
      at.span.from_state ? state_of(p.kv0, p.kv0_stride, wide, at.span.slot, at.h)
                         : StateView<const void>{};
  const StateView<void> segment_state =
      split ? at.segment_state(p, p.segment_states) : StateView<void>{};
  const StateView<const void> state0 =
      states ? StateView<const void>{}
             : (given_total || !split ? kv0
                                      : at.segment_state(p, static_cast<const void*>(
                                                               p.segment_states)));
  const StateView<void> state_out =
      states  ? segment_state
      : split ? StateView<void>{}
              : state_of(p.kv_out, p.kv_out_stride, wide, at.span.slot, at.h);

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
  const index_t count = seq.n0 + (p.causal && split ? block.real_upto(at.first * C) : 0);
  // A global sweep sums its chunks into the state unless it starts from the whole sum: a
  // segment's incoming state (the scan's) or total=.
  const bool absorb_first = states || (!split && !given_total);
  block.run(p.causal ? Mode::kForward : Mode::kGlobal, at.first, at.last, count, outputs,
            absorb_first, Q, K, V, state0, state_out, false, false, write);
}

// The sequence split, second launch: one thread per entry of a (sequence, h) state, in a fixed
// order. Causal: segment g's slot becomes kv0 + Σ_{g' < g} (own state of g'), or with reverse
// (the backward's reverse sweeps, kv0 then its dkv) kv0 + Σ_{g' > g}, and kv_out the sum over
// all; bidirectional: every slot becomes kv0 (or zero) + the sum over all segments (kv0
// given only to the state alone, o null), or kv0 itself with o given (total=: the whole
// sequence's sum, in place of the segments'; forward_kernel then reads kv0 directly, and the
// backend does not run this pass at all). kv0 and kv_out are the sequence's rows or pool slot
// (Span); padding entries have neither.
template <typename T>
__global__ void __launch_bounds__(kThreads) scan_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const index_t size = p.Dv * p.Dk;
  const index_t i = index_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.N * p.H * size) return;
  const index_t nh = i / size, e = i % size, r = e / p.Dk, c = e % p.Dk;
  const index_t n = nh / p.H, h = nh % p.H;
  const Span at = span_of(nullptr, p.S, p.state_indices, p.has_initial, p.P, n);
  if (at.padding) return;
  const bool wide = p.state_wide != 0;
  A* slot = static_cast<A*>(p.segment_states) + nh * p.segments * size + e;
  const bool given_total = !p.causal && p.o != nullptr && p.kv0 != nullptr;
  const StateView<const void> kv0 =
      at.from_state ? state_of(p.kv0, p.kv0_stride, wide, at.slot, h) : StateView<const void>{};
  A total = kv0.ptr != nullptr ? kv0.template get<A>(r, c) : A(0);
  for (index_t i = 0; i < p.segments; ++i) {
    const index_t g = p.reverse ? p.segments - 1 - i : i;
    const A own = slot[g * size];
    if (p.causal) slot[g * size] = total;
    if (!given_total) total += own;
  }
  if (!p.causal) {
    for (index_t g = 0; g < p.segments; ++g) slot[g * size] = total;
  }
  const StateView<void> kv_out = state_of(p.kv_out, p.kv_out_stride, wide, at.slot, h);
  if (kv_out.ptr != nullptr) kv_out.set(r, c, total);
}

// The outgoing counts, after the sweeps have read the incoming ones: count_out of sequence n's
// row or slot = its real tokens, plus (causal) its incoming count. One block per sequence, with
// kCountShared bytes of dynamic shared memory; padding entries write nothing.
constexpr size_t kCountShared = kWarps * sizeof(index_t);

template <typename T>
__global__ void __launch_bounds__(kThreads) count_kernel(const ForwardParams<T> p) {
  const Span at = span_of(p.cu_seqlens, p.S, p.state_indices, p.has_initial, p.P,
                          index_t(blockIdx.x));
  if (at.padding) return;
  const bool* mask = mask_of(p, at);
  index_t real = 0;
  for (index_t t = threadIdx.x; t < at.length; t += kThreads) {
    real += mask == nullptr || mask[t * p.mask_stride[1]] ? 1 : 0;
  }
  real = block_sum(real, reinterpret_cast<index_t*>(dynamic_shared()));
  const index_t n0 = p.causal ? incoming_count(p.count0, p.count_stride, at) : 0;
  if (threadIdx.x == 0) p.count_out[at.slot * p.count_stride] = real + n0;
}

}  // namespace cosattn
