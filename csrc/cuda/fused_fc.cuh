// fused_fc: out[N,Dout] = cat(embed[token_ids], hidden, -1) @ weight.T + bias. Contract:
// DESIGN.md ("fused_fc"). Input row n is x_n = [embed[tok[n], 0:D], hidden[n, 0:H]]; weight
// columns 0..D-1 multiply the embedding part and D..D+H-1 the hidden part.
//
// Three kernels (the launcher, fused_fc.cu, picks by N, dtype and alignment):
//   - mma_rows_kernel (N <= 16, float16/bfloat16, 16-byte aligned): streams the weight once
//     through tensor-core mma.sync, fp32 accumulation; the gather and concatenation are never built.
//   - rows_kernel (N <= 16 otherwise: float32, float64, unaligned): the same single weight pass
//     with SIMT fp32 (fp64) FMAs.
//   - gather_kernel (N > 16): writes x = cat(embed[tok], hidden) into a scratch [N, D+H] buffer
//     for a cuBLAS matmul. An interim: a fused tensor-core GEMM would save the scratch round
//     trip (N * (D+H) elements written and read back, ~1/7 of the weight bytes at N = 512).
// Every kernel checks the token ids into the error word (check_tokens) and clamps a bad id.
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

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
  const void* weight;  // [Dout, D+H], last dim contiguous (unused by gather_kernel)
  int64_t weight_stride;
  const void* bias;  // [Dout] or nullptr (unused by gather_kernel)
  void* out;         // [N, Dout] contiguous; gather_kernel: the scratch x [N, D+H], contiguous
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
// N > 16: gather for the matmul. One block per input row (grid-stride over rows), VEC elements per
// access; with VEC > 1 the launcher has checked that D, H, both row strides and both pointers are
// multiples of VEC, so a vector never straddles the embed/hidden boundary.
// ---------------------------------------------------------------------------------------------
constexpr int kGatherThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(const Params p) {
  using V_t = Vec<T, VEC>;
  check_tokens(p);
  const T* embed = static_cast<const T*>(p.embed);
  const T* hidden = static_cast<const T*>(p.hidden);
  T* x = static_cast<T*>(p.out);
  const int64_t K = p.D + p.H;
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const T* e = embed + token_row(p.tok, p.tok64, n, p.V) * p.embed_stride;
    const T* h = hidden + n * p.hidden_stride - p.D;  // h[k] = hidden[n, k - D] for k >= D
    T* dst = x + n * K;
    for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < K; k += kGatherThreads * VEC) {
      const T* src = k < p.D ? e + k : h + k;
      *reinterpret_cast<V_t*>(dst + k) = *reinterpret_cast<const V_t*>(src);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// N <= 16, float32 / float64 / unaligned: SIMT rows kernel. Each warp owns R output rows and NT
// input rows and streams its weight rows once, with VEC-wide (16-byte) loads, against the NT
// input rows, which stay hot in L1 (all the block's warps read the same NT rows). The next step's
// weight vectors are loaded before the current step's FMAs (software pipelining), so two steps
// (2 * R * 512 bytes per warp with VEC = 16 bytes) are in flight while the FMAs run.
// blockIdx.x = input-row tile, blockIdx.y strides over output-row tiles.
// ---------------------------------------------------------------------------------------------
constexpr int kRowsWarps = 4;

// The weight vectors at column k of the warp's R rows; past the segment end (the prefetch after
// the last step) the last vector is re-read instead (an L1 hit, never used), so the load needs no
// branch. len >= VEC.
template <typename T, int VEC, int R>
__device__ __forceinline__ void load_weight_step(Vec<T, VEC> (&w)[R], const T* const (&ws)[R], int64_t k,
                                                 int64_t len) {
  k = min(k, len - VEC);
#pragma unroll
  for (int r = 0; r < R; ++r) w[r] = *reinterpret_cast<const Vec<T, VEC>*>(ws[r] + k);
}

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
  constexpr int64_t kStep = 32 * VEC;

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
      if (len == 0) continue;  // uniform
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

      // len % VEC == 0 and every row start is VEC-aligned (checked by the launcher).
      V_t w[R];
      load_weight_step<T, VEC, R>(w, ws, static_cast<int64_t>(lane) * VEC, len);
      for (int64_t k = static_cast<int64_t>(lane) * VEC; k < len; k += kStep) {
        V_t w_next[R];
        load_weight_step<T, VEC, R>(w_next, ws, k + kStep, len);
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
#pragma unroll
        for (int r = 0; r < R; ++r) w[r] = w_next[r];
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
// N <= 16, float16 / bfloat16: tensor-core rows kernel (mma.sync m16n8k16, fp32 accumulators).
//
// Why not SIMT here: at N tokens each weight element needs N FMAs. Streaming the bf16 weight at
// 4.3 TB/s is 2.15e12 elements/s, i.e. 2.15e12 * N FMA/s, against ~3.3e13 FMA/s of fp32 SIMT
// (67 TFLOP/s): N = 16 needs ~100% of the FMA pipes (and N = 8 half of them, before the bf16 ->
// fp32 conversions), so a SIMT kernel falls off the bandwidth floor from N ~ 8 on. One mma.sync is
// 2048 multiply-adds per warp instruction: the math disappears next to the weight stream at any
// N <= 16, with the same fp32 accumulation (bf16/fp16 products are exact in fp32).
//
// Layout. A = weight rows (M = output rows, K), B = x (K, N = input rows), C = out^T tile. A
// block owns 16 * kMmaTilesM output rows; its kMmaWarps warps split K into 32-element chunks
// (warp w takes chunks w, w + kMmaWarps, ...; together they read 1 KiB of each row contiguously)
// and add their partial tiles in shared memory at the end. In a chunk, lane (g = lane / 4,
// t = lane % 4) loads 16 bytes (8 elements, k = 8t .. 8t+7) of weight rows g and g + 8 of each
// tile and of x row g of each 8-row input tile. The dot product does not care in which order the
// mma's 16 k slots are filled, so each 16-byte vector feeds two mma's directly: registers 0-1 are
// the lane's k slots {2t, 2t+1} and {2t+8, 2t+9} of the first, registers 2-3 of the second; A and
// B use the same lane -> slot map, so products pair up correctly (PTX ISA, "Matrix Fragments for
// mma.m16n8k16": a0,a1: row g, slots 2t+{0,1}; a2,a3: row g+8; a4..a7 the same at slots +8;
// b0,b1: column g, slots 2t+{0,1}; b2,b3: slots +8; c0,c1: row g, columns 2t+{0,1}; c2,c3: row g+8).
//
// Pipelining: the next chunk's weight and x vectors are loaded into registers before the current
// chunk's mma's, so each warp has two chunks in flight: 2 * kMmaTilesM * 16 rows * 64 B = 4 KiB
// of weight, 64 KiB per SM (16 warps), ~7 MiB over the 112 blocks of Dout = 3584, against ~3.4 MiB
// that 4.3 TB/s * ~0.8 us of loaded latency asks for (Little's law).
// x traffic (L2 -> SM): each block reads all of x once (N rows * (D+H)), i.e. N / (16 *
// kMmaTilesM) of the weight bytes: 1/2 at N = 16, 1/4 at N = 8.
// ---------------------------------------------------------------------------------------------
constexpr int kMmaWarps = 16;   // K split inside a block; 512 threads
constexpr int kMmaTilesM = 2;   // 16-row tiles per block: 32 output rows, so x is re-read per 32 rows
constexpr int kMmaChunk = 32;   // k per warp step: 4 lanes x 8 elements
constexpr int kMmaVec = 8;      // elements per 16-byte access

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // never launched: the launcher checks the image's ptxVersion >= 80 (fused_fc.cu)
#endif
}

// One chunk's operands in registers: w[m][h] = weight row 16m + g + 8h, x[j] = input row 8j + g.
template <int NJ> struct MmaChunk {
  uint4 w[kMmaTilesM][2];
  uint4 x[NJ];
};

// Per-lane row pointers of one block, and the chunk loader. Rows past Dout or N are clamped to the
// last valid row (their results are dropped at the store); k >= D + H loads zeros.
template <typename T, int NJ> struct MmaRows {
  const T* w[kMmaTilesM][2];
  const T* xe[NJ];  // embed row of input row 8j + g
  const T* xh[NJ];  // hidden row, shifted by -D: xh[j][k] = hidden[n, k - D]
  int64_t D, K;

  __device__ __forceinline__ MmaRows(const Params& p, int64_t o0, int g) : D(p.D), K(p.D + p.H) {
#pragma unroll
    for (int m = 0; m < kMmaTilesM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t o = min(o0 + 16 * m + 8 * h + g, p.Dout - 1);
        w[m][h] = static_cast<const T*>(p.weight) + o * p.weight_stride;
      }
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int64_t n = min(static_cast<int64_t>(8 * j + g), p.N - 1);
      xe[j] = static_cast<const T*>(p.embed) + token_row(p.tok, p.tok64, n, p.V) * p.embed_stride;
      xh[j] = static_cast<const T*>(p.hidden) + n * p.hidden_stride - p.D;
    }
  }

  // Chunk c, this lane's k = 32c + 8t. D, H multiples of 8: a vector never straddles a segment.
  __device__ __forceinline__ void load(MmaChunk<NJ>& s, int64_t c, int t) const {
    const int64_t k = c * kMmaChunk + kMmaVec * t;
    if (k >= K) {
      s = MmaChunk<NJ>{};  // zeros: the tail chunk's missing columns add nothing
      return;
    }
#pragma unroll
    for (int m = 0; m < kMmaTilesM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) s.w[m][h] = __ldcs(reinterpret_cast<const uint4*>(w[m][h] + k));  // read once
#pragma unroll
    for (int j = 0; j < NJ; ++j) s.x[j] = __ldg(reinterpret_cast<const uint4*>((k < D ? xe[j] : xh[j]) + k));
  }
};

template <typename T, int NJ>
__device__ __forceinline__ void mma_chunk(float (&acc)[kMmaTilesM][NJ][4], const MmaChunk<NJ>& s) {
#pragma unroll
  for (int m = 0; m < kMmaTilesM; ++m)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const uint4 &lo = s.w[m][0], &hi = s.w[m][1], &x = s.x[j];
      mma_16816<T>(acc[m][j], lo.x, hi.x, lo.y, hi.y, x.x, x.y);  // elements 0-3 of each vector
      mma_16816<T>(acc[m][j], lo.z, hi.z, lo.w, hi.w, x.z, x.w);  // elements 4-7
    }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32, 1) mma_rows_kernel(const Params p) {
  constexpr int NJ = NT / 8;
  constexpr int kFrags = kMmaTilesM * NJ * 4;  // accumulator registers per lane
  __shared__ float partial[kMmaWarps][kFrags][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  check_tokens(p);

  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * (16 * kMmaTilesM);
  const MmaRows<T, NJ> rows(p, o0, g);
  const int64_t chunks = (rows.K + kMmaChunk - 1) / kMmaChunk;
  float acc[kMmaTilesM][NJ][4] = {};
  MmaChunk<NJ> cur, next;
  rows.load(cur, warp, t);
  for (int64_t c = warp; c < chunks; c += kMmaWarps) {  // warp-uniform
    if (c + kMmaWarps < chunks) rows.load(next, c + kMmaWarps, t);
    mma_chunk<T, NJ>(acc, cur);
    cur = next;
  }

#pragma unroll
  for (int m = 0; m < kMmaTilesM; ++m)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][(m * NJ + j) * 4 + r][lane] = acc[m][j][r];
  __syncthreads();

  // One output per thread: fragment register f of lane l, summed over the warps.
  const int f = threadIdx.x >> 5, l = lane;
  if (f >= kFrags) return;
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kMmaWarps; ++w) s += partial[w][f][l];
  const int m = f / (NJ * 4), j = (f / 4) % NJ, r = f % 4;
  const int64_t o = o0 + 16 * m + (l >> 2) + (r >= 2 ? 8 : 0);
  const int64_t n = 8 * j + 2 * (l & 3) + (r & 1);
  if (o >= p.Dout || n >= p.N) return;
  if (p.bias != nullptr) s += to_acc(static_cast<const T*>(p.bias)[o]);
  static_cast<T*>(p.out)[n * p.Dout + o] = from_acc<T>(s);
}

}  // namespace fused_fc
}  // namespace sparrow
