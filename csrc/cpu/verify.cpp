// CPU kernel of sparrow::verify: batched acceptance of a draft tree (or chain), greedy or by exact
// speculative sampling. Contract: DESIGN.md ("verify"); ground truth: sparrow/reference.py.
//
// One row per task (at::parallel_for over B). Per row: the children of every node are laid out
// once (CSR from `parents`, node order kept), then the walk from the root touches only the logits
// rows of the nodes it reaches.
//
// Numerics follow the reference step by step so that equal inputs give equal outputs:
//   * logits are read as float32 (float64 logits are rounded to float32 first, as `.float()` does),
//     so greedy ties and the argmax see the same values; so is q (draft_probs: float32, read as
//     is, or the logits' dtype, converted);
//   * p = softmax(row / T) is ATen's own float32 softmax of the float32 quotient, and the residual
//     max(0, p - q) is normalised by ATen's float32 sum (same reduction code as `tensor.sum()`;
//     for V >= 32768 torch splits a top-level sum over threads while the nested one here runs on
//     one, so the total may differ in its last bit there);
//   * the test u < p(x)/q(x) is done as u*q(x) < p(x) in float64, and the final draw is the
//     inverse CDF over a sequential float64 cumulative sum (torch.cumsum's order), stepping back
//     from any zero-probability token.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "error_word.h"

namespace sparrow {
namespace {

// Index of the first maximum of the float32 row x[0..V); a NaN counts as the maximum (the first
// NaN wins), as torch.argmax does. Two passes with GCC/Clang vector extensions (SSE2/NEON at the
// baseline ISA): the maximum (four independent accumulators), then the first block of 16 that
// holds it. The row is at most a few hundred KiB, so the second pass reads it from cache; this
// is about 6x faster than a scalar index-tracking loop.
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

inline void load16(const float* x, f32x4& a, f32x4& b, f32x4& c, f32x4& d) {
  std::memcpy(&a, x, 16);  // unaligned loads
  std::memcpy(&b, x + 4, 16);
  std::memcpy(&c, x + 8, 16);
  std::memcpy(&d, x + 12, 16);
}

int64_t argmax_row(const float* x, int64_t V) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const f32x4 neg_inf = {kNegInf, kNegInf, kNegInf, kNegInf};
  f32x4 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  i32x4 nan = {};
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    f32x4 a, b, c, d;
    load16(x + i, a, b, c, d);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
    m2 = c > m2 ? c : m2;
    m3 = d > m3 ? d : m3;
    nan |= (a != a) | (b != b) | (c != c) | (d != d);
  }
  float best = kNegInf;
  bool any_nan = false;
  for (int j = 0; j < 4; ++j) {
    for (float v : {m0[j], m1[j], m2[j], m3[j]}) best = v > best ? v : best;
    any_nan |= nan[j] != 0;
  }
  for (int64_t k = i; k < V; ++k) {
    best = x[k] > best ? x[k] : best;
    any_nan |= x[k] != x[k];
  }
  if (any_nan) {
    for (int64_t k = 0; k < V; ++k)
      if (x[k] != x[k]) return k;
  }
  const f32x4 target = {best, best, best, best};
  int64_t k = 0;
  for (; k + 16 <= V; k += 16) {
    f32x4 a, b, c, d;
    load16(x + k, a, b, c, d);
    const i32x4 hit = (a == target) | (b == target) | (c == target) | (d == target);
    uint64_t halves[2];
    std::memcpy(halves, &hit, 16);
    if (halves[0] | halves[1]) break;
  }
  for (; k < V; ++k)
    if (x[k] == best) return k;
  return 0;  // unreachable: the maximum is in the row
}

// Inverse-CDF draw from the non-negative, possibly unnormalised p with uniform u, as
// reference._sample_from: first index whose float64 running sum exceeds u * total, clamped to the
// last token, then stepped back over zero-probability tokens.
int64_t sample_row(const float* p, int64_t V, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) total += static_cast<double>(p[i]);
  const double target = u * total;
  double cum = 0.0;
  int64_t idx = V;
  for (int64_t i = 0; i < V; ++i) {
    cum += static_cast<double>(p[i]);
    if (cum > target) {
      idx = i;
      break;
    }
  }
  if (idx > V - 1) idx = V - 1;
  while (idx > 0 && !(p[idx] > 0.0f)) --idx;
  return idx;
}

// Per-thread scratch of the sampled path: p (the current target distribution) and a second row
// (the scaled logits before the softmax, then the residual p - q).
struct Scratch {
  std::vector<float> p, work;
  at::Tensor p_t, work_t;
  explicit Scratch(int64_t V) : p(V), work(V) {
    auto opts = at::TensorOptions().dtype(at::kFloat);
    p_t = at::from_blob(p.data(), {V}, opts);
    work_t = at::from_blob(work.data(), {V}, opts);
  }
};

// The row as float32: float rows are read in place, others are converted into s.work by ATen's
// (vectorised) copy, the same rounding as `.float()`; s may be null for float rows.
template <typename scalar_t>
const float* row_as_float(Scratch* s, const scalar_t* row, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
    s->work_t.copy_(at::from_blob(const_cast<scalar_t*>(row), {V}, opts));
    return s->work.data();
  }
}

// p = softmax(logits_row / T) in float32, exactly as torch.softmax(row.float() / T, -1).
template <typename scalar_t>
void softmax_into(Scratch& s, const scalar_t* row, int64_t V, float temp) {
  const float* x = row_as_float(&s, row, V);
  float* w = s.work.data();
  for (int64_t v = 0; v < V; ++v) w[v] = x[v] / temp;
  at::_softmax_out(s.p_t, s.work_t, /*dim=*/0, /*half_to_float=*/false);
}

float tensor_sum(const at::Tensor& t) { return at::sum(t).item<float>(); }

// q_t: the draft's probabilities, float32 or the logits' type (a draft samples from its float32
// q; rounding q to bfloat16 afterwards would break exact sampling).
template <typename scalar_t, typename q_t>
void verify_rows(const int64_t* tokens, const int64_t* parents, const scalar_t* logits,
                 const q_t* draft_probs, const float* temperature, const float* uniform,
                 int64_t* accept_len, int64_t* accepted_nodes, int64_t* out_tokens, int64_t B,
                 int64_t N, int64_t V) {
  // A row costs at least one pass over V logits; small batches of small rows stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> child_start(N + 2), child_list(N > 0 ? N : 1), cursor(N + 1), path;
    path.reserve(N);
    std::unique_ptr<Scratch> scratch;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* tok = tokens + b * N;
      const int64_t* par = parents + b * N;
      const scalar_t* lg = logits + b * (N + 1) * V;
      const float* u = uniform + b * (N + 1);

      // Children of node n (0..N) are child_list[child_start[n] .. child_start[n+1]), node order.
      std::fill(child_start.begin(), child_start.end(), 0);
      for (int64_t i = 1; i <= N; ++i)
        if (tok[i - 1] >= 0) ++child_start[par[i - 1] + 1];
      for (int64_t n = 0; n <= N; ++n) child_start[n + 1] += child_start[n];
      std::copy(child_start.begin(), child_start.end() - 1, cursor.begin());
      for (int64_t i = 1; i <= N; ++i)
        if (tok[i - 1] >= 0) child_list[cursor[par[i - 1]]++] = i;

      const float temp = temperature[b];
      int64_t node = 0, new_token = -1;
      if (!scratch && (temp != 0.0f || !std::is_same_v<scalar_t, float>))
        scratch = std::make_unique<Scratch>(V);  // first row of this task that needs one
      if (temp == 0.0f) {
        while (true) {
          const int64_t best = argmax_row(row_as_float(scratch.get(), lg + node * V, V), V);
          int64_t next = -1;
          for (int64_t k = child_start[node]; k < child_start[node + 1]; ++k) {
            if (tok[child_list[k] - 1] == best) {
              next = child_list[k];
              break;
            }
          }
          if (next < 0) {
            new_token = best;
            break;
          }
          path.push_back(next);
          node = next;
        }
      } else {
        Scratch& s = *scratch;
        float* p = s.p.data();
        float* w = s.work.data();
        int64_t used = 0;
        softmax_into(s, lg, V, temp);
        while (true) {
          int64_t accepted = -1;
          for (int64_t k = child_start[node]; k < child_start[node + 1]; ++k) {
            const int64_t c = child_list[k];
            const int64_t x = tok[c - 1];
            const double ud = static_cast<double>(u[used++]);
            if (draft_probs != nullptr) {
              const q_t* q = draft_probs + (b * N + (c - 1)) * V;
              // u < min(1, p(x)/q(x)), written without the division.
              if (ud * static_cast<double>(static_cast<float>(q[x])) < static_cast<double>(p[x])) {
                accepted = c;
                break;
              }
              const float* qf = row_as_float(&s, q, V);  // q itself, or q converted into w
              for (int64_t v = 0; v < V; ++v) {
                const float r = p[v] - qf[v];
                w[v] = r > 0.0f ? r : 0.0f;
              }
              const float total = tensor_sum(s.work_t);
              // All zero only when p equalled q up to rounding: keep p then.
              if (total > 0.0f)
                for (int64_t v = 0; v < V; ++v) p[v] = w[v] / total;
            } else {
              // One-hot q: accept with probability p(x); on rejection zero p(x) and renormalise.
              if (ud < static_cast<double>(p[x])) {
                accepted = c;
                break;
              }
              const float px = p[x];
              p[x] = 0.0f;
              const float total = tensor_sum(s.p_t);
              if (total > 0.0f) {
                for (int64_t v = 0; v < V; ++v) p[v] = p[v] / total;
              } else {
                p[x] = px;
              }
            }
          }
          if (accepted < 0) {
            new_token = sample_row(p, V, static_cast<double>(u[used]));
            break;
          }
          path.push_back(accepted);
          node = accepted;
          softmax_into(s, lg + node * V, V, temp);
        }
      }

      const int64_t k = static_cast<int64_t>(path.size());
      accept_len[b] = k;
      int64_t* nodes_out = accepted_nodes + b * N;
      int64_t* toks_out = out_tokens + b * (N + 1);
      for (int64_t j = 0; j < k; ++j) {
        nodes_out[j] = path[j];
        toks_out[j] = tok[path[j] - 1];
      }
      toks_out[k] = new_token;
      path.clear();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs_opt, const at::Tensor& temperature,
    const at::Tensor& uniform) {
  SPARROW_CHECK_DIM(draft_tokens, 2);
  SPARROW_CHECK_DIM(parents, 2);
  SPARROW_CHECK_DIM(target_logits, 3);
  SPARROW_CHECK_DIM(temperature, 1);
  SPARROW_CHECK_DIM(uniform, 2);
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "draft_tokens must be int64, got ",
              draft_tokens.scalar_type());
  TORCH_CHECK(parents.scalar_type() == at::kLong, "parents must be int64, got ", parents.scalar_type());
  SPARROW_CHECK_FLOAT_DTYPE(target_logits);
  TORCH_CHECK(temperature.scalar_type() == at::kFloat, "temperature must be float32, got ",
              temperature.scalar_type());
  TORCH_CHECK(uniform.scalar_type() == at::kFloat, "uniform must be float32, got ", uniform.scalar_type());
  TORCH_CHECK(draft_tokens.device().is_cpu(), "draft_tokens must be a CPU tensor for the CPU kernel, got ",
              draft_tokens.device());
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, parents);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, target_logits);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, temperature);
  SPARROW_CHECK_SAME_DEVICE(draft_tokens, uniform);

  const int64_t B = draft_tokens.size(0), N = draft_tokens.size(1), V = target_logits.size(2);
  SPARROW_CHECK_SIZE(parents, 0, B);
  SPARROW_CHECK_SIZE(parents, 1, N);
  SPARROW_CHECK_SIZE(target_logits, 0, B);
  TORCH_CHECK(target_logits.size(1) == N + 1, "target_logits.size(1) must be N+1 = ", N + 1,
              " (draft_tokens shape ", draft_tokens.sizes(), ", target_logits shape ",
              target_logits.sizes(), ")");
  TORCH_CHECK(V > 0, "target_logits.size(2) (the vocabulary V) must be positive, got shape ",
              target_logits.sizes());
  SPARROW_CHECK_SIZE(temperature, 0, B);
  SPARROW_CHECK_SIZE(uniform, 0, B);
  TORCH_CHECK(uniform.size(1) == N + 1, "uniform.size(1) must be N+1 = ", N + 1, " (uniform shape ",
              uniform.sizes(), ")");

  at::Tensor draft_probs;
  if (draft_probs_opt.has_value() && draft_probs_opt->defined()) {
    draft_probs = *draft_probs_opt;
    SPARROW_CHECK_DIM(draft_probs, 3);
    check_draft_probs_dtype(target_logits, draft_probs);
    SPARROW_CHECK_SAME_DEVICE(draft_tokens, draft_probs);
    SPARROW_CHECK_SIZE(draft_probs, 0, B);
    SPARROW_CHECK_SIZE(draft_probs, 1, N);
    TORCH_CHECK(draft_probs.size(2) == V, "draft_probs.size(2) must be V = ", V,
                " (target_logits.size(2)), got draft_probs shape ", draft_probs.sizes());
    draft_probs = draft_probs.contiguous();
  }

  const at::Tensor tok = draft_tokens.contiguous();
  const at::Tensor par = parents.contiguous();
  const at::Tensor logits = target_logits.contiguous();
  const at::Tensor temp = temperature.contiguous();
  const at::Tensor unif = uniform.contiguous();

  // Values the walk indexes with: checked up front so the kernel never reads out of bounds.
  const int64_t* tok_p = tok.const_data_ptr<int64_t>();
  const int64_t* par_p = par.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 1; i <= N; ++i) {
      const int64_t t = tok_p[b * N + i - 1], pa = par_p[b * N + i - 1];
      if (t != -1 && (t < 0 || t >= V)) raise_error(err::kVerifyToken, err::pack2(b, i - 1), t, V);
      const int64_t lowest = t == -1 ? -1 : 0;
      if (pa < lowest || pa >= i) raise_error(err::kVerifyParent, err::pack2(b, i - 1), pa, lowest);
    }
  }
  const float* temp_p = temp.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (!(std::isfinite(temp_p[b]) && temp_p[b] >= 0.0f)) {
      uint32_t bits;
      std::memcpy(&bits, &temp_p[b], sizeof(bits));
      raise_error(err::kVerifyTemperature, b, static_cast<int64_t>(bits), 0);
    }
  }

  auto long_opts = draft_tokens.options().dtype(at::kLong);
  at::Tensor accept_len = at::zeros({B}, long_opts);
  at::Tensor accepted_nodes = at::full({B, N}, -1, long_opts);
  at::Tensor out_tokens = at::full({B, N + 1}, -1, long_opts);
  if (B == 0) return {accept_len, accepted_nodes, out_tokens};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sparrow_verify_cpu", [&] {
    auto run = [&](auto* q) {
      using q_t = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
      verify_rows<scalar_t, q_t>(tok_p, par_p, logits.const_data_ptr<scalar_t>(), q, temp_p,
                                 unif.const_data_ptr<float>(), accept_len.mutable_data_ptr<int64_t>(),
                                 accepted_nodes.mutable_data_ptr<int64_t>(), out_tokens.mutable_data_ptr<int64_t>(),
                                 B, N, V);
    };
    if (draft_probs.defined() && draft_probs.scalar_type() != logits.scalar_type())
      run(draft_probs.const_data_ptr<float>());  // float32 q with half-precision (or float64) logits
    else
      run(draft_probs.defined() ? draft_probs.const_data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr));
  });
  return {accept_len, accepted_nodes, out_tokens};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("verify", &verify_cpu); }

}  // namespace sparrow
