"""Sparrow's own input path (sparrow/inputs, no torchvision) against transformers' processors.

Run as a script in a subprocess with a torchvision package on sys.path (tests/test_inputs.py
does): importing torchvision through tiny_checkpoints.torchvision_shim() would change what
transformers sees for the rest of a pytest session. Prints one JSON line per case:

    python tests/hf_inputs_check.py TORCHVISION_DIR WORK_DIR

For each family, one record with a video file goes through
  ours   CheckpointProcessor(use_hf=False): the chat template, the placeholders, preprocess.py;
  theirs CheckpointProcessor(use_hf=True): transformers' processor on the frames we sampled;
  own    transformers' processor sampling the fully decoded video itself (do_sample_frames),
and every tensor is compared; two images (PIL image processor) go through ours and theirs.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository: sparrow without an install


def _diff(a: dict, b: dict) -> dict:
    """Per key: equal shapes and dtypes, and the largest absolute difference."""
    import torch

    out = {"keys_a": sorted(a), "keys_b": sorted(b)}
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = x.shape == y.shape and x.dtype == y.dtype
        err = float((x.double() - y.double()).abs().max()) if x.shape == y.shape and x.numel() else 0.0
        out[k] = {"same_shape_dtype": same, "max_abs": err}
    return out


def _own_sampling(proc, text: str, path: str, family: str, record: dict):
    """transformers' processor sampling the decoded video itself (its rule, its metadata)."""
    import tiny_checkpoints as tc
    from transformers.video_utils import VideoMetadata

    from sparrow.inputs.video import read_video

    frames = tc.read_video(path)
    fps = read_video(path, num_frames=1).video_fps
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps)
    kw = {"fps": record["fps"]} if family != "llava_onevision" else {"num_frames": record["num_frames"]}
    if record.get("max_pixels"):
        kw["size"] = {"shortest_edge": proc.settings["size"]["shortest_edge"], "longest_edge": record["max_pixels"]}
    return proc.hf(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=True,
                   return_tensors="pt", **kw)


def main(tv_dir: str, work: str) -> None:
    sys.path.insert(0, tv_dir)
    sys.path.insert(0, HERE)
    import tiny_checkpoints as tc

    if tc.torchvision_shim() is None:
        raise SystemExit("no torchvision in " + tv_dir)
    from PIL import Image

    from sparrow.inputs.auto import CheckpointProcessor, _tensors

    video = tc.write_video(os.path.join(work, "clip.mp4"), tc.random_video(20, 42, 58, seed=3), fps=4)  # 42x58: resized
    image = os.path.join(work, "im.png")
    Image.fromarray(tc.random_video(1, 40, 56, seed=4)[0]).save(image)
    wide = os.path.join(work, "wide.png")  # LLaVA-OV: another pinpoint, padding columns removed
    Image.fromarray(tc.random_video(1, 20, 64, seed=5)[0]).save(wide)
    # 462 frames at 24 fps, 2 per second: transformers' float32 steps take frame 231 where float64
    # arithmetic gives 230
    odd = tc.write_video(os.path.join(work, "odd.mp4"), tc.random_video(462, 24, 32, seed=6), fps=24)
    for family in ("qwen2_5_vl", "qwen2_vl", "llava_onevision"):
        path = tc.save_tiny_checkpoint(family, os.path.join(work, family))
        ours, theirs = CheckpointProcessor(path, use_hf=False), CheckpointProcessor(path, use_hf=True)
        record = {"id": "v", "video": video, "prompt": "what is moving in the video"}
        record |= {"fps": 2.0} if family != "llava_onevision" else {"num_frames": 6}
        if family == "qwen2_vl":
            record["max_pixels"] = 1024  # a user's lower pixel cap: resized further
        a, b = ours(record), theirs(record)
        text = ours.prompt_text(record["prompt"])
        c = _tensors(_own_sampling(theirs, text, video, family, record))
        result = {"family": family, "case": "video", "ours_vs_hf": _diff(a, b), "ours_vs_hf_sampling": _diff(a, c),
                  "video_tokens": int((a["input_ids"] == 291).sum())}
        print(json.dumps(result), flush=True)
        if family == "qwen2_5_vl":
            rec = {"id": "o", "video": odd, "prompt": "what is moving in the video", "fps": 2.0}
            text = ours.prompt_text(rec["prompt"])
            c = _tensors(_own_sampling(theirs, text, odd, family, rec))
            print(json.dumps({"family": family, "case": "video 462@24", "ours_vs_hf_sampling": _diff(ours(rec), c)}),
                  flush=True)
        for name in (image, wide):
            rec = {"id": "i", "image": name, "prompt": "describe the picture"}
            case = "image" if name == image else "wide image"
            print(json.dumps({"family": family, "case": case, "ours_vs_hf": _diff(ours(rec), theirs(rec))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
