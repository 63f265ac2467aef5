// Every sparrow op's schema, in one always-built file. Kernels register separately:
// csrc/cpu/<op>.cpp for CPU and csrc/cuda/<op>.cu for CUDA (TORCH_LIBRARY_IMPL), so a CPU-only
// build still knows every op and a CUDA tensor there fails with a clear "no CUDA kernel" error.
// Contracts: ../shared/DESIGN.md ("Op contracts") and the docstrings in sparrow/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(sparrow, m) {
  // out[N,Dout] = cat(embed[token_ids], hidden) @ weight.T + bias, without the gather or the cat.
  m.def("fused_fc(Tensor token_ids, Tensor embed, Tensor hidden, Tensor weight, Tensor? bias) -> Tensor");
  // Attention of Lq new queries over a text-only cache: prefix (optionally windowed) + tree/causal block.
  m.def(
      "text_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor? tree_mask, "
      "float scale, int window) -> Tensor");
  // In place, for every tensor of caches (all layers' K and V: one launch): slot dst_start[b]+m <-
  // slot src_index[b,m] along seq_dim, for m < counts[b].
  m.def(
      "gather_kv_(Tensor(a!)[] caches, Tensor src_index, Tensor counts, Tensor dst_start, int seq_dim) -> ()");
  // In place: slots start[b] .. start[b]+M-1 along seq_dim of k_cache / v_cache <- k_new / v_new.
  m.def(
      "write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor start, "
      "int seq_dim) -> ()");
  // Batched acceptance of a draft tree/chain: greedy or exact speculative sampling.
  m.def(
      "verify(Tensor draft_tokens, Tensor parents, Tensor target_logits, Tensor? draft_probs, "
      "Tensor temperature, Tensor uniform) -> (Tensor accept_len, Tensor accepted_nodes, Tensor out_tokens)");
  // Error words (error_codes.h): this thread's deferred word for a CUDA device (None: clear), and
  // the RuntimeError of a word's host copy (nothing when its code is 0). Host helpers, no kernels.
  m.def("_set_error_word(int device, Tensor? word) -> ()");
  m.def("_raise_error_word(Tensor word) -> ()");
}
