// Host stand-in for the wmma part of mma.h (see emulation.h). A lane's accumulator fragment
// holds its share of the tile, elements lane + 32 e of the row-major tile (loads and stores touch
// only those, as on the GPU); A and B fragments hold whole tiles, row-major. mma_sync computes
// the lane's share in float.
#pragma once

#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K, elements = M * K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N, elements = K * N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N, elements = M * N / 32;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = shape<Use, M, N, K>::elements;
  T x[num_elements];
};

inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ld) {
  using Shape = shape<Use, M, N, K>;
  for (int r = 0; r < Shape::rows; ++r) {
    for (int c = 0; c < Shape::cols; ++c) {
      f.x[r * Shape::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ld + r] : p[r * ld + c];
    }
  }
}

// Element e of a lane's accumulator share: (row, column) of the tile.
inline int share(int e) { return int(emu::lane) + 32 * e; }

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ld,
                      layout_t layout) {
  for (int e = 0; e < f.num_elements; ++e) {
    const int r = share(e) / N, c = share(e) % N;
    f.x[e] = layout == mem_col_major ? p[c * ld + r] : p[r * ld + c];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld,
                       layout_t layout) {
  for (int e = 0; e < f.num_elements; ++e) {
    const int r = share(e) / N, c = share(e) % N;
    (layout == mem_col_major ? p[c * ld + r] : p[r * ld + c]) = f.x[e];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = value;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  for (int e = 0; e < d.num_elements; ++e) {
    const int i = share(e) / N, j = share(e) % N;
    float sum = c.x[e];
    for (int k = 0; k < K; ++k) sum += widen(a.x[i * K + k]) * widen(b.x[k * N + j]);
    d.x[e] = sum;
  }
}

}  // namespace wmma
}  // namespace nvcuda
