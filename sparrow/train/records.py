"""The dataset format that `sparrow gen-data` reads and `sparrow eval` evaluates on.

JSONL, one record per line:

    {"id": "clip-0001", "video": "clips/0001.npy", "prompt": "What is moving?", "answer": "..."}
    {"id": "img-7", "image": "images/7.png", "prompt": "Describe the picture."}

- "id" (string, unique in the file): the sample's name in every shard, index and error message.
- exactly one of
  "video": a video file (.mp4, .mkv, .webm, .avi, .mov, ...: sparrow/inputs/video.py), a frames file, `.npy` (numpy array [T, H, W, C] or [T, C, H, W]) or `.pt` (a tensor
            saved with torch.save), or a folder of frames (one `.npy`/`.pt`/`.png`/`.jpg`/`.jpeg`
            file per frame, in file-name order);
  "image": one image (`.png`/`.jpg`/`.jpeg` read with PIL, or `.npy`/`.pt`).
  Relative paths are relative to the JSONL file's folder.
  Procedural data: "frames" may be an integer (a frame count) when the processor renders the
  pixels itself (e.g. from a "seed" key); nothing is loaded then.
- "fps" / "num_frames" (optional, video files): frames sampled per second of video (default 2) or
  a fixed frame count; "max_pixels" (optional): a lower per-frame pixel cap (Qwen-VL).
- "prompt" (string): the question; the processor (see below) wraps it in the chat template. It may
  be left out when the processor makes the question itself (procedural data).
- "answer" (optional, usually a string): a reference answer, passed to the processor as is.
  gen-data ignores it unless asked to use given answers (`--answers given`); then the processor
  turns it into token ids ("answer_ids" in the dict it returns) or the record carries
  "answer_ids" (a list of ints) itself.
- any other key is kept and passed through to the processor (e.g. "group" names the visual-length
  bucket `sparrow eval` reports separately).

In-memory records (a list of dicts) follow the same format, except that the visual input may be
given as an array: "frames" (video, [T, ...]) or "image" ([H, W, C] or [C, H, W]) holding a
numpy array or a tensor instead of a path.

The processor: `--processor auto` (sparrow/inputs/auto.py, the checkpoint's own processor), or a
callable `make_inputs(record) -> dict` that turns a record, with its visual input loaded
(`record["frames"]` for frames, `record["image"]` for an image, both arrays; a video file stays a
path in `record["video"]`, for `sparrow.inputs.read_video` to decode and sample), into the
target's processor-style inputs for a batch of one: input_ids [1, S], attention_mask [1, S] and the
family's pixel tensors (sparrow/targets/base.py). If its signature has a parameter named `model`,
the target's Hugging Face model is passed as `model=`.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Callable, Iterable

import numpy as np
import torch

from sparrow.inputs.video import VideoError, is_video_file

FRAME_SUFFIXES = (".npy", ".pt", ".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class RecordError(ValueError):
    """A record that cannot be used; the message names the sample."""


def _check_record(rec: dict, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object / dict, got {type(rec).__name__}")
    if "id" not in rec:
        raise RecordError(f"{where}: record has no 'id'")
    sid = rec["id"]
    if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
        raise RecordError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
    rec = dict(rec)
    rec["id"] = str(sid)
    name = f"sample {rec['id']!r} ({where})"
    if rec.get("prompt") is not None and not isinstance(rec["prompt"], str):
        raise RecordError(f"{name}: 'prompt' must be a string")
    visual = [k for k in ("video", "image", "frames") if rec.get(k) is not None]
    if len(visual) != 1:
        raise RecordError(f"{name}: needs exactly one of 'video', 'image' (path or array) or 'frames', got {visual}")
    if isinstance(rec.get("frames"), bool) or (isinstance(rec.get("frames"), int) and rec["frames"] < 1):
        raise RecordError(f"{name}: 'frames' as a count must be an integer >= 1")
    _check_sampling(rec, name)
    if "answer_ids" in rec and rec["answer_ids"] is not None:
        ids = rec["answer_ids"]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
            raise RecordError(f"{name}: 'answer_ids' must be a list of ints")
        rec["answer_ids"] = list(ids)
    return rec


def _check_sampling(rec: dict, name: str) -> None:
    """"fps" a positive number, "num_frames" / "max_pixels" positive integers, not fps and num_frames."""
    fps, count, pixels = rec.get("fps"), rec.get("num_frames"), rec.get("max_pixels")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise RecordError(f"{name}: 'fps' must be a positive number, got {fps!r}")
    for key, val in (("num_frames", count), ("max_pixels", pixels)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise RecordError(f"{name}: {key!r} must be a positive integer, got {val!r}")
    if fps is not None and count is not None and isinstance(rec.get("video"), str):
        raise RecordError(f"{name}: give 'fps' or 'num_frames' for a video file, not both")


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file, checked; relative visual paths made absolute."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e})") from None
            rec = _check_record(raw, where)
            for key in ("video", "image"):
                if isinstance(rec.get(key), str) and not os.path.isabs(rec[key]):
                    rec[key] = os.path.join(base, rec[key])
            rec["_where"] = where
            records.append(rec)
    return records


def load_records(source: str | os.PathLike | Iterable[dict]) -> list[dict]:
    """A JSONL path or an iterable of in-memory records -> checked records (ids unique)."""
    if isinstance(source, (str, os.PathLike)):
        records = read_jsonl(os.fspath(source))
    else:
        records = []
        for i, rec in enumerate(source):
            rec = _check_record(rec, f"record #{i}")
            rec["_where"] = f"record #{i}"
            records.append(rec)
    seen: dict[str, str] = {}
    for rec in records:
        if rec["id"] in seen:
            raise RecordError(f"sample {rec['id']!r}: duplicate id ({seen[rec['id']]} and {rec['_where']})")
        seen[rec["id"]] = rec["_where"]
    return records


def _read_array(path: str, name: str):
    low = path.lower()
    try:
        if low.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if low.endswith(".pt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, torch.Tensor):
                raise RecordError(f"{name}: {path} holds a {type(obj).__name__}, expected a tensor")
            return obj
        if low.endswith(IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    except RecordError:
        raise
    except Exception as e:  # a corrupt file: say which sample and which file
        raise RecordError(f"{name}: cannot read {path}: {e}") from e
    raise RecordError(f"{name}: {path}: unsupported file type (one of {', '.join(FRAME_SUFFIXES)} or a video file)")


def _stack(frames: list, name: str):
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) != 1:
        raise RecordError(f"{name}: frames of different shapes {sorted(shapes)}")
    if all(isinstance(f, np.ndarray) for f in frames):
        return np.stack(frames)
    return torch.stack([torch.as_tensor(f) for f in frames])


def load_visual(record: dict) -> dict:
    """The record with its visual input loaded: "frames" ([T, ...] array) for a video, "image"
    (array) for an image; a frame count (procedural data) stays as it is. A missing or unreadable
    file raises RecordError naming the sample."""
    name = f"sample {record['id']!r}"
    out = dict(record)
    if isinstance(record.get("frames"), int):  # procedural: the processor renders the frames
        return out
    if record.get("frames") is not None:
        frames = record["frames"]
        if not isinstance(frames, (np.ndarray, torch.Tensor)):
            frames = _stack(list(frames), name)
        out["frames"] = frames
    elif isinstance(record.get("video"), str):
        path = record["video"]
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_SUFFIXES))
            if not files:
                raise RecordError(f"{name}: video folder {path} holds no frame files ({', '.join(FRAME_SUFFIXES)})")
            out["frames"] = _stack([_read_array(os.path.join(path, f), name) for f in files], name)
        elif not os.path.exists(path):
            raise RecordError(f"{name}: video file not found: {path}")
        elif not is_video_file(path):  # a video file is decoded by the processor, which knows its sampling
            out["frames"] = _read_array(path, name)
    elif record.get("video") is not None:  # an in-memory array under "video"
        out["frames"] = record["video"]
    elif isinstance(record.get("image"), str):
        path = record["image"]
        if not os.path.exists(path):
            raise RecordError(f"{name}: image file not found: {path}")
        out["image"] = _read_array(path, name)
    if out.get("frames") is not None and out["frames"].ndim < 2:
        raise RecordError(f"{name}: frames must be [T, ...], got shape {tuple(out['frames'].shape)}")
    return out


def resolve_callable(spec: str) -> Callable:
    """"package.module:function" -> the function (the CLI's --processor)."""
    import importlib

    if ":" not in spec:
        raise ValueError(f"--processor {spec!r}: expected 'module:function'")
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"--processor {spec!r}: cannot import {mod!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--processor {spec!r}: {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--processor {spec!r} is not callable")
    return obj


def call_processor(make_inputs: Callable, record: dict, model=None) -> dict:
    """make_inputs(record) (or make_inputs(record, model=model) when it takes `model`), checked."""
    try:
        takes_model = "model" in inspect.signature(make_inputs).parameters
    except (TypeError, ValueError):
        takes_model = False
    rec = {k: v for k, v in record.items() if not k.startswith("_")}
    name = f"sample {record['id']!r}"
    try:
        inputs = make_inputs(rec, model=model) if takes_model else make_inputs(rec)
    except VideoError as e:  # a video file the processor could not decode or sample
        raise RecordError(f"{name}: {e}") from e
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise RecordError(f"{name}: the processor returned {type(inputs).__name__} without 'input_ids'")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise RecordError(f"{name}: the processor's input_ids must be a [1, S] tensor, got "
                          f"{getattr(ids, 'shape', type(ids).__name__)}")
    if "attention_mask" not in inputs:
        inputs = dict(inputs, attention_mask=torch.ones_like(ids))
    return inputs


def to_device(inputs: dict, device, dtype) -> dict:
    """Every tensor to `device`; floating pixel tensors also to the model's dtype."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k.startswith("pixel_values"):
                v = v.to(dtype)
        out[k] = v
    return out


def host_inputs(record: dict, make_inputs: Callable, model) -> tuple[dict, object]:
    """A record -> (its processor inputs in host memory, the processor's "answer_ids" or None):
    load the visual input, call the processor, tensors to the CPU (a no-op for a processor's
    usual output). gen-data and eval move one batch at a time to the device (to_device), so the
    pixels of the records still to come never wait on the device."""
    inputs = call_processor(make_inputs, load_visual(record), model=model)
    answer_ids = inputs.pop("answer_ids", None)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}, answer_ids


def prepare_inputs(record: dict, make_inputs: Callable, model) -> tuple[dict, object]:
    """host_inputs, then the tensors moved to the model's device (pixels in its dtype)."""
    p = next(model.parameters())
    inputs, answer_ids = host_inputs(record, make_inputs, model)
    return to_device(inputs, p.device, p.dtype), answer_ids
