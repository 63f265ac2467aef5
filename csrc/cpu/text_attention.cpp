// CPU kernel of sparrow::text_attention: the draft's attention over its text-only KV cache.
// Contract: DESIGN.md ("text_attention") and sparrow/reference.py, which this must match.
//
// One task = (batch row b, KV head g, block of new queries). Its rows are every (query, head) pair
// of the block whose head reads KV head g, so each K/V slot is loaded and converted once per task
// and reused by all the query heads of the group (GQA decode: 7 heads per K/V row).
// Keys are visited once, in tiles, with an online ("flash") softmax: a running max and sum per row
// rescale the accumulator, so memory is O(rows x head dim) whatever the cache length.
// The visible slots of a row are a contiguous prefix range plus the masked block of new slots, so
// nothing outside them is touched. Caches are read through their strides (a view of a bigger
// cache, or a [B,h,L,d] tensor transposed to [B,L,h,d], costs no copy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "error_word.h"

// at::vec selects its implementation from CPU_CAPABILITY macros that ATen's own kernels get from
// per-file build flags. This file is built with the project's generic flags, so on x86-64 it opts
// into AVX2+FMA (every x86-64 CPU since 2013/2015) for the vector code below; the op checks the CPU
// at run time and says so rather than faulting. Everything torch-generic is included above, before
// the switch, so only the vector kernels are compiled for AVX2.
#if defined(__x86_64__) && !defined(CPU_CAPABILITY) && (defined(__GNUC__) || defined(__clang__))
#define SPARROW_TA_X86_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 8-wide functions (Vectorized<float>::exp calls them; libtorch exports them)
// only under __AVX__/__AVX2__, which a target pragma does not define: define them for that header.
#if !defined(__AVX__) && !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#endif
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace sparrow {
namespace {

using at::vec::Vectorized;

constexpr int64_t kKeyTile = 64;   // keys per tile: S tile and K/V tile buffers stay in L1/L2
constexpr int64_t kRowTarget = 32; // (query, head) rows per task, rounded to whole queries

// Accumulation type: float32 for every float type but float64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// dst[0..n) = float(src[0..n)), then zeros up to n_pad. Vectorised for the 16-bit types.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n, int64_t n_pad) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
    c = n;
  } else {
    using V = Vectorized<float>;
    for (; c + 2 * V::size() <= n; c += 2 * V::size()) {
      V lo, hi;
      at::vec::load_to_float(src + c, lo, hi);
      lo.store(dst + c);
      hi.store(dst + c + V::size());
    }
    for (; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }
  std::fill(dst + c, dst + n_pad, acc_t(0));
}

// s[r, j] = q[r, :] . k[j, :] for an RB x KB block; dp is a multiple of the vector width.
template <int RB, int KB, typename T>
inline void qk_block(const T* q, int64_t ldq, const T* k, int64_t ldk, T* s, int64_t lds, int64_t dp) {
  using V = Vectorized<T>;
  V acc[RB][KB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < KB; ++j) acc[r][j] = V(T(0));
  for (int64_t c = 0; c < dp; c += V::size()) {
    V kv[KB];
    for (int j = 0; j < KB; ++j) kv[j] = V::loadu(k + j * ldk + c);
    for (int r = 0; r < RB; ++r) {
      V qv = V::loadu(q + r * ldq + c);
      for (int j = 0; j < KB; ++j) acc[r][j] = at::vec::fmadd(qv, kv[j], acc[r][j]);
    }
  }
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> && RB == 4 && KB == 2) {
    // The 8 horizontal sums at once (hadd tree): 9 instructions instead of 8 full reductions.
    const __m256 t0 = _mm256_hadd_ps(acc[0][0], acc[0][1]), t1 = _mm256_hadd_ps(acc[1][0], acc[1][1]);
    const __m256 t2 = _mm256_hadd_ps(acc[2][0], acc[2][1]), t3 = _mm256_hadd_ps(acc[3][0], acc[3][1]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    // u0 = [r0j0 r0j1 r1j0 r1j1 | same, upper halves], u1 likewise for rows 2, 3.
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    alignas(32) float out[8];
    _mm256_store_ps(out, sums);
    for (int r = 0; r < 4; ++r) s[r * lds] = out[2 * r], s[r * lds + 1] = out[2 * r + 1];
    return;
  }
#endif
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < KB; ++j)
      s[r * lds + j] = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc[r][j]);
}

template <int KB, typename T>
inline void qk_keys(const T* q, const T* k, int64_t ldk, T* s, int64_t R, int64_t dp, int64_t lds) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) qk_block<4, KB>(q + r * dp, dp, k, ldk, s + r * lds, lds, dp);
  switch (R - r) {
    case 3: qk_block<3, KB>(q + r * dp, dp, k, ldk, s + r * lds, lds, dp); break;
    case 2: qk_block<2, KB>(q + r * dp, dp, k, ldk, s + r * lds, lds, dp); break;
    case 1: qk_block<1, KB>(q + r * dp, dp, k, ldk, s + r * lds, lds, dp); break;
    default: break;
  }
}

// S[R, n] = Q[R, :] K[n, :]^T; rows of Q are dp apart, rows of K ldk apart. Keys outer: a pair
// of K rows stays in L1 while every row block reads it.
template <typename T>
void qk_tile(const T* q, const T* k, int64_t ldk, T* s, int64_t R, int64_t n, int64_t dp, int64_t lds) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) qk_keys<2>(q, k + j * ldk, ldk, s + j, R, dp, lds);
  if (j < n) qk_keys<1>(q, k + j * ldk, ldk, s + j, R, dp, lds);
}

// acc[r, c..c+CB*W) += sum_j p[r, j] v[j, c..]
template <int RB, int CB, typename T>
inline void pv_block(const T* p, int64_t ldp, const T* v, int64_t ldv, T* acc, int64_t lda, int64_t n) {
  using V = Vectorized<T>;
  V a[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) a[r][c] = V::loadu(acc + r * lda + c * V::size());
  for (int64_t j = 0; j < n; ++j) {
    V vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = V::loadu(v + j * ldv + c * V::size());
    for (int r = 0; r < RB; ++r) {
      V pr(p[r * ldp + j]);
      for (int c = 0; c < CB; ++c) a[r][c] = at::vec::fmadd(pr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) a[r][c].store(acc + r * lda + c * V::size());
}

template <int CB, typename T>
inline void pv_cols(const T* p, int64_t ldp, const T* v, int64_t ldv, T* acc, int64_t R, int64_t n, int64_t dp) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_block<4, CB>(p + r * ldp, ldp, v, ldv, acc + r * dp, dp, n);
  switch (R - r) {
    case 3: pv_block<3, CB>(p + r * ldp, ldp, v, ldv, acc + r * dp, dp, n); break;
    case 2: pv_block<2, CB>(p + r * ldp, ldp, v, ldv, acc + r * dp, dp, n); break;
    case 1: pv_block<1, CB>(p + r * ldp, ldp, v, ldv, acc + r * dp, dp, n); break;
    default: break;
  }
}

// ACC[R, :] += P[R, n] V[n, :]; rows of ACC are dp apart, rows of V ldv apart. Columns outer: a
// column strip of the V tile stays in L1 while every row block reads it.
template <typename T>
void pv_tile(const T* p, int64_t ldp, const T* v, int64_t ldv, T* acc, int64_t R, int64_t n, int64_t dp) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + 2 * W <= dp; c += 2 * W) pv_cols<2>(p, ldp, v + c, ldv, acc + c, R, n, dp);
  if (c < dp) pv_cols<1>(p, ldp, v + c, ldv, acc + c, R, n, dp);
}

template <typename T>
inline T max_of(const T* s, int64_t n) {
  using V = Vectorized<T>;
  V vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) vmax = at::vec::maximum(vmax, V::loadu(s + j));
  T m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// p[0..n) = exp(s[0..n) - m) in place; returns their sum. exp(-inf) = 0 covers masked slots.
// exp_u20 (float: a 20-ulp polynomial, no call) is far cheaper than libm/Sleef exp and well
// inside the error of the 16-bit types; the draft's output only steers acceptance.
template <typename T>
inline T exp_sum(T* s, int64_t n, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V vsum(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V e = (V::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

template <typename T>
inline void scale_row(T* x, int64_t dp, T alpha) {
  using V = Vectorized<T>;
  const V va(alpha);
  for (int64_t c = 0; c < dp; c += V::size()) (V::loadu(x + c) * va).store(x + c);
}

// Ask for the next key tile's K and V rows while this one is computed: cache rows are strided (a
// whole row of heads apart), which hides them from the hardware prefetcher.
template <typename T>
inline void prefetch_rows(const T* rows, int64_t stride, int64_t n, int64_t d) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d * int64_t(sizeof(T)); c += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows + j * stride) + c);
}

struct Problem {
  int64_t B, Lq, hq, hkv, d, L, group, window;
  int64_t q_sb, q_si, q_sh;  // q strides (last dim contiguous)
  int64_t k_sb, k_sl, k_sh;  // k_cache strides
  int64_t v_sb, v_sl, v_sh;  // v_cache strides
  const int64_t* lens;       // [B]
  const bool* mask;          // [B, Lq, Lq] contiguous, or nullptr (causal)
};

template <typename scalar_t>
void text_attention_kernel(const Problem& P, const scalar_t* q, const scalar_t* k, const scalar_t* v, double scale_d,
                           scalar_t* out) {
  using acc_t = typename Acc<scalar_t>::type;
  using V = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t G = P.group, d = P.d;
  const int64_t dp = (d + V::size() - 1) / V::size() * V::size();  // padded head dim
  const int64_t q_block = std::max<int64_t>(1, std::min<int64_t>(P.Lq, (kRowTarget + G - 1) / G));
  const int64_t n_qblocks = (P.Lq + q_block - 1) / q_block;
  const int64_t max_rows = q_block * G;

  at::parallel_for(0, P.B * P.hkv * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(max_rows * dp), acc(max_rows * dp), sbuf(max_rows * kKeyTile);
    std::vector<acc_t> kbuf(kKeyTile * dp), vbuf(kKeyTile * dp), row_max(max_rows), row_sum(max_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, g = (task / n_qblocks) % P.hkv, b = task / (n_qblocks * P.hkv);
      const int64_t i0 = qb * q_block, i1 = std::min(P.Lq, i0 + q_block), R = (i1 - i0) * G;
      const int64_t prefix_end = P.lens[b] - P.Lq;
      const int64_t prefix_start = P.window > 0 ? std::max<int64_t>(0, prefix_end - P.window) : 0;
      const bool* mask = P.mask ? P.mask + b * P.Lq * P.Lq : nullptr;

      // Rows: r = (i - i0) * G + j is query i with head g*G + j; q pre-scaled.
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t r = (i - i0) * G + j;
          load_row(q + b * P.q_sb + i * P.q_si + (g * G + j) * P.q_sh, qbuf.data() + r * dp, d, dp);
          scale_row(qbuf.data() + r * dp, dp, scale);
        }
      std::fill(acc.begin(), acc.begin() + R * dp, acc_t(0));
      std::fill(row_max.begin(), row_max.begin() + R, kNegInf);
      std::fill(row_sum.begin(), row_sum.begin() + R, acc_t(0));

      // New slots this block may see: [new_lo, new_hi) relative to prefix_end.
      int64_t new_lo = 0, new_hi = i1;  // causal
      if (mask) {
        new_lo = P.Lq, new_hi = 0;
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t m = 0; m < P.Lq; ++m)
            if (mask[i * P.Lq + m]) new_lo = std::min(new_lo, m), new_hi = std::max(new_hi, m + 1);
      }

      auto visit = [&](int64_t start, int64_t stop, bool masked) {
        for (int64_t j0 = start; j0 < stop; j0 += kKeyTile) {
          const int64_t n = std::min(kKeyTile, stop - j0);
          const scalar_t* krow = k + b * P.k_sb + j0 * P.k_sl + g * P.k_sh;
          const scalar_t* vrow = v + b * P.v_sb + j0 * P.v_sl + g * P.v_sh;
          if (j0 + kKeyTile < stop) {
            const int64_t n_next = std::min(kKeyTile, stop - j0 - kKeyTile);
            prefetch_rows(krow + kKeyTile * P.k_sl, P.k_sl, n_next, d);
            prefetch_rows(vrow + kKeyTile * P.v_sl, P.v_sl, n_next, d);
          }
          const acc_t *kt = kbuf.data(), *vt = vbuf.data();
          int64_t ldk = dp, ldv = dp;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (d == dp) {  // read the cache in place
              kt = krow, vt = vrow, ldk = P.k_sl, ldv = P.v_sl;
            }
          }
          if (kt == kbuf.data()) {  // convert (and pad) the tile once for all the group's rows
            for (int64_t j = 0; j < n; ++j) {
              load_row(krow + j * P.k_sl, kbuf.data() + j * dp, d, dp);
              load_row(vrow + j * P.v_sl, vbuf.data() + j * dp, d, dp);
            }
          }
          acc_t* s = sbuf.data();
          qk_tile(qbuf.data(), kt, ldk, s, R, n, dp, kKeyTile);
          for (int64_t r = 0; r < R; ++r) {
            acc_t* sr = s + r * kKeyTile;
            if (masked) {
              const int64_t i = i0 + r / G;
              for (int64_t j = 0; j < n; ++j) {
                const int64_t m = j0 + j - prefix_end;
                if (!(mask ? mask[i * P.Lq + m] : m <= i)) sr[j] = kNegInf;
              }
            }
            const acc_t new_max = std::max(row_max[r], max_of(sr, n));
            if (new_max == kNegInf) {  // nothing visible yet: contribute nothing
              std::fill(sr, sr + n, acc_t(0));
              continue;
            }
            const acc_t alpha = std::exp(row_max[r] - new_max);  // 0 when row_max was -inf
            if (alpha != acc_t(1)) scale_row(acc.data() + r * dp, dp, alpha);
            row_sum[r] = row_sum[r] * alpha + exp_sum(sr, n, new_max);
            row_max[r] = new_max;
          }
          pv_tile(s, kKeyTile, vt, ldv, acc.data(), R, n, dp);
        }
      };
      visit(prefix_start, prefix_end, /*masked=*/false);
      if (new_lo < new_hi) visit(prefix_end + new_lo, prefix_end + new_hi, /*masked=*/true);

      // out = acc / sum; a row that saw nothing stays zero.
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t r = (i - i0) * G + j;
          const acc_t inv = row_sum[r] > acc_t(0) ? acc_t(1) / row_sum[r] : acc_t(0);
          const acc_t* a = acc.data() + r * dp;
          scalar_t* o = out + ((b * P.Lq + i) * P.hq + g * G + j) * d;
          for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
        }
    }
  });
}

}  // namespace
}  // namespace sparrow

// End of the AVX2 region: the launcher below is generic code, so it runs (and can refuse) anywhere.
#if defined(SPARROW_TA_X86_AVX2)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace sparrow {
namespace {

bool cpu_supports_kernel() {
#if defined(SPARROW_TA_X86_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return true;
#endif
}

at::Tensor text_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask, double scale,
                              int64_t window) {
  check_text_attention_args(q, k_cache, v_cache, cache_lens, tree_mask.has_value() ? &*tree_mask : nullptr);
  const int64_t B = q.size(0), Lq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t L = k_cache.size(1), hkv = k_cache.size(2);
  const at::Tensor lens = cache_lens.to(at::kLong).contiguous();
  const int64_t* lens_ptr = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    if (lens_ptr[b] < Lq || lens_ptr[b] > L) raise_error(err::kTextAttentionLens, b, lens_ptr[b], err::pack2(Lq, L));
  TORCH_CHECK(cpu_supports_kernel(), "sparrow text_attention: the CPU kernel needs AVX2 and FMA");

  at::Tensor out = at::empty({B, Lq, hq, d}, q.options());
  if (out.numel() == 0) return out;
  // Only the head dim must be contiguous; q is small, and a cache whose last dim is strided is rare
  // enough that a copy is an acceptable fallback.
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  at::Tensor mask;
  if (tree_mask.has_value()) mask = tree_mask->contiguous();

  Problem P{B, Lq, hq, hkv, d, L, hq / hkv, window,
            qc.stride(0), qc.stride(1), qc.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            lens_ptr, mask.defined() ? mask.data_ptr<bool>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "text_attention_cpu", [&] {
    text_attention_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), scale,
                                    out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("text_attention", &sparrow::text_attention_cpu); }
