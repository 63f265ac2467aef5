"""sparrow/inputs: video files, frame sampling, the families' pixels, and `--processor auto`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparrow.inputs import VideoError, read_video, sample_indices
from sparrow.inputs.auto import CheckpointProcessor
from sparrow.inputs.preprocess import qwen_video, smart_size
from tiny_checkpoints import random_video, save_tiny_checkpoint, torchvision_dir, write_video

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sample_indices_by_fps_and_by_count():
    # 100 frames at 25 fps, 2 per second: 8 frames, every 12.5th from frame 0.
    assert sample_indices(100, 25.0, fps=2.0, multiple=2, min_frames=4) == [0, 12, 25, 37, 50, 62, 75, 87]
    # A short clip: the minimum count wins, rounded down to the temporal patch; at most every frame.
    assert sample_indices(5, 25.0, fps=2.0, multiple=2, min_frames=4) == [0, 1, 2, 3]
    assert sample_indices(10, 10.0, num_frames=5, multiple=2) == [0, 2, 5, 7]  # rounded to 4 frames
    assert sample_indices(7, 30.0, fps=100.0) == list(range(7))
    # float32 steps as transformers takes them: 462 frames at 24 fps -> frame 231, not int(19 * 462 / 38) = 230
    assert sample_indices(462, 24.0, fps=2.0, multiple=2, min_frames=4)[19] == 231
    # 367 at 24 fps: a 31st float32 step lands on frame 367, past the last: dropped
    assert sample_indices(367, 24.0, fps=2.0, multiple=2, min_frames=4)[-1] == 354
    with pytest.raises(VideoError, match="not both"):
        sample_indices(10, 10.0, fps=1.0, num_frames=2)
    with pytest.raises(VideoError, match="cannot sample"):
        sample_indices(3, 10.0, num_frames=8)


def test_read_video_samples_a_file_and_keeps_its_frame_rate(tmp_path):
    frames = random_video(20, 24, 32, seed=1)
    path = write_video(tmp_path / "clip.mp4", frames, fps=4)
    clip = read_video(path, fps=2.0, multiple=2, min_frames=4)
    assert clip.total_frames == 20 and clip.video_fps == 4.0
    assert clip.indices == list(range(0, 20, 2)) and clip.sampled_fps == 2.0
    assert clip.frames.shape == (10, 24, 32, 3) and clip.frames.dtype == np.uint8
    err = np.abs(clip.frames.astype(int) - frames[clip.indices].astype(int)).mean()
    assert err < 20, err  # the decoded frames are the written ones (lossy codec)


def _write_variable_rate(path, frames, seconds):
    """A video whose frames are shown at the given times (variable frame rate)."""
    import fractions

    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.time_base = fractions.Fraction(1, 1000)
        for frame, t in zip(frames, seconds):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = int(t * 1000), stream.time_base
            out.mux(stream.encode(vf))
        out.mux(stream.encode())


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_read_video_variable_frame_rate(tmp_path, suffix):
    """20 frames at 30 fps, then 10 at 2 fps (5.7 s): the rate is frames / duration, not the
    rate of the first frames (MKV's header)."""
    seconds = [i / 30 for i in range(20)] + [20 / 30 + (i + 1) * 0.5 for i in range(10)]
    path = tmp_path / f"vfr{suffix}"
    _write_variable_rate(path, random_video(30, 24, 32, seed=1), seconds)
    clip = read_video(path, num_frames=4)
    assert clip.total_frames == 30 and 4.5 < clip.video_fps < 6.5, clip.video_fps


def test_read_video_errors_name_the_file(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        read_video(tmp_path / "none.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="bad.mp4"):
        read_video(bad)


def test_smart_size_hand_worked():
    assert smart_size(42, 58, 8, 256, 4096) == (40, 56)  # rounded to multiples of 8
    assert smart_size(42, 58, 8, 256, 1024) == (24, 32)  # scaled down by sqrt(2436/1024), floored
    assert smart_size(10, 10, 8, 256, 4096) == (16, 16)  # scaled up to the minimum, ceiled


def test_qwen_video_patch_layout():
    """Row r of pixel_values_videos is one patch (C, tp, p, p) in merge-window order."""
    settings = {"patch_size": 2, "merge_size": 2, "temporal_patch_size": 2, "size": {"shortest_edge": 16,
                "longest_edge": 4096}, "image_mean": [0.0] * 3, "image_std": [1.0] * 3, "rescale_factor": 1.0}
    frames = torch.randint(0, 256, (3, 8, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels, grid = qwen_video(frames, settings)
    assert grid == [2, 4, 2] and pixels.shape == (16, 3 * 2 * 2 * 2)
    x = torch.cat([frames, frames[-1:]]).permute(0, 3, 1, 2).float()  # odd count: the last frame repeated
    rows = []
    for t in range(2):
        for bh in range(2):  # merge windows of 2x2 patches, row-major, then patches inside them
            for bw in range(1):
                for mh in range(2):
                    for mw in range(2):
                        h, w = (2 * bh + mh) * 2, (2 * bw + mw) * 2
                        rows.append(x[2 * t:2 * t + 2, :, h:h + 2, w:w + 2].permute(1, 0, 2, 3).reshape(-1))
    assert torch.equal(pixels, torch.stack(rows))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava_onevision"])
def test_checkpoint_processor_without_torchvision(family, tmp_path):
    """--processor auto on a video file: placeholders as many as the model's visual tokens, the
    real frame rate in second_per_grid_ts, and the model runs on the result."""
    import transformers

    path = save_tiny_checkpoint(family, tmp_path / "ckpt")
    video = write_video(tmp_path / "clip.mp4", random_video(12, 24, 32, seed=2), fps=3)
    proc = CheckpointProcessor(path, use_hf=False)
    inputs = proc({"id": "c", "video": video, "prompt": "what is moving in the video", "num_frames": 4})
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and inputs["attention_mask"].shape == ids.shape
    n_video = int((ids == 291).sum())
    if family == "llava_onevision":
        assert inputs["pixel_values_videos"].shape == (1, 4, 3, 16, 16) and n_video == 4 * 4 + 1
    else:
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert t == 2 and n_video == t * h * w // 4
        assert torch.equal(inputs["mm_token_type_ids"], (ids == 291).long() * 2)
        if family == "qwen2_5_vl":  # 4 of 12 frames at 3 fps: 1 frame/s, 2 frames per temporal patch
            assert inputs["second_per_grid_ts"].tolist() == [2.0]
        else:
            assert "second_per_grid_ts" not in inputs
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    image = proc({"id": "i", "image": random_video(1, 20, 64, seed=5)[0], "prompt": "describe the picture"})
    with torch.no_grad():  # the placeholders are as many as the model's visual features, or it raises
        assert torch.isfinite(model(**inputs).logits).all() and torch.isfinite(model(**image).logits).all()


def test_checkpoint_settings_where_transformers_keeps_them(tmp_path):
    """transformers 5 nests the video processor in processor_config.json; min_pixels / max_pixels,
    where given, override size (as in its Qwen-VL video processor)."""
    from sparrow.inputs.preprocess import qwen_pixel_budget

    path = save_tiny_checkpoint("qwen2_vl", tmp_path / "ckpt")
    video = write_video(tmp_path / "clip.mp4", random_video(8, 24, 32, seed=2), fps=4)
    record = {"id": "c", "video": video, "prompt": "what is moving in the video", "num_frames": 4}
    flat = CheckpointProcessor(path, use_hf=False)(record)
    settings = json.loads((tmp_path / "ckpt" / "video_preprocessor_config.json").read_text())
    proc_cfg = json.loads((tmp_path / "ckpt" / "processor_config.json").read_text())
    (tmp_path / "ckpt" / "processor_config.json").write_text(json.dumps(proc_cfg | {"video_processor": settings}))
    (tmp_path / "ckpt" / "video_preprocessor_config.json").unlink()
    nested = CheckpointProcessor(path, use_hf=False)(record)
    assert flat.keys() == nested.keys() and all(torch.equal(flat[k], nested[k]) for k in flat)
    size = {"shortest_edge": 256, "longest_edge": 4096}
    assert qwen_pixel_budget({"size": size}, 4) == (256, 4096)
    assert qwen_pixel_budget({"size": size, "min_pixels": 64, "max_pixels": 1024}, 4) == (64, 1024)
    assert qwen_pixel_budget({"size": size}, 4, max_pixels=512) == (256, 512)


def test_checkpoint_processor_refuses_what_it_cannot_do(tmp_path):
    path = save_tiny_checkpoint("llava_onevision", tmp_path / "ckpt")
    proc = CheckpointProcessor(path, use_hf=False)
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        proc({"id": "x", "frames": np.zeros((2, 16, 16, 3), np.uint8)})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="knows qwen2_5_vl"):
        CheckpointProcessor(str(tmp_path / "other"))


def test_inputs_equal_transformers_processors(tmp_path):
    """Sparrow's torch-only inputs == transformers' processors (torchvision needed: a subprocess)."""
    tv = torchvision_dir()
    if tv is None:
        pytest.skip("no torchvision package (make test unpacks one under build/test-deps/torchvision)")
    run = subprocess.run([sys.executable, os.path.join(HERE, "hf_inputs_check.py"), tv, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    cases = {(r["family"], r["case"]) for r in results}
    families = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")
    assert cases == {(f, case) for f in families for case in ("video", "image", "wide image")} | {
        ("qwen2_5_vl", "video 462@24")}
    for r in results:
        for name in ("ours_vs_hf", "ours_vs_hf_sampling"):
            if name not in r:
                continue
            d = r[name]
            assert d["keys_a"] == d["keys_b"], (r["family"], name, d)
            for key in d["keys_a"]:  # bitwise: same shapes, dtypes and values
                assert d[key] == {"same_shape_dtype": True, "max_abs": 0.0}, (r["family"], r["case"], name, key, d[key])
