// CUDA launcher of gather_kv_ (kernel in gather_kv.cuh). Contract: DESIGN.md ("gather_kv_").
// One launch moves every cache of the list (all layers' K and V), up to gather_kv::kMaxCaches
// per launch: a longer list takes ceil(n / kMaxCaches) launches, each checking the values again.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "cuda/gather_kv.cuh"
#include "cuda/value_checks.h"

namespace sparrow {
namespace {

// Caches whose slots the kernel cannot view as packed runs (e.g. an element stride): the same
// moves as one ATen gather along seq_dim and a copy back (several launches; rare layouts only).
// Gathering from the unchanged cache equals the in-place sequence because no source is
// overwritten before it is read (sources ascend and never lie before their destination).
// Out-of-range moves are skipped, as the kernel does.
void gather_kv_aten(const at::Tensor& cache, const at::Tensor& src_index, const at::Tensor& counts,
                    const at::Tensor& dst_start, int64_t seq_dim) {
  const int64_t B = cache.size(0), L = cache.size(seq_dim), M = src_index.size(1);
  const at::Tensor src = src_index.to(at::kLong);
  const at::Tensor m = at::arange(M, src.options());
  const at::Tensor to = dst_start.to(at::kLong).unsqueeze(1) + m;  // [B, M] destination slots
  const at::Tensor live = (m < counts.to(at::kLong).unsqueeze(1)) & (src >= 0) & (src < L) & (to >= 0) & (to < L);
  // source[b, l]: the slot that slot l takes (itself unless moved); column L absorbs dead moves.
  at::Tensor source = at::arange(L + 1, src.options()).repeat({B, 1});
  source.scatter_(1, at::where(live, to, L), src);
  std::vector<int64_t> shape(cache.dim(), 1);
  shape[0] = B;
  shape[seq_dim] = L;
  const at::Tensor index = source.narrow(1, 0, L).view(shape).expand(cache.sizes());
  cache.copy_(cache.gather(seq_dim, index));
}

// The kernel's view of a cache as [B, outer, L, inner]: the dims after seq_dim must be packed (one
// slot = one contiguous run of bytes per outer index), those between batch and seq_dim must
// collapse to one stride. False: another layout (the ATen path).
bool packed_view(const at::Tensor& cache, int64_t sd, gather_kv::Cache& out) {
  const int64_t es = static_cast<int64_t>(cache.element_size());
  bool packed = true;
  int64_t inner = 1;
  for (int64_t k = cache.dim() - 1; k > sd; --k) {
    packed = packed && (cache.size(k) == 1 || cache.stride(k) == inner);
    inner *= cache.size(k);
  }
  int64_t outer = 1, outer_stride = 0;
  for (int64_t k = sd - 1; k >= 1; --k) {
    if (cache.size(k) == 1) continue;
    packed = packed && (outer == 1 || cache.stride(k) == outer_stride * outer);
    if (outer == 1) outer_stride = cache.stride(k);
    outer *= cache.size(k);
  }
  out = {static_cast<unsigned char*>(cache.data_ptr()), cache.stride(0) * es, outer_stride * es,
         cache.stride(sd) * es};
  return packed;
}

template <typename VecT>
void launch(gather_kv::Params p, int64_t slot_bytes, cudaStream_t stream) {
  p.units = slot_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t positions = p.outer * p.units;
  int64_t lanes_log2 = 0;  // E = the smallest power of two >= positions, at most 32
  while (lanes_log2 < 5 && (int64_t{1} << lanes_log2) < positions) ++lanes_log2;
  p.lanes_log2 = lanes_log2;
  p.chunks = std::max<int64_t>(1, (positions + (int64_t{1} << lanes_log2) - 1) >> lanes_log2);
  const int64_t blocks = p.n_caches > 0 && positions > 0 ? p.n_caches * p.B * p.chunks : 1;
  if (blocks == 1 && (p.n_caches == 0 || positions == 0)) {
    if (p.error == nullptr) return;  // nothing to move and nothing to check
    p.n_caches = 0;                  // a launch that only checks the values
  }
  TORCH_CHECK(blocks <= INT32_MAX, "gather_kv_: ", blocks, " blocks are too many for one launch");
  gather_kv::gather_kernel<VecT><<<static_cast<unsigned>(blocks), gather_kv::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_kv_cuda(at::TensorList caches, const at::Tensor& src_index, const at::Tensor& counts,
                    const at::Tensor& dst_start, int64_t seq_dim) {
  check_gather_kv_args(caches, src_index, counts, dst_start, seq_dim);
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.is_cuda(), "caches must be CUDA tensors, got ", first.device());
  const int64_t sd = seq_dim, B = first.size(0), L = first.size(sd), M = src_index.size(1);
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(first.get_device(), stream);

  int64_t inner = 1, outer = 1;  // one shape for every cache (checked)
  for (int64_t k = first.dim() - 1; k > sd; --k) inner *= first.size(k);
  for (int64_t k = sd - 1; k >= 1; --k) outer *= first.size(k);
  const int64_t es = static_cast<int64_t>(first.element_size()), slot_bytes = inner * es;
  const bool empty = B == 0 || M == 0 || inner == 0 || outer == 0 || L == 0;

  std::vector<gather_kv::Cache> views;
  std::vector<const at::Tensor*> fallback;
  if (!empty) {
    for (const at::Tensor& cache : caches) {
      gather_kv::Cache view;
      if (packed_view(cache, sd, view)) views.push_back(view);
      else fallback.push_back(&cache);
    }
  }
  // Widest vector that divides the slot and keeps every address of every cache aligned.
  const auto fits = [&](int64_t w) {
    if (slot_bytes % w != 0) return false;
    for (const auto& v : views)
      if (reinterpret_cast<uintptr_t>(v.base) % w != 0 || v.sb % w != 0 || v.so % w != 0 || v.sl % w != 0) return false;
    return true;
  };
  const int width = fits(16) ? 16 : fits(8) ? 8 : fits(4) ? 4 : fits(2) ? 2 : 1;

  gather_kv::Params p{};
  p.B = B, p.L = L, p.outer = outer, p.M = M;
  p.src_index = src_index.data_ptr();
  p.src64 = src_index.scalar_type() == at::kLong;
  p.src_sb = src_index.stride(0), p.src_sm = src_index.stride(1);
  p.counts = counts.data_ptr();
  p.counts64 = counts.scalar_type() == at::kLong;
  p.counts_s = counts.stride(0);
  p.dst_start = dst_start.data_ptr();
  p.dst64 = dst_start.scalar_type() == at::kLong;
  p.dst_s = dst_start.stride(0);
  p.error = checks.word;
  const auto go = [&](gather_kv::Params q) {
    switch (width) {
      case 16: return launch<uint4>(q, slot_bytes, stream);
      case 8: return launch<uint2>(q, slot_bytes, stream);
      case 4: return launch<uint32_t>(q, slot_bytes, stream);
      case 2: return launch<uint16_t>(q, slot_bytes, stream);
      default: return launch<uint8_t>(q, slot_bytes, stream);
    }
  };
  if (views.empty()) {
    if (B > 0) go(p);  // no cache the kernel moves: it still checks the values
  }
  for (size_t i0 = 0; i0 < views.size(); i0 += gather_kv::kMaxCaches) {
    const size_t n = std::min<size_t>(gather_kv::kMaxCaches, views.size() - i0);
    gather_kv::Params q = p;
    for (size_t i = 0; i < n; ++i) q.caches[i] = views[i0 + i];
    q.n_caches = static_cast<int64_t>(n);
    go(q);
  }
  finish_value_checks(checks, stream);  // a direct call raises here, before the fallback moves
  for (const at::Tensor* cache : fallback) gather_kv_aten(*cache, src_index, counts, dst_start, sd);
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("gather_kv_", &sparrow::gather_kv_cuda); }
