"""The proposer that keeps Sparrow's draft on text positions (VATA) inside vLLM.

vLLM's EAGLE proposer gives the draft every position the target computed, visual placeholders
included, and writes the draft's KV at the target's slots. For a Sparrow draft this subclass
rewrites the first pass before handing it to vLLM's own code:

- rows of visual placeholder tokens are dropped (their features are never the draft's input);
- each request's first chunk gets one extra row in front, Sparrow's entry 0 (the first token,
  a zero feature), so the draft's cache is the one it was trained on;
- the draft's positions are its text indices (entry 0 at 0), and its KV goes to those indices'
  slots inside the request's own blocks: the draft cache is compacted, its attention length per
  request the number of its text entries, whatever the video's length;
- vLLM's loop then drafts the chain from there unchanged (positions and slots + 1 per step).

Where the draft is not Sparrow's, it is vLLM's EagleProposer, untouched. Needs the non-padded
drafter batch (`disable_padded_drafter_batch`: rejected tokens are dropped before the drafter
sees them); the plugin sets it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
from vllm.v1.spec_decode.eagle import EagleProposer

from sparrow.integrations.vllm.model import ARCHITECTURE

# (config key of the placeholder ids, per family): Qwen-VL, LLaVA-OneVision
PLACEHOLDER_KEYS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")


def placeholder_ids(hf_config) -> list[int]:
    ids = {getattr(hf_config, k, None) for k in PLACEHOLDER_KEYS}
    return sorted(i for i in ids if isinstance(i, int))


TEXT_ONLY_ENV = "SPARROW_VLLM_TEXT_ONLY"  # "0": feed the draft every position, as vLLM's EAGLE does (baseline)
TIME_ENV = "SPARROW_VLLM_RECORD_DRAFT_TIME"  # a file: the seconds of each propose call


def _check_config(vllm_config) -> None:
    """What the text-only draft cache needs of the engine, and a draft of this target, said at
    start-up."""
    from sparrow.integrations.vllm.model import draft_config

    spec = vllm_config.speculative_config
    target = vllm_config.model_config.hf_config
    text = target.get_text_config() if hasattr(target, "get_text_config") else target
    trained = draft_config(spec.draft_model_config.hf_config).target
    served = {"model_type": target.model_type, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
              "num_hidden_layers": text.num_hidden_layers}
    differ = {k: (trained.get(k), v) for k, v in served.items() if k in trained and trained[k] != v}
    if differ:
        raise ValueError(f"the Sparrow draft {spec.model} was trained against another target: "
                         + ", ".join(f"{k} {a} (draft's target) != {b} (served)" for k, (a, b) in differ.items()))
    if not spec.disable_padded_drafter_batch:
        raise ValueError('a Sparrow draft needs "disable_padded_drafter_batch": true in the speculative config '
                         "(its rows are rewritten after rejected tokens are dropped)")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("a Sparrow draft needs prefix caching off (--no-enable-prefix-caching): its compacted KV "
                         "would be written into blocks that other requests share")


PROPOSERS_MADE = []  # model.py checks that this process drafts through SparrowProposer


class SparrowProposer(EagleProposer):
    def __init__(self, vllm_config, device, runner=None):
        PROPOSERS_MADE.append(type(self).__name__)
        super().__init__(vllm_config, device, runner)
        self.model_runner = runner  # its input batch holds each request's prompt (placeholder counts)
        archs = getattr(self.draft_model_config.hf_config, "architectures", None) or []
        self.is_sparrow_draft = ARCHITECTURE in archs
        self.sparrow = self.is_sparrow_draft and os.environ.get(TEXT_ONLY_ENV, "1") != "0"
        if self.sparrow:
            _check_config(vllm_config)
            self.supports_mm_inputs = False  # the draft reads token embeddings at text rows only
            self.placeholders = np.array(placeholder_ids(vllm_config.model_config.hf_config), dtype=np.int64)
            self.target_mrope = vllm_config.model_config.uses_mrope
            self._placeholder_counts: dict[str, np.ndarray] = {}  # request id -> _prompt_placeholders

    def load_model(self, target_model) -> None:
        cfg = getattr(target_model, "config", None)
        if self.is_sparrow_draft and cfg is not None and not hasattr(cfg, "image_token_index"):
            # vLLM 0.32's EAGLE loading names Qwen2.5-VL's image_token_id but reads image_token_index for
            # Qwen2-VL, whose config has only the former
            cfg.image_token_index = getattr(cfg, "image_token_id", None)
        super().load_model(target_model)
        if self.sparrow:
            self.supports_mm_inputs = False

    def propose(self, *args, **kwargs):
        """vLLM's propose, timed into $SPARROW_VLLM_RECORD_DRAFT_TIME when set (bench_vllm.py)."""
        path = os.environ.get(TIME_ENV)
        if not path:
            return self._propose(*args, **kwargs)
        start = time.perf_counter()
        out = self._propose(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        with open(path, "a") as f:
            f.write(f"{time.perf_counter() - start}\n")
        return out

    def _propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                 next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                 mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        if not self.sparrow:
            return super().propose(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                                   next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                                   mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings)
        ids, positions, hidden, sample_at, cad = self.text_rows(target_token_ids, target_hidden_states,
                                                                 common_attn_metadata)
        return super().propose(num_speculative_tokens, ids, positions, hidden, next_token_ids, sample_at, cad,
                               sampling_metadata, None, None, None)

    # -- the first pass, text rows only ------------------------------------------------------------
    def _prompt_placeholders(self, row: int) -> np.ndarray:
        """[P + 1]: the placeholders among the request's first p prompt tokens, for p = 0..P;
        counted once per request (the prompt does not change), not at every step."""
        batch = self.model_runner.input_batch
        req = batch.req_ids[row]
        if req not in self._placeholder_counts:
            prompt = batch.token_ids_cpu[row, : batch.num_prompt_tokens[row]]
            self._placeholder_counts[req] = np.concatenate([[0], np.cumsum(np.isin(prompt, self.placeholders))])
        return self._placeholder_counts[req]

    def _forget_finished(self, num_reqs: int) -> None:
        """Drop the counts of requests no longer in the batch (finished or preempted)."""
        live = set(self.model_runner.input_batch.req_ids[:num_reqs])
        for req in [r for r in self._placeholder_counts if r not in live]:
            del self._placeholder_counts[req]

    def text_rows(self, token_ids: torch.Tensor, hidden: torch.Tensor, cad):
        """The draft's rows of this step: (token ids, positions, features, the row to sample per
        request, attention metadata with the draft's lengths and compacted slots)."""
        starts = cad.query_start_loc_cpu.numpy()
        seq_lens = cad.seq_lens.cpu().numpy()
        ids_host = token_ids.cpu().numpy()
        src, pos, zero_row, counts, draft_lens = [], [], [], [], []
        for r in range(cad.num_reqs):
            lo, hi = int(starts[r]), int(starts[r + 1])
            first = int(seq_lens[r]) - (hi - lo)  # target index of this chunk's first token
            cum = self._prompt_placeholders(r)  # placeholders before target index p: cum[min(p, P)]
            keep = np.nonzero(~np.isin(ids_host[lo:hi], self.placeholders))[0]
            p = first + keep
            rows, rows_pos = (lo + keep).tolist(), (p - cum[np.minimum(p, len(cum) - 1)] + 1).tolist()
            zeros = [False] * len(rows)
            if first == 0:  # entry 0: (first token, zero feature) at position 0
                rows, rows_pos, zeros = [lo] + rows, [0] + rows_pos, [True] + zeros
            length = int(seq_lens[r]) - int(cum[min(int(seq_lens[r]), len(cum) - 1)]) + 1  # entries after this step
            if not rows:  # a chunk of placeholders only: one scratch row past the end, overwritten later
                rows, rows_pos, zeros, length = [lo], [length], [True], length + 1
            src += rows
            pos += rows_pos
            zero_row += zeros
            counts.append(len(rows))
            draft_lens.append(length)
        self._forget_finished(cad.num_reqs)
        return self._pack(token_ids, hidden, cad, src, pos, zero_row, counts, draft_lens)

    def _pack(self, token_ids, hidden, cad, src, pos, zero_row, counts, draft_lens):
        """The rows as tensors, and the attention metadata of the draft's cache: its lengths, and
        slots at its positions in each request's own blocks."""
        device = token_ids.device
        src_t = torch.tensor(src, device=device)
        ids = token_ids[src_t]  # vLLM shifts them left by one per request: entry 0 gets the first token
        zero = torch.tensor(zero_row, device=device)
        feats = torch.where(zero[:, None], torch.zeros_like(hidden[:1]), hidden[src_t])
        positions = torch.tensor(pos, device=device, dtype=torch.int64)
        req = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        block = self.block_size
        slots = cad.block_table_tensor[req, positions // block].to(torch.int64) * block + positions % block
        query_start = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32)
        lens = torch.tensor(draft_lens, dtype=cad.seq_lens.dtype)
        new = dataclasses.replace(
            cad, query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=lens.to(device),
            num_actual_tokens=len(src), max_query_len=max(counts), max_seq_len=max(draft_lens),
            slot_mapping=slots, positions=None, seq_lens_cpu_upper_bound=lens.clone(),
            _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        if self.target_mrope:
            positions = positions[None].expand(3, -1)
        return ids, positions, feats, query_start[1:].to(device) - 1, new
