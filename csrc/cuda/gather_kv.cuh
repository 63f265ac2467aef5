// gather_kv_: in place, for each row b and m < counts[b], slot dst_start[b]+m along the sequence
// dimension takes slot src_index[b,m]. Contract: DESIGN.md ("gather_kv_"); ground truth:
// sparrow/reference.py::gather_kv_ (one slot at a time, m ascending).
//
// Why this is race-free: the cache is viewed as [B, outer, L, inner] (inner = the bytes of one
// slot within one outer index, contiguous). A thread owns one vector of bytes at a fixed
// (b, outer, byte offset) and performs *every* move of row b for that position itself, in m order.
// Different threads never touch the same bytes, so the only ordering that matters is the one
// inside a thread, which is program order: the in-place hazard of a parallel copy (move m reads
// slot s_m that a later move m' > m overwrites, s_m = dst_m') cannot occur, and no barrier is
// needed.
//
// Latency: to keep several loads in flight a thread reads a batch of U sources before writing
// their U destinations. That equals the sequential order iff no source in the batch is a
// destination written earlier in the same batch: src_j != dst_i for i < j. Destinations increase
// with m, so src_j >= dst_j (the contract: "sources never lie before their destination") gives
// src_j >= dst_j > dst_i. The kernel checks src_j >= dst_j for the batch's moves and falls back to
// one move at a time otherwise, so it matches the reference even for inputs outside the contract.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace gather_kv {

struct Params {
  unsigned char* cache;  // base of the cache
  int64_t sb, so, sl;    // byte strides of batch, outer, sequence
  int64_t B, L, units_per_slot, outer;  // units: vectors of the kernel's width in one slot
  const void* src_index;  // [B, M]
  bool src64;
  int64_t src_sb, src_sm, M;
  const void* counts;  // [B]
  bool counts64;
  int64_t counts_s;
  const void* dst_start;  // [B]
  bool dst64;
  int64_t dst_s;
};

constexpr int kThreads = 256;
constexpr int kBatch = 8;

template <typename VecT>
__global__ void __launch_bounds__(kThreads) gather_kernel(const Params p) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= p.outer * p.units_per_slot) return;  // no barriers below: leaving early is safe
  const int64_t o = u / p.units_per_slot, e = u % p.units_per_slot;

  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    unsigned char* base = p.cache + b * p.sb + o * p.so + e * static_cast<int64_t>(sizeof(VecT));
    int64_t count = load_index(p.counts, p.counts64, b * p.counts_s);
    SPARROW_DEVICE_CHECK(count >= 0 && count <= p.M, "gather_kv_: counts value outside [0, src_index.size(1)]");
    count = count < 0 ? 0 : (count > p.M ? p.M : count);
    const int64_t dst0 = load_index(p.dst_start, p.dst64, b * p.dst_s);

    for (int64_t m0 = 0; m0 < count; m0 += kBatch) {
      int64_t src[kBatch], dst[kBatch];
      bool ok[kBatch];
      bool batch_safe = true;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int64_t m = m0 + j;
        const bool live = m < count;
        src[j] = live ? load_index(p.src_index, p.src64, b * p.src_sb + m * p.src_sm) : 0;
        dst[j] = dst0 + m;
        // An out-of-range move is skipped rather than faulting (see common.cuh).
        ok[j] = live && src[j] >= 0 && src[j] < p.L && dst[j] >= 0 && dst[j] < p.L;
        SPARROW_DEVICE_CHECK(!live || ok[j], "gather_kv_: src_index or dst_start+m outside [0, cache.size(seq_dim))");
        batch_safe = batch_safe && (!ok[j] || src[j] >= dst[j]);
      }
      if (batch_safe) {
        VecT buf[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
          if (ok[j]) buf[j] = *reinterpret_cast<const VecT*>(base + src[j] * p.sl);
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
          if (ok[j] && src[j] != dst[j]) *reinterpret_cast<VecT*>(base + dst[j] * p.sl) = buf[j];
      } else {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          if (ok[j] && src[j] != dst[j]) {
            const VecT x = *reinterpret_cast<const VecT*>(base + src[j] * p.sl);
            *reinterpret_cast<VecT*>(base + dst[j] * p.sl) = x;
          }
        }
      }
    }
  }
}

}  // namespace gather_kv
}  // namespace sparrow
