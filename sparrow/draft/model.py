"""SparrowDraft: HSR input projection + one decoder layer of the target's family, attending over
its own text-only KV cache (VATA).

    z_t   = fc(embed[x_t] ⊕ h_{t-1})            (ops.fused_fc; h: the target's feature at the
                                                 previous text position, zeros for the first)
    h^_t  = DecoderLayer(z_t | cache)            (RMSNorm, rotary, GQA via ops.text_attention,
                                                 RMSNorm, SwiGLU; both residuals)
    logits = lm_head(h^_t)                       (final_norm first when features are pre-norm)

The target's embed_tokens, lm_head and final norm are shared, frozen and not part of the draft's
parameters or checkpoint. Positions are the draft's own cache slots: text index 0, 1, ... (with
visual_source "mid"/"embed" the visual states come first at 0..P-1 and the text follows at P...).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from sparrow import ops
from sparrow.compiling import round_capacity
from sparrow.draft.cache import DraftCache
from sparrow.draft.config import DraftConfig


def _last(out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """out [B, M, H] -> [B, H]: each row's output at its last real entry (counts[b] - 1)."""
    return out[torch.arange(out.shape[0], device=out.device), counts - 1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(acc)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Rotary(nn.Module):
    """Plain 1D rotary embedding (Llama/Qwen2 convention, rotate-half). For text positions the
    targets' M-RoPE reduces to this; the draft has only its own 1D positions anyway.

    rotate_half(y) * sin = roll(y, d/2) * (sin with its first half negated), so a rotation is four
    ops. Training computes the angles per call; the cached inference path looks them up in tables
    that the draft's cache holds for its capacity (DraftCache.rotary): the same values, bit for bit."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, positions: torch.Tensor, acc: torch.dtype):
        """positions [...] -> cos, signed sin [..., 1, d] in the accumulation dtype acc."""
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=positions.device, dtype=acc) / d))
        ang = positions.to(acc)[..., None, None] * inv  # [..., 1, d/2]
        return torch.cat((ang, ang), dim=-1).cos(), torch.cat((-ang.sin(), ang.sin()), dim=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [B, M, h, d] rotated by cos, signed sin [B, M, 1, d] (accumulation dtype)."""
        y = x.to(cos.dtype)
        return (y * cos + y.roll(self.head_dim // 2, -1) * signed_sin).to(x.dtype)

    @staticmethod
    def lookup(tables: tuple, positions: torch.Tensor):
        """(cos, signed sin) [B, M, 1, d] for positions [B, M] from tables [n, 1, d]. A position past
        them is clamped, not read out of bounds: the cache write beside it reports the overflow."""
        cos, sin = tables
        positions = positions.clamp(max=cos.shape[0] - 1)
        return cos[positions], sin[positions]


class DecoderLayer(nn.Module):
    """One decoder layer of the Qwen2/Llama family, split into the pieces the cached paths need."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        H, hq, hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hq, self.hkv, self.d = hq, hkv, d
        self.scale = 1.0 / math.sqrt(d)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(H, hq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
        self.rotary = Rotary(d, cfg.rope_theta)
        # q/k/v stacked (fuse_qkv), buffers for the reason the rotary tables are, never saved.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        """Stack the q/k/v projections into one matmul for the cached (inference) path. Made
        again for every generation (SparrowDraft.new_cache), so weights trained in between count."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight.detach() for p in projections])
        self.qkv_bias = None if self.q_proj.bias is None else torch.cat([p.bias.detach() for p in projections])

    # Both halves work on the tokens flattened to [B*M, H]: a linear on a 2D input is two ATen
    # ops where a 3D one is four (the decode step counts them; the values are the same).
    def qkv(self, x: torch.Tensor, positions: torch.Tensor, tables: tuple | None = None):
        """x [B, M, H] (the layer input), positions [B, M] -> q [B,M,hq,d], k, v [B,M,hkv,d].
        tables: the inference path: rotary tables (DraftCache.rotary), fused q/k/v (fuse_qkv)."""
        B, M, H = x.shape
        xn = self.input_layernorm(x.reshape(B * M, H))
        if tables is not None:
            q, k, v = F.linear(xn, self.qkv_weight, self.qkv_bias).split(
                [self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        else:
            q, k, v = self.q_proj(xn), self.k_proj(xn), self.v_proj(xn)
        q, k, v = q.view(B, M, self.hq, self.d), k.view(B, M, self.hkv, self.d), v.view(B, M, self.hkv, self.d)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.rotary.cos_sin(positions, acc) if tables is None else Rotary.lookup(tables, positions)
        return self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [B, M, H] the layer input, attn [B, M, hq, d] -> the layer output [B, M, H]."""
        B, M, H = x.shape
        h = x.reshape(B * M, H) + self.o_proj(attn.reshape(B * M, self.hq * self.d))
        hn = self.post_attention_layernorm(h)
        return (h + self.down_proj(F.silu(self.gate_proj(hn)) * self.up_proj(hn))).view(B, M, H)

    def dense(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward without cache (training): allowed [B, M, M] bool. Through SDPA, whose
        fused kernels keep no [B, h, M, M] probabilities for backward (the K/V heads are repeated
        first: with a mask, only the math kernel takes grouped heads). A query that may see
        nothing gets zeros."""
        q, k, v = self.qkv(x, positions)
        g = self.hq // self.hkv
        k = k.repeat_interleave(g, dim=2)
        v = v.repeat_interleave(g, dim=2)
        empty = ~allowed.any(-1)  # [B, M]
        mask = (allowed | empty[..., None])[:, None]  # such rows see everything, then read zeros
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, scale=self.scale)
        attn = attn.transpose(1, 2).masked_fill(empty[:, :, None, None], 0.0)
        return self.finish(x, attn)


class SparrowDraft(nn.Module):
    """The draft model. Build with `from_target`, load with `from_pretrained`."""

    def __init__(self, config: DraftConfig, embed: nn.Embedding, lm_head: nn.Linear, final_norm: nn.Module | None):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layer = DecoderLayer(config)
        # Shared, frozen target modules: kept outside the module tree so they are neither trained,
        # moved, nor saved with the draft.
        object.__setattr__(self, "_shared", {"embed": embed, "lm_head": lm_head, "final_norm": final_norm})
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- construction / checkpoints -----------------------------------------------------------
    @classmethod
    def from_target(cls, target, **config_overrides) -> "SparrowDraft":
        """A fresh (random) draft for `target` (a TargetAdapter); hidden size, heads etc. from the
        target's text config, device and dtype from its embedding table."""
        fs = getattr(target, "feature", None)
        if fs is not None:
            config_overrides.setdefault("feature_layer", fs.layer)
            config_overrides.setdefault("feature_after_norm", fs.after_norm)
        config = DraftConfig.from_text_config(target.text_config, target.identity(), **config_overrides)
        return cls._build(config, target)

    @classmethod
    def _build(cls, config: DraftConfig, target) -> "SparrowDraft":
        embed = target.embed_tokens()
        final_norm = None if config.feature_after_norm else target.final_norm()
        draft = cls(config, embed, target.lm_head(), final_norm)
        w = embed.weight
        return draft.to(device=w.device, dtype=w.dtype)

    def save_pretrained(self, directory: str) -> None:
        """model.safetensors (fc + layer only) and config.json."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str, target) -> "SparrowDraft":
        """Load a draft saved with save_pretrained for `target`; refuses a draft built for another
        target (identity mismatch) with the differing fields named."""
        from safetensors.torch import load_file

        config = DraftConfig.load(directory)
        have = target.identity()
        want = config.target
        diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
        if diff:
            details = ", ".join(f"{k}: draft was built for {a!r}, target has {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"draft at {directory} does not match this target ({details})")
        fs = getattr(target, "feature", None)
        if fs is not None and (fs.layer != config.feature_layer or fs.after_norm != config.feature_after_norm):
            raise ValueError(
                f"draft at {directory} reads features (layer={config.feature_layer}, after_norm="
                f"{config.feature_after_norm}) but the target adapter gives (layer={fs.layer}, "
                f"after_norm={fs.after_norm}); load the target with a matching FeatureSpec"
            )
        draft = cls._build(config, target)
        state = load_file(os.path.join(directory, "model.safetensors"))
        missing, unexpected = draft.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"draft checkpoint {directory}: missing {missing}, unexpected {unexpected}")
        return draft

    def check_target(self, target) -> None:
        """Clear error when this draft was built for another target."""
        have, want = target.identity(), self.config.target
        if have != want:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ValueError(
                "draft and target do not match: "
                + ", ".join(f"{k}: draft {want.get(k)!r} vs target {have.get(k)!r}" for k in diff)
            )

    # -- shared pieces ------------------------------------------------------------------------
    @property
    def embed_weight(self) -> torch.Tensor:
        return self._shared["embed"].weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V]: (final norm when features are pre-norm) + the target's lm_head."""
        norm = self._shared["final_norm"]
        if norm is not None:
            hidden = norm(hidden)
        head = self._shared["lm_head"]
        return head(hidden.to(head.weight.dtype))

    def input_states(self, token_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """z = fc(embed[token_ids] ⊕ prev_features): token_ids [B, M], prev_features [B, M, H] ->
        [B, M, H]. Through ops.fused_fc at inference; differentiable torch ops when training."""
        B, M = token_ids.shape
        W = self.fc.weight
        feats = prev_features.to(W.dtype)
        if torch.is_grad_enabled() and (W.requires_grad or feats.requires_grad):
            e = F.embedding(token_ids, self.embed_weight.detach())
            return self.fc(torch.cat([e.to(W.dtype), feats], dim=-1))
        out = ops.fused_fc(token_ids.reshape(-1), self.embed_weight.to(W.dtype), feats.reshape(B * M, -1), W, self.fc.bias)
        return out.view(B, M, -1)

    # -- training / test path: dense, no cache --------------------------------------------------
    def forward_sequence(
        self,
        token_ids: torch.Tensor,
        prev_features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense forward over whole sequences: token_ids [B,L], prev_features [B,L,H] (h paired with
        token t: the target feature of the previous text position, zeros for the first),
        position_ids [B,L]; attention_mask [B,Lall,Lall] bool (True: may attend) or None (causal);
        prefix_states [B,P,H] or None (IVSB: visual states run through the layer in front of the
        text; they skip fc). With a prefix, Lall = P+L, prefix positions are 0..P-1 and text
        positions are position_ids + P. Returns the L text outputs [B,L,H]."""
        B, L = token_ids.shape
        x = self.input_states(token_ids, prev_features)
        pos = position_ids
        P = 0
        if prefix_states is not None:
            P = prefix_states.shape[1]
            x = torch.cat([prefix_states.to(x.dtype), x], dim=1)
            pre_pos = torch.arange(P, device=x.device)[None].expand(B, P)
            pos = torch.cat([pre_pos, position_ids + P], dim=1)
        Lall = P + L
        if attention_mask is None:
            i = torch.arange(Lall, device=x.device)
            allowed = i[None, :] <= i[:, None]
            w = self.config.window
            if w > 0:  # the query's own slot plus the last `window` earlier ones
                allowed = allowed & (i[None, :] >= i[:, None] - w)
            allowed = allowed[None].expand(B, Lall, Lall)
        else:
            allowed = attention_mask.to(torch.bool)
        out = self.layer.dense(x, pos, allowed)
        return out[:, P:]

    # -- inference path: the draft's own KV cache ---------------------------------------------
    # Every method below runs inside the decode step except prefill: no host read, static shapes.
    def new_cache(self, batch: int, capacity: int) -> DraftCache:
        """A cache for `capacity` entries per row, with its rotary tables (and the q/k/v fused)."""
        W = self.fc.weight
        self.layer.fuse_qkv()
        acc = torch.float64 if W.dtype == torch.float64 else torch.float32
        rotary = self.layer.rotary.cos_sin(torch.arange(capacity, device=W.device), acc)
        return DraftCache(batch, self.config.num_key_value_heads, self.config.head_dim, W.dtype, W.device, capacity,
                          rotary)

    @torch.no_grad()
    def extend(self, cache: DraftCache, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append a ragged block of layer inputs x [B, M, H] (row b's first counts[b] are real) to
        the cache, causally, at positions lens[b] ..; keeps them (lens += counts). All M slots are
        written (the padded ones are overwritten later), so the capacity must hold lens + M.
        Returns the outputs [B, M, H] (padded ones are garbage)."""
        M = x.shape[1]
        start = cache.lens
        positions = start[:, None] + torch.arange(M, device=x.device)
        q, k, v = self.layer.qkv(x, positions, cache.rotary)
        cache.write(k, v, start)
        attn = ops.text_attention(q, cache.k, cache.v, start + M, None, self.layer.scale, self.config.window)
        cache.lens.copy_(start + counts)  # in place: a compiled step's state stays where it was
        return self.layer.finish(x, attn)

    @torch.no_grad()
    def commit(self, cache: DraftCache, tokens: torch.Tensor, features: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run the pending (token, target feature) pairs of each row through the draft and keep
        them: tokens [B, M] (padded), features [B, M, H], counts [B] >= 1. Returns the draft's
        output at each row's last pair [B, H] (the predicted feature of the new root, whose logits
        propose the next depth 1)."""
        return _last(self.extend(cache, self.input_states(tokens, features), counts), counts)

    @torch.no_grad()
    def prefill(self, pre, root_tokens: torch.Tensor, decode_slots: int = 256):
        """Fill a fresh cache from the target's prefill (PrefillOutput) and the first generated
        token of each row (the root), with room for `decode_slots` more entries per row (the
        tokens to come and the widest proposal: drafting.proposal_width). Row b's entries:
        [visual states (visual_source mid/embed)], then its prompt text tokens paired with the
        previous text position's feature (zeros for the first), then (root, feature of the last
        prompt text token). Returns (cache, root_hidden [B,H]). Reads the text widths on the host
        (once per generation, not per step)."""
        ids = pre.input_ids
        B, S = ids.shape
        text = pre.text_mask.to(torch.bool) & ~pre.visual_mask.to(torch.bool)
        n_text = text.sum(1)
        if int(n_text.min()) < 1:
            raise ValueError("draft prefill: a row has no text token in its prompt")
        H = self.config.hidden_size
        W = self.fc.weight
        feats = pre.features.to(W.dtype)
        dev = W.device
        # Gather each row's text positions to the left (ragged -> padded [B, T]).
        T = int(n_text.max())
        order = torch.argsort((~text).to(torch.int8), dim=1, stable=True)[:, :T]  # text positions first
        valid = torch.arange(T, device=ids.device)[None] < n_text[:, None]
        text_ids = ids.gather(1, order).masked_fill(~valid, 0)
        text_feats = feats.gather(1, order[..., None].expand(B, T, H))
        # Pending pairs: tokens = text tokens then the root; features = 0, then text features.
        tokens = torch.cat([text_ids, torch.zeros(B, 1, dtype=ids.dtype, device=ids.device)], dim=1)
        rows = torch.arange(B, device=ids.device)
        tokens[rows, n_text] = root_tokens.to(ids.dtype)
        pair_feats = torch.cat([feats.new_zeros(B, 1, H), text_feats], dim=1)  # [B, T+1, H]
        x_text = self.input_states(tokens.to(dev), pair_feats.to(dev))
        counts = (n_text + 1).to(dev)

        vs = self.config.visual_source
        if vs != "none":
            states = pre.visual_embeds if vs == "embed" else pre.visual_mid
            if states is None:
                raise ValueError(f"draft with visual_source={vs!r} needs the target prefill's visual_{'embeds' if vs == 'embed' else 'mid'}")
            vis = pre.visual_mask.to(torch.bool)
            n_vis = vis.sum(1)
            P = int(n_vis.max())
            vorder = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :P]
            v_states = states.to(W.dtype).gather(1, vorder[..., None].expand(B, P, H)).to(dev)
            # Row b's block: its n_vis[b] visual states, then its text pairs, packed to the left.
            M = P + T + 1
            x = x_text.new_zeros(B, M, H)
            j = torch.arange(M, device=dev)[None]
            nv = n_vis.to(dev)[:, None]
            is_vis = j < nv
            x[is_vis] = v_states[torch.arange(B, device=dev)[:, None].expand(B, M)[is_vis], j.expand(B, M)[is_vis]]
            tj = (j - nv).clamp(min=0, max=T)
            is_txt = (j >= nv) & (j - nv < counts[:, None])
            src = x_text.gather(1, tj[..., None].expand(B, M, H))
            x = torch.where(is_txt[..., None], src, x)
            counts = counts + n_vis.to(dev)
        else:
            x = x_text
        cache = self.new_cache(B, round_capacity(x.shape[1] + decode_slots))
        return cache, _last(self.extend(cache, x, counts), counts)

    @torch.no_grad()
    def tree_block(
        self,
        cache: DraftCache,
        x_new: torch.Tensor,
        positions: torch.Tensor,
        q_before: torch.Tensor | None,
        tree_mask: torch.Tensor,
    ):
        """One depth of tree expansion. The tree-so-far (n_before nodes, whose K/V already sit at
        slots lens+0 .. lens+n_before-1) gets M new nodes x_new [B, M, H] at positions [B, M] (or
        [B, 1] when they share one: the root's position + their depth). Within text_attention's contract (the prefix is fully
        visible) the whole tree-so-far is the new block: its queries (kept from earlier depths,
        q_before [B, n_before, hq, d]) are re-run with the ancestor mask tree_mask
        [B, n_before+M, n_before+M]; only the M new outputs go through o_proj and the MLP.
        Returns (outputs [B, M, H], q_all [B, n_before+M, hq, d]). Committed entries are untouched."""
        M = x_new.shape[1]
        n_before = 0 if q_before is None else q_before.shape[1]
        q, k, v = self.layer.qkv(x_new, positions, cache.rotary)
        cache.write(k, v, cache.lens + n_before)
        q_all = q if q_before is None else torch.cat([q_before, q], dim=1)
        attn = ops.text_attention(
            q_all, cache.k, cache.v, cache.lens + n_before + M, tree_mask, self.layer.scale, self.config.window
        )
        return self.layer.finish(x_new, attn[:, n_before:]), q_all

    @torch.no_grad()
    def chain_step(self, cache: DraftCache, x: torch.Tensor, i: int) -> torch.Tensor:
        """Chain node i (0-based, depth i+1) with layer input x [B, 1, H]: every earlier chain node
        is its ancestor, so the chain so far can simply be the visible prefix: written at slot
        lens+i (position root + i + 1), one query. Returns [B, 1, H]; lens is not advanced."""
        pos = cache.lens + i
        q, k, v = self.layer.qkv(x, pos[:, None], cache.rotary)
        cache.write(k, v, pos)
        attn = ops.text_attention(q, cache.k, cache.v, pos + 1, None, self.layer.scale, self.config.window)
        return self.layer.finish(x, attn)
