// Cottention backward (docs/spec.md, "Backward") as four sweeps of common.cuh, in two kernels.
//
// Each gradient is a sweep with other roles (causal modes shown; bidirectional runs the same
// roles through the global mode and has no states, except with total=: then kv0 and dkv are the
// whole sequence's sum and its gradient, which the global sweeps take instead of their own):
//   1. o    = fwd(Q = q̂', K = k̂', V = ṽ,  from kv0)    -> δq_i = do_i · o_i        (= q̂_i · dq̂_i)
//   2. dṽ   = rev(Q = k̂', K = q̂', V = do, from dkv)   -> dv, δk_j = ṽ_j · dṽ_j   (= k̂_j · dk̂_j),
//                                                         dm, dkv0 (the final state)
//   3. dq̂   = fwd(Q = do, K = ṽ,  V = k̂', from kv0ᵀ)  -> dq = (dq̂ - q̂ δq [|q| > eps]) / max(|q|, eps)
//   4. dk̂   = rev(Q = ṽ,  K = do, V = q̂', from dkvᵀ)  -> dk = (dk̂ - k̂ δk [|k| > eps]) / max(|k|, eps)
// The normalisation needs each row's inner product q̂_i · dq̂_i. When one block of
// queries_keys_kernel (sweeps 3 and 4, a block per (b, h, slice of Dk)) holds all of Dk, it sums
// it from its own tile. Otherwise the identity q̂_i · dq̂_i = do_i · o_i (and k̂_j · dk̂_j = ṽ_j ·
// dṽ_j) lets values_kernel (sweeps 1 and 2, a block per (b, h, slice of Dv)) compute it from
// slices of Dv: it writes per-slice partial sums, which queries_keys_kernel adds up in a fixed
// order. values_kernel also writes per-slice partial sums of dm, which dm_kernel adds up. No
// atomics: the gradients are the same bits from run to run. The epilogues select padded rows
// away: dq, dk and dv are +0 there, and their partial sums of δq, δk and dm are 0, whatever q, k,
// v or do hold at those rows (docs/spec.md, "Bad input"). A block's (b, h) is a sequence and a
// head: a batch row, or one span of a packed row (cu_seqlens, read on the device: Span), with
// its own rows of kv0, dkv and dkv0; dm sums over every sequence.
//
// Both kernels order their blocks as forward.cu does: the slices of a (sequence, h, segment)
// consecutive, their number rounded up to whole clusters of G that share the Q and K tiles on
// sm_90 (common.cuh, "clusters"; G is 1 for float and double). A block past Dv (values_kernel)
// or Dk (queries_keys_kernel) owns no columns and writes no partial sum (slice >= nsv).
//
// The sequence split (docs/design.md, "GPU kernels: what makes them fast"): when the blocks per
// (sequence, h, slice) are too few to fill the GPU, each sequence is cut into segments of
// segment_chunks chunks as the forward cuts it (segment g: chunks [g * segment_chunks, (g + 1) *
// segment_chunks), empty past the sequence's end), and both kernels take a block per (sequence,
// h, slice, segment). Sweeps 1 and 3 start a segment from kv_states (kv0 + Σ ṽᵀ k̂ over the
// segments before it; sweep 3 reads it transposed), sweeps 2 and 4 from dkv_states (dkv + Σ do
// q̂ᵀ over the segments after it): forward.cu's forward_kernel (states_only) and scan_kernel form
// them before these kernels run, the second pair with q as k, do as v and no m, scanning from the
// last segment and writing dkv0. The running counts start from the real tokens before the
// segment (forward) or up to its end (reverse); bidirectional, both states are the sequence's
// sums (or, with total=, kv0 and dkv themselves, and no states are formed). dm_part holds a
// partial sum per segment too. Every per-row output belongs to the one segment holding the row.
#include "common.cuh"

namespace cosattn {

// Partial sums per slice of Dv: dq_part, dk_part (nsv, B, H, S), or null when queries_keys_kernel
// does not need them (sweep 1 is then skipped), dm_part (N, H, nsv, segments) or null, holding
// Σ_j (ṽ_j · dṽ_j)(-ln max(1, c_j)) over the slice's columns and the segment's rows. dkv0 is
// written when given (an incoming state) without the split (split: by scan_kernel). W, C, SL as
// forward_kernel; a block owns a slice of Dv and a segment.
template <typename T, int W, int C, int SL, int G>
__global__ void COSATTN_CLUSTER(G) __launch_bounds__(kThreads, Block<T, W, C, SL, G>::kMinBlocks)
    values_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  using Smem = Shared<T, W, C, SL>;
  const int dk = int(p.Dk);
  const int dvn = int(p.Dv);
  const index_t slices = cluster_slices<SL, G>(dvn);
  const index_t slice = index_t(blockIdx.x) % slices;
  const index_t segment = index_t(blockIdx.x) / slices % p.segments;
  const index_t nh = index_t(blockIdx.x) / slices / p.segments;
  const bool owns = slice < p.nsv;  // the slices past Dv write no partial sums
  const index_t H = p.H, B = p.B, S = p.S;
  const index_t h = nh % H, n = nh / H;
  const Span at = span_of(p.cu_seqlens, S, nullptr, nullptr, p.N, n);
  const Segment chunks = segment_of<C>(segment, p.segment_chunks, at.length);
  constexpr bool wide = sizeof(A) == 8;
  // kv0, dkv and dkv0 are (Dv x Dk) matrices, contiguous
  const index_t state_stride[4] = {H * dvn * dk, index_t(dvn) * dk, dk, 1};
  A* dq_part = static_cast<A*>(p.dq_part);
  A* dk_part = static_cast<A*>(p.dk_part);
  A* dm_part = static_cast<A*>(p.dm_part);

  const Sequence<T> seq = sequence_of<T>(p, dk, at, h, 1);
  Block<T, W, C, SL, G> block(seq, dk, int(slice) * SL, dvn, p.passes > 1);
  block.begin();
  const Rows<const T> vrows = rows_of(p.v, p.v_stride, at, h);
  const Rows<const T> drows = rows_of(p.dout, p.do_stride, at, h);
  const Rows<T> dvrows = rows_of(p.dv, p.dv_stride, at, h);
  const index_t part_offset = ((slice * B + at.row) * H + h) * S + at.start;
  const Mode forward = p.causal ? Mode::kForward : Mode::kGlobal;
  const Mode reverse = p.causal ? Mode::kReverse : Mode::kGlobal;
  const int c0 = block.c0, cols = block.cols;
  const Smem& sm = block.sm;
  const int lane = lane_id();

  // Sweep 1: o, then δq_i over this slice = Σ_a do_ia o_ia (0 on padded rows).
  auto delta_q = [&](index_t t0, int rows) {
    for (int r = warp_id(); r < rows; r += kWarps) {
      A sum = 0;
      if (sm.real()[r] != A(0)) {
        for (int c = lane; c < cols; c += kWarp) {
          sum += Num<T>::load(drows(t0 + r, c0 + c)) * sm.out()[r * Smem::kLdO + c];
        }
      }
      sum = warp_sum(sum);
      if (lane == 0 && owns) dq_part[part_offset + t0 + r] = sum;
    }
  };

  // Sweep 2: dṽ; dv = w dṽ, δk_j over this slice = Σ_a ṽ_ja dṽ_ja, dm (+0, 0 and nothing on
  // padded rows).
  A dm = 0;  // this warp's rows; summed over the warps in order at the end
  auto values = [&](index_t t0, int rows) {
    for (int r = warp_id(); r < rows; r += kWarps) {
      const bool real = sm.real()[r] != A(0);
      const A w = sm.w()[r];
      A sum = 0;
      for (int c = lane; c < cols; c += kWarp) {
        A dvx = 0;
        if (real) {
          const A g = sm.out()[r * Smem::kLdO + c];
          sum += w * Num<T>::load(vrows(t0 + r, c0 + c)) * g;
          dvx = w * g;
        }
        dvrows.store(t0 + r, c0 + c, Num<T>::store(dvx));
      }
      sum = warp_sum(sum);
      if (lane == 0 && owns && dk_part != nullptr) dk_part[part_offset + t0 + r] = sum;
      if (real) dm -= sum * sm.lnc()[r];
    }
  };

  // One sweep body, run for sweep 1 (when dq_part is wanted) and sweep 2: the roles are chosen
  // at run time, so the sweep is compiled once.
#pragma unroll 1
  for (int sweep = dq_part != nullptr ? 1 : 2; sweep <= 2; ++sweep) {
    const bool first = sweep == 1;
    const void* states = first ? p.kv_states : p.dkv_states;
    block.run(first ? forward : reverse, chunks.first, chunks.last,
              Operand<T>{first ? seq.q : seq.k, dk, first ? Scale::kQuery : Scale::kKey},
              Operand<T>{first ? seq.k : seq.q, dk, first ? Scale::kKey : Scale::kQuery},
              Operand<T>{first ? vrows : drows, dvn, first ? Scale::kValue : Scale::kNone},
              states != nullptr
                  ? segment_state<A>(states, H, p.segments, dvn, dk, n, h, segment, false)
                  : state_of(first ? p.kv0 : p.dkv, state_stride, wide, n, h),
              first || p.segments > 1 ? StateView<void>{}
                                      : state_of(p.dkv0, state_stride, wide, n, h),
              false, false,
              [&](index_t t0, int rows) {
                if (first) {
                  delta_q(t0, rows);
                } else {
                  values(t0, rows);
                }
              });
  }

  if (dm_part != nullptr) {
    A* scratch = block.sm.red();
    if (lane == 0) scratch[warp_id()] = dm;
    __syncthreads();
    if (threadIdx.x == 0 && owns) {
      A total = 0;
      for (int w = 0; w < kWarps; ++w) total += scratch[w];
      dm_part[((n * H + h) * p.nsv + slice) * p.segments + segment] = total;
    }
  }
}

// dq_part, dk_part are null when a block holds all of Dk. The contraction runs over Dv here and
// a block owns a slice of Dk and a segment; nsv is the number of slices of Dv values_kernel used.
template <typename T, int W, int C, int SL, int G>
__global__ void COSATTN_CLUSTER(G) __launch_bounds__(kThreads, Block<T, W, C, SL, G>::kMinBlocks)
    queries_keys_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  using Smem = Shared<T, W, C, SL>;
  const int dkn = int(p.Dk);
  const int dvn = int(p.Dv);
  const index_t slices = cluster_slices<SL, G>(dkn);
  const index_t slice = index_t(blockIdx.x) % slices;
  const index_t segment = index_t(blockIdx.x) / slices % p.segments;
  const index_t nh = index_t(blockIdx.x) / slices / p.segments;
  const index_t H = p.H, B = p.B, S = p.S, nsv = p.nsv;
  const index_t h = nh % H, n = nh / H;
  const Span at = span_of(p.cu_seqlens, S, nullptr, nullptr, p.N, n);
  const Segment chunks = segment_of<C>(segment, p.segment_chunks, at.length);
  constexpr bool wide = sizeof(A) == 8;
  // kv0 and dkv are contiguous (Dv x Dk) matrices, read transposed: Dk x Dv with swapped strides
  const index_t transposed[4] = {H * dvn * dkn, index_t(dvn) * dkn, 1, dkn};
  const A* dq_part = static_cast<const A*>(p.dq_part);
  const A* dk_part = static_cast<const A*>(p.dk_part);

  const Sequence<T> seq = sequence_of<T>(p, dkn, at, h, 1);
  Block<T, W, C, SL, G> block(seq, dvn, int(slice) * SL, dkn, p.passes > 1);
  block.begin();
  const Rows<const T> vrows = rows_of(p.v, p.v_stride, at, h);
  const Rows<const T> drows = rows_of(p.dout, p.do_stride, at, h);
  const index_t part_stride = B * H * S;
  const index_t part_offset = (at.row * H + h) * S + at.start;
  const Mode forward = p.causal ? Mode::kForward : Mode::kGlobal;
  const Mode reverse = p.causal ? Mode::kReverse : Mode::kGlobal;
  const int c0 = block.c0, cols = block.cols;
  const Smem& sm = block.sm;
  const int lane = lane_id();

  // dx = (dx̂ - x̂ (x̂ · dx̂) [|x| > eps]) / max(|x|, eps) on real rows, with x̂ · dx̂ summed over
  // this tile (part null: the block holds all of Dk) or over values_kernel's partials; +0 on
  // padded rows, whose x is not read.
  auto normalise = [&](const Rows<const T> x, const Rows<T> dx, const A* part, const A* den,
                       const A* inv, const A* big, index_t t0, int rows) {
    for (int r = warp_id(); r < rows; r += kWarps) {
      if (sm.real()[r] == A(0)) {
        for (int c = lane; c < cols; c += kWarp) dx.store(t0 + r, c0 + c, Num<T>::store(A(0)));
        continue;
      }
      const A d = den[r], rd = inv[r];  // max(|x|, eps) and its reciprocal
      A inner = 0;
      if (part == nullptr) {
        for (int c = lane; c < cols; c += kWarp) {
          inner += Num<T>::load(x(t0 + r, c0 + c)) / d * sm.out()[r * Smem::kLdO + c];
        }
        inner = warp_sum(inner);
      } else {
        const A* row_part = part + part_offset + t0 + r;
        for (index_t s = 0; s < nsv; ++s) inner += __ldg(row_part + s * part_stride);
      }
      inner *= big[r];
      for (int c = lane; c < cols; c += kWarp) {
        const A xh = Num<T>::load(x(t0 + r, c0 + c)) / d;
        const A g = (sm.out()[r * Smem::kLdO + c] - xh * inner) * rd;
        dx.store(t0 + r, c0 + c, Num<T>::store(g));
      }
    }
  };
  const Rows<T> dqrows = rows_of(p.dq, p.dq_stride, at, h);
  const Rows<T> dkrows = rows_of(p.dk, p.dk_stride, at, h);

  // Sweep 3 (dq̂) and sweep 4 (dk̂): one sweep body with the roles chosen at run time.
#pragma unroll 1
  for (int sweep = 3; sweep <= 4; ++sweep) {
    const bool third = sweep == 3;
    const void* states = third ? p.kv_states : p.dkv_states;
    block.run(third ? forward : reverse, chunks.first, chunks.last,
              Operand<T>{third ? drows : vrows, dvn, third ? Scale::kNone : Scale::kValue},
              Operand<T>{third ? vrows : drows, dvn, third ? Scale::kValue : Scale::kNone},
              Operand<T>{third ? seq.k : seq.q, dkn, third ? Scale::kKey : Scale::kQuery},
              states != nullptr
                  ? segment_state<A>(states, H, p.segments, dvn, dkn, n, h, segment, true)
                  : state_of(third ? p.kv0 : p.dkv, transposed, wide, n, h),
              StateView<void>{}, third,
              !third, [&](index_t t0, int rows) {
                normalise(third ? seq.q : seq.k, third ? dqrows : dkrows,
                          third ? dq_part : dk_part, third ? sm.qden() : sm.kden(),
                          third ? sm.qinv() : sm.kinv(), third ? sm.qbig() : sm.kbig(), t0,
                          rows);
              });
  }
}

// dm_h = sigmoid(m_h)(1 - sigmoid(m_h)) Σ_n Σ_slice Σ_segment dm_part[n, h, slice, segment], in
// that order.
template <typename T>
__global__ void __launch_bounds__(kThreads) dm_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const A* dm_part = static_cast<const A*>(p.dm_part);
  const A* m = static_cast<const A*>(p.m);
  A* dm = static_cast<A*>(p.dm);
  for (index_t h = index_t(blockIdx.x) * kThreads + threadIdx.x; h < p.H;
       h += index_t(gridDim.x) * kThreads) {
    A total = 0;
    for (index_t n = 0; n < p.N; ++n) {
      const index_t parts = p.nsv * p.segments;
      for (index_t s = 0; s < parts; ++s) total += dm_part[(n * p.H + h) * parts + s];
    }
    const A sig = sigmoid(m[h]);
    dm[h] = total * sig * (A(1) - sig);
  }
}

}  // namespace cosattn
