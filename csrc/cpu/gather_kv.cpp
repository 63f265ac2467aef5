// gather_kv_ on CPU: in place, for every tensor of `caches`, per row b and m < counts[b], slot
// dst_start[b]+m along seq_dim takes slot src_index[b,m]. Contract: DESIGN.md ("gather_kv_") and
// sparrow/reference.py.
//
// A slot of row b is cache[b].select(seq_dim-1, l): for the draft's [B,L,h,d] cache (seq_dim=1)
// that is h*d contiguous elements, for a Hugging Face [B,h,L,d] cache (seq_dim=2) h runs of d.
// Any strides are handled, per tensor: the slot's dims are coalesced into maximal contiguous runs
// copied with memcpy (any dtype, by element size), the remaining dims are walked by index. One
// parallel loop covers every (tensor, row, outer run) item of the whole list; each item copies its
// m in ascending order, which is what makes the move safe in place: sources ascend and never lie
// before their destination, so no source is overwritten before it is read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "error_word.h"

namespace sparrow {
namespace {

// One cache's slot as contiguous runs: `run` elements per memcpy, walked over the outer dims.
struct SlotRuns {
  char* base;
  int64_t row_stride_bytes, seq_stride_bytes, run_bytes, outer, elem;
  std::vector<int64_t> sizes, strides;  // outer dims of a slot, innermost last (element strides)
};

SlotRuns slot_runs(const at::Tensor& cache, int64_t seq_dim) {
  SlotRuns r;
  for (int64_t i = 1; i < cache.dim(); ++i) {
    if (i == seq_dim || cache.size(i) == 1) continue;
    if (!r.sizes.empty() && r.strides.back() == cache.stride(i) * cache.size(i)) {  // merge with the outer dim
      r.sizes.back() *= cache.size(i);
      r.strides.back() = cache.stride(i);
    } else {
      r.sizes.push_back(cache.size(i));
      r.strides.push_back(cache.stride(i));
    }
  }
  int64_t run = 1;
  for (int64_t i = 1; i < cache.dim(); ++i)
    if (i != seq_dim && cache.size(i) == 0) run = 0;  // an empty slot: nothing to copy
  if (run != 0 && !r.sizes.empty() && r.strides.back() == 1) {
    run = r.sizes.back();
    r.sizes.pop_back();
    r.strides.pop_back();
  }
  r.outer = 1;
  for (int64_t s : r.sizes) r.outer *= s;
  r.elem = cache.element_size();
  r.run_bytes = run * r.elem;
  r.seq_stride_bytes = cache.stride(seq_dim) * r.elem;
  r.row_stride_bytes = cache.stride(0) * r.elem;
  r.base = static_cast<char*>(cache.data_ptr());
  return r;
}

void gather_kv_cpu(at::TensorList caches, const at::Tensor& src_index, const at::Tensor& counts,
                   const at::Tensor& dst_start, int64_t seq_dim) {
  check_gather_kv_args(caches, src_index, counts, dst_start, seq_dim);
  TORCH_CHECK(caches[0].device().is_cpu(), "caches must be CPU tensors for the CPU kernel, got ", caches[0].device());
  const int64_t B = caches[0].size(0), L = caches[0].size(seq_dim), M = src_index.size(1);

  // Validate every row before touching any cache, so a bad call leaves them unchanged. The order
  // of the checks (and so which bad value a message names) is the CUDA kernels' order too.
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
    if (count[b] < 0 || count[b] > M) raise_error(err::kGatherCounts, b, count[b], M);
    if (count[b] == 0) continue;
    if (dst[b] < 0 || dst[b] > L - count[b]) raise_error(err::kGatherDst, err::pack2(b, count[b]), dst[b], L);
    for (int64_t m = 0; m < count[b]; ++m) {
      const int64_t s = src_at(b, m);
      if (s < 0 || s >= L) raise_error(err::kGatherSrcRange, err::pack2(b, m), s, L);
      if (s < dst[b] + m) raise_error(err::kGatherSrcBefore, err::pack2(b, m), s, dst[b] + m);
      if (m > 0 && s <= src_at(b, m - 1)) raise_error(err::kGatherSrcOrder, err::pack2(b, m), src_at(b, m - 1), s);
    }
  }

  std::vector<SlotRuns> runs;
  std::vector<int64_t> first_item(caches.size() + 1, 0);  // items of cache t: [first_item[t], first_item[t+1])
  runs.reserve(caches.size());
  for (size_t t = 0; t < caches.size(); ++t) {
    runs.push_back(slot_runs(caches[t], seq_dim));
    first_item[t + 1] = first_item[t] + (runs.back().run_bytes == 0 ? 0 : B * runs.back().outer);
  }
  const int64_t items = first_item.back();
  if (items == 0) return;
  int64_t max_count = 0;
  for (int64_t b = 0; b < B; ++b) max_count = std::max(max_count, count[b]);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, runs[0].run_bytes * max_count));

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[t + 1]) ++t;
      const SlotRuns& r = runs[t];
      const int64_t local = item - first_item[t], b = local / r.outer;
      if (count[b] == 0) continue;
      int64_t rest = local % r.outer, offset = 0;  // element offset of this outer run within a slot
      for (int64_t i = static_cast<int64_t>(r.sizes.size()) - 1; i >= 0; --i) {
        offset += (rest % r.sizes[i]) * r.strides[i];
        rest /= r.sizes[i];
      }
      char* row = r.base + b * r.row_stride_bytes + offset * r.elem;
      for (int64_t m = 0; m < count[b]; ++m) {
        const int64_t s = src_at(b, m), d = dst[b] + m;
        if (s != d) std::memcpy(row + d * r.seq_stride_bytes, row + s * r.seq_stride_bytes, r.run_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("gather_kv_", &gather_kv_cpu); }

}  // namespace sparrow
