// CUDA launcher of fused_fc (kernels in fused_fc.cuh). Contract: DESIGN.md ("fused_fc").
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda/fused_fc.cuh"
#include "cuda/static_switch.h"
#include "cuda/value_checks.h"

namespace sparrow {
namespace {

// The kernels need a unit stride along the last dimension; anything else is copied once (rare:
// a transposed weight or embedding).
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int VEC>
void launch_rows(const fused_fc::Params& p, cudaStream_t stream) {
  constexpr int R = 4;
  const int64_t rows_per_block = fused_fc::kRowsWarps * R;
  const int64_t row_tiles = (p.Dout + rows_per_block - 1) / rows_per_block;
  const dim3 block(fused_fc::kRowsWarps * 32);
  // Smallest input-row tile that covers N (up to 16): N <= 16 streams every weight row once.
  auto go = [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    const dim3 grid(static_cast<unsigned>((p.N + NT - 1) / NT), static_cast<unsigned>(std::min<int64_t>(row_tiles, 65535)));
    fused_fc::rows_kernel<T, VEC, NT, R><<<grid, block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.N <= 1) go(std::integral_constant<int, 1>{});
  else if (p.N <= 2) go(std::integral_constant<int, 2>{});
  else if (p.N <= 4) go(std::integral_constant<int, 4>{});
  else if (p.N <= 8) go(std::integral_constant<int, 8>{});
  else go(std::integral_constant<int, 16>{});
}

at::Tensor fused_fc_cuda(const at::Tensor& token_ids, const at::Tensor& embed, const at::Tensor& hidden,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt) {
  SPARROW_CHECK_DIM(token_ids, 1);
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, "token_ids must be int64, got ", token_ids.scalar_type());
  SPARROW_CHECK_DIM(embed, 2);
  SPARROW_CHECK_FLOAT_DTYPE(embed);
  SPARROW_CHECK_DIM(hidden, 2);
  SPARROW_CHECK_SAME_DTYPE(embed, hidden);
  SPARROW_CHECK_DIM(weight, 2);
  SPARROW_CHECK_SAME_DTYPE(embed, weight);
  const int64_t N = token_ids.size(0), D = embed.size(1), H = hidden.size(1), Dout = weight.size(0);
  SPARROW_CHECK_SIZE(hidden, 0, N);
  TORCH_CHECK(weight.size(1) == D + H, "weight.size(1) must be D + H = ", D, " + ", H, " = ", D + H,
              " (embed width + hidden width), got weight shape ", weight.sizes());
  TORCH_CHECK(embed.is_cuda(), "embed must be a CUDA tensor, got ", embed.device());
  SPARROW_CHECK_SAME_DEVICE(embed, token_ids);
  SPARROW_CHECK_SAME_DEVICE(embed, hidden);
  SPARROW_CHECK_SAME_DEVICE(embed, weight);
  const at::Tensor* bias_ptr = bias_opt.has_value() && bias_opt->defined() ? &*bias_opt : nullptr;
  if (bias_ptr != nullptr) {
    const at::Tensor& bias = *bias_ptr;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == Dout, "bias must have shape [", Dout, "] (weight.size(0)), got ",
                bias.sizes());
    SPARROW_CHECK_SAME_DTYPE(embed, bias);
    SPARROW_CHECK_SAME_DEVICE(embed, bias);
  }
  const c10::cuda::CUDAGuard guard(embed.device());
  const int64_t V = embed.size(0);
  // A bad id reads embed row 0 (and is reported); with no row at all, every id is out of range.
  TORCH_CHECK(N == 0 || D == 0 || V > 0, "token_ids: every id is outside [0, 0) (embed.size(0))");
  at::Tensor out = at::empty({N, Dout}, embed.options());
  if (N == 0 || Dout == 0) return out;  // (no launch: the ids are not checked)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(embed.get_device(), stream);

  const at::Tensor embed_c = last_dim_contiguous(embed);
  const at::Tensor hidden_c = last_dim_contiguous(hidden);
  const at::Tensor weight_c = last_dim_contiguous(weight);
  const at::Tensor tok = token_ids.stride(0) == 1 ? token_ids : token_ids.contiguous();
  at::Tensor bias;
  if (bias_ptr != nullptr) bias = bias_ptr->stride(0) == 1 ? *bias_ptr : bias_ptr->contiguous();

  fused_fc::Params p;
  p.tok = tok.data_ptr();
  p.tok64 = tok.scalar_type() == at::kLong;
  p.embed = embed_c.data_ptr();
  p.embed_stride = embed_c.stride(0);
  p.V = V;
  p.hidden = hidden_c.data_ptr();
  p.hidden_stride = hidden_c.stride(0);
  p.weight = weight_c.data_ptr();
  p.weight_stride = weight_c.stride(0);
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.N = N;
  p.D = D;
  p.H = H;
  p.Dout = Dout;
  p.error = checks.word;

  SPARROW_FLOAT_SWITCH(embed_c.scalar_type(), "embed", [&] {
    if (N <= 64) {
      // 16-byte loads need every row start (and the hidden segment's weight column D) aligned.
      constexpr int kVec = 16 / sizeof(scalar_t);
      const int64_t vb = 16;
      const bool vec_ok = aligned(p.embed, vb) && aligned(p.hidden, vb) && aligned(p.weight, vb) &&
                          D % kVec == 0 && H % kVec == 0 && p.embed_stride % kVec == 0 &&
                          p.hidden_stride % kVec == 0 && p.weight_stride % kVec == 0;
      if (vec_ok) launch_rows<scalar_t, kVec>(p, stream);
      else launch_rows<scalar_t, 1>(p, stream);
    } else {
      const dim3 grid(static_cast<unsigned>((Dout + fused_fc::kTileN - 1) / fused_fc::kTileN),
                      static_cast<unsigned>(std::min<int64_t>((N + fused_fc::kTileM - 1) / fused_fc::kTileM, 65535)));
      fused_fc::tiled_kernel<scalar_t><<<grid, fused_fc::kTileThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  finish_value_checks(checks, stream);
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("fused_fc", &sparrow::fused_fc_cuda); }
