"""Sparrow's built-in default world: procedural clips of coloured shapes, their questions and long
descriptive answers, a word-level tokenizer, a Qwen2.5-VL-style processor, and a small
Qwen2_5_VLForConditionalGeneration target trained on it (assets/world_target/).

    scene = make_scene(seed)                      # ground truth (scene.py)
    frames = render(scene, frames=16, height=224)  # uint8 [T,H,W,3] (render.py)
    question, answer = make_qa(seed)              # language.py
    inputs = make_inputs({"seed": seed, "frames": 16, "height": 224})   # processor.py
    model, tok = load_world_target()              # target.py
"""

from sparrow.world.language import describe, make_qa, make_question, parse_answer
from sparrow.world.processor import collate, encode_clip, load_tokenizer, make_inputs, patchify
from sparrow.world.render import render, visual_tokens
from sparrow.world.scene import Scene, make_scene
from sparrow.world.tokenizer import WordTokenizer, build_vocab


def load_world_target(*args, **kwargs):
    from sparrow.world.target import load_world_target as _load

    return _load(*args, **kwargs)


__all__ = ["Scene", "WordTokenizer", "build_vocab", "collate", "describe", "encode_clip", "load_tokenizer",
           "load_world_target", "make_inputs", "make_qa", "make_question", "make_scene", "parse_answer",
           "patchify", "render", "visual_tokens"]
