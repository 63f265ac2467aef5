// CUDA launcher of text_attention (kernels in text_attention.cuh). Contract: DESIGN.md.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda/static_switch.h"
#include "cuda/text_attention.cuh"
#include "cuda/value_checks.h"

namespace sparrow {
namespace {

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

int multiprocessor_count(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device] = count;
  return count;
}

// Whether every K/V row start is 16-byte aligned: pointers and the strides of each dimension
// that has more than one index (a size-1 dimension's stride is never used).
bool rows_16_byte_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  if (t.size(3) * t.element_size() % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim)
    if (t.size(dim) > 1 && t.stride(dim) * t.element_size() % 16 != 0) return false;
  return true;
}

template <typename T, int D, bool kExact>
void launch(text_attention::Params& p, const at::Tensor& q, cudaStream_t stream) {
  using A = sparrow::acc_t<T>;
  namespace ta = text_attention;
  const int64_t row_tiles = (p.Lq * p.group + ta::kRows - 1) / ta::kRows;
  constexpr int smem = ta::Layout<T, D>::kSmemBytes;
  auto kernel = ta::attention_kernel<T, D, kExact>;
  if constexpr (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  at::Tensor part_o, part_ml;
  if (p.splits > 1) {
    const auto acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    const int64_t rows_all = p.B * p.Lq * p.hq;
    part_o = at::empty({p.splits, rows_all, p.d}, q.options().dtype(acc_dtype));
    part_ml = at::empty({p.splits, rows_all, 2}, q.options().dtype(acc_dtype));
    p.part_o = part_o.data_ptr();
    p.part_ml = part_ml.data_ptr();
  }
  const dim3 grid(static_cast<unsigned>(p.B * p.hkv), static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.splits));
  kernel<<<grid, ta::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const int64_t rows_all = p.B * p.Lq * p.hq;
    ta::combine_kernel<T><<<static_cast<unsigned>((rows_all + 3) / 4), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // part_o / part_ml are freed here; the caching allocator keeps them stream-ordered.
}

// The head dim as a template constant: 64, 128 or 256 exactly, anything else padded to the next.
template <typename T>
void launch_for_head_dim(text_attention::Params& p, const at::Tensor& q, cudaStream_t stream) {
  const int64_t D = p.d <= 64 ? 64 : (p.d <= 128 ? 128 : 256);
  SPARROW_BOOL_SWITCH(p.d == D, kExact, [&] {
    if (D == 64) launch<T, 64, kExact>(p, q, stream);
    else if (D == 128) launch<T, 128, kExact>(p, q, stream);
    else launch<T, 256, kExact>(p, q, stream);
  });
}

at::Tensor text_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask_opt,
                               double scale, int64_t window) {
  const at::Tensor* mask_ptr = tree_mask_opt.has_value() && tree_mask_opt->defined() ? &*tree_mask_opt : nullptr;
  check_text_attention_args(q, k_cache, v_cache, cache_lens, mask_ptr);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const int64_t B = q.size(0), Lq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t L = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(d <= 256, "q.size(3) (head dim ", d, ") must be <= 256 on CUDA");

  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(B == 0 || Lq <= L, "q.size(1) (", Lq, " new positions) must be <= k_cache.size(1) (", L, " slots)");
  at::Tensor out = at::empty({B, Lq, hq, d}, q.options());
  if (out.numel() == 0) return out;  // (no launch: cache_lens is not checked)
  const int64_t group = hq / hkv;
  TORCH_CHECK((Lq * group + text_attention::kRows - 1) / text_attention::kRows <= 65535,
              "q.size(1) * (query heads per kv head) = ", Lq * group, " is too large for one launch");

  const at::Tensor q_c = last_dim_contiguous(q);
  const at::Tensor k = last_dim_contiguous(k_cache);
  const at::Tensor v = last_dim_contiguous(v_cache);

  text_attention::Params p{};
  p.q = q_c.data_ptr();
  p.q_sb = q_c.stride(0), p.q_si = q_c.stride(1), p.q_sh = q_c.stride(2);
  p.k = k.data_ptr();
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  p.v = v.data_ptr();
  p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  p.lens = cache_lens.data_ptr();
  p.lens64 = cache_lens.scalar_type() == at::kLong;
  p.lens_s = cache_lens.stride(0);
  if (mask_ptr != nullptr) {
    p.mask = mask_ptr->data_ptr<bool>();
    p.m_sb = mask_ptr->stride(0), p.m_si = mask_ptr->stride(1), p.m_sm = mask_ptr->stride(2);
  }
  p.out = out.data_ptr();
  p.B = B, p.Lq = Lq, p.hq = hq, p.hkv = hkv, p.d = d, p.L = L, p.window = window;
  p.group = static_cast<int>(group);
  p.score_scale = scale * text_attention::kLog2e;
  p.vec16 = rows_16_byte_aligned(k) && rows_16_byte_aligned(v);

  // Split the key range (flash-decoding) only when (b, kv head, row tile) blocks alone would
  // leave most multiprocessors idle and the keys are many; the cache lengths live on the device,
  // so the capacity bounds the key count.
  const int64_t base_blocks = B * hkv * ((Lq * group + text_attention::kRows - 1) / text_attention::kRows);
  const int64_t max_keys = window > 0 ? std::min<int64_t>(L, std::min<int64_t>(window, L) + Lq) : L;
  const int64_t want = (2 * multiprocessor_count(q.get_device()) + base_blocks - 1) / base_blocks;
  const int64_t by_keys = (max_keys + 255) / 256;  // at least 256 keys per split
  p.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, by_keys, text_attention::kMaxSplits})));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(q.get_device(), stream);
  p.error = checks.word;
  SPARROW_FLOAT_SWITCH(q_c.scalar_type(), "q", [&] { launch_for_head_dim<scalar_t>(p, q_c, stream); });
  finish_value_checks(checks, stream);
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("text_attention", &sparrow::text_attention_cuda); }
