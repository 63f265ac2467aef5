"""Tiny random video-LLM checkpoints on disk, and short video files, for offline tests.

`tiny_models.tiny_target` builds a model in memory; real users hand Sparrow a *folder* (model
weights, tokenizer, chat template, image / video processor configs) and a *video file*. The helpers
here produce both, with nothing downloaded, so tests can exercise the same loading path:

    path = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    video = write_video(tmp_path / "clip.mp4", random_video(8, 24, 32, seed=0), fps=4)

The tokenizer is a word-level vocabulary of exactly `tiny_models.VOCAB` ids whose special tokens
sit at the ids the tiny configs use (pad 0, chat tokens at 280/281, visual placeholders at
290..293), so processor output feeds the tiny model directly.

torchvision: transformers' video processors (and so `AutoProcessor`) need it. It is not installed
in the main environment; `torchvision_dir()` names a wheel directory (built outside this file)
and `torchvision_shim()` makes that wheel importable even when its compiled ops do not match the
installed torch. Importing it changes what transformers sees for the rest of the process, so
tests call it in a subprocess only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import tiny_models as tm  # tests/ is on sys.path under pytest and when run as a script
from sparrow.inputs import preprocess  # the repository is too (run_processor_check puts it there)

QWEN_FAMILIES = ("qwen2_5_vl", "qwen2_vl")

PAD, UNK, SPARE = "<pad>", "<unk>", "<spare>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_ID, IM_END_ID = tm.TEXT_HI, tm.TEXT_HI + 1  # 280, 281

# Visual placeholder tokens per family, at the ids the tiny configs use.
QWEN_VISUAL = {
    "<|image_pad|>": tm.IMAGE_ID,
    "<|video_pad|>": tm.VIDEO_ID,
    "<|vision_start|>": tm.VISION_START_ID,
    "<|vision_end|>": tm.VISION_END_ID,
}
LLAVA_VISUAL = {"<image>": tm.IMAGE_ID, "<video>": tm.VIDEO_ID}

# How the chat template renders a video / image part, per family.
QWEN_VIDEO_TEXT = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
LLAVA_VIDEO_TEXT, LLAVA_IMAGE_TEXT = "<video>", "<image>"

BASE_WORDS = (
    "user assistant system what is moving in the video describe picture how many objects are there "
    "color red blue green left right up down a the of and it does where which one two three yes no "
    "yellow black white square circle ball person car dog cat frame first last scene shows "
    "fast slow big small top bottom center from to on at this that with"
).split()

CLIP_MEAN, CLIP_STD = list(preprocess.CLIP_MEAN), list(preprocess.CLIP_STD)
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# Qwen resize bounds (pixels per frame): 8*8*4 .. 32*32*4, so a 24x32 frame keeps its size
# (a 6x8 patch grid = 3x4 = 12 merged tokens per temporal patch).
QWEN_MIN_PIXELS = 8 * 8 * 4
QWEN_MAX_PIXELS = 32 * 32 * 4

TORCHVISION_ENV = "SPARROW_TORCHVISION_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _is_qwen(family: str) -> bool:
    if family in QWEN_FAMILIES:
        return True
    if family == "llava_onevision":
        return False
    raise ValueError(f"unknown tiny family {family!r}; one of {tm.FAMILIES}")


def special_tokens(family: str) -> dict[str, int]:
    """Every special token of `family`'s tokenizer and the id it must have (the config's ids)."""
    visual = QWEN_VISUAL if _is_qwen(family) else LLAVA_VISUAL
    return {PAD: tm.PAD_ID, UNK: 1, IM_START: IM_START_ID, IM_END: IM_END_ID, **visual}


def _text_words() -> list[str]:
    """Words for ids [TEXT_LO, TEXT_HI): the readable ones first, then generated fillers, so a
    test prompt like "what is moving in the video" encodes without <unk>."""
    n = tm.TEXT_HI - tm.TEXT_LO
    words = list(dict.fromkeys(BASE_WORDS))
    words += [f"w{i}" for i in range(len(words), n)]
    return words[:n]


def tiny_vocab(family: str) -> dict[str, int]:
    """Token -> id for all VOCAB ids; ids no token claims get a reserved filler name (the
    whitespace pre-tokenizer splits "<" off, so plain text never produces those)."""
    vocab = {SPARE: 2}
    vocab.update({w: tm.TEXT_LO + i for i, w in enumerate(_text_words())})
    vocab.update(special_tokens(family))
    taken = set(vocab.values())
    vocab.update({f"<reserved_{i}>": i for i in range(tm.VOCAB) if i not in taken})
    assert sorted(vocab.values()) == list(range(tm.VOCAB)), "vocabulary must cover every id once"
    return vocab


def build_tokenizer(family: str):
    """A `PreTrainedTokenizerFast` over a WordLevel model: deterministic, no merges to train,
    and every id is known in advance, which is what tests comparing ids want."""
    import tokenizers
    import transformers
    from tokenizers import AddedToken, models, pre_tokenizers

    core = tokenizers.Tokenizer(models.WordLevel(vocab=tiny_vocab(family), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Without a decoder, tokenizers joins decoded tokens with single spaces: what we want.
    specials = sorted(special_tokens(family).items(), key=lambda kv: kv[1])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        model_max_length=4096,
    )
    tok.chat_template = chat_template(family)
    return tok


# ----------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------


def chat_template(family: str) -> str:
    """A Qwen-style Jinja chat template. Tokens are separated by spaces (the tokenizer is
    word-level), placeholders follow the family's processor ("<|video_pad|>" vs "<video>"), and
    every piece of whitespace is an explicit string literal so the output is predictable."""
    video, image = (QWEN_VIDEO_TEXT, QWEN_IMAGE_TEXT) if _is_qwen(family) else (LLAVA_VIDEO_TEXT, LLAVA_IMAGE_TEXT)
    return (
        "{%- for message in messages -%}"
        "{{- '" + IM_START + "' + message['role'] + ' ' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- elif part['type'] == 'video' -%}{{- '" + video + "' -}}"
        "{%- elif part['type'] == 'image' -%}{{- '" + image + "' -}}"
        "{%- endif -%}"
        "{%- if not loop.last -%}{{- ' ' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- ' " + IM_END + " ' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant ' -}}{%- endif -%}"
    )


# ----------------------------------------------------------------------------------------------
# Processor configs (written as JSON the way Hub checkpoints ship them: constructing the
# processor objects would need torchvision for the video processors)
# ----------------------------------------------------------------------------------------------


def _processor_class(family: str) -> str:
    return {
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
    }[family]


# what every family's image and video processor config says alike: bicubic resize, 1/255, normalize, RGB
_PIXEL_STEPS = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                    do_convert_rgb=True)


def _qwen_vision_common(family: str) -> dict:
    return dict(
        _PIXEL_STEPS,
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        patch_size=tm.Q_PATCH,
        temporal_patch_size=tm.Q_TPATCH,
        merge_size=tm.Q_MERGE,
        processor_class=_processor_class(family),
    )


def _llava_vision_common() -> dict:
    side = tm.L_IMAGE
    return dict(
        _PIXEL_STEPS,
        size={"height": side, "width": side},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        processor_class="LlavaOnevisionProcessor",
    )


def processor_configs(family: str, model_config) -> dict[str, dict]:
    """File name -> JSON content of the image processor, video processor and processor configs.
    Values come from the model config where the model fixes them (patch sizes, pinpoints)."""
    if _is_qwen(family):
        vc = model_config.vision_config
        common = _qwen_vision_common(family)
        common.update(
            patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size
        )
        image = dict(common, image_processor_type="Qwen2VLImageProcessor")
        video = dict(
            common,
            video_processor_type="Qwen2VLVideoProcessor",
            do_sample_frames=False,  # tests pass exactly the frames they want encoded
            min_frames=2,
            max_frames=64,
            cap_pixels_per_frame=True,  # the qwen-vl-utils behaviour; silences a warning
        )
        processor = dict(processor_class=_processor_class(family))
    else:
        common = _llava_vision_common()
        side = model_config.vision_config.image_size
        image = dict(
            common,
            image_processor_type="LlavaOnevisionImageProcessor",
            do_pad=True,
            do_center_crop=False,
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=[list(p) for p in model_config.image_grid_pinpoints],
        )
        video = dict(common, video_processor_type="LlavaOnevisionVideoProcessor", do_sample_frames=False)
        patches = (side // model_config.vision_config.patch_size) ** 2
        processor = dict(
            processor_class="LlavaOnevisionProcessor",
            num_image_tokens=patches,  # 16: SigLIP has no CLS token
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            vision_aspect_ratio=model_config.vision_aspect_ratio,
            image_token=LLAVA_IMAGE_TEXT,
            video_token=LLAVA_VIDEO_TEXT,
        )
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": processor,
    }


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------


def save_tiny_checkpoint(family: str, path, dtype: torch.dtype = torch.float32, **tiny_target_kwargs) -> str:
    """Save `tiny_target(family, dtype=dtype, **kwargs)` with tokenizer, chat template and
    processor configs to `path`; returns the path as a string. Loading it back with the Auto
    classes is exactly what a user's `--model /some/folder` does."""
    path = Path(path)
    model = tm.tiny_target(family, dtype=dtype, **tiny_target_kwargs)
    model.save_pretrained(path)

    tok = build_tokenizer(family)
    tok.save_pretrained(path)
    # Both AutoTokenizer and AutoProcessor read the template from chat_template.jinja. The
    # tokenizer's save_pretrained writes that file in 5.x; write it explicitly anyway so the
    # processor's template does not hinge on that detail of the tokenizer.
    (path / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")

    for name, content in processor_configs(family, model.config).items():
        (path / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _check_special_ids(path, family)
    return str(path)


def _check_special_ids(path: Path, family: str) -> None:
    """Reload the tokenizer the way users do and insist every special token kept its id: a
    silent renumbering would make processor output index the wrong embedding rows."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    got = {t: tok.convert_tokens_to_ids(t) for t in special_tokens(family)}
    if got != special_tokens(family):
        raise AssertionError(f"special token ids changed on reload: {got}")
    if len(tok) != tm.VOCAB:
        raise AssertionError(f"tokenizer has {len(tok)} ids, expected {tm.VOCAB}")


# ----------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------


def random_video(T: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """uint8 frames [T, H, W, 3]: a smooth colour gradient with two coloured squares moving
    across it. Smooth content keeps lossy-codec error small, motion makes frames differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    tilt = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    background = base + (yy / max(H - 1, 1))[..., None] * tilt[0] + (xx / max(W - 1, 1))[..., None] * tilt[1]
    side = max(2, min(H, W) // 3)
    span_y, span_x = max(1, H - side + 1), max(1, W - side + 1)
    squares = []
    for _ in range(2):
        color = rng.uniform(0, 255, size=3)
        start = rng.integers(0, [span_y, span_x])
        velocity = rng.integers(1, 3, size=2) * rng.choice([-1, 1], size=2)  # never standing still
        squares.append((color, start, velocity))
    frames = np.empty((T, H, W, 3), dtype=np.uint8)
    for t in range(T):
        frame = background.copy()
        for color, (y0, x0), (vy, vx) in squares:
            y, x = (y0 + vy * t) % span_y, (x0 + vx * t) % span_x
            frame[y : y + side, x : x + side] = color
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _pick_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path, frames: np.ndarray, fps: int = 4) -> str:
    """Encode uint8 frames [T, H, W, 3] (H, W even: yuv420p halves chroma) to `path` with
    PyAV; returns the path as a string. libx264 at high quality where the wheel has it, else
    mpeg4 at a low quantiser; either decodes back within a few grey levels."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"H and W must be even for yuv420p, got {H}x{W}")
    codec = _pick_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        else:
            stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return str(path)


def read_video(path) -> np.ndarray:
    """Decode every frame of `path` to uint8 [T, H, W, 3] with PyAV (what a test compares)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ----------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------

_TORCHVISION_LIB = None  # keeps the torchvision op schemas alive (a Library drops them when freed)

# The two ops torchvision's _meta_registrations registers fake kernels for at import time. When its
# compiled extension does not load against this torch, they do not exist and `import torchvision`
# fails; defining just the schemas lets the (pure-Python) rest of torchvision import.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
}


def torchvision_dir() -> str | None:
    """Directory holding a torchvision package to put on sys.path for the processor checks:
    $SPARROW_TORCHVISION_DIR, else build/test-deps/torchvision under the repo root, else None."""
    env = os.environ.get(TORCHVISION_ENV)
    candidates = [env] if env else []
    candidates.append(str(REPO_ROOT / "build" / "test-deps" / "torchvision"))
    for d in candidates:
        if d and (Path(d) / "torchvision" / "__init__.py").is_file():
            return d
    return None


def _op_exists(qualname: str) -> bool:
    op, _overloads = torch._C._jit_get_operation(qualname)
    return op is not None


def torchvision_shim():
    """Import torchvision (from sys.path as it is) and return it; None when none is installed.

    A plain import is tried first, so a torchvision whose compiled ops load is used untouched.
    If that import fails and the nms / qnms ops do not exist (its extension did not load against
    this torch), their schemas are defined and the import is retried. Call it before anything
    else imports torchvision (in particular transformers' image / video processors)."""
    global _TORCHVISION_LIB
    import importlib
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as first_error:
        missing = [s for name, s in _TORCHVISION_SCHEMAS.items() if not _op_exists(f"torchvision::{name}")]
        if not missing:
            raise
        _forget_modules("torchvision")
        lib = torch.library.Library("torchvision", "DEF")
        for schema in missing:
            lib.define(schema)
        _TORCHVISION_LIB = lib
        try:
            return importlib.import_module("torchvision")
        except Exception as second_error:
            raise second_error from first_error


def _forget_modules(package: str) -> None:
    """Drop a half-imported package from sys.modules so that importing it again starts over."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


# ----------------------------------------------------------------------------------------------
# Processor check (needs torchvision: runs in a subprocess, see run_processor_check)
# ----------------------------------------------------------------------------------------------

def processor_check(family: str, path: str, video_path: str) -> dict:
    """Load `path` with AutoProcessor and the Auto model class, decode `video_path` the way a user
    would without torchcodec (transformers' load_video with PyAV), process one chat prompt with it
    and run the model on the result. Returns what a test asserts on. Needs torchvision importable
    (call torchvision_shim() before importing transformers)."""
    import transformers
    from transformers.video_utils import load_video

    processor = transformers.AutoProcessor.from_pretrained(path)
    parts = [{"type": "video"}, {"type": "text", "text": "what is moving in the video"}]
    messages = [{"role": "user", "content": parts}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    frames, metadata = load_video(video_path, backend="pyav")
    inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        logits = model(**inputs).logits
    grid = inputs.get("video_grid_thw")
    seconds = inputs.get("second_per_grid_ts")
    return dict(
        family=family,
        processor=type(processor).__name__,
        video_processor=type(processor.video_processor).__name__,
        text=text,
        frames=list(frames.shape),
        n_video_tokens=int((inputs["input_ids"] == model.config.video_token_id).sum()),
        video_grid_thw=None if grid is None else grid[0].tolist(),
        second_per_grid_ts=None if seconds is None else [float(x) for x in seconds],
        pixel_values_videos=list(inputs["pixel_values_videos"].shape),
        logits=list(logits.shape),
        logits_finite=bool(torch.isfinite(logits).all()),
    )


def run_processor_check(
    checkpoints: dict[str, str], video_path: str, tv_dir: str, timeout: float = 120
) -> dict[str, dict]:
    """Run processor_check for {family: path} on `video_path` in a fresh interpreter with `tv_dir`
    on its path.

    A subprocess because importing torchvision (shimmed or not) makes transformers pick
    torchvision-backed processors for the rest of the process, which would change what every
    later test in a pytest session sees."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    paths = [tv_dir, str(Path(__file__).parent), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    args = [f"{family}={path}" for family, path in checkpoints.items()]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(video_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"processor check failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["family"]: r for r in reports}


def _main(argv: list[str]) -> int:
    """`python tiny_checkpoints.py VIDEO FAMILY=PATH ...`: one JSON report line per checkpoint."""
    if torchvision_shim() is None:
        print("torchvision is not importable", file=sys.stderr)
        return 2
    video_path, *pairs = argv
    for arg in pairs:
        family, path = arg.split("=", 1)
        print(json.dumps(processor_check(family, path, video_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
