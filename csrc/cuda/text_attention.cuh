// text_attention: Lq new queries per row attend over a text-only KV cache; the prefix (all of it,
// or its last `window` slots) plus the new block gated by tree_mask (causal without one).
// Contract: DESIGN.md ("text_attention"); ground truth: sparrow/reference.py::text_attention.
//
// Flash-decoding layout. A block owns one (batch row b, kv head) pair, a tile of kRows "query
// rows" and one split of the row's key range. A query row is a (new position i, head g of the
// GQA group) pair, flattened as r = i * group + g, so all heads of a group share every K/V tile
// loaded into shared memory, and any Lq and any group size is covered by tiling r. The keys of a
// row are the contiguous slot range [prefix_start, cache_len): prefix slots are always visible,
// new-block slots (>= prefix_end) are gated per query. Softmax is online in the accumulation type.
// With one split the block writes the normalised output; with several, each split writes its
// unnormalised partial output and (max, sum) and combine_kernel merges them.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace text_attention {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeys = 32;                     // keys per shared-memory tile: one per lane
constexpr int kMaxSplits = 64;                // combine_kernel keeps two split weights per lane

struct Params {
  const void* q;  // [B, Lq, hq, d], last dim contiguous
  int64_t q_sb, q_si, q_sh;
  const void* k;  // [B, L, hkv, d], last dim contiguous
  int64_t k_sb, k_sl, k_sh;
  const void* v;  // [B, L, hkv, d], last dim contiguous
  int64_t v_sb, v_sl, v_sh;
  const void* lens;  // [B] int32 or int64
  bool lens64;
  int64_t lens_s;
  const bool* mask;  // [B, Lq, Lq] or nullptr (causal)
  int64_t m_sb, m_si, m_sm;
  void* out;     // [B, Lq, hq, d] contiguous, T
  void* part_o;  // [splits, B*Lq*hq, d] accumulation type (splits > 1)
  void* part_ml; // [splits, B*Lq*hq, 2]: running max, running sum
  int64_t B, Lq, hq, hkv, d, L, window;
  int group, splits;
  double scale;
  int64_t* error;  // error word, or nullptr (unchecked)
};

// Shared-memory footprint in elements of the accumulation type: Q tile [kRows][d], K tile
// [kKeys][d|1] (odd row stride: lane j reads row j, so an odd stride spreads the 32 rows over
// the 32 banks), V tile [kKeys][d] (read along d, conflict-free as is).
__host__ __device__ inline int64_t k_stride(int64_t d) { return d | 1; }
__host__ __device__ inline int64_t smem_elems(int64_t d) { return kRows * d + kKeys * k_stride(d) + kKeys * d; }

// Row b's cache length; a value outside [Lq, L] is clamped (and reported by check_lens).
__device__ __forceinline__ int64_t row_len(const Params& p, int64_t b) {
  const int64_t n = load_index(p.lens, p.lens64, b * p.lens_s);
  return n < p.Lq ? p.Lq : (n > p.L ? p.L : n);
}

// One block checks every row's length and records the first bad one (the CPU kernel's choice).
__device__ __forceinline__ void check_lens(const Params& p) {
  uint64_t key = kNoKey;
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    const int64_t n = load_index(p.lens, p.lens64, b * p.lens_s);
    if ((n < p.Lq || n > p.L) && static_cast<uint64_t>(b) < key) key = static_cast<uint64_t>(b);
  }
  const uint64_t bad = block_min_key(key);
  if (bad != kNoKey && threadIdx.x == 0) {
    const int64_t b = static_cast<int64_t>(bad);
    record_error(p.error, err::kTextAttentionLens, b, load_index(p.lens, p.lens64, b * p.lens_s),
                 err::pack2(p.Lq, p.L));
  }
}

// DT = ceil(d / 32) rounded up to a power of two: lane owns output dims lane + 32 * t, t < DT.
template <typename T, int DT>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const Params p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* qs = reinterpret_cast<A*>(smem_raw);
  A* ks = qs + kRows * p.d;
  A* vs = ks + kKeys * k_stride(p.d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = p.d, ksd = k_stride(d);
  if (p.error != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) check_lens(p);

  const int64_t b = blockIdx.x / p.hkv, kvh = blockIdx.x % p.hkv;
  const int64_t rows_total = p.Lq * p.group;  // query rows of this (b, kv head)
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int split = blockIdx.z;

  const int64_t n = row_len(p, b);
  const int64_t prefix_end = n - p.Lq;
  const int64_t prefix_start = p.window > 0 ? (prefix_end - p.window > 0 ? prefix_end - p.window : 0) : 0;
  // This split's keys: [lo, hi), a multiple of kKeys long except at the end of the row.
  const int64_t total = n - prefix_start;
  const int64_t per_split = ((total + p.splits - 1) / p.splits + kKeys - 1) / kKeys * kKeys;
  const int64_t lo = prefix_start + split * per_split;
  const int64_t hi = lo + per_split < n ? lo + per_split : n;

  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;
  const A scale = static_cast<A>(p.scale);

  // Q tile, pre-scaled; rows past the end are zero and never written out.
  for (int64_t idx = threadIdx.x; idx < kRows * d; idx += blockDim.x) {
    const int64_t r = idx / d, c = idx % d, rg = row0 + r;
    A val = A(0);
    if (rg < rows_total) {
      const int64_t i = rg / p.group, h = kvh * p.group + rg % p.group;
      val = to_acc(qg[b * p.q_sb + i * p.q_si + h * p.q_sh + c]) * scale;
    }
    qs[r * d + c] = val;
  }

  // Per warp: kRowsPerWarp query rows, their position i (or -1 past the end), running max m,
  // running sum l and unnormalised output acc (lane owns dims lane + 32 t).
  int64_t qi[kRowsPerWarp];
  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DT];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t rg = row0 + warp * kRowsPerWarp + rr;
    qi[rr] = rg < rows_total ? rg / p.group : -1;
    m[rr] = neg_inf<A>();
    l[rr] = A(0);
#pragma unroll
    for (int t = 0; t < DT; ++t) acc[rr][t] = A(0);
  }

  for (int64_t j0 = lo; j0 < hi; j0 += kKeys) {
    // K/V tile; slots >= hi are zero-filled and masked below.
    for (int64_t idx = threadIdx.x; idx < kKeys * d; idx += blockDim.x) {
      const int64_t j = idx / d, c = idx % d, slot = j0 + j;
      A kv = A(0), vv = A(0);
      if (slot < hi) {
        kv = to_acc(kg[slot * p.k_sl + c]);
        vv = to_acc(vg[slot * p.v_sl + c]);
      }
      ks[j * ksd + c] = kv;
      vs[j * d + c] = vv;
    }
    __syncthreads();  // tile (and, on the first pass, the Q tile) complete

    // Scores: lane = key. One K element feeds the warp's kRowsPerWarp rows.
    A s[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = A(0);
    const A* krow = ks + lane * ksd;
    const A* q0 = qs + static_cast<int64_t>(warp * kRowsPerWarp) * d;
    for (int64_t c = 0; c < d; ++c) {
      const A kc = krow[c];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] += q0[rr * d + c] * kc;
    }

    const int64_t slot = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      if (qi[rr] < 0) continue;  // warp-uniform
      bool allowed = slot < hi;
      if (allowed && slot >= prefix_end) {  // new block: tree mask, or causal
        const int64_t mm = slot - prefix_end;
        allowed = p.mask != nullptr ? p.mask[b * p.m_sb + qi[rr] * p.m_si + mm * p.m_sm] : mm <= qi[rr];
      }
      const A sc = allowed ? s[rr] : neg_inf<A>();
      const A mc = warp_max(sc);
      if (mc == neg_inf<A>()) continue;  // warp-uniform: nothing visible in this tile
      const A m_new = m[rr] > mc ? m[rr] : mc;
      const A corr = exp_acc(m[rr] - m_new);  // m = -inf on the first visible tile: corr = 0
      const A pj = allowed ? exp_acc(sc - m_new) : A(0);
      l[rr] = l[rr] * corr + warp_sum(pj);
      m[rr] = m_new;
#pragma unroll
      for (int t = 0; t < DT; ++t) acc[rr][t] *= corr;
#pragma unroll 8
      for (int jj = 0; jj < kKeys; ++jj) {
        const A pk = __shfl_sync(0xffffffffu, pj, jj);
#pragma unroll
        for (int t = 0; t < DT; ++t) {
          const int64_t c = lane + 32 * t;
          if (c < d) acc[rr][t] += pk * vs[jj * d + c];
        }
      }
    }
    __syncthreads();  // every warp done with this tile before it is overwritten
  }

  const int64_t rows_all = p.B * p.Lq * p.hq;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    if (qi[rr] < 0) continue;
    const int64_t rg = row0 + warp * kRowsPerWarp + rr;
    const int64_t h = kvh * p.group + rg % p.group;
    const int64_t orow = (b * p.Lq + qi[rr]) * p.hq + h;  // row of the [B*Lq*hq, d] output
    if (p.splits == 1) {
      T* o = static_cast<T*>(p.out) + orow * d;
      const A inv = l[rr] > A(0) ? A(1) / l[rr] : A(0);  // sees nothing: zeros
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < d) o[c] = from_acc<T>(acc[rr][t] * inv);
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * rows_all + orow;
      A* o = static_cast<A*>(p.part_o) + prow * d;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < d) o[c] = acc[rr][t];
      }
      if (lane == 0) {
        static_cast<A*>(p.part_ml)[prow * 2] = m[rr];
        static_cast<A*>(p.part_ml)[prow * 2 + 1] = l[rr];
      }
    }
  }
}

// Merges the splits of each output row (one warp per row): weights exp(m_s - M) over the splits
// that saw anything, normalised by their combined sum. Every split wrote every row it owns, an
// empty split with m = -inf and l = 0.
template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const Params p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t rows_all = p.B * p.Lq * p.hq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows_all) return;  // whole warp leaves together
  const A* ml = static_cast<const A*>(p.part_ml);
  const A* po = static_cast<const A*>(p.part_o);
  const int S = p.splits;

  const A m0 = lane < S ? ml[(static_cast<int64_t>(lane) * rows_all + row) * 2] : neg_inf<A>();
  const A m1 = lane + 32 < S ? ml[(static_cast<int64_t>(lane + 32) * rows_all + row) * 2] : neg_inf<A>();
  const A M = warp_max(m0 > m1 ? m0 : m1);
  T* o = static_cast<T*>(p.out) + row * p.d;
  if (M == neg_inf<A>()) {  // no split saw a key: zeros
    for (int64_t c = lane; c < p.d; c += 32) o[c] = from_acc<T>(A(0));
    return;
  }
  const A w0 = m0 == neg_inf<A>() ? A(0) : exp_acc(m0 - M);
  const A w1 = m1 == neg_inf<A>() ? A(0) : exp_acc(m1 - M);
  const A l0 = lane < S ? ml[(static_cast<int64_t>(lane) * rows_all + row) * 2 + 1] : A(0);
  const A l1 = lane + 32 < S ? ml[(static_cast<int64_t>(lane + 32) * rows_all + row) * 2 + 1] : A(0);
  const A total = warp_sum(w0 * l0 + w1 * l1);
  const A inv = total > A(0) ? A(1) / total : A(0);
  // c0 advances uniformly so every lane reaches each __shfl_sync; only the loads are guarded.
  for (int64_t c0 = 0; c0 < p.d; c0 += 32) {
    const int64_t c = c0 + lane;
    A sum = A(0);
    for (int s = 0; s < S; ++s) {
      const A w = __shfl_sync(0xffffffffu, s < 32 ? w0 : w1, s & 31);
      if (c < p.d && w != A(0)) sum += w * po[(static_cast<int64_t>(s) * rows_all + row) * p.d + c];
    }
    if (c < p.d) o[c] = from_acc<T>(sum * inv);
  }
}

}  // namespace text_attention
}  // namespace sparrow
