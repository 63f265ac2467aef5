// CUDA launcher of fused_fc (kernels in fused_fc.cuh). Contract: DESIGN.md ("fused_fc").
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>

#include "checks.h"
#include "cuda/fused_fc.cuh"
#include "cuda/static_switch.h"
#include "cuda/value_checks.h"

namespace sparrow {
namespace {

// Path by N. Up to 16 rows the cost is one pass over the weight whatever the math (decode:
// weight bytes >> input bytes), so the rows kernels stream it once with every row's accumulators
// in registers; from 17 rows on a GEMM's on-chip reuse of weight tiles (cuBLAS) is what pays, and
// holding more rows per lane would cost registers the weight stream needs for loads in flight.
constexpr int64_t kRowsMaxN = 16;
// float64 (a test dtype) holds two registers per accumulator: its 16-row SIMT tile would spill.
constexpr int64_t kRowsMaxNDouble = 8;
// Output rows per warp in rows_kernel (R): each x element loaded from L1 feeds R FMAs.
constexpr int kRowsPerWarp = 4;
// Gather blocks: one per input row up to this many, then grid-stride (keeps the grid legal for any N).
constexpr int64_t kMaxGatherBlocks = 1 << 16;

// The kernels need a unit stride along the last dimension; anything else is copied once (rare:
// a transposed weight or embedding).
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Can embed and hidden (and the weight, if used) be read in VEC-element vectors: pointers, row
// strides and the segment widths D, H all multiples of VEC (so a vector never straddles them).
template <typename T>
bool vectorizable(const fused_fc::Params& p, int64_t vec, bool with_weight) {
  const int64_t bytes = vec * static_cast<int64_t>(sizeof(T));
  bool ok = aligned(p.embed, bytes) && aligned(p.hidden, bytes) && p.D % vec == 0 && p.H % vec == 0 &&
            p.embed_stride % vec == 0 && p.hidden_stride % vec == 0;
  if (with_weight) ok = ok && aligned(p.weight, bytes) && p.weight_stride % vec == 0;
  return ok;
}

// mma_rows_kernel needs a device of compute capability 8.0+ *and* a kernel image built for a
// compute_80+ target: __CUDA_ARCH__ is that of the image the device runs, so a build for older
// targets only (say TORCH_CUDA_ARCH_LIST=7.5+PTX, JIT-compiled on an sm_90) holds the kernel's
// __trap() fallback instead of the mma's. ptxVersion is that image's virtual architecture (both NT
// instances share the compile flags). Read once per device and dtype; host queries, no sync.
template <typename T>
bool mma_rows_usable(int device) {
  static std::array<std::atomic<int>, 64> state{};  // 0: not read yet, 1: no, 2: yes
  if (device < 0 || device >= static_cast<int>(state.size())) return false;
  int s = state[device].load(std::memory_order_relaxed);
  if (s == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    bool ok = major >= 8;
    if (ok) {
      cudaFuncAttributes attr{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_fc::mma_rows_kernel<T, 8>));  // current device
      ok = attr.ptxVersion >= 80;
    }
    s = ok ? 2 : 1;
    state[device].store(s, std::memory_order_relaxed);
  }
  return s == 2;
}

template <typename T, int VEC>
void launch_rows(const fused_fc::Params& p, cudaStream_t stream) {
  constexpr int R = kRowsPerWarp;
  const int64_t rows_per_block = fused_fc::kRowsWarps * R;
  const int64_t row_tiles = (p.Dout + rows_per_block - 1) / rows_per_block;
  const dim3 block(fused_fc::kRowsWarps * 32);
  // Smallest input-row tile that covers N (<= 16): every weight row is streamed once.
  auto go = [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    const dim3 grid(static_cast<unsigned>((p.N + NT - 1) / NT), static_cast<unsigned>(std::min<int64_t>(row_tiles, 65535)));
    fused_fc::rows_kernel<T, VEC, NT, R><<<grid, block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  constexpr int kMaxNT = std::is_same_v<T, double> ? static_cast<int>(kRowsMaxNDouble) : static_cast<int>(kRowsMaxN);
  if (p.N <= 1) go(std::integral_constant<int, 1>{});
  else if (p.N <= 2) go(std::integral_constant<int, 2>{});
  else if (p.N <= 4) go(std::integral_constant<int, 4>{});
  else if (p.N <= 8) go(std::integral_constant<int, 8>{});
  else go(std::integral_constant<int, kMaxNT>{});
}

// One 8-row input tile up to N = 8, two up to 16; one block per 32 output rows.
template <typename T>
void launch_mma_rows(const fused_fc::Params& p, cudaStream_t stream) {
  constexpr int64_t rows_per_block = 16 * fused_fc::kMmaTilesM;
  const dim3 grid(static_cast<unsigned>((p.Dout + rows_per_block - 1) / rows_per_block));
  const dim3 block(fused_fc::kMmaWarps * 32);
  if (p.N <= 8) fused_fc::mma_rows_kernel<T, 8><<<grid, block, 0, stream>>>(p);
  else fused_fc::mma_rows_kernel<T, 16><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// N <= kRowsMaxN: tensor cores for half types with 16-byte alignment, SIMT otherwise (float32 and
// float64 stay memory-bound there: 4-8 bytes of weight per element halve the FMA rate needed).
template <typename T>
at::Tensor rows_path(fused_fc::Params p, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& embed,
                     cudaStream_t stream) {
  const at::Tensor weight_c = last_dim_contiguous(weight);
  at::Tensor out = at::empty({p.N, p.Dout}, embed.options());
  p.weight = weight_c.data_ptr();
  p.weight_stride = weight_c.stride(0);
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vectorizable<T>(p, kVec, /*with_weight=*/true);
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (vec && mma_rows_usable<T>(embed.get_device())) {
      launch_mma_rows<T>(p, stream);
      return out;
    }
  }
  if (vec) launch_rows<T, kVec>(p, stream);
  else launch_rows<T, 1>(p, stream);
  return out;
}

// N > kRowsMaxN: gather x = cat(embed[tok], hidden) into scratch, then cuBLAS with the weight's
// transposed view (no weight copy) and the bias in the same call. An interim (see fused_fc.cuh):
// the scratch costs N * (D+H) elements written and read back on top of the matmul.
template <typename T>
at::Tensor gather_matmul_path(fused_fc::Params p, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& embed, cudaStream_t stream) {
  at::Tensor x = at::empty({p.N, p.D + p.H}, embed.options());
  p.out = x.data_ptr();
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(std::min(p.N, kMaxGatherBlocks)));
  if (vectorizable<T>(p, kVec, /*with_weight=*/false)) {
    fused_fc::gather_kernel<T, kVec><<<grid, fused_fc::kGatherThreads, 0, stream>>>(p);
  } else {
    fused_fc::gather_kernel<T, 1><<<grid, fused_fc::kGatherThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
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
  if (N == 0 || Dout == 0) return at::empty({N, Dout}, embed.options());  // (no launch: the ids are not checked)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ValueChecks checks = begin_value_checks(embed.get_device(), stream);

  const at::Tensor embed_c = last_dim_contiguous(embed);
  const at::Tensor hidden_c = last_dim_contiguous(hidden);
  const at::Tensor tok = token_ids.stride(0) == 1 ? token_ids : token_ids.contiguous();
  at::Tensor bias;
  if (bias_ptr != nullptr) bias = bias_ptr->stride(0) == 1 ? *bias_ptr : bias_ptr->contiguous();

  fused_fc::Params p{};
  p.tok = tok.data_ptr();
  p.tok64 = tok.scalar_type() == at::kLong;
  p.embed = embed_c.data_ptr();
  p.embed_stride = embed_c.stride(0);
  p.V = V;
  p.hidden = hidden_c.data_ptr();
  p.hidden_stride = hidden_c.stride(0);
  p.N = N;
  p.D = D;
  p.H = H;
  p.Dout = Dout;
  p.error = checks.word;

  const at::Tensor out = SPARROW_FLOAT_SWITCH(embed_c.scalar_type(), "embed", [&] {
    const int64_t rows_max_n = std::is_same_v<scalar_t, double> ? kRowsMaxNDouble : kRowsMaxN;
    if (N <= rows_max_n) return rows_path<scalar_t>(p, weight, bias, embed, stream);
    return gather_matmul_path<scalar_t>(p, weight, bias, embed, stream);
  });
  finish_value_checks(checks, stream);
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) { m.impl("fused_fc", &sparrow::fused_fc_cuda); }
