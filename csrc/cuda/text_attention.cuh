// text_attention: Lq new queries per row attend over a text-only KV cache; the prefix (all of it,
// or its last `window` slots) plus the new block gated by tree_mask (causal without one).
// Contract: DESIGN.md ("text_attention"); ground truth: sparrow/reference.py::text_attention.
//
// Flash-decoding layout. A block owns one (batch row b, kv head) pair, a tile of kRows "query
// rows" and one split of the row's key range. A query row is a (new position i, head g of the
// GQA group) pair, flattened as r = i * group + g, so all heads of a group share every K/V tile
// loaded into shared memory, and any Lq and any group size is covered by tiling r.
//
// Keys. A block visits the prefix slots [prefix_start, prefix_end) and, of the new block, only
// the slots its queries can see: [new_lo, new_hi) relative to prefix_end, m <= i_last causally, or
// the extent of the true entries of its mask rows (as the CPU kernel does). The two ranges are
// numbered as one virtual range t in [0, total), which the splits share evenly, so no split scans
// keys past the block's frontier.
//
// Numerics. Q is pre-scaled by scale * log2(e), so scores are in base 2 and the online softmax
// uses exp2 (one MUFU.EX2 in float32, 2 ulp); the running max, the sums and combine_kernel's
// weights all stay in base 2. The head dim D is a template constant (64, 128, 256); any other
// d <= 256 runs the next larger D with zero padding (kExact = false), so inner loops have
// compile-time bounds and no integer division. K and V tiles are stored in shared memory in
// the element type T (half the bytes of float32, and a plain copy of the cache) and converted
// when read; global loads are 16 bytes wide when the launcher found the caches aligned.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace text_attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeys = 32;                     // keys per shared-memory tile: one per lane
constexpr int kMaxSplits = 64;                // combine_kernel keeps two split weights per lane
constexpr double kLog2e = 1.4426950408889634;

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
  void* part_ml; // [splits, B*Lq*hq, 2]: running max (base 2), running sum
  int64_t B, Lq, hq, hkv, d, L, window;
  int group, splits;
  double score_scale;  // scale * log2(e): scores come out in base 2
  bool vec16;          // K/V rows, strides and pointers allow 16-byte loads
  int64_t* error;      // error word, or nullptr (unchecked)
};

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
// 1 / x rounded to nearest, without the slow-path call (and its stack frame) of a division.
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return __drcp_rn(x); }

// N elements loaded or stored as one access (two for 32 bytes).
template <typename E, int N>
struct alignas(N * sizeof(E) >= 16 ? 16 : N * sizeof(E)) Pack {
  E v[N];
};

// Compile-time shape of one instantiation (element type T, padded head dim D).
template <typename T, int D>
struct Layout {
  using A = acc_t<T>;
  static_assert(D == 64 || D == 128 || D == 256, "head dims: 64, 128, 256");
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));  // one 16-byte load
  static constexpr int kChunks = D / kChunkElems;                       // per K/V row
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  // Lane j reads K row j in 16-byte chunks: a row stride of an odd number of 16-byte units puts
  // the 8 rows of each quarter-warp phase on distinct banks. V is read along d: no padding.
  static constexpr int kKStride = kRowBytes + 16;
  static constexpr int kVStride = kRowBytes;
  // Lane owns kPerLane output dims: kRuns runs of kRun contiguous ones, run u at
  // (u * 32 + lane) * kRun, so each V read of the warp is contiguous (conflict-free).
  static constexpr int kPerLane = D / 32;
  static constexpr int kRun = kPerLane < kChunkElems ? kPerLane : kChunkElems;
  static constexpr int kRuns = kPerLane / kRun;
  static constexpr int kQBytes = kRows * D * static_cast<int>(sizeof(A));
  static constexpr int kKBytes = kKeys * kKStride;
  static constexpr int kVBytes = kKeys * kVStride;
  static constexpr int kPBytes = kRows * kKeys * static_cast<int>(sizeof(A));
  static constexpr int kSmemBytes = kQBytes + kKBytes + kVBytes + kPBytes;
  static_assert(kKeys * kChunks % kThreads == 0, "whole chunks per thread");
  // Blocks per multiprocessor the register allocation must allow (128 registers a thread at 4):
  // 4 for the 16-bit types up to D = 128 (the decode path); the rest hold more state per lane.
  static constexpr int kMinBlocks = sizeof(T) == 2 && D <= 128 ? 4 : 1;
  // Keys per step of the P.V loop: one 16-byte broadcast of each row's probabilities.
  static constexpr int kPStep = 16 / static_cast<int>(sizeof(A));
  __device__ static constexpr int dim(int lane, int run, int e) { return (run * 32 + lane) * kRun + e; }
};

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

// The keys one block visits, numbered t in [0, total): prefix slots first, then new-block
// columns new_lo .. new_hi - 1 (slots prefix_end + column).
struct KeyRange {
  int64_t prefix_start, prefix_count;  // prefix slots [prefix_start, prefix_start + prefix_count)
  int64_t new_shift;                   // slot of new-block key t: t + new_shift
  int new_lo;
  __device__ int64_t slot(int64_t t) const { return t + (t < prefix_count ? prefix_start : new_shift); }
  __device__ int column(int64_t t) const { return static_cast<int>(t - prefix_count) + new_lo; }  // t >= prefix_count
};

// New-block columns [lo, hi) that any query in [i_first, i_last] may see: causal m <= i_last;
// with a mask, the extent of its true entries in those rows. Block-wide (every thread calls it).
__device__ __forceinline__ void new_block_extent(const Params& p, int64_t b, int i_first, int i_last, int& lo,
                                                 int& hi) {
  if (p.mask == nullptr) {
    lo = 0, hi = i_last + 1;
    return;
  }
  __shared__ int s_lo, s_hi;
  if (threadIdx.x == 0) s_lo = static_cast<int>(p.Lq), s_hi = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, Lq = static_cast<int>(p.Lq);
  int my_lo = Lq, my_hi = 0;
  for (int i = i_first + warp; i <= i_last; i += kWarps) {
    const bool* row = p.mask + b * p.m_sb + i * p.m_si;
    for (int m = lane; m < Lq; m += 32)
      if (row[m * p.m_sm]) my_lo = min(my_lo, m), my_hi = max(my_hi, m + 1);
  }
  if (my_hi > 0) atomicMin(&s_lo, my_lo), atomicMax(&s_hi, my_hi);
  __syncthreads();
  lo = s_lo, hi = s_hi;
}

// Q tile [kRows][D] in the accumulation type, pre-scaled into base 2; missing rows and padded
// dims are zero (a zero Q dim makes whatever K holds there irrelevant).
template <typename T, int D, bool kExact>
__device__ __forceinline__ void load_q_tile(const Params& p, int64_t b, int kvh, int row0, acc_t<T>* qs) {
  using A = acc_t<T>;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
  const int rows_total = static_cast<int>(p.Lq) * p.group;
  const A scale = static_cast<A>(p.score_scale);
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D, rg = row0 + r;  // D constant: shifts
    A val = A(0);
    if (rg < rows_total && (kExact || c < p.d)) {
      const int i = rg / p.group, h = kvh * p.group + rg % p.group;  // once per element per block
      val = to_acc(qg[i * p.q_si + h * p.q_sh + c]) * scale;
    }
    qs[idx] = val;
  }
}

// K and V tile of keys t0 .. t0 + kKeys - 1 (of the block's range, < hi) into shared memory as T;
// keys past hi and padded dims are zero. 16-byte loads in batches, so several are in flight.
template <typename T, int D, bool kExact>
__device__ __forceinline__ void load_kv_tile(const Params& p, const T* kg, const T* vg, const KeyRange& keys,
                                             int64_t t0, int64_t hi, unsigned char* ks, unsigned char* vs) {
  using L = Layout<T, D>;
  if (p.vec16) {
    constexpr int kPer = kKeys * L::kChunks / kThreads;  // chunks per thread, per tensor
    constexpr int kBatch = kPer < 4 ? kPer : 4;  // 2 * kBatch loads in flight
#pragma unroll 1  // (unrolled, the addresses of every batch would be live at once)
    for (int it0 = 0; it0 < kPer; it0 += kBatch) {
      uint4 kr[kBatch], vr[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int id = threadIdx.x + (it0 + u) * kThreads;
        const int j = id / L::kChunks, ch = id % L::kChunks;
        const int64_t t = t0 + j;
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
        if (t < hi && (kExact || ch * L::kChunkElems < p.d)) {
          const int64_t slot = keys.slot(t);
          kr[u] = __ldg(reinterpret_cast<const uint4*>(kg + slot * p.k_sl) + ch);
          vr[u] = __ldg(reinterpret_cast<const uint4*>(vg + slot * p.v_sl) + ch);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int id = threadIdx.x + (it0 + u) * kThreads;
        const int j = id / L::kChunks, ch = id % L::kChunks;
        *reinterpret_cast<uint4*>(ks + j * L::kKStride + ch * 16) = kr[u];
        *reinterpret_cast<uint4*>(vs + j * L::kVStride + ch * 16) = vr[u];
      }
    }
    return;
  }
  // Unaligned caches (odd strides or head dims): element by element.
  for (int idx = threadIdx.x; idx < kKeys * D; idx += kThreads) {
    const int j = idx / D, c = idx % D;
    const int64_t t = t0 + j;
    T kx = from_acc<T>(acc_t<T>(0)), vx = kx;
    if (t < hi && (kExact || c < p.d)) {
      const int64_t slot = keys.slot(t);
      kx = kg[slot * p.k_sl + c];
      vx = vg[slot * p.v_sl + c];
    }
    reinterpret_cast<T*>(ks + j * L::kKStride)[c] = kx;
    reinterpret_cast<T*>(vs + j * L::kVStride)[c] = vx;
  }
}

// s[rr] = q[rr] . k[lane] for the warp's rows; q rows are D apart, broadcast to the warp.
// Each 16-byte K chunk is summed on its own first: a shorter rounding chain than one long sum.
template <typename T, int D>
__device__ __forceinline__ void tile_scores(const acc_t<T>* q, const unsigned char* krow, acc_t<T> (&s)[kRowsPerWarp]) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  constexpr int E = L::kChunkElems;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = A(0);
#pragma unroll 1
  for (int ch = 0; ch < L::kChunks; ++ch) {
    const Pack<T, E> kp = reinterpret_cast<const Pack<T, E>*>(krow)[ch];
    A kc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) kc[e] = to_acc(kp.v[e]);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const Pack<A, E> qp = reinterpret_cast<const Pack<A, E>*>(q + rr * D)[ch];
      A part = A(0);
#pragma unroll
      for (int e = 0; e < E; ++e) part = fma(qp.v[e], kc[e], part);
      s[rr] += part;
    }
  }
}

// acc[rr] += sum_j p[rr][j] v[j] over the tile; p rows are kKeys apart (this warp's), broadcast.
template <typename T, int D>
__device__ __forceinline__ void tile_pv(const acc_t<T>* pw, const unsigned char* vs, int lane,
                                        acc_t<T> (&acc)[kRowsPerWarp][Layout<T, D>::kPerLane]) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
#pragma unroll 1
  for (int j0 = 0; j0 < kKeys; j0 += L::kPStep) {
    Pack<A, L::kPStep> pr[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr)
      pr[rr] = *reinterpret_cast<const Pack<A, L::kPStep>*>(pw + rr * kKeys + j0);
#pragma unroll
    for (int u = 0; u < L::kPStep; ++u) {
      const unsigned char* vrow = vs + (j0 + u) * L::kVStride;
      A vv[L::kPerLane];
#pragma unroll
      for (int run = 0; run < L::kRuns; ++run) {
        const Pack<T, L::kRun> vp = *reinterpret_cast<const Pack<T, L::kRun>*>(vrow + L::dim(lane, run, 0) * sizeof(T));
#pragma unroll
        for (int e = 0; e < L::kRun; ++e) vv[run * L::kRun + e] = to_acc(vp.v[e]);
      }
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
        for (int x = 0; x < L::kPerLane; ++x) acc[rr][x] = fma(pr[rr].v[u], vv[x], acc[rr][x]);
    }
  }
}

// Whether query i may see virtual key t (t < the block's key count is the caller's check).
// mask_b: row b's [Lq, Lq] mask, or nullptr (causal).
__device__ __forceinline__ bool key_visible(const Params& p, const KeyRange& keys, const bool* mask_b, int64_t t,
                                            int i) {
  if (t < keys.prefix_count) return true;
  const int m = keys.column(t);
  return mask_b != nullptr ? mask_b[i * p.m_si + m * p.m_sm] : m <= i;
}

// Writes the warp's finished rows: normalised output (one split) or the split's partial state.
template <typename T, int D, bool kExact>
__device__ __forceinline__ void write_rows(const Params& p, int64_t b, int kvh, int split, int row_base, int lane,
                                           const int (&qi)[kRowsPerWarp], const acc_t<T> (&m)[kRowsPerWarp],
                                           const acc_t<T> (&l)[kRowsPerWarp],
                                           const acc_t<T> (&acc)[kRowsPerWarp][Layout<T, D>::kPerLane]) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  const int64_t rows_all = p.B * p.Lq * p.hq;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    if (qi[rr] < 0) continue;  // warp-uniform
    const int h = kvh * p.group + (row_base + rr) % p.group;
    const int64_t orow = (b * p.Lq + qi[rr]) * p.hq + h;  // row of the [B*Lq*hq, d] output
    const bool whole = p.splits == 1;
    const A inv = !whole ? A(1) : (l[rr] > A(0) ? reciprocal(l[rr]) : A(0));  // sees nothing: zeros
    T* o = static_cast<T*>(p.out) + orow * p.d;
    A* po = whole ? nullptr : static_cast<A*>(p.part_o) + (static_cast<int64_t>(split) * rows_all + orow) * p.d;
#pragma unroll
    for (int run = 0; run < L::kRuns; ++run) {
      const int c0 = L::dim(lane, run, 0);
      if (kExact && whole) {
        Pack<T, L::kRun> pk;
#pragma unroll
        for (int e = 0; e < L::kRun; ++e) pk.v[e] = from_acc<T>(acc[rr][run * L::kRun + e] * inv);
        *reinterpret_cast<Pack<T, L::kRun>*>(o + c0) = pk;
      } else if (kExact) {
        Pack<A, L::kRun> pk;
#pragma unroll
        for (int e = 0; e < L::kRun; ++e) pk.v[e] = acc[rr][run * L::kRun + e];
        *reinterpret_cast<Pack<A, L::kRun>*>(po + c0) = pk;
      } else {
#pragma unroll
        for (int e = 0; e < L::kRun; ++e) {
          if (c0 + e >= p.d) continue;
          if (whole) o[c0 + e] = from_acc<T>(acc[rr][run * L::kRun + e] * inv);
          else po[c0 + e] = acc[rr][run * L::kRun + e];
        }
      }
    }
    if (!whole && lane == 0) {
      A* ml = static_cast<A*>(p.part_ml) + (static_cast<int64_t>(split) * rows_all + orow) * 2;
      ml[0] = m[rr], ml[1] = l[rr];
    }
  }
}

// grid (B * hkv, row tiles, splits), kThreads threads, Layout<T, D>::kSmemBytes dynamic shared.
template <typename T, int D, bool kExact>
__global__ void __launch_bounds__(kThreads, Layout<T, D>::kMinBlocks) attention_kernel(const Params p) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* qs = reinterpret_cast<A*>(smem_raw);
  unsigned char* ks = smem_raw + L::kQBytes;
  unsigned char* vs = ks + L::kKBytes;
  A* ps = reinterpret_cast<A*>(vs + L::kVBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (p.error != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) check_lens(p);

  const int64_t b = blockIdx.x / p.hkv;
  const int kvh = static_cast<int>(blockIdx.x % p.hkv);
  const int rows_total = static_cast<int>(p.Lq) * p.group;  // query rows of this (b, kv head)
  const int row0 = static_cast<int>(blockIdx.y) * kRows;
  const int split = static_cast<int>(blockIdx.z);
  const int row_base = row0 + warp * kRowsPerWarp;  // this warp's first row

  // Keys of this block: prefix, then the new-block columns its queries can see.
  const int64_t n = row_len(p, b);
  const int64_t prefix_end = n - p.Lq;
  KeyRange keys;
  keys.prefix_start = p.window > 0 ? max(prefix_end - p.window, int64_t(0)) : int64_t(0);
  keys.prefix_count = prefix_end - keys.prefix_start;
  const int i_first = row0 / p.group, i_last = (min(row0 + kRows, rows_total) - 1) / p.group;
  int new_hi;
  new_block_extent(p, b, i_first, i_last, keys.new_lo, new_hi);
  keys.new_shift = prefix_end + keys.new_lo - keys.prefix_count;
  const int64_t total = keys.prefix_count + (new_hi > keys.new_lo ? new_hi - keys.new_lo : 0);
  // This split's share [lo, hi): every split gets keys when total >= splits.
  const int64_t per_split = (total + p.splits - 1) / p.splits;
  const int64_t lo = split * per_split;
  const int64_t hi = min(lo + per_split, total);

  load_q_tile<T, D, kExact>(p, b, kvh, row0, qs);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // Per warp: kRowsPerWarp query rows, their position i (or -1 past the end), running max m
  // (base 2), this lane's share of the running sum l, and the unnormalised output acc.
  int qi[kRowsPerWarp];
  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][L::kPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int rg = row_base + rr;
    qi[rr] = rg < rows_total ? rg / p.group : -1;
    m[rr] = neg_inf<A>();
    l[rr] = A(0);
#pragma unroll
    for (int x = 0; x < L::kPerLane; ++x) acc[rr][x] = A(0);
  }
  const bool* mask_b = p.mask != nullptr ? p.mask + b * p.m_sb : nullptr;
  const bool warp_has_rows = qi[0] >= 0;  // rows ascend: row 0 missing means all are
  A* pw = ps + warp * kRowsPerWarp * kKeys;  // this warp's probabilities [kRowsPerWarp][kKeys]

  for (int64_t t0 = lo; t0 < hi; t0 += kKeys) {
    load_kv_tile<T, D, kExact>(p, kg, vg, keys, t0, hi, ks, vs);
    __syncthreads();  // tile (and, on the first pass, the Q tile) complete
    if (warp_has_rows) {
      A s[kRowsPerWarp];
      tile_scores<T, D>(qs + warp * kRowsPerWarp * D, ks + lane * L::kKStride, s);
      const int64_t t = t0 + lane;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        A pj = A(0);
        if (qi[rr] >= 0) {  // warp-uniform
          const bool allowed = t < hi && key_visible(p, keys, mask_b, t, qi[rr]);
          const A sc = allowed ? s[rr] : neg_inf<A>();
          const A mc = warp_max(sc);
          if (mc != neg_inf<A>()) {  // warp-uniform: something visible in this tile
            const A m_new = m[rr] > mc ? m[rr] : mc;
            const A corr = exp2_acc(m[rr] - m_new);  // m = -inf before the first visible tile: 0
            pj = allowed ? exp2_acc(sc - m_new) : A(0);
            l[rr] = l[rr] * corr + pj;
            m[rr] = m_new;
#pragma unroll
            for (int x = 0; x < L::kPerLane; ++x) acc[rr][x] *= corr;
          }
        }
        pw[rr * kKeys + lane] = pj;
      }
      __syncwarp();
      tile_pv<T, D>(pw, vs, lane, acc);
    }
    __syncthreads();  // every warp done with this tile before it is overwritten
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) l[rr] = warp_sum(l[rr]);
  write_rows<T, D, kExact>(p, b, kvh, split, row_base, lane, qi, m, l, acc);
}

// Merges the splits of each output row (one warp per row): weights 2^(m_s - M) over the splits
// that saw anything, normalised by their combined sum. Every split wrote m and l of every row it
// owns (m = -inf, l = 0 when it saw nothing); part_o is read only where the weight is nonzero.
// Launched with 128 threads but no launch bound: with one, ptxas held the float64 kernel to 32
// registers and spilled.
template <typename T>
__global__ void combine_kernel(const Params p) {
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
  const A w0 = m0 == neg_inf<A>() ? A(0) : exp2_acc(m0 - M);
  const A w1 = m1 == neg_inf<A>() ? A(0) : exp2_acc(m1 - M);
  const A l0 = lane < S ? ml[(static_cast<int64_t>(lane) * rows_all + row) * 2 + 1] : A(0);
  const A l1 = lane + 32 < S ? ml[(static_cast<int64_t>(lane + 32) * rows_all + row) * 2 + 1] : A(0);
  const A total = warp_sum(w0 * l0 + w1 * l1);
  const A inv = total > A(0) ? reciprocal(total) : A(0);
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
