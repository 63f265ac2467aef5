// Input checks shared by the CPU and CUDA launchers. Every message names the argument and the
// sizes it saw, so a bad call says what to fix.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// The argument contracts that do not depend on the device (ranks, sizes, dtypes, devices), one per
// op that both launchers check; value checks (index ranges) stay with each launcher, since reading
// values costs a sync on CUDA.

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

inline void check_gather_kv_args(const at::Tensor& cache, const at::Tensor& src_index, const at::Tensor& counts,
                                 const at::Tensor& dst_start, int64_t seq_dim) {
  TORCH_CHECK(cache.dim() >= 2, "cache must have at least 2 dimensions ([B,L,...] or [B,h,L,...]), got shape ",
              cache.sizes());
  TORCH_CHECK(seq_dim == 1 || seq_dim == 2, "seq_dim must be 1 ([B,L,h,d] cache) or 2 ([B,h,L,d] cache), got ",
              seq_dim);
  TORCH_CHECK(seq_dim < cache.dim(), "seq_dim ", seq_dim, " is out of range for cache of shape ", cache.sizes());
  const int64_t B = cache.size(0);
  SPARROW_CHECK_DIM(src_index, 2);
  SPARROW_CHECK_SIZE(src_index, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(src_index);
  SPARROW_CHECK_DIM(counts, 1);
  SPARROW_CHECK_SIZE(counts, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(counts);
  SPARROW_CHECK_DIM(dst_start, 1);
  SPARROW_CHECK_SIZE(dst_start, 0, B);
  SPARROW_CHECK_INDEX_DTYPE(dst_start);
  SPARROW_CHECK_SAME_DEVICE(cache, src_index);
  SPARROW_CHECK_SAME_DEVICE(cache, counts);
  SPARROW_CHECK_SAME_DEVICE(cache, dst_start);
  TORCH_CHECK(at::has_internal_overlap(cache) != at::MemOverlap::Yes,
              "cache must not have overlapping memory (e.g. an expanded tensor); it is written in place");
}

}  // namespace sparrow
