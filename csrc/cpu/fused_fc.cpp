// fused_fc on CPU: out[n,o] = dot(embed[tok[n]], W[o,:D]) + dot(hidden[n], W[o,D:]) + bias[o].
// Contract: DESIGN.md ("fused_fc") and sparrow/reference.py. Neither embed[token_ids] nor the
// concatenation is built: the input rows are read in place (float32/float64 with unit inner
// stride) or converted tile by tile into a small per-thread buffer (half types, strided views).
//
// Work split: tasks are (block of kOutBlock output features) x (chunk of up to kRowChunk rows), so
// at decode-like N every weight row is read from memory once, by one thread, with all N rows
// inside. Within a task the reduction dim runs in chunks so that the weight block of the chunk
// (kWeightBlock elements) stays in L2 while the rows stream past it in small groups. The micro-kernel keeps a
// block of (output, row) dot products in vector registers along the reduction dim (4x6 with
// AVX-512) and sums each vector's lanes once per chunk.
//
// The project is built without -march flags, so the micro-kernel is compiled three times, for
// AVX-512, AVX2+FMA and baseline x86-64, by including this file's kernel section into one
// namespace per instruction set under `#pragma GCC target`; the best one the CPU runs is picked
// once at load time.
#ifndef SPARROW_FUSED_FC_KERNEL_SECTION

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"

namespace sparrow {
namespace fused_fc_detail {

constexpr int64_t kOutBlock = 32;        // output features per task
constexpr int64_t kRowChunk = 256;       // rows per task (all of them at decode-like N)
constexpr int64_t kWeightBlock = 65536;  // weight elements per pass (256 KiB of float32, L2)

// Plain-pointer view of one call's arguments (element strides).
template <typename scalar_t>
struct FcArgs {
  const int64_t* tok;
  int64_t tok_stride;
  const scalar_t* embed;
  int64_t e_s0, e_s1;
  const scalar_t* hidden;
  int64_t h_s0, h_s1;
  const scalar_t* weight;
  int64_t w_s0, w_s1;
  const scalar_t* bias;  // nullptr: no bias
  int64_t b_s0;
  scalar_t* out;  // [N, Dout] contiguous
  int64_t N, D, H, Dout;
};

}  // namespace fused_fc_detail
}  // namespace sparrow

#define SPARROW_FUSED_FC_KERNEL_SECTION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")
namespace sparrow::fused_fc_detail::isa_avx512 {
constexpr int kVecBytes = 64;  // 32 vector registers: a 4x6 tile of accumulators + 10 operands
constexpr int kTileOut = 4, kTileRows = 6;
#include __FILE__
}  // namespace sparrow::fused_fc_detail::isa_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace sparrow::fused_fc_detail::isa_avx2 {
constexpr int kVecBytes = 32;  // 16 vector registers: a 4x2 tile + 6 operands
constexpr int kTileOut = 4, kTileRows = 2;
#include __FILE__
}  // namespace sparrow::fused_fc_detail::isa_avx2
#pragma GCC pop_options
namespace sparrow::fused_fc_detail::isa_base {
constexpr int kVecBytes = 16;
constexpr int kTileOut = 4, kTileRows = 2;
#include __FILE__
}  // namespace sparrow::fused_fc_detail::isa_base
#undef SPARROW_FUSED_FC_KERNEL_SECTION

namespace sparrow {
namespace {
using namespace fused_fc_detail;

enum class Isa { kAvx512, kAvx2, kBase };

Isa best_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
}

template <typename scalar_t>
void run_tasks(const FcArgs<scalar_t>& a) {
  const int64_t out_blocks = (a.Dout + kOutBlock - 1) / kOutBlock;
  const int64_t row_chunks = (a.N + kRowChunk - 1) / kRowChunk;
  const Isa isa = best_isa();
  // At least ~256k multiply-adds per thread, so tiny calls do not pay for waking the pool.
  const int64_t task_work = kOutBlock * std::min(a.N, kRowChunk) * std::max<int64_t>(1, a.D + a.H);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / task_work);
  at::parallel_for(0, out_blocks * row_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = (t % out_blocks) * kOutBlock, n0 = (t / out_blocks) * kRowChunk;
      const int64_t o1 = std::min(a.Dout, o0 + kOutBlock), n1 = std::min(a.N, n0 + kRowChunk);
      switch (isa) {
        case Isa::kAvx512: isa_avx512::run_task(a, o0, o1, n0, n1); break;
        case Isa::kAvx2: isa_avx2::run_task(a, o0, o1, n0, n1); break;
        case Isa::kBase: isa_base::run_task(a, o0, o1, n0, n1); break;
      }
    }
  });
}

at::Tensor fused_fc_cpu(const at::Tensor& token_ids, const at::Tensor& embed, const at::Tensor& hidden,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  SPARROW_CHECK_DIM(token_ids, 1);
  SPARROW_CHECK_DIM(embed, 2);
  SPARROW_CHECK_DIM(hidden, 2);
  SPARROW_CHECK_DIM(weight, 2);
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, "token_ids must be int64, got ", token_ids.scalar_type());
  SPARROW_CHECK_FLOAT_DTYPE(embed);
  SPARROW_CHECK_SAME_DTYPE(embed, hidden);
  SPARROW_CHECK_SAME_DTYPE(embed, weight);
  SPARROW_CHECK_SAME_DEVICE(embed, token_ids);
  SPARROW_CHECK_SAME_DEVICE(embed, hidden);
  SPARROW_CHECK_SAME_DEVICE(embed, weight);
  const int64_t N = token_ids.size(0), V = embed.size(0), D = embed.size(1), H = hidden.size(1);
  const int64_t Dout = weight.size(0);
  SPARROW_CHECK_SIZE(hidden, 0, N);
  TORCH_CHECK(weight.size(1) == D + H, "weight.size(1) must be D + H = ", D, " + ", H, " = ", D + H,
              " (embed width + hidden width), got weight shape ", weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == Dout, "bias must have shape [", Dout, "] (weight.size(0)), got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == embed.scalar_type(), "bias must have the dtype of embed (",
                embed.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == embed.device(), "bias must be on embed's device (", embed.device(), "), got ",
                b.device());
  }
  const int64_t* tok = token_ids.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t id = tok[n * token_ids.stride(0)];
    TORCH_CHECK(id >= 0 && id < V, "token_ids[", n, "] = ", id, " is outside [0, ", V, ") (embed.size(0))");
  }

  at::Tensor out = at::empty({N, Dout}, embed.options());
  if (N == 0 || Dout == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embed.scalar_type(), "sparrow::fused_fc", [&] {
    FcArgs<scalar_t> a{};
    a.tok = tok;
    a.tok_stride = token_ids.stride(0);
    a.embed = embed.const_data_ptr<scalar_t>();
    a.e_s0 = embed.stride(0);
    a.e_s1 = embed.stride(1);
    a.hidden = hidden.const_data_ptr<scalar_t>();
    a.h_s0 = hidden.stride(0);
    a.h_s1 = hidden.stride(1);
    a.weight = weight.const_data_ptr<scalar_t>();
    a.w_s0 = weight.stride(0);
    a.w_s1 = weight.stride(1);
    a.bias = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    a.b_s0 = bias.has_value() ? bias->stride(0) : 0;
    a.out = out.data_ptr<scalar_t>();
    a.N = N;
    a.D = D;
    a.H = H;
    a.Dout = Dout;
    run_tasks(a);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("fused_fc", &fused_fc_cpu); }

}  // namespace sparrow

#else  // SPARROW_FUSED_FC_KERNEL_SECTION: compiled once per instruction set (see the top).

// float32 accumulation for every type but float64.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(kVecBytes)));
};

// Sum of a vector's lanes: halve the width with vector adds down to 128 bits, then add 2 or 4 lanes.
template <typename acc_t, int kBytes>
inline acc_t lane_sum(const void* v) {
  if constexpr (kBytes > 16) {
    typedef acc_t half __attribute__((vector_size(kBytes / 2)));
    half lo, hi;
    __builtin_memcpy(&lo, v, sizeof(half));
    __builtin_memcpy(&hi, static_cast<const char*>(v) + sizeof(half), sizeof(half));
    lo += hi;
    return lane_sum<acc_t, kBytes / 2>(&lo);
  } else {
    acc_t lanes[16 / sizeof(acc_t)];
    __builtin_memcpy(lanes, v, sizeof(lanes));
    acc_t s = 0;
    for (acc_t x : lanes) s += x;
    return s;
  }
}

// c[j*ldc + i] += sum_k w[i][k] * x[j][k] for i < MR weight rows and j < NR input rows.
template <typename acc_t, int MR, int NR>
void dot_tile(const acc_t* const* w, const acc_t* const* x, int64_t K, acc_t* c, int64_t ldc) {
  using vec = typename VecOf<acc_t>::type;
  constexpr int64_t kLanes = kVecBytes / sizeof(acc_t);
  vec acc[MR][NR] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vec wv[MR], xv[NR];
    for (int i = 0; i < MR; ++i) __builtin_memcpy(&wv[i], w[i] + k, sizeof(vec));
    for (int j = 0; j < NR; ++j) __builtin_memcpy(&xv[j], x[j] + k, sizeof(vec));
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += wv[i] * xv[j];
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      acc_t s = lane_sum<acc_t, kVecBytes>(&acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += w[i][kk] * x[j][kk];
      c[j * ldc + i] += s;
    }
}

template <typename acc_t>
using DotTileFn = void (*)(const acc_t* const*, const acc_t* const*, int64_t, acc_t*, int64_t);

template <typename acc_t, int MR, int... NRs>
constexpr auto dot_tile_row(std::integer_sequence<int, NRs...>) {
  return std::array<DotTileFn<acc_t>, sizeof...(NRs)>{&dot_tile<acc_t, MR, NRs + 1>...};
}

// dot_tile for tail blocks: table[mr-1][nr-1].
template <typename acc_t, int... MRs>
constexpr auto dot_tile_table(std::integer_sequence<int, MRs...>) {
  return std::array<std::array<DotTileFn<acc_t>, kTileRows>, sizeof...(MRs)>{
      dot_tile_row<acc_t, MRs + 1>(std::make_integer_sequence<int, kTileRows>{})...};
}

template <typename scalar_t, typename acc_t>
inline acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _Float16 h;  // hardware conversion (F16C / AVX-512) where the target has it
    __builtin_memcpy(&h, &v, sizeof(h));
    return static_cast<acc_t>(h);
  } else {
    return static_cast<acc_t>(v);
  }
}

// dst[r*ld + k] = src[r*s0 + k*s1] for r < rows, k < K, converted to acc_t.
template <typename scalar_t, typename acc_t>
void pack(const scalar_t* const* src_rows, int64_t s1, int64_t rows, int64_t K, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = src_rows[r];
    acc_t* d = dst + r * ld;
    if (s1 == 1) {
      int64_t k = 0;
      if constexpr (std::is_same_v<scalar_t, c10::Half> && kVecBytes >= 32) {  // F16C, 8 or 16 at a time
        constexpr int64_t kLanes = kVecBytes / sizeof(float);
        for (; k + kLanes <= K; k += kLanes) {
          if constexpr (kVecBytes == 64)
            _mm512_storeu_ps(d + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
          else
            _mm256_storeu_ps(d + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
        }
      }
      for (; k < K; ++k) d[k] = to_acc<scalar_t, acc_t>(src[k]);
    } else {
      for (int64_t k = 0; k < K; ++k) d[k] = to_acc<scalar_t, acc_t>(src[k * s1]);
    }
  }
}

// Rows as acc_t pointers: in place where the data already is acc_t with unit inner stride,
// otherwise converted into buf (rows x K).
template <typename scalar_t, typename acc_t>
void rows_as_acc(const std::vector<const scalar_t*>& src, int64_t s1, int64_t K, std::vector<acc_t>& buf,
                 std::vector<const acc_t*>& rows) {
  const int64_t n = static_cast<int64_t>(src.size());
  rows.resize(n);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (s1 == 1) {
      for (int64_t r = 0; r < n; ++r) rows[r] = src[r];
      return;
    }
  }
  buf.resize(n * K);
  pack<scalar_t, acc_t>(src.data(), s1, n, K, buf.data(), K);
  for (int64_t r = 0; r < n; ++r) rows[r] = buf.data() + r * K;
}

// One task: outputs o0..o1 of rows n0..n1.
template <typename scalar_t>
void run_task(const FcArgs<scalar_t>& a, int64_t o0, int64_t o1, int64_t n0, int64_t n1) {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr auto table = dot_tile_table<acc_t>(std::make_integer_sequence<int, kTileOut>{});
  const int64_t ob = o1 - o0, nb = n1 - n0;
  thread_local std::vector<acc_t> acc, wbuf, xbuf;
  thread_local std::vector<const scalar_t*> wsrc, xsrc;
  thread_local std::vector<const acc_t*> wrows, xrows;
  acc.assign(nb * ob, acc_t(0));  // acc[n*ob + o]
  wsrc.resize(ob);

  for (int seg = 0; seg < 2; ++seg) {  // 0: embed part of the weight, 1: hidden part
    const int64_t K = seg == 0 ? a.D : a.H;
    if (K == 0) continue;
    // Even chunks of at most kWeightBlock / ob elements, a whole number of vectors each but the last.
    const int64_t lanes = kVecBytes / sizeof(acc_t);
    const int64_t max_chunk = kWeightBlock / ob;
    const int64_t chunks = (K + max_chunk - 1) / max_chunk;
    const int64_t step = ((K + chunks - 1) / chunks + lanes - 1) / lanes * lanes;
    for (int64_t k0 = 0; k0 < K; k0 += step) {
      const int64_t kc = std::min(step, K - k0);
      const int64_t wcol = (seg == 0 ? 0 : a.D) + k0;
      for (int64_t o = 0; o < ob; ++o) wsrc[o] = a.weight + (o0 + o) * a.w_s0 + wcol * a.w_s1;
      rows_as_acc<scalar_t, acc_t>(wsrc, a.w_s1, kc, wbuf, wrows);  // reused by every row group
      for (int64_t n = 0; n < nb; n += kTileRows) {
        // A group's rows are converted (if at all) just before use, into a buffer that stays in L1.
        const int64_t nr = std::min<int64_t>(kTileRows, nb - n);
        xsrc.resize(nr);
        for (int64_t j = 0; j < nr; ++j)
          xsrc[j] = seg == 0 ? a.embed + a.tok[(n0 + n + j) * a.tok_stride] * a.e_s0 + k0 * a.e_s1
                             : a.hidden + (n0 + n + j) * a.h_s0 + k0 * a.h_s1;
        rows_as_acc<scalar_t, acc_t>(xsrc, seg == 0 ? a.e_s1 : a.h_s1, kc, xbuf, xrows);
        for (int64_t o = 0; o < ob; o += kTileOut) {
          const int64_t mr = std::min<int64_t>(kTileOut, ob - o);
          table[mr - 1][nr - 1](wrows.data() + o, xrows.data(), kc, acc.data() + n * ob + o, ob);
        }
      }
    }
  }

  for (int64_t n = 0; n < nb; ++n) {
    scalar_t* dst = a.out + (n0 + n) * a.Dout + o0;
    const acc_t* src = acc.data() + n * ob;
    for (int64_t o = 0; o < ob; ++o) {
      const acc_t b = a.bias ? to_acc<scalar_t, acc_t>(a.bias[(o0 + o) * a.b_s0]) : acc_t(0);
      dst[o] = static_cast<scalar_t>(src[o] + b);
    }
  }
}

#endif  // SPARROW_FUSED_FC_KERNEL_SECTION
