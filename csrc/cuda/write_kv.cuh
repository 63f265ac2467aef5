// write_kv_: in place, for every row b and m < M, slot start[b]+m along the sequence dimension of
// k_cache / v_cache takes entry m of k_new / v_new. Contract: sparrow/ops.py (write_kv_); ground
// truth: sparrow/reference.py::write_kv_.
//
// One launch writes both caches. Each slot is copied as the runs it shares with its source
// (kv_layout.h: up to two outer dims and one contiguous run), cut into vectors of the kernel's
// width (16 bytes where every address allows); a thread copies one vector per step of a
// grid-stride loop over (k|v, b, m, outer dims, vector). Destinations are disjoint, so no order
// is needed.
//
// Value checks (when `error` is set): every block checks all B starts first, and a call with any
// bad start writes nothing; block 0 records the first bad row. Unchecked, a bad row is skipped.
#pragma once
#include "common.cuh"

namespace sparrow {
namespace write_kv {

constexpr int kThreads = 256;

struct Pair {
  unsigned char* dst;
  const unsigned char* src;
  int64_t dst_sb, dst_sl, src_sb, src_sm;          // byte strides: batch, sequence
  int64_t n1, n0, dst_s1, dst_s0, src_s1, src_s0;  // a slot's outer dims (size 1 if absent), byte strides
  int64_t units;                                   // vectors per run
  int64_t total;                                   // B * M * n1 * n0 * units
};

struct Params {
  Pair pair[2];  // k, v
  int64_t B, L, M;
  const void* start;  // [B] int32/int64
  bool start64;
  int64_t start_s;
  int64_t* error;  // error word, or nullptr (unchecked)
};

template <typename VecT>
__global__ void __launch_bounds__(kThreads) write_kernel(const __grid_constant__ Params p) {
  if (p.error != nullptr) {
    uint64_t key = kNoKey;
    for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
      const int64_t s = load_index(p.start, p.start64, b * p.start_s);
      if ((s < 0 || s > p.L - p.M) && static_cast<uint64_t>(b) < key) key = static_cast<uint64_t>(b);
    }
    const uint64_t bad = block_min_key(key);
    if (bad != kNoKey) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        const int64_t b = static_cast<int64_t>(bad);
        record_error(p.error, err::kWriteStart, b, load_index(p.start, p.start64, b * p.start_s),
                     err::pack2(p.M, p.L));
      }
      return;  // the same decision in every block: a bad call writes nothing
    }
  }
  const int64_t total = p.pair[0].total + p.pair[1].total;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += step) {
    const int t = u >= p.pair[0].total ? 1 : 0;
    const Pair& c = p.pair[t];
    int64_t r = u - (t == 1 ? p.pair[0].total : 0);
    const int64_t e = r % c.units;
    r /= c.units;
    const int64_t o0 = r % c.n0;
    r /= c.n0;
    const int64_t o1 = r % c.n1;
    r /= c.n1;
    const int64_t m = r % p.M, b = r / p.M;
    const int64_t s = load_index(p.start, p.start64, b * p.start_s);
    if (s < 0 || s > p.L - p.M) continue;  // reachable only unchecked
    const int64_t off = e * static_cast<int64_t>(sizeof(VecT));
    const unsigned char* from = c.src + b * c.src_sb + m * c.src_sm + o1 * c.src_s1 + o0 * c.src_s0 + off;
    unsigned char* to = c.dst + b * c.dst_sb + (s + m) * c.dst_sl + o1 * c.dst_s1 + o0 * c.dst_s0 + off;
    *reinterpret_cast<VecT*>(to) = *reinterpret_cast<const VecT*>(from);
  }
}

}  // namespace write_kv
}  // namespace sparrow
