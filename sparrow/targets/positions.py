"""M-RoPE positions of Qwen2-VL / Qwen2.5-VL prompts under the rule of the models' release,
computed here so that they do not depend on the installed transformers (DESIGN.md, "Positions").

A prompt's position ids are [3, B, S] (temporal, height, width). The release's rule:

    text token            the next free position p on all three axes, then p + 1
    visual block (t,h,w)  merged grid t x (h/m) x (w/m), token order t-major then rows then columns:
                              temporal  p + floor(i * second_per_grid_t * tokens_per_second)   (Qwen2.5-VL video)
                                        p + i                                                 (Qwen2-VL)
                                        p                                                     (Qwen2.5-VL image)
                              height    p + row,   width  p + column
                          the next free position is then (the block's largest position on any axis) + 1
    decoding              continues at (the prompt's largest position) + 1, +2, ...

transformers from 5.3 on differs (transformers#45381): text after a block starts at the block's
start + max(h, w) / m, whatever its temporal extent, so on a video with more temporal positions
than merged rows/columns the text overlaps the video's later frames. The floor is the release's
`.long()` of a float product computed in the order written above (i * s * tps), in the dtype of
`second_per_grid_ts` (float32 from the processors): the same product rounds the same way.

Padded slots (left padding, attention_mask 0) get position 1; they are masked out everywhere.
"""

from __future__ import annotations

import torch

# "release": the rule above; "generate": the installed transformers' get_rope_index and, as its
# generate() does, decoding after the prompt's last position; "forward": the installed
# get_rope_index with decoding after the largest position, as the model's own cached forward
# continues (rope_deltas) -- the rule the world target was trained with.
RULES = ("release", "generate", "forward")
RECORD_KEY = "sparrow_positions"  # the model config key a target trained under some rule records
PAD_POSITION = 1


def check_rule(positions: str) -> str:
    if positions not in RULES:
        raise ValueError(
            f"positions={positions!r}: choose 'release' (the rule the model was released and trained with, the "
            "default) or 'generate' (exactly what the installed transformers' generate does); 'forward' is kept "
            "for targets trained under it (the world target)"
        )
    return positions


def recorded_rule(model) -> str | None:
    """The rule a target records in its config (`sparrow_positions`), or None."""
    rule = getattr(getattr(model, "config", None), RECORD_KEY, None)
    return None if rule is None else check_rule(rule)


def resolve_rule(model, positions: str | None) -> str:
    """positions=None: the rule the target records, else "release"; an explicit value wins."""
    if positions is None:
        return recorded_rule(model) or "release"
    return check_rule(positions)


# -- the release's rule ----------------------------------------------------------------------------
def _block_positions(t: int, rows: int, cols: int, temporal_index: torch.Tensor, start: int) -> torch.Tensor:
    """[3, t * rows * cols] positions of one merged visual grid whose first free position is start."""
    tt = temporal_index.view(t, 1, 1).expand(t, rows, cols)
    hh = torch.arange(rows).view(1, rows, 1).expand(t, rows, cols)
    ww = torch.arange(cols).view(1, 1, cols).expand(t, rows, cols)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _temporal_index(t: int, seconds_per_grid, tokens_per_second) -> torch.Tensor:
    """Temporal offsets of a block's t frame groups. tokens_per_second None: Qwen2-VL (0, 1, 2, ...)."""
    steps = torch.arange(t)
    if tokens_per_second is None:
        return steps
    return (steps * torch.as_tensor(seconds_per_grid) * tokens_per_second).long()


def _visual_blocks(grid_thw, seconds_per_grid, tokens_per_second, merge: int) -> list[tuple]:
    """[(n_tokens, t, rows, cols, temporal_index)] per grid row, in order. seconds_per_grid: one
    value per grid row, or one value for all."""
    if grid_thw is None:
        return []
    per_row = isinstance(seconds_per_grid, (list, tuple)) or (
        isinstance(seconds_per_grid, torch.Tensor) and seconds_per_grid.dim() > 0)
    out = []
    for k, (t, h, w) in enumerate(grid_thw.tolist()):
        s = seconds_per_grid[k] if per_row else seconds_per_grid
        rows, cols = h // merge, w // merge
        out.append((t * rows * cols, t, rows, cols, _temporal_index(t, s, tokens_per_second)))
    return out


def _runs(kinds: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, kind) of each run of equal kinds."""
    cuts = (torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, kinds.numel()]
    return [(a, b, int(kinds[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _row_positions(ids: torch.Tensor, queues: dict, row: int) -> torch.Tensor:
    """[3, L] positions of one row's live tokens; pops the row's blocks from queues[token id]."""
    kinds = torch.zeros_like(ids)
    for token in queues:
        kinds[ids == token] = token
    out = torch.empty(3, ids.numel(), dtype=torch.long)
    free = 0  # the next free position
    for a, b, kind in _runs(kinds):
        if kind == 0:  # text: one position per token, equal on the three axes
            out[:, a:b] = torch.arange(free, free + b - a)
            free += b - a
            continue
        name, blocks = queues[kind]
        while a < b:  # a run may hold several blocks of one kind back to back
            if not blocks:
                raise ValueError(f"row {row}: more {name} placeholder tokens than {name}_grid_thw describes")
            n, t, rows, cols, temporal = blocks.pop(0)
            if a + n > b:
                raise ValueError(f"row {row}: a {name} grid of {t}x{rows}x{cols} merged patches needs {n} "
                                 f"placeholder tokens, the prompt has {b - a} there")
            block = _block_positions(t, rows, cols, temporal, free)
            out[:, a:a + n] = block
            free = int(block.max()) + 1  # the release: after the block's largest position
            a += n
    return out


def release_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts=None,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """[3, B, S] position ids of a (left-padded) batch under the release's rule (module doc).

    Grids are consumed in order over the batch's rows, images and videos separately, as the
    processors emit them. tokens_per_second: Qwen2.5-VL's vision_config value (its videos' temporal
    positions are time-scaled and its images' are 0); None for Qwen2-VL (0, 1, 2, ...).
    second_per_grid_ts: seconds per temporal grid step of each video (default 1.0)."""
    if image_token_id == video_token_id:
        raise ValueError("image_token_id and video_token_id must differ")
    video_seconds = 1.0 if second_per_grid_ts is None else second_per_grid_ts
    if isinstance(video_seconds, torch.Tensor):
        video_seconds = video_seconds.cpu()  # the positions are built on the host (prefill only)
    queues = {  # Qwen2.5-VL's images have no time: 0 seconds per grid step
        image_token_id: ("image", _visual_blocks(image_grid_thw, 0.0, tokens_per_second, spatial_merge_size)),
        video_token_id: ("video", _visual_blocks(video_grid_thw, video_seconds, tokens_per_second, spatial_merge_size)),
    }
    live = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    position_ids = torch.full((3, *ids.shape), PAD_POSITION, dtype=torch.long)
    for b in range(ids.shape[0]):
        position_ids[:, b, live[b]] = _row_positions(ids[b, live[b]], queues, b)
    for name, blocks in queues.values():
        if blocks:
            raise ValueError(f"{name}_grid_thw describes {len(blocks)} more {name}(s) than the prompts hold")
    return position_ids.to(input_ids.device)


# -- where decoding continues ------------------------------------------------------------------------
def after_largest(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B]: one past each row's largest live position on any axis (the release; rope_deltas)."""
    live = attention_mask.bool()[None].expand_as(position_ids)
    return position_ids.masked_fill(~live, -1).amax(dim=(0, 2)) + 1


def after_last(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B]: one past each row's last live token's position, as transformers' generate continues
    (position_ids[..., -1] + 1). That token must be text, whose three axes agree."""
    S = attention_mask.shape[1]
    last_slot = (attention_mask.bool() * torch.arange(1, S + 1, device=attention_mask.device)).argmax(-1)
    last = position_ids.gather(2, last_slot.view(1, -1, 1).expand(position_ids.shape[0], -1, 1))[..., 0]  # [3, B]
    if bool((last != last[:1]).any()):
        raise ValueError("positions='generate': a prompt ends with a visual token; generate would continue "
                         "its three M-RoPE axes at different positions, which Sparrow does not represent")
    return last[0] + 1
