"""What the draft/verify loop needs from a target model: the contract every adapter keeps.

An adapter wraps one Hugging Face video LLM without modifying it. It is the only place that knows
a model family (its input format, its positions, its cache). Per generation it does three things:

    prefill(inputs)                 -> PrefillOutput (cache state, first logits, text features)
    verify(state, tokens, parents)  -> VerifyOutput  (logits and features of root + tree nodes)
    commit(state, nodes, counts)    -> keeps root + accepted nodes in the cache, drops the rest

Cache layout (all families). The Hugging Face cache holds S slots per row, uniformly. Row b's live
entries are the contiguous slots [state.start[b], state.end[b]); everything else (left padding of
a shorter prompt, rejected tree nodes, a gap left by a row that accepted fewer tokens) is dead and
masked out of every attention. verify() appends the N+1 tree entries at slots S..S+N for every
row; commit() moves row b's root and accepted nodes to [end[b], end[b]+k+1) with ops.gather_kv_
(sources ascend and never lie before their destination), then crops the cache to max(end).

Features. `FeatureSpec` chooses the target feature h the draft reads (DESIGN.md, HSR): by default
the hidden state that feeds the LM head, i.e. after the final norm. It is taken with a forward hook,
never by asking the model for all layers' hidden states.
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

    cache: Any  # the Hugging Face Cache object
    start: torch.Tensor  # [B] long: first live slot of each row
    end: torch.Tensor  # [B] long: one past the last live slot (= where the next root goes)
    next_position: torch.Tensor  # [B] long: text position id of the next token (the root)
    extra: dict = field(default_factory=dict)  # per-call bookkeeping (e.g. the last tree's size)

    @property
    def batch_size(self) -> int:
        return int(self.start.shape[0])


@dataclass
class PrefillOutput:
    """What prefill returns for a batch of B prompts (left-padded to S tokens)."""

    state: TargetState
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
        self, inputs: dict, want_visual_embeds: bool = False, want_visual_mid: bool = False, continuation: int = 0
    ) -> PrefillOutput:
        """Run the prompt (processor-style dict: input_ids, attention_mask, pixel values, grids).
        continuation: the last `continuation` tokens of every row are not prompt but its answer
        (training data): they get the positions decoding gives them (after the largest position of
        the prompt before them), which in Qwen-VL under transformers 5.x differ from what one
        forward over the whole sequence gives once the video has more frame pairs than rows."""
        raise NotImplementedError

    def verify(self, state: TargetState, tokens: torch.Tensor, parents: torch.Tensor) -> VerifyOutput:
        """One forward over root + tree. tokens [B, N+1] (column 0: the root; -1: padded node),
        parents [B, N] (node i's parent in 0..i-1, as ops.verify takes them). Node i's position is
        next_position + depth(i); it attends to the row's live prefix and to its own ancestors."""
        raise NotImplementedError

    def commit(self, state: TargetState, accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Keep root + accepted nodes (accepted_nodes [B, N], -1 padded; accept_len [B]) in the
        cache after the last verify; drop the other tree entries; advance positions."""
        raise NotImplementedError

    def select_rows(self, state: TargetState, rows: torch.Tensor) -> TargetState:
        """Keep only the given batch rows (finished rows leave the batch)."""
        raise NotImplementedError


# =============================================================================================
# Shared implementation for Hugging Face decoder-only VLMs (every supported family uses it).
# A family subclass supplies: which input keys are visual, the placeholder ids, prompt positions
# (`_prompt_positions`) and tree positions (`_tree_positions`). Everything else (cache layout,
# masks, hooks, commit, select_rows) is family independent.
# =============================================================================================

import contextlib  # noqa: E402

from sparrow import ops  # noqa: E402
from sparrow import tree as _tree  # noqa: E402
from sparrow.targets.tree_attention import TreeBlock, tree_attention  # noqa: E402


def _layer_output(out):
    """A decoder layer returns a tensor (transformers 5.x, 4.5x) or a tuple (older 4.x)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _kv_pairs(cache):
    """[(keys, values, setter)] for every layer of a Hugging Face DynamicCache, in both layouts:
    `cache.layers[i].keys/.values` (transformers >= 4.56, 5.x) and `cache.key_cache[i]` (older)."""
    pairs = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:

            def setter(k, v, layer=layer):
                layer.keys, layer.values = k, v

            pairs.append((layer.keys, layer.values, setter))
    elif hasattr(cache, "key_cache"):
        for i in range(len(cache.key_cache)):

            def setter(k, v, i=i):
                cache.key_cache[i], cache.value_cache[i] = k, v

            pairs.append((cache.key_cache[i], cache.value_cache[i], setter))
    else:  # pragma: no cover
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a DynamicCache")
    return pairs


def continue_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor, n):
    """Place the last n[b] slots of every row b the way decoding would: at p, p+1, ... where p is
    one past the largest live position before them. position_ids [B, S] or [3, B, S] (M-RoPE; text
    tokens have equal axes); n an int or [B]. -> (position_ids, next_position [B])."""
    B, S = attention_mask.shape
    dev = position_ids.device
    n = torch.as_tensor(n, device=dev).expand(B)
    slots = torch.arange(S, device=dev)
    cont = slots[None] >= (S - n)[:, None]  # [B, S]
    head = position_ids.masked_fill(~(attention_mask.bool() & ~cont).expand_as(position_ids), -1)
    first = head.amax(dim=-1)
    first = (first.amax(dim=0) if first.dim() == 2 else first) + 1  # [B]
    tail = first[:, None] + slots[None] - (S - n)[:, None]
    return torch.where(cont.expand_as(position_ids), tail.expand_as(position_ids), position_ids), first + n


def _new_dynamic_cache(text_config):
    from transformers import DynamicCache

    try:  # transformers 5.x (and late 4.x) build the per-layer types from the config
        return DynamicCache(config=text_config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


class HFTargetAdapter(TargetAdapter):
    """TargetAdapter for a Hugging Face `*ForConditionalGeneration` video LLM.

    Layout: `model.model` (the VLM: vision tower + `language_model`, the text decoder with
    embed_tokens, layers, norm, rotary_emb) and `model.lm_head`: transformers >= 4.52 and 5.x
    (tested with 4.57.1, 5.17.0 and 5.23.0). Attention must be "sdpa" or "eager": a tree needs an
    arbitrary 4D mask, which the flash kernels do not take.

    Masks reach the decoder as a dict {layer_type: mask [B,1,Q,K]} (bool for sdpa, additive float
    for eager), the form the text models accept as "already prepared" in 4.5x and 5.x, so no HF
    mask preprocessing runs. Prefill uses HF's own mask unless the batch is padded.

    Hooks: features come from a forward hook on the final norm (FeatureSpec after_norm) or on a
    decoder layer's output; `visual_mid` is the OUTPUT of decoder layer (num_hidden_layers//2 - 1),
    i.e. the INPUT of layer num_hidden_layers//2 (the embeddings when that index is 0);
    `visual_embeds` is the input of decoder layer 0 (token embeddings with visual features merged).
    Hooks live only for the duration of one prefill/verify call.
    """

    visual_keys: tuple = ()  # input keys that carry pixels
    passthrough_keys: tuple = ()  # input keys forwarded to model.model(...) besides the pixels
    mrope: bool = False
    # verify through ops.text_attention when every row sees the whole cache (tree_attention.py).
    # None: on CPU only, until the CUDA kernel has been checked on a GPU (it has only been
    # compiled); False: always SDPA/eager with an explicit 4D mask
    use_tree_attention: bool | None = None

    def __init__(self, model: nn.Module, feature: FeatureSpec = FeatureSpec()):
        super().__init__(model, feature)
        if feature.after_norm and feature.layer != -1:
            raise ValueError("FeatureSpec(after_norm=True) is only defined for layer=-1")
        nl = self.text_config.num_hidden_layers
        if not -nl <= feature.layer < nl:
            raise ValueError(f"FeatureSpec.layer={feature.layer} out of range for {nl} layers")
        impl = getattr(self.text_config, "_attn_implementation", None)
        impl = impl or getattr(model.config, "_attn_implementation", None) or "eager"
        self._impl = impl
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"{self.family}: attention implementation {impl!r} cannot take a tree mask; load the "
                "model with attn_implementation='sdpa' or 'eager'"
            )
        types = getattr(self.text_config, "layer_types", None) or ["full_attention"] * nl
        if any(t != "full_attention" for t in types):
            raise NotImplementedError(f"{self.family}: sliding-window layers are not supported")
        self._layer_types = sorted(set(types))

    # -- layout ---------------------------------------------------------------------------------
    @property
    def text_config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg.text_config

    @property
    def vlm(self) -> nn.Module:
        """The module whose forward merges visual features and runs the decoder (model.model)."""
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise TypeError(
                f"{type(self.model).__name__}: expected model.model.language_model (the layout of "
                "transformers >= 4.52); upgrade transformers"
            )
        return inner

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def device(self) -> torch.device:
        return self.embed_tokens().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens().weight.dtype

    # -- family hooks -----------------------------------------------------------------------------
    def placeholder_ids(self) -> tuple:
        raise NotImplementedError

    def _prompt_positions(self, inputs: dict, input_ids, attention_mask):
        """-> (position_ids for the model, next_position [B], extra dict)."""
        raise NotImplementedError

    def _tree_positions(self, state: TargetState, depth: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------------
    def _check_inputs(self, inputs: dict):
        if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
            raise TypeError("prefill takes a processor-style dict (input_ids, attention_mask, pixels)")
        if "input_ids" not in inputs:
            raise ValueError("prefill: inputs need 'input_ids'")
        input_ids = inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"prefill: empty prompt (input_ids of shape {tuple(input_ids.shape)})")
        devices = {k: v.device for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if len(set(devices.values()) | {self.device}) > 1:
            raise ValueError(
                f"prefill: every input tensor must be on the model's device {self.device}; got "
                + ", ".join(f"{k}: {d}" for k, d in devices.items())
            )
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.long)
        lens = attention_mask.sum(-1)
        if bool((lens == 0).any()):
            raise ValueError(f"prefill: empty prompt in row(s) {torch.nonzero(lens == 0).flatten().tolist()}")
        S = input_ids.shape[1]
        start = S - lens
        left = torch.arange(S, device=input_ids.device)[None] >= start[:, None]
        if not torch.equal(left, attention_mask.bool()):
            raise ValueError("prefill: rows must be LEFT-padded (attention_mask = 0...0 1...1 per row)")
        if not any(inputs.get(k) is not None for k in self.visual_keys):
            raise ValueError(
                f"{self.family} is a video/image model: prefill needs its visual input "
                f"({' or '.join(self.visual_keys)}); got keys {sorted(inputs.keys())}"
            )
        ph = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in self.placeholder_ids():
            ph |= input_ids == t
        if not bool(ph.any()):
            raise ValueError(f"{self.family}: visual input given but input_ids hold no placeholder tokens")
        return input_ids, attention_mask, start, ph & attention_mask.bool()

    @contextlib.contextmanager
    def _hooks(self, want_embeds: bool = False, want_mid: bool = False):
        lm = self.language_model
        got: dict = {}
        handles = []
        fl = self.feature.layer % len(lm.layers)
        if self.feature.after_norm:
            handles.append(lm.norm.register_forward_hook(lambda m, a, o: got.__setitem__("feat", o)))
        else:
            handles.append(
                lm.layers[fl].register_forward_hook(lambda m, a, o: got.__setitem__("feat", _layer_output(o)))
            )

        def first_input(m, args, kwargs):
            got["embeds"] = args[0] if args else kwargs["hidden_states"]

        mid = len(lm.layers) // 2
        if want_embeds or (want_mid and mid == 0):
            handles.append(lm.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        if want_mid and mid > 0:
            handles.append(
                lm.layers[mid - 1].register_forward_hook(lambda m, a, o: got.__setitem__("mid", _layer_output(o)))
            )
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def _attn_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool mask (True = visible) -> what the attention implementation takes: the bool itself
        for sdpa, an additive float mask (0 / finfo.min) for eager."""
        if self._impl == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def _mask_dict(self, mask: torch.Tensor) -> dict:
        return {t: mask for t in self._layer_types}

    # -- the three calls ----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, inputs: dict, want_visual_embeds: bool = False, want_visual_mid: bool = False,
                continuation: int = 0) -> PrefillOutput:
        input_ids, attention_mask, start, visual_mask = self._check_inputs(inputs)
        B, S = input_ids.shape
        if not 0 <= continuation < int(attention_mask.sum(-1).min()):
            raise ValueError(f"prefill: continuation={continuation} must leave every row a prompt")
        position_ids, next_position, extra = self._prompt_positions(inputs, input_ids, attention_mask)
        if continuation:
            position_ids, next_position = continue_positions(position_ids, attention_mask, continuation)
        cache = _new_dynamic_cache(self.text_config)
        kwargs = {k: inputs[k] for k in self.visual_keys + self.passthrough_keys if inputs.get(k) is not None}
        mask = attention_mask
        if bool((start > 0).any()):
            # Padded batch: give the decoder our own mask. Pad queries see only themselves (HF's
            # eager path turns their all-masked rows into NaN, which then leaks into real rows
            # through 0 * NaN); real queries see their row's causal live prefix.
            slots = torch.arange(S, device=input_ids.device)
            allowed = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] >= start[:, None, None])
            allowed |= torch.eye(S, dtype=torch.bool, device=input_ids.device)[None]
            mask = self._mask_dict(self._attn_mask(allowed[:, None]))
        with self._hooks(want_visual_embeds, want_visual_mid) as got:
            out = self.vlm(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = self.lm_head()(hidden[:, -1])
        cache = getattr(out, "past_key_values", None) or cache
        mid = got.get("mid") if len(self.language_model.layers) // 2 > 0 else got.get("embeds")
        state = TargetState(
            cache=cache,
            start=start,
            end=torch.full((B,), S, dtype=torch.long, device=input_ids.device),
            next_position=next_position.to(torch.long),
            extra=extra,
        )
        return PrefillOutput(
            state=state,
            logits=logits,
            input_ids=input_ids,
            visual_mask=visual_mask,
            text_mask=attention_mask.bool() & ~visual_mask,
            features=got["feat"],
            visual_embeds=got.get("embeds") if want_visual_embeds else None,
            visual_mid=mid if want_visual_mid else None,
        )

    def cache_len(self, state: TargetState) -> int:
        pairs = _kv_pairs(state.cache)
        return int(pairs[0][0].shape[-2]) if pairs and pairs[0][0] is not None else 0

    @staticmethod
    def _block_mask(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """[B, N+1, N+1] bool: node i sees node m (its ancestors and itself; padded nodes are
        seen by themselves only)."""
        B, N1 = tokens.shape
        dev = tokens.device
        anc = _tree.ancestor_mask(parents) if N1 > 1 else torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        eye = torch.eye(N1, dtype=torch.bool, device=dev)[None]
        return torch.where((tokens < 0)[:, None, :], eye, anc)

    def tree_mask(self, state: TargetState, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """[B, 1, N+1, L+N+1] bool (True = visible) for a verify over a cache of L slots."""
        B, N1 = tokens.shape
        L = self.cache_len(state)
        slots = torch.arange(L, device=tokens.device)
        prefix = (slots[None] >= state.start[:, None]) & (slots[None] < state.end[:, None])  # [B, L]
        mask = torch.cat([prefix[:, None, :].expand(B, N1, L), self._block_mask(tokens, parents)], dim=-1)
        return mask[:, None]

    @torch.no_grad()
    def verify(self, state: TargetState, tokens: torch.Tensor, parents: torch.Tensor) -> VerifyOutput:
        if tokens.dim() != 2 or tokens.shape[0] != state.batch_size:
            raise ValueError(f"verify: tokens must be [B={state.batch_size}, N+1], got {tuple(tokens.shape)}")
        B, N1 = tokens.shape
        if parents.shape != (B, N1 - 1):
            raise ValueError(f"verify: parents must be [B, N] = {(B, N1 - 1)}, got {tuple(parents.shape)}")
        if bool((tokens[:, 0] < 0).any()):
            raise ValueError("verify: the root (column 0) cannot be a padded node")
        if tokens.device != self.device or parents.device != self.device:
            raise ValueError(f"verify: tokens/parents must be on {self.device}")
        tokens = tokens.to(torch.long)
        parents = parents.to(torch.long)
        L = self.cache_len(state)
        fast = self.device.type == "cpu" if self.use_tree_attention is None else self.use_tree_attention
        if fast and bool((state.start == 0).all()) and bool((state.end == L).all()):
            # every row sees the whole cache: the op's contract (tree_attention.py)
            mask, attention = TreeBlock(self._block_mask(tokens, parents)), tree_attention(self.text_config)
        else:
            mask, attention = self._attn_mask(self.tree_mask(state, tokens, parents)), contextlib.nullcontext()
        depth = _tree.depths(parents) if N1 > 1 else torch.zeros(B, 1, dtype=torch.long, device=self.device)
        position_ids = self._tree_positions(state, depth)
        safe = torch.where(tokens < 0, tokens[:, :1], tokens)  # padded nodes: any valid id
        embeds = self.language_model.embed_tokens(safe)
        with self._hooks() as got, attention:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=self._mask_dict(mask),
                position_ids=position_ids,
                past_key_values=state.cache,
                use_cache=True,
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        state.extra["tree_base"] = L
        state.extra["tree_size"] = N1
        return VerifyOutput(logits=self.lm_head()(hidden), features=got["feat"])

    @torch.no_grad()
    def commit(self, state: TargetState, accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
        base = state.extra.pop("tree_base", None)
        n1 = state.extra.pop("tree_size", None)
        if base is None:
            raise RuntimeError("commit: no verify() since the last commit")
        B = state.batch_size
        dev = state.start.device
        accept_len = accept_len.to(device=dev, dtype=torch.long)
        if accepted_nodes.numel() == 0:
            accepted_nodes = torch.full((B, 0), -1, dtype=torch.long, device=dev)
        accepted_nodes = accepted_nodes.to(device=dev, dtype=torch.long)
        if bool((accept_len < 0).any()) or bool((accept_len > accepted_nodes.shape[1]).any()):
            raise ValueError("commit: accept_len out of range")
        src = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), accepted_nodes.clamp(min=0)], 1) + base
        counts = accept_len + 1
        valid = torch.arange(src.shape[1], device=dev)[None] < counts[:, None]
        if bool((valid[:, 1:] & ((accepted_nodes < 1) | (accepted_nodes >= n1))).any()):
            raise ValueError("commit: accepted node ids must lie in 1..N")
        src = torch.where(valid, src, src[:, :1])
        for k, v, _ in _kv_pairs(state.cache):
            ops.gather_kv_(k, src, counts, state.end, 2)
            ops.gather_kv_(v, src, counts, state.end, 2)
        state.end = state.end + counts
        state.next_position = state.next_position + counts
        keep = int(state.end.max())
        for k, v, setter in _kv_pairs(state.cache):
            setter(k[..., :keep, :], v[..., :keep, :])

    def select_rows(self, state: TargetState, rows: torch.Tensor) -> TargetState:
        """Keep rows (index tensor or bool mask) of the batch. The cache is updated in place and
        trimmed at both ends to the kept rows' live slots; the returned state shares it."""
        rows = torch.as_tensor(rows, device=state.start.device)
        if rows.dtype == torch.bool:
            rows = torch.nonzero(rows).flatten()
        rows = rows.to(torch.long)
        if rows.numel() == 0:
            raise ValueError("select_rows: no rows left")
        if "tree_base" in state.extra:
            raise RuntimeError("select_rows: call commit() after verify() first")
        start, end = state.start[rows], state.end[rows]
        lo, hi = int(start.min()), int(end.max())
        for k, v, setter in _kv_pairs(state.cache):
            r = rows.to(k.device)
            setter(k[r, :, lo:hi].contiguous(), v[r, :, lo:hi].contiguous())
        extra = {}
        for key, val in state.extra.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[0] == state.batch_size:
                extra[key] = val[rows.to(val.device)]
            else:
                extra[key] = val
        return TargetState(
            cache=state.cache, start=start - lo, end=end - lo, next_position=state.next_position[rows], extra=extra
        )
