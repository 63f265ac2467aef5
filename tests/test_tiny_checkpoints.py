"""The on-disk tiny checkpoints and video files load the way a user's real ones do.

Checkpoints are saved once per module (saving three models is most of this file's time). The
AutoProcessor part needs torchvision, which the main environment lacks; it runs in a subprocess
with the wheel directory from `tiny_checkpoints.torchvision_dir()` and is skipped without one.
"""

import sys

import numpy as np
import pytest
import torch
import transformers

import tiny_checkpoints as tc
import tiny_models as tm

USER_VIDEO = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what is moving in the video"}]}]
VIDEO_TEXT = {"qwen2_5_vl": tc.QWEN_VIDEO_TEXT, "qwen2_vl": tc.QWEN_VIDEO_TEXT, "llava_onevision": tc.LLAVA_VIDEO_TEXT}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ckpt")
    return {family: tc.save_tiny_checkpoint(family, root / family) for family in tm.FAMILIES}


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_checkpoint_files(checkpoints, family):
    import os

    names = set(os.listdir(checkpoints[family]))
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "processor_config.json",
    }
    assert expected <= names


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_tokenizer_reloads_with_fixed_ids(checkpoints, family):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints[family])
    assert len(tok) == tm.VOCAB
    for token, idx in tc.special_tokens(family).items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    assert tok.pad_token_id == tm.PAD_ID
    assert tok.eos_token == tc.IM_END and tok.eos_token_id == tc.IM_END_ID
    ids = tok("what is moving in the video", add_special_tokens=False)["input_ids"]
    assert all(tm.TEXT_LO <= i < tm.TEXT_HI for i in ids)
    assert tok.decode(ids) == "what is moving in the video"
    assert tok.unk_token_id == 1 and tok.convert_tokens_to_ids("zzzunknownword") == 1


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_chat_template_renders_placeholder(checkpoints, family):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints[family])
    text = tok.apply_chat_template(USER_VIDEO, add_generation_prompt=True, tokenize=False)
    video = VIDEO_TEXT[family]
    assert text == f"<|im_start|>user {video} what is moving in the video <|im_end|> <|im_start|>assistant "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tm.VIDEO_ID) == 1 and ids[0] == tc.IM_START_ID
    plain = tok.apply_chat_template([{"role": "system", "content": "yes"}], tokenize=False)
    assert plain == "<|im_start|>system yes <|im_end|> "


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_image_processor_and_config(checkpoints, family):
    path = checkpoints[family]
    ip = transformers.AutoImageProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    cfg = model.config
    assert cfg.video_token_id == tm.VIDEO_ID and cfg.image_token_id == tm.IMAGE_ID
    assert model.dtype == torch.float32
    if family in tc.QWEN_FAMILIES:
        assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (tm.Q_PATCH, tm.Q_TPATCH, tm.Q_MERGE)
        assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (tm.VISION_START_ID, tm.VISION_END_ID)
        out = ip(images=[np.zeros((24, 32, 3), np.uint8)], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, 6, 8]]  # 24x32 px stays 24x32: 6x8 patches
    else:
        assert ip.size["height"] == ip.size["width"] == tm.L_IMAGE
        assert [list(p) for p in ip.image_grid_pinpoints] == [list(p) for p in cfg.image_grid_pinpoints]
        out = ip(images=[np.zeros((16, 32, 3), np.uint8)], return_tensors="pt")
        assert out["pixel_values"].shape[-2:] == (tm.L_IMAGE, tm.L_IMAGE)


def test_video_roundtrip(tmp_path):
    import av

    frames = tc.random_video(8, 24, 32, seed=3)
    assert frames.dtype == np.uint8 and frames.shape == (8, 24, 32, 3)
    assert np.abs(np.diff(frames.astype(int), axis=0)).mean() > 0.5  # the squares move
    path = tc.write_video(tmp_path / "clip.mp4", frames, fps=4)
    with av.open(path) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames.astype(float)).mean() < 20
    assert np.array_equal(tc.read_video(path), decoded)


def test_write_video_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError):
        tc.write_video(tmp_path / "odd.mp4", np.zeros((2, 5, 8, 3), np.uint8), fps=2)


@pytest.mark.slow  # ~9 s: a fresh interpreter imports torch, torchvision and transformers
def test_processor_in_subprocess(checkpoints, tmp_path):
    tv_dir = tc.torchvision_dir()
    if tv_dir is None:
        pytest.skip(f"no torchvision wheel dir (set {tc.TORCHVISION_ENV} or build build/test-deps/torchvision)")
    T, H, W, fps = 8, 24, 32, 4
    video = tc.write_video(tmp_path / "clip.mp4", tc.random_video(T, H, W, seed=1), fps=fps)
    reports = tc.run_processor_check(checkpoints, video, tv_dir)
    for family in tm.FAMILIES:
        r = reports[family]
        assert r["processor"] == tc._processor_class(family)
        assert r["frames"] == [T, H, W, 3]
        assert VIDEO_TEXT[family] in r["text"]
        if family in tc.QWEN_FAMILIES:
            t, h, w = r["video_grid_thw"]
            assert (t, h, w) == (T // tm.Q_TPATCH, H // tm.Q_PATCH, W // tm.Q_PATCH)  # 24x32 px kept
            assert r["n_video_tokens"] == t * h * w // tm.Q_MERGE**2
        else:
            assert r["pixel_values_videos"] == [1, T, 3, tm.L_IMAGE, tm.L_IMAGE]
            assert r["n_video_tokens"] == T * 4 + 1  # 2x2 pooled tokens per frame + a newline
        if family == "qwen2_5_vl":
            assert r["second_per_grid_ts"] == [tm.Q_TPATCH / fps]  # from the file's frame rate
        assert r["logits"][-1] == tm.VOCAB and r["logits_finite"]
    assert "torchvision" not in sys.modules  # the shim stayed in the subprocess
