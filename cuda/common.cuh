// Device code shared by the cosattn kernels (forward.cu, backward.cu, step.cu).
//
// Notation of docs/spec.md: B, H, S, Dk, Dv; q̂ = q / max(|q|, eps); counts c_j; stabiliser
// w_j = max(1, c_j)^(-sigmoid(m_h)); ṽ_j = real_j w_j v_j; a primed vector is zero at padded
// positions (q̂'_i = real_i q̂_i, k̂'_j = real_j k̂_j).
//
// Padding holds anything (docs/spec.md, "Bad input"): NaN, Inf or uninitialised memory at a
// padded position of q, k, v or do reaches no result. Padded rows are copied into shared memory
// with the rest of a tile, but never read into a result: their norms are not taken, their tile
// rows are selected to zero when the tile is settled (before any product or 16-bit split), and
// the epilogues write +0 there. Nothing is multiplied by real (NaN * 0 is NaN, 0 * -1 is -0).
//
// These kernels have never run on a GPU: they are checked by the host emulation of
// tests/cuda_host (which makes each asynchronous copy only when its thread waits for it) and by
// their NVRTC machine code for sm_80 and sm_90 (tests/test_nvrtc_compile.py).
//
// Every kernel is made of *sweeps* of the chunked algorithm (docs/design.md). A sweep has three
// operands, Q and K (C x Dq tiles: the contraction runs over Dq) and V (a C x SL tile: this
// block's slice of the output columns), and a state (SL x Dq, fp32; fp64 for double):
//
//   causal forward  (chunks in order):      Out_n = tril(Q_n K_nᵀ) V_n + Q_n Stateᵀ;  State += V_nᵀ K_n
//   causal reverse  (chunks last to first): Out_n = triu(Q_n K_nᵀ) V_n + Q_n Stateᵀ;  State += V_nᵀ K_n
//   global (bidirectional): State = Σ_n V_nᵀ K_n over all chunks (or the given state: the whole
//                           sequence's, when this call holds a part of it), then Out_n = Q_n Stateᵀ
//   the state alone (cosattn.absorb): State += V_nᵀ K_n over the chunks, with the counts of a
//                           forward or a global sweep, and no Out
//
// The forward output is one forward sweep (Q = q̂', K = k̂', V = ṽ); each gradient is the same
// sweep with other roles (see backward.cu). One thread block owns one (b, h, slice), keeps its
// state slice in shared memory and hands each chunk's Out tile to an epilogue.
//
// The chunks stream through shared memory (Block::walk): the block's operand tiles are double
// buffered, and chunk n + 1's raw rows are in flight, by asynchronous copies (cp.async through
// cuda_pipeline_primitives.h: 16-byte LDGSTS for contiguous, 16-byte aligned 16-bit rows, one
// element per copy for float and double at any stride; synchronous element loads for strided or
// unaligned 16-bit rows), while chunk n is computed. Per chunk warp 0 then reads the mask (a
// running count carried by the block gives c_j and the stabiliser w_j), the block waits for
// the chunk's copies (one barrier; in the clusters of 16-bit tiles the blocks of the slices
// then read one another's shares of the Q and K rows: see "clusters"), takes the row norms of
// q and k of the real rows from the tile that holds them (from global memory only where none
// does), and settles the tiles in place: scaled, split, and every entry of a padded row or
// outside the copied rows and columns selected to +0 (one barrier; a warp settles the rows
// whose norms it took). q, k and v are never normalised or copied outside the kernel.
// Products of half and bfloat16 tiles run on tensor cores (wmma, fp32 accumulation); the fp32
// state takes part in them split into a high and a low 16-bit part, scaled by a power of two so
// that float16 cannot overflow.
// The tiles computed in the kernel (q̂', k̂', ṽ and the masked scores) are split the same way,
// and each product takes up to three passes (hi hi + hi lo + lo hi): close to fp32 accuracy.
// docs/spec.md's bounds (2e-3 for float16) leave little room for rounding these to 16 bits: a
// state or dm that is a short sum whose terms cancel would miss them. Inputs taken as they are
// (do) have no low part. The raw variant (the parameter `passes` = 1, cosattn's
// _cupy.variant("raw-qk")) feeds the raw Q and K tiles (exact in 16 bits) to the tensor cores and
// applies their row factors in fp32 outside the products: Q's to the scores and to Q Stateᵀ, K's
// folded into the V tile. Q Kᵀ then takes one pass, Q Stateᵀ and Vᵀ K two, P V three. Rounding
// the scores, V or the state to 16 bits once instead misses the float16 bound on sums whose terms
// cancel (the host emulation finds such cases within a few draws). The GPU check times both
// variants and measures both against the bounds; the loser goes.
// float and double tiles use plain FMA loops. Nothing uses atomics: every reduction has a fixed
// order, so a result is the same bits from run to run.
//
// Every helper is inlined into its kernel (docs/design.md, "Reading the compiled code"): a
// function that is called takes the block's structs through the stack (local memory), and
// pointers it receives lose their address space (generic loads instead of LDS/LDG).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

namespace cosattn {

using index_t = long long;

// Threads per block: the cupy backend owns the number (_cupy.THREADS) and hands it to the
// compiler as a -D option, as it does COSATTN_STEP_ROWS (step.cu).
#ifndef COSATTN_THREADS
#error "compile with the cupy backend's options (_cupy.compile_options: -DCOSATTN_THREADS=...)"
#endif
constexpr int kWarp = 32;
constexpr int kThreads = COSATTN_THREADS;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kAllLanes = 0xffffffffu;
static_assert(kThreads % kWarp == 0 && kWarps <= kWarp, "whole warps, at most 32 of them");

// ---------------------------------------------------------------------------- parameters
//
// One parameter struct per kernel family (as FlashAttention's Flash_fwd_params), passed by
// value. The cupy backend fills each in one place (_cupy._forward_params, _backward_params,
// _step_params) from a NumPy structured dtype with the same layout: every field is 8 bytes
// (pointers, index_t, double, arrays of index_t), so the layout has no padding, and
// tests/test_cuda_emulated.py compares offsetof and sizeof with the dtype. Strides are in
// elements, in the order of the canonical axes (B, H, S, D) or (B, H, D) of a step.

// forward_kernel, scan_kernel and count_kernel (forward.cu): q, k (B, H, S, Dk), v, o (B, H, S,
// Dv) strided; m (H,), mask (B, S): null when absent. The call has N sequences (see Span): the B
// batch rows, or, with cu_seqlens (N+1,), the spans of its one row. kv0 and kv_out (P, H, Dv, Dk),
// strided (kv0_stride, kv_out_stride), of the state's type (double when state_wide, else float),
// and count0, count_out (P,) (count_stride): row n of each for sequence n (P = N), or, with
// state_indices (N,) and has_initial (N,) (or null), the slots of a pool, read and written in
// place (kv0 and kv_out, count0 and count_out are then the same arrays). Causal: kv0, count0 the
// incoming states. Bidirectional (total=, never packed): kv0 the whole sequence's sum, which the
// global sweep takes instead of its own, and count0 its count, every token's c_j. o null: the
// state alone into kv_out (cosattn.absorb), q not read. count_out: the outgoing counts
// (count_kernel), or null. Each sequence is cut into `segments` segments of `segment_chunks`
// chunks; with more than one, segment_states (N, H, segments, Dv, Dk) holds their states, which
// forward_kernel forms when states_only is 1. passes: 3 or 1, the products of 16-bit tiles (see
// above), in the backward too.
template <typename T>
struct ForwardParams {
  const T* q;
  const T* k;
  const T* v;
  T* o;
  const void* m;
  const bool* mask;
  const void* kv0;
  const index_t* count0;
  void* kv_out;
  index_t* count_out;
  void* segment_states;
  const index_t* cu_seqlens;
  const index_t* state_indices;
  const bool* has_initial;
  index_t B, H, S, Dk, Dv, N, P;
  index_t segments, segment_chunks, states_only, reverse, passes, state_wide, count_stride;
  index_t q_stride[4], k_stride[4], v_stride[4], o_stride[4], kv0_stride[4], kv_out_stride[4];
  index_t mask_stride[2];
  double eps;
  index_t causal;
};

// values_kernel, queries_keys_kernel and dm_kernel (see backward.cu): the forward's inputs,
// dout (like o), the gradients dq, dk, dv (like q, k, v), the partial sums dq_part, dk_part
// (nsv, B, H, S) and dm_part (N, H, nsv, segments), and dm (H,). The sequence split: each
// sequence in `segments` segments of segment_chunks chunks, kv_states and dkv_states (N, H,
// segments, Dv, Dk) in the accumulation type holding each segment's incoming state of the
// forward-order and the reverse sweeps (null: without the split, or for a bidirectional call
// given total=). N sequences as ForwardParams (the B rows,
// or the spans of cu_seqlens); kv0, dkv and dkv0 contiguous (N, H, Dv, Dk) in the accumulation
// type, count0 (N,). Causal: dkv the gradient at the outgoing state, dkv0 (or null) the incoming
// state's. Bidirectional (total=): kv0 and count0 as ForwardParams, dkv the gradient at the
// whole sum, dkv0 null.
template <typename T>
struct BackwardParams {
  const T* q;
  const T* k;
  const T* v;
  const T* dout;
  T* dq;
  T* dk;
  T* dv;
  const void* m;
  const bool* mask;
  const void* kv0;
  const index_t* count0;
  const void* dkv;
  void* dkv0;
  void* dq_part;
  void* dk_part;
  void* dm_part;
  void* dm;
  const index_t* cu_seqlens;
  const void* kv_states;
  const void* dkv_states;
  index_t B, H, S, Dk, Dv, N, nsv, passes, segments, segment_chunks;
  index_t q_stride[4], k_stride[4], v_stride[4], do_stride[4], dq_stride[4], dk_stride[4],
      dv_stride[4];
  index_t mask_stride[2];
  double eps;
  index_t causal;
};

// step_kernel and step_count_kernel: q, k (B, H, Dk), v, o (B, H, Dv), kv (P, H, Dv, Dk) of
// the state's type, count (P,), m (H,) or null, mask (B,) or null. Row b steps state b (P = B),
// or, with state_indices (B,) and has_initial (B,) (or null), the pool slot it names (see Span).
template <typename T>
struct StepParams {
  const T* q;
  const T* k;
  const T* v;
  T* o;
  void* kv;
  index_t* count;
  const void* m;
  const bool* mask;
  const index_t* state_indices;
  const bool* has_initial;
  index_t B, H, Dk, Dv, P;
  index_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], kv_stride[4];
  index_t mask_stride, count_stride;
  double eps;
};

// ------------------------------------------------------------------------------------ numbers

// Num<T>: the accumulation type of inputs of type T, whether their tiles go to tensor cores,
// and the conversions between T and the accumulation type.
template <typename T>
struct Num;

template <>
struct Num<__half> {
  using acc = float;
  static constexpr bool mma = true;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static constexpr bool mma = true;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Num<float> {
  using acc = float;
  static constexpr bool mma = false;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Num<double> {
  using acc = double;
  static constexpr bool mma = false;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};

template <typename T>
using acc_t = typename Num<T>::acc;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }

// w = max(1, c)^(-sig) written through its logarithm ln max(1, c), which dm needs as well.
template <typename A>
__device__ __forceinline__ A log_count(index_t c) {
  return log_(A(c > 1 ? c : 1));
}

template <typename A>
__device__ __forceinline__ A sigmoid(A x) {
  return A(1) / (A(1) + exp_(-x));
}

// ------------------------------------------------------------------------------ reductions

__device__ __forceinline__ int lane_id() { return int(threadIdx.x) % kWarp; }
__device__ __forceinline__ int warp_id() { return int(threadIdx.x) / kWarp; }

// Butterfly sum over the 32 lanes: every lane gets the same value, in a fixed order.
template <typename X>
__device__ __forceinline__ X warp_sum(X x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kAllLanes, x, offset);
  return x;
}

template <typename X>
__device__ __forceinline__ X warp_max(X x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x = max_(x, __shfl_xor_sync(kAllLanes, x, offset));
  }
  return x;
}

// Sum over the block (every thread must call it); `scratch` holds kWarps values.
template <typename X>
__device__ __forceinline__ X block_sum(X x, X* scratch) {
  x = warp_sum(x);
  if (lane_id() == 0) scratch[warp_id()] = x;
  __syncthreads();
  X total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <typename X>
__device__ __forceinline__ X block_max(X x, X* scratch) {
  x = warp_max(x);
  if (lane_id() == 0) scratch[warp_id()] = x;
  __syncthreads();
  X total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = max_(total, scratch[w]);
  __syncthreads();
  return total;
}

// -------------------------------------------------------------------------------- clusters

// The blocks of the slices of one (sequence, h, segment) of a sweep kernel (the forward's and
// the backward's, with 16-bit tiles) form a thread-block cluster on sm_90 and share their Q and
// K tiles (Block::walk): each fetches a share of a chunk's rows from global memory and reads the
// others' shares from their shared memory (distributed shared memory), so the Q and K operands
// leave global memory once per (b, h, chunk).
// Compiled for sm_80, which has no clusters, a block fetches whole tiles (kClusters false, and
// the functions below are never called). The host emulation runs the blocks of a cluster
// together, each with its own shared memory (tests/cuda_host/launch.h).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kClusters = false;
#define COSATTN_CLUSTER(g)
#elif defined(__CUDA_ARCH__)
constexpr bool kClusters = true;
#define COSATTN_CLUSTER(g) __cluster_dims__(g, 1, 1)
#else
constexpr bool kClusters = true;
#define COSATTN_CLUSTER(g)
#endif

// The blocks per (sequence, h, segment) of a sweep over D columns of output: one per slice of
// SL columns, rounded up to whole clusters of G (those past D own no columns: cols is 0).
template <int SL, int G>
__device__ __forceinline__ index_t cluster_slices(index_t D) {
  return ((D + SL - 1) / SL + G - 1) / G * G;
}

// The two halves of a cluster barrier (every thread of every block of the cluster takes both):
// the arrival publishes this thread's writes to shared memory (release), the wait returns once
// every thread has arrived and makes their writes visible (acquire). A barrier of the cluster is
// one of each of its blocks too.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#elif !defined(__CUDA_ARCH__)
  emu::cluster_arrive();
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#elif !defined(__CUDA_ARCH__)
  emu::cluster_wait();
#endif
}

__device__ __forceinline__ unsigned char* dynamic_shared() {
  extern __shared__ __align__(128) unsigned char cosattn_shared[];
  return cosattn_shared;
}

// The dynamic shared memory of the cluster's block `rank`, read 16 bytes at a time at byte
// offsets from its start (16-byte aligned). On sm_90 its address in the cluster's shared
// window (mapa), to which an offset is added; in the emulation the rank.
struct PeerShared {
  unsigned address;

  __device__ __forceinline__ explicit PeerShared(unsigned rank) : address(rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned local = unsigned(__cvta_generic_to_shared(dynamic_shared()));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(address) : "r"(local), "r"(rank));
#endif
  }
  __device__ __forceinline__ uint4 load(unsigned offset) const {
    uint4 v{};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(address + offset)
                 : "memory");
#elif !defined(__CUDA_ARCH__)
    memcpy(&v, emu::peer(dynamic_shared() + offset, address), sizeof(v));
#endif
    return v;
  }
};

// ---------------------------------------------------------------------------- global views

// The (S, D) matrix of one (b, h) of a strided (B, H, S, D) array: element (s, d) is at
// ptr[s * ss + d * sd]. Strides are in elements and may be anything (bshd views, negative).
// Outputs are written through store(), inputs read through operator() (Rows<const T>).
template <typename T>
struct Rows {
  T* ptr;
  index_t ss, sd;
  __device__ __forceinline__ T* at(index_t s, index_t d) const { return ptr + s * ss + d * sd; }
  // An output element, written once and not read again: a streaming global store (__stcs),
  // which also tells the compiler the address is global.
  __device__ __forceinline__ void store(index_t s, index_t d, T value) const {
    __stcs(at(s, d), value);
  }
};

// The rows of an input: read through the read-only data cache (__ldg), which also tells the
// compiler the data is global, wherever the pointer came from.
template <typename T>
struct Rows<const T> {
  const T* ptr;
  index_t ss, sd;
  __device__ __forceinline__ const T* at(index_t s, index_t d) const {
    return ptr + s * ss + d * sd;
  }
  __device__ __forceinline__ T operator()(index_t s, index_t d) const { return __ldg(at(s, d)); }
};

// Sequence n of a call, and where its state lives (docs/spec.md, "Packed variable-length
// sequences" and "A pool of states"). Unpacked, sequence n is batch row n, all S positions.
// Packed (cu_seqlens given), it is the positions cu_seqlens[n] .. cu_seqlens[n+1]-1 of row 0,
// the offsets clamped into 0..S: unchecked bad offsets give wrong numbers, never an access
// outside the arrays. Its state is row n of the state arrays, or, in a pool (state_indices
// given), slot state_indices[n]: a slot outside 0..P-1 (-1) marks a padding entry, which reads
// and writes no state, and where has_initial[n] is false the sequence starts from zero without
// reading its slot. The kernels read these on the device: no launch waits for the host to learn
// a length.
struct Span {
  index_t row, start, length, slot;
  bool padding, from_state;
};

__device__ __forceinline__ Span span_of(const index_t* cu_seqlens, index_t S,
                                        const index_t* state_indices, const bool* has_initial,
                                        index_t P, index_t n) {
  Span at{n, 0, S, n, false, true};
  if (cu_seqlens != nullptr) {
    const index_t a = cu_seqlens[n], e = cu_seqlens[n + 1];
    at.row = 0;
    at.start = a < 0 ? 0 : (a > S ? S : a);
    at.length = (e < at.start ? at.start : (e > S ? S : e)) - at.start;
  }
  if (state_indices != nullptr) {
    at.slot = state_indices[n];
    at.padding = at.slot < 0 || at.slot >= P;
    at.from_state = !at.padding && (has_initial == nullptr || has_initial[n]);
  }
  return at;
}

// The rows of sequence `at`, head h, of a strided (B, H, S, D) array with element strides
// stride[0..3]: row 0 is the sequence's first position.
template <typename T>
__device__ __forceinline__ Rows<T> rows_of(T* base, const index_t* stride, const Span& at,
                                           index_t h) {
  return Rows<T>{base + at.row * stride[0] + h * stride[1] + at.start * stride[2], stride[2],
                 stride[3]};
}

// A Dout x Dq state matrix in global memory: element (r, c) at ptr[r * sr + c * sc], of type
// double when wide, else float, whatever the accumulation type (a float64 state or pool serves
// float32 inputs too). A null ptr stands for a zero state (or no output). V is const void for a
// state that is read, void for one that is written. Each element is read or written once per
// block, through the streaming global accesses (__ldcs, __stcs), which also tell the compiler
// the address is global (not __ldg: a pool's slot is read, then written by the same kernel).
template <typename V>
struct StateView {
  V* ptr = nullptr;
  index_t sr = 0, sc = 0;
  bool wide = false;

  template <typename A>
  __device__ __forceinline__ A get(index_t r, index_t c) const {
    const index_t i = r * sr + c * sc;
    return wide ? A(__ldcs(static_cast<const double*>(ptr) + i))
                : A(__ldcs(static_cast<const float*>(ptr) + i));
  }
  template <typename A>
  __device__ __forceinline__ void set(index_t r, index_t c, A x) const {
    const index_t i = r * sr + c * sc;
    if (wide) {
      __stcs(static_cast<double*>(ptr) + i, double(x));
    } else {
      __stcs(static_cast<float*>(ptr) + i, float(x));
    }
  }
};

__device__ __forceinline__ const void* advance(const void* p, index_t bytes) {
  return static_cast<const char*>(p) + bytes;
}
__device__ __forceinline__ void* advance(void* p, index_t bytes) {
  return static_cast<char*>(p) + bytes;
}

// The (row, h) matrix of a strided (rows, H, Dout, Dq) array of states (null base: none).
template <typename V>
__device__ __forceinline__ StateView<V> state_of(V* base, const index_t* stride, bool wide,
                                                 index_t row, index_t h) {
  if (base == nullptr) return {};
  const index_t offset = row * stride[0] + h * stride[1];
  return {advance(base, offset * (wide ? 8 : 4)), stride[2], stride[3], wide};
}

// The chunks [first, last) of segment g of a sequence of `length` tokens cut into segments of
// segment_chunks chunks of C tokens (the sequence split): empty (first = last = its chunks) past
// its end.
struct Segment {
  index_t first, last;
};

template <int C>
__device__ __forceinline__ Segment segment_of(index_t g, index_t segment_chunks, index_t length) {
  const index_t chunks = (length + C - 1) / C;
  const index_t begin = g * segment_chunks;
  const index_t first = begin < chunks ? begin : chunks;
  return {first, first + segment_chunks < chunks ? first + segment_chunks : chunks};
}

// Segment g's state of sequence n, head h, in a contiguous (N, H, segments, Dv, Dk) array of the
// accumulation type A (null: none), as a Dv x Dk matrix, or read transposed (Dk x Dv).
template <typename A, typename V>
__device__ __forceinline__ StateView<V> segment_state(V* states, index_t H, index_t segments,
                                                      index_t Dv, index_t Dk, index_t n,
                                                      index_t h, index_t g, bool transposed) {
  if (states == nullptr) return {};
  constexpr bool wide = sizeof(A) == 8;
  const index_t offset = ((n * H + h) * segments + g) * Dv * Dk;
  return {advance(states, offset * (wide ? 8 : 4)), transposed ? 1 : Dk, transposed ? Dk : 1,
          wide};
}

// Which row scale a tile takes while it is loaded (padded rows are zero whatever the scale).
enum class Scale { kNone, kQuery, kKey, kValue };  // 1, 1/max(|q|, eps), 1/max(|k|, eps), w

template <typename T>
struct Operand {
  Rows<const T> x;  // (S, D) of this sequence and head
  int D;            // its columns
  Scale scale;
};

// What the prologue reads besides the operands: one sequence and head of the problem.
template <typename T>
struct Sequence {
  Rows<const T> q, k;  // for the row norms
  int Dk;
  index_t S;         // the sequence's length
  const bool* mask;  // the mask at the sequence's first position, or null
  index_t mask_ss;
  index_t n0;        // causal: the incoming count, 0 without a state
  bool total;        // global: n0 is every token's count (the whole sequence's), not its own
  bool has_m;
  acc_t<T> sig;      // sigmoid(m_h)
  acc_t<T> eps;

  __device__ bool real(index_t t) const { return mask == nullptr || mask[t * mask_ss]; }
};

// The mask at sequence `at`'s first position (its entries mask_stride[1] apart), or null.
template <typename P>
__device__ __forceinline__ const bool* mask_of(const P& p, const Span& at) {
  return p.mask == nullptr ? nullptr
                           : p.mask + at.row * p.mask_stride[0] + at.start * p.mask_stride[1];
}

// The count sequence `at` starts from: its row or slot of count0 (entries `stride` apart), 0
// without one or where it starts from zero.
__device__ __forceinline__ index_t incoming_count(const index_t* count0, index_t stride,
                                                  const Span& at) {
  return count0 != nullptr && at.from_state ? count0[at.slot * stride] : 0;
}

// Sequence `at`, head h, of a call whose parameters P (ForwardParams or BackwardParams) hold q,
// k, mask, count0 (its rows strided by `count_stride`), m and eps.
template <typename T, typename P>
__device__ Sequence<T> sequence_of(const P& p, int dk, const Span& at, index_t h,
                                   index_t count_stride) {
  using A = acc_t<T>;
  Sequence<T> seq;
  seq.q = rows_of(p.q, p.q_stride, at, h);
  seq.k = rows_of(p.k, p.k_stride, at, h);
  seq.Dk = dk;
  seq.S = at.length;
  seq.mask = mask_of(p, at);
  seq.mask_ss = p.mask_stride[1];
  seq.n0 = incoming_count(p.count0, count_stride, at);
  seq.total = p.count0 != nullptr;
  seq.has_m = p.m != nullptr;
  seq.sig = p.m == nullptr ? A(0) : sigmoid(static_cast<const A*>(p.m)[h]);
  seq.eps = A(p.eps);
  return seq;
}

// --------------------------------------------------------------------------- shared memory

// The dynamic shared memory of a sweep block for tiles of W columns, carved in this order, each
// piece starting on 128 bytes. kBytes is the total a launch must give: the cupy backend reads it
// back from the built module (the table cosattn_layout, see _cupy.module_text) instead of
// computing it again.
//
// The operand tiles come first, in kStages stages of (Q, K, V): a stage receives one chunk's raw
// rows by asynchronous copies while the block computes on the other stage, and is then settled
// in place into the tiles the products read (Block::fetch, Block::settle). Two stages where
// they fit beside the rest with two blocks per sm_90 SM, one otherwise (float64 at W >= 256).
template <typename T, int W, int C, int SL>
struct Shared {
  using A = acc_t<T>;
  static constexpr bool kMma = Num<T>::mma;
  // Row padding against bank conflicts: wmma needs leading dimensions that are multiples of
  // 16 bytes (which also keeps every 16-bit tile row 16-byte aligned for the asynchronous
  // copies), the FMA loops prefer odd ones.
  static constexpr int kPadT = kMma ? 8 : 1;
  static constexpr int kPadA = kMma ? 4 : 1;
  static constexpr int kLdX = W + kPadT;   // q and k tiles and the 16-bit state parts
  static constexpr int kLdSt = W + kPadA;  // state
  static constexpr int kLdV = SL + kPadT;  // v tile
  static constexpr int kLdS = C + kPadA;   // scores
  static constexpr int kLdO = SL + kPadA;  // out tile
  static constexpr int kLdP = C + kPadT;   // probabilities (masked scores) in T

  static constexpr size_t piece(size_t bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr size_t kTileX = piece(size_t(C) * kLdX * sizeof(T));
  static constexpr size_t kTileV = piece(size_t(C) * kLdV * sizeof(T));
  static constexpr size_t kTileP = kMma ? piece(size_t(C) * kLdP * sizeof(T)) : 0;
  static constexpr size_t kStateX = kMma ? piece(size_t(SL) * kLdX * sizeof(T)) : 0;
  static constexpr size_t kStage = 2 * kTileX + kTileV;  // one stage: Q, K, V
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + kTileX;
  static constexpr size_t kV = kK + kTileX;
  // The other pieces: their sizes, then their offsets after the stages.
  static constexpr size_t kScoresBytes = piece(size_t(C) * kLdS * sizeof(A));
  static constexpr size_t kOutBytes = piece(size_t(C) * kLdO * sizeof(A));
  static constexpr size_t kStateBytes = piece(size_t(SL) * kLdSt * sizeof(A));
  static constexpr size_t kLowBytes = kMma ? 2 * kTileX + kTileV : 0;  // q_lo, k_lo, v_lo
  static constexpr size_t kRowBytes = piece(size_t(9) * C * sizeof(A));
  static constexpr size_t kRedBytes = piece(32 * sizeof(A));
  static constexpr size_t kIntBytes = piece(40 * sizeof(index_t) + 8 * sizeof(A));  // and scalars
  static constexpr size_t kRest = kScoresBytes + kOutBytes + kStateBytes + 2 * kTileP +
                                  2 * kStateX + kLowBytes + kRowBytes + kRedBytes + kIntBytes;
  // Two blocks per sm_90 SM: 228 KiB, less the 1 KiB the system reserves per block.
  static constexpr size_t kTwoBlocks = 228 * 1024 / 2 - 1024;
  static constexpr int kStages = 2 * kStage + kRest <= kTwoBlocks ? 2 : 1;
  static constexpr size_t kScores = kStages * kStage;
  static constexpr size_t kOut = kScores + kScoresBytes;
  static constexpr size_t kState = kOut + kOutBytes;
  static constexpr size_t kP = kState + kStateBytes;
  static constexpr size_t kStateHi = kP + kTileP;
  static constexpr size_t kStateLo = kStateHi + kStateX;
  static constexpr size_t kQLo = kStateLo + kStateX;
  static constexpr size_t kKLo = kQLo + (kMma ? kTileX : 0);
  static constexpr size_t kVLo = kKLo + (kMma ? kTileX : 0);
  static constexpr size_t kPLo = kVLo + (kMma ? kTileV : 0);
  static constexpr size_t kRows = kPLo + kTileP;
  static constexpr size_t kRed = kRows + kRowBytes;
  static constexpr size_t kInts = kRed + kRedBytes;
  static constexpr size_t kScalars = kInts + 40 * sizeof(index_t);
  static constexpr size_t kBytes = kInts + kIntBytes;
  static_assert(kBytes == kStages * kStage + kRest, "the pieces are the stages and the rest");

  // The pieces: addresses known at compile time, relative to the block's shared memory (no
  // pointer is kept in a register; a stage's tiles add the stage times kStage); the 16-bit
  // pieces are null for float and double. The row arrays hold, per row of the chunk: real_r,
  // w_r, ln max(1, c_r), 1 / max(|q_r|, eps), 1 / max(|k_r|, eps), [|q_r| > eps], [|k_r| > eps],
  // max(|q_r|, eps), max(|k_r|, eps).
  template <typename X>
  static __device__ __forceinline__ X* at(size_t offset);

  // The Q, K and V tiles of stage s.
  static __device__ __forceinline__ T* q(int s) { return at<T>(kQ + s * kStage); }
  static __device__ __forceinline__ T* k(int s) { return at<T>(kK + s * kStage); }
  static __device__ __forceinline__ T* v(int s) { return at<T>(kV + s * kStage); }
  static __device__ __forceinline__ T* p() { return kMma ? at<T>(kP) : nullptr; }
  static __device__ __forceinline__ T* state_hi() { return kMma ? at<T>(kStateHi) : nullptr; }
  static __device__ __forceinline__ T* state_lo() { return kMma ? at<T>(kStateLo) : nullptr; }
  static __device__ __forceinline__ T* q_lo() { return kMma ? at<T>(kQLo) : nullptr; }
  static __device__ __forceinline__ T* k_lo() { return kMma ? at<T>(kKLo) : nullptr; }
  static __device__ __forceinline__ T* v_lo() { return kMma ? at<T>(kVLo) : nullptr; }
  static __device__ __forceinline__ T* p_lo() { return kMma ? at<T>(kPLo) : nullptr; }
  static __device__ __forceinline__ A* scores() { return at<A>(kScores); }
  static __device__ __forceinline__ A* out() { return at<A>(kOut); }
  static __device__ __forceinline__ A* state() { return at<A>(kState); }
  static __device__ __forceinline__ A* real() { return at<A>(kRows); }
  static __device__ __forceinline__ A* w() { return at<A>(kRows) + C; }
  static __device__ __forceinline__ A* lnc() { return at<A>(kRows) + 2 * C; }
  static __device__ __forceinline__ A* qinv() { return at<A>(kRows) + 3 * C; }
  static __device__ __forceinline__ A* kinv() { return at<A>(kRows) + 4 * C; }
  static __device__ __forceinline__ A* qbig() { return at<A>(kRows) + 5 * C; }
  static __device__ __forceinline__ A* kbig() { return at<A>(kRows) + 6 * C; }
  static __device__ __forceinline__ A* qden() { return at<A>(kRows) + 7 * C; }
  static __device__ __forceinline__ A* kden() { return at<A>(kRows) + 8 * C; }
  static __device__ __forceinline__ A* red() { return at<A>(kRed); }  // block reductions
  // [0]: 1 / scale of the split state
  static __device__ __forceinline__ A* scalars() { return at<A>(kScalars); }
  // [0]: running count, [1]: real tokens of the sequence, [8..]: reductions
  static __device__ __forceinline__ index_t* ints() { return at<index_t>(kInts); }
};

template <typename T, int W, int C, int SL>
template <typename X>
__device__ __forceinline__ X* Shared<T, W, C, SL>::at(size_t offset) {
  return reinterpret_cast<X*>(dynamic_shared() + offset);
}

// ------------------------------------------------------------------------------- products

template <bool Transposed>
struct Layout {
  using type = nvcuda::wmma::row_major;
};
template <>
struct Layout<true> {
  using type = nvcuda::wmma::col_major;
};

template <typename X, typename Y>
inline constexpr bool kSame = false;
template <typename X>
inline constexpr bool kSame<X, X> = true;

// A 16 x 16 piece of an operand tile in shared memory (at p, leading dimension ld) into a wmma
// fragment. The header loads bfloat16 fragments through generic addresses (LD.E in the machine
// code, where float16 ones get LDSM); the same wmma.load with the .shared state space and a
// shared address fills the fragment the same way and reaches shared memory as shared. The host
// emulation has no PTX: its wmma load stands for both.
template <typename Frag, typename X>
__device__ __forceinline__ void load_tile(Frag& f, const X* p, int ld) {
  nvcuda::wmma::load_matrix_sync(f, p, ld);
}

template <typename Use, typename L>
__device__ __forceinline__ void load_tile(
    nvcuda::wmma::fragment<Use, 16, 16, 16, __nv_bfloat16, L>& f, const __nv_bfloat16* p, int ld) {
#ifdef __CUDA_ARCH__
  static_assert(sizeof(f.x) == 4 * sizeof(unsigned), "a bfloat16 m16n16k16 fragment: 4 registers");
  unsigned* r = reinterpret_cast<unsigned*>(f.x);
  const unsigned at = unsigned(__cvta_generic_to_shared(p));
  constexpr bool kA = kSame<Use, nvcuda::wmma::matrix_a>;
  constexpr bool kRow = kSame<L, nvcuda::wmma::row_major>;
  if constexpr (kA && kRow) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at), "r"(ld) : "memory");
  } else if constexpr (kA) {
    asm volatile("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at), "r"(ld) : "memory");
  } else if constexpr (kRow) {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at), "r"(ld) : "memory");
  } else {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at), "r"(ld) : "memory");
  }
#else
  nvcuda::wmma::load_matrix_sync(f, p, ld);
#endif
}

// c (M x N, row-major, ldc) = alpha * op(a) op(b) (+ c when accumulate), all in shared memory.
// op(a) is M x K: a[m * lda + k], or a[k * lda + m] when AT; op(b) is K x N: b[k * ldb + n], or
// b[n * ldb + k] when BT. On tensor cores, a_lo and b_lo (laid out like a and b, or null) are
// low parts: the product is then a b + a b_lo + a_lo b. M, N, K are multiples of 16. Called by
// the whole block; each output tile belongs to one warp, the same one for every call with the
// same M and N.
template <typename X>
struct Same {  // keeps a parameter out of template argument deduction (nullptr arguments)
  using type = X;
};

template <bool AT, bool BT, typename X, typename A>
__device__ __forceinline__ void gemm(A* c, int ldc, const X* a, const typename Same<X>::type* a_lo,
                                  int lda, const X* b, const typename Same<X>::type* b_lo,
                                  int ldb, int M, int N, int K, A alpha, bool accumulate) {
  if constexpr (Num<X>::mma) {
    using namespace nvcuda;
    using LayoutA = typename Layout<AT>::type;
    using LayoutB = typename Layout<BT>::type;
    const int tiles_n = N / 16;
    const int tiles = (M / 16) * tiles_n;
    for (int t = warp_id(); t < tiles; t += kWarps) {
      const int i0 = t / tiles_n * 16, j0 = t % tiles_n * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> prod, result;
      wmma::fill_fragment(prod, 0.0f);
#pragma unroll 2
      for (int k0 = 0; k0 < K; k0 += 16) {
        const int at = AT ? k0 * lda + i0 : i0 * lda + k0;
        const int bt = BT ? j0 * ldb + k0 : k0 * ldb + j0;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, X, LayoutA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, X, LayoutB> fb;
        load_tile(fa, a + at, lda);
        load_tile(fb, b + bt, ldb);
        wmma::mma_sync(prod, fa, fb, prod);
        if (b_lo != nullptr) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, X, LayoutB> fb_lo;
          load_tile(fb_lo, b_lo + bt, ldb);
          wmma::mma_sync(prod, fa, fb_lo, prod);
        }
        if (a_lo != nullptr) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, X, LayoutA> fa_lo;
          load_tile(fa_lo, a_lo + at, lda);
          wmma::mma_sync(prod, fa_lo, fb, prod);
        }
      }
      float* tile = c + i0 * ldc + j0;
      if (accumulate) {
        wmma::load_matrix_sync(result, tile, ldc, wmma::mem_row_major);
        for (int e = 0; e < result.num_elements; ++e) result.x[e] += alpha * prod.x[e];
      } else {
        for (int e = 0; e < result.num_elements; ++e) result.x[e] = alpha * prod.x[e];
      }
      wmma::store_matrix_sync(tile, result, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = int(threadIdx.x); idx < M * N; idx += kThreads) {
      const int i = idx / N, j = idx % N;
      A sum = 0;
#pragma unroll 8
      for (int kk = 0; kk < K; ++kk) {
        sum += A(a[AT ? kk * lda + i : i * lda + kk]) * A(b[BT ? j * ldb + kk : kk * ldb + j]);
      }
      A& out = c[i * ldc + j];
      out = accumulate ? out + alpha * sum : alpha * sum;
    }
  }
}

// ---------------------------------------------------------------------------------- sweeps

enum class Mode { kForward, kReverse, kGlobal };

// One thread block of a sweep kernel: a sequence (Span) and head, and the output columns
// [c0, c0 + cols) of Dout.
// Its tiles are W columns wide (a multiple of 16, known at compile time); the contraction runs
// over the first Dq <= W of them, the others are zero. G: the blocks of a cluster that share
// their Q and K tiles (see "clusters"; 1: none), blockIdx.x % G being this one's rank.
template <typename T, int W, int C, int SL, int G = 1>
struct Block {
  using A = acc_t<T>;
  using Smem = Shared<T, W, C, SL>;
  static constexpr bool kMma = Num<T>::mma;
  static_assert(C % 16 == 0 && SL % 16 == 0 && W % 16 == 0, "tiles are made of 16 x 16 pieces");
  static_assert(C <= 64, "the count scan gives each lane at most two rows");
  // The blocks that share the Q and K tiles here: G in a cluster, or 1 compiled for sm_80.
  static constexpr int kShare = kClusters ? G : 1;
  static constexpr int kShareRows = C / kShare;  // the rows of a chunk each of them fetches
  static_assert(C % G == 0, "each block of a cluster fetches the same number of rows");
  static_assert(G == 1 || kMma, "clusters share 16-bit tiles, whose rows are 16-byte pieces");
  // Resident blocks per SM the sweep kernels are compiled for (__launch_bounds__): it caps their
  // registers at 65536 / (kMinBlocks kThreads), and keeps ptxas from spilling below that.
  static constexpr int kMinBlocks = 2;

  Smem sm;
  Sequence<T> seq;
  int Dq;  // contraction width
  int c0, Dout, cols;
  // 16-bit products over hi/lo splits of the scaled tiles (split: three passes each), or with
  // the raw Q and K tiles (raw: their row factors applied in fp32 outside the products, K's
  // folded into V; fq, fk: those factors, null for none): one pass for Q Kᵀ, two for Q Stateᵀ
  // and Vᵀ K, three for P V.
  bool split, raw;
  const A* fq = nullptr;
  const A* fk = nullptr;
  bool q_low = false, k_low = false, v_low = false;  // the tiles' low parts are settled
  int stage = 0;  // the stage whose tiles the products read

  __device__ Block(const Sequence<T>& sequence, int dq, int col0, int dout, bool three_pass)
      : seq(sequence),
        split(kMma && three_pass),
        raw(kMma && !three_pass),
        Dq(dq),
        c0(col0),
        Dout(dout),
        cols(dout - col0 < SL ? (dout > col0 ? dout - col0 : 0) : SL) {}

  // Count the real tokens of the sequence (the bidirectional c_j, and where a reverse sweep
  // starts) into sm.ints()[1].
  __device__ __forceinline__ void begin() {
    const index_t n = real_before(seq.S);
    if (threadIdx.x == 0) sm.ints()[1] = n;
    __syncthreads();
  }

  // The real tokens of the sequence before its position t, clamped to 0..S (every thread gets
  // the number; the same t for the whole block). Call after begin().
  __device__ __forceinline__ index_t real_upto(index_t t) {
    return t >= seq.S ? sm.ints()[1] : (t <= 0 ? 0 : real_before(t));
  }

  // The real tokens of the sequence before its position t <= S (every thread gets the number).
  __device__ __forceinline__ index_t real_before(index_t t) {
    if (seq.mask == nullptr) return t;
    index_t n = 0;
    for (index_t i = threadIdx.x; i < t; i += kThreads) n += seq.real(i) ? 1 : 0;
    return block_sum(n, sm.ints() + 8);
  }

  // Warp 0: real_j, c_j, w_j and ln max(1, c_j) for the rows of the chunk at t0, carrying the
  // running count in sm.ints()[0] (the count before the chunk going forward, after it in reverse).
  __device__ __forceinline__ void counts(Mode mode, index_t t0, int rows) {
    constexpr int R = (C + kWarp - 1) / kWarp;
    const int lane = lane_id();
    int flag[R];
    int sum = 0;
    for (int i = 0; i < R; ++i) {
      const int r = lane * R + i;
      int f = 0;
      if (r < rows) f = seq.real(t0 + r) ? 1 : 0;
      flag[i] = f;
      sum += f;
    }
    int inclusive = sum;
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int y = __shfl_up_sync(kAllLanes, inclusive, offset);
      if (lane >= offset) inclusive += y;
    }
    const int total = __shfl_sync(kAllLanes, inclusive, kWarp - 1);
    const index_t running = sm.ints()[0];
    const index_t before = mode == Mode::kReverse ? running - total : running;
    int upto = inclusive - sum;
    for (int i = 0; i < R; ++i) {
      const int r = lane * R + i;
      if (r < C) {
        upto += flag[i];
        const index_t global = seq.total ? seq.n0 : sm.ints()[1];
        const index_t c = mode == Mode::kGlobal ? global : before + upto;
        const A lnc = log_count<A>(c);
        sm.real()[r] = A(flag[i]);
        sm.lnc()[r] = lnc;
        sm.w()[r] = flag[i] == 0 ? A(0) : (seq.has_m ? exp_(-seq.sig * lnc) : A(1));
      }
    }
    __syncwarp();
    if (lane == 0 && mode != Mode::kGlobal) {
      sm.ints()[0] = mode == Mode::kForward ? running + total : before;
    }
  }

  // max(|x_r|, eps), its reciprocal and [|x_r| > eps] for the rows of the chunk, one warp per
  // row (rows warp_id() + kWarps i, as settle() takes them), from the raw rows of x in a stage
  // tile (tile, its rows kLdX apart) or, where no tile holds them, from global memory (x). Tiles
  // are multiplied by the reciprocal; the normalisation backward divides by the first, as
  // docs/spec.md writes it (so that a row of one entry is exactly ±1 there and its gradient
  // exactly 0). Padded rows are not read (their norm could be NaN or Inf): they get eps, 1 / eps
  // and 0, never used. Call after counts() and a barrier.
  __device__ __forceinline__ void norms(const T* tile, const Rows<const T>& x, index_t t0,
                                        int rows, A* den, A* inv, A* big) {
    for (int r = warp_id(); r < C; r += kWarps) {
      A sum = 0;
      if (r < rows && sm.real()[r] != A(0)) {
        if (tile != nullptr) {
          for (int d = lane_id(); d < seq.Dk; d += kWarp) {
            const A e = Num<T>::load(tile[r * Smem::kLdX + d]);
            sum += e * e;
          }
        } else {
          for (int d = lane_id(); d < seq.Dk; d += kWarp) {
            const A e = Num<T>::load(x(t0 + r, d));
            sum += e * e;
          }
        }
      }
      sum = warp_sum(sum);
      if (lane_id() == 0) {
        const A n = sqrt_(sum);
        den[r] = max_(n, seq.eps);
        inv[r] = A(1) / den[r];
        big[r] = n > seq.eps ? A(1) : A(0);
      }
    }
  }

  // Elements of T one copy into a stage moves: 16 bytes for 16-bit tiles (their rows are
  // 16-byte aligned in shared memory), one element for float and double (their rows have an odd
  // length, against bank conflicts in the FMA loops).
  static constexpr int kVec = kMma ? 16 / int(sizeof(T)) : 1;

  // Rows [t0, t0 + rows) and columns [col0, col0 + ncols) of an operand, as they are, into the
  // first Tall rows of a Tall x Width stage tile (ld apart; Tall = C, or a block's share of
  // the rows of a cluster's tile); its other entries keep what they hold, and settle() selects
  // them away. Asynchronous copies (cp.async: LDGSTS, in the group the caller commits)
  // of kVec elements where the rows allow them: for 16-bit tiles contiguous rows, 16-byte
  // aligned, of whole 16-byte pieces; for float and double any strides. Otherwise (strided or
  // unaligned 16-bit rows) synchronous loads element by element.
  template <int Width, int Tall = C>
  __device__ __forceinline__ void fetch(const Operand<T>& op, T* dst, int ld, index_t t0,
                                        int rows, int col0, int ncols) {
    static_assert(Width % kVec == 0, "whole copies per row");
    const Rows<const T>& x = op.x;
    const auto address = reinterpret_cast<unsigned long long>(x.ptr);
    const bool async = kMma ? x.sd == 1 && x.ss % kVec == 0 && col0 % kVec == 0 &&
                                  ncols % kVec == 0 && address % 16 == 0
                            : address % sizeof(T) == 0;
    if (async) {
      constexpr int kPer = Width / kVec;
      for (int idx = int(threadIdx.x); idx < Tall * kPer; idx += kThreads) {
        const int r = idx / kPer, c = idx % kPer * kVec;
        if (r < rows && c < ncols) {
          __pipeline_memcpy_async(dst + r * ld + c, x.at(t0 + r, col0 + c), kVec * sizeof(T));
        }
      }
    } else {
      for (int idx = int(threadIdx.x); idx < Tall * Width; idx += kThreads) {
        const int r = idx / Width, c = idx % Width;
        if (r < rows && c < ncols) dst[r * ld + c] = x(t0 + r, col0 + c);
      }
    }
  }

  // A stage tile, fetched, settled in place for the products: entry (r, c) becomes T(x_rc f1_r
  // f2_r) (a factor null is 1) on the real rows r < rows and columns c < ncols, +0 elsewhere:
  // padded rows and entries fetch() did not copy hold anything and are selected away, never
  // multiplied. With low (and a factor), the rounding error of the scaled value goes there.
  // Each warp takes the rows whose norms it took (norms()), so a __syncwarp separates the two.
  // Returns whether it wrote a low part.
  template <int Width>
  __device__ __forceinline__ bool settle(T* tile, T* low, const A* f1, const A* f2, int ld,
                                         int rows, int ncols) {
    static_assert(C % kWarps == 0, "every warp takes the same number of rows");
    constexpr int kPer = Width / kVec;
    if (f1 == nullptr && f2 == nullptr) low = nullptr;
    for (int j = lane_id(); j < C / kWarps * kPer; j += kWarp) {
      const int r = warp_id() + j / kPer * kWarps, c = j % kPer * kVec;
      const bool real = r < rows && sm.real()[r] != A(0);
      const A f = real ? (f1 == nullptr ? A(1) : f1[r]) * (f2 == nullptr ? A(1) : f2[r]) : A(1);
      T e[kVec], hi[kVec], lo[kVec];
      memcpy(e, tile + r * ld + c, sizeof(e));
      for (int i = 0; i < kVec; ++i) {
        const A value = real && c + i < ncols ? Num<T>::load(e[i]) * f : A(0);
        hi[i] = Num<T>::store(value);
        lo[i] = Num<T>::store(value - Num<T>::load(hi[i]));
      }
      memcpy(tile + r * ld + c, hi, sizeof(hi));
      if (low != nullptr) memcpy(low + r * ld + c, lo, sizeof(lo));
    }
    return low != nullptr;
  }

  // The row factor an operand's scale stands for (null for none).
  __device__ __forceinline__ const A* factor(Scale scale) const {
    return scale == Scale::kQuery ? sm.qinv()
           : scale == Scale::kKey ? sm.kinv()
           : scale == Scale::kValue ? sm.w() : nullptr;
  }

  // Q and K: scaled (three passes: with low parts), or raw (one pass: factors kept for later).
  __device__ __forceinline__ void settle_q(const Operand<T>& op, int rows) {
    fq = raw ? factor(op.scale) : nullptr;
    q_low = settle<W>(sm.q(stage), split ? sm.q_lo() : nullptr,
                      raw ? nullptr : factor(op.scale), nullptr, Smem::kLdX, rows, Dq);
  }
  __device__ __forceinline__ void settle_k(const Operand<T>& op, int rows) {
    fk = raw ? factor(op.scale) : nullptr;
    k_low = settle<W>(sm.k(stage), split ? sm.k_lo() : nullptr,
                      raw ? nullptr : factor(op.scale), nullptr, Smem::kLdX, rows, Dq);
  }
  // V scaled by its factor, and by K's when K is raw (K's factor is per row of V: Σ_j v_j k̂_jᵀ
  // = Σ_j (v_j f_j) k_jᵀ). Call after settle_k.
  __device__ __forceinline__ void settle_v(const Operand<T>& op, int rows) {
    v_low = settle<SL>(sm.v(stage), sm.v_lo(), factor(op.scale), fk, Smem::kLdV, rows, cols);
  }

  // The state slice from a Dout x Dq matrix (a (Dq x Dout) one read transposed is a view with
  // its strides swapped); zero when there is none.
  __device__ __forceinline__ void load_state(const StateView<const void>& state0) {
    for (int idx = int(threadIdx.x); idx < SL * W; idx += kThreads) {
      const int r = idx / W, c = idx % W;
      A x = 0;
      if (state0.ptr != nullptr && r < cols && c < Dq) {
        x = state0.template get<A>(c0 + r, c);
      }
      sm.state()[r * Smem::kLdSt + c] = x;
    }
    __syncthreads();
  }

  __device__ __forceinline__ void store_state(const StateView<void>& out) {
    for (int idx = int(threadIdx.x); idx < cols * Dq; idx += kThreads) {
      const int r = idx / Dq, c = idx % Dq;
      out.set(c0 + r, c, sm.state()[r * Smem::kLdSt + c]);
    }
  }

  // The 16-bit copies of the state the tensor cores read: state * 2^s = hi + lo, with 2^s
  // putting the largest entry just below 2^14; sm.scalars()[0] = 2^-s undoes it.
  __device__ __forceinline__ void split_state() {
    if constexpr (kMma) {
      float big = 0.0f;
      for (int idx = int(threadIdx.x); idx < SL * W; idx += kThreads) {
        big = fmaxf(big, fabsf(sm.state()[idx / W * Smem::kLdSt + idx % W]));
      }
      big = block_max(big, sm.red());
      int e = 0;
      if (big > 0.0f && isfinite(big)) frexpf(big, &e);
      e = e < -100 ? -100 : (e > 100 ? 100 : e);
      const float scale = ldexpf(1.0f, 14 - e);
      if (threadIdx.x == 0) sm.scalars()[0] = ldexpf(1.0f, e - 14);
      for (int idx = int(threadIdx.x); idx < SL * W; idx += kThreads) {
        const int r = idx / W, c = idx % W;
        const float x = sm.state()[r * Smem::kLdSt + c] * scale;
        const T h = Num<T>::store(x);
        sm.state_hi()[r * Smem::kLdX + c] = h;
        sm.state_lo()[r * Smem::kLdX + c] = Num<T>::store(x - Num<T>::load(h));
      }
      __syncthreads();
    }
  }

  // Out = Q Stateᵀ; with raw tiles, each row then times its factor fq.
  __device__ __forceinline__ void inter() {
    if constexpr (kMma) {
      gemm<false, true>(sm.out(), Smem::kLdO, sm.q(stage), low(q_low, sm.q_lo()), Smem::kLdX,
                        sm.state_hi(), sm.state_lo(), Smem::kLdX, C, SL, W, sm.scalars()[0],
                        false);
    } else {
      gemm<false, true>(sm.out(), Smem::kLdO, sm.q(stage), nullptr, Smem::kLdX, sm.state(), nullptr,
                        Smem::kLdSt, C, SL, W, A(1), false);
    }
    __syncthreads();
    if (fq != nullptr) {
      for (int idx = int(threadIdx.x); idx < C * SL; idx += kThreads) {
        const int r = idx / SL, c = idx % SL;
        sm.out()[r * Smem::kLdO + c] *= fq[r];
      }
      __syncthreads();
    }
  }

  // Out += mask(Q Kᵀ) V for the chunk in the tiles, the mask keeping j <= i (forward) or j >= i;
  // with raw tiles the scores are multiplied by fq per row before they are rounded (K's factor
  // is in V).
  __device__ __forceinline__ void intra(Mode mode) {
    gemm<false, true>(sm.scores(), Smem::kLdS, sm.q(stage), low(q_low, sm.q_lo()), Smem::kLdX, sm.k(stage),
                      low(k_low, sm.k_lo()), Smem::kLdX, C, C, W, A(1), false);
    __syncthreads();
    for (int idx = int(threadIdx.x); idx < C * C; idx += kThreads) {
      const int i = idx / C, j = idx % C;
      const bool keep = mode == Mode::kForward ? j <= i : j >= i;
      const A x = keep ? sm.scores()[i * Smem::kLdS + j] * (fq == nullptr ? A(1) : fq[i]) : A(0);
      if constexpr (kMma) {
        const T hi = Num<T>::store(x);
        sm.p()[i * Smem::kLdP + j] = hi;
        sm.p_lo()[i * Smem::kLdP + j] = Num<T>::store(x - Num<T>::load(hi));
      } else {
        sm.scores()[i * Smem::kLdS + j] = x;
      }
    }
    __syncthreads();
    if constexpr (kMma) {
      gemm<false, false>(sm.out(), Smem::kLdO, sm.p(), sm.p_lo(), Smem::kLdP, sm.v(stage),
                         low(v_low, sm.v_lo()), Smem::kLdV, C, SL, C, A(1), true);
    } else {
      gemm<false, false>(sm.out(), Smem::kLdO, sm.scores(), nullptr, Smem::kLdS, sm.v(stage), nullptr,
                         Smem::kLdV, C, SL, C, A(1), true);
    }
    __syncthreads();
  }

  // State += Vᵀ K for the chunk in the tiles.
  __device__ __forceinline__ void absorb() {
    gemm<true, false>(sm.state(), Smem::kLdSt, sm.v(stage), low(v_low, sm.v_lo()), Smem::kLdV, sm.k(stage),
                      low(k_low, sm.k_lo()), Smem::kLdX, SL, W, C, A(1), true);
  }

  static __device__ __forceinline__ const T* low(bool loaded, const T* tile) {
    return loaded ? tile : nullptr;
  }

  // This block's rank among those sharing the tiles (0 without a cluster).
  static __device__ __forceinline__ int share_rank() { return int(blockIdx.x % kShare); }

  // The rows of this stage's Q tile (with_q) and K tile (with_kv) the other blocks of the
  // cluster fetched (rows [g C / G, (g + 1) C / G) for the block of rank g), read from their
  // shared memory 16 bytes at a time into the same place here. Whole rows of W columns: what
  // lies past the sequence's rows or Dq is selected away by settle(), as in a fetched tile.
  __device__ __forceinline__ void gather(bool with_q, bool with_kv) {
    constexpr int kPieces = W * int(sizeof(T)) / 16;  // 16-byte pieces of a row
    const int rank = share_rank();
    const unsigned q = unsigned(Smem::kQ + stage * Smem::kStage);
    const unsigned k = unsigned(Smem::kK + stage * Smem::kStage);
#pragma unroll 1
    for (int other = 1; other < kShare; ++other) {
      const int peer = (rank + other) % kShare;
      const PeerShared from{unsigned(peer)};
      for (int idx = int(threadIdx.x); idx < kShareRows * kPieces; idx += kThreads) {
        const int row = peer * kShareRows + idx / kPieces;
        const unsigned at = unsigned((row * Smem::kLdX + idx % kPieces * kVec) * int(sizeof(T)));
        if (with_q) *reinterpret_cast<uint4*>(dynamic_shared() + q + at) = from.load(q + at);
        if (with_kv) *reinterpret_cast<uint4*>(dynamic_shared() + k + at) = from.load(k + at);
      }
    }
  }

  // The chunks [first, last) in the order of the mode, through the stages: chunk n's tiles (Q
  // with with_q, K and V with with_kv) are fetched while chunk n - 1 is computed (with two
  // stages; with one, at the start of chunk n), then per chunk: counts (warp 0), the wait for
  // the chunk's copies, one barrier (in a cluster: two of the cluster around gather()), the
  // row norms the tiles and the epilogue need (need_q, need_k; from the Q or K tile when it
  // holds q or k, else from global memory), the tiles settled, one barrier, and body(t0, rows),
  // which must end with a barrier (the next fetch writes the other stage, the next counts the
  // row arrays).
  template <typename Body>
  __device__ __forceinline__ void walk(Mode mode, index_t first, index_t last, bool with_q,
                                       bool with_kv, const Operand<T>& Q, const Operand<T>& K,
                                       const Operand<T>& V, bool need_q, bool need_k,
                                       Body&& body) {
    constexpr int kStages = Smem::kStages;
    const index_t chunks = last - first;
    auto start = [&](index_t it) { return (mode == Mode::kReverse ? last - 1 - it : first + it) * C; };
    auto length = [&](index_t t0) { return int(seq.S - t0 < C ? seq.S - t0 : C); };
    // This block's share of the Q and K rows (all of them without a cluster), and its V slice.
    const int r0 = share_rank() * kShareRows;
    auto fetch_chunk = [&](index_t it, int s) {
      const index_t t0 = start(it);
      const int rows = length(t0);
      if (with_q) {
        fetch<W, kShareRows>(Q, sm.q(s) + r0 * Smem::kLdX, Smem::kLdX, t0 + r0, rows - r0, 0,
                             Dq);
      }
      if (with_kv) {
        fetch<W, kShareRows>(K, sm.k(s) + r0 * Smem::kLdX, Smem::kLdX, t0 + r0, rows - r0, 0,
                             Dq);
        fetch<SL>(V, sm.v(s), Smem::kLdV, t0, rows, c0, cols);
      }
      __pipeline_commit();
    };
    // Where the norms of q and k come from: a stage tile holding them, or global memory.
    const bool q_in_q = with_q && Q.scale == Scale::kQuery;
    const bool k_in_q = with_q && Q.scale == Scale::kKey;
    const bool q_in_k = with_kv && K.scale == Scale::kQuery;
    const bool k_in_k = with_kv && K.scale == Scale::kKey;
    auto uses = [&](Scale scale) {
      return (with_q && Q.scale == scale) || (with_kv && (K.scale == scale || V.scale == scale));
    };
    const bool norms_q = need_q || uses(Scale::kQuery), norms_k = need_k || uses(Scale::kKey);
    if (kStages == 2 && chunks > 0) fetch_chunk(0, 0);
    for (index_t it = 0; it < chunks; ++it) {
      stage = kStages == 2 ? int(it % 2) : 0;
      const bool ahead = kStages == 2 && it + 1 < chunks;
      if (ahead) fetch_chunk(it + 1, stage ^ 1);
      if (kStages == 1) fetch_chunk(it, 0);
      const index_t t0 = start(it);
      const int rows = length(t0);
      if (warp_id() == 0) counts(mode, t0, rows);
      if (ahead) {
        __pipeline_wait_prior(1);
      } else {
        __pipeline_wait_prior(0);
      }
      if constexpr (kShare > 1) {
        // Once every block of the cluster holds its share, the others' into this block's
        // tiles; the second barrier keeps a block from settling its tiles in place (or
        // fetching into this stage again) while another still reads its share.
        cluster_arrive();
        cluster_wait();
        gather(with_q, with_kv);
        cluster_arrive();
        cluster_wait();
      } else {
        __syncthreads();
      }
      if (norms_q) {
        norms(q_in_q ? sm.q(stage) : q_in_k ? sm.k(stage) : nullptr, seq.q, t0, rows, sm.qden(),
              sm.qinv(), sm.qbig());
      }
      if (norms_k) {
        norms(k_in_q ? sm.q(stage) : k_in_k ? sm.k(stage) : nullptr, seq.k, t0, rows, sm.kden(),
              sm.kinv(), sm.kbig());
      }
      __syncwarp();
      if (with_q) settle_q(Q, rows);
      if (with_kv) {
        settle_k(K, rows);
        settle_v(V, rows);
      }
      __syncthreads();
      body(t0, rows);
    }
  }

  // One sweep over the chunks [first, last) of the sequence (all of them without the split;
  // a segment with it). The epilogue is called by the whole block as epilogue(t0, rows) once
  // the chunk's Out tile (sm.out(), C x SL: rows < rows and columns < cols are meaningful) and
  // the row arrays of the prologue are ready; it must not write shared memory. The state starts
  // from state0 (see load_state) and, when state_out is given, ends there (Dout x Dq). count is
  // the running count before the first chunk (kForward) or after the last (kReverse).
  // Without outputs a sweep only accumulates the state (the split's states_only pass, and
  // cosattn.absorb): kForward as the causal sweep counts, kGlobal with the bidirectional counts.
  // kGlobal with absorb_first adds Σ_n V_nᵀ K_n over the chunks to state0 (or zero), then (with
  // outputs) applies it; without absorb_first, state0 is already the whole sum (a segment's
  // incoming state, or total=). need_q and need_k say which row norms the epilogue uses (those
  // the operands' scales use are taken anyway).
  template <typename Epilogue>
  __device__ __forceinline__ void run(Mode mode, index_t first, index_t last, index_t count,
                                      bool outputs, bool absorb_first, const Operand<T>& Q,
                                      const Operand<T>& K, const Operand<T>& V,
                                      const StateView<const void>& state0,
                                      const StateView<void>& state_out, bool need_q, bool need_k,
                                      Epilogue&& epilogue) {
    load_state(state0);
    if (threadIdx.x == 0) sm.ints()[0] = count;
    __syncthreads();
    const bool global = mode == Mode::kGlobal;
    if (global && absorb_first) {  // State = Σ_n V_nᵀ K_n first
      walk(mode, first, last, false, true, Q, K, V, false, false, [&](index_t, int) {
        absorb();
        __syncthreads();
      });
    }
    if (outputs) split_state();
    if (outputs || !global) {
      walk(mode, first, last, outputs, !global, Q, K, V, outputs && need_q, outputs && need_k,
           [&](index_t t0, int rows) {
             if (outputs) {
               inter();
               if (!global) intra(mode);
               epilogue(t0, rows);
             }
             if (!global) {
               absorb();
               __syncthreads();
               if (outputs) split_state();
             } else {
               __syncthreads();
             }
           });
    }
    if (state_out.ptr != nullptr) store_state(state_out);
    __syncthreads();
  }

  // The chunks [first, last) of the sequence (all of them, or a segment of the split): the
  // backward's sweeps, with outputs. The running count starts from the incoming count and the
  // real tokens before the first chunk (kForward) or up to the end of the last (kReverse). A
  // global sweep given state0 takes it as the whole sum (total=, or the scan's) and adds
  // nothing to it.
  template <typename Epilogue>
  __device__ __forceinline__ void run(Mode mode, index_t first, index_t last, const Operand<T>& Q,
                                      const Operand<T>& K, const Operand<T>& V,
                                      const StateView<const void>& state0,
                                      const StateView<void>& state_out, bool need_q, bool need_k,
                                      Epilogue&& epilogue) {
    const index_t count = seq.n0 + real_upto((mode == Mode::kReverse ? last : first) * C);
    run(mode, first, last, count, true, state0.ptr == nullptr, Q, K, V, state0, state_out,
        need_q, need_k, epilogue);
  }
};

}  // namespace cosattn
