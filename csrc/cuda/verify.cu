// CUDA launcher of verify (kernel in verify.cuh). Contract: DESIGN.md ("verify").
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/static_switch.h"
#include "cuda/value_checks.h"
#include "cuda/verify.cuh"

namespace sparrow {
namespace {

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename X> struct TypeTag { using type = X; };

template <typename T, typename Q, int VEC>
void launch(const verify::Params& p, cudaStream_t stream) {
  const size_t smem = verify::smem_bytes(p.N);
  auto kernel = verify::verify_kernel<T, Q, VEC>;
  if (smem > 40 * 1024) {  // static Shared struct + dynamic part must fit; raise the dynamic limit
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One cluster of kCluster blocks per row (the cluster shape is fixed by __cluster_dims__).
  kernel<<<static_cast<unsigned>(p.B * verify::kCluster), verify::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cuda(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                                           const at::Tensor& target_logits,
                                                           const std::optional<at::Tensor>& draft_probs_opt,
                                                           const at::Tensor& temperature, const at::Tensor& uniform) {
  SPARROW_CHECK_DIM(draft_tokens, 2);
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "draft_tokens must be int64, got ", draft_tokens.scalar_type());
  const int64_t B = draft_tokens.size(0), N = draft_tokens.size(1);
  SPARROW_CHECK_DIM(parents, 2);
  SPARROW_CHECK_SIZE(parents, 0, B);
  SPARROW_CHECK_SIZE(parents, 1, N);
  TORCH_CHECK(parents.scalar_type() == at::kLong, "parents must be int64, got ", parents.scalar_type());
  SPARROW_CHECK_DIM(target_logits, 3);
  SPARROW_CHECK_FLOAT_DTYPE(target_logits);
  SPARROW_CHECK_SIZE(target_logits, 0, B);
  TORCH_CHECK(target_logits.size(1) == N + 1, "target_logits.size(1) must be N+1 = ", N + 1, " (draft_tokens shape ",
              draft_tokens.sizes(), ", target_logits shape ", target_logits.sizes(), ")");
  const int64_t V = target_logits.size(2);
  TORCH_CHECK(V > 0, "target_logits.size(2) (the vocabulary V) must be positive, got shape ", target_logits.sizes());
  SPARROW_CHECK_DIM(temperature, 1);
  SPARROW_CHECK_SIZE(temperature, 0, B);
  TORCH_CHECK(temperature.scalar_type() == at::kFloat, "temperature must be float32, got ", temperature.scalar_type());
  SPARROW_CHECK_DIM(uniform, 2);
  SPARROW_CHECK_SIZE(uniform, 0, B);
  TORCH_CHECK(uniform.size(1) == N + 1, "uniform.size(1) must be N+1 = ", N + 1, " (uniform shape ", uniform.sizes(),
              ")");
  TORCH_CHECK(uniform.scalar_type() == at::kFloat, "uniform must be float32, got ", uniform.scalar_type());
  TORCH_CHECK(draft_tokens.is_cuda(), "draft_tokens must be a CUDA tensor, got ", draft_tokens.device());
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, parents);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, target_logits);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, temperature);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, uniform);
  const at::Tensor* dp_ptr = draft_probs_opt.has_value() && draft_probs_opt->defined() ? &*draft_probs_opt : nullptr;
  if (dp_ptr != nullptr) {
    const at::Tensor& draft_probs = *dp_ptr;
    SPARROW_CHECK_DIM(draft_probs, 3);
    SPARROW_CHECK_SIZE(draft_probs, 0, B);
    SPARROW_CHECK_SIZE(draft_probs, 1, N);
    TORCH_CHECK(draft_probs.size(2) == V, "draft_probs.size(2) must be V = ", V,
                " (target_logits.size(2)), got draft_probs shape ", draft_probs.sizes());
    check_draft_probs_dtype(target_logits, draft_probs);
    SPARROW_CHECK_SAME_DEVICE(draft_tokens, draft_probs);
  }
  // The tree lives in each block's shared memory: 16 bytes per node.
  TORCH_CHECK(N <= 8192, "draft_tokens.size(1) (", N, " nodes) must be <= 8192 on CUDA");
  TORCH_CHECK(B <= (int64_t{1} << 27), "draft_tokens.size(0) (", B, " rows) is too large for one launch");

  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  const auto long_opts = draft_tokens.options().dtype(at::kLong);
  at::Tensor accept_len = at::empty({B}, long_opts);
  at::Tensor accepted_nodes = at::empty({B, N}, long_opts);
  at::Tensor out_tokens = at::empty({B, N + 1}, long_opts);
  if (B == 0) return {accept_len, accepted_nodes, out_tokens};

  const at::Tensor logits = last_dim_contiguous(target_logits);
  at::Tensor draft_probs;
  if (dp_ptr != nullptr) draft_probs = last_dim_contiguous(*dp_ptr);
  // The current distribution p of each row in sampling mode (unused by greedy rows).
  at::Tensor scratch = at::empty({B, V}, target_logits.options().dtype(at::kFloat));

  verify::Params p{};
  p.tokens = draft_tokens.data_ptr();
  p.tokens64 = draft_tokens.scalar_type() == at::kLong;
  p.tok_sb = draft_tokens.stride(0), p.tok_sn = draft_tokens.stride(1);
  p.parents = parents.data_ptr();
  p.parents64 = parents.scalar_type() == at::kLong;
  p.par_sb = parents.stride(0), p.par_sn = parents.stride(1);
  p.logits = logits.data_ptr();
  p.lg_sb = logits.stride(0), p.lg_sr = logits.stride(1);
  if (draft_probs.defined()) {
    p.draft_probs = draft_probs.data_ptr();
    p.dp_sb = draft_probs.stride(0), p.dp_sr = draft_probs.stride(1);
  }
  p.temperature = temperature.data_ptr();
  p.temp_f64 = temperature.scalar_type() == at::kDouble;
  p.temp_s = temperature.stride(0);
  p.uniform = uniform.data_ptr();
  p.unif_f64 = uniform.scalar_type() == at::kDouble;
  p.u_sb = uniform.stride(0), p.u_sn = uniform.stride(1);
  p.scratch = scratch.data_ptr<float>();
  p.accept_len = accept_len.data_ptr<int64_t>();
  p.accepted_nodes = accepted_nodes.data_ptr<int64_t>();
  p.out_tokens = out_tokens.data_ptr<int64_t>();
  p.B = B, p.N = N, p.V = V;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(draft_tokens.get_device(), stream);
  p.error = checks.word;
  // A float32 q beside half-precision (or float64) logits gets its own instantiation.
  const bool q_float = draft_probs.defined() && draft_probs.scalar_type() != logits.scalar_type();
  SPARROW_FLOAT_SWITCH(logits.scalar_type(), "target_logits", [&] {
    // 16-byte loads of the logits rows when every row start is aligned and V divides evenly.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec_ok = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && V % kVec == 0 && p.lg_sb % kVec == 0 &&
                        p.lg_sr % kVec == 0;
    const auto go = [&](auto q_tag) {
      using Q = typename decltype(q_tag)::type;
      if (vec_ok) launch<scalar_t, Q, kVec>(p, stream);
      else launch<scalar_t, Q, 1>(p, stream);
    };
    if (q_float) go(TypeTag<float>{});
    else go(TypeTag<scalar_t>{});
  });
  finish_value_checks(checks, stream);
  return {accept_len, accepted_nodes, out_tokens};
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("verify", &sparrow::verify_cuda); }
