// The recurrent step (docs/spec.md, "The RNN form"), one token per batch row:
//   count += real;  kv += real w(count) v k̂ᵀ;  o = real kv q̂
// step_kernel updates kv in place and writes o; step_count_kernel then adds real to count. The
// count is shared by the H heads of a row, so it changes in a second launch, after every block
// of the first has read it. Neither kernel allocates or synchronises with the host: a decode
// loop of them can be captured in a CUDA graph. The state is read and written once per step,
// 16 bytes per access where its rows are contiguous and aligned (the usual contiguous state),
// one element per access otherwise.
// A padded row (mask false) is skipped, not multiplied by 0: its q, k and v are not read, its o
// is +0, and its kv and count are not written, so they keep their bits (-0.0 + 0.0 would be
// +0.0; docs/spec.md, "Bad input"). A pool's step (docs/spec.md, "A pool of states") finds row
// b's state in the slot state_indices[b] names (Span), in place: a padding entry (-1) reads and
// writes no slot and outputs +0, and a row whose has_initial is false first zeroes its slot's
// rows (and count), masked or not, and steps from there.
#include "common.cuh"

#ifndef COSATTN_STEP_ROWS
#error "compile with the cupy backend's options (_cupy.compile_options: -DCOSATTN_STEP_ROWS=...)"
#endif

namespace cosattn {

constexpr int kStepRows = COSATTN_STEP_ROWS;  // rows of kv per block: _cupy.STEP_ROWS
// Resident blocks per SM step_kernel is compiled for (at most 80 registers a thread): the step
// moves the state once and needs many warps in flight to cover its memory latency.
constexpr int kStepBlocks = 6;

// Entries of a state row moved by one 16-byte access, and the access.
template <typename St>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int n = 4;
  static __device__ __forceinline__ void load(const float* p, float (&x)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&x)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
};
template <>
struct Vec<double> {
  static constexpr int n = 2;
  static __device__ __forceinline__ void load(const double* p, double (&x)[2]) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    x[0] = v.x, x[1] = v.y;
  }
  static __device__ __forceinline__ void store(double* p, const double (&x)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(x[0], x[1]);
  }
};

// kv row a of (b, h) += va k̂, and the lane's share of (kv row) · q̂. d runs over the lane's
// entries, N at a time; N > 1 moves them as one Vec<St>.
template <typename T, typename St, int N>
__device__ __forceinline__ St update_row(St* row, index_t sd, const T* q, index_t q_sd,
                                         const T* k, index_t k_sd, index_t Dk, St va,
                                         St inv_q, St inv_k) {
  St sum = 0;
  for (index_t d0 = index_t(lane_id()) * N; d0 < Dk; d0 += index_t(kWarp) * N) {
    St x[N];
    if constexpr (N > 1) {
      Vec<St>::load(row + d0, x);
    } else {
      x[0] = row[d0 * sd];
    }
    for (int i = 0; i < N; ++i) {
      const St kh = St(Num<T>::load(k[(d0 + i) * k_sd])) * inv_k;
      const St qh = St(Num<T>::load(q[(d0 + i) * q_sd])) * inv_q;
      x[i] += va * kh;
      sum += x[i] * qh;
    }
    if constexpr (N > 1) {
      Vec<St>::store(row + d0, x);
    } else {
      row[d0 * sd] = x[0];
    }
  }
  return sum;
}

// The dynamic shared memory of a step block: the block reductions.
template <typename St>
constexpr size_t kStepShared = kWarps * sizeof(St);

// St: the state's type (the arithmetic is done in it). Grid: B * H * ceil(Dv / kStepRows)
// blocks of kThreads threads with kStepShared<St> bytes of dynamic shared memory.
template <typename T, typename St>
__global__ void __launch_bounds__(kThreads, kStepBlocks) step_kernel(const StepParams<T> p) {
  St* scratch = reinterpret_cast<St*>(dynamic_shared());
  const index_t groups = (p.Dv + kStepRows - 1) / kStepRows;
  const index_t group = index_t(blockIdx.x) % groups;
  const index_t bh = index_t(blockIdx.x) / groups;
  const index_t h = bh % p.H, b = bh / p.H;
  T* o = p.o + b * p.o_stride[0] + h * p.o_stride[1];
  const Span at = span_of(nullptr, 1, p.state_indices, p.has_initial, p.P, b);
  St* kv = static_cast<St*>(p.kv) + (at.padding ? 0 : at.slot * p.kv_stride[0]) +
           h * p.kv_stride[1];
  const index_t sv = p.kv_stride[2], sd = p.kv_stride[3];

  if (!at.padding && !at.from_state) {  // a new request in a used slot: its rows start at zero
    for (int i = warp_id(); i < kStepRows; i += kWarps) {
      const index_t a = group * kStepRows + i;
      if (a >= p.Dv) break;
      for (index_t d = lane_id(); d < p.Dk; d += kWarp) kv[a * sv + d * sd] = St(0);
    }
    __syncthreads();  // the whole block takes this branch; update_row reads the zeros
  }
  const bool real = !at.padding && (p.mask == nullptr || p.mask[b * p.mask_stride]);
  if (!real) {  // the whole block: before any further barrier
    for (int i = int(threadIdx.x); i < kStepRows; i += kThreads) {
      const index_t a = group * kStepRows + i;
      if (a < p.Dv) o[a * p.o_stride[2]] = Num<T>::store(acc_t<T>(0));
    }
    return;
  }

  const T* q = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = p.k + b * p.k_stride[0] + h * p.k_stride[1];
  const index_t q_sd = p.q_stride[2], k_sd = p.k_stride[2];
  St qq = 0, kk = 0;
  for (index_t d = threadIdx.x; d < p.Dk; d += kThreads) {
    const St x = St(Num<T>::load(q[d * q_sd]));
    const St y = St(Num<T>::load(k[d * k_sd]));
    qq += x * x;
    kk += y * y;
  }
  qq = block_sum(qq, scratch);
  kk = block_sum(kk, scratch);
  const St eps = St(p.eps);
  const St inv_q = St(1) / max_(sqrt_(qq), eps);
  const St inv_k = St(1) / max_(sqrt_(kk), eps);
  const acc_t<T>* m = static_cast<const acc_t<T>*>(p.m);
  const index_t before = incoming_count(p.count, p.count_stride, at);
  const St w = m == nullptr ? St(1) : exp_(-St(sigmoid(m[h])) * log_count<St>(before + 1));

  constexpr int N = Vec<St>::n;
  const bool packed = sd == 1 && p.Dk % N == 0 && sv % N == 0 &&
                      reinterpret_cast<unsigned long long>(kv) % 16 == 0;
  const T* v = p.v + b * p.v_stride[0] + h * p.v_stride[1];
  for (int i = warp_id(); i < kStepRows; i += kWarps) {
    const index_t a = group * kStepRows + i;
    if (a >= p.Dv) break;
    const St va = w * St(Num<T>::load(v[a * p.v_stride[2]]));
    St* row = kv + a * sv;
    const St sum = warp_sum(packed ? update_row<T, St, N>(row, sd, q, q_sd, k, k_sd, p.Dk, va,
                                                          inv_q, inv_k)
                                   : update_row<T, St, 1>(row, sd, q, q_sd, k, k_sd, p.Dk, va,
                                                          inv_q, inv_k));
    if (lane_id() == 0) o[a * p.o_stride[2]] = Num<T>::store(acc_t<T>(sum));
  }
}

// count[b] (or the slot's) += 1 where the token is real, after step_kernel; padded rows are not
// written, and padding entries have no count. A row that does not start from its slot sets it
// to 1 or, masked, 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_count_kernel(const StepParams<T> p) {
  const index_t b = index_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= p.B) return;
  const Span at = span_of(nullptr, 1, p.state_indices, p.has_initial, p.P, b);
  if (at.padding) return;
  const bool real = p.mask == nullptr || p.mask[b * p.mask_stride];
  index_t& count = p.count[at.slot * p.count_stride];
  if (!at.from_state) {
    count = real ? 1 : 0;
  } else if (real) {
    count += 1;
  }
}

}  // namespace cosattn
