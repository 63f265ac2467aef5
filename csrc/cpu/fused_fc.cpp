// fused_fc on CPU: out[n,o] = dot(embed[tok[n]], W[o,:D]) + dot(hidden[n], W[o,D:]) + bias[o].
// Contract: DESIGN.md ("fused_fc") and sparrow/reference.py. Neither embed[token_ids] nor the
// concatenation is built: the input rows are read in place (float32/float64 with unit inner
// stride) or converted tile by tile into a small per-thread buffer (half types, strided views).
//
// Two paths. Decode-like N (and float64, and CPUs without AVX-512): the dot-product path below.
// From a few dozen rows on (kGemmMinRows*; bfloat16 with avx512_bf16 from 4) on AVX-512 CPUs: the
// blocked GEMM path (namespace gemm512, after the kernel sections), which packs weight panels
// per call and uses an outer-product micro-kernel (vdpbf16ps for bfloat16).
//
// Dot-product path. Work split: tasks are (block of kOutBlock output features) x (chunk of up to kRowChunk rows), so
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
#include "error_word.h"

// GCC 12 reports the intentionally undefined registers inside its own AVX-512 intrinsics
// (_mm512_cvtph_ps, _mm512_unpack*_ps, ...) as "may be used uninitialized" once inlined at -O3.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparrow {
namespace fused_fc_detail {

constexpr int64_t kOutBlock = 32;        // output features per task
constexpr int64_t kRowChunk = 256;       // rows per task (all of them at decode-like N)
constexpr int64_t kWeightBlock = 65536;  // weight elements per pass (256 KiB of float32, L2)
// From these row counts on (AVX-512 CPUs) the blocked GEMM path (gemm512) is taken; measured
// crossovers at D=H=Dout=1024, one thread. bfloat16 with vdpbf16ps gains from 4 rows, as the
// dot-product path converts every weight value to float32.
constexpr int64_t kGemmMinRowsF32 = 80;
constexpr int64_t kGemmMinRowsHalf = 32;  // float16, and bfloat16 without avx512_bf16
constexpr int64_t kGemmMinRowsBf16Dot = 4;

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

// ---------------------------------------------------------------------------------------------
// Large-N path (N >= kGemmMinRows*, see there) on AVX-512: a GotoBLAS-style blocked GEMM.
// The dot-product kernel above must sum vector lanes at the end of every chunk and loads both
// operands per multiply; at large N an outer-product micro-kernel is faster: a tile of kMR input
// rows x kNR (= 32) output features lives in 2*kMR vector accumulators; per reduction step it
// loads one 32-wide slice of a packed weight panel and broadcasts one value per input row.
//   task      = kNC output features x up to kGemmRowsPerTask rows (threads split tasks)
//   k-block   = kKC reduction steps: that block of the task's weight is packed (transposed to
//               [panel][k][32], zero-padded, converted) into a per-thread buffer that stays in L2
//   row group = kMR input rows: read in place (float32, unit stride) or converted into a small
//               buffer that stays in L1, then multiplied with every panel of the packed block.
// bfloat16 on CPUs with avx512_bf16 multiplies pairs of reduction steps with vdpbf16ps (32
// multiply-adds per instruction, products exact, float32 sums); every other half type is
// converted to float32 once per packed block / row group.
namespace sparrow::fused_fc_detail::gemm512 {

constexpr int kNR = 32;                     // output features per panel: two 16-float vectors
constexpr int kMR = 8;                      // input rows per micro-tile: 16 accumulators
constexpr int64_t kNC = 256;                // output features per task (8 panels)
constexpr int64_t kGemmRowsPerTask = 512;   // rows per task
constexpr int64_t kKC = 256;                // reduction steps per block (float32: 256 KiB packed)

}  // namespace sparrow::fused_fc_detail::gemm512

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")
namespace sparrow::fused_fc_detail::gemm512 {

// c[i*ldc + j] += sum_k x[i][k] * wp[k*kNR + j] for i < kMR, j < kNR. The block's sum is formed from
// zero and added once: rounding grows with the block length, not with the whole reduction.
__attribute__((noinline)) void tile_f32(const float* const* x, const float* wp, int64_t kc, float* c,
                                        int64_t ldc) {
  __m512 acc[kMR][2];
  const float* xr[kMR];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    xr[i] = x[i];
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(wp + k * kNR), w1 = _mm512_loadu_ps(wp + k * kNR + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const __m512 b = _mm512_set1_ps(xr[i][k]);
      acc[i][0] = _mm512_fmadd_ps(b, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(b, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_ps(c + i * ldc, _mm512_add_ps(_mm512_loadu_ps(c + i * ldc), acc[i][0]));
    _mm512_storeu_ps(c + i * ldc + 16, _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + 16), acc[i][1]));
  }
}

}  // namespace sparrow::fused_fc_detail::gemm512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c,avx512bf16")
namespace sparrow::fused_fc_detail::gemm512 {

// bfloat16 pairs: c[i*ldc + j] += sum_p x[i][2p]*w[2p][j] + x[i][2p+1]*w[2p+1][j], with the
// packed weight as 32-bit words wp[p*kNR + j] = (w[2p][j], w[2p+1][j]) and x rows of 2*kp values.
__attribute__((noinline)) void tile_bf16(const uint16_t* const* x, const uint32_t* wp, int64_t kp, float* c,
                                         int64_t ldc) {
  __m512 acc[kMR][2];
  const uint16_t* xr[kMR];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    xr[i] = x[i];
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + p * kNR);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + p * kNR + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      uint32_t pair;
      __builtin_memcpy(&pair, xr[i] + 2 * p, sizeof(pair));
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], b, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], b, w1);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_ps(c + i * ldc, _mm512_add_ps(_mm512_loadu_ps(c + i * ldc), acc[i][0]));
    _mm512_storeu_ps(c + i * ldc + 16, _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + 16), acc[i][1]));
  }
}

}  // namespace sparrow::fused_fc_detail::gemm512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")
namespace sparrow::fused_fc_detail::gemm512 {

template <typename scalar_t>
inline float to_float(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _Float16 h;
    __builtin_memcpy(&h, &v, sizeof(h));
    return static_cast<float>(h);
  } else {
    return static_cast<float>(v);
  }
}

template <typename scalar_t>
inline uint16_t bits16(scalar_t v) {
  uint16_t b;
  __builtin_memcpy(&b, &v, sizeof(b));
  return b;
}

// dst[k] = float(src[k*s1]) for k < K.
template <typename scalar_t>
void row_to_float(const scalar_t* src, int64_t s1, int64_t K, float* dst) {
  int64_t k = 0;
  if (s1 == 1) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::memcpy(dst, src, K * sizeof(float));
      return;
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      for (; k + 16 <= K; k += 16)
        _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
    } else {  // bfloat16: the float's upper half
      for (; k + 16 <= K; k += 16) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k)));
        _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
    }
  }
  for (; k < K; ++k) dst[k] = to_float(src[k * s1]);
}

// The row as float32: in place where it already is (unit stride), else converted into tmp.
template <typename scalar_t>
const float* row_as_float(const scalar_t* src, int64_t s1, int64_t K, float* tmp) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (s1 == 1) return src;
  }
  row_to_float(src, s1, K, tmp);
  return tmp;
}

// In place transpose of a 16x16 block of 32-bit values: r[i] lane j -> r[j] lane i.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved within 128-bit lanes
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3
    const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d b0 = _mm512_castps_pd(t[4 * i + 2]), b1 = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c
    const __m512 x_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), x_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 y_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 y_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(x_lo, y_lo, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(x_lo, y_lo, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(x_hi, y_hi, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(x_hi, y_hi, 0xDD);
  }
}

// The first `count` (<= 16) values at src (unit stride) as floats, zero beyond.
template <typename scalar_t>
inline __m512 load16_as_float(const scalar_t* src, int64_t count) {
  const __mmask16 m = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, src);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, src);
    if constexpr (std::is_same_v<scalar_t, c10::Half>) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// The first `count` (<= 32) bfloat16 values at src as 16 pair words, zero beyond.
inline __m512 load16_pairs(const c10::BFloat16* src, int64_t count) {
  const __mmask32 m = count >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << count) - 1);
  return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, src));
}

// Packs one panel of 32-bit words from rows of unit stride: for each 16 weight rows (h) and each
// 16 words of reduction, 16 row vectors are loaded, transposed in registers and stored as
// dst[q*kNR + h*16 .. +16] (q: word index). load(row, q0, words) gives 16 words of a row.
template <typename LoadRow>
inline void pack_panel_transposed(int64_t rows, int64_t words, uint32_t* dst, LoadRow load) {
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t q0 = 0; q0 < words; q0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) r[i] = h * 16 + i < rows ? load(h * 16 + i, q0) : _mm512_setzero_ps();
      transpose16x16(r);
      const int64_t nq = std::min<int64_t>(16, words - q0);
      for (int64_t q = 0; q < nq; ++q)
        _mm512_storeu_ps(reinterpret_cast<float*>(dst + (q0 + q) * kNR + h * 16), r[q]);
    }
  }
}

// Packed float panels: wp[(p*kc + k)*kNR + j] = W[o0 + p*kNR + j][col + k], zero past ob.
template <typename scalar_t>
void pack_weight_f32(const FcArgs<scalar_t>& a, int64_t o0, int64_t ob, int64_t col, int64_t kc, float* wp,
                     float* row_tmp) {
  const int64_t panels = (ob + kNR - 1) / kNR;
  if (a.w_s1 == 1) {  // fast path: vector loads and register transposes
    for (int64_t p = 0; p < panels; ++p) {
      const scalar_t* base = a.weight + (o0 + p * kNR) * a.w_s0 + col;
      pack_panel_transposed(std::min<int64_t>(kNR, ob - p * kNR), kc, reinterpret_cast<uint32_t*>(wp + p * kc * kNR),
                            [&](int64_t j, int64_t k0) { return load16_as_float(base + j * a.w_s0 + k0, kc - k0); });
    }
    return;
  }
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = wp + p * kc * kNR;
    for (int64_t j = 0; j < kNR; ++j) {
      const int64_t o = p * kNR + j;
      if (o >= ob) {
        for (int64_t k = 0; k < kc; ++k) dst[k * kNR + j] = 0.f;
        continue;
      }
      const scalar_t* src = a.weight + (o0 + o) * a.w_s0 + col * a.w_s1;
      const float* row = row_as_float(src, a.w_s1, kc, row_tmp);
      for (int64_t k = 0; k < kc; ++k) dst[k * kNR + j] = row[k];
    }
  }
}

// Packed bfloat16 pair panels: wp[(p*kp + q)*kNR + j] = (W[o][col + 2q], W[o][col + 2q + 1]) as one
// 32-bit word (low half: the even step), o = o0 + p*kNR + j; zero past ob and past kc.
inline void pack_weight_bf16(const FcArgs<c10::BFloat16>& a, int64_t o0, int64_t ob, int64_t col, int64_t kc,
                             uint32_t* wp) {
  const int64_t panels = (ob + kNR - 1) / kNR, kp = (kc + 1) / 2;
  if (a.w_s1 == 1) {  // fast path: vector loads and register transposes
    for (int64_t p = 0; p < panels; ++p) {
      const c10::BFloat16* base = a.weight + (o0 + p * kNR) * a.w_s0 + col;
      pack_panel_transposed(std::min<int64_t>(kNR, ob - p * kNR), kp, wp + p * kp * kNR,
                            [&](int64_t j, int64_t q0) { return load16_pairs(base + j * a.w_s0 + 2 * q0, kc - 2 * q0); });
    }
    return;
  }
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* dst = wp + p * kp * kNR;
    for (int64_t j = 0; j < kNR; ++j) {
      const int64_t o = p * kNR + j;
      if (o >= ob) {
        for (int64_t q = 0; q < kp; ++q) dst[q * kNR + j] = 0;
        continue;
      }
      const c10::BFloat16* src = a.weight + (o0 + o) * a.w_s0 + col * a.w_s1;
      int64_t q = 0;
      if (a.w_s1 == 1) {
        for (; q < kc / 2; ++q) __builtin_memcpy(&dst[q * kNR + j], src + 2 * q, sizeof(uint32_t));
      } else {
        for (; q < kc / 2; ++q)
          dst[q * kNR + j] = bits16(src[2 * q * a.w_s1]) | uint32_t{bits16(src[(2 * q + 1) * a.w_s1])} << 16;
      }
      if (q < kp) dst[q * kNR + j] = bits16(src[2 * q * a.w_s1]);  // odd kc: the last step pairs with 0
    }
  }
}

// One task: outputs o0..o1 of rows n0..n1. bf16_dot: scalar_t is bfloat16 and the CPU has avx512_bf16.
template <typename scalar_t>
void gemm_task(const FcArgs<scalar_t>& a, int64_t o0, int64_t o1, int64_t n0, int64_t n1, bool bf16_dot) {
  const int64_t ob = o1 - o0, nb = n1 - n0;
  const int64_t panels = (ob + kNR - 1) / kNR, ldc = panels * kNR;
  const int64_t groups = (nb + kMR - 1) / kMR;
  thread_local std::vector<float> cacc, wpf, xf, tmp;
  thread_local std::vector<uint32_t> wpb;
  thread_local std::vector<uint16_t> xb;
  cacc.assign(groups * kMR * ldc, 0.f);  // cacc[n*ldc + o], rows padded to whole groups
  const int64_t max_step = bf16_dot ? 2 * kKC : kKC;
  const float* xrows[kMR];
  const uint16_t* xrows16[kMR];

  for (int seg = 0; seg < 2; ++seg) {  // 0: embed part of the weight, 1: hidden part
    const int64_t K = seg == 0 ? a.D : a.H;
    if (K == 0) continue;
    const int64_t s1 = seg == 0 ? a.e_s1 : a.h_s1;
    // Even blocks (an even number of steps each for bf16 pairs, but the segment's last).
    const int64_t blocks = (K + max_step - 1) / max_step;
    const int64_t step = ((K + blocks - 1) / blocks + 1) / 2 * 2;
    for (int64_t k0 = 0; k0 < K; k0 += step) {
      const int64_t kc = std::min(step, K - k0), kp = (kc + 1) / 2;
      const int64_t col = (seg == 0 ? 0 : a.D) + k0;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (bf16_dot) {
          wpb.resize(panels * kp * kNR);
          pack_weight_bf16(a, o0, ob, col, kc, wpb.data());
        }
      }
      if (!bf16_dot) {
        wpf.resize(panels * kc * kNR);
        tmp.resize(kc);
        pack_weight_f32(a, o0, ob, col, kc, wpf.data(), tmp.data());
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t n = n0 + g * kMR, mr = std::min<int64_t>(kMR, n1 - n);
        const scalar_t* src[kMR];
        for (int64_t i = 0; i < mr; ++i)
          src[i] = seg == 0 ? a.embed + a.tok[(n + i) * a.tok_stride] * a.e_s0 + k0 * a.e_s1
                            : a.hidden + (n + i) * a.h_s0 + k0 * a.h_s1;
        float* c = cacc.data() + g * kMR * ldc;
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (bf16_dot) {
            // In place where whole pairs are read (unit stride, even kc); else copied, zero-padded.
            const int64_t kpad = 2 * kp;
            xb.resize(kMR * kpad);
            for (int64_t i = 0; i < mr; ++i) {
              if (s1 == 1 && kc % 2 == 0) {
                xrows16[i] = reinterpret_cast<const uint16_t*>(src[i]);
              } else {
                uint16_t* d = xb.data() + i * kpad;
                for (int64_t k = 0; k < kc; ++k) d[k] = bits16(src[i][k * s1]);
                for (int64_t k = kc; k < kpad; ++k) d[k] = 0;
                xrows16[i] = d;
              }
            }
            for (int64_t i = mr; i < kMR; ++i) xrows16[i] = xrows16[0];  // padding rows: results unused
            for (int64_t p = 0; p < panels; ++p) tile_bf16(xrows16, wpb.data() + p * kp * kNR, kp, c + p * kNR, ldc);
            continue;
          }
        }
        xf.resize(kMR * kc);
        for (int64_t i = 0; i < mr; ++i) xrows[i] = row_as_float(src[i], s1, kc, xf.data() + i * kc);
        for (int64_t i = mr; i < kMR; ++i) xrows[i] = xrows[0];  // padding rows: results unused
        for (int64_t p = 0; p < panels; ++p) tile_f32(xrows, wpf.data() + p * kc * kNR, kc, c + p * kNR, ldc);
      }
    }
  }

  for (int64_t n = 0; n < nb; ++n) {
    scalar_t* dst = a.out + (n0 + n) * a.Dout + o0;
    const float* srow = cacc.data() + n * ldc;
    for (int64_t o = 0; o < ob; ++o) {
      const float b = a.bias ? to_float(a.bias[(o0 + o) * a.b_s0]) : 0.f;
      dst[o] = static_cast<scalar_t>(srow[o] + b);
    }
  }
}

}  // namespace sparrow::fused_fc_detail::gemm512
#pragma GCC pop_options


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

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
}

// The large-N path: tasks of gemm512::kNC outputs x row chunks, at least one task per thread.
template <typename scalar_t>
void run_gemm_tasks(const FcArgs<scalar_t>& a) {
  using namespace gemm512;
  const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && cpu_has_avx512_bf16();
  const int64_t out_blocks = (a.Dout + kNC - 1) / kNC;
  const int64_t max_chunks = (a.N + kMR - 1) / kMR;
  int64_t row_chunks = (a.N + kGemmRowsPerTask - 1) / kGemmRowsPerTask;
  row_chunks = std::min(max_chunks, std::max(row_chunks, (at::get_num_threads() + out_blocks - 1) / out_blocks));
  const int64_t rows = ((a.N + row_chunks - 1) / row_chunks + kMR - 1) / kMR * kMR;
  row_chunks = (a.N + rows - 1) / rows;
  at::parallel_for(0, out_blocks * row_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = (t % out_blocks) * kNC, n0 = (t / out_blocks) * rows;
      gemm_task(a, o0, std::min(a.Dout, o0 + kNC), n0, std::min(a.N, n0 + rows), bf16_dot);
    }
  });
}

template <typename scalar_t>
void run_tasks(const FcArgs<scalar_t>& a) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // The blocked path packs (transposes) the whole weight per call, so it pays from a few rows on;
    // below that the dot-product path, which reads the weight in place, is faster.
    const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && cpu_has_avx512_bf16();
    const int64_t min_rows = bf16_dot ? kGemmMinRowsBf16Dot : std::is_same_v<scalar_t, float> ? kGemmMinRowsF32
                                                                                             : kGemmMinRowsHalf;
    if (a.N >= min_rows && best_isa() == Isa::kAvx512) return run_gemm_tasks(a);
  }
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
    if (id < 0 || id >= V) raise_error(err::kFusedFcToken, n, id, V);
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
