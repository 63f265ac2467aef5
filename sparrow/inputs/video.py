"""Video files -> sampled RGB frames and the frame rate they were sampled at.

Decoding uses PyAV (`pip install av`): its wheels ship FFmpeg, so nothing else is installed and
it reads what users have (MP4/H.264, MKV, WebM, AVI, MOV). torchcodec needs a system FFmpeg and
a build matched to the installed torch; torchvision's reader is deprecated; decord is
unmaintained. transformers' own `load_video` is a thin wrapper over these same backends.

Which frames: `sample_indices` is the rule of transformers' Qwen-VL video processor, float32
steps of total/n from frame 0 as it computes them, n a multiple of the temporal patch: a clip
decoded here and given to the Hugging Face processor is the clip that processor would have
sampled itself (tests/test_inputs.py). One exception: for some lengths (78 of 8,988 at 24, 25 or
30 fps, 2 frames/s) the float32 steps make an (n+1)-th index equal to the frame count, past the
last frame, which transformers' processor then fails on; Sparrow drops it. The frame rate of the
sampled frames is what Qwen2.5-VL's `second_per_grid_ts` needs: temporal_patch_size /
sampled_fps seconds per temporal grid step. A file's frame rate is its frame count over its
duration where the header's average rate disagrees by more than 1% (variable-rate MKV/WebM
report the rate of their first frames).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
DEFAULT_FPS = 2.0  # Qwen's default sampling rate for video understanding


class VideoError(ValueError):
    """A video file that cannot be read or sampled as asked."""


@dataclass
class VideoClip:
    """Sampled frames [T, H, W, 3] uint8, from a file of `total_frames` frames at `video_fps`."""

    frames: np.ndarray
    video_fps: float
    total_frames: int
    indices: list[int]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled clip (as transformers' VideoMetadata.sampled_fps)."""
        return len(self.indices) / self.total_frames * self.video_fps


def is_video_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(VIDEO_SUFFIXES)


def sample_indices(total: int, video_fps: float, fps: float | None = None, num_frames: int | None = None,
                   multiple: int = 1, min_frames: int = 1, max_frames: int = 768, up_to: bool = False) -> list[int]:
    """Indices of the frames to keep: `num_frames` of them (up_to: at most that many, fewer for a
    shorter video), or `fps` per second of video, at least min_frames and at most max_frames (and
    the video's own count), rounded down to a multiple of `multiple` (the temporal patch); uniform
    steps of total/n starting at frame 0."""
    if fps is not None and num_frames is not None:
        raise VideoError("give fps or num_frames, not both")
    if total < 1:
        raise VideoError("the video has no frames")
    if num_frames is not None and up_to:
        num_frames = min(num_frames, total)
    if num_frames is not None:
        n = round(num_frames / multiple) * multiple
    else:
        fps = DEFAULT_FPS if fps is None else fps
        if fps <= 0 or not video_fps or video_fps <= 0:
            raise VideoError(f"cannot sample {fps} frames/s from a video at {video_fps} frames/s")
        cap = math.floor(min(max_frames, total) / multiple) * multiple
        n = min(max(total / video_fps * fps, min_frames), cap, total)
        n = math.floor(n / multiple) * multiple
    if n < 1 or n > total:
        raise VideoError(f"cannot sample {n} frames from a video of {total} frames "
                         f"(temporal patch {multiple}); ask for fewer frames or a lower fps")
    import torch

    # float32 steps, as transformers computes them (the same frames where rounding moves one);
    # where rounding adds an (n+1)-th step it lands past the last frame, and is dropped
    return [i for i in torch.arange(0, total, total / n, dtype=torch.float32).int().tolist() if i < total]


def _open(path: str):
    try:
        import av
    except ImportError as e:
        raise VideoError("reading video files needs PyAV: pip install av") from e
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}")
    try:
        return av.open(path)
    except Exception as e:  # FFmpeg's errors name the codec/container problem
        raise VideoError(f"cannot open video {path}: {e}") from e


def _frame_count(container, stream) -> int:
    """The stream's frame count from its header, else by demuxing (no decoding)."""
    if stream.frames:
        return int(stream.frames)
    count = sum(1 for p in container.demux(stream) if p.size)
    container.seek(0)
    return count


def _frame_rate(container, stream, total: int) -> float:
    """The header's average rate, unless frame count / duration says otherwise (variable rate)."""
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    seconds = container.duration / 1e6 if container.duration else 0.0
    measured = total / seconds if seconds > 0 else 0.0
    if measured and (not rate or abs(measured - rate) > 0.01 * rate):
        return measured
    if not rate:
        raise VideoError(f"{container.name}: neither a frame rate nor a duration in the file")
    return rate


def read_video(path: str, fps: float | None = None, num_frames: int | None = None, multiple: int = 1,
               min_frames: int = 1, max_frames: int = 768, up_to: bool = False) -> VideoClip:
    """Decode the frames that sample_indices picks (the others are decoded and dropped at once,
    so a long video never sits in memory whole)."""
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        total = _frame_count(container, stream)
        video_fps = _frame_rate(container, stream, total)
        try:
            indices = sample_indices(total, video_fps, fps, num_frames, multiple, min_frames, max_frames, up_to)
        except VideoError as e:
            raise VideoError(f"{path}: {e}") from None
        wanted, frames = set(indices), []
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= indices[-1]:
                    break
        except Exception as e:
            raise VideoError(f"{path}: decoding failed at frame {len(frames)}: {e}") from e
    if len(frames) < len(indices):  # the header promised more frames than the stream holds
        raise VideoError(f"{path}: the header says {total} frames but only {len(frames)} of the "
                         f"{len(indices)} sampled ones decoded")
    return VideoClip(np.stack(frames), video_fps, total, indices)
