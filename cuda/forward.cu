// Cottention forward (docs/spec.md, "Forward"): o = the forward sweep with Q = q̂', K = k̂', V = ṽ.
//
// One block per (b, h, slice of SL columns of Dv); the grid is B * H * ceil(Dv / SL) blocks of
// kThreads threads, with the dynamic shared memory of Shared<T, C, SL> for DqP = Dk rounded up
// to 16. Causal: one sweep over the chunks from the incoming state kv0 (or zero), the outgoing
// state written to kv_out when it is given. Bidirectional: the global sweep (State = K̂'ᵀ Ṽ first,
// or kv0 when given, with count0 every token's count; then o = Q̂' Stateᵀ). Padded rows of o are
// +0. With o null, only the state (cosattn.absorb): kv0 (or zero) + K̂'ᵀ Ṽ into kv_out, with the
// causal counts (from count0) or the global ones (count0, or the row's own), and q is not read.
#include "common.cuh"

namespace cosattn {

// q, k: (B, H, S, Dk), v, o: (B, H, S, Dv), strided (element strides *_sb, *_sh, *_ss, *_sd);
// o may be null (the state alone).
// m: (H,) or null; mask: (B, S) or null; kv0, kv_out: contiguous (B, H, Dv, Dk) or null;
// count0: (B,) or null. DK, DV: the head sizes when specialised (0: Dk, Dv at run time).
template <typename T, int DK, int DV, int C, int SL>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
    const acc_t<T>* __restrict__ m, const bool* __restrict__ mask,
    const acc_t<T>* __restrict__ kv0, const index_t* __restrict__ count0,
    acc_t<T>* __restrict__ kv_out, index_t B, index_t H, index_t S, index_t Dk, index_t Dv,
    index_t q_sb, index_t q_sh, index_t q_ss, index_t q_sd, index_t k_sb, index_t k_sh,
    index_t k_ss, index_t k_sd, index_t v_sb, index_t v_sh, index_t v_ss, index_t v_sd,
    index_t o_sb, index_t o_sh, index_t o_ss, index_t o_sd, index_t mask_sb, index_t mask_ss,
    acc_t<T> eps, index_t causal) {
  using A = acc_t<T>;
  const int dk = DK > 0 ? DK : int(Dk);
  const int dv = DV > 0 ? DV : int(Dv);
  const index_t slices = (dv + SL - 1) / SL;
  const index_t slice = index_t(blockIdx.x) % slices;
  const index_t bh = index_t(blockIdx.x) / slices;
  const index_t h = bh % H, b = bh / H;

  const Sequence<T> seq = sequence_of<T>(rows_of(q, q_sb, q_sh, q_ss, q_sd, b, h),
                                         rows_of(k, k_sb, k_sh, k_ss, k_sd, b, h), dk, S, mask,
                                         mask_sb, mask_ss, count0, m, eps, b, h);

  Block<T, DK, C, SL> block(seq, dk, int(slice) * SL, dv);
  block.begin();
  const Operand<T> Q{seq.q, dk, Scale::kQuery};
  const Operand<T> K{seq.k, dk, Scale::kKey};
  const Operand<T> V{rows_of(v, v_sb, v_sh, v_ss, v_sd, b, h), dv, Scale::kValue};
  const index_t state_offset = (b * H + h) * index_t(dv) * dk;
  if (o == nullptr) {
    block.accumulate(causal ? Mode::kForward : Mode::kGlobal, K, V,
                     kv0 == nullptr ? nullptr : kv0 + state_offset, kv_out + state_offset);
    return;
  }
  const Rows<T> out = rows_of(o, o_sb, o_sh, o_ss, o_sd, b, h);

  const int c0 = block.c0, cols = block.cols;
  const A* tile = block.sm.out;
  const A* real = block.sm.real;
  auto write = [&](index_t t0, int rows) {
    for (int idx = int(threadIdx.x); idx < rows * SL; idx += kThreads) {
      const int r = idx / SL, c = idx % SL;
      if (c < cols) {
        const A x = real[r] != A(0) ? tile[r * Shared<T, C, SL>::kLdO + c] : A(0);
        out(t0 + r, c0 + c) = Num<T>::store(x);
      }
    }
  };
  block.run(causal ? Mode::kForward : Mode::kGlobal, Q, K, V,
            kv0 == nullptr ? nullptr : kv0 + state_offset, false,
            kv_out == nullptr ? nullptr : kv_out + state_offset, true, true, write);
}

}  // namespace cosattn
