// Input checks shared by the CPU and CUDA launchers. Every message names the argument and the
// sizes it saw, so a bad call says what to fix.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#define SPARROW_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have " #n " dimensions, got shape ", (t).sizes())

#define SPARROW_CHECK_SIZE(t, d, expected)                                                         \
  TORCH_CHECK((t).size(d) == (expected), #t ".size(" #d ") must be ", (expected), " (", #t " shape ", \
              (t).sizes(), ")")

#define SPARROW_CHECK_INDEX_DTYPE(t)                                                    \
  TORCH_CHECK((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt, #t \
              " must be int64 or int32, got ", (t).scalar_type())

#define SPARROW_CHECK_FLOAT_DTYPE(t)                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||              \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,       \
              #t " must be float32, float16, bfloat16 or float64, got ", (t).scalar_type())

#define SPARROW_CHECK_SAME_DTYPE(a, b)                                                          \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #b " must have the dtype of " #a " (", \
              (a).scalar_type(), "), got ", (b).scalar_type())

#define SPARROW_CHECK_SAME_DEVICE(a, b)                                                    \
  TORCH_CHECK((a).device() == (b).device(), #b " must be on " #a "'s device (", (a).device(), \
              "), got ", (b).device())

namespace sparrow {

// Element i of a small 1-D int32/int64 CPU tensor, read through its stride (CPU kernels' indices).
inline int64_t index_at(const at::Tensor& t, int64_t i) {
  const int64_t off = i * t.stride(0);
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off]
                                      : static_cast<int64_t>(t.const_data_ptr<int32_t>()[off]);
}

// The argument contracts that do not depend on the device (ranks, sizes, dtypes, devices), one per
// op that both launchers check. Index *values* are checked by the kernels themselves (CPU: at once;
// CUDA: into the error word, error_codes.h), since reading them on the host costs a sync.

inline void check_text_attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_lens, const at::Tensor* tree_mask) {
  SPARROW_CHECK_DIM(q, 4);
  SPARROW_CHECK_FLOAT_DTYPE(q);
  SPARROW_CHECK_DIM(k_cache, 4);
  SPARROW_CHECK_DIM(v_cache, 4);
  SPARROW_CHECK_SAME_DTYPE(q, k_cache);
  SPARROW_CHECK_SAME_DTYPE(q, v_cache);
  const int64_t B = q.size(0), Lq = q.size(1), hq = q.size(2), d = q.size(3), hkv = k_cache.size(2);
  SPARROW_CHECK_SIZE(k_cache, 0, B);
  TORCH_CHECK(k_cache.size(3) == d, "k_cache head dim (size 3) must equal q's (", d, "), k_cache shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "q's head count (", hq, ") must be a multiple of k_cache's (", hkv,
              "), q shape ", q.sizes(), ", k_cache shape ", k_cache.sizes());
  SPARROW_CHECK_DIM(cache_lens, 1);
  SPARROW_CHECK_SIZE(cache_lens, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(cache_lens);
  SPARROW_CHECK_SAME_DEVICE(q, k_cache);
  SPARROW_CHECK_SAME_DEVICE(q, v_cache);
  SPARROW_CHECK_SAME_DEVICE(q, cache_lens);
  if (tree_mask != nullptr) {
    SPARROW_CHECK_SAME_DEVICE(q, *tree_mask);
    TORCH_CHECK(tree_mask->scalar_type() == at::kBool, "tree_mask must be bool, got ", tree_mask->scalar_type());
    TORCH_CHECK(tree_mask->dim() == 3 && tree_mask->size(0) == B && tree_mask->size(1) == Lq &&
                    tree_mask->size(2) == Lq,
                "tree_mask must have shape [", B, ", ", Lq, ", ", Lq, "] (B, Lq, Lq), got ", tree_mask->sizes());
  }
}

// verify's draft_probs: float32 (the draft samples from a float32 q; rounding it to the logits'
// half-precision dtype after the draw would break exact sampling) or the logits' own dtype.
inline void check_draft_probs_dtype(const at::Tensor& target_logits, const at::Tensor& draft_probs) {
  TORCH_CHECK(draft_probs.scalar_type() == at::kFloat || draft_probs.scalar_type() == target_logits.scalar_type(),
              "draft_probs must be float32 or have the dtype of target_logits (", target_logits.scalar_type(),
              "), got ", draft_probs.scalar_type());
}

// gather_kv_: every tensor of `caches` gets the same moves, so all share one shape (batch and
// cache length included), dtype and device; each may have its own strides.
inline void check_gather_kv_args(at::TensorList caches, const at::Tensor& src_index, const at::Tensor& counts,
                                 const at::Tensor& dst_start, int64_t seq_dim) {
  TORCH_CHECK(!caches.empty(), "caches must hold at least one tensor");
  TORCH_CHECK(seq_dim == 1 || seq_dim == 2, "seq_dim must be 1 ([B,L,h,d] cache) or 2 ([B,h,L,d] cache), got ",
              seq_dim);
  const at::Tensor& first = caches[0];
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK(c.dim() >= 2, "caches[", i, "] must have at least 2 dimensions ([B,L,...] or [B,h,L,...]), got shape ",
                c.sizes());
    TORCH_CHECK(seq_dim < c.dim(), "seq_dim ", seq_dim, " is out of range for caches[", i, "] of shape ", c.sizes());
    if (i > 0) {
      TORCH_CHECK(c.size(0) == first.size(0) && c.size(seq_dim) == first.size(seq_dim), "caches[", i, "] has shape ",
                  c.sizes(), ", caches[0] ", first.sizes(),
                  ": every cache must have caches[0]'s batch size (size 0) and cache length (size ", seq_dim,
                  " = seq_dim)");
      TORCH_CHECK(c.sizes() == first.sizes(), "caches[", i, "] must have the shape of caches[0] (", first.sizes(),
                  "), got ", c.sizes());
      TORCH_CHECK(c.scalar_type() == first.scalar_type(), "caches[", i, "] must have the dtype of caches[0] (",
                  first.scalar_type(), "), got ", c.scalar_type());
      TORCH_CHECK(c.device() == first.device(), "caches[", i, "] must be on caches[0]'s device (", first.device(),
                  "), got ", c.device());
    }
    TORCH_CHECK(at::has_internal_overlap(c) != at::MemOverlap::Yes, "caches[", i,
                "] must not have overlapping memory (e.g. an expanded tensor); it is written in place");
  }
  // The same memory listed twice would be moved twice (and raced over); an O(n log n) test of the
  // start addresses catches the usual mistake (one layer's tensor passed twice) at no real cost.
  std::vector<std::pair<const void*, size_t>> starts;
  starts.reserve(caches.size());
  for (size_t i = 0; i < caches.size(); ++i)
    if (caches[i].numel() > 0) starts.emplace_back(caches[i].const_data_ptr(), i);
  std::sort(starts.begin(), starts.end());
  for (size_t k = 1; k < starts.size(); ++k)
    TORCH_CHECK(starts[k].first != starts[k - 1].first, "caches[", std::min(starts[k].second, starts[k - 1].second),
                "] and caches[", std::max(starts[k].second, starts[k - 1].second),
                "] start at the same memory: every cache must be a distinct tensor");

  const int64_t B = first.size(0);
  SPARROW_CHECK_DIM(src_index, 2);
  SPARROW_CHECK_SIZE(src_index, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(src_index);
  SPARROW_CHECK_DIM(counts, 1);
  SPARROW_CHECK_SIZE(counts, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(counts);
  SPARROW_CHECK_DIM(dst_start, 1);
  SPARROW_CHECK_SIZE(dst_start, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(dst_start);
  for (const at::Tensor* t : {&src_index, &counts, &dst_start}) {
    const char* name = t == &src_index ? "src_index" : (t == &counts ? "counts" : "dst_start");
    TORCH_CHECK(t->device() == first.device(), name, " must be on caches[0]'s device (", first.device(), "), got ",
                t->device());
  }
}

// write_kv_: k_cache and v_cache [B,L,h,d] (seq_dim 1) or [B,h,L,d] (seq_dim 2), one shape; k_new
// and v_new the same layout with M along seq_dim; one dtype; start [B].
inline void check_write_kv_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                                const at::Tensor& v_new, const at::Tensor& start, int64_t seq_dim) {
  TORCH_CHECK(seq_dim == 1 || seq_dim == 2, "seq_dim must be 1 ([B,L,h,d] caches) or 2 ([B,h,L,d] caches), got ",
              seq_dim);
  SPARROW_CHECK_DIM(k_cache, 4);
  SPARROW_CHECK_DIM(v_cache, 4);
  SPARROW_CHECK_DIM(k_new, 4);
  SPARROW_CHECK_DIM(v_new, 4);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  std::vector<int64_t> expected = k_cache.sizes().vec();
  expected[seq_dim] = k_new.size(seq_dim);
  TORCH_CHECK(k_new.sizes() == at::IntArrayRef(expected), "k_new must have shape ", at::IntArrayRef(expected),
              " (k_cache's shape ", k_cache.sizes(), " with M = k_new.size(seq_dim) along seq_dim ", seq_dim, "), got ",
              k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), "v_new must have k_new's shape ", k_new.sizes(), ", got ",
              v_new.sizes());
  SPARROW_CHECK_SAME_DTYPE(k_cache, v_cache);
  SPARROW_CHECK_SAME_DTYPE(k_cache, k_new);
  SPARROW_CHECK_SAME_DTYPE(k_cache, v_new);
  SPARROW_CHECK_DIM(start, 1);
  SPARROW_CHECK_SIZE(start, 0, k_cache.size(0));
  SPARROW_CHECK_INDEX_DTYPE(start);
  SPARROW_CHECK_SAME_DEVICE(k_cache, v_cache);
  SPARROW_CHECK_SAME_DEVICE(k_cache, k_new);
  SPARROW_CHECK_SAME_DEVICE(k_cache, v_new);
  SPARROW_CHECK_SAME_DEVICE(k_cache, start);
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, t == &k_cache ? "k_cache" : "v_cache",
                " must not have overlapping memory (e.g. an expanded tensor); it is written in place");
  // k_cache and v_cache may interleave in one buffer (a fused KV cache), so only a provable
  // element overlap is refused; a source is refused as soon as its address range meets a cache's.
  const auto shares = [](const at::Tensor& a, const at::Tensor& b) {
    const at::MemOverlapStatus s = at::get_overlap_status(a, b);
    return s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial;
  };
  const auto range_meets = [](const at::Tensor& a, const at::Tensor& b) {
    if (a.numel() == 0 || b.numel() == 0) return false;
    const auto range = [](const at::Tensor& t) {
      int64_t last = 0;  // element offset of the last element (strides are never negative)
      for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
      const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      return std::pair<uintptr_t, uintptr_t>(lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size()));
    };
    const auto [a0, a1] = range(a);
    const auto [b0, b1] = range(b);
    return a0 < b1 && b0 < a1;
  };
  const bool same_start = k_cache.numel() > 0 && k_cache.const_data_ptr() == v_cache.const_data_ptr();
  TORCH_CHECK(!shares(k_cache, v_cache) && !same_start, "v_cache must not share memory with k_cache");
  for (const at::Tensor* t : {&k_new, &v_new})
    TORCH_CHECK(!range_meets(*t, k_cache) && !range_meets(*t, v_cache), t == &k_new ? "k_new" : "v_new",
                " must not share memory with k_cache or v_cache (it is read while they are written)");
}

}  // namespace sparrow
