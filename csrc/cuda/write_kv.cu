// CUDA launcher of write_kv_ (kernel in write_kv.cuh): one launch for both caches.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda/value_checks.h"
#include "cuda/write_kv.cuh"
#include "kv_layout.h"

namespace sparrow {
namespace {

write_kv::Pair make_pair(const at::Tensor& dst, const at::Tensor& src, int64_t sd, int64_t& run_bytes) {
  const int64_t es = static_cast<int64_t>(dst.element_size());
  const SlotCopy c = slot_copy(dst, src, sd);
  write_kv::Pair p{};
  p.dst = static_cast<unsigned char*>(dst.data_ptr());
  p.src = static_cast<const unsigned char*>(src.const_data_ptr());
  p.dst_sb = dst.stride(0) * es, p.dst_sl = dst.stride(sd) * es;
  p.src_sb = src.stride(0) * es, p.src_sm = src.stride(sd) * es;
  p.n1 = c.n_outer == 2 ? c.size[0] : 1;
  p.dst_s1 = c.n_outer == 2 ? c.dst_stride[0] * es : 0;
  p.src_s1 = c.n_outer == 2 ? c.src_stride[0] * es : 0;
  p.n0 = c.n_outer >= 1 ? c.size[c.n_outer - 1] : 1;
  p.dst_s0 = c.n_outer >= 1 ? c.dst_stride[c.n_outer - 1] * es : 0;
  p.src_s0 = c.n_outer >= 1 ? c.src_stride[c.n_outer - 1] * es : 0;
  run_bytes = c.run * es;
  return p;
}

bool pair_fits(const write_kv::Pair& p, int64_t run_bytes, int64_t w) {
  const auto al = [w](int64_t v) { return v % w == 0; };
  return al(run_bytes) && reinterpret_cast<uintptr_t>(p.dst) % w == 0 && reinterpret_cast<uintptr_t>(p.src) % w == 0 &&
         al(p.dst_sb) && al(p.dst_sl) && al(p.src_sb) && al(p.src_sm) && al(p.dst_s1) && al(p.dst_s0) &&
         al(p.src_s1) && al(p.src_s0);
}

template <typename VecT>
void launch(write_kv::Params p, const int64_t run_bytes[2], cudaStream_t stream) {
  for (int t = 0; t < 2; ++t) {
    write_kv::Pair& c = p.pair[t];
    c.units = run_bytes[t] / static_cast<int64_t>(sizeof(VecT));
    c.total = p.B * p.M * c.n1 * c.n0 * c.units;
  }
  const int64_t total = p.pair[0].total + p.pair[1].total;
  if (total == 0 && p.error == nullptr) return;
  // Enough blocks for one vector per thread up to a cap; the kernel loops past it.
  const int64_t blocks = std::clamp<int64_t>((total + write_kv::kThreads - 1) / write_kv::kThreads, 1, 65536);
  write_kv::write_kernel<VecT><<<static_cast<unsigned>(blocks), write_kv::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_kv_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                   const at::Tensor& v_new, const at::Tensor& start, int64_t seq_dim) {
  check_write_kv_args(k_cache, v_cache, k_new, v_new, start, seq_dim);
  TORCH_CHECK(k_cache.is_cuda(), "k_cache must be a CUDA tensor, got ", k_cache.device());
  const int64_t B = k_cache.size(0);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(k_cache.get_device(), stream);

  write_kv::Params p{};
  int64_t run_bytes[2];
  p.pair[0] = make_pair(k_cache, k_new, seq_dim, run_bytes[0]);
  p.pair[1] = make_pair(v_cache, v_new, seq_dim, run_bytes[1]);
  p.B = B, p.L = k_cache.size(seq_dim), p.M = k_new.size(seq_dim);
  p.start = start.data_ptr();
  p.start64 = start.scalar_type() == at::kLong;
  p.start_s = start.stride(0);
  p.error = checks.word;
  // Widest vector that divides every run and keeps every address of both pairs aligned.
  const auto fits = [&](int64_t w) {
    return pair_fits(p.pair[0], run_bytes[0], w) && pair_fits(p.pair[1], run_bytes[1], w);
  };
  if (fits(16)) launch<uint4>(p, run_bytes, stream);
  else if (fits(8)) launch<uint2>(p, run_bytes, stream);
  else if (fits(4)) launch<uint32_t>(p, run_bytes, stream);
  else if (fits(2)) launch<uint16_t>(p, run_bytes, stream);
  else launch<uint8_t>(p, run_bytes, stream);
  finish_value_checks(checks, stream);
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("write_kv_", &sparrow::write_kv_cuda); }
