// fused_fc: out[N,Dout] = cat(embed[token_ids], hidden, -1) @ weight.T + bias, without
// materialising the gather or the concatenation. Contract: DESIGN.md ("fused_fc").
//
// Input row n is x_n = [embed[tok[n], 0:D], hidden[n, 0:H]]; weight columns 0..D-1 multiply the
// embedding part and D..D+H-1 the hidden part, so each kernel walks the two segments one after
// the other with the matching weight column offset.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace fused_fc {

// Element-vector of VEC values loaded as one (up to 16-byte) access.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Row of embed for token n; a bad id (outside [0, V)) reads row 0 instead of faulting (V >= 1 is
// guaranteed by the launcher when N, D > 0); check_tokens reports it.
__device__ __forceinline__ int64_t token_row(const void* tok, bool tok64, int64_t n, int64_t V) {
  const int64_t t = load_index(tok, tok64, n);
  return (t >= 0 && t < V) ? t : 0;
}

struct Params {
  const void* tok;  // [N] int64 or int32
  bool tok64;
  const void* embed;  // [V, D], last dim contiguous
  int64_t embed_stride;
  int64_t V;
  const void* hidden;  // [N, H], last dim contiguous
  int64_t hidden_stride;
  const void* weight;  // [Dout, D+H], last dim contiguous
  int64_t weight_stride;
  const void* bias;  // [Dout] or nullptr
  void* out;         // [N, Dout], contiguous
  int64_t N, D, H, Dout;
  int64_t* error;  // error word, or nullptr (unchecked)
};

// Block (0, 0) checks every token id and records the first bad one (the CPU kernel's choice);
// every block clamps (token_row). N reads for one block, next to the weight stream.
__device__ __forceinline__ void check_tokens(const Params& p) {
  if (p.error == nullptr || blockIdx.x != 0 || blockIdx.y != 0) return;  // block-uniform
  uint64_t key = kNoKey;
  for (int64_t n = threadIdx.x; n < p.N; n += blockDim.x) {
    const int64_t t = load_index(p.tok, p.tok64, n);
    if ((t < 0 || t >= p.V) && static_cast<uint64_t>(n) < key) key = static_cast<uint64_t>(n);
  }
  const uint64_t bad = block_min_key(key);
  if (bad != kNoKey && threadIdx.x == 0) {
    const int64_t n = static_cast<int64_t>(bad);
    record_error(p.error, err::kFusedFcToken, n, load_index(p.tok, p.tok64, n), p.V);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode regime (small N): weight-bandwidth bound. Each warp owns R output rows and NT input rows
// and streams its weight rows once, with VEC-wide (16-byte) loads, against the NT input rows,
// which stay hot in L1 (all the block's warps read the same NT rows). Each weight element loaded
// is used NT times and each input element R times, so L1 traffic stays well under HBM traffic.
// blockIdx.x = input-row tile (fastest, so the blocks sharing weight rows run together and a
// re-read for N > NT hits L2), blockIdx.y strides over output-row tiles.
// ---------------------------------------------------------------------------------------------
constexpr int kRowsWarps = 4;

template <typename T, int VEC, int NT, int R>
__global__ void __launch_bounds__(kRowsWarps * 32) rows_kernel(const Params p) {
  using A = acc_t<T>;
  using V_t = Vec<T, VEC>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* embed = static_cast<const T*>(p.embed);
  const T* hidden = static_cast<const T*>(p.hidden);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  check_tokens(p);

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * NT;
  const int64_t row_tiles = (p.Dout + kRowsWarps * R - 1) / (kRowsWarps * R);

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row0 = (tile * kRowsWarps + warp) * R;
    A acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int n = 0; n < NT; ++n) acc[r][n] = A(0);

    // Out-of-range rows (o >= Dout, n >= N) are clamped to the last valid one so the inner loop
    // has no branch; their sums are computed and dropped at the store.
#pragma unroll
    for (int seg = 0; seg < 2; ++seg) {
      const int64_t len = seg == 0 ? p.D : p.H;
      const int64_t col0 = seg == 0 ? 0 : p.D;
      const T* xs[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int64_t nn = min(n0 + n, p.N - 1);
        xs[n] = seg == 0 ? embed + token_row(p.tok, p.tok64, nn, p.V) * p.embed_stride
                         : hidden + nn * p.hidden_stride;
      }
      const T* ws[R];
#pragma unroll
      for (int r = 0; r < R; ++r) ws[r] = weight + min(row0 + r, p.Dout - 1) * p.weight_stride + col0;

      // len % VEC == 0 and every row start is VEC-aligned (checked by the launcher). Small NT
      // leaves registers to unroll, putting two iterations' loads in flight.
#pragma unroll(NT <= 4 ? 2 : 1)
      for (int64_t k = static_cast<int64_t>(lane) * VEC; k < len; k += 32 * VEC) {
        V_t w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) w[r] = *reinterpret_cast<const V_t*>(ws[r] + k);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const V_t x = *reinterpret_cast<const V_t*>(xs[n] + k);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A xe = to_acc(x.v[e]);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][n] += to_acc(w[r].v[e]) * xe;
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t o = row0 + r;
      const A b = (bias != nullptr && o < p.Dout) ? to_acc(bias[o]) : A(0);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const A s = warp_sum(acc[r][n]);  // all lanes take part: no divergence before this
        if (lane == 0 && o < p.Dout && n0 + n < p.N) out[(n0 + n) * p.Dout + o] = from_acc<T>(s + b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Large N (prefill-like): a plain shared-memory tiled GEMM, 64x64 outputs per block, K in steps
// of 16, 4x4 outputs per thread. Correct for any N, D, H, Dout; each weight tile is reused by 64
// input rows.
// ---------------------------------------------------------------------------------------------
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kTileThreads = 256, kTilePad = 4;

template <typename T>
__device__ __forceinline__ acc_t<T> x_at(const Params& p, int64_t n, int64_t k) {
  // Caller guarantees n < N and k < D + H.
  if (k < p.D) {
    return to_acc(static_cast<const T*>(p.embed)[token_row(p.tok, p.tok64, n, p.V) * p.embed_stride + k]);
  }
  return to_acc(static_cast<const T*>(p.hidden)[n * p.hidden_stride + (k - p.D)]);
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads) tiled_kernel(const Params p) {
  using A = acc_t<T>;
  __shared__ A xs[kTileK][kTileM + kTilePad];  // xs[kk][r] = x[n0 + r, k0 + kk]
  __shared__ A ws[kTileK][kTileN + kTilePad];  // ws[kk][c] = weight[o0 + c, k0 + kk]
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  check_tokens(p);
  const int64_t K = p.D + p.H;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t m_tiles = (p.N + kTileM - 1) / kTileM;

  for (int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {  // uniform per block
    const int64_t n0 = mt * kTileM;
    A acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      // 64 x 16 = 1024 elements per tile, 4 per thread; 16 consecutive threads read 16
      // consecutive k of one row.
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int e = tid + kTileThreads * t;
        const int r = e >> 4, kk = e & 15;
        const int64_t k = k0 + kk;
        const int64_t n = n0 + r, o = o0 + r;
        xs[kk][r] = (n < p.N && k < K) ? x_at<T>(p, n, k) : A(0);
        ws[kk][r] = (o < p.Dout && k < K) ? to_acc(weight[o * p.weight_stride + k]) : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        A a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();  // before the next tile overwrites xs/ws
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = n0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t o = o0 + tx + 16 * j;
        if (n < p.N && o < p.Dout) {
          const A b = bias != nullptr ? to_acc(bias[o]) : A(0);
          out[n * p.Dout + o] = from_acc<T>(acc[i][j] + b);
        }
      }
    }
  }
}

}  // namespace fused_fc
}  // namespace sparrow
