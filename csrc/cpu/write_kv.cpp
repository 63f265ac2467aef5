// write_kv_ on CPU: in place, for every row b and m < M, slot start[b]+m along seq_dim of k_cache
// / v_cache takes entry m of k_new / v_new. Contract: sparrow/ops.py (write_kv_) and
// sparrow/reference.py.
//
// Any dtype (copied by element size) and any strides: each slot is copied as the contiguous runs
// it shares with its source (kv_layout.h), with memcpy; a run of one element (a source or cache
// strided in its innermost dim) is copied element by element. One parallel loop covers every
// (k|v, row, m) slot of both caches; slots are disjoint, so no order is needed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"
#include "error_word.h"
#include "kv_layout.h"

namespace sparrow {
namespace {

template <typename E>
void copy_elements(char* dst, int64_t dst_stride_bytes, const char* src, int64_t src_stride_bytes, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    *reinterpret_cast<E*>(dst + i * dst_stride_bytes) = *reinterpret_cast<const E*>(src + i * src_stride_bytes);
}

struct Pair {
  char* dst;
  const char* src;
  int64_t dst_sb, dst_sl, src_sb, src_sm;  // byte strides: batch and sequence
  SlotCopy slot;
};

void write_kv_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                  const at::Tensor& v_new, const at::Tensor& start, int64_t seq_dim) {
  check_write_kv_args(k_cache, v_cache, k_new, v_new, start, seq_dim);
  TORCH_CHECK(k_cache.device().is_cpu(), "k_cache must be a CPU tensor for the CPU kernel, got ", k_cache.device());
  const int64_t B = k_cache.size(0), L = k_cache.size(seq_dim), M = k_new.size(seq_dim);
  std::vector<int64_t> first(B);
  for (int64_t b = 0; b < B; ++b) {  // every row before any write: a bad call changes nothing
    first[b] = index_at(start, b);
    if (first[b] < 0 || first[b] > L - M) raise_error(err::kWriteStart, b, first[b], err::pack2(M, L));
  }

  const int64_t elem = k_cache.element_size();
  Pair pairs[2];
  const at::Tensor* dsts[2] = {&k_cache, &v_cache};
  const at::Tensor* srcs[2] = {&k_new, &v_new};
  for (int t = 0; t < 2; ++t) {
    const at::Tensor &d = *dsts[t], &s = *srcs[t];
    pairs[t] = Pair{static_cast<char*>(d.data_ptr()), static_cast<const char*>(s.const_data_ptr()),
                    d.stride(0) * elem, d.stride(seq_dim) * elem, s.stride(0) * elem, s.stride(seq_dim) * elem,
                    slot_copy(d, s, seq_dim)};
  }
  const SlotCopy& k_slot = pairs[0].slot;
  if (B * M == 0 || k_slot.run == 0) return;
  const int64_t slot_bytes = k_slot.run * k_slot.size[0] * k_slot.size[1] * elem;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, slot_bytes));

  at::parallel_for(0, 2 * B * M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const Pair& p = pairs[item / (B * M)];
      const int64_t b = item % (B * M) / M, m = item % M;
      char* dst_slot = p.dst + b * p.dst_sb + (first[b] + m) * p.dst_sl;
      const char* src_slot = p.src + b * p.src_sb + m * p.src_sm;
      const SlotCopy& c = p.slot;
      // Outer dims padded to two (size 1) so one loop nest covers every layout.
      const int64_t n1 = c.n_outer == 2 ? c.size[0] : 1, n0 = c.n_outer >= 1 ? c.size[c.n_outer - 1] : 1;
      const int64_t d1 = c.n_outer == 2 ? c.dst_stride[0] * elem : 0, s1 = c.n_outer == 2 ? c.src_stride[0] * elem : 0;
      const int64_t d0 = c.n_outer >= 1 ? c.dst_stride[c.n_outer - 1] * elem : 0;
      const int64_t s0 = c.n_outer >= 1 ? c.src_stride[c.n_outer - 1] * elem : 0;
      for (int64_t o1 = 0; o1 < n1; ++o1) {
        char* dst_row = dst_slot + o1 * d1;
        const char* src_row = src_slot + o1 * s1;
        if (c.run > 1 || n0 == 1) {
          for (int64_t o0 = 0; o0 < n0; ++o0) std::memcpy(dst_row + o0 * d0, src_row + o0 * s0, c.run * elem);
        } else {  // strided innermost dim: one element per step
          switch (elem) {
            case 1: copy_elements<uint8_t>(dst_row, d0, src_row, s0, n0); break;
            case 2: copy_elements<uint16_t>(dst_row, d0, src_row, s0, n0); break;
            case 4: copy_elements<uint32_t>(dst_row, d0, src_row, s0, n0); break;
            case 8: copy_elements<uint64_t>(dst_row, d0, src_row, s0, n0); break;
            default:
              for (int64_t o0 = 0; o0 < n0; ++o0) std::memcpy(dst_row + o0 * d0, src_row + o0 * s0, elem);
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("write_kv_", &write_kv_cpu); }

}  // namespace sparrow
