"""Video frames -> the pixel tensors Qwen-VL and LLaVA-OneVision take, in torch alone.

transformers' video processors for these families need torchvision, and the torchvision wheel
built for a CPU torch does not always import beside it (its C ops fail to load, then its fake
op registrations fail). These functions do the same arithmetic with torch only, from the
checkpoint's own video processor settings, so that `--processor auto` works wherever torch
does; tests/test_inputs.py checks them equal to the Hugging Face processors where torchvision
imports. The steps, as those processors take them:

  resize   bicubic with antialiasing, uint8 to uint8 (torchvision's path for uint8 frames);
           Qwen: to the "smart" size (multiples of patch * merge, pixel count within the
           checkpoint's [shortest_edge, longest_edge]); LLaVA-OV: to the fixed height x width;
  scale    (x - 255 * mean) / (255 * std) in float32 (rescale and normalize fused);
  layout   Qwen: frames padded to a multiple of the temporal patch by repeating the last, cut
           into [t * h * w, C * tp * p * p] patches in merge-window order, grid [t, h, w];
           LLaVA-OV: [1, T, C, H, W].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize target: each side a multiple of `factor` near the original, the pixel
    count brought inside [min_pixels, max_pixels] keeping the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {height}x{width} frame: aspect ratio over 200 is not supported by Qwen-VL")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def _as_tchw(frames) -> torch.Tensor:
    """[T, H, W, 3] or [T, 3, H, W] uint8 (numpy or torch) -> [T, 3, H, W] uint8 tensor."""
    x = torch.as_tensor(frames)
    if x.dim() != 4:
        raise ValueError(f"video frames must be [T, H, W, C] or [T, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.dtype != torch.uint8:
        raise ValueError(f"video frames must be uint8 RGB, got {x.dtype}")
    return x.contiguous()


def resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased, uint8 in and out: torch's own uint8 kernel on the CPU, float32 and
    rounded back elsewhere (torchvision's choice on each device)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    kw = dict(size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    if frames.device.type == "cpu":
        return F.interpolate(frames, **kw)
    return F.interpolate(frames.float(), **kw).clamp_(0, 255).round_().to(torch.uint8)


def normalize(frames: torch.Tensor, settings: dict) -> torch.Tensor:
    scale = 1.0 / settings.get("rescale_factor", 1 / 255)
    mean = torch.tensor(settings.get("image_mean", CLIP_MEAN)) * scale
    std = torch.tensor(settings.get("image_std", CLIP_STD)) * scale
    return (frames.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def qwen_pixel_budget(settings: dict, num_frames: int, max_pixels: int | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) per frame from the checkpoint's settings; `max_pixels` lowers the
    cap (a user's budget); the processor's optional total-video cap applies as it does there."""
    size = settings.get("size") or {}  # min_pixels / max_pixels, where given, override it (as there)
    lo = settings.get("min_pixels") or size.get("shortest_edge")
    hi = settings.get("max_pixels") or size.get("longest_edge")
    if lo is None or hi is None:
        raise ValueError(f"the video processor settings give no pixel range (size: {size})")
    if max_pixels is not None:
        hi = min(hi, max_pixels)
    if settings.get("cap_pixels_per_frame"):
        factor = settings.get("patch_size", 14) * settings.get("merge_size", 2)
        total = int(settings.get("max_video_tokens", 128000) * factor * factor * 0.9)
        hi = max(min(hi, total * settings.get("temporal_patch_size", 2) // num_frames), int(lo * 1.05))
    return lo, hi


def qwen_video(frames, settings: dict, max_pixels: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Qwen2-VL / Qwen2.5-VL: frames -> (pixel_values_videos [t*h*w, C*tp*p*p] float32, [t, h, w])."""
    x = _as_tchw(frames)
    p, m, tp = settings.get("patch_size", 14), settings.get("merge_size", 2), settings.get("temporal_patch_size", 2)
    lo, hi = qwen_pixel_budget(settings, x.shape[0], max_pixels)
    height, width = smart_size(x.shape[-2], x.shape[-1], p * m, lo, hi)
    x = normalize(resize_uint8(x, height, width), settings)
    if pad := -x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, h, w, c = x.shape[0] // tp, height // p, width // p, x.shape[1]
    x = x.view(t, tp, c, h // m, m, p, w // m, m, p)
    # rows in merge-window order (t, h/m, w/m, m, m); each row is one patch's (C, tp, p, p) values
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * tp * p * p), [t, h, w]


def llava_onevision_video(frames, settings: dict) -> torch.Tensor:
    """LLaVA-OneVision: frames -> pixel_values_videos [1, T, C, H, W] float32 at the fixed size."""
    size = settings.get("size") or {}
    if "height" not in size or "width" not in size:
        raise ValueError(f"LLaVA-OneVision video settings need size height and width, got {size}")
    x = normalize(resize_uint8(_as_tchw(frames), size["height"], size["width"]), settings)
    return x.unsqueeze(0)


def llava_onevision_image_tokens(orig_hw: tuple[int, int], crop_hw: tuple[int, int], pinpoints: list,
                                 num_image_tokens: int, aspect: str = "anyres_max_9",
                                 strategy: str = "full") -> int:
    """How many <image> tokens LLaVA-OneVision's model makes of one image (anyres; the count
    transformers' processor computes, needed here where that processor does not build): the base
    crop's side x side features, plus the grid of crops at the best pinpoint resolution with the
    padding rows/columns removed (one newline per row), shrunk when over the aspect's crop cap."""
    from transformers.image_processing_utils import select_best_resolution

    (h, w), side = orig_hw, int(math.isqrt(num_image_tokens))
    best_h, best_w = select_best_resolution([h, w], pinpoints)
    cur_h, cur_w = side * (best_h // crop_hw[0]), side * (best_w // crop_hw[1])
    if w / h > cur_w / cur_h:  # wider than the grid: rows of padding above and below
        cur_h -= 2 * ((cur_h - int(round(h * (cur_w / w), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(w * (cur_h / h), 7))) // 2)
    features, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (int(aspect.removeprefix("anyres_max_")) * side ** 2))
    if ratio > 1.1:
        features, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return features + newlines + side * side - (1 if strategy == "default" else 0)
