// write_kv_'s copy pattern, shared by the CPU and CUDA launchers (host code).
#pragma once
#include <ATen/core/Tensor.h>

namespace sparrow {

// One slot (all dims but batch and seq_dim) of a destination cache and of its source, coalesced
// jointly: dims whose strides merge in both tensors become one, then the innermost dim becomes
// the contiguous run when its stride is 1 in both (otherwise run = 1 element). For 4-D tensors at
// most two outer dims remain. Strides in elements, outermost first.
struct SlotCopy {
  int64_t run = 1;  // elements per contiguous run; 0: empty slot
  int n_outer = 0;
  int64_t size[2] = {1, 1}, dst_stride[2] = {0, 0}, src_stride[2] = {0, 0};
};

inline SlotCopy slot_copy(const at::Tensor& dst, const at::Tensor& src, int64_t seq_dim) {
  int64_t size[3], ds[3], ss[3];
  int n = 0;
  SlotCopy c;
  for (int64_t i = 1; i < dst.dim(); ++i) {
    if (i == seq_dim) continue;
    if (dst.size(i) == 0) c.run = 0;
    if (dst.size(i) == 1) continue;
    if (n > 0 && ds[n - 1] == dst.stride(i) * dst.size(i) && ss[n - 1] == src.stride(i) * src.size(i)) {
      size[n - 1] *= dst.size(i);  // merges with the outer dim in both tensors
      ds[n - 1] = dst.stride(i);
      ss[n - 1] = src.stride(i);
    } else {
      size[n] = dst.size(i), ds[n] = dst.stride(i), ss[n] = src.stride(i);
      ++n;
    }
  }
  if (c.run == 0) return c;
  if (n > 0 && ds[n - 1] == 1 && ss[n - 1] == 1) c.run = size[--n];
  TORCH_CHECK(n <= 2, "write_kv_: internal error, ", n, " outer slot dims");
  c.n_outer = n;
  for (int k = 0; k < n; ++k) c.size[k] = size[k], c.dst_stride[k] = ds[k], c.src_stride[k] = ss[k];
  return c;
}

}  // namespace sparrow
