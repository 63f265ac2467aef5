// gather_kv_ on CPU: in place, per row b and m < counts[b], slot dst_start[b]+m along seq_dim
// takes slot src_index[b,m]. Contract: DESIGN.md ("gather_kv_") and sparrow/reference.py.
//
// A slot of row b is cache[b].select(seq_dim-1, l): for the draft's [B,L,h,d] cache (seq_dim=1)
// that is h*d contiguous elements, for a Hugging Face [B,h,L,d] cache (seq_dim=2) h runs of d.
// Any strides are handled: the slot's dims are coalesced into maximal contiguous runs copied with
// memcpy (any dtype, by element size), the remaining dims are walked by index. Work is split over
// (row, outer run) pairs; each pair copies its m in ascending order, which is what makes the move
// safe in place: sources ascend and never lie before their destination, so no source is
// overwritten before it is read.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"

namespace sparrow {
namespace {

int64_t index_at(const at::Tensor& t, int64_t i) {
  // t is a small 1-D int32/int64 CPU tensor; read element i through its stride.
  const int64_t off = i * t.stride(0);
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off]
                                      : static_cast<int64_t>(t.const_data_ptr<int32_t>()[off]);
}

void gather_kv_cpu(at::Tensor& cache, const at::Tensor& src_index, const at::Tensor& counts,
                   const at::Tensor& dst_start, int64_t seq_dim) {
  check_gather_kv_args(cache, src_index, counts, dst_start, seq_dim);
  const int64_t B = cache.size(0), L = cache.size(seq_dim), M = src_index.size(1);

  // Validate every row before touching the cache, so a bad call leaves it unchanged.
  const auto src_acc = src_index.scalar_type();
  auto src_at = [&](int64_t b, int64_t m) -> int64_t {
    const int64_t off = b * src_index.stride(0) + m * src_index.stride(1);
    return src_acc == at::kLong ? src_index.const_data_ptr<int64_t>()[off]
                                : static_cast<int64_t>(src_index.const_data_ptr<int32_t>()[off]);
  };
  std::vector<int64_t> count(B), dst(B);
  for (int64_t b = 0; b < B; ++b) {
    count[b] = index_at(counts, b);
    dst[b] = index_at(dst_start, b);
    TORCH_CHECK(count[b] >= 0 && count[b] <= M, "counts[", b, "] = ", count[b], " must lie in [0, ", M,
                "] (src_index.size(1))");
    if (count[b] == 0) continue;
    TORCH_CHECK(dst[b] >= 0 && dst[b] + count[b] <= L, "dst_start[", b, "] = ", dst[b], " with counts[", b,
                "] = ", count[b], " must satisfy 0 <= dst_start and dst_start + counts <= ", L,
                " (cache length along seq_dim)");
    for (int64_t m = 0; m < count[b]; ++m) {
      const int64_t s = src_at(b, m);
      TORCH_CHECK(s >= 0 && s < L, "src_index[", b, ", ", m, "] = ", s, " is outside [0, ", L, ")");
      TORCH_CHECK(s >= dst[b] + m, "src_index[", b, ", ", m, "] = ", s, " lies before its destination slot ",
                  dst[b] + m, " (dst_start + m); the in-place move would overwrite it first");
      TORCH_CHECK(m == 0 || s > src_at(b, m - 1), "src_index[", b, "] must ascend over its first counts[", b,
                  "] entries, got ", src_at(b, m - 1), " then ", s, " at m = ", m);
    }
  }

  // Dims of one slot (all but 0 and seq_dim), innermost last, coalesced into contiguous runs.
  std::vector<int64_t> sizes, strides;
  for (int64_t i = 1; i < cache.dim(); ++i) {
    if (i == seq_dim || cache.size(i) == 1) continue;
    if (!sizes.empty() && strides.back() == cache.stride(i) * cache.size(i)) {  // merge with the outer dim
      sizes.back() *= cache.size(i);
      strides.back() = cache.stride(i);
    } else {
      sizes.push_back(cache.size(i));
      strides.push_back(cache.stride(i));
    }
  }
  int64_t run = 1;  // elements per memcpy
  if (!sizes.empty() && strides.back() == 1) {
    run = sizes.back();
    sizes.pop_back();
    strides.pop_back();
  }
  int64_t outer = 1;
  for (int64_t s : sizes) outer *= s;
  if (outer * run == 0) return;

  const int64_t elem = cache.element_size();
  const int64_t run_bytes = run * elem;
  const int64_t seq_stride_bytes = cache.stride(seq_dim) * elem;
  const int64_t row_stride_bytes = cache.stride(0) * elem;
  char* base = static_cast<char*>(cache.data_ptr());
  int64_t max_count = 0;
  for (int64_t b = 0; b < B; ++b) max_count = std::max(max_count, count[b]);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, run_bytes * max_count));

  at::parallel_for(0, B * outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / outer;
      if (count[b] == 0) continue;
      int64_t rest = task % outer, offset = 0;  // element offset of this outer run within a slot
      for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
        offset += (rest % sizes[i]) * strides[i];
        rest /= sizes[i];
      }
      char* row = base + b * row_stride_bytes + offset * elem;
      for (int64_t m = 0; m < count[b]; ++m) {
        const int64_t s = src_at(b, m), d = dst[b] + m;
        if (s != d) std::memcpy(row + d * seq_stride_bytes, row + s * seq_stride_bytes, run_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("gather_kv_", &gather_kv_cpu); }

}  // namespace sparrow
