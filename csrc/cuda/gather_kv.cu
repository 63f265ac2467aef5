// CUDA launcher of gather_kv_ (kernel in gather_kv.cuh). Contract: DESIGN.md ("gather_kv_").
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda/gather_kv.cuh"

namespace sparrow {
namespace {

template <typename VecT>
void launch(gather_kv::Params p, int64_t slot_bytes, cudaStream_t stream) {
  p.units_per_slot = slot_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t units = p.outer * p.units_per_slot;
  const dim3 grid(static_cast<unsigned>((units + gather_kv::kThreads - 1) / gather_kv::kThreads),
                  static_cast<unsigned>(std::min<int64_t>(p.B, 65535)));
  gather_kv::gather_kernel<VecT><<<grid, gather_kv::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_kv_cuda(const at::Tensor& cache, const at::Tensor& src_index, const at::Tensor& counts,
                    const at::Tensor& dst_start, int64_t seq_dim) {
  TORCH_CHECK(cache.dim() >= 2, "cache must have at least 2 dimensions ([B, ..., L, ...]), got shape ", cache.sizes());
  const int64_t nd = cache.dim();
  const int64_t sd = seq_dim < 0 ? seq_dim + nd : seq_dim;
  TORCH_CHECK(sd >= 1 && sd < nd, "seq_dim must name a dimension of cache after the batch one, got ", seq_dim,
              " for cache shape ", cache.sizes());
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
  TORCH_CHECK(cache.is_cuda(), "cache must be a CUDA tensor, got ", cache.device());
  SPARROW_CHECK_SAME_DEVICE(cache, src_index);
  SPARROW_CHECK_SAME_DEVICE(cache, counts);
  SPARROW_CHECK_SAME_DEVICE(cache, dst_start);

  // [B, outer, L, inner] view: the dims after seq_dim must be packed (one slot = one contiguous
  // run of bytes per outer index), the dims between batch and seq_dim must collapse to one stride.
  int64_t inner = 1;
  for (int64_t k = nd - 1; k > sd; --k) {
    TORCH_CHECK(cache.size(k) == 1 || cache.stride(k) == inner,
                "cache must be contiguous in the dimensions after seq_dim (in-place op; strides ", cache.strides(),
                ", shape ", cache.sizes(), ")");
    inner *= cache.size(k);
  }
  int64_t outer = 1, outer_stride = 0;
  for (int64_t k = sd - 1; k >= 1; --k) {
    if (cache.size(k) == 1) continue;
    TORCH_CHECK(outer == 1 || cache.stride(k) == outer_stride * outer,
                "cache's dimensions between batch and seq_dim must be collapsible (strides ", cache.strides(),
                ", shape ", cache.sizes(), ")");
    if (outer == 1) outer_stride = cache.stride(k);
    outer *= cache.size(k);
  }
  const int64_t L = cache.size(sd);
  if (B == 0 || src_index.size(1) == 0 || inner == 0 || outer == 0 || L == 0) return;

  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t es = static_cast<int64_t>(cache.element_size());
  gather_kv::Params p{};
  p.cache = static_cast<unsigned char*>(cache.data_ptr());
  p.sb = cache.stride(0) * es;
  p.so = outer_stride * es;
  p.sl = cache.stride(sd) * es;
  p.B = B;
  p.L = L;
  p.outer = outer;
  p.src_index = src_index.data_ptr();
  p.src64 = src_index.scalar_type() == at::kLong;
  p.src_sb = src_index.stride(0);
  p.src_sm = src_index.stride(1);
  p.M = src_index.size(1);
  p.counts = counts.data_ptr();
  p.counts64 = counts.scalar_type() == at::kLong;
  p.counts_s = counts.stride(0);
  p.dst_start = dst_start.data_ptr();
  p.dst64 = dst_start.scalar_type() == at::kLong;
  p.dst_s = dst_start.stride(0);

  // Widest vector that divides the slot and keeps every address aligned.
  const int64_t slot_bytes = inner * es;
  const auto fits = [&](int64_t w) {
    return slot_bytes % w == 0 && reinterpret_cast<uintptr_t>(p.cache) % w == 0 && p.sb % w == 0 && p.so % w == 0 &&
           p.sl % w == 0;
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (fits(16)) launch<uint4>(p, slot_bytes, stream);
  else if (fits(8)) launch<uint2>(p, slot_bytes, stream);
  else if (fits(4)) launch<uint32_t>(p, slot_bytes, stream);
  else if (fits(2)) launch<uint16_t>(p, slot_bytes, stream);
  else launch<uint8_t>(p, slot_bytes, stream);
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("gather_kv_", &sparrow::gather_kv_cuda); }
