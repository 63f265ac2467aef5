"""Model inputs from what users have: video files (video.py), the pixels each family takes
(preprocess.py), and the checkpoint's own processor as `--processor auto` (auto.py)."""

from sparrow.inputs.auto import CheckpointProcessor, checkpoint_processor
from sparrow.inputs.video import VIDEO_SUFFIXES, VideoClip, VideoError, is_video_file, read_video, sample_indices

__all__ = ["CheckpointProcessor", "checkpoint_processor", "VIDEO_SUFFIXES", "VideoClip", "VideoError",
           "is_video_file", "read_video", "sample_indices"]
