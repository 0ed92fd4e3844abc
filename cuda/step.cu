// The recurrent step (docs/spec.md, "The RNN form"), one token per batch row:
//   count += real;  kv += real w(count) v k̂ᵀ;  o = real kv q̂
// step_kernel updates kv in place and writes o; step_count_kernel then adds real to count. The
// count is shared by the H heads of a row, so it changes in a second launch, after every block
// of the first has read it. Neither kernel allocates or synchronises with the host: a decode
// loop of them can be captured in a CUDA graph. The state is read and written once per step,
// 16 bytes per access where its rows are contiguous and aligned (the usual contiguous state),
// one element per access otherwise; the lanes of a warp move consecutive pieces of a row
// (coalesced), and a lane has the loads of kInFlight rows in flight before it updates them. The
// block stages q̂ and k̂ in shared memory, kStepPiece columns at a time, for all its rows.
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
// Resident blocks per SM step_kernel is compiled for: the step moves the state once and needs
// many loads in flight to cover its memory latency. 10 blocks (40 warps, at most 48 registers)
// for a float state, 8 (32 warps, 64 registers) for a double one: the most each reaches without
// spilling (at 12 blocks, 40 registers, both spill; a double state at 10 too).
template <typename St>
constexpr int kStepBlocks = sizeof(St) == 4 ? 10 : 8;
// Rows of kv per warp (rows warp_id() + kWarps r of the block's): the lane's entries of q̂ and k̂
// are read once for all of them.
constexpr int kWarpRows = kStepRows / kWarps;
static_assert(kStepRows % kWarps == 0, "every warp updates the same number of rows");
// Rows whose loads a lane issues before it updates them: two of a float state; one of a double
// state, whose two rows in flight would spill within kStepBlocks' registers.
template <typename St>
constexpr int kInFlight = sizeof(St) == 4 && kWarpRows % 2 == 0 ? 2 : 1;

// Entries of a state row moved by one 16-byte access, and the access. The store is __stwb (an
// ordinary write-back store) so that it stays one 128-bit store: written as a float4 assignment,
// the optimiser splits it into four.
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
    __stwb(reinterpret_cast<float4*>(p), make_float4(x[0], x[1], x[2], x[3]));
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
    __stwb(reinterpret_cast<double2*>(p), make_double2(x[0], x[1]));
  }
};

// The warp's rows of kv, the first at row0 and the others `stride` apart (nrows of them, the
// same in every lane), over `width` columns: row += va_r k̂, and the lane's share of row · q̂
// into sum_r, with q̂ and k̂ of those columns in shared memory (qs, ks). The lane takes N
// entries of a row at a time, the 32 lanes of a warp consecutive ones (a row moves in coalesced
// pieces of 32 N entries); N > 1 moves them as one Vec<St> (16 bytes).
template <typename St, int N>
__device__ __forceinline__ void update_rows(St* row0, index_t stride, index_t sd, int nrows,
                                            const St* qs, const St* ks, int width,
                                            const St (&va)[kWarpRows], St (&sum)[kWarpRows]) {
#pragma unroll 1
  for (int d0 = lane_id() * N; d0 < width; d0 += kWarp * N) {
    St qh[N], kh[N];
    if constexpr (N > 1) {
      Vec<St>::load(qs + d0, qh);
      Vec<St>::load(ks + d0, kh);
    } else {
      qh[0] = qs[d0];
      kh[0] = ks[d0];
    }
#pragma unroll
    for (int r0 = 0; r0 < kWarpRows; r0 += kInFlight<St>) {
      St x[kInFlight<St>][N];
#pragma unroll
      for (int j = 0; j < kInFlight<St>; ++j) {
        const int r = r0 + j;
        if (r < nrows) {
          if constexpr (N > 1) {
            Vec<St>::load(row0 + r * stride + d0, x[j]);
          } else {
            x[j][0] = row0[r * stride + d0 * sd];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kInFlight<St>; ++j) {
        const int r = r0 + j;
        if (r < nrows) {
          for (int i = 0; i < N; ++i) {
            x[j][i] += va[r] * kh[i];
            sum[r] += x[j][i] * qh[i];
          }
          if constexpr (N > 1) {
            Vec<St>::store(row0 + r * stride + d0, x[j]);
          } else {
            row0[r * stride + d0 * sd] = x[j][0];
          }
        }
      }
    }
  }
}

// Columns of q̂ and k̂ a step block stages in shared memory at a time.
constexpr int kStepPiece = 256;

// The dynamic shared memory of a step block: the block reductions, then a piece of q̂ and of k̂
// (16-byte aligned).
template <typename St>
struct StepShared {
  static constexpr size_t kQ = (kWarps * sizeof(St) + 15) / 16 * 16;
  static constexpr size_t kK = kQ + kStepPiece * sizeof(St);
  static constexpr size_t kBytes = kK + kStepPiece * sizeof(St);
};
template <typename St>
constexpr size_t kStepShared = StepShared<St>::kBytes;

// St: the state's type (the arithmetic is done in it). Grid: B * H * ceil(Dv / kStepRows)
// blocks of kThreads threads with kStepShared<St> bytes of dynamic shared memory.
template <typename T, typename St>
__global__ void __launch_bounds__(kThreads, kStepBlocks<St>) step_kernel(const StepParams<T> p) {
  St* scratch = reinterpret_cast<St*>(dynamic_shared());
  const index_t groups = (p.Dv + kStepRows - 1) / kStepRows;
  const index_t group = index_t(blockIdx.x) % groups;
  const index_t bh = index_t(blockIdx.x) / groups;
  const index_t h = bh % p.H, b = bh / p.H;
  T* o = p.o + b * p.o_stride[0] + h * p.o_stride[1];
  const Span at = span_of(nullptr, 1, p.state_indices, p.has_initial, p.P, b);
  // The row's state (its slot's in a pool), formed where it is used: a float state's registers
  // are counted for 10 blocks per SM, and a pointer kept through the reductions spills.
  auto state = [&] {
    return static_cast<St*>(p.kv) + (at.padding ? 0 : at.slot * p.kv_stride[0]) +
           h * p.kv_stride[1];
  };
  const index_t before = incoming_count(p.count, p.count_stride, at);

  if (!at.padding && !at.from_state) {  // a new request in a used slot: its rows start at zero
    St* kv = state();
    for (int i = warp_id(); i < kStepRows; i += kWarps) {
      const index_t a = group * kStepRows + i;
      if (a >= p.Dv) break;
      for (index_t d = lane_id(); d < p.Dk; d += kWarp) {
        kv[a * p.kv_stride[2] + d * p.kv_stride[3]] = St(0);
      }
    }
    __syncthreads();  // the whole block takes this branch; update_rows reads the zeros
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
#pragma unroll 1  // one pass for Dk <= kThreads; unrolled, it takes the most registers
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
  const St w = m == nullptr ? St(1) : exp_(-St(sigmoid(m[h])) * log_count<St>(before + 1));

  St* kv = state();
  const index_t sv = p.kv_stride[2], sd = p.kv_stride[3];
  constexpr int N = Vec<St>::n;
  const bool packed = sd == 1 && p.Dk % N == 0 && sv % N == 0 &&
                      reinterpret_cast<unsigned long long>(kv) % 16 == 0;
  const T* v = p.v + b * p.v_stride[0] + h * p.v_stride[1];
  const index_t a0 = group * kStepRows + warp_id();  // the warp's first row
  const index_t left = a0 >= p.Dv ? 0 : (p.Dv - a0 + kWarps - 1) / kWarps;
  const int nrows = left < kWarpRows ? int(left) : kWarpRows;  // the warp's rows below Dv
  St va[kWarpRows], sum[kWarpRows];
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) {
    va[r] = r < nrows ? w * St(Num<T>::load(__ldg(v + (a0 + r * kWarps) * p.v_stride[2]))) : St(0);
    sum[r] = 0;
  }
  St* row0 = kv + a0 * sv;
  St* qs = reinterpret_cast<St*>(dynamic_shared() + StepShared<St>::kQ);
  St* ks = reinterpret_cast<St*>(dynamic_shared() + StepShared<St>::kK);
  const int dk = int(p.Dk);
#pragma unroll 1
  for (int p0 = 0; p0 < dk; p0 += kStepPiece) {
    const int width = dk - p0 < kStepPiece ? dk - p0 : kStepPiece;
    __syncthreads();  // the previous piece is used up
#pragma unroll 1
    for (int d = int(threadIdx.x); d < width; d += kThreads) {
      qs[d] = St(Num<T>::load(__ldg(q + (p0 + d) * q_sd))) * inv_q;
      ks[d] = St(Num<T>::load(__ldg(k + (p0 + d) * k_sd))) * inv_k;
    }
    __syncthreads();
    if (packed) {
      update_rows<St, N>(row0 + p0, kWarps * sv, sd, nrows, qs, ks, width, va, sum);
    } else {
      update_rows<St, 1>(row0 + p0 * sd, kWarps * sv, sd, nrows, qs, ks, width, va, sum);
    }
  }
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) {
    if (r < nrows) {
      const St total = warp_sum(sum[r]);
      if (lane_id() == 0) o[(a0 + r * kWarps) * p.o_stride[2]] = Num<T>::store(acc_t<T>(total));
    }
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
