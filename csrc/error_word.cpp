// The error-word table (codes: error_codes.h) and the two small ops behind
// sparrow.ops.deferred_checks / raise_if_error. Always built, with the schemas.
#include "error_word.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

namespace sparrow {

std::string error_message(const int64_t w[4]) {
  using namespace err;
  const int64_t code = w[0], i0 = w[1], i1 = w[2], i2 = w[3];
  switch (code) {
    case kFusedFcToken:
      return c10::str("token_ids[", i0, "] = ", i1, " is outside [0, ", i2, ") (embed.size(0))");
    case kTextAttentionLens: {
      const int64_t Lq = hi32(i2), L = lo32(i2);
      return c10::str("cache_lens[", i0, "] = ", i1, " must lie in [Lq, L] = [", Lq, ", ", L, "]: the ", Lq,
                      " new positions end at slot cache_lens[b]-1 of a ", L, "-slot cache");
    }
    case kGatherCounts:
      return c10::str("counts[", i0, "] = ", i1, " must lie in [0, ", i2, "] (src_index.size(1))");
    case kGatherDst: {
      const int64_t b = hi32(i0), c = lo32(i0);
      return c10::str("dst_start[", b, "] = ", i1, " with counts[", b, "] = ", c,
                      " must satisfy 0 <= dst_start and dst_start + counts <= ", i2, " (cache length along seq_dim)");
    }
    case kGatherSrcRange:
      return c10::str("src_index[", hi32(i0), ", ", lo32(i0), "] = ", i1, " is outside [0, ", i2, ")");
    case kGatherSrcBefore:
      return c10::str("src_index[", hi32(i0), ", ", lo32(i0), "] = ", i1, " lies before its destination slot ", i2,
                      " (dst_start + m); the in-place move would overwrite it first");
    case kGatherSrcOrder: {
      const int64_t b = hi32(i0), m = lo32(i0);
      return c10::str("src_index[", b, "] must ascend over its first counts[", b, "] entries, got ", i1, " then ", i2,
                      " at m = ", m);
    }
    case kVerifyToken:
      return c10::str("draft_tokens[", hi32(i0), ", ", lo32(i0), "] = ", i1, " is outside [0, V) with V = ", i2,
                      " (-1 marks a padded node)");
    case kVerifyParent: {
      const int64_t b = hi32(i0), j = lo32(i0);
      return c10::str("parents[", b, ", ", j, "] = ", i1, " must lie in ", i2, "..", j, ": node ", j + 1,
                      "'s parent must come before it (parents must be topologically ordered; node 0 is the root)");
    }
    case kVerifyTemperature: {
      const auto bits = static_cast<uint32_t>(i1);
      float t;
      std::memcpy(&t, &bits, sizeof(t));
      return c10::str("temperature[", i0, "] = ", t, " must be finite and >= 0 (0: greedy)");
    }
    case kWriteStart: {
      const int64_t M = hi32(i2), L = lo32(i2);
      return c10::str("start[", i0, "] = ", i1, " must satisfy 0 <= start and start + M <= L with M = ", M,
                      " (k_new.size(seq_dim)) and L = ", L, " (k_cache.size(seq_dim))");
    }
    default:
      return c10::str("sparrow: unknown error word [", code, ", ", i0, ", ", i1, ", ", i2,
                      "] (op id = code >> 8, check id = code & 255)");
  }
}

void raise_error_word(const int64_t word[4]) { TORCH_CHECK(false, error_message(word)); }

namespace {

// This thread's deferred error word per CUDA device (index = device); undefined: none set.
thread_local std::vector<at::Tensor> t_words;

void set_error_word(int64_t device, const std::optional<at::Tensor>& word) {
  TORCH_CHECK(device >= 0 && device < 1024, "device must be a CUDA device index, got ", device);
  if (static_cast<int64_t>(t_words.size()) <= device) t_words.resize(device + 1);
  if (!word.has_value() || !word->defined()) {
    t_words[device] = at::Tensor();
    return;
  }
  const at::Tensor& w = *word;
  TORCH_CHECK(w.is_cuda() && w.get_device() == device, "word must be on cuda:", device, ", got ", w.device());
  TORCH_CHECK(w.scalar_type() == at::kLong && w.dim() == 1 && w.size(0) == 4 && w.is_contiguous(),
              "word must be a contiguous int64 tensor of 4 elements, got ", w.scalar_type(), " of shape ", w.sizes());
  t_words[device] = w;
}

void raise_error_word_op(const at::Tensor& word) {
  TORCH_CHECK(word.device().is_cpu(), "word must be a CPU tensor (the host copy of the error word), got ",
              word.device());
  TORCH_CHECK(word.scalar_type() == at::kLong && word.dim() == 1 && word.size(0) == 4,
              "word must be an int64 tensor of 4 elements [code, i0, i1, i2], got ", word.scalar_type(), " of shape ",
              word.sizes());
  const int64_t* p = word.const_data_ptr<int64_t>();
  const int64_t s = word.stride(0);
  const int64_t w[4] = {p[0], p[s], p[2 * s], p[3 * s]};
  if (w[0] != 0) raise_error_word(w);
}

}  // namespace

int64_t* deferred_error_word(int64_t device) {
  if (device < 0 || device >= static_cast<int64_t>(t_words.size()) || !t_words[device].defined()) return nullptr;
  return t_words[device].data_ptr<int64_t>();
}

}  // namespace sparrow

// No tensor argument when clearing (word = None): the composite kernel serves every dispatch key.
TORCH_LIBRARY_IMPL(sparrow, CompositeExplicitAutograd, m) { m.impl("_set_error_word", &sparrow::set_error_word); }
TORCH_LIBRARY_IMPL(sparrow, CPU, m) { m.impl("_raise_error_word", &sparrow::raise_error_word_op); }
