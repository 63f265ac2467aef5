// CUDA launcher of gather_kv_ (kernel in gather_kv.cuh). Contract: DESIGN.md ("gather_kv_").
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
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

// The CPU kernel's value checks, in its order: per row b, counts[b] in [0, M]; when counts[b] > 0,
// the destination range [dst_start[b], dst_start[b] + counts[b]) inside [0, L); then per m <
// counts[b]: src_index[b, m] in [0, L), not before its destination dst_start[b] + m, and above
// src_index[b, m-1]. A rejected call leaves the cache unchanged (nothing has been launched).
void check_move_values(const at::Tensor& src_index, const at::Tensor& counts, const at::Tensor& dst_start, int64_t L) {
  const int64_t B = src_index.size(0), M = src_index.size(1);
  const at::Tensor src = src_index.to(at::kLong), count = counts.to(at::kLong).unsqueeze(1);  // [B, M], [B, 1]
  const at::Tensor dst = dst_start.to(at::kLong).unsqueeze(1);                                // [B, 1]
  const at::Tensor m = at::arange(M, src.options());                                          // [M]
  const at::Tensor bad_count = (count < 0) | (count > M);
  const at::Tensor bad_dst = (count > 0) & ((dst < 0) | (dst + count > L));
  const at::Tensor live = m < count;  // [B, M]
  const at::Tensor bad_range = live & ((src < 0) | (src >= L));
  const at::Tensor bad_before = live & (src < dst + m);
  at::Tensor bad_order = at::zeros_like(live);
  if (M > 1) bad_order.narrow(1, 1, M - 1).copy_(live.narrow(1, 1, M - 1) & (src.narrow(1, 1, M - 1) <= src.narrow(1, 0, M - 1)));
  // Row b of `bad` lists [count, dst, (range, before, order) for m = 0..M-1]: the CPU's order.
  const at::Tensor per_m = at::stack({bad_range, bad_before, bad_order}, -1).reshape({B, 3 * M});
  const int64_t first = first_true(at::cat({bad_count, bad_dst, per_m}, 1));
  if (first < 0) return;
  const int64_t b = first / (2 + 3 * M), what = first % (2 + 3 * M);
  const int64_t c = int_at(counts, b);
  TORCH_CHECK(what != 0, "counts[", b, "] = ", c, " must lie in [0, ", M, "] (src_index.size(1))");
  const int64_t d = int_at(dst_start, b);
  TORCH_CHECK(what != 1, "dst_start[", b, "] = ", d, " with counts[", b, "] = ", c,
              " must satisfy 0 <= dst_start and dst_start + counts <= ", L, " (cache length along seq_dim)");
  const int64_t mm = (what - 2) / 3, s = int_at(src_index[b], mm);
  TORCH_CHECK((what - 2) % 3 != 0, "src_index[", b, ", ", mm, "] = ", s, " is outside [0, ", L, ")");
  TORCH_CHECK((what - 2) % 3 != 1, "src_index[", b, ", ", mm, "] = ", s, " lies before its destination slot ", d + mm,
              " (dst_start + m); the in-place move would overwrite it first");
  TORCH_CHECK(false, "src_index[", b, "] must ascend over its first counts[", b, "] entries, got ",
              int_at(src_index[b], mm - 1), " then ", s, " at m = ", mm);
}

// Caches whose slots the kernel cannot view as packed runs (e.g. an element stride): the same
// moves as one ATen gather along seq_dim and a copy back. Gathering from the unchanged cache
// equals the in-place sequence because no source is overwritten before it is read (sources
// ascend and never lie before their destination). Out-of-range moves are skipped, as the kernel does.
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
  check_gather_kv_args(cache, src_index, counts, dst_start, seq_dim);
  TORCH_CHECK(cache.is_cuda(), "cache must be a CUDA tensor, got ", cache.device());
  const int64_t nd = cache.dim(), sd = seq_dim;
  const int64_t B = cache.size(0);
  const c10::cuda::CUDAGuard guard(cache.device());
  if (cuda_value_checks_enabled()) check_move_values(src_index, counts, dst_start, cache.size(sd));

  // The kernel views the cache as [B, outer, L, inner]: the dims after seq_dim must be packed (one
  // slot = one contiguous run of bytes per outer index), those between batch and seq_dim must
  // collapse to one stride. Other layouts take the ATen path.
  bool packed = true;
  int64_t inner = 1;
  for (int64_t k = nd - 1; k > sd; --k) {
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
  const int64_t L = cache.size(sd);
  if (B == 0 || src_index.size(1) == 0 || inner == 0 || outer == 0 || L == 0) return;
  if (!packed) return gather_kv_aten(cache, src_index, counts, dst_start, sd);

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
