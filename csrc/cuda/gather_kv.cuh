// gather_kv_: in place, for every cache of a list, each row b and m < counts[b], slot
// dst_start[b]+m along the sequence dimension takes slot src_index[b,m]. Contract: DESIGN.md
// ("gather_kv_"); ground truth: sparrow/reference.py::gather_kv_ (one slot at a time, m ascending).
//
// Layout. Each cache is viewed as [B, outer, L, inner] (inner: the contiguous bytes of one slot
// per outer index), cut into vectors of the kernel's width; a "position" is one (outer index,
// vector) of a slot, P = outer * units of them per slot. One launch serves up to kMaxCaches
// caches of one shape. A block owns one (cache, row) pair and E consecutive positions (E = 32 or
// fewer for small slots: 512 contiguous bytes per warp with 16-byte vectors), and its
// kThreads / E "move lanes" split the row's moves: lane l performs m = l, l + lanes, ... So a
// 128-dim bfloat16 slot of a 4-head cache (64 positions) fills two whole blocks per row with all
// of the row's moves in flight, instead of 64 busy threads of 256 walking the moves one by one.
//
// Why this is race-free in place. Only the threads of one block touch a given position, and a
// block moves a chunk of up to kThreads / E * kPerThread moves in two phases: every thread loads
// its sources, a barrier, then every thread stores. So all reads of a chunk come before all of
// its writes: a move m that reads a slot a later move m' overwrites (src_m = dst_m') reads the old
// bytes, exactly as in the sequential order. Across chunks no barrier is needed: by the contract
// (sources ascend and never lie before their destination) every source of a later chunk lies at
// or after dst_start + m > every destination written before it. Inputs outside the contract are
// rejected by the value checks; with checks off they give unspecified (but in-bounds) results.
//
// Value checks (when `error` is set): every block checks all rows first, in the CPU kernel's
// order, and a call with any bad value moves nothing at all; block 0 records the first one. That
// is B * (M + 1) index reads per block from L2, a few per thread at decode sizes.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace gather_kv {

constexpr int kMaxCaches = 64;  // per launch: 64 * 32 bytes of kernel parameters
constexpr int kThreads = 256;
constexpr int kPerThread = 8;   // moves per thread per chunk, their loads in flight together

struct Cache {
  unsigned char* base;
  int64_t sb, so, sl;  // byte strides of batch, outer, sequence
};

struct Params {
  Cache caches[kMaxCaches];
  int64_t n_caches;  // 0: a launch that only checks values
  int64_t B, L, outer, units;  // units: vectors in one slot per outer index
  int64_t lanes_log2;          // log2 E: positions per block
  int64_t chunks;              // position chunks per (cache, row): ceil(outer * units / E)
  const void* src_index;       // [B, M]
  bool src64;
  int64_t src_sb, src_sm, M;
  const void* counts;  // [B]
  bool counts64;
  int64_t counts_s;
  const void* dst_start;  // [B]
  bool dst64;
  int64_t dst_s;
  int64_t* error;  // error word, or nullptr (unchecked)
};

__device__ __forceinline__ int64_t src_at(const Params& p, int64_t b, int64_t m) {
  return load_index(p.src_index, p.src64, b * p.src_sb + m * p.src_sm);
}

// Checks are numbered in the CPU kernel's order: row b owns keys b * (2 + 3M) + 0 (counts),
// + 1 (dst_start range), + 2 + 3m + {0: source range, 1: source before destination, 2: order}.
__device__ uint64_t first_bad_key(const Params& p) {
  const int64_t per_row = p.M + 1, keys_per_row = 2 + 3 * p.M;
  uint64_t best = kNoKey;
  for (int64_t j = threadIdx.x; j < p.B * per_row; j += blockDim.x) {
    const int64_t b = j / per_row, k = j % per_row;  // k = 0: the row's counts and dst_start; else m = k - 1
    const int64_t key0 = b * keys_per_row;
    const int64_t c = load_index(p.counts, p.counts64, b * p.counts_s);
    int64_t key = -1;
    if (c < 0 || c > p.M) {
      if (k == 0) key = key0;
    } else if (c > 0) {
      const int64_t d = load_index(p.dst_start, p.dst64, b * p.dst_s);
      if (d < 0 || d > p.L - c) {
        if (k == 0) key = key0 + 1;
      } else if (k > 0 && k - 1 < c) {
        const int64_t m = k - 1, s = src_at(p, b, m);
        if (s < 0 || s >= p.L) key = key0 + 2 + 3 * m;
        else if (s < d + m) key = key0 + 3 + 3 * m;
        else if (m > 0 && s <= src_at(p, b, m - 1)) key = key0 + 4 + 3 * m;
      }
    }
    if (key >= 0 && static_cast<uint64_t>(key) < best) best = static_cast<uint64_t>(key);
  }
  return best;
}

__device__ void record_bad_key(const Params& p, uint64_t key) {
  const int64_t keys_per_row = 2 + 3 * p.M;
  const int64_t b = static_cast<int64_t>(key) / keys_per_row, what = static_cast<int64_t>(key) % keys_per_row;
  const int64_t c = load_index(p.counts, p.counts64, b * p.counts_s);
  if (what == 0) return record_error(p.error, err::kGatherCounts, b, c, p.M);
  const int64_t d = load_index(p.dst_start, p.dst64, b * p.dst_s);
  if (what == 1) return record_error(p.error, err::kGatherDst, err::pack2(b, c), d, p.L);
  const int64_t m = (what - 2) / 3, s = src_at(p, b, m);
  switch ((what - 2) % 3) {
    case 0: return record_error(p.error, err::kGatherSrcRange, err::pack2(b, m), s, p.L);
    case 1: return record_error(p.error, err::kGatherSrcBefore, err::pack2(b, m), s, d + m);
    default: return record_error(p.error, err::kGatherSrcOrder, err::pack2(b, m), src_at(p, b, m - 1), s);
  }
}

template <typename VecT>
__global__ void __launch_bounds__(kThreads) gather_kernel(const __grid_constant__ Params p) {
  if (p.error != nullptr) {
    const uint64_t bad = block_min_key(first_bad_key(p));
    if (bad != kNoKey) {
      if (blockIdx.x == 0 && threadIdx.x == 0) record_bad_key(p, bad);
      return;  // the same decision in every block: a bad call moves nothing
    }
  }
  if (p.n_caches == 0) return;

  const int64_t row = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks;
  const int64_t b = row % p.B, t = row / p.B;
  const int E = 1 << p.lanes_log2, lanes = kThreads >> p.lanes_log2;
  const int64_t q = chunk * E + (threadIdx.x & (E - 1));  // this thread's position
  const int lane = threadIdx.x >> p.lanes_log2;
  const bool active = q < p.outer * p.units;  // inactive threads still reach every barrier
  const Cache c = p.caches[t];
  unsigned char* base = c.base + b * c.sb + (q / p.units) * c.so + (q % p.units) * static_cast<int64_t>(sizeof(VecT));

  int64_t count = load_index(p.counts, p.counts64, b * p.counts_s);
  count = count < 0 ? 0 : (count > p.M ? p.M : count);  // unchecked launches: clamp, skip below
  const int64_t dst0 = load_index(p.dst_start, p.dst64, b * p.dst_s);
  const int64_t per_chunk = static_cast<int64_t>(lanes) * kPerThread;

  for (int64_t m0 = 0; m0 < count; m0 += per_chunk) {  // block-uniform trip count
    VecT buf[kPerThread];
    int64_t to[kPerThread];
    bool ok[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t m = m0 + lane + static_cast<int64_t>(j) * lanes;
      const int64_t s = active && m < count ? src_at(p, b, m) : -1;
      to[j] = dst0 + m;
      // An out-of-range move (reachable only unchecked) is skipped rather than faulting.
      ok[j] = s >= 0 && s < p.L && to[j] >= 0 && to[j] < p.L && s != to[j];
      if (ok[j]) buf[j] = *reinterpret_cast<const VecT*>(base + s * c.sl);
    }
    __syncthreads();  // every source of this chunk read before any of its destinations is written
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (ok[j]) *reinterpret_cast<VecT*>(base + to[j] * c.sl) = buf[j];
  }
}

}  // namespace gather_kv
}  // namespace sparrow
