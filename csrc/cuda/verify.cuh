// verify: per batch row, accept the path of a draft tree that the target agrees with, greedily
// (temperature 0) or by exact speculative sampling. Contract: DESIGN.md ("verify"); ground truth:
// sparrow/reference.py::verify, whose numerics this kernel mirrors:
//   - logits are compared / soft-maxed in float32 (the reference calls .float(), float64 too);
//     q (draft_probs: float32, or the logits' type) is read as float32 too;
//   - greedy argmax takes the first index among equal maxima (NaN counts as the largest, as in
//     torch.argmax); among siblings carrying the argmax token the first in node order wins;
//   - the acceptance test u * q(x) < p(x) is evaluated in float64 (Python floats there);
//   - residuals max(0, p - q) and their sum are float32; p is replaced only when the sum is > 0;
//   - the final draw is inverse-CDF over float64 cumulative sums: the first index whose cdf
//     exceeds u * total, clamped to V-1, then moved down to the nearest token with p > 0.
//
// Layout: one thread-block cluster of kCluster blocks per row; block r owns slice r of the
// vocabulary (elements [lo, hi), whole vectors) in every pass, and every block walks the tree in
// lockstep. A cluster-wide reduction is one "exchange": each block publishes its partial in its
// own shared memory, one cluster barrier, then every thread reads all kCluster partials through
// distributed shared memory and combines them in rank order, so all blocks reach the same value
// and take the same branch. Greedy: one exchange per tree level (the slice argmaxes). Sampling:
// one per softmax (slice max and sum), one per rejection (slice residual sums) and one for the
// draw (slice float64 sums). p lives in a [B, V] float32 scratch row, each element only ever
// touched by the block that owns it; the one value another block needs, p at the next child's
// token, travels in the exchange (or is recomputed from the logits right after a softmax, with the
// very expression its owner stored).
//
// How the results compare with the CPU op (same inputs, same uniforms):
//   - greedy: identical. Argmax over float32 values is exact, the tie rule is a total order, and
//     the child rule (first in node order) is the CPU kernel's.
//   - sampling: p differs from the CPU op's in the last bits (another summation order for the
//     softmax and residual sums, CUDA's expf), so a decision can differ only when u * q(x) lies
//     within a few float32 ulps of p(x), or u * total within that of a cdf step: for random
//     uniforms a chance of about 1e-6 per decision. The draw itself: the CPU op scans the float64
//     cdf sequentially; here the sums are formed by slices, pieces and warps. Every partial sum
//     of float32 terms in float64 carries a relative error under V * 2^-53 (~2e-11 at V = 152064),
//     so the first index whose cdf exceeds u * total is the same unless u * total is that close
//     to a cdf value: a rounding tie, either answer being a correct draw.
#pragma once
#include <climits>
#include <cooperative_groups.h>

#include "common.cuh"

namespace sparrow {
namespace verify {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCluster = 8;  // portable maximum cluster size
static_assert(kWarps == 32, "one scan lane per warp: the block reductions and the draw rely on it");

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

// Dynamic shared memory of one block, laid out by smem_bytes(): the row's tree, node j + 1 at j.
struct Smem {
  int64_t* tok;  // [N] draft tokens
  int* par;      // [N] parent (0..j), or kDropped for a node that can never be accepted
  int* path;     // [N] accepted node ids
};
constexpr int kDropped = -2;  // matches no node id, so find_child never returns such a node
__host__ __device__ inline size_t smem_bytes(int64_t N) {
  return static_cast<size_t>(N) * (sizeof(int64_t) + 2 * sizeof(int));
}
__device__ __forceinline__ Smem carve(unsigned char* raw, int64_t N) {
  Smem s;
  s.tok = reinterpret_cast<int64_t*>(raw);
  s.par = reinterpret_cast<int*>(s.tok + N);
  s.path = s.par + N;
  return s;
}

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ------------------------------------------------------------------ block-wide reductions

struct ArgMax {
  float v;
  int64_t i;
};
// (value, index) order of torch.argmax: NaN beats everything, then larger, then smaller index.
// A total order, so any reduction tree gives the same winner.
__device__ __forceinline__ bool argmax_better(float v, int64_t i, float bv, int64_t bi) {
  if (isnan(v)) return !isnan(bv) || i < bi;
  if (isnan(bv)) return false;
  return v > bv || (v == bv && i < bi);
}
__device__ __forceinline__ ArgMax better_of(ArgMax a, ArgMax b) { return argmax_better(b.v, b.i, a.v, a.i) ? b : a; }
__device__ __forceinline__ ArgMax no_argmax() { return {neg_inf<float>(), INT64_MAX}; }  // any element beats it

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ int64_t shfl_xor(int64_t v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ ArgMax shfl_xor(ArgMax a, int o) { return {shfl_xor(a.v, o), shfl_xor(a.i, o)}; }

template <typename X, typename F> __device__ __forceinline__ X warp_reduce(X v, F combine) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(v, shfl_xor(v, o));
  return v;
}

// One value per thread combined into thread 0 (the others hold partial results): warps, one
// barrier, warp 0. `stash` [kWarps] is free again after the caller's next barrier.
template <typename X, typename F> __device__ __forceinline__ X reduce_to_thread0(X v, X* stash, F combine) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, combine);
  if (lane == 0) stash[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_reduce(stash[lane], combine);
  return v;
}

// Softmax statistics of a set of values: their max m and the sum of exp(y - m).
struct SoftmaxPart {
  float m, s;
};
// s rescaled to a larger max; an empty part (m = -inf) adds nothing: its s is 0, or NaN when it
// saw a NaN among -infs (kept, so that a NaN anywhere in the row makes every p NaN, as in torch;
// the max ignores NaN, the sum carries it).
__device__ __forceinline__ float rescaled(SoftmaxPart x, float m) {
  return x.m == neg_inf<float>() ? x.s : x.s * expf(x.m - m);
}
// Warp max first, then each sum rescaled once to it (closer to torch's max-then-sum than a
// pairwise running merge).
__device__ __forceinline__ SoftmaxPart warp_merge(SoftmaxPart x) {
  const float m = warp_max(x.m);
  return {m, warp_sum(rescaled(x, m))};
}
__device__ __forceinline__ SoftmaxPart block_merge_to_thread0(SoftmaxPart x, SoftmaxPart* stash) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_merge(x);
  if (lane == 0) stash[warp] = x;
  __syncthreads();
  if (warp == 0) x = warp_merge(stash[lane]);
  return x;
}

// What one block contributes to a cluster-wide reduction (fields used per exchange).
struct Partial {
  float a;    // greedy: slice max value; softmax: slice max; residual: slice sum
  float b;    // softmax: slice sum of exp; residual: p at the next child's token (its owner's)
  double d;   // draw: float64 sum of p over the slice
  int64_t i;  // greedy: index of the slice max
};

struct Shared {
  ArgMax red_am[kWarps];
  SoftmaxPart red_ms[kWarps];
  float red_f[kWarps];
  int64_t red_i[kWarps];
  double red_d[kWarps];
  double scan[kWarps];       // the draw's inclusive prefix sums of its 32 pieces
  int child_min[2][kWarps];  // find_child's per-warp minima, double-buffered by call
  Partial part[2];           // this block's partial, double-buffered by exchange
  int64_t drawn;             // block 0: the sampled token, written by the block that drew it
};

// ------------------------------------------------------------------------ the row's state

// One row as seen by one block of its cluster.
struct Row {
  Smem s;
  Shared* sh;
  int64_t N, V;
  int64_t lo, hi;  // this block's slice of every row: elements [lo, hi), whole vectors
  int64_t per;     // elements per slice (the last slices may be shorter or empty)
  int xchg;         // parity of the next exchange
  int search;       // parity of the next find_child
};

template <int VEC> __device__ Row make_row(const Smem& s, Shared* sh, int64_t N, int64_t V, int rank) {
  const int64_t nvec = V / VEC;
  const int64_t per = (nvec + kCluster - 1) / kCluster;
  const int64_t vlo = rank * per < nvec ? rank * per : nvec;
  const int64_t vhi = vlo + per < nvec ? vlo + per : nvec;
  return Row{s, sh, N, V, vlo * VEC, vhi * VEC, per * VEC, 0, 0};
}
__device__ __forceinline__ int owner_rank(const Row& r, int64_t i) { return static_cast<int>(i / r.per); }

// Publishes thread 0's partial and waits until every block of the cluster has published; returns
// the slot to read with peer(). The barrier also orders everything before it (in every block)
// before everything after it. Two slots make one barrier per exchange enough: a slot is written
// again two exchanges later, after a barrier that no block passes before all have read it.
__device__ __forceinline__ int publish(Row& r, const Partial& mine) {
  const int slot = r.xchg;
  r.xchg ^= 1;
  if (threadIdx.x == 0) r.sh->part[slot] = mine;
  cooperative_groups::this_cluster().sync();
  return slot;
}
__device__ __forceinline__ const Partial* peer(const Row& r, int slot, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(&r.sh->part[slot], rank);
}

// Node j + 1 (j = 0..N-1): token and, when the node can be accepted (token in [0, V), parent in
// 0..j), its parent; kDropped otherwise: padded nodes and bad ones (reported by check_values).
__device__ void load_tree(const Params& p, int64_t b, const Row& r) {
  for (int64_t j = threadIdx.x; j < r.N; j += kThreads) {
    const int64_t t = load_index(p.tokens, p.tokens64, b * p.tok_sb + j * p.tok_sn);
    const int64_t pa = load_index(p.parents, p.parents64, b * p.par_sb + j * p.par_sn);
    r.s.tok[j] = t;
    r.s.par[j] = (t >= 0 && t < r.V && pa >= 0 && pa <= j) ? static_cast<int>(pa) : kDropped;
  }
  __syncthreads();
}

// The first j >= from (node order) whose node hangs below `node` and carries `token` (any token
// when token < 0), or -1; the same in every thread. Each thread checks a strided set of nodes,
// the per-warp minima meet in shared memory: one barrier, no serial pass. The two buffers
// alternate by call: one is written again only after the next call's barrier.
__device__ int find_child(Row& r, int node, int from, int64_t token) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int first = INT_MAX;
  for (int j = from + static_cast<int>(threadIdx.x); j < r.N; j += kThreads) {
    if (r.s.par[j] == node && (token < 0 || r.s.tok[j] == token)) {
      first = j;  // j ascends per thread: its first hit is its minimum
      break;
    }
  }
  int* buf = r.sh->child_min[r.search];
  r.search ^= 1;
  first = __reduce_min_sync(0xffffffffu, first);
  if (lane == 0) buf[warp] = first;
  __syncthreads();
  first = __reduce_min_sync(0xffffffffu, buf[lane]);
  return first == INT_MAX ? -1 : first;
}

// ------------------------------------------------------------------------------- greedy

// Argmax of the vectors [vbegin, vend) of one logits row, into thread 0.
template <typename T, int VEC>
__device__ ArgMax slice_argmax(const T* row, int64_t vbegin, int64_t vend, ArgMax* stash) {
  ArgMax best = no_argmax();
#pragma unroll 4
  for (int64_t vi = vbegin + threadIdx.x; vi < vend; vi += kThreads) {
    const Vec<T, VEC> x = reinterpret_cast<const Vec<T, VEC>*>(row)[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) best = better_of(best, {static_cast<float>(to_acc(x.v[e])), vi * VEC + e});
  }
  return reduce_to_thread0(best, stash, better_of);
}

// Cluster-wide argmax of one row: each block scans its slice, the slice winners are exchanged.
template <typename T, int VEC> __device__ int64_t row_argmax(Row& r, const T* row) {
  const ArgMax mine = slice_argmax<T, VEC>(row, r.lo / VEC, r.hi / VEC, r.sh->red_am);
  const int slot = publish(r, Partial{mine.v, 0.f, 0.0, mine.i});
  ArgMax best = no_argmax();
#pragma unroll
  for (int k = 0; k < kCluster; ++k) {
    const Partial* q = peer(r, slot, k);
    best = better_of(best, {q->a, q->i});
  }
  return best.i < r.V ? best.i : 0;  // V >= 1: block 0's slice is never empty
}

// From the root, follow the child carrying the argmax of the current row; returns the new token
// (the argmax where no child matches). Path in s.path[0..k).
template <typename T, int VEC> __device__ int64_t walk_greedy(Row& r, const T* logits, int64_t lg_sr, int& k) {
  int node = 0;
  for (k = 0;; ++k) {
    const int64_t best = row_argmax<T, VEC>(r, logits + node * lg_sr);
    const int child = find_child(r, node, 0, best);
    if (child < 0) return best;
    if (threadIdx.x == 0) r.s.path[k] = child + 1;
    node = child + 1;
  }
}

// ----------------------------------------------------------------------------- sampling

struct Norm {
  float max, total;  // of the row / temperature, over the whole row
};
// One element of softmax(row / temp): the owner's store and every block's p(x) use this very
// expression, so they agree bit for bit (precise expf and a true division, close to torch).
__device__ __forceinline__ float softmax_value(float v, float temp, Norm n) { return expf(v / temp - n.max) / n.total; }
__device__ __forceinline__ float residual_value(float p, float q, float total) { return fmaxf(p - q, 0.f) / total; }
// q at token i: the draft's distribution, or one-hot at x without one.
template <typename Q> __device__ __forceinline__ float q_at(const Q* qrow, int64_t x, int64_t i) {
  return qrow != nullptr ? static_cast<float>(to_acc(qrow[i])) : (i == x ? 1.f : 0.f);
}

// p = softmax(row / temp) over this block's slice of prow, as torch.softmax(logits.float() / temp):
// online (max, sum) per thread in one read, merged per block, exchanged, then a second read to
// write p. Returns the row's (max, sum), the same in every block.
template <typename T, int VEC> __device__ Norm row_softmax(Row& r, const T* row, float temp, float* prow) {
  const Vec<T, VEC>* vrow = reinterpret_cast<const Vec<T, VEC>*>(row);
  SoftmaxPart mine{neg_inf<float>(), 0.f};
#pragma unroll 2
  for (int64_t vi = r.lo / VEC + threadIdx.x; vi < r.hi / VEC; vi += kThreads) {
    const Vec<T, VEC> x = vrow[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float y = static_cast<float>(to_acc(x.v[e])) / temp;
      if (y > mine.m) {
        mine.s = mine.s * expf(mine.m - y) + 1.f;  // m = -inf at first: exp(-inf) = 0
        mine.m = y;
      } else if (y != neg_inf<float>()) {
        mine.s += expf(y - mine.m);
      }
    }
  }
  mine = block_merge_to_thread0(mine, r.sh->red_ms);
  const int slot = publish(r, Partial{mine.m, mine.s, 0.0, 0});
  Norm n{neg_inf<float>(), 0.f};
#pragma unroll
  for (int k = 0; k < kCluster; ++k) n.max = fmaxf(n.max, peer(r, slot, k)->a);
#pragma unroll
  for (int k = 0; k < kCluster; ++k) {
    const Partial* q = peer(r, slot, k);
    n.total += rescaled({q->a, q->b}, n.max);
  }
  for (int64_t vi = r.lo / VEC + threadIdx.x; vi < r.hi / VEC; vi += kThreads) {
    const Vec<T, VEC> x = vrow[vi];
#pragma unroll
    for (int e = 0; e < VEC; ++e) prow[vi * VEC + e] = softmax_value(static_cast<float>(to_acc(x.v[e])), temp, n);
  }
  __syncthreads();  // the next pass maps elements to threads differently
  return n;
}

// On rejection of token x: p <- normalise(max(0, p - q)) over the cluster unless that residual
// sums to 0 (float32 sums: per thread, block, then rank order). Returns p at token nx (the next
// child's; nx < 0: none) after the update: its owner hands the old value over in the exchange.
template <typename Q> __device__ float residual_update(Row& r, float* prow, const Q* qrow, int64_t x, int64_t nx) {
  float part = 0.f;
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += kThreads) part += fmaxf(prow[i] - q_at(qrow, x, i), 0.f);
  part = reduce_to_thread0(part, r.sh->red_f, [](float a, float b) { return a + b; });
  const bool own_nx = nx >= r.lo && nx < r.hi;  // thread 0 reads it after the reduction's barrier
  const int slot = publish(r, Partial{part, threadIdx.x == 0 && own_nx ? prow[nx] : 0.f, 0.0, 0});
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kCluster; ++k) total += peer(r, slot, k)->a;
  if (total > 0.f) {
    for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += kThreads)
      prow[i] = residual_value(prow[i], q_at(qrow, x, i), total);  // same thread read it above
  }
  __syncthreads();  // the draw maps elements to threads differently
  if (nx < 0) return 0.f;
  const float old = peer(r, slot, owner_rank(r, nx))->b;
  return total > 0.f ? residual_value(old, q_at(qrow, x, nx), total) : old;
}

// Splits [lo, hi) into kWarps pieces; warp w sums piece w in float64, and warp 0 leaves the
// inclusive prefix sums of the piece sums in sh.scan. Returns the piece length.
__device__ int64_t piece_scan(const float* prow, int64_t lo, int64_t hi, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t piece = (hi - lo + kWarps - 1) / kWarps;
  const int64_t plo = lo + warp * piece, phi = plo + piece < hi ? plo + piece : hi;
  double sum = 0.0;
  for (int64_t i = plo + lane; i < phi; i += 32) sum += static_cast<double>(prow[i]);
  sum = warp_sum(sum);
  if (lane == 0) sh.red_d[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    double incl = sh.red_d[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    sh.scan[lane] = incl;
  }
  __syncthreads();
  return piece;
}

// Narrows [lo, hi) to the first piece whose running sum base + scan[k] exceeds target (the last
// non-empty piece when rounding leaves none). The new base is base plus the inclusive sum of
// the pieces before, exactly the value this level compared against. Every warp decides alike.
// Only the non-empty pieces may be picked: the shuffle scan is not monotone in floating point
// (scan[k] of a trailing empty piece is another association of the same sum and can round above
// its predecessors), and an empty piece would leave lo >= hi, then a zero piece length.
__device__ void pick_piece(const Shared& sh, int64_t piece, double target, int64_t& lo, int64_t& hi, double& base) {
  const int lane = threadIdx.x & 31;
  const int pieces = static_cast<int>((hi - lo + piece - 1) / piece);  // 1..kWarps non-empty ones
  const unsigned crossed = __ballot_sync(0xffffffffu, lane < pieces && base + sh.scan[lane] > target);
  const int sel = crossed != 0u ? __ffs(crossed) - 1 : pieces - 1;
  if (sel > 0) base += sh.scan[sel - 1];
  lo += sel * piece;
  hi = lo + piece < hi ? lo + piece : hi;
}

// The largest i <= idx with p[i] > 0 (0 if none), into thread 0. Reads other blocks' slices,
// which they wrote before the last exchange: through L2 (__ldcg), never a stale L1 line.
__device__ int64_t last_positive_up_to(const float* prow, int64_t idx, Shared& sh) {
  int64_t best = 0;
  for (int64_t i = threadIdx.x; i <= idx; i += kThreads)
    if (__ldcg(prow + i) > 0.f) best = i;  // i ascends per thread: keeps the thread's largest
  return reduce_to_thread0(best, sh.red_i, [](int64_t a, int64_t b) { return a > b ? a : b; });
}

// Inverse-CDF draw from p with uniform u, as a sequential float64 scan would find it (up to
// rounding ties, see the top of this file). Each block sums the 32 pieces of its slice; the
// slice sums are exchanged, and every block finds the slice where the cdf first exceeds
// u * total; that block alone narrows it down (32-fold per level, reusing its first-level piece
// sums, so its slice sum is exactly the one compared at the cluster level) and hands the token to
// block 0 through distributed shared memory; block 0 reads it after the kernel's last barrier.
__device__ void draw_token(Row& r, const float* prow, double u) {
  Shared& sh = *r.sh;
  int64_t piece = piece_scan(prow, r.lo, r.hi, sh);
  const int slot = publish(r, Partial{0.f, 0.f, threadIdx.x == 0 ? sh.scan[kWarps - 1] : 0.0, 0});
  double sums[kCluster];
  double total = 0.0;
#pragma unroll
  for (int k = 0; k < kCluster; ++k) total += (sums[k] = peer(r, slot, k)->d);
  const double target = u * total;
  // u * total >= total (u = 1, a zero total) or NaN: no cdf value exceeds the target in the CPU
  // op's sequential scan (its last cdf value is its total), so it clamps to V-1. Decided here
  // once, not left to the narrowing, whose re-associated sums may round above the total.
  const bool clamp = !(target < total);
  // The first slice whose running sum exceeds the target; if none does (rounding), the slice of
  // the last token, where the scan ends at V-1. Later slices are empty.
  const int last = owner_rank(r, r.V - 1);
  int chosen = -1;
  double base = 0.0, chosen_base = 0.0;
#pragma unroll
  for (int k = 0; k < kCluster; ++k) {
    if (chosen < 0 && ((!clamp && base + sums[k] > target) || k == last)) chosen = k, chosen_base = base;
    base += sums[k];
  }
  if (static_cast<int>(cooperative_groups::this_cluster().block_rank()) != chosen) return;
  int64_t idx = r.V - 1;
  if (!clamp) {
    int64_t lo = r.lo, hi = r.hi;
    base = chosen_base;
    while (true) {
      pick_piece(sh, piece, target, lo, hi, base);
      if (piece <= 1) break;  // lo is the token
      piece = piece_scan(prow, lo, hi, sh);
    }
    idx = lo;
  }
  if (!(prow[idx] > 0.f)) idx = last_positive_up_to(prow, idx, sh);  // never a zero-probability token
  if (threadIdx.x == 0) *cooperative_groups::this_cluster().map_shared_rank(&sh.drawn, 0) = idx;
}

// Children are tried in node order: accept child x with probability min(1, p(x)/q(x)), on
// rejection p <- normalise(max(0, p - q)); no child accepted: draw the new token from p (block 0
// gets it in sh.drawn). Uniforms are consumed in order, one per trial and one for the draw.
template <typename T, typename Q, int VEC>
__device__ void walk_sampled(Row& r, const Params& p, int64_t b, float* prow, int& k) {
  const T* logits = static_cast<const T*>(p.logits) + b * p.lg_sb;
  const Q* dprobs = p.draft_probs != nullptr ? static_cast<const Q*>(p.draft_probs) + b * p.dp_sb : nullptr;
  const float temp = static_cast<float>(load_real(p.temperature, p.temp_f64, b * p.temp_s));
  int node = 0;
  int64_t used = 0;
  for (k = 0;; ++k) {
    const T* row = logits + node * p.lg_sr;
    const Norm n = row_softmax<T, VEC>(r, row, temp, prow);
    int child = find_child(r, node, 0, -1);
    float px = child >= 0 ? softmax_value(static_cast<float>(to_acc(row[r.s.tok[child]])), temp, n) : 0.f;
    int accepted = -1;
    while (child >= 0) {
      const int64_t x = r.s.tok[child];
      const Q* qrow = dprobs != nullptr ? dprobs + child * p.dp_sr : nullptr;
      const double qx = qrow != nullptr ? static_cast<double>(q_at(qrow, x, x)) : 1.0;
      const double u = load_real(p.uniform, p.unif_f64, b * p.u_sb + used * p.u_sn);
      ++used;
      if (u * qx < static_cast<double>(px)) {
        accepted = child;
        break;
      }
      const int next = find_child(r, node, child + 1, -1);
      px = residual_update<Q>(r, prow, qrow, x, next >= 0 ? r.s.tok[next] : -1);
      child = next;
    }
    if (accepted < 0) return draw_token(r, prow, load_real(p.uniform, p.unif_f64, b * p.u_sb + used * p.u_sn));
    if (threadIdx.x == 0) r.s.path[k] = accepted + 1;
    node = accepted + 1;
  }
}

// --------------------------------------------------------------------------- value checks

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

// ------------------------------------------------------------------------------- kernel

// T: the logits' type; Q: draft_probs' (float32, or T). Grid: B * kCluster blocks, one cluster
// per row; every block of a cluster takes the same branches, so all reach the same barriers.
template <typename T, typename Q, int VEC>
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kThreads) verify_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Shared sh;
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  const int64_t b = blockIdx.x / kCluster;
  if (b >= p.B) return;  // never taken (whole clusters); kept as a guard
  if (p.error != nullptr && b == 0 && rank == 0) check_values(p);  // block-uniform

  Row r = make_row<VEC>(carve(smem_raw, p.N), &sh, p.N, p.V, rank);
  load_tree(p, b, r);
  const bool greedy = load_real(p.temperature, p.temp_f64, b * p.temp_s) == 0.0;
  int k = 0;
  int64_t new_token = 0;
  if (greedy) new_token = walk_greedy<T, VEC>(r, static_cast<const T*>(p.logits) + b * p.lg_sb, p.lg_sr, k);
  else walk_sampled<T, Q, VEC>(r, p, b, p.scratch + b * p.V, k);
  // No block may leave (freeing its shared memory) while another may still read its partials;
  // also publishes the sampled token written into block 0, and block 0's path to all its threads.
  cooperative_groups::this_cluster().sync();
  if (rank != 0) return;
  if (!greedy) new_token = sh.drawn;

  if (threadIdx.x == 0) p.accept_len[b] = k;
  for (int64_t j = threadIdx.x; j <= p.N; j += kThreads) {
    if (j < p.N) p.accepted_nodes[b * p.N + j] = j < k ? r.s.path[j] : -1;
    p.out_tokens[b * (p.N + 1) + j] = j < k ? r.s.tok[r.s.path[j] - 1] : (j == k ? new_token : -1);
  }
}

}  // namespace verify
}  // namespace sparrow
