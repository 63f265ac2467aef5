"""Tiny random Hugging Face video LLMs of every supported family, and processor-style inputs.

`tiny_target(family)` builds a few-layer model from a config (no download), float64, eval mode,
with a large initializer range so that a wrong position, mask or cache slot changes the output.
`tiny_inputs(model, ...)` builds what the family's processor would return for a batch of prompts
(left-padded), each with one video (or one image) between text before and after it.

Token ids: text tokens are drawn from [TEXT_LO, TEXT_HI); the family's special ids (image / video
placeholders, vision start/end) sit above TEXT_HI, pad is 0. The eos id is configurable
(`tiny_target(..., eos_token_id=...)`, default None: generate runs to max_new_tokens).
`model.generate(**tiny_inputs(model), do_sample=False, max_new_tokens=n)` is the ground truth of
the losslessness tests.
"""

from __future__ import annotations

import inspect
import math

import torch

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")

VOCAB = 300
PAD_ID = 0
TEXT_LO, TEXT_HI = 3, 280  # text tokens live in [TEXT_LO, TEXT_HI)
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 290, 291, 292, 293

HIDDEN = 64
HEADS, KV_HEADS = 4, 2  # head_dim 16 -> M-RoPE sections [2, 3, 3]
# Qwen vision: patch 4 px, temporal patch 2, merge 2; every frame pair is a 4x4 patch grid.
Q_PATCH, Q_TPATCH, Q_MERGE, Q_GRID = 4, 2, 2, 4
# LLaVA-OV vision: 16x16 images of 4x4 patches -> 16 patches -> pooled 2x2 = 4 tokens per frame.
L_IMAGE, L_PATCH = 16, 4


def _text_config(layers: int, vocab: int, init: float, eos, extra: dict) -> dict:
    cfg = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=init,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=eos,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    cfg.update(extra)
    return cfg


def tiny_target(
    family: str,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    vocab_size: int = VOCAB,
    num_hidden_layers: int = 3,
    initializer_range: float = 0.5,
    eos_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    **overrides,
):
    """A tiny random model of `family` in eval mode. `overrides` go onto the top-level config
    (e.g. tie_word_embeddings); `text_overrides=dict(...)` onto the text config."""
    import transformers

    text_extra = dict(overrides.pop("text_overrides", {}) or {})
    if vocab_size <= VISION_END_ID:
        raise ValueError(f"vocab_size must exceed {VISION_END_ID} (the special ids)")
    torch.manual_seed(seed)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        text = _text_config(
            num_hidden_layers,
            vocab_size,
            initializer_range,
            eos_token_id,
            {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, **text_extra},
        )
        if family == "qwen2_5_vl":
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                in_channels=3,
                patch_size=Q_PATCH,
                spatial_merge_size=Q_MERGE,
                temporal_patch_size=Q_TPATCH,
                tokens_per_second=2,
                window_size=Q_PATCH * Q_MERGE * 2,  # a 2x2 merged-token window
                fullatt_block_indexes=[1],
                out_hidden_size=HIDDEN,
                initializer_range=initializer_range,
            )
            cls, cfg_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
        else:
            vision = dict(
                depth=2,
                embed_dim=32,
                hidden_size=HIDDEN,
                mlp_ratio=2,
                num_heads=2,
                in_channels=3,
                patch_size=Q_PATCH,
                spatial_merge_size=Q_MERGE,
                temporal_patch_size=Q_TPATCH,
                initializer_range=initializer_range,
            )
            cls, cfg_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
        top = dict(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    elif family == "llava_onevision":
        text = _text_config(num_hidden_layers, vocab_size, initializer_range, eos_token_id, text_extra)
        text["model_type"] = "qwen2"
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
            image_size=L_IMAGE,
            patch_size=L_PATCH,
            vision_use_head=False,
        )
        top = dict(
            text_config=text,
            vision_config=vision,
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[[L_IMAGE, L_IMAGE], [L_IMAGE, 2 * L_IMAGE], [2 * L_IMAGE, L_IMAGE]],
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
            initializer_range=initializer_range,
        )
        cls, cfg_cls = transformers.LlavaOnevisionForConditionalGeneration, transformers.LlavaOnevisionConfig
    else:
        raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES}")
    top.update(overrides)
    config = cfg_cls(**top)
    config.eos_token_id = eos_token_id
    config.pad_token_id = PAD_ID
    try:
        config._attn_implementation = attn_implementation
    except Exception:  # pragma: no cover - older/newer config setters
        pass
    torch.manual_seed(seed)
    model = cls(config)
    # Re-initialise every weight with the large range (post_init may not use the text range for
    # all submodules) so that position and mask bugs are visible in the outputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(initializer_range * torch.randn(p.shape, generator=g) / math.sqrt(max(1, p.shape[-1] / 16)))
    model = model.to(dtype).eval()
    gc = model.generation_config
    gc.eos_token_id = eos_token_id
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = None
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    return model


def _family(model) -> str:
    return model.config.model_type


def _as_list(x, batch: int, default) -> list:
    if x is None:
        x = default
    if isinstance(x, int):
        return [x] * batch
    x = list(x)
    return [x[i % len(x)] for i in range(batch)]


def _wants_mm_token_type_ids(model) -> bool:
    inner = model.model if hasattr(model, "model") else model
    return "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters


def tiny_inputs(
    model,
    batch: int = 1,
    frames=None,
    prompt_lens=None,
    seed: int = 0,
    image: bool = False,
) -> dict:
    """Processor-style inputs for `model` (a tiny_target): row b is `pre` text tokens, the visual
    block, then `post` text tokens, with pre + post = prompt_lens[b] (>= 2); rows are left-padded
    to a common length.

    frames: raw video frames per row (int or sequence; cycled over the batch). Qwen rounds up to
    its temporal patch (2); LLaVA-OneVision needs the same count for every row (its
    pixel_values_videos is [videos, frames, C, H, W]). image=True gives every row one image instead.
    """
    family = _family(model)
    g = torch.Generator().manual_seed(seed)
    prompt_lens = _as_list(prompt_lens, batch, [6, 9, 4])
    dtype = next(model.parameters()).dtype
    rows, visual = [], []
    if family in ("qwen2_5_vl", "qwen2_vl"):
        frames = _as_list(frames, batch, [2, 4, 6])
        merge = model.config.vision_config.spatial_merge_size
        patch = model.config.vision_config.patch_size
        tps = model.config.vision_config.temporal_patch_size
        chans = model.config.vision_config.in_channels
        grids = []
        for b in range(batch):
            if image:
                t, h, w = 1, Q_GRID, Q_GRID + 2 * (b % 2)  # non-square for odd rows
            else:
                t, h, w = max(1, math.ceil(frames[b] / tps)), Q_GRID, Q_GRID
            grids.append((t, h, w))
            visual.append([IMAGE_ID if image else VIDEO_ID] * (t * h * w // merge**2))
        pix = torch.randn(sum(t * h * w for t, h, w in grids), chans * tps * patch * patch, generator=g)
        extra = {}
        grid = torch.tensor(grids, dtype=torch.long)
        if image:
            extra["pixel_values"], extra["image_grid_thw"] = pix.to(dtype), grid
        else:
            extra["pixel_values_videos"], extra["video_grid_thw"] = pix.to(dtype), grid
            if family == "qwen2_5_vl":
                extra["second_per_grid_ts"] = torch.tensor([1.0] * batch)
        open_close = (VISION_START_ID, VISION_END_ID)
    elif family == "llava_onevision":
        frames = _as_list(frames, batch, 2)
        if len(set(frames)) != 1:
            raise ValueError("llava_onevision: every row needs the same number of frames")
        vc = model.config.vision_config
        extra = {}
        inner = model.model
        with torch.no_grad():
            if image:
                sizes = [(L_IMAGE, L_IMAGE) if b % 2 == 0 else (L_IMAGE, 2 * L_IMAGE) for b in range(batch)]
                # anyres: one base patch + the tiles of the best pinpoint (here at most 2).
                n_tiles = max(1 + (2 if s[1] > s[0] or s[0] > s[1] else 1) for s in sizes)
                pv = torch.randn(batch, n_tiles, vc.num_channels, vc.image_size, vc.image_size, generator=g)
                extra["pixel_values"] = pv.to(dtype)
                extra["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
                dev = next(model.parameters()).device
                feats = inner.get_image_features(
                    extra["pixel_values"].to(dev),
                    extra["image_sizes"].to(dev),
                    vision_feature_layer=model.config.vision_feature_layer,
                    vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                )
                feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
                if isinstance(feats, tuple):  # 4.x: (features, feature_lens)
                    feats = feats[0]
                counts = [int(f.shape[0]) for f in feats]
                visual = [[IMAGE_ID] * counts[b] for b in range(batch)]
            else:
                pv = torch.randn(batch, frames[0], vc.num_channels, vc.image_size, vc.image_size, generator=g)
                extra["pixel_values_videos"] = pv.to(dtype)
                # frames x pooled (ceil(p/2))^2 patches + one image_newline (the newline is appended
                # inside get_video_features in 5.23 but in forward in 4.x / 5.17: count it here).
                p = vc.image_size // vc.patch_size
                n_video = frames[0] * math.ceil(p / 2) ** 2 + 1
                visual = [[VIDEO_ID] * n_video for _ in range(batch)]
        open_close = None
    else:
        raise ValueError(f"tiny_inputs: unsupported model_type {family!r}")

    for b in range(batch):
        n = prompt_lens[b]
        if n < 2:
            raise ValueError("prompt_lens must be >= 2 (text before and after the visual block)")
        pre = (n + 1) // 2
        ids = torch.randint(TEXT_LO, TEXT_HI, (n,), generator=g).tolist()
        block = visual[b] if open_close is None else [open_close[0], *visual[b], open_close[1]]
        rows.append(ids[:pre] + block + ids[pre:])
    S = max(len(r) for r in rows)
    input_ids = torch.full((batch, S), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, S, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r) :] = torch.tensor(r)
        attention_mask[b, S - len(r) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if family in ("qwen2_5_vl", "qwen2_vl") and _wants_mm_token_type_ids(model):
        # transformers 5.x processors return this; get_rope_index needs it for M-RoPE.
        tt = torch.zeros_like(input_ids)
        tt[input_ids == IMAGE_ID] = 1
        tt[input_ids == VIDEO_ID] = 2
        out["mm_token_type_ids"] = tt
    return out


def take_row(inputs: dict, b: int) -> dict:
    """Row b of a tiny_inputs batch as a batch of one, left padding removed (each row's own
    batch-1 `generate` is the reference for that row)."""
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b : b + 1, keep]
    for pix, grid in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
        if grid in inputs:  # Qwen: flat patches, rows' blocks one after the other
            sizes = inputs[grid].prod(-1).tolist()
            lo = sum(sizes[:b])
            out[pix] = inputs[pix][lo : lo + sizes[b]]
            out[grid] = inputs[grid][b : b + 1]
        elif pix in inputs:  # LLaVA-OV: one video / image per row
            out[pix] = inputs[pix][b : b + 1]
    if "second_per_grid_ts" in inputs:
        out["second_per_grid_ts"] = inputs["second_per_grid_ts"][b : b + 1]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][b : b + 1]
    return out
