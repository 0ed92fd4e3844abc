// The recurrent step (docs/spec.md, "The RNN form"), one token per batch row:
//   count += real;  kv += real w(count) v k̂ᵀ;  o = real kv q̂
// step_kernel updates kv in place and writes o; step_count_kernel then adds real to count. The
// count is shared by the H heads of a row, so it changes in a second launch, after every block
// of the first has read it. Neither kernel allocates or synchronises with the host: a decode
// loop of them can be captured in a CUDA graph. The state is read and written once per step.
// A padded row (mask false) is skipped, not multiplied by 0: its q, k and v are not read, its o
// is +0, and its kv and count are not written, so they keep their bits (-0.0 + 0.0 would be
// +0.0; docs/spec.md, "Bad input").
#include "common.cuh"

namespace cosattn {

constexpr int kStepRows = 16;  // rows of kv (entries of Dv) per block

// q, k: (B, H, Dk), v, o: (B, H, Dv) strided (element strides); kv: (B, H, Dv, Dk) strided, of
// the state's type St (the arithmetic is done in St); count: (B,); m: (H,) or null; mask: (B,)
// or null. Grid: B * H * ceil(Dv / kStepRows) blocks; dynamic shared memory: 2 Dk + kWarps St
// values.
template <typename T, typename St>
__global__ void __launch_bounds__(kThreads) step_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
    St* __restrict__ kv, const index_t* __restrict__ count, const acc_t<T>* __restrict__ m,
    const bool* __restrict__ mask, index_t B, index_t H, index_t Dk, index_t Dv, index_t q_sb,
    index_t q_sh, index_t q_sd, index_t k_sb, index_t k_sh, index_t k_sd, index_t v_sb,
    index_t v_sh, index_t v_sd, index_t o_sb, index_t o_sh, index_t o_sd, index_t kv_sb,
    index_t kv_sh, index_t kv_sv, index_t kv_sd, index_t mask_sb, St eps) {
  St* qh = reinterpret_cast<St*>(dynamic_shared());
  St* kh = qh + Dk;
  St* scratch = kh + Dk;

  const index_t groups = (Dv + kStepRows - 1) / kStepRows;
  const index_t group = index_t(blockIdx.x) % groups;
  const index_t bh = index_t(blockIdx.x) / groups;
  const index_t h = bh % H, b = bh / H;

  if (mask != nullptr && !mask[b * mask_sb]) {  // the whole block: before any barrier
    for (int i = int(threadIdx.x); i < kStepRows; i += kThreads) {
      const index_t a = group * kStepRows + i;
      if (a < Dv) o[b * o_sb + h * o_sh + a * o_sd] = Num<T>::store(acc_t<T>(0));
    }
    return;
  }

  St qq = 0, kk = 0;
  for (index_t d = threadIdx.x; d < Dk; d += kThreads) {
    const St x = St(Num<T>::load(q[b * q_sb + h * q_sh + d * q_sd]));
    const St y = St(Num<T>::load(k[b * k_sb + h * k_sh + d * k_sd]));
    qh[d] = x;
    kh[d] = y;
    qq += x * x;
    kk += y * y;
  }
  qq = block_sum(qq, scratch);
  kk = block_sum(kk, scratch);
  const St qden = max_(sqrt_(qq), eps);
  const St kden = max_(sqrt_(kk), eps);
  for (index_t d = threadIdx.x; d < Dk; d += kThreads) {
    qh[d] /= qden;
    kh[d] /= kden;
  }
  __syncthreads();

  const St w = m == nullptr ? St(1) : exp_(-St(sigmoid(m[h])) * log_count<St>(count[b] + 1));

  const int lane = lane_id();
  for (int i = warp_id(); i < kStepRows; i += kWarps) {
    const index_t a = group * kStepRows + i;
    if (a >= Dv) break;
    const St va = w * St(Num<T>::load(v[b * v_sb + h * v_sh + a * v_sd]));
    St* row = kv + b * kv_sb + h * kv_sh + a * kv_sv;
    St sum = 0;
    for (index_t d = lane; d < Dk; d += kWarp) {
      const St x = row[d * kv_sd] + va * kh[d];
      row[d * kv_sd] = x;
      sum += x * qh[d];
    }
    sum = warp_sum(sum);
    if (lane == 0) o[b * o_sb + h * o_sh + a * o_sd] = Num<T>::store(acc_t<T>(sum));
  }
}

// count[b] += 1 where the token is real, after step_kernel; padded rows are not written.
__global__ void __launch_bounds__(kThreads) step_count_kernel(index_t* __restrict__ count,
                                                              const bool* __restrict__ mask,
                                                              index_t B, index_t mask_sb) {
  const index_t b = index_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b < B && (mask == nullptr || mask[b * mask_sb])) count[b] += 1;
}

}  // namespace cosattn
