"""What the draft/verify loop needs from a target model: the contract every adapter keeps.

An adapter wraps one Hugging Face video LLM without modifying it. It is the only place that knows
a model family (its input format, its positions, its cache). Per generation it does:

    prefill(inputs, decode_slots)   -> PrefillOutput (cache state, first logits, text features)
    verify(state, root, tree)       -> VerifyOutput  (logits and features of root + tree nodes)
    commit(state, nodes, counts)    -> keeps root + accepted nodes in the cache, drops the rest
    select_rows(state, rows)        -> the rows that stay in the batch

The cache is allocated once by prefill, with room for `decode_slots` more entries per row
(max_new_tokens + the tree), at static shapes. Row b's committed entries are its first lens[b]
slots. verify writes the root and the tree at slots lens[b] .., commit moves the accepted entries
behind the root; nothing is reallocated per step and nothing in verify or commit reads the device
on the host. hf.py implements this for Hugging Face decoders (every supported family).

Features. `FeatureSpec` chooses the target feature h the draft reads (DESIGN.md, HSR): by default
the hidden state that feeds the LM head, i.e. after the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """Which target hidden state the draft reads as h.

    layer: index of the decoder layer whose output is taken (-1: the last layer).
    after_norm: take the last layer's output after the final norm, i.e. the exact input of the LM
        head (EAGLE's and ViSpec's choice; the paper's "second-to-top" state). Only with layer=-1.
    """

    layer: int = -1
    after_norm: bool = True


@dataclass
class TargetState:
    """The adapter's per-generation state. The loop treats it as opaque except for `batch_size`."""

    cache: Any  # the adapter's cache (hf.py: a StaticKVCache)
    lens: torch.Tensor  # [B] long: committed entries per row (= the slot where the next root goes)
    next_position: torch.Tensor  # [B] long: text position id of the next token (the root)
    extra: dict = field(default_factory=dict)  # per-call bookkeeping (e.g. the last tree's size)

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]


@dataclass
class PrefillOutput:
    """What prefill returns for a batch of B prompts (left-padded to S tokens)."""

    state: TargetState | None  # None when prefill was asked for no cache (decode_slots=None)
    logits: torch.Tensor  # [B, V]: the target's prediction after the last prompt token
    input_ids: torch.Tensor  # [B, S]: the prompt as fed (left-padded; visual placeholders kept)
    visual_mask: torch.Tensor  # [B, S] bool: visual positions
    text_mask: torch.Tensor  # [B, S] bool: real (non-pad) text positions
    features: torch.Tensor  # [B, S, H]: FeatureSpec features at every position (text ones are used)
    visual_embeds: torch.Tensor | None = None  # [B, S, H] input embeddings (MSD baseline); if asked
    visual_mid: torch.Tensor | None = None  # [B, S, H] layer-L/2 hidden states (IVSB, no-VATA); if asked


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # [B, N+1, V]: row i = the target's prediction after tree node i (0 = root)
    features: torch.Tensor  # [B, N+1, H]: FeatureSpec features at those nodes


class TargetAdapter:
    """Base class; one small subclass per model family (qwen2_vl.py, llava_onevision.py)."""

    family: str = ""  # the config's model_type this adapter serves

    def __init__(self, model: nn.Module, feature: FeatureSpec = FeatureSpec()):
        self.model = model
        self.feature = feature

    # -- identity and the pieces the draft shares -------------------------------------------
    @property
    def text_config(self):
        raise NotImplementedError

    def identity(self) -> dict:
        """What a draft records about its target and checks on load."""
        tc = self.text_config
        return {
            "architecture": type(self.model).__name__,
            "model_type": self.family,
            "hidden_size": tc.hidden_size,
            "vocab_size": tc.vocab_size,
            "num_hidden_layers": tc.num_hidden_layers,
        }

    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    # -- the three calls of a generation ------------------------------------------------------
    def prefill(
        self, inputs: dict, want_visual_embeds: bool = False, want_visual_mid: bool = False,
        continuation: int = 0, decode_slots: int | None = 256,
    ) -> PrefillOutput:
        """Run the prompt (processor-style dict: input_ids, attention_mask, pixel values, grids).
        decode_slots: cache entries per row to reserve beyond the prompt (the loop asks for
        max_new_tokens + tree size); None: no cache at all (features only, e.g. training data).
        continuation: the last `continuation` tokens of every row are not prompt but its answer
        (training data): they get the positions decoding gives them (after the largest position of
        the prompt before them), which in Qwen-VL under transformers 5.x differ from what one
        forward over the whole sequence gives once the video has more frame pairs than rows."""
        raise NotImplementedError

    def verify(self, state: TargetState, root: torch.Tensor, tree, compile: dict | None = None) -> VerifyOutput:
        """One forward over root + tree: root [B] (the last committed token), tree a sparrow.tree.Tree
        (tokens [B, N], -1 padded; depths; visible). Node i's position is next_position + depth(i);
        it attends to the row's committed prefix and to its own ancestors. compile: torch.compile
        options for the forward (sparrow/compiling.py), or None for eager."""
        raise NotImplementedError

    def commit(self, state: TargetState, accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Keep root + accepted nodes (accepted_nodes [B, N], -1 padded; accept_len [B]) in the
        cache after the last verify; drop the other tree entries; advance positions."""
        raise NotImplementedError

    def select_rows(self, state: TargetState, rows: torch.Tensor) -> TargetState:
        """Keep only the given batch rows (finished rows leave the batch)."""
        raise NotImplementedError


