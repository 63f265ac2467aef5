"""The world's target: a small Qwen2_5_VLForConditionalGeneration trained on generated clips.

    model, tok = load_world_target()          # the shipped one (assets/world_target/), float32
    train_world_target(out_dir)               # reproduce it (cached by config hash)
    evaluate(model, tok, seeds, frames, height)  -> attribute accuracy of greedy answers vs chance

Model. Real Qwen2.5-VL architecture, random init, small: a 2-block vision tower (width 96, full
attention within each frame pair) and a deep, narrow language model (6 layers, width 192, GQA
3 query / 1 key-value heads of dim 64, M-RoPE sections 8/12/12), ~190-word vocabulary. Depth is
preferred over width so that one target step costs several times a one-layer draft of its width.

Training. Teacher forcing on prompt + reference answer with the loss on the answer tokens only,
at the positions generation gives the answer (generation_position_ids: in transformers 5.x these
differ from a plain forward's once a clip has more frame pairs than rows, transformers#45381);
the words the video decides (colours, shapes, sizes, directions, places, counts: CONTENT_WORDS)
weigh `content_weight` times more than grammar words. The vision tower learns to see first: it and
a linear probe on the merger's output train alone on each visual token's ground truth
(token_labels.py; `vision_pretrain_steps`, pretrain_vision), then the joint run keeps the tower
frozen (`freeze_vision`). A tower trained together with the language model, even with the probe's
loss added (`probe_weight`; with the tower frozen it only tracks what the tower shows), gave a
target that did not read the direction of motion (teacher-forced, README). The probe is not saved.
Every step draws fresh clips (seed = step * batch + i), all of a batch at one of a mix of frame
counts and resolutions (TrainConfig.lengths), so the vision tower and M-RoPE see many visual
lengths. Fully seeded, deterministic algorithms, fixed thread count; the output directory records
the config hash and a matching directory is reused instead of retrained.

Scoring. parse_answer() reads each described object's attributes back from a greedy answer; each
ground-truth object is matched to at most one described object (the assignment that agrees on the
most attributes) and an attribute counts as right when the matched object states it correctly
(a missed object is wrong on every attribute). Chance = the same score of another clip's answer
(answers shuffled across the evaluation clips), next to the uniform-guess figure of each attribute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparrow.world.language import DIRECTION_OF_WORD, aux_qa, describe, make_question, parse_answer
from sparrow.world.processor import ASSET_DIR, collate, encode_clip, patchify
from sparrow.world.render import render
from sparrow.world.scene import BACKGROUNDS, COLOURS, SHAPES, make_scene
from sparrow.world.token_labels import NUM_CLASSES, token_labels
from sparrow.world.tokenizer import WordTokenizer, build_vocab

ATTRIBUTES = ("colour", "shape", "size", "motion", "speed", "start", "spin", "appear", "turn", "collide", "leave")
CORE = ("colour", "shape", "motion")
# uniform guessing over each attribute's values (scene.py): 6 colours, 4 shapes, 2 sizes,
# 5 motions (4 directions + still), 3 speeds (slow/fast/none), 9 start cells, 2 for each flag
UNIFORM_CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "size": 1 / 2, "motion": 1 / 5, "speed": 1 / 3, "start": 1 / 9,
                  "spin": 1 / 2, "appear": 1 / 2, "turn": 1 / 2, "collide": 1 / 2, "leave": 1 / 2}
EVAL_SEED0 = 10_000_000  # held-out clips: training seeds stay far below
# The M-RoPE rule training placed the answer with (generation_position_ids: the installed
# get_rope_index, the answer after the prompt's largest position): sparrow.targets.positions'
# "forward". The config records it (`sparrow_positions`) so that load_target runs the target with it.
TRAINED_POSITIONS = "forward"
# the answer words a clip decides (everything else follows from the grammar)
CONTENT_WORDS = (tuple(COLOURS) + SHAPES + tuple(BACKGROUNDS)
                 + ("small", "large", "left", "right", "top", "bottom", "center", "upward", "downward",
                    "up", "down", "slowly", "quickly", "slow", "fast", "still", "one", "two", "three", "four",
                    "five", "early", "late", "halfway", "middle", "beginning", "end", "rotating", "spinning",
                    "appears", "exits", "leaves", "reverses", "turns", "collide", "collides", "bump", "never",
                    "no", "only", "visible", "place"))


@dataclass
class ModelConfig:
    hidden_size: int = 192
    num_hidden_layers: int = 6
    intermediate_size: int = 512
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    mrope_section: tuple = (8, 12, 12)  # sums to head_dim / 2 = 32
    rope_theta: float = 10000.0
    vision_depth: int = 2
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 256
    vision_heads: int = 2


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 8
    aux_fraction: float = 0.5  # clips trained on a short inventory / motion question
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1  # on a shared 2-core machine one thread trains ~6x faster than two
    content_weight: float = 3.0  # loss weight of CONTENT_WORDS relative to the other answer words
    probe_weight: float = 0.5  # weight of the per-visual-token probe loss (token_labels.py)
    # before the joint run, the vision tower and the probe alone learn token_labels for this many
    # steps of `batch_size` clips (0: none), and the joint run then keeps the tower as it is: with
    # the tower trained jointly the target did not read the direction of motion (README)
    vision_pretrain_steps: int = 1500
    vision_pretrain_lr: float = 1e-3
    freeze_vision: bool = True
    # (frames, height) drawn uniformly per training batch (per clip without one_length_per_batch);
    # width = height. Long clips come from more frames at 112-224 px (up to 96 frames), the way
    # the demo's long clips do.
    lengths: tuple = ((4, 112), (8, 112), (16, 112), (32, 112), (48, 112), (4, 168), (8, 168),
                      (96, 112), (4, 224), (8, 224), (12, 224), (16, 224))
    # all clips of a batch share one (frames, height), drawn per step from `lengths`: with a mix,
    # every clip is padded to the batch's longest (a joint step took 2.4 s instead of 1.4 s)
    one_length_per_batch: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    # continue from a world target trained before (its directory) instead of a random init;
    # `model` must then match its architecture
    init_from: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, tok: WordTokenizer) -> str:
        d = self.to_dict()
        if self.init_from:  # the starting weights count by what made them, not by where they lie
            d["init_from"] = json.loads((Path(self.init_from) / "train_info.json").read_text())["config_hash"]
        blob = json.dumps({"train": d, "vocab": tok.tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config(tok: WordTokenizer, mc: ModelConfig = ModelConfig()):
    from transformers import Qwen2_5_VLConfig

    vocab = int(math.ceil(len(tok) / 16) * 16)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
            num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_key_value_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta,
                             "mrope_section": list(mc.mrope_section)},
            bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(
            depth=mc.vision_depth, hidden_size=mc.vision_hidden_size, intermediate_size=mc.vision_intermediate_size,
            num_heads=mc.vision_heads, out_hidden_size=mc.hidden_size, patch_size=14, temporal_patch_size=2,
            spatial_merge_size=2, window_size=112, fullatt_block_indexes=list(range(mc.vision_depth)),
            tokens_per_second=1),
        image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, sparrow_positions=TRAINED_POSITIONS,
    )


def build_model(tok: WordTokenizer, mc: ModelConfig = ModelConfig(), seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = model_config(tok, mc)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    _set_generation_defaults(model, tok)
    return model


def _set_generation_defaults(model, tok):
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    gc.do_sample, gc.max_new_tokens = False, 160
    for k in ("temperature", "top_p", "top_k"):
        setattr(gc, k, None)


# -- data ------------------------------------------------------------------------------------

def clip_length(seed: int, lengths) -> tuple[int, int]:
    rng = np.random.default_rng([seed, 0x1E9])
    return tuple(lengths[int(rng.integers(len(lengths)))])


def training_example(seed: int, frames: int, height: int, tok: WordTokenizer, aux_fraction: float = 0.0,
                     kind: str | None = None) -> dict:
    """Prompt + answer as one sequence; labels = answer tokens (+ EOS), -100 elsewhere. A fraction
    `aux_fraction` of the clips get one of the short auxiliary questions (language.aux_qa) instead
    of the description; `kind` ("describe", "inventory" or "motion") forces the question."""
    scene = make_scene(seed)
    if kind is None:
        u = np.random.default_rng([seed, 0xA11]).random()
        kind = "describe" if u >= aux_fraction else ("inventory" if u < aux_fraction / 2 else "motion")
    question, answer = (make_question(seed), describe(scene)) if kind == "describe" else aux_qa(scene, kind)
    x = encode_clip(render(scene, frames, height), question, tok)
    x["token_labels"] = token_labels(scene, frames, height)
    ans = torch.tensor([tok.encode(answer) + [tok.eos_token_id]])
    P = x["input_ids"].shape[1]
    x["input_ids"] = torch.cat([x["input_ids"], ans], 1)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(ans)], 1)
    x["labels"] = torch.cat([torch.full((1, P), -100), ans], 1)
    return x


def _batch_labels(items: list[dict], length: int) -> torch.Tensor:
    """The items' labels left-padded with -100 to `length`, as collate pads their inputs."""
    return torch.cat([torch.nn.functional.pad(x["labels"], (length - x["labels"].shape[1], 0), value=-100)
                      for x in items])


def _batch_clips(step: int, cfg: TrainConfig, offset: int = 0) -> list[tuple[int, int, int]]:
    """(seed, frames, height) of the clips of a training batch: seeds offset + step * batch + i,
    each clip at a length from cfg.lengths, all at the one the first seed picks if
    cfg.one_length_per_batch."""
    first = cfg.seed * 1_000_003 + offset + step * cfg.batch_size
    lengths = (clip_length(first, cfg.lengths),) if cfg.one_length_per_batch else cfg.lengths
    return [(seed, *clip_length(seed, lengths)) for seed in range(first, first + cfg.batch_size)]


def training_batch(step: int, cfg: TrainConfig, tok: WordTokenizer) -> dict:
    items = [training_example(seed, frames, height, tok, cfg.aux_fraction)
             for seed, frames, height in _batch_clips(step, cfg)]
    batch = collate(items, tok.pad_token_id)
    batch["labels"] = _batch_labels(items, batch["input_ids"].shape[1])
    batch["token_labels"] = torch.cat([x["token_labels"] for x in items])
    return batch


class _VisionProbe(torch.nn.Module):
    """Linear heads on the merger's output, one per column of token_labels (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in NUM_CLASSES)

    def forward(self, embeds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy per column on tokens that show an object). The loss is the mean
        cross-entropy of every column over the tokens that show an object, plus that of the colour
        column's "no object" over the others: objects cover a few percent of the cells, and a
        probe scored over all of them would learn to answer "nothing"."""
        losses, acc = [], []
        on = labels[:, 0] > 0
        background = embeds.new_zeros(())
        for j, head in enumerate(self.heads):
            logits = head(embeds)
            losses.append(torch.nn.functional.cross_entropy(logits[on], labels[on, j]))
            acc.append((logits[on].argmax(-1) == labels[on, j]).float().mean())
            if j == 0 and not on.all():
                background = torch.nn.functional.cross_entropy(logits[~on], labels[~on, 0])
        return torch.stack(losses).mean() + background, torch.stack(acc)


def generation_position_ids(model, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions (3, B, S) of prompt + answer as step-by-step cached decoding gives them
    (TRAINED_POSITIONS): the prompt's from the model's get_rope_index, answer token i at (largest
    prompt position) + 1 + i. (HF `generate` continues after the prompt's last position instead.)

    Why not let the forward compute them: transformers 5.x places text that follows a video at
    (video start) + max(h, w) / merge, but generation continues after the largest prompt position,
    which grows with the frame count (the temporal index). A plain teacher-forced forward would
    train the answer right after the question while generation puts it up to ~T positions later,
    a gap the target never saw and that grows with the video."""
    from sparrow.targets.hf import continue_positions

    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    S = labels.shape[1]
    first_answer = (labels != -100).int().argmax(1)  # rows are left-padded, answers end every row
    return continue_positions(pos, batch["attention_mask"], S - first_answer)[0]


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer, each target token weighted by weights[token]."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    w = weights[labels[keep]]
    return (ce * w).sum() / w.sum()


# -- training --------------------------------------------------------------------------------

def _deterministic(threads: int, seed: int):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _cosine_lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_ratio at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def vision_inputs(clips) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, grid_thw, token_labels) of the vision tower alone for these (seed, frames, height) clips."""
    pixels, grids, labels = [], [], []
    for seed, frames, height in clips:
        scene = make_scene(seed)
        p, g = patchify(render(scene, frames, height))
        pixels.append(p)
        grids.append(g)
        labels.append(token_labels(scene, frames, height))
    return torch.cat(pixels), torch.cat(grids), torch.cat(labels)


def vision_batch(step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vision_inputs of a batch for the vision pretraining stage, drawn as the joint run's batches
    are; seeds 5e6 + ... are disjoint from the joint run's and the evaluation's."""
    return vision_inputs(_batch_clips(step, cfg, offset=5_000_000))


def pretrain_vision(tower, probe: _VisionProbe, cfg: TrainConfig, log=print):
    """Train the vision tower and the probe on token_labels alone (no language model)."""
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_pretrain_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    t0 = time.time()
    for step in range(cfg.vision_pretrain_steps):
        pixels, grid, labels = vision_batch(step, cfg)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.vision_pretrain_steps, cfg.vision_pretrain_lr, cfg.warmup,
                                 cfg.min_lr_ratio)
        loss, acc = probe(tower(pixels, grid_thw=grid).pooler_output, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.vision_pretrain_steps - 1:
            log(f"vision step {step:4d}  probe {loss.item():.3f} (colour/shape/size/direction acc "
                + "/".join(f"{a:.2f}" for a in acc.tolist()) + f")  {time.time() - t0:.0f}s")


def train_world_target(out_dir=ASSET_DIR, cfg: TrainConfig = TrainConfig(), force: bool = False, log=print,
                       save_dtype=torch.float16) -> Path:
    """Train the target and save it (save_pretrained in `save_dtype` + tokenizer.json + train_info.json).
    Skips training when out_dir already holds a model trained with the same config and vocabulary."""
    out = Path(out_dir)
    tok_path = out / "tokenizer.json"
    tok = WordTokenizer.load(tok_path) if tok_path.exists() else build_vocab()
    h = cfg.hash(tok)
    info_path = out / "train_info.json"
    if not force and info_path.exists() and (out / "config.json").exists():
        if json.loads(info_path.read_text()).get("config_hash") == h:
            log(f"{out}: already trained with config {h}; skipping (force=True retrains)")
            return out
    _deterministic(cfg.threads, cfg.seed)
    if cfg.init_from:
        model, _ = load_world_target(cfg.init_from)
        init_info = json.loads((Path(cfg.init_from) / "train_info.json").read_text())
        init_info.pop("losses", None)
    else:
        model, init_info = build_model(tok, cfg.model, cfg.seed), None
    model.train()
    probe = _VisionProbe(cfg.model.hidden_size)
    if cfg.vision_pretrain_steps:
        pretrain_vision(model.model.visual, probe, cfg, log)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    seen = {}  # the merger's output of the current forward pass
    hook = model.model.visual.register_forward_hook(lambda m, i, o: seen.__setitem__("embeds", o.pooler_output))
    weights = torch.ones(model.config.text_config.vocab_size)
    weights[tok.convert_tokens_to_ids([w for w in CONTENT_WORDS if w in tok.tokens])] = cfg.content_weight
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params += [("probe." + n, p) for n, p in probe.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step):
        return _cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)

    t0 = time.time()
    ema = None
    losses = []
    for step in range(cfg.steps):
        batch = training_batch(step, cfg, tok)
        labels, vis_labels = batch.pop("labels"), batch.pop("token_labels")
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        position_ids = generation_position_ids(model, batch, labels)
        lm_loss = _answer_loss(model(**batch, position_ids=position_ids).logits, labels, weights)
        probe_loss, probe_acc = probe(seen.pop("embeds"), vis_labels)
        loss = lm_loss + cfg.probe_weight * probe_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        losses.append(round(loss.item(), 4))
        if step % 25 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  ema {ema:.3f}  answer {lm_loss.item():.3f}  "
                f"probe {probe_loss.item():.3f} (colour/shape/size/direction acc "
                + "/".join(f"{a:.2f}" for a in probe_acc.tolist()) + f")  lr {lr_at(step):.2e}  "
                f"{time.time() - t0:.0f}s")
    hook.remove()
    train_s = time.time() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(save_dtype).save_pretrained(out)
    model.float()
    tok.save(tok_path)
    info = {"config_hash": h, "train_config": cfg.to_dict(), "train_seconds": round(train_s, 1),
            "final_loss_ema": round(ema, 4), "losses": losses, "torch": torch.__version__,
            "threads": cfg.threads, "saved_dtype": str(save_dtype).replace("torch.", ""), "init": init_info}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved {out} ({train_s:.0f}s of training)")
    return out


def load_world_target(path=ASSET_DIR, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a trained world target; weights are stored in half precision and
    loaded back as `dtype` (float32 by default)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no trained world target in {path}: run scripts/train_world_target.py")
    tok = WordTokenizer.load(path / "tokenizer.json")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    model.eval()
    _set_generation_defaults(model, tok)
    return model, tok


# -- greedy answers and scoring ----------------------------------------------------------------

@torch.no_grad()
def greedy_answers(model, tok: WordTokenizer, seeds, frames: int = 8, height: int = 112,
                   max_new_tokens: int = 160, batch_size: int = 8) -> list[str]:
    """The target's greedy answer (HF generate) to each seed's question about its clip."""
    out = []
    for k in range(0, len(seeds), batch_size):
        items = [encode_clip(render(make_scene(s), frames, height), make_question(s), tok)
                 for s in seeds[k:k + batch_size]]
        batch = collate(items, tok.pad_token_id)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += tok.batch_decode(gen[:, batch["input_ids"].shape[1]:])
    return out


SIZE_WORDS = ("small", "large")
AFTER_TOWARD_THE = ("left", "right", "top", "bottom")  # the direction words "toward the" allows


def read_positions(words: list[str]) -> list[tuple[int, str, tuple]]:
    """(index, class, candidate words) of the answer words that only the video decides, given the
    words before them: the colour and the shape of each object's first mention ("<size> <colour>
    <shape>") and a sentence's first direction in "to the <left|right>" / "toward the
    <left|right|top|bottom>" (a later one, after a turn or a bounce, is its opposite). The
    candidates are the words the grammar allows there."""
    out, said_direction = [], False
    for i, w in enumerate(words):
        prev = words[i - 1] if i >= 1 else ""
        prev2 = words[i - 2] if i >= 2 else ""
        direction = w in AFTER_TOWARD_THE and prev == "the" and prev2 in ("to", "toward")
        if w in COLOURS and prev in SIZE_WORDS:
            out.append((i, "colour", tuple(COLOURS)))
        elif w in SHAPES and prev in COLOURS and prev2 in SIZE_WORDS:
            out.append((i, "shape", SHAPES))
        elif direction and not said_direction:
            out.append((i, "direction", ("left", "right") if prev2 == "to" else AFTER_TOWARD_THE))
        said_direction = w != "." and (said_direction or direction or w in ("upward", "downward"))
    return out


@torch.no_grad()
def teacher_forced_reading(model, tok: WordTokenizer, seeds, frames: int = 8, height: int = 112,
                           kind: str = "describe", batch_size: int = 8) -> dict:
    """How often the target, reading the reference answer (teacher forcing), ranks the right word
    first among the words the grammar allows at each read_positions() place.

    A greedy answer can go wrong after one early mistake (a misnamed object); this measure cannot,
    so at chance it means the target does not read that attribute from the video at all.
    Returns {class: {"accuracy", "chance" (mean 1/candidates), "count"}}."""
    hits, chance, count = {}, {}, {}
    for k in range(0, len(seeds), batch_size):
        items = [training_example(s, frames, height, tok, kind=kind) for s in seeds[k:k + batch_size]]
        batch = collate(items, tok.pad_token_id)
        labels = _batch_labels(items, batch["input_ids"].shape[1])
        logits = model(**batch, position_ids=generation_position_ids(model, batch, labels)).logits
        for r in range(len(items)):
            where = torch.nonzero(labels[r] != -100).flatten()
            words = [tok.tokens[int(i)] for i in labels[r, where]]
            for j, cls, cands in read_positions(words):
                ids = tok.convert_tokens_to_ids(list(cands))
                pick = cands[int(logits[r, int(where[j]) - 1, ids].argmax())]
                same = (pick == words[j]) if cls != "direction" else DIRECTION_OF_WORD[pick] == DIRECTION_OF_WORD[words[j]]
                hits[cls] = hits.get(cls, 0) + same
                chance[cls] = chance.get(cls, 0) + 1 / len(cands)
                count[cls] = count.get(cls, 0) + 1
    return {c: {"accuracy": hits[c] / count[c], "chance": chance[c] / count[c], "count": count[c]} for c in count}


def score_answer(answer: str, truth: list[dict]) -> dict:
    """Per-attribute hits (0..len(truth)) of one answer against Scene.attributes(), plus the
    object-count hit. Objects are matched one to one, maximising the agreeing attributes."""
    pred = parse_answer(answer)
    best, best_hits = -1, {a: 0 for a in ATTRIBUTES}
    n = len(truth)
    for perm in itertools.permutations(range(max(len(pred), n)), n):
        hits = {a: 0 for a in ATTRIBUTES}
        for g, p in zip(truth, perm):
            if p < len(pred):
                for a in ATTRIBUTES:
                    hits[a] += pred[p][a] == g[a]
        total = sum(hits.values())
        if total > best:
            best, best_hits = total, hits
    best_hits["count"] = int(len(pred) == n)
    return best_hits


def accuracy(answers: list[str], truths: list[list[dict]]) -> dict:
    """Attribute accuracies (fraction of ground-truth objects), count accuracy, and 'core' =
    the mean of colour, shape and motion."""
    tot = {a: 0 for a in ATTRIBUTES}
    count = 0
    n_obj = sum(len(t) for t in truths)
    for ans, truth in zip(answers, truths):
        h = score_answer(ans, truth)
        count += h.pop("count")
        for a in ATTRIBUTES:
            tot[a] += h[a]
    acc = {a: tot[a] / n_obj for a in ATTRIBUTES}
    acc["count"] = count / len(answers)
    acc["core"] = sum(acc[a] for a in CORE) / len(CORE)
    return acc


def evaluate(model, tok, n: int = 32, frames: int = 8, height: int = 112, seed0: int = EVAL_SEED0) -> dict:
    """Greedy answers on n held-out clips: accuracy, shuffled-answer chance, answer lengths; and
    what the target reads from the video when fed the reference answers (teacher_forced_reading)
    to the description and to each short question."""
    seeds = list(range(seed0, seed0 + n))
    truths = [make_scene(s).attributes() for s in seeds]
    t0 = time.time()
    answers = greedy_answers(model, tok, seeds, frames, height)
    gen_s = time.time() - t0
    shuffled = answers[1:] + answers[:1]  # every clip scored with the next clip's answer
    refs = [describe(make_scene(s)) for s in seeds]
    return {
        "frames": frames, "height": height, "clips": n,
        "accuracy": accuracy(answers, truths),
        "chance_shuffled": accuracy(shuffled, truths),
        "reference_answers": accuracy(refs, truths),
        "chance_uniform": dict(UNIFORM_CHANCE, core=sum(UNIFORM_CHANCE[a] for a in CORE) / len(CORE)),
        "mean_words": float(np.mean([len(a.split()) for a in answers])),
        "distinct_answers": len(set(answers)),
        "generate_seconds": round(gen_s, 1),
        "examples": answers[:3],
        "teacher_forced": {kind: teacher_forced_reading(model, tok, seeds, frames, height, kind)
                           for kind in ("describe", "inventory", "motion")},
    }


@torch.no_grad()
def decode_ms_per_token(model, tok: WordTokenizer, frames: int = 8, height: int = 112, new_tokens: int = 64,
                        seed: int = EVAL_SEED0, repeats: int = 3) -> float:
    """Autoregressive decode time per token (ms, batch 1, HF generate with its KV cache), prefill
    excluded: (time for 1 + new_tokens tokens - time for 1 token) / new_tokens, best of `repeats`."""
    x = encode_clip(render(make_scene(seed), frames, height), make_question(seed), tok)

    def run(n):
        t = time.perf_counter()
        model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    run(2)  # warm-up
    best = min(run(1 + new_tokens) - run(1) for _ in range(repeats))
    return 1000 * best / new_tokens


def one_layer_twin(model, tok: WordTokenizer):
    """A random model of the target's exact config but a single decoder layer (a draft-sized
    yardstick for decode cost)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.text_config.num_hidden_layers = 1
    cfg.text_config.layer_types = cfg.text_config.layer_types[:1]
    cfg._attn_implementation = model.config._attn_implementation
    twin = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    _set_generation_defaults(twin, tok)
    return twin
