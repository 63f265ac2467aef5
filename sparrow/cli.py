"""The `sparrow` command: records, gen-data, train, eval, generate, export-vllm (also `python -m sparrow.cli`).

    sparrow records  --videos clips/ --questions questions.txt > records.jsonl
    sparrow gen-data --target MODEL_DIR --data records.jsonl --out data/
    sparrow train    --target MODEL_DIR --data data/ --out drafts/sparrow [--no-ivsb] [--no-mtp]
                     [--visual-source none|mid|embed] [--resume]
    sparrow eval     --target MODEL_DIR --data heldout.jsonl
                     --draft sparrow=drafts/sparrow --draft msd=drafts/msd --out results/eval
    sparrow generate --target MODEL_DIR [--draft drafts/sparrow] --video clip.mp4 --prompt "What moves?"
                     [--tree | --chain K] [--compare]
    sparrow export-vllm drafts/sparrow served-draft/   (sparrow/integrations/vllm)

--target is a Hugging Face model folder (save_pretrained), loaded offline with
AutoModelForImageTextToText (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) on --device in --dtype, with
--attn attention ("sdpa" by default; "vision=sdpa,text=eager" sets the vision tower's and the
language model's apart).
--processor turns one record into the model's inputs: "auto" (the default) uses the checkpoint's
own tokenizer, chat template and processor settings (sparrow/inputs/auto.py), or the world
target's processor for a folder with the world's word tokenizer; "module:function" names a
callable (sparrow/train/records.py has the record format and the callable's contract). The
feature the draft reads (FeatureSpec) is chosen once, at gen-data (--feature-layer,
--feature-before-norm); train takes it from the data's index, eval and generate from the drafts'
configs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


class CLIError(Exception):
    pass


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def parse_attn(spec: str | None):
    """--attn: one implementation for the whole model ("sdpa", "eager") or one per part
    ("vision=sdpa,text=eager"; a part left out keeps sdpa) -> from_pretrained's attn_implementation."""
    from sparrow.targets import ATTN_PARTS, attn_by_subconfig

    if not spec or "=" not in spec:
        return spec or "sdpa"
    parts = {}
    for item in spec.split(","):
        part, sep, impl = (x.strip() for x in item.partition("="))
        if not sep or not impl or part not in ATTN_PARTS:
            raise CLIError(f"--attn {spec!r}: expected IMPL or vision=IMPL,text=IMPL (parts: {', '.join(ATTN_PARTS)})")
        parts[part] = impl
    return attn_by_subconfig(parts)


def load_target(path: str, device: str | None = None, dtype: str = "auto", feature=None, attn="sdpa",
                positions: str | None = None):
    """A saved Hugging Face model folder -> TargetAdapter (sparrow.load_target), its errors as the
    CLI's: a folder that is not a model, an attention implementation transformers refuses."""
    from sparrow.targets import FeatureSpec
    from sparrow.targets import load_target as adapter_for

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise CLIError(f"--target {path}: not a Hugging Face model folder (no config.json)")
    try:
        return adapter_for(path, feature or FeatureSpec(), positions, device=device, dtype=dtype,
                           attn_implementation=attn)
    except ValueError as e:
        if "attn_implementation" in str(e):
            shown = ",".join(f"{k.split('_')[0]}={v}" for k, v in attn.items()) if isinstance(attn, dict) else attn
            raise CLIError(f"--attn {shown}: {e}") from e
        raise CLIError(f"--target {path}: cannot load it as an image-text-to-text model ({e})") from e


def _processor(spec: str):
    from sparrow.train.records import resolve_callable

    try:
        return resolve_callable(spec)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _sampling(a) -> dict:
    """--fps / --num-frames / --max-pixels (records, generate) -> the record keys that were given."""
    if a.fps is not None and a.num_frames is not None:
        raise CLIError("give --fps or --num-frames, not both")
    given = {"fps": a.fps, "num_frames": a.num_frames, "max_pixels": a.max_pixels}
    return {k: v for k, v in given.items() if v is not None}


# -- subcommands ----------------------------------------------------------------------------------
def cmd_records(a) -> int:
    from sparrow.train.folder import records_from_folder
    from sparrow.train.records import load_records

    records = records_from_folder(a.videos, a.questions, _sampling(a))
    load_records(records)  # the checks gen-data will make (sampling values, unique ids), now
    out = open(a.out, "w", encoding="utf-8") if a.out else sys.stdout
    try:
        for rec in records:
            out.write(json.dumps(rec) + "\n")
    finally:
        if a.out:
            out.close()
    print(f"records: {len(records)} records from {a.videos}" + (f" in {a.out}" if a.out else ""), file=sys.stderr)
    return 0


def cmd_gen_data(a) -> int:
    from sparrow.targets import FeatureSpec
    from sparrow.train.datagen import format_summary, generate_data

    make_inputs = resolve_processor(a.processor, a.target)
    target = load_target(a.target, a.device, a.dtype, FeatureSpec(a.feature_layer, not a.feature_before_norm),
                         parse_attn(a.attn), a.positions)
    s = generate_data(
        target, a.data, make_inputs, a.out, max_new_tokens=a.max_new_tokens, mid_pool=a.mid_pool,
        shard_size=a.shard_size, store_embeds=a.store_embeds, store_dtype=_dtype(a.store_dtype),
        answers=a.answers, progress=not a.no_progress, limit=a.limit, batch_size=a.batch_size,
    )
    print(format_summary(s))
    return 0


def cmd_train(a) -> int:
    from sparrow.targets import FeatureSpec
    from sparrow.train.shards import ShardIndex
    from sparrow.train.trainer import TrainConfig, train

    index = ShardIndex.load(a.data)
    feat = index.settings.get("feature", {})
    target = load_target(a.target, a.device, a.dtype, FeatureSpec(feat.get("layer", -1), feat.get("after_norm", True)),
                         parse_attn(a.attn), a.positions)
    cfg = TrainConfig(
        epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps, schedule=a.schedule, min_lr_ratio=a.min_lr_ratio, grad_clip=a.grad_clip,
        unroll=1 if a.no_mtp else a.unroll, mtp_decay=a.mtp_decay, mtp_detach=a.mtp_detach, ivsb=not a.no_ivsb,
        feature_weight=a.feature_weight, token_weight=a.token_weight, feature_noise=a.feature_noise,
        loss_on=a.loss_on, seed=a.seed, checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
    )
    overrides = {"visual_source": a.visual_source, "window": a.window}
    resume = True if a.resume == "latest" else a.resume
    s = train(target, a.data, a.out, cfg, draft_overrides=overrides, init_draft=a.init_draft, resume=resume,
              draft_dtype=_dtype(a.draft_dtype), stop_after=a.stop_after, progress=not a.no_progress)
    last = s["last"]
    status = "finished" if s["finished"] else "stopped (resume with --resume)"
    print(f"train: {status} at step {s['steps']}/{s['total_steps']} on {s['samples']} samples in {s['seconds']:.1f}s; "
          f"loss {last.get('loss', float('nan')):.4f}, top-1 agreement {last.get('acc0', float('nan')):.3f}; "
          f"draft ({s['visual_source']}, prefix {s['prefix']}) in {a.out}")
    return 0


def cmd_export_vllm(a) -> int:
    from sparrow.integrations.vllm.export import export_vllm

    out = export_vllm(a.draft, a.out, overwrite=a.overwrite)
    print(f"export-vllm: {a.draft} -> {out}; serve it with --speculative-config "
          f"'{{\"method\": \"eagle\", \"model\": \"{out}\", \"num_speculative_tokens\": 4, "
          f"\"disable_padded_drafter_batch\": true}}' --no-enable-prefix-caching (README, \"Serving with vLLM\")")
    return 0


def _parse_drafts(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise CLIError(f"--draft {spec!r}: expected NAME=DIR or DIR")
        if name in [n for n, _ in out] or name == "autoregressive":
            raise CLIError(f"--draft {spec!r}: the name {name!r} is taken")
        out.append((name, path))
    return out


def cmd_eval(a) -> int:
    from sparrow.draft import SparrowDraft
    from sparrow.draft.config import DraftConfig
    from sparrow.targets import FeatureSpec
    from sparrow.train.evaluate import evaluate, markdown_table

    make_inputs = resolve_processor(a.processor, a.target)
    drafts_spec = _parse_drafts(a.draft)
    configs = {}
    for name, path in drafts_spec:
        try:
            configs[name] = DraftConfig.load(path)
        except FileNotFoundError as e:
            raise CLIError(f"--draft {name}={path}: {e}") from e
    feats = {(c.feature_layer, c.feature_after_norm) for c in configs.values()}
    if len(feats) > 1:
        raise CLIError(f"the drafts read different target features {sorted(feats)}; evaluate them separately")
    layer, after = feats.pop() if feats else (-1, True)
    target = load_target(a.target, a.device, a.dtype, FeatureSpec(layer, after), parse_attn(a.attn), a.positions)
    drafts = {name: SparrowDraft.from_pretrained(path, target).eval() for name, path in drafts_spec}
    tree = _tree(a) if a.chain is None and any(v is not None for v in (a.tree_depth, a.tree_top_k, a.tree_nodes)) else None
    res = evaluate(target, a.data, make_inputs, drafts, max_new_tokens=a.max_new_tokens, chain=a.chain, tree=tree,
                   temperature=a.temperature, warmup=a.warmup, out=a.out, progress=not a.no_progress, limit=a.limit)
    print(markdown_table(res["overall"]))
    if a.out:
        print(f"eval: results in {a.out}.json and {a.out}.md")
    return 0


def _tree(a):
    """--tree-depth / --tree-top-k / --tree-nodes over TreeConfig's defaults."""
    from sparrow.drafting import TreeConfig

    d = TreeConfig()
    return TreeConfig(depth=a.tree_depth or d.depth, top_k=a.tree_top_k or d.top_k,
                      total_nodes=a.tree_nodes or d.total_nodes)


# -- generate: one video, one prompt ----------------------------------------------------------------
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def folder_tokenizer(path: str):
    """The target folder's tokenizer: the world's word tokenizer (sparrow/world/tokenizer.py), a
    Hugging Face one, or None when the folder has none that loads."""
    from sparrow.world.tokenizer import WordTokenizer

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        try:
            return WordTokenizer.load(path)
        except (ValueError, KeyError):
            pass  # a Hugging Face tokenizer.json
    if not any(os.path.exists(os.path.join(path, n)) for n in HF_TOKENIZER_FILES):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"sparrow: the tokenizer in {path} does not load ({e})", file=sys.stderr)
        return None


def _world_processor(tokenizer):
    """The world target's processor (sparrow/world/processor.py) over a record's frames (a video
    file is decoded and sampled first, every frame pair one temporal patch)."""
    import numpy as np

    from sparrow.inputs import is_video_file, read_video
    from sparrow.world.processor import encode_clip

    def make_inputs(record: dict) -> dict:
        if is_video_file(record.get("video")):
            frames = read_video(record["video"], fps=record.get("fps"), num_frames=record.get("num_frames")).frames
        else:
            frames = np.asarray(record["frames"])
        if frames.ndim == 4 and frames.shape[-1] != 3 and frames.shape[1] == 3:  # [T, C, H, W]
            frames = frames.transpose(0, 2, 3, 1)
        return encode_clip(frames, record.get("prompt") or "", tokenizer)

    return make_inputs


def resolve_processor(spec: str | None, target_dir: str, tokenizer=None):
    """--processor: "module:function", or "auto" (the default): the target's own processor, the
    world's for a folder with the world's word tokenizer, else the checkpoint's (sparrow/inputs).
    tokenizer: the folder's, when the caller has loaded it (folder_tokenizer) already."""
    from sparrow.inputs import checkpoint_processor
    from sparrow.world.tokenizer import WordTokenizer

    if spec and spec != "auto":
        return _processor(spec)
    if tokenizer is None and os.path.isdir(target_dir):
        tokenizer = folder_tokenizer(target_dir)
    if isinstance(tokenizer, WordTokenizer):
        return _world_processor(tokenizer)
    if tokenizer is None:
        raise CLIError(f"--target {target_dir}: --processor auto needs the checkpoint's tokenizer in the folder "
                       "(tokenizer.json / tokenizer_config.json); or pass --processor module:function "
                       "(sparrow/train/records.py)")
    try:
        return checkpoint_processor(target_dir, tokenizer=tokenizer)
    except (ValueError, OSError) as e:
        raise CLIError(f"--processor auto: {e}") from e


def _decode(tokenizer, ids: list) -> str:
    if tokenizer is not None:
        try:
            return repr(tokenizer.decode(ids, skip_special_tokens=True))
        except (IndexError, KeyError, ValueError, TypeError, OverflowError):
            pass  # ids the tokenizer does not know: show them as they are
    return f"token ids {ids}"


def stats_line(stats) -> str:
    return (f"{stats.accepted_per_step:.2f} accepted tokens/step, {stats.decode_tokens_per_s:.1f} decode tokens/s, "
            f"{stats.steps} steps ({stats.mode}, {stats.new_tokens} new tokens, prefill {stats.prefill_s:.3f} s, "
            f"decode {stats.decode_s:.3f} s)")


def _draft_shape(a) -> dict:
    """--tree / --chain K: the draft's proposal for generate."""
    return {"chain": a.chain} if a.chain is not None else {"tree": _tree(a)}


def _video_inputs(a, make_inputs, target) -> dict:
    """The one record {"video": --video, "prompt": --prompt} through the processor, on the device."""
    from sparrow.train.records import load_records, prepare_inputs

    if not os.path.exists(a.video):
        raise CLIError(f"--video {a.video}: no such file or folder")
    record = {"id": os.path.basename(os.path.normpath(a.video)), "video": os.path.abspath(a.video), "prompt": a.prompt,
              **_sampling(a)}
    inputs, _ = prepare_inputs(load_records([record])[0], make_inputs, target.model)
    return inputs


def cmd_generate(a) -> int:
    from sparrow.draft import SparrowDraft
    from sparrow.draft.config import DraftConfig
    from sparrow.generation import generate
    from sparrow.targets import FeatureSpec

    if a.compare and not a.draft:
        raise CLIError("--compare needs --draft (it compares speculative with autoregressive decoding)")
    if a.chain is not None and a.chain < 1:
        raise CLIError(f"--chain {a.chain}: expected k >= 1 draft tokens per step")
    tokenizer = folder_tokenizer(a.target) if os.path.isdir(a.target) else None
    make_inputs = resolve_processor(a.processor, a.target, tokenizer)
    feature = FeatureSpec()
    if a.draft:
        try:
            cfg = DraftConfig.load(a.draft)
        except FileNotFoundError as e:
            raise CLIError(f"--draft {a.draft}: {e}") from e
        feature = FeatureSpec(cfg.feature_layer, cfg.feature_after_norm)
    target = load_target(a.target, a.device, a.dtype, feature, parse_attn(a.attn), a.positions)
    draft = SparrowDraft.from_pretrained(a.draft, target).eval() if a.draft else None  # refuses another target's
    inputs = _video_inputs(a, make_inputs, target)
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    kw = {**sampling, **_draft_shape(a)} if draft is not None else sampling
    for _ in range(a.warmup):
        generate(target, draft, inputs, a.max_new_tokens, **kw)
    out = generate(target, draft, inputs, a.max_new_tokens, **kw)
    print(f"answer: {_decode(tokenizer, out.tokens[0])}")
    print(f"stats: {stats_line(out.stats)}")
    if a.compare:
        for _ in range(a.warmup):
            generate(target, None, inputs, a.max_new_tokens, **sampling)
        ref = generate(target, None, inputs, a.max_new_tokens, **sampling)
        print(f"autoregressive: {_decode(tokenizer, ref.tokens[0])}")
        print(f"autoregressive stats: {stats_line(ref.stats)}")
        same = "yes" if out.tokens == ref.tokens else "no"
        if a.temperature > 0:
            same += " (sampled: both follow the target's distribution; the tokens need not match)"
        print(f"identical: {same}")
        dsr = ref.stats.decode_s / out.stats.decode_s if out.stats.decode_s > 0 else float("nan")
        print(f"DSR: {dsr:.2f} (decode time autoregressive / speculative: {ref.stats.decode_s:.3f} s / "
              f"{out.stats.decode_s:.3f} s)")
    return 0


# -- parser -----------------------------------------------------------------------------------------
def _common(p, processor: bool):
    p.add_argument("--target", required=True, help="Hugging Face model folder of the target (save_pretrained)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="target weights dtype (auto: as saved)")
    p.add_argument("--attn", default="sdpa",
                   help="target attention: one implementation (sdpa, eager) or one per part, e.g. "
                        "vision=sdpa,text=eager (default sdpa; the language model's must be sdpa or eager)")
    if processor:
        p.add_argument("--processor", default="auto",
                       help="auto (default): the checkpoint's own tokenizer, chat template and processor "
                            "(sparrow/inputs/auto.py); or module:function building the inputs from a record")
    p.add_argument("--positions", default=None, choices=["release", "generate"],
                   help="Qwen-VL position rule: release (the models' own, the default unless the checkpoint "
                        "records another) or generate (what the installed transformers' generate does)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sampling_args(p) -> None:
    """How a video file's frames are sampled (sparrow/inputs/video.py), for records and generate."""
    p.add_argument("--fps", type=float, default=None,
                   help="frames sampled per second of video (default 2; LLaVA-OneVision: 32 frames)")
    p.add_argument("--num-frames", type=int, default=None, help="sample this many frames instead")
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel cap (Qwen-VL)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow", description="Sparrow speculative decoding: data, training, evaluation, generation.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = ap.add_subparsers(dest="command", metavar="{records,gen-data,train,eval,generate,export-vllm}")
    sub.required = True

    r = sub.add_parser("records", help="records JSONL from a folder of videos and a questions file",
                       description="One record per video (or image) and question, printed as JSONL (or "
                                   "written to --out): the input of gen-data and eval. See "
                                   "sparrow/train/folder.py for the questions file.")
    r.add_argument("--videos", required=True, help="folder of video files (.mp4, .mkv, .webm, ...) and/or images")
    r.add_argument("--questions", required=True,
                   help="text file, one question per line (asked of every video), or JSONL "
                        '{"prompt": ..., "video": NAME, "answer": ...}')
    _sampling_args(r)
    r.add_argument("--out", default=None, help="write here instead of standard output")
    r.set_defaults(func=cmd_records)

    g = sub.add_parser("gen-data", help="run the target over a dataset and store its answers and features",
                       description="Self-distillation data: the target answers each record greedily; its text "
                                   "features and layer-L/2 visual states are stored in safetensors shards + "
                                   "index.json. Resumable: rerun the same command after an interruption.")
    _common(g, processor=True)
    g.add_argument("--data", required=True, help="records JSONL (sparrow/train/records.py)")
    g.add_argument("--out", required=True, help="data folder (created; an existing one is resumed)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    g.add_argument("--mid-pool", type=int, default=1024,
                   help="keep at most this many layer-L/2 visual states per sample, average-pooled (0: all)")
    g.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    g.add_argument("--store-embeds", action="store_true", help="also store visual input embeddings (MSD baseline)")
    g.add_argument("--store-dtype", default="auto", choices=DTYPES, help="dtype of stored features (auto: the target's)")
    g.add_argument("--answers", default="target", choices=("target", "given"),
                   help="target: the target's own greedy answer (default); given: the records' answer_ids")
    g.add_argument("--feature-layer", type=int, default=-1, help="target layer whose output is h (default -1)")
    g.add_argument("--feature-before-norm", action="store_true", help="take h before the final norm")
    g.add_argument("--limit", type=int, default=None, help="stop after this many new samples")
    g.add_argument("--batch-size", type=int, default=4,
                   help="records per forward, left-padded (default 4; the data are the same for any size)")
    g.set_defaults(func=cmd_gen_data)

    t = sub.add_parser("train", help="train a draft (IVSB + MTP) on gen-data output",
                       description="Train the draft's fc and decoder layer; the target stays frozen. "
                                   "See sparrow/train/trainer.py for the losses and defaults.")
    _common(t, processor=False)
    t.add_argument("--data", required=True, help="data folder written by gen-data")
    t.add_argument("--out", required=True, help="output folder: the draft (save_pretrained) + checkpoints/")
    t.add_argument("--visual-source", default="none", choices=("none", "mid", "embed"),
                   help="none: Sparrow (VATA); mid: no-VATA ablation; embed: MSD-style baseline")
    t.add_argument("--window", type=int, default=0, help="VATA window (0: all text)")
    t.add_argument("--no-ivsb", action="store_true", help="no visual prefix while training (ablation)")
    t.add_argument("--no-mtp", action="store_true", help="one pass on the target's features (ablation)")
    t.add_argument("--unroll", type=int, default=3, help="MTP passes (default 3; weights mtp_decay**j)")
    t.add_argument("--mtp-decay", type=float, default=0.8)
    t.add_argument("--mtp-detach", action="store_true", help="no gradient through the fed-back features")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=0, help="> 0: train this many steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"))
    t.add_argument("--min-lr-ratio", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--feature-weight", type=float, default=1.0, help="SmoothL1 feature loss weight (EAGLE: 1.0)")
    t.add_argument("--token-weight", type=float, default=0.1, help="token cross-entropy weight (EAGLE: 0.1)")
    t.add_argument("--feature-noise", type=float, default=0.1, help="U(-a, a) noise on the input features")
    t.add_argument("--loss-on", default="answer", choices=("answer", "all"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    t.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --out, or from the one given")
    t.add_argument("--init-draft", default=None, help="start from this saved draft")
    t.add_argument("--draft-dtype", default="auto", choices=DTYPES, help="draft weights while training (auto: float32 under the target's autocast for a bf16/fp16 target, else the target's dtype)")
    t.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="acceptance and speedups of drafts against autoregressive decoding",
                       description="Runs sparrow.generate per record for autoregressive decoding and each "
                                   "draft; writes <out>.json and <out>.md.")
    _common(e, processor=True)
    e.add_argument("--data", required=True, help="held-out records JSONL")
    e.add_argument("--draft", action="append", default=[], help="NAME=DIR of a saved draft (repeatable)")
    e.add_argument("--out", default=None, help="path prefix of the results (<out>.json, <out>.md)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--chain", type=int, default=None, help="chain of k draft tokens (default: a dynamic tree)")
    e.add_argument("--tree-depth", type=int, default=None)
    e.add_argument("--tree-top-k", type=int, default=None)
    e.add_argument("--tree-nodes", type=int, default=None)
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--warmup", type=int, default=1, help="untimed requests per method first")
    e.add_argument("--limit", type=int, default=None, help="only the first N records")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export-vllm", help="write a trained draft as a folder vLLM serves (the Sparrow plugin)",
                       description="The draft's config and weights as a vLLM speculative model folder "
                                   "(sparrow/integrations/vllm/export.py); README, 'Serving with vLLM'.")
    x.add_argument("draft", help="folder of a draft saved by sparrow train")
    x.add_argument("out", help="output folder (created)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.set_defaults(func=cmd_export_vllm)

    g = sub.add_parser("generate", help="answer one video and prompt, speculatively with --draft",
                       description="Runs sparrow.generate on one video and prompt; prints the answer (decoded "
                                   "with the target folder's tokenizer when it has one) and one stats line. "
                                   "--compare also decodes autoregressively and prints the DSR.")
    _common(g, processor=True)
    g.add_argument("--video", required=True,
                   help="video file (.mp4, .mkv, .webm, ...), frames file (.npy/.pt) or folder of frames")
    _sampling_args(g)
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--draft", default=None, help="folder of a saved draft (none: autoregressive decoding only)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled draws")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--tree", action="store_true", help="a dynamic draft tree (the default; TreeConfig defaults)")
    shape.add_argument("--chain", type=int, default=None, metavar="K", help="a chain of K draft tokens per step")
    g.add_argument("--tree-depth", type=int, default=None)
    g.add_argument("--tree-top-k", type=int, default=None)
    g.add_argument("--tree-nodes", type=int, default=None)
    g.add_argument("--compare", action="store_true",
                   help="also decode autoregressively: its answer, whether it is identical, and the DSR")
    g.add_argument("--warmup", type=int, default=0, help="untimed runs of each decoding first (default 0; 1 for steadier timings)")
    g.set_defaults(func=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparrow.train.records import RecordError
    from sparrow.train.shards import DataError

    try:
        return args.func(args)
    except (CLIError, RecordError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        print(f"sparrow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
