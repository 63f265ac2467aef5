"""SparrowDraft as a vLLM model (architecture "EagleSparrowDraft"): the same fc + one decoder
layer as sparrow/draft/model.py, with its attention through vLLM's `Attention`, so its KV lives
in vLLM's own cache blocks. The proposer (proposer.py) feeds it text positions only.

    z = fc(embed[x] ⊕ h)                 h: the target's feature (vLLM passes its final hidden
                                          state, which is Sparrow's default feature: post-norm)
    y = z + o(attn(rope(q), rope(k), v))  q/k/v of RMSNorm(z); 1D rotary at the draft's own
    out = y + down(silu(gate(n)) * up(n)) text index; n = RMSNorm(y)

RMSNorm and the rotary embedding are sparrow/draft/model.py's own. The embeddings and the LM head
are the target's (the proposer shares them after loading).
Linear layers are plain torch modules: the draft is small, and with tensor parallelism each rank
keeps a whole copy (docs/vllm.md, "Scale").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparrow.draft.model import RMSNorm, Rotary  # the draft's own numerics

ARCHITECTURE = "EagleSparrowDraft"
RECORD_ENV = "SPARROW_VLLM_RECORD_ATTENTION"  # a file: each draft forward appends its attention lengths


def draft_config(hf_config):
    """The exported draft's own DraftConfig (config.json's "sparrow" entry, export.py): read from
    it, not from the Llama-type fields transformers and vLLM rename between versions."""
    from sparrow.draft.config import DraftConfig

    entry = getattr(hf_config, "sparrow", None)
    if not isinstance(entry, dict):
        raise ValueError(f"{ARCHITECTURE}: the draft's config.json has no 'sparrow' entry; write the folder with "
                         "`sparrow export-vllm`")
    return DraftConfig.from_dict(entry)


class DraftLayer(nn.Module):
    def __init__(self, cfg, vllm_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        H, self.hq, self.hkv, self.d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rotary = Rotary(self.d, cfg.rope_theta)
        bias = cfg.attention_bias
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(H, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(H, self.hkv * self.d, bias=bias)
        self.v_proj = nn.Linear(H, self.hkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.d, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
        self.attn = Attention(self.hq, self.d, self.d ** -0.5, num_kv_heads=self.hkv,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n = self.input_layernorm(z)
        cos, sin = self.rotary.cos_sin(positions, torch.float32)  # [N, 1, d]
        q = self.rotary.apply(self.q_proj(n).view(-1, self.hq, self.d), cos, sin)
        k = self.rotary.apply(self.k_proj(n).view(-1, self.hkv, self.d), cos, sin)
        v = self.v_proj(n)
        _record_attention(self.attn.layer_name)
        y = z + self.o_proj(self.attn(q.flatten(1), k.flatten(1), v))
        m = self.post_attention_layernorm(y)
        return y + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


def _record_attention(layer_name: str) -> None:
    """Tests: append the attention lengths (seq_lens) and query lengths per request of this forward
    to $SPARROW_VLLM_RECORD_ATTENTION."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    meta = meta.get(layer_name) if isinstance(meta, dict) else None
    if meta is not None:
        starts = meta.query_start_loc.tolist()
        record = {"seq_lens": meta.seq_lens.tolist(), "query_lens": [b - a for a, b in zip(starts, starts[1:])]}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class DraftModel(nn.Module):
    def __init__(self, cfg, vllm_config, prefix: str, layer_id: int):
        super().__init__()
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)  # replaced: the target's
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DraftLayer(cfg, vllm_config, prefix=f"{prefix}.layers.{layer_id}")

    def forward(self, input_ids, positions, hidden_states, inputs_embeds=None):
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if positions.dim() == 2:  # a target with M-RoPE: the draft's 1D positions are row 0
            positions = positions[0]
        out = self.layer(positions, self.fc(torch.cat([embeds, hidden_states], -1)))
        return out, out


class EagleSparrowDraft(nn.Module):
    """What vLLM's EAGLE proposer calls: forward -> (hidden for logits, hidden fed back)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        from sparrow.integrations.vllm.proposer import PROPOSERS_MADE

        if not PROPOSERS_MADE:  # vLLM's V2 model runner has its own EAGLE code, which the plugin does not replace
            raise RuntimeError(f"{ARCHITECTURE} drafts through the plugin's proposer in vLLM's V1 model runner; this "
                               "engine uses another (set VLLM_USE_V2_MODEL_RUNNER=0, and load sparrow's vLLM plugin)")
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        cfg = draft_config(self.config)
        layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = DraftModel(cfg, vllm_config, prefix=f"{prefix}model" if not prefix else f"{prefix}.model",
                                layer_id=layers)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)  # replaced: the target's
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, hidden_states, inputs_embeds=None):
        return self.model(input_ids, positions, hidden_states, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The exported draft's tensors (export.py: Sparrow's own names) into this module."""
        params = dict(self.model.named_parameters())
        loaded = set()
        for key, tensor in weights:
            if key not in params:
                raise ValueError(f"{ARCHITECTURE}: unexpected tensor {key!r} in the draft's weights")
            params[key].data.copy_(tensor.to(params[key].dtype))
            loaded.add(f"model.{key}")
        missing = {f"model.{k}" for k in params if not k.startswith("embed_tokens")} - loaded
        if missing:
            raise ValueError(f"{ARCHITECTURE}: the draft's weights lack {sorted(missing)}")
        return loaded | {f"model.{k}" for k in params if k.startswith("embed_tokens")} | {"lm_head.weight"}
