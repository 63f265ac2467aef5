// verify: per batch row, accept the path of a draft tree that the target agrees with, greedily
// (temperature 0) or by exact speculative sampling. Contract: DESIGN.md ("verify"); ground truth:
// sparrow/reference.py::verify, whose numerics this kernel mirrors:
//   - logits are compared / soft-maxed in float32 (the reference calls .float(), float64 too);
//     q (draft_probs: float32, or the logits' type) is read as float32 too;
//   - greedy argmax takes the first index among equal maxima (NaN counts as the largest, as in
//     torch.argmax);
//   - the acceptance test u * q(x) < p(x) is evaluated in float64 (Python floats there);
//   - residuals max(0, p - q) and their sum are float32; p is replaced only when the sum is > 0;
//   - the final draw is inverse-CDF over float64 cumulative sums: the first index whose cdf
//     exceeds u * total, clamped to V-1, then moved down to the nearest token with p > 0.
//
// One thread-block cluster of kCluster blocks per row. Greedy rows: every block of the cluster
// walks the tree in lockstep; each argmax is split over the cluster (each block scans 1/kCluster
// of the row, the partial results are exchanged through distributed shared memory), so a level
// streams the row at kCluster SMs' bandwidth. Sampling rows: block 0 of the cluster does all the
// work (the softmax/residual/scan passes stay block-local) and the other blocks leave at once;
// p lives in a [B, V] float32 scratch buffer owned by that block.
#pragma once
#include <cooperative_groups.h>

#include "common.cuh"

namespace sparrow {
namespace verify {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCluster = 8;  // portable maximum cluster size

struct Params {
  const void* tokens;  // [B, N] int64/int32, -1 = padded
  bool tokens64;
  int64_t tok_sb, tok_sn;
  const void* parents;  // [B, N] int64/int32
  bool parents64;
  int64_t par_sb, par_sn;
  const void* logits;  // [B, N+1, V] T, last dim contiguous
  int64_t lg_sb, lg_sr;
  const void* draft_probs;  // [B, N, V] Q (float32 or T) or nullptr
  int64_t dp_sb, dp_sr;
  const void* temperature;  // [B] float32/float64
  bool temp_f64;
  int64_t temp_s;
  const void* uniform;  // [B, N+1] float32/float64
  bool unif_f64;
  int64_t u_sb, u_sn;
  float* scratch;  // [B, V] float32: the current distribution p of each row
  int64_t* accept_len;      // [B]
  int64_t* accepted_nodes;  // [B, N]
  int64_t* out_tokens;      // [B, N+1]
  int64_t B, N, V;
  int64_t* error;  // error word, or nullptr (unchecked)
};

__device__ __forceinline__ double load_real(const void* ptr, bool f64, int64_t i) {
  return f64 ? static_cast<const double*>(ptr)[i] : static_cast<double>(static_cast<const float*>(ptr)[i]);
}

// Dynamic shared memory of one block, laid out by smem_bytes().
struct Smem {
  int64_t* tok;     // [N] draft tokens
  int* kid_start;   // [N+2] CSR offsets: children of node p are kids[kid_start[p] .. kid_start[p+1])
  int* kids;        // [N] children, grouped by parent, node order within a parent
  int* cursor;      // [N+1] fill cursors while building
  int* path;        // [N] accepted nodes
};
__host__ __device__ inline size_t smem_bytes(int64_t N) {
  return static_cast<size_t>(N) * sizeof(int64_t) + static_cast<size_t>(N + 2 + N + N + 1 + N) * sizeof(int);
}
__device__ __forceinline__ Smem carve(unsigned char* raw, int64_t N) {
  Smem s;
  s.tok = reinterpret_cast<int64_t*>(raw);
  s.kid_start = reinterpret_cast<int*>(s.tok + N);
  s.kids = s.kid_start + N + 2;
  s.cursor = s.kids + N;
  s.path = s.cursor + N + 1;
  return s;
}

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// (value, index) order of torch.argmax: NaN beats everything, then larger, then smaller index.
__device__ __forceinline__ bool argmax_better(float v, int64_t i, float bv, int64_t bi) {
  if (isnan(v)) return !isnan(bv) || i < bi;
  if (isnan(bv)) return false;
  return v > bv || (v == bv && i < bi);
}

struct Shared {
  float red_f[kWarps];
  int64_t red_i[kWarps];
  double red_d[kWarps];
  float bcast_f[2];
  double bcast_d[2];
  int64_t bcast_i[2];
  // This block's slice argmax, double-buffered by tree level, read by the whole cluster.
  float part_v[2];
  int64_t part_i[2];
};

// Argmax over the vectors [vbegin, vend) of one logits row, block-wide; every thread gets the
// block's (value, index). An empty slice gives (-inf, INT64_MAX), which any real element beats.
template <typename T, int VEC>
__device__ void slice_argmax(const T* row, int64_t vbegin, int64_t vend, Shared& sh, float& out_v, int64_t& out_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float bv = neg_inf<float>();
  int64_t bi = INT64_MAX;
#pragma unroll 4
  for (int64_t vi = vbegin + threadIdx.x; vi < vend; vi += kThreads) {
    const Vec<T, VEC> x = reinterpret_cast<const Vec<T, VEC>*>(row)[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float v = static_cast<float>(to_acc(x.v[e]));
      const int64_t i = vi * VEC + e;
      if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  if (lane == 0) sh.red_f[warp] = bv, sh.red_i[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    bv = sh.red_f[lane];
    bi = sh.red_i[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) sh.bcast_f[0] = bv, sh.bcast_i[0] = bi;
  }
  __syncthreads();
  out_v = sh.bcast_f[0];
  out_i = sh.bcast_i[0];
  __syncthreads();  // bcast_* may be rewritten by the caller's next step
}

// p = softmax(row / temp) into prow (float32), as torch.softmax(logits.float() / temp).
template <typename T, int VEC>
__device__ void row_softmax(const T* row, float temp, int64_t V, float* prow, Shared& sh) {
  const int64_t nvec = V / VEC;
  // Online (max, sum) per thread, then merged: one read of the row for both. Precise expf and
  // a true division, to stay close to torch.softmax (exact one-hot cases stay exact).
  float m = neg_inf<float>(), s = 0.f;
#pragma unroll 2
  for (int64_t vi = threadIdx.x; vi < nvec; vi += kThreads) {
    const Vec<T, VEC> x = reinterpret_cast<const Vec<T, VEC>*>(row)[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float y = static_cast<float>(to_acc(x.v[e])) / temp;
      if (y > m) {
        s = s * expf(m - y) + 1.f;  // m = -inf at first: exp(-inf) = 0
        m = y;
      } else if (y != neg_inf<float>()) {
        s += expf(y - m);
      }
    }
  }
  const float gm = block_max(m, sh.red_f);
  // Rescale each thread's sum to the global max (threads that saw only -inf contribute 0).
  const float part = (m == neg_inf<float>()) ? 0.f : s * expf(m - gm);
  const float total = block_sum(part, sh.red_f);
  for (int64_t vi = threadIdx.x; vi < nvec; vi += kThreads) {
    const Vec<T, VEC> x = reinterpret_cast<const Vec<T, VEC>*>(row)[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float y = static_cast<float>(to_acc(x.v[e])) / temp;
      prow[vi * VEC + e] = expf(y - gm) / total;
    }
  }
  __syncthreads();  // p complete before anyone reads p[x]
}

// On rejection of token x: p <- normalise(max(0, p - q)) unless that residual sums to 0.
// q is the draft's distribution (qrow) or, without one, one-hot at x.
template <typename T>
__device__ void residual_update(float* prow, const T* qrow, int64_t x, int64_t V, Shared& sh) {
  float part = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float q = qrow != nullptr ? static_cast<float>(to_acc(qrow[i])) : (i == x ? 1.f : 0.f);
    part += fmaxf(prow[i] - q, 0.f);
  }
  const float total = block_sum(part, sh.red_f);  // its barriers order all reads before writes
  if (total > 0.f) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float q = qrow != nullptr ? static_cast<float>(to_acc(qrow[i])) : (i == x ? 1.f : 0.f);
      prow[i] = fmaxf(prow[i] - q, 0.f) / total;  // same thread read it above: no race
    }
  }
  __syncthreads();
}

// Inverse-CDF draw from prow with uniform u. The range holding the first index whose float64
// cumulative sum exceeds u * total is narrowed 32-fold per level (each warp sums one piece, warp 0
// scans the 32 piece sums), then one warp scans the last <= 32 elements.
__device__ int64_t sample_index(const float* prow, double u, int64_t V, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) part += static_cast<double>(prow[i]);
  const double target = u * block_sum(part, sh.red_d);

  int64_t lo = 0, hi = V;
  double base = 0.0;  // cumulative sum of p[0 .. lo)
  while (hi - lo > 32) {
    const int64_t piece = (hi - lo + kWarps - 1) / kWarps;
    const int64_t plo = lo + warp * piece, phi = plo + piece < hi ? plo + piece : hi;
    double sum = 0.0;
    for (int64_t i = plo + lane; i < phi; i += 32) sum += static_cast<double>(prow[i]);
    sum = warp_sum(sum);
    if (lane == 0) sh.red_d[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      const double mine = sh.red_d[lane];
      double incl = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      // Exclusive prefix taken from the neighbour's inclusive one (not incl - mine, which
      // rounds), so the next level starts from exactly the sum this level compared against.
      double excl = __shfl_up_sync(0xffffffffu, incl, 1);
      if (lane == 0) excl = 0.0;
      const unsigned crossed = __ballot_sync(0xffffffffu, base + incl > target);
      // No crossing (rounding, or u * total at the very end): take the last non-empty piece.
      const int sel = crossed != 0u ? __ffs(crossed) - 1 : static_cast<int>((hi - lo - 1) / piece);
      excl = __shfl_sync(0xffffffffu, excl, sel);
      if (lane == 0) {
        sh.bcast_i[0] = sel;
        sh.bcast_d[0] = base + excl;
      }
    }
    __syncthreads();
    const int64_t sel = sh.bcast_i[0];
    base = sh.bcast_d[0];
    lo = lo + sel * piece;
    hi = lo + piece < hi ? lo + piece : hi;
    __syncthreads();  // bcast_* and red_d are rewritten on the next level
  }

  if (warp == 0) {
    const int64_t i = lo + lane;
    double incl = i < hi ? static_cast<double>(prow[i]) : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    const unsigned crossed = __ballot_sync(0xffffffffu, i < hi && base + incl > target);
    if (lane == 0) sh.bcast_i[0] = crossed != 0u ? lo + (__ffs(crossed) - 1) : hi - 1;
  }
  __syncthreads();
  int64_t idx = sh.bcast_i[0];
  __syncthreads();
  if (!(prow[idx] > 0.f)) {  // never a zero-probability token: nearest positive one below
    int64_t best = -1;
    for (int64_t i = threadIdx.x; i <= idx; i += kThreads)
      if (prow[i] > 0.f) best = i;  // i ascends per thread: keeps the thread's largest
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const int64_t other = __shfl_xor_sync(0xffffffffu, best, o);
      best = other > best ? other : best;
    }
    if (lane == 0) sh.red_i[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t b = -1;
      for (int w = 0; w < kWarps; ++w) b = sh.red_i[w] > b ? sh.red_i[w] : b;
      sh.bcast_i[0] = b < 0 ? 0 : b;
    }
    __syncthreads();
    idx = sh.bcast_i[0];
    __syncthreads();
  }
  return idx;
}

// The value checks of the whole batch, by one block, in the CPU kernel's order (so the message
// names the same value): per row and node, the token (in [0, V) or -1), then its parent (in
// 0..node-1, or -1..node-1 for a padded node); then every temperature (finite, >= 0). Keys:
// 2 * (b * N + j) + {0: token, 1: parent}, then 2 * B * N + b. B * N + B reads, a few per thread.
// Every row's own walk drops a bad node (as a padded one) and never indexes with it.
__device__ void check_values(const Params& p) {
  const int64_t N = p.N, nodes = p.B * N;
  uint64_t key = kNoKey;
  for (int64_t j = threadIdx.x; j < nodes; j += blockDim.x) {
    const int64_t b = j / N, i = j % N;
    const int64_t t = load_index(p.tokens, p.tokens64, b * p.tok_sb + i * p.tok_sn);
    int64_t k = -1;
    if (t != -1 && (t < 0 || t >= p.V)) {
      k = 2 * j;
    } else {
      const int64_t pa = load_index(p.parents, p.parents64, b * p.par_sb + i * p.par_sn);
      if (pa < (t == -1 ? -1 : 0) || pa > i) k = 2 * j + 1;
    }
    if (k >= 0 && static_cast<uint64_t>(k) < key) key = static_cast<uint64_t>(k);
  }
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    const double t = load_real(p.temperature, p.temp_f64, b * p.temp_s);
    const uint64_t k = static_cast<uint64_t>(2 * nodes + b);
    if (!(isfinite(t) && t >= 0.0) && k < key) key = k;
  }
  const uint64_t bad = block_min_key(key);
  if (bad == kNoKey || threadIdx.x != 0) return;
  if (bad >= static_cast<uint64_t>(2 * nodes)) {
    const int64_t b = static_cast<int64_t>(bad) - 2 * nodes;
    // The float32's own bits (no round trip through double, which may canonicalise a NaN).
    const uint32_t bits = p.temp_f64 ? __float_as_uint(static_cast<float>(load_real(p.temperature, true, b * p.temp_s)))
                                     : static_cast<const uint32_t*>(p.temperature)[b * p.temp_s];
    return record_error(p.error, err::kVerifyTemperature, b, static_cast<int64_t>(bits), 0);
  }
  const int64_t j = static_cast<int64_t>(bad / 2), b = j / N, i = j % N;
  const int64_t t = load_index(p.tokens, p.tokens64, b * p.tok_sb + i * p.tok_sn);
  if (bad % 2 == 0) return record_error(p.error, err::kVerifyToken, err::pack2(b, i), t, p.V);
  record_error(p.error, err::kVerifyParent, err::pack2(b, i),
               load_index(p.parents, p.parents64, b * p.par_sb + i * p.par_sn), t == -1 ? -1 : 0);
}

// T: the logits' type; Q: draft_probs' (float32, or T).
template <typename T, typename Q, int VEC>
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kThreads) verify_kernel(const Params p) {
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Shared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t N = p.N, V = p.V;
  const Smem s = carve(smem_raw, N);
  const int64_t b = blockIdx.x / kCluster;  // grid = B * kCluster: one cluster per row
  if (b >= p.B) return;                      // never taken (whole clusters); kept as a guard
  if (p.error != nullptr && b == 0 && rank == 0) check_values(p);  // block-uniform

  const T* logits = static_cast<const T*>(p.logits) + b * p.lg_sb;
  const double temp64 = load_real(p.temperature, p.temp_f64, b * p.temp_s);
  const bool greedy = temp64 == 0.0;
  // Sampling rows: only block 0 works; the others leave before touching any cluster barrier.
  if (!greedy && rank != 0) return;

  // Tokens and parents: loaded in parallel, then the CSR is built by one thread (N is small).
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    s.tok[i] = load_index(p.tokens, p.tokens64, b * p.tok_sb + i * p.tok_sn);
    // kids[] holds the parent for now (-1 when outside [0, N): an int cast must not wrap).
    const int64_t par = load_index(p.parents, p.parents64, b * p.par_sb + i * p.par_sn);
    s.kids[i] = par >= 0 && par < N ? static_cast<int>(par) : -1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < N + 2; ++i) s.kid_start[i] = 0;
    // Node n = i + 1 is a child of parents[i] when its token is a real one (a token outside
    // [0, V) can never be accepted, and is dropped like a padded node) and its parent is valid.
    for (int64_t i = 0; i < N; ++i) {
      const int64_t par = s.kids[i];
      const bool real = s.tok[i] >= 0;
      s.cursor[i] = (real && s.tok[i] < V && par >= 0 && par <= i) ? static_cast<int>(par) : -1;
    }
    for (int64_t i = 0; i < N; ++i)
      if (s.cursor[i] >= 0) s.kid_start[s.cursor[i] + 1]++;
    for (int64_t i = 0; i <= N; ++i) s.kid_start[i + 1] += s.kid_start[i];
    // Fill in node order: path[] (length N) holds each node's parent meanwhile, cursor[] the
    // running write position of each parent.
    for (int64_t i = 0; i < N; ++i) s.path[i] = s.cursor[i];
    for (int64_t n = 0; n <= N; ++n) s.cursor[n] = s.kid_start[n];
    for (int64_t i = 0; i < N; ++i)
      if (s.path[i] >= 0) s.kids[s.cursor[s.path[i]]++] = static_cast<int>(i + 1);
  }
  __syncthreads();

  int64_t node = 0, k = 0, new_token = 0;
  if (greedy) {
    // This block's slice of every row, in vectors: [vbegin, vend).
    const int64_t nvec = V / VEC;
    const int64_t per = (nvec + kCluster - 1) / kCluster;
    const int64_t vbegin = rank * per < nvec ? rank * per : nvec;
    const int64_t vend = vbegin + per < nvec ? vbegin + per : nvec;
    for (int level = 0;; ++level) {
      float bv;
      int64_t bi;
      slice_argmax<T, VEC>(logits + node * p.lg_sr, vbegin, vend, sh, bv, bi);
      const int buf = level & 1;
      if (threadIdx.x == 0) sh.part_v[buf] = bv, sh.part_i[buf] = bi;
      // Publishes every block's partial. Double buffering makes one barrier per level enough:
      // buffer `buf` is written again two levels later, after the next level's barrier, which
      // no block passes before all have finished reading this level's partials.
      cluster.sync();
      if (threadIdx.x == 0) {
        float cv = neg_inf<float>();
        int64_t ci = INT64_MAX;
        for (int r = 0; r < kCluster; ++r) {  // same order in every block: same result
          const Shared* remote = cluster.map_shared_rank(&sh, r);
          const float v = remote->part_v[buf];
          const int64_t i = remote->part_i[buf];
          if (argmax_better(v, i, cv, ci)) cv = v, ci = i;
        }
        sh.bcast_i[1] = ci < V ? ci : 0;  // V >= 1, so block 0's slice is never empty
      }
      __syncthreads();
      const int64_t best = sh.bcast_i[1];
      // First child (node order) whose token is the argmax; -1 if none. Same in all threads
      // of all blocks (shared CSR built from the same inputs).
      int64_t nxt = -1;
      for (int c = s.kid_start[node]; c < s.kid_start[node + 1]; ++c) {
        if (s.tok[s.kids[c] - 1] == best) {
          nxt = s.kids[c];
          break;
        }
      }
      __syncthreads();  // bcast_i[1] read by all before the next level rewrites it
      if (nxt < 0) {
        new_token = best;
        break;
      }
      if (threadIdx.x == 0) s.path[k] = static_cast<int>(nxt);
      ++k;
      node = nxt;
    }
    // No block may exit (freeing its shared memory) while another still reads its partials.
    cluster.sync();
    if (rank != 0) return;
  } else {
    const Q* dprobs = p.draft_probs != nullptr ? static_cast<const Q*>(p.draft_probs) + b * p.dp_sb : nullptr;
    const float temp = static_cast<float>(temp64);
    float* prow = p.scratch + b * V;
    int64_t used = 0;
    row_softmax<T, VEC>(logits, temp, V, prow, sh);
    while (true) {
      int64_t accepted = -1;
      for (int ci = s.kid_start[node]; ci < s.kid_start[node + 1]; ++ci) {
        const int c = s.kids[ci];
        const int64_t x = s.tok[c - 1];
        const Q* qrow = dprobs != nullptr ? dprobs + (c - 1) * p.dp_sr : nullptr;
        const double px = static_cast<double>(prow[x]);
        const double qx = qrow != nullptr ? static_cast<double>(static_cast<float>(to_acc(qrow[x]))) : 1.0;
        const double u = load_real(p.uniform, p.unif_f64, b * p.u_sb + used * p.u_sn);
        ++used;
        if (u * qx < px) {  // accept with probability min(1, p(x) / q(x))
          accepted = c;
          break;
        }
        __syncthreads();  // everyone has read p[x] before the residual rewrites p
        residual_update<Q>(prow, qrow, x, V, sh);
      }
      if (accepted < 0) {
        const double u = load_real(p.uniform, p.unif_f64, b * p.u_sb + used * p.u_sn);
        new_token = sample_index(prow, u, V, sh);
        break;
      }
      if (threadIdx.x == 0) s.path[k] = static_cast<int>(accepted);
      ++k;
      node = accepted;
      __syncthreads();  // p[x] reads done before the next softmax overwrites p
      row_softmax<T, VEC>(logits + node * p.lg_sr, temp, V, prow, sh);
    }
  }
  __syncthreads();  // path[] complete

  // Block 0 of the cluster writes the row's outputs.
  if (threadIdx.x == 0) p.accept_len[b] = k;
  for (int64_t j = threadIdx.x; j <= N; j += kThreads) {
    if (j < N) p.accepted_nodes[b * N + j] = j < k ? s.path[j] : -1;
    p.out_tokens[b * (N + 1) + j] = j < k ? s.tok[s.path[j] - 1] : (j == k ? new_token : -1);
  }
}

}  // namespace verify
}  // namespace sparrow
