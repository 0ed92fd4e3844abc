// Cottention forward (docs/spec.md, "Forward"): o = the forward sweep with Q = q̂', K = k̂', V = ṽ.
//
// One block per (b, h, slice of SL columns of Dv); the grid is B * H * ceil(Dv / SL) blocks of
// kThreads threads, with Shared<T, W, C, SL>::kBytes of dynamic shared memory. Causal: one sweep
// over the chunks from the incoming state kv0 (or zero), the outgoing state written to kv_out
// when it is given. Bidirectional: the global sweep (State = K̂'ᵀ Ṽ first, or kv0 when given, with
// count0 every token's count; then o = Q̂' Stateᵀ). Padded rows of o are +0. With o null, only the
// state (cosattn.absorb): kv0 (or zero) + K̂'ᵀ Ṽ into kv_out, with the causal counts (from
// count0) or the global ones (count0, or the row's own), and q is not read.
#include "common.cuh"

namespace cosattn {

// W: the tile width, a multiple of 16 at least Dk and Dv; C: the chunk; SL: the slice of Dv.
// p.o may be null (the state alone; p.kv_out is then given).
template <typename T, int W, int C, int SL>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const int dk = int(p.Dk), dv = int(p.Dv);
  const index_t slices = (dv + SL - 1) / SL;
  const index_t slice = index_t(blockIdx.x) % slices;
  const index_t bh = index_t(blockIdx.x) / slices;
  const index_t h = bh % p.H, b = bh / p.H;

  const Sequence<T> seq = sequence_of<T>(p, dk, b, h);
  Block<T, W, C, SL> block(seq, dk, int(slice) * SL, dv);
  block.begin();
  const Operand<T> Q{seq.q, dk, Scale::kQuery};
  const Operand<T> K{seq.k, dk, Scale::kKey};
  const Operand<T> V{rows_of(p.v, p.v_stride, b, h), dv, Scale::kValue};
  const index_t state_offset = (b * p.H + h) * index_t(dv) * dk;
  const A* kv0 = static_cast<const A*>(p.kv0);
  A* kv_out = static_cast<A*>(p.kv_out);
  if (p.o == nullptr) {
    block.accumulate(p.causal ? Mode::kForward : Mode::kGlobal, K, V,
                     kv0 == nullptr ? nullptr : kv0 + state_offset, kv_out + state_offset);
    return;
  }
  const Rows<T> out = rows_of(p.o, p.o_stride, b, h);

  const int c0 = block.c0, cols = block.cols;
  const A* tile = block.sm.out;
  const A* real = block.sm.real;
  auto write = [&](index_t t0, int rows) {
    for (int idx = int(threadIdx.x); idx < rows * SL; idx += kThreads) {
      const int r = idx / SL, c = idx % SL;
      if (c < cols) {
        const A x = real[r] != A(0) ? tile[r * Shared<T, W, C, SL>::kLdO + c] : A(0);
        out(t0 + r, c0 + c) = Num<T>::store(x);
      }
    }
  };
  block.run(p.causal ? Mode::kForward : Mode::kGlobal, Q, K, V,
            kv0 == nullptr ? nullptr : kv0 + state_offset, false,
            kv_out == nullptr ? nullptr : kv_out + state_offset, true, true, write);
}

}  // namespace cosattn
