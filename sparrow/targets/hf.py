"""The adapter contract (base.py) for Hugging Face decoder-only VLMs: every supported family.

A family subclass (qwen2_vl.py, llava_onevision.py) supplies which input keys are visual, the
placeholder ids, prompt positions (`_prompt_positions`) and tree positions (`_tree_positions`).
Everything else is family independent:

    prefill   the whole VLM (vision tower + decoder) over the prompt, writing a StaticKVCache
              (kv_cache.py) sized for the generation; rows left-aligned with one ops.gather_kv_
    verify    the decoder's layers over root + tree, block written in place, attention through
              verify_attention.py; no hook, no host read, no Python loop over nodes or rows
    commit    one ops.gather_kv_ moves the accepted entries of every layer behind the root

Layout: `model.model` (the VLM: vision tower + `language_model`, the text decoder with
embed_tokens, layers, norm, rotary_emb) and `model.lm_head`: transformers 4.57+ and 5.x. The
prompt's attention must be "sdpa" or "eager" (a padded batch needs an arbitrary 4D mask, which the
flash kernels do not take); verify always uses sparrow's.

Hooks: prefill takes features with a forward hook on the final norm (FeatureSpec after_norm) or on
a decoder layer's output; `visual_mid` is the OUTPUT of decoder layer (num_hidden_layers//2 - 1),
i.e. the INPUT of layer num_hidden_layers//2 (the embeddings when that index is 0);
`visual_embeds` is the input of decoder layer 0. verify runs the layers itself and needs no hook.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sparrow.compiling import compiled, round_capacity
from sparrow.targets.base import FeatureSpec, PrefillOutput, TargetAdapter, TargetState, VerifyOutput
from sparrow.targets.kv_cache import StaticKVCache
from sparrow.targets.verify_attention import BACKENDS, VerifyBlock, verify_attention


def _layer_output(out):
    """A decoder layer returns a tensor (transformers 5.x, 4.5x) or a tuple (older 4.x)."""
    return out[0] if isinstance(out, (tuple, list)) else out


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


class HFTargetAdapter(TargetAdapter):
    """TargetAdapter for a Hugging Face `*ForConditionalGeneration` video LLM."""

    visual_keys: tuple = ()  # input keys that carry pixels
    passthrough_keys: tuple = ()  # input keys forwarded to model.model(...) besides the pixels
    verify_attention: str = "sparrow"  # verify_attention.py: "sparrow" (ops.text_attention) or "sdpa"

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
                f"{self.family}: attention implementation {impl!r} cannot take a padded batch's mask; load "
                "the model with attn_implementation='sdpa' or 'eager'"
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

    def _answer_positions(self, position_ids, next_position, attention_mask, continuation: int):
        """prefill(continuation=A): the positions of the last A tokens (an answer) as decoding gives
        them, where one forward over the whole sequence places them elsewhere (continue_positions)."""
        return continue_positions(position_ids, attention_mask, continuation)

    # -- prefill ----------------------------------------------------------------------------------
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
        ph = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in self.placeholder_ids():
            ph |= input_ids == t
        visual = any(inputs.get(k) is not None for k in self.visual_keys)
        if visual != bool(ph.any()):  # a text-only prompt has neither
            raise ValueError(f"{self.family}: visual input given but input_ids hold no placeholder tokens" if visual
                             else f"{self.family}: input_ids hold visual placeholder tokens but no visual input "
                                  f"({' or '.join(self.visual_keys)}) was given; got keys {sorted(inputs.keys())}")
        self._check_ids_and_grids(inputs, input_ids)
        return input_ids, attention_mask, start, ph & attention_mask.bool()

    def _check_ids_and_grids(self, inputs: dict, input_ids: torch.Tensor) -> None:
        """Ids outside the vocabulary, and visual inputs whose token count is not the number of
        their placeholders, said before any forward (on CUDA either is a device-side assert or an
        error deep in the vision merge). One host read for all the numbers."""
        vocab = self.embed_tokens().num_embeddings
        counts = self._visual_token_counts(inputs, input_ids)
        numbers = [input_ids.min(), input_ids.max()] + [n for _, expected, found in counts for n in (expected, found)]
        host = torch.stack(numbers).tolist()
        lo, hi = host[:2]
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary (vocab_size {vocab}: ids 0 to "
                             f"{vocab - 1}); encode the prompt with the target's own tokenizer")
        for i, (mismatch, _, _) in enumerate(counts):
            expected, found = host[2 + 2 * i : 4 + 2 * i]
            if expected != found:
                raise ValueError(mismatch(expected, found))

    def _visual_token_counts(self, inputs: dict, input_ids: torch.Tensor) -> list:
        """[(message(expected, found), expected, found)]: 0-d tensors of the visual tokens the
        inputs describe and the placeholders input_ids hold, per kind a family can count."""
        return []

    @contextlib.contextmanager
    def _hooks(self, want_embeds: bool = False, want_mid: bool = False):
        lm = self.language_model
        got: dict = {}
        handles = []
        if self.feature.after_norm:
            handles.append(lm.norm.register_forward_hook(lambda m, a, o: got.__setitem__("feat", o)))
        else:
            layer = lm.layers[self.feature.layer % len(lm.layers)]
            handles.append(layer.register_forward_hook(lambda m, a, o: got.__setitem__("feat", _layer_output(o))))

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

    def _prompt_mask(self, start: torch.Tensor, S: int, padded: bool) -> dict:
        """The prompt's mask per layer type, in the form the decoder takes as already prepared.
        sdpa without padding: None (its causal kernels). Otherwise an explicit mask: real queries
        see their row's causal live prefix; pad queries see only themselves (HF's eager path turns
        all-masked rows into NaN, which then leaks into real rows through 0 * NaN)."""
        if self._impl == "sdpa" and not padded:
            return {t: None for t in self._layer_types}
        slots = torch.arange(S, device=start.device)
        allowed = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] >= start[:, None, None])
        allowed |= torch.eye(S, dtype=torch.bool, device=start.device)[None]
        allowed = allowed[:, None]
        if self._impl != "sdpa":  # eager takes an additive float mask
            allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=start.device).masked_fill_(
                ~allowed, torch.finfo(self.dtype).min)
        return {t: allowed for t in self._layer_types}

    def _new_cache(self, batch: int, slots: int) -> StaticKVCache:
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return StaticKVCache(tc.num_hidden_layers, batch, round_capacity(slots), tc.num_key_value_heads, head_dim,
                             self.dtype, self.device)

    @torch.no_grad()
    def prefill(self, inputs: dict, want_visual_embeds: bool = False, want_visual_mid: bool = False,
                continuation: int = 0, decode_slots: int | None = 256) -> PrefillOutput:
        input_ids, attention_mask, start, visual_mask = self._check_inputs(inputs)
        B, S = input_ids.shape
        if not 0 <= continuation < int(attention_mask.sum(-1).min()):
            raise ValueError(f"prefill: continuation={continuation} must leave every row a prompt")
        position_ids, next_position, extra = self._prompt_positions(inputs, input_ids, attention_mask)
        if continuation:
            position_ids, next_position = self._answer_positions(position_ids, next_position, attention_mask,
                                                                 continuation)
        cache = None if decode_slots is None else self._new_cache(B, S + decode_slots)
        padded = bool((start > 0).any())
        kwargs = {k: inputs[k] for k in self.visual_keys + self.passthrough_keys if inputs.get(k) is not None}
        with self._hooks(want_visual_embeds, want_visual_mid) as got:
            out = self.vlm(
                input_ids=input_ids,
                attention_mask=self._prompt_mask(start, S, padded),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                **kwargs,
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        state = None
        if cache is not None:
            lens = S - start
            if padded:  # left-align every row: its live slots become 0 .. lens-1
                cache.move(start[:, None] + torch.arange(S, device=start.device), lens, torch.zeros_like(start))
            state = TargetState(cache=cache, lens=lens, next_position=next_position.to(torch.long), extra=extra)
        mid = got.get("mid") if len(self.language_model.layers) // 2 > 0 else got.get("embeds")
        return PrefillOutput(
            state=state,
            logits=self.lm_head()(hidden[:, -1]),
            input_ids=input_ids,
            visual_mask=visual_mask,
            text_mask=attention_mask.bool() & ~visual_mask,
            features=got["feat"],
            visual_embeds=got.get("embeds") if want_visual_embeds else None,
            visual_mid=mid if want_visual_mid else None,
        )

    # -- verify -----------------------------------------------------------------------------------
    def _decode_forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, block: VerifyBlock,
                        cache: StaticKVCache):
        """The decoder over new tokens [B, M] whose K/V go to cache.write_at: (logits, features).
        Pure tensor code (no hook, no host read): this is what compile=True compiles."""
        lm = self.language_model
        hidden = lm.embed_tokens(tokens)
        rotary = lm.rotary_emb(hidden, position_ids)
        feature_layer = None if self.feature.after_norm else self.feature.layer % len(lm.layers)
        features = None
        for i, layer in enumerate(lm.layers):
            hidden = _layer_output(layer(hidden, attention_mask=block, position_embeddings=rotary,
                                         past_key_values=cache, use_cache=True))
            if i == feature_layer:
                features = hidden
        hidden = lm.norm(hidden)
        return self.lm_head()(hidden), hidden if features is None else features

    @torch.no_grad()
    def verify(self, state: TargetState, root: torch.Tensor, tree, compile: dict | None = None) -> VerifyOutput:
        """Root + tree through the decoder (base.py). Shapes are checked here; values (the cache
        room left, node ids) by the ops, on the device. compile: compiling.compile_options."""
        B, N = tree.tokens.shape
        if root.shape != (state.batch_size,):
            raise ValueError(f"verify: root must be [B={state.batch_size}], got {tuple(root.shape)}")
        if tree.tokens.shape[0] != B or tree.visible.shape != (B, N + 1, N + 1) or tree.depths.shape != (B, N + 1):
            raise ValueError(f"verify: inconsistent tree for batch {B}: tokens {tuple(tree.tokens.shape)}, "
                             f"depths {tuple(tree.depths.shape)}, visible {tuple(tree.visible.shape)}")
        if self.verify_attention not in BACKENDS:
            raise ValueError(f"verify_attention must be one of {BACKENDS}, got {self.verify_attention!r}")
        cache = state.cache
        if compile is not None:
            cache.mark_static()
        tokens = torch.cat([root[:, None], tree.tokens], 1)
        tokens = torch.where(tokens < 0, root[:, None], tokens)  # padded nodes: any valid id
        block = VerifyBlock.build(state.lens, tree.visible, cache.capacity, self.verify_attention)
        cache.write_at = state.lens
        try:
            with verify_attention(self.text_config):
                logits, features = compiled(type(self)._decode_forward, compile)(
                    self, tokens, self._tree_positions(state, tree.depths), block, cache)
        finally:
            cache.write_at = None
        state.extra["tree_size"] = N + 1
        return VerifyOutput(logits=logits, features=features)

    # -- commit and rows ----------------------------------------------------------------------------
    @torch.no_grad()
    def commit(self, state: TargetState, accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Root + accepted nodes stay: row b's accepted node i (verified at slot lens+i) moves to
        lens+1, lens+2, ... (sources ascend, never below their destination: ops.gather_kv_)."""
        n1 = state.extra.pop("tree_size", None)
        if n1 is None:
            raise RuntimeError("commit: no verify() since the last commit")
        counts = accept_len + 1
        if n1 > 1:  # an autoregressive step has nothing to move
            src = torch.cat([torch.zeros_like(accepted_nodes[:, :1]), accepted_nodes.clamp(min=0)], 1)
            state.cache.move(state.lens[:, None] + src, counts, state.lens)
        state.lens = state.lens + counts
        state.next_position = state.next_position + counts

    def select_rows(self, state: TargetState, rows: torch.Tensor) -> TargetState:
        """Keep the given batch rows (an index tensor on the model's device)."""
        if "tree_size" in state.extra:
            raise RuntimeError("select_rows: call commit() after verify() first")
        state.cache.select_rows(rows)
        extra = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == state.batch_size else v
                 for k, v in state.extra.items()}
        return TargetState(cache=state.cache, lens=state.lens[rows], next_position=state.next_position[rows],
                           extra=extra)
